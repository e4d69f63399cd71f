"""One structured log line per request: method, path (no query), status, duration.

DICOM UIDs in the path (studies, series, instances) are replaced by a short
one-way digest: the log can still correlate requests about the same study
without naming it, and search parameters (the query string) are never logged.

The same middleware keeps the request id (the caller's ``X-Request-ID`` when it
is a plain token, else a new one): it is answered in ``X-Request-ID``, set in
``exchange.logs.request_id`` for every log line written while the request is
served, and passed on by the broker to nodes. It also counts the request in the
Prometheus metrics, by route template (never by path: paths hold UIDs).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange import logs
from exchange.metrics import HTTP_LATENCY, HTTP_REQUESTS, RETRIEVAL_BYTES
from exchange.uids import is_uid

log = logging.getLogger("exchange.request")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
_RETRIEVAL_PREFIX = "/dicomweb/"
#: Label of requests that matched no route (their paths are not labels: unbounded, UIDs).
UNMATCHED = "unmatched"


def redact(path: str) -> str:
    """The path with every UID segment replaced by ``uid-<12 hex>``."""
    return "/".join(
        f"uid-{hashlib.sha256(part.encode()).hexdigest()[:12]}"
        if "." in part and is_uid(part)
        else part
        for part in path.split("/")
    )


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _given_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return value.decode("ascii") if _REQUEST_ID.match(value) else None
    return None


def route_of(scope: Scope) -> str:
    """The matched route's template (``/dicomweb/studies/{study}``), never the path."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str) and template:
        return template
    label = scope.get("route_label")
    return label if isinstance(label, str) else UNMATCHED


class _Children:
    """Metric children by label values, looked up once (``labels()`` takes a lock)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], object] = {}
        self.latency: dict[tuple[str, str], object] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        counter = self.counts.get(key)
        if counter is None:
            counter = self.counts[key] = HTTP_REQUESTS.labels(route, method, str(status))
        counter.inc()  # type: ignore[attr-defined]
        histogram = self.latency.get((route, method))
        if histogram is None:
            histogram = self.latency[(route, method)] = HTTP_LATENCY.labels(route, method)
        histogram.observe(seconds)  # type: ignore[attr-defined]


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._children = _Children()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _given_id(scope) or new_request_id()
        token = logs.request_id.set(request_id)
        status = 500
        sent = 0
        retrieval = scope["method"] == "GET" and scope["path"].startswith(_RETRIEVAL_PREFIX)

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            elif retrieval:
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            self._children.observe(route_of(scope), scope["method"], status, elapsed)
            if retrieval and sent and status < 300:
                RETRIEVAL_BYTES.inc(sent)
            # Refused before routing (rate limited): counted, and logged in summary by
            # the limiter, so a flood cannot flood the log too.
            if scope.get("route_label") is None:
                log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": redact(scope["path"]),
                        "status": status,
                        "ms": round(elapsed * 1000, 1),
                    },
                )
            logs.request_id.reset(token)
