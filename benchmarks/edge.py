"""What the shared HTTP middleware costs per request, in process (no network).

Run:  .venv/bin/python benchmarks/edge.py [--requests N]

Drives one ASGI app directly (a fixed scope, a receive that gives an empty body,
a send that drops everything) with an endpoint that answers at once, and times
N requests through each layer of ``exchange.web``'s middleware alone and through
the whole stack as ``exchange.web.app.finish`` installs it:

* bare: the endpoint alone (the baseline);
* request log: request id (``X-Request-ID``), the JSON log line (logging to a
  null handler at INFO, as served), and the Prometheus counter and histogram;
* rate limit: the token buckets (one credential, far below its limit);
* body limits: size and pace;
* all: the three together, in their order;
* before issue 10: the request log as it was (a new id and the log line) over the
  body size limit, for the difference the limits, metrics and request ids make.

Target (issue 10): rate limits and metrics add <= 50 µs a request ("all" minus
"before issue 10"). Prints the median of 5 rounds per row, in µs a request, and
the difference from bare. Exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from typing import Any

from exchange.web.limits import BodyLimitMiddleware, Pace
from exchange.web.ratelimit import RateLimitMiddleware, limiter_from
from exchange.web.requestlog import RequestLogMiddleware, redact

TARGET_US = 50.0
_log = logging.getLogger("exchange.request")


class _Route:
    path = "/dicomweb/studies/{study}/metadata"


async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    scope["route"] = _Route
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/dicomweb/studies/1.2.840.1/metadata",
        "query_string": b"",
        "headers": [
            (b"host", b"hub"),
            (b"authorization", b"Bearer " + b"x" * 900),
            (b"accept", b"application/dicom+json"),
        ],
        "client": ("127.0.0.1", 50000),
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(_message: dict[str, Any]) -> None:
    return None


class _RequestLogBefore:
    """The request log before issue 10 (exchange/web/requestlog.py at e5a4c76)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": redact(scope["path"]),
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )


def stacks() -> dict[str, Any]:
    limiter = limiter_from(1e9, 10**9, 1e9, 10**9, 100_000)
    pace = Pace(30.0, 1024, 10.0)
    return {
        "bare": endpoint,
        "request log + metrics": RequestLogMiddleware(endpoint),
        "rate limit": RateLimitMiddleware(endpoint, limiter),
        "body limits + pace": BodyLimitMiddleware(endpoint, lambda _p: 1 << 20, pace),
        "before issue 10": _RequestLogBefore(BodyLimitMiddleware(endpoint, lambda _p: 1 << 20)),
        "all": RequestLogMiddleware(
            RateLimitMiddleware(BodyLimitMiddleware(endpoint, lambda _p: 1 << 20, pace), limiter)
        ),
    }


async def _time(app: Any, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        await app(_scope(), _receive, _send)
    return (time.perf_counter() - started) / requests * 1e6


async def main(requests: int, rounds: int) -> None:
    logging.basicConfig(handlers=[logging.NullHandler()], level=logging.INFO)
    apps = stacks()
    for app in apps.values():  # warm-up: metric children, code paths
        await _time(app, 1000)
    results: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            results[name].append(await _time(app, requests))
    bare = statistics.median(results["bare"])
    print(f"{'stack':<24} {'µs/request':>11} {'added':>8}")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"{name:<24} {value:>11.2f} {value - bare:>8.2f}")
    added = statistics.median(results["all"]) - statistics.median(results["before issue 10"])
    verdict = "met" if added <= TARGET_US else "TARGET MISSED"
    print(
        f"limits, metrics and request ids add {added:.1f} µs a request "
        f"(target <= {TARGET_US:.0f} µs: {verdict})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
