"""``/healthz`` (the process is alive) and ``/readyz`` (it can do its job)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    """A named readiness check; it raises (or times out) when not ready."""

    name: str
    run: Callable[[], Awaitable[None]]


def router(checks: Callable[[], Sequence[Check]]) -> APIRouter:
    api = APIRouter(tags=["health"])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        results: dict[str, str] = {}
        ready = True
        for check in checks():
            try:
                await asyncio.wait_for(check.run(), CHECK_TIMEOUT_SECONDS)
                results[check.name] = "ok"
            except Exception as exc:  # any failure means "not ready", reported by name
                ready = False
                results[check.name] = f"failing: {type(exc).__name__}"
                log.warning(
                    "readiness check failed",
                    extra={"check": check.name, "error": type(exc).__name__},
                )
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": results},
            status_code=200 if ready else 503,
        )

    return api
