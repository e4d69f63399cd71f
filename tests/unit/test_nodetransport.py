"""The broker's aiohttp transport, against real sockets on loopback.

What the broker relies on: bodies arrive whole and in order, connections are reused
after a body read to its end, and every failure surfaces as the httpx error the
broker turns into 502 or 504.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from exchange.federation import free_port
from exchange.hub.nodetransport import AiohttpTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def _timeout(read: float = 2.0) -> dict[str, float]:
    return {"connect": 2.0, "read": read, "write": 2.0, "pool": 2.0}


async def _serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _get(transport: AiohttpTransport, url: str, read: float = 2.0) -> httpx.Response:
    request = httpx.Request("GET", url, extensions={"timeout": _timeout(read)})
    return await transport.handle_async_request(request)


def test_a_body_arrives_whole_and_the_connection_is_reused() -> None:
    body = bytes(range(256)) * 20_000  # ~5 MB, many socket reads
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            await _head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    async def main() -> None:
        transport = AiohttpTransport(ssl_context=None, max_connections=4)
        try:
            async for url in _serve(handler):
                for _ in range(2):
                    response = await _get(transport, url + "/x")
                    assert response.status_code == 200
                    assert response.headers["content-type"] == "application/octet-stream"
                    assert await response.aread() == body
                    await response.aclose()
        finally:
            await transport.aclose()

    asyncio.run(main())
    assert connections == 1


def test_an_unreachable_node_is_a_connect_error() -> None:
    async def main() -> None:
        transport = AiohttpTransport(ssl_context=None, max_connections=4)
        try:
            with pytest.raises(httpx.ConnectError):
                await _get(transport, f"http://127.0.0.1:{free_port()}/x")
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_a_silent_node_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        transport = AiohttpTransport(ssl_context=None, max_connections=4)
        try:
            async for url in _serve(handler):
                with pytest.raises(httpx.ReadTimeout):
                    await _get(transport, url + "/x", read=0.3)
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_a_body_cut_short_is_a_read_error_not_a_short_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)
        await writer.drain()
        writer.close()

    async def main() -> None:
        transport = AiohttpTransport(ssl_context=None, max_connections=4)
        try:
            async for url in _serve(handler):
                response = await _get(transport, url + "/x")
                with pytest.raises(httpx.ReadError):
                    await response.aread()
                await response.aclose()
        finally:
            await transport.aclose()

    asyncio.run(main())
