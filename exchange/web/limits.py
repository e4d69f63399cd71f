"""Request body limits, enforced while the body streams in: size, and pace.

A body that stops, or trickles in slower than a floor, would hold a request
(and what it has opened) forever: it is cut with 408 and the connection closed.
Headers that never finish are the HTTP protocol's job (``exchange.web.protocol``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.web.errors import error_response

#: Given a request path, the largest body it may send.
LimitFor = Callable[[str], int]


@dataclass(frozen=True)
class Pace:
    """How slowly a request body may arrive."""

    #: Longest wait for the next chunk.
    idle_seconds: float
    #: Slowest average rate (bytes/s) once ``grace_seconds`` have passed; 0: no floor.
    min_bytes_per_second: int
    grace_seconds: float

    def wait_allowed(self, received: int, elapsed: float) -> float:
        """Seconds the next chunk may take, given what arrived in ``elapsed`` seconds."""
        allowed = self.idle_seconds
        if self.min_bytes_per_second:
            # The average stays above the floor until received / floor seconds.
            floor_until = max(self.grace_seconds, received / self.min_bytes_per_second)
            allowed = min(allowed, floor_until - elapsed)
        return allowed


class BodyLimitMiddleware:
    """Answer 413 as soon as a body is known to exceed its route's limit.

    Checks ``Content-Length`` up front and counts chunked bodies as they
    arrive, so an oversized upload is refused without being buffered.
    """

    def __init__(self, app: ASGIApp, limit_for: LimitFor, pace: Pace | None = None) -> None:
        self.app = app
        self.limit_for = limit_for
        self.pace = pace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.limit_for(path)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await error_response(path, 400, "invalid Content-Length")(scope, receive, send)
                    return
                if declared > limit:
                    await self._refuse(path, limit, scope, receive, send)
                    return

        received = 0
        refused = False
        response_started = False
        body_done = False
        pace = self.pace
        started = time.monotonic()

        async def paced(wait: float) -> Message | None:
            """The next message, or None when it did not come in time (408 sent)."""
            nonlocal refused
            if wait > 0:
                with anyio.move_on_after(wait):
                    return await receive()
            refused = True
            if not response_started:
                await self._too_slow(path, scope, receive, send)
            return None

        async def counting_receive() -> Message:
            # Frameworks swallow exceptions raised while reading a body, so instead of
            # raising we answer 413 ourselves and tell the app the client went away.
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done or pace is None:
                message = await receive()
            else:
                wait = pace.wait_allowed(received, time.monotonic() - started)
                got = await paced(wait)
                if got is None:
                    return {"type": "http.disconnect"}
                message = got
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await self._refuse(path, limit, scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 has been sent; drop whatever the app says after it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:  # after a 413 the app may complain about the "disconnect"
                raise

    @staticmethod
    async def _too_slow(path: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            path,
            408,
            "the request body arrived too slowly",
            code="timeout",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)

    @staticmethod
    async def _refuse(path: str, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            path,
            413,
            f"request body exceeds the limit of {limit} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
