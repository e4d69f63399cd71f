"""A minimal OPA REST Data API over the embedded engine, for tests and benchmarks.

The OPA binary is not installable here, so the server path of the policy engine
(``ServerEngine`` through opa-python-client) is exercised against this: real
HTTP on loopback, ``POST /v1/data/<path>`` with ``{"input": ...}`` answering
``{"result": ...}`` (or ``{}`` when the rule is undefined, as OPA does) and
``GET /health``. ``mode`` makes it misbehave on purpose: ``text`` answers
something that is not JSON, ``yes`` answers ``{"result": "yes"}`` for every
rule, ``undefined`` answers ``{}``, ``error`` answers HTTP 500, ``slow`` waits
``delay`` seconds before answering.

In a thread: ``with OpaStub(policy_dir) as stub: ServerEngine(stub.url)``.
As a process: ``python -m tests.opa_stub --policy-dir policies`` prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from exchange.policy.engine import EmbeddedEngine, PolicyError

MODES = ("ok", "text", "yes", "undefined", "error", "slow")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one compiled engine per connection thread
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._send(200, b"{}")
        else:
            self._send(404, b'{"code":"not_found"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?")[0]
        if not path.startswith("/v1/data/"):
            self._send(404, b'{"code":"not_found"}')
            return
        stub = self.server.stub
        stub.requests += 1
        mode = stub.mode
        if mode == "slow":
            time.sleep(stub.delay)
        if mode == "text":
            self._send(200, b"<html>policy engine maintenance</html>", "text/html")
            return
        if mode == "yes":
            self._send(200, b'{"result": "yes"}')
            return
        if mode == "undefined":
            self._send(200, b"{}")
            return
        if mode == "error":
            self._send(500, b'{"code":"internal_error","message":"boom"}')
            return
        rule = "data." + path.removeprefix("/v1/data/").strip("/").replace("/", ".")
        try:
            input_ = json.loads(raw or b"{}").get("input", {})
            value = stub.engine.evaluate(rule, input_)
        except PolicyError as exc:
            if "undefined" in exc.message:
                self._send(200, b"{}")
            else:
                body = {"code": "internal_error", "message": exc.message}
                self._send(500, json.dumps(body).encode())
            return
        except ValueError:
            self._send(400, b'{"code":"invalid_parameter","message":"body is not JSON"}')
            return
        self._send(200, json.dumps({"result": value}).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: OpaStub
    connections: set[socket.socket]


class OpaStub:
    def __init__(self, policy_dir: Path, port: int = 0) -> None:
        self.engine = EmbeddedEngine(policy_dir)
        self.mode = "ok"
        self.delay = 1.0
        self.requests = 0
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.stub = self
        self._server.connections = set()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpaStub:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections, like a stopped server."""
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._server.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> OpaStub:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.opa_stub")
    parser.add_argument("--policy-dir", type=Path, default=Path("policies"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=MODES, default="ok")
    args = parser.parse_args(argv)
    stub = OpaStub(args.policy_dir, args.port)
    stub.mode = args.mode
    print(stub.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub._server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
