"""Request body limits, enforced while the body streams in."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.web.errors import error_response

#: Given a request path, the largest body it may send.
LimitFor = Callable[[str], int]


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
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            # Frameworks swallow exceptions raised while reading a body, so instead of
            # raising we answer 413 ourselves and tell the app the client went away.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
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
    async def _refuse(path: str, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            path,
            413,
            f"request body exceeds the limit of {limit} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
