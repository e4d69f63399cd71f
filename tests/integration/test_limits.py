"""Issue 10, denial-of-service limits and observability, with real processes.

One hub (development IdP) and one site node on loopback, the hub with limits
small enough for a flood to reach them: 10 requests/s per credential, 5 per
address (burst 20) for unaccepted credentials, 2 broker streams per caller, headers of at
most 50 fields that must arrive within 1 s, request bodies silent for at most 1 s.

Acceptance 4 (without its timing, which ``benchmarks/flood.py`` measures): a
client flooding the broker gets 429s with ``Retry-After`` while a second
client's requests, from the same address, all succeed. Then: garbage tokens do
not escape the address's allowance, header and slow-client limits, the metrics
(they move, they hold no PHI, who may read them) and request ids from hub to node.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.flood import Flood, World, limits_env, set_up, steady

pytestmark = pytest.mark.integration

METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
HUB_ENV = {
    **limits_env(rate=10, streams=2),
    "EXCHANGE_RATE_LIMIT_ADDRESS_PER_SECOND": "5",
    "EXCHANGE_RATE_LIMIT_ADDRESS_BURST": "20",
    "EXCHANGE_MAX_HEADER_COUNT": "50",
    "EXCHANGE_HEADER_TIMEOUT_SECONDS": "1",
    "EXCHANGE_BODY_IDLE_TIMEOUT_SECONDS": "1",
    "EXCHANGE_METRICS_TOKEN": METRICS_TOKEN,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    built = set_up(tmp_path_factory.mktemp("limits"), HUB_ENV)
    try:
        yield built
    finally:
        built.federation.stop()


def _metrics(url: str, **headers: str) -> str:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def _value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` (labels in any order), 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        rest = metric[len(name) :]
        if rest and not rest.startswith("{"):
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return float(value)
    return 0.0


def _raw(url: str, payload: bytes, wait: float = 5.0) -> bytes:
    """Send ``payload`` on a fresh connection; what comes back until it is closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pytest.fail(f"the connection stayed open; got {received[:200]!r}")
    return received


# -- acceptance 4 --------------------------------------------------------------------------


def test_a_flooder_gets_429s_while_another_client_on_its_address_succeeds(world: World):
    url = world.hub + world.metadata_path
    with Flood(url, world.clinician("dr-flood"), connections=6, seconds=6.0) as flood:
        time.sleep(1.5)  # the flood is under way
        _latencies, statuses = steady(url, world.clinician("dr-calm"), requests=15, pace=5.0)
        flooded = flood.result()

    assert dict(statuses) == {200: 15}, statuses
    assert flooded.get("429", 0) > 0, flooded
    assert flooded.get("429 with Retry-After") == flooded["429"], flooded  # every one
    assert flooded.get("200", 0) > 0, flooded  # its own allowance still served
    assert not {k for k in flooded if not k.startswith(("200", "429"))}, flooded


def test_a_refusal_is_the_paths_usual_error_with_retry_after(world: World):
    token = world.clinician("dr-burst")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=world.hub, headers=headers, timeout=30) as client:
        answers = [client.get(f"/fhir/ImagingStudy?_id={i}") for i in range(30)]
    refused = [a for a in answers if a.status_code == 429]
    assert refused, [a.status_code for a in answers]
    outcome = refused[0].json()
    assert outcome["resourceType"] == "OperationOutcome"  # FHIR path: FHIR error
    assert outcome["issue"][0]["code"] == "throttled"
    assert int(refused[0].headers["Retry-After"]) >= 1


def test_garbage_tokens_do_not_escape_the_address_allowance(world: World):
    url = world.hub + world.metadata_path
    calm = world.clinician("dr-calm-2")
    assert httpx.get(url, headers={"Authorization": f"Bearer {calm}"}).status_code == 200

    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        statuses = [
            client.get(url, headers={"Authorization": f"Bearer garbage-{i}"}).status_code
            for i in range(80)
        ]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {401, 429}
    assert statuses.count(429) > 0
    # At most the address's burst (20) and what refilled meanwhile (5/s) got through.
    assert statuses.count(401) <= 20 + 5 * elapsed + 1
    # A client whose credential was accepted before is not held back by its address.
    assert httpx.get(url, headers={"Authorization": f"Bearer {calm}"}).status_code == 200


# -- header and slow-client limits ----------------------------------------------------------


