"""What every Exchange web app shares: error rendering, limits, request log, health."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI

from exchange.web import errors, health
from exchange.web.limits import BodyLimitMiddleware, LimitFor
from exchange.web.requestlog import RequestLogMiddleware


def finish(
    app: FastAPI, limit_for: LimitFor, checks: Callable[[], Sequence[health.Check]]
) -> FastAPI:
    """Install the shared behaviour on ``app`` (after its own routers)."""
    errors.install(app)
    app.include_router(health.router(checks))
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(RequestLogMiddleware)
    return app
