"""uvicorn's httptools protocol with the header limits it lacks.

uvicorn (0.54, httptools) keeps every header a client sends, however many and
however long, and waits forever for a request's headers to end (its keep-alive
timer only runs between requests). So a client could hold memory with one
endless header, or hold connections open by sending a byte now and then
(slowloris). This subclass adds, per connection:

* at most ``max_header_bytes`` of request line and headers, and at most
  ``max_header_count`` fields: else 431 and the connection is closed;
* the head of each request must arrive within ``header_timeout_seconds`` of
  its first byte (or of the connection's opening): else 408 and closed.

Bodies are paced by ``exchange.web.limits``; concurrency by uvicorn's own
``limit_concurrency``. The hooks used are uvicorn's protocol callbacks; a test
(tests/integration/test_limits.py) pins them against the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from exchange.config import Settings

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True)
class HeaderLimits:
    max_bytes: int
    max_count: int
    timeout_seconds: float

    @classmethod
    def of(cls, settings: Settings) -> HeaderLimits:
        return cls(
            settings.max_header_bytes, settings.max_header_count, settings.header_timeout_seconds
        )


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a connection that was refused."""


def _answer(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"status": status, "code": "too-costly", "message": message}})
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
        f"{body}"
    ).encode()


def guarded_protocol(
    limits: HeaderLimits, base: type[HttpToolsProtocol] | None = None
) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.run(http=…)`` that enforces ``limits``, over ``base``
    (uvicorn's httptools protocol, or a subclass such as ``exchange.web.peer``'s)."""

    class GuardedHttpToolsProtocol(base or HttpToolsProtocol):  # type: ignore[misc]
        _in_head = True
        _head_bytes = 0
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
                self._start_head_timer()
            try:
                super().data_received(data)
            except _HeadRefused:
                return
            if self._in_head and self._head_bytes > limits.max_bytes:
                self._refuse(431, "the request's headers are too large")

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > limits.max_bytes or len(self.headers) > limits.max_count:
                self._refuse(
                    431,
                    f"the request's headers exceed {limits.max_count} fields "
                    f"or {limits.max_bytes} bytes",
                )
                raise _HeadRefused
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # The next request's head is timed from its first byte, not from now: the
            # answer to this one may take a while, and keep-alive idling has its own timer.
            self._in_head = True
            self._head_bytes = 0

        def _start_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    limits.timeout_seconds, self._head_timed_out
                )

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self._head_bytes:
                self.transport.write(_answer(408, "the request's headers arrived too slowly"))
            self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            self._stop_head_timer()
            if not self.transport.is_closing():
                self.transport.write(_answer(status, message))
                self.transport.close()

    return GuardedHttpToolsProtocol