def test_too_many_header_fields_is_431_and_the_connection_closes(world: World):
    fields = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(60))
    answer = _raw(world.hub, f"GET /healthz HTTP/1.1\r\nHost: hub\r\n{fields}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_an_endless_header_is_431(world: World):
    huge = "x" * (100 * 1024)
    answer = _raw(world.hub, f"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Big: {huge}".encode())
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_headers_that_never_finish_get_408_and_the_connection_closes(world: World):
    started = time.monotonic()
    answer = _raw(world.hub, b"GET /healthz HTTP/1.1\r\nHost: hub\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 4.5


def test_a_body_that_stops_arriving_gets_408(world: World):
    token = world.idp.issue(sub="site-a", role="system", org="org-a")
    head = (
        f"POST /fhir/Patient HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n"
    )
    answer = _raw(world.hub, head.encode() + b'{"resourceType": ')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"too slowly" in answer


def test_health_probes_are_never_rate_limited(world: World):
    with httpx.Client(base_url=world.hub, timeout=10) as client:
        statuses = {client.get("/healthz").status_code for _ in range(120)}
    assert statuses == {200}


# -- metrics and request ids ----------------------------------------------------------------


def test_metrics_move_with_requests_and_hold_no_phi(world: World):
    hub, node = world.hub, world.federation.node("site-a").url
    route = "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"
    before, node_before = _metrics(hub), _metrics(node)
    token = world.clinician("dr-metrics")
    for _ in range(3):
        response = httpx.get(
            hub + world.metadata_path, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200
    after, node_after = _metrics(hub), _metrics(node)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    requests = "exchange_http_requests_total"
    assert moved(requests, route=route, method="GET", status="200") == 3
    assert moved("exchange_http_request_duration_seconds_count", route=route) == 3
    assert moved("exchange_policy_decisions_total", action="view", outcome="allow") >= 3
    assert moved("exchange_audit_records_total") >= 3
    assert _value(after, "exchange_audit_chain_length") >= 3
    assert moved("exchange_broker_bytes_total", node="site-a") > 0
    assert moved("exchange_retrieval_bytes_total") > 0
    node_route = "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"
    assert (
        _value(node_after, requests, route=node_route, status="200")
        - _value(node_before, requests, route=node_route, status="200")
        == 3
    )
    assert _value(node_after, "exchange_retrieval_bytes_total") > _value(
        node_before, "exchange_retrieval_bytes_total"
    )
    assert "exchange_outbox_depth" in node_after
    for text in (after, node_after):
        for phi in (world.uid, world.sop, world.patient_id, world.patient_name, "Flood"):
            assert phi not in text


def test_rate_limit_refusals_are_counted(world: World):
    before = _value(_metrics(world.hub), "exchange_rate_limited_total", bucket="credential")
    token = world.clinician("dr-counted")
    with httpx.Client(base_url=world.hub, timeout=30) as client:
        codes = [
            client.get("/fhir/metadata", headers={"Authorization": f"Bearer {token}"}).status_code
            for _ in range(25)
        ]
    after = _value(_metrics(world.hub), "exchange_rate_limited_total", bucket="credential")
    assert after - before == codes.count(429) > 0


def test_metrics_are_for_loopback_or_the_metrics_token(world: World):
    elsewhere = {"X-Forwarded-For": "192.0.2.7"}  # loopback is a trusted proxy (uvicorn)
    refused = httpx.get(f"{world.hub}/metrics", headers=elsewhere)
    assert refused.status_code == 403
    wrong = httpx.get(f"{world.hub}/metrics", headers={**elsewhere, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    allowed = _metrics(world.hub, **elsewhere, Authorization=f"Bearer {METRICS_TOKEN}")
    assert "exchange_http_requests_total" in allowed


def _logged(path: Path, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_a_request_id_is_answered_and_reaches_the_nodes_log(world: World):
    token = world.clinician("dr-traced")
    request_id = "trace-" + uuid.uuid4().hex[:12]
    response = httpx.get(
        world.hub + world.metadata_path,
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    assert _logged(world.federation.hub.log_path, f'"request_id": "{request_id}"')
    assert _logged(world.federation.node("site-a").log_path, f'"request_id": "{request_id}"')


def test_an_unsafe_request_id_is_replaced(world: World):
    response = httpx.get(f"{world.hub}/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    given = response.headers["x-request-id"]
    assert given != "bad id\twith spaces"
    assert given.isalnum()
