"""``GET /metrics``: the process's Prometheus metrics, for the operator's scraper only.

Who may read it: a client on loopback (a scraper or sidecar on the same host),
or anyone presenting ``Authorization: Bearer <metrics_token>`` when that setting
is given. Anyone else gets 403: the figures say how busy each site is, which is
not for callers of the API. The labels hold no PHI (``exchange.metrics``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence

import anyio
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from exchange.errors import Forbidden
from exchange.metrics import REGISTRY

log = logging.getLogger(__name__)

#: Reads the database for gauges (audit chain length, outbox depth) just before a scrape.
Refresh = Callable[[], None]


def _loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def router(token: str | None, refresh: Sequence[Refresh] = ()) -> APIRouter:
    api = APIRouter(tags=["metrics"])
    expected = f"Bearer {token}".encode() if token else None

    def _refresh_all() -> None:
        for step in refresh:
            try:
                step()
            except Exception as exc:  # a scrape still answers; the gauge keeps its last value
                log.warning("metrics refresh failed", extra={"error": type(exc).__name__})

    @api.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        address = request.client.host if request.client else None
        given = request.headers.get("authorization", "").encode()
        allowed = _loopback(address) or (
            expected is not None and hmac.compare_digest(given, expected)
        )
        if not allowed:
            raise Forbidden(
                "metrics are served to loopback clients and to holders of the metrics token"
            )
        if refresh:
            await anyio.to_thread.run_sync(_refresh_all)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return api
