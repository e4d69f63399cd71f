"""The broker's HTTP transport to nodes: httpx's interface over aiohttp's connections.

The broker relays every retrieved byte and makes one node call per viewer request, so
the client's own cost is on the hub's critical path. aiohttp parses responses in C and
reads straight into large buffers; here it needed ~0.08 ms of CPU for a small request
where httpcore needed ~0.3 ms, and ~40% less CPU per relayed megabyte (measured side by
side against a bare uvicorn app, see benchmarks/broker.py). Keeping httpx's transport
interface keeps the broker's code and its unit tests (``httpx.MockTransport``) as they
are; only the wire work changes hands.

Errors map onto httpx's tree the way the broker reads them: connecting failed or timed
out (``ConnectError``/``ConnectTimeout``: the node cannot be reached), no answer or a
silent stream in time (``ReadTimeout``), a connection lost or a malformed answer
(``ReadError``/``RemoteProtocolError``).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx

#: Largest read from a node's socket (the relay joins reads into ~1 MiB writes).
READ_BUFFER = 1024 * 1024


@contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    """aiohttp's exceptions as the httpx ones the broker handles."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc), request=request) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise httpx.ReadError(str(exc), request=request) from exc
    except aiohttp.ClientResponseError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(str(exc), request=request) from exc


class _Body(httpx.AsyncByteStream):
    """A node's answer as it arrives: each piece is what one socket read gave."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request):
            async for piece in self._response.content.iter_any():
                yield piece

    async def aclose(self) -> None:
        # A body read to its end returns the connection to the pool; one abandoned
        # half-way is closed, so no later answer can be read from its leftovers.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One keep-alive pool to every node, for one event loop (the hub's)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        keepalive_seconds: float = 15.0,
    ) -> None:
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._max_connections = max_connections
        self._keepalive = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds a session to it).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                read_bufsize=READ_BUFFER,
                trust_env=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        with _mapped(request):
            response = await self._open().request(
                request.method,
                str(request.url),
                headers=list(request.headers.multi_items()),
                data=request.content or None,
                allow_redirects=False,
                timeout=timeout,
                # The broker passes on what the node sent; a content coding it used
                # anyway is undone here, as httpx would.
                auto_decompress=True,
            )
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
