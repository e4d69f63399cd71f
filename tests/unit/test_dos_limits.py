"""Rate limits, broker stream limits, body pacing and request ids, without processes."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from exchange.config import Settings
from exchange.errors import ConfigurationError, TooManyRequests, Unavailable
from exchange.hub.streams import StreamLimits
from exchange.web.app import finish
from exchange.web.limits import Pace
from exchange.web.ratelimit import Rate, RateLimiter
from exchange.web.requestlog import route_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, capacity: int = 1000) -> RateLimiter:
    return RateLimiter(Rate(2, 2), Rate(5, 5), capacity, clock=clock)


def test_a_credential_gets_its_burst_then_waits_for_its_rate():
    clock = Clock()
    limiter = _limiter(clock)
    waits = [limiter.check(b"Bearer a", "10.0.0.1")[0] for _ in range(3)]
    assert waits[:2] == [0, 0]
    assert waits[2] == pytest.approx(0.5)  # 2 a second: the next token in half a second
    clock.now += 0.5
    assert limiter.check(b"Bearer a", "10.0.0.1")[0] == 0


def test_an_accepted_credential_is_not_held_back_by_its_address():
    clock = Clock()
    limiter = _limiter(clock)
    _wait, _bucket, watch = limiter.check(b"Bearer good", "10.0.0.1")
    assert watch is not None
    limiter.accepted(watch)
    for i in range(10):  # garbage from the same address empties the address bucket
        limiter.check(f"Bearer junk-{i}".encode(), "10.0.0.1")
    assert limiter.check(b"Bearer junk-x", "10.0.0.1")[1] == "address"
    assert limiter.check(b"Bearer good", "10.0.0.1")[0] == 0


def test_rotating_garbage_tokens_share_their_addresss_bucket():
    clock = Clock()
    limiter = _limiter(clock)
    results = [limiter.check(f"Bearer junk-{i}".encode(), "10.0.0.2") for i in range(8)]
    assert [r[0] == 0 for r in results] == [True] * 5 + [False] * 3
    assert {r[1] for r in results[5:]} == {"address"}
    # Refused tokens got no bucket: they cannot push known clients out of the table.
    assert len(limiter.credentials) == 5
    # Another address is not affected.
    assert limiter.check(b"Bearer other", "10.0.0.3")[0] == 0


def test_one_flooding_credential_leaves_another_on_its_address_alone():
    clock = Clock()
    limiter = _limiter(clock)
    for key in (b"Bearer flood", b"Bearer calm"):
        limiter.accepted(limiter.check(key, "10.0.0.4")[2])
    refused = [limiter.check(b"Bearer flood", "10.0.0.4")[1] for _ in range(50)]
    assert set(refused[2:]) == {"credential"}
    assert limiter.check(b"Bearer calm", "10.0.0.4")[0] == 0


def test_the_tables_are_bounded():
    clock = Clock()
    limiter = RateLimiter(Rate(1, 1), Rate(1e6, 10**6), capacity=100, clock=clock)
    for i in range(1000):
        limiter.check(f"Bearer {i}".encode(), f"10.1.{i // 250}.{i % 250}")
    assert len(limiter.credentials) == 100
    assert len(limiter.addresses) == 100


def test_exempt_networks_and_bad_ones():
    limiter = RateLimiter(Rate(1, 1), Rate(1, 1), 100, exempt_networks=["10.9.0.0/16"])
    assert limiter.exempt("10.9.1.2")
    assert not limiter.exempt("10.8.1.2")
    with pytest.raises(ConfigurationError, match="EXEMPT_NETWORKS"):
        RateLimiter(Rate(1, 1), Rate(1, 1), 100, exempt_networks=["not a network"])


def test_stream_limits_per_caller_and_per_node():
    streams = StreamLimits(per_caller=2, per_node=3)
    first = [streams.caller("alice"), streams.caller("alice")]
    with pytest.raises(TooManyRequests) as refused:
        streams.caller("alice")
    assert refused.value.headers["Retry-After"] == "1"
    nodes = [streams.node("site-a", "site org-a") for _ in range(3)]
    with pytest.raises(Unavailable, match="site org-a"):
        streams.node("site-a", "site org-a")
    streams.node("site-b", "site org-b")  # another node has room
    first[0]()
    first[0]()  # ending twice counts once
    assert streams.active(caller="alice") == 1
    streams.caller("alice")
    for close in nodes:
        close()
    assert streams.active(node="site-a") == 0


def test_body_pace_allows_idle_time_and_a_floor():
    pace = Pace(idle_seconds=30, min_bytes_per_second=1000, grace_seconds=10)
    assert pace.wait_allowed(received=0, elapsed=0) == 10  # grace first
    assert pace.wait_allowed(received=50_000, elapsed=20) == 30  # fast enough: idle limit
    assert pace.wait_allowed(received=12_000, elapsed=11) == pytest.approx(1)  # near the floor
    assert pace.wait_allowed(received=5_000, elapsed=12) < 0  # below it: cut


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()

    @app.get("/dicomweb/studies/{study}")
    async def study(study: str) -> dict[str, str]:
        return {"study": study}

    settings = Settings(rate_limit_per_second=1, rate_limit_burst=2)
    return TestClient(finish(app, lambda _path: 1024, list, settings=settings))


def test_a_given_request_id_is_kept_and_a_bad_one_replaced(client: TestClient):
    kept = client.get("/healthz", headers={"X-Request-ID": "abc-123.x:y"})
    assert kept.headers["x-request-id"] == "abc-123.x:y"
    replaced = client.get("/healthz", headers={"X-Request-ID": "a" * 65})
    assert replaced.headers["x-request-id"] != "a" * 65


def test_refusals_on_dicomweb_paths_are_json_with_retry_after(client: TestClient):
    headers = {"Authorization": "Bearer t"}
    codes = [client.get("/dicomweb/studies/1.2.3", headers=headers) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert codes[2].json()["error"]["code"] == "throttled"
    assert codes[2].headers["Retry-After"] == "1"


def test_metrics_are_refused_to_a_remote_client_without_the_token(client: TestClient):
    assert client.get("/metrics").status_code == 403  # TestClient is not loopback


def test_route_labels_are_templates_never_paths():
    class Route:
        path = "/dicomweb/studies/{study}"

    assert route_of({"route": Route}) == "/dicomweb/studies/{study}"
    assert route_of({}) == "unmatched"
    assert route_of({"route_label": "(rate limited)"}) == "(rate limited)"


def test_a_node_limits_hub_grants_by_caller_not_by_grant():
    """The hub signs a new grant per request: keyed by grant, every brokered request would
    be a new credential paying from the hub's address; keyed by caller it is one bucket."""
    import tempfile
    from pathlib import Path

    from exchange.security import grants
    from exchange.security.keys import load_or_create
    from exchange.web.ratelimit import _credential

    key = load_or_create(Path(tempfile.mkdtemp()) / "k.pem")

    def grant(caller: str, study: str) -> list[tuple[bytes, bytes]]:
        token = grants.issue(
            key,
            issuer="https://hub",
            node="site-a",
            caller=caller,
            study=study,
            action="view",
            decision="d",
        )
        return [(b"authorization", f"Bearer {token}".encode())]

    assert _credential(grant("dr-a", "1.2.3")) == _credential(grant("dr-a", "1.2.4"))
    assert _credential(grant("dr-a", "1.2.3")) != _credential(grant("dr-b", "1.2.3"))
    user = [(b"authorization", b"Bearer aaa.bbb.ccc")]
    assert _credential(user) == b"Bearer aaa.bbb.ccc"
    assert _credential([(b"x-api-key", b"k1")]) == b"k1"


def test_repeated_refusals_are_the_same_answer(client: TestClient):
    """The 429 is built once and reused: a later refusal must not carry headers left on it
    by an earlier one (the request id is added to each answer on its way out)."""
    headers = {"Authorization": "Bearer another"}
    codes = [client.get("/dicomweb/studies/1.2.3", headers=headers) for _ in range(5)]
    refused = [c for c in codes if c.status_code == 429]
    assert len(refused) >= 2
    assert [len(c.headers.get_list("x-request-id")) for c in refused] == [1] * len(refused)
    assert len({len(c.headers.raw) for c in refused}) == 1
    assert refused[0].content == refused[-1].content
