"""One structured log line per request: method, path (no query), status, duration.

DICOM UIDs in the path (studies, series, instances) are replaced by a short
one-way digest: the log can still correlate requests about the same study
without naming it, and search parameters (the query string) are never logged.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.uids import is_uid

log = logging.getLogger("exchange.request")


def redact(path: str) -> str:
    """The path with every UID segment replaced by ``uid-<12 hex>``."""
    return "/".join(
        f"uid-{hashlib.sha256(part.encode()).hexdigest()[:12]}"
        if "." in part and is_uid(part)
        else part
        for part in path.split("/")
    )


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": redact(scope["path"]),
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
