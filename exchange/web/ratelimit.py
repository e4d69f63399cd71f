"""Per-client rate limits: token buckets checked before routing and authentication.

A refusal costs a dictionary lookup and a small answer, so a flood is turned
away before it reaches token validation, the database or the policy engine.

Two kinds of bucket (docs/operations.md, "Limits"):

* **per credential**: a digest of the ``Authorization`` or ``X-API-Key`` header.
  One flooding client empties its own bucket only; another client on the same
  address (a hospital behind one NAT) is not slowed by it.
* **per client address**, with a larger allowance, for requests without a
  credential or with one never seen accepted. Garbage tokens are each new, so
  rotating them does not escape: they all draw on their address's bucket, and a
  new credential gets a bucket of its own only once its address allows a request.
  A credential is *accepted* once the app answers it with anything but 401 or 429;
  from then on only its own bucket applies.

Both are LRU-bounded: memory stays fixed whatever the number of clients. Health
probes and ``/metrics`` are exempt, and so are the configured exempt networks.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from hashlib import blake2b

import jwt
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.errors import ConfigurationError
from exchange.metrics import RATE_LIMITED
from exchange.security.grants import GRANT_TYPE
from exchange.web.errors import FHIR_PREFIX, error_response

log = logging.getLogger(__name__)

#: Rate-limited requests are logged in summary, at most once per interval and bucket kind.
LOG_INTERVAL_SECONDS = 10.0
#: Paths never limited: probes must see a busy service as alive.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
#: The metrics' route label of a request refused before routing.
REFUSED_LABEL = "(rate limited)"


@dataclass(frozen=True)
class Rate:
    """Tokens added per second, and the most a bucket holds."""

    per_second: float
    burst: int


class _Bucket:
    __slots__ = ("accepted", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.accepted = False


class Buckets:
    """Token buckets by key, the least recently used dropped beyond ``capacity``."""

    def __init__(self, rate: Rate, capacity: int) -> None:
        self.rate = rate
        self.capacity = capacity
        self._buckets: OrderedDict[object, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: object) -> _Bucket | None:
        return self._buckets.get(key)

    def new(self, key: object, now: float) -> _Bucket:
        bucket = self._buckets[key] = _Bucket(float(self.rate.burst), now)
        if len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)
        return bucket

    def take(self, key: object, bucket: _Bucket | None, now: float) -> float:
        """Take one token: 0 when there was one, else seconds until there will be."""
        if bucket is None:
            bucket = self.new(key, now)
        else:
            self._buckets.move_to_end(key)
            rate = self.rate
            bucket.tokens = min(
                float(rate.burst), bucket.tokens + (now - bucket.stamp) * rate.per_second
            )
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate.per_second


class RateLimiter:
    """The decision, without HTTP: which bucket refuses, and for how long."""

    def __init__(
        self,
        credential: Rate,
        address: Rate,
        capacity: int,
        exempt_networks: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = Buckets(credential, capacity)
        self.addresses = Buckets(address, capacity)
        self._clock = clock
        try:
            self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt_networks)
        except ValueError as exc:
            raise ConfigurationError(f"EXCHANGE_RATE_LIMIT_EXEMPT_NETWORKS: {exc}") from None
        self._exempt_cache: dict[str, bool] = {}

    def exempt(self, address: str) -> bool:
        if not self._exempt:
            return False
        known = self._exempt_cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
                known = any(ip in network for network in self._exempt)
            except ValueError:
                known = False
            if len(self._exempt_cache) > 10_000:
                self._exempt_cache.clear()
            self._exempt_cache[address] = known
        return known

    def check(self, credential: bytes | None, address: str) -> tuple[float, str, object | None]:
        """(seconds to wait or 0, the refusing bucket, the credential key to watch or None).

        The key is returned when the request goes ahead on a credential not yet seen
        accepted: ``accepted(key)`` marks it once the app has answered it.
        """
        now = self._clock()
        if credential is None:
            wait = self.addresses.take(address, self.addresses.get(address), now)
            return wait, "address", None
        key = blake2b(credential, digest_size=16).digest()
        bucket = self.credentials.get(key)
        if bucket is None:
            # Unknown credential: its address pays first, so garbage tokens cannot crowd
            # the known ones out of the table, nor escape the address's allowance.
            wait = self.addresses.take(address, self.addresses.get(address), now)
            if wait:
                return wait, "address", None
            self.credentials.take(key, None, now)
            return 0.0, "", key
        wait = self.credentials.take(key, bucket, now)
        if wait:
            return wait, "credential", None
        if bucket.accepted:
            return 0.0, "", None
        wait = self.addresses.take(address, self.addresses.get(address), now)
        if wait:
            bucket.tokens += 1.0  # refused by the address: the credential keeps its token
            return wait, "address", None
        return 0.0, "", key

    def accepted(self, key: object) -> None:
        bucket = self.credentials.get(key)
        if bucket is not None:
            bucket.accepted = True


def _credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name in _CREDENTIAL_HEADERS:
            return _grant_caller(value) or value
    return None


def _grant_caller(value: bytes) -> bytes | None:
    """A hub grant's bucket key: its issuer and caller, not the grant itself.

    The hub signs a new grant for every brokered request, so keyed by the token each
    would be a new credential drawing on the hub's address. Keyed by caller, a node
    limits each caller the hub relays for. Read without checking the signature (the
    app checks it): a forged grant naming a real caller can only spend that caller's
    allowance at this node, and it is refused with 401 all the same.
    """
    if not value.startswith(b"Bearer ") or value.count(b".") != 2:
        return None
    token = value[7:].decode("ascii", "replace")
    try:
        if jwt.get_unverified_header(token).get("typ") != GRANT_TYPE:
            return None
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    issuer, caller = claims.get("iss"), claims.get("sub")
    if not isinstance(issuer, str) or not isinstance(caller, str):
        return None
    return f"grant\0{issuer}\0{caller}".encode()


class RateLimitMiddleware:
    """429 with ``Retry-After`` (and the path's usual error body) when a bucket is empty."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter | None) -> None:
        self.app = app
        self.limiter = limiter
        self._refused: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        #: (FHIR path?, seconds to wait) -> the 429's raw headers and body.
        self._answers: dict[tuple[bool, int], tuple[list[tuple[bytes, bytes]], bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter
        if limiter is None or scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        if limiter.exempt(address):
            await self.app(scope, receive, send)
            return
        wait, bucket, watch = limiter.check(_credential(scope["headers"]), address)
        if wait:
            RATE_LIMITED.labels(bucket).inc()
            scope["route_label"] = REFUSED_LABEL
            self._note(bucket)
            await self._refuse(scope, receive, send, wait)
            return
        if watch is None:
            await self.app(scope, receive, send)
            return

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] not in (401, 429):
                limiter.accepted(watch)
            await send(message)

        await self.app(scope, receive, watching_send)

    def _note(self, bucket: str) -> None:
        """One log line per bucket kind and interval, with the count since the last."""
        self._refused[bucket] = self._refused.get(bucket, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(bucket, 0.0) >= LOG_INTERVAL_SECONDS:
            log.warning(
                "requests rate limited",
                extra={"bucket": bucket, "refused": self._refused.pop(bucket)},
            )
            self._logged[bucket] = now

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, wait: float) -> None:
        app = scope.get("app")
        state = getattr(app, "state", None)
        prefixes: tuple[str, ...] = getattr(state, "outcome_prefixes", (FHIR_PREFIX,))
        seconds = max(1, math.ceil(wait))
        path: str = scope["path"]
        outcome = any(path == p or path.startswith(p + "/") for p in prefixes)
        # A flood is mostly refusals: each answer is built once per kind and wait (a FHIR
        # OperationOutcome is validated by its model, ~0.1 ms), then sent as it is.
        answer = self._answers.get((outcome, seconds))
        if answer is None:
            response = error_response(
                path,
                429,
                f"too many requests from this client; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
                outcome_prefixes=prefixes,
            )
            answer = (response.raw_headers, bytes(response.body))
            if len(self._answers) >= 64:  # waits are seconds of a token or two: few kinds
                self._answers.clear()
            self._answers[(outcome, seconds)] = answer
        headers, body = answer
        # A fresh list each time: outer middleware appends to it (the request id).
        await send({"type": "http.response.start", "status": 429, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})


def limiter_from(
    per_second: float,
    burst: int,
    address_per_second: float,
    address_burst: int,
    capacity: int,
    exempt_networks: Iterable[str] = (),
) -> RateLimiter | None:
    """The configured limiter, or None when rate limits are off (a rate of 0)."""
    if per_second <= 0 or address_per_second <= 0:
        return None
    return RateLimiter(
        Rate(per_second, burst), Rate(address_per_second, address_burst), capacity, exempt_networks
    )
