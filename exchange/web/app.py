"""What every Exchange web app shares: error rendering, limits, request log, health, metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fastapi import FastAPI

from exchange.config import Settings
from exchange.web import errors, health, metrics, openapi
from exchange.web.limits import BodyLimitMiddleware, LimitFor, Pace
from exchange.web.ratelimit import RateLimitMiddleware, limiter_from
from exchange.web.requestlog import RequestLogMiddleware


def finish(
    app: FastAPI,
    limit_for: LimitFor,
    checks: Callable[[], Sequence[health.Check]],
    settings: Settings | None = None,
    refresh: Sequence[metrics.Refresh] = (),
) -> FastAPI:
    """Install the shared behaviour on ``app`` (after its own routers).

    Middleware, outermost first: request log (request id, metrics), rate limits,
    body limits; so a refusal is logged and counted, and costs no routing.
    Without ``settings`` (unit tests) there are no rate limits, pacing or metrics route.
    """
    errors.install(app)
    # /openapi.json tells the truth about error answers (what errors.install renders).
    openapi.install(app, lambda: getattr(app.state, "outcome_prefixes", (errors.FHIR_PREFIX,)))
    app.include_router(health.router(checks))
    pace = None
    limiter = None
    if settings is not None:
        token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
        app.include_router(metrics.router(token, refresh))
        pace = Pace(
            settings.body_idle_timeout_seconds,
            settings.body_min_bytes_per_second,
            settings.body_grace_seconds,
        )
        limiter = limiter_from(
            settings.rate_limit_per_second,
            settings.rate_limit_burst,
            settings.rate_limit_address_per_second,
            settings.rate_limit_address_burst,
            settings.rate_limit_max_clients,
            settings.rate_limit_exempt_networks,
        )
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for, pace=pace)
    if limiter is not None:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    app.add_middleware(RequestLogMiddleware)
    return app
