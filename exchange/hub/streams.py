"""Bounded concurrent broker streams, per caller and per site.

A viewer opening many studies at once, or a script fetching a whole archive in
parallel, would otherwise hold the hub's pool of node connections (and a slow
site's) for everyone. Each call to a node counts against its caller (429 past
``broker_streams_per_caller``) and its node (503 past ``broker_streams_per_node``)
from before the node is called until its answer has been relayed (or failed).
Refusals are immediate, with ``Retry-After``; nothing queues, so a refused
caller costs nothing while it waits.

Everything runs on the event loop thread: plain counters, no locks.
"""

from __future__ import annotations

from collections.abc import Callable

from exchange.errors import TooManyRequests, Unavailable
from exchange.metrics import BROKER_STREAMS, BROKER_STREAMS_REFUSED

RETRY_AFTER_SECONDS = 1


class StreamLimits:
    def __init__(self, per_caller: int, per_node: int) -> None:
        self.per_caller = per_caller
        self.per_node = per_node
        self._callers: dict[str, int] = {}
        self._nodes: dict[str, int] = {}

    def caller(self, caller: str) -> Callable[[], None]:
        """Count one stream of ``caller`` (429 when it has too many); the function ending it.

        Taken before the request is decided, so a caller over its limit costs no
        decision and no audit record."""
        if self._callers.get(caller, 0) >= self.per_caller:
            BROKER_STREAMS_REFUSED.labels("caller").inc()
            raise TooManyRequests(
                f"too many retrievals at once from this caller (at most {self.per_caller})",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return self._count(self._callers, caller, gauge=True)

    def node(self, node: str, site: str) -> Callable[[], None]:
        """Count one stream to ``node`` (503 when it has too many); the function ending it."""
        if self._nodes.get(node, 0) >= self.per_node:
            BROKER_STREAMS_REFUSED.labels("node").inc()
            raise Unavailable(
                f"the {site} is serving as many retrievals as it may at once; try again",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return self._count(self._nodes, node, gauge=False)

    @staticmethod
    def _count(table: dict[str, int], key: str, gauge: bool) -> Callable[[], None]:
        table[key] = table.get(key, 0) + 1
        if gauge:
            BROKER_STREAMS.inc()
        done = False

        def close() -> None:
            nonlocal done
            if done:
                return
            done = True
            if gauge:
                BROKER_STREAMS.dec()
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]

        return close

    def active(self, caller: str | None = None, node: str | None = None) -> int:
        """Streams open now (of a caller, to a node, or all)."""
        if caller is not None:
            return self._callers.get(caller, 0)
        if node is not None:
            return self._nodes.get(node, 0)
        return sum(self._callers.values())
