"""Request body limits, enforced while the body streams in."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.web.errors import error_response

#: Given a request path, the largest body it may send.
LimitFor = Callable[[str], int]


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 as soon as a body is known to exceed its route's limit.

    Checks ``Content-Length`` up front and counts chunked bodies as they
    arrive, so an oversized upload is refused without being buffered.
    """

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

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
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not response_started:
                await self._refuse(path, limit, scope, receive, send)

    @staticmethod
    async def _refuse(path: str, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            path,
            413,
            f"request body exceeds the limit of {limit} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
