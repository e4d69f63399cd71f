"""The publishing worker against a fake hub (httpx.MockTransport): what is sent, how
failures are settled, and how tokens are cached."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import httpx
import pytest

from exchange.config import load_settings
from exchange.database import make_engine
from exchange.errors import ConfigurationError
from exchange.node.outbox import FAILED, PENDING, Outbox
from exchange.node.publisher import (
    HubClient,
    Publisher,
    Result,
    TokenSource,
    Transient,
    endpoint_identifier,
    outcome_text,
)
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key
from tests.dicomdata import generated

HUB = "http://hub.test"
Handler = Callable[[httpx.Request], httpx.Response]


class Clock:
    """Starts at the real time: the store stamps rows with the real clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FakeHub:
    """Just enough of the hub: conditional updates, search by identifier, delete, a token."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.resources: dict[tuple[str, str], dict] = {}
        self.tokens_issued = 0
        self.fail_with: int | None = None
        self.reject_tokens = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append((request.method, path))
        if path == "/idp/.well-known/openid-configuration":
            return httpx.Response(200, json={"token_endpoint": f"{HUB}/idp/token"})
        if path == "/idp/token":
            self.tokens_issued += 1
            return httpx.Response(
                200, json={"access_token": f"token-{self.tokens_issued}", "expires_in": 300}
            )
        if self.reject_tokens:
            self.reject_tokens -= 1
            return httpx.Response(401, json={"resourceType": "OperationOutcome", "issue": []})
        if self.fail_with is not None:
            return httpx.Response(
                self.fail_with,
                json={
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "x", "diagnostics": "nope"}],
                },
            )
        kind = path.split("/")[2]
        query = parse_qs(request.url.query.decode())
        if request.method == "PUT":
            body = json.loads(request.content)
            wanted = query["identifier"][0]
            found = [
                rid
                for (rtype, rid), r in self.resources.items()
                if rtype == kind and wanted in _tokens(r)
            ]
            rid = found[0] if found else body.get("id") or f"{kind.lower()}-{len(self.resources)}"
            self.resources[(kind, rid)] = {**body, "id": rid}
            return httpx.Response(
                200 if found else 201,
                headers={"Location": f"{HUB}/fhir/{kind}/{rid}/_history/1"},
                json={**body, "id": rid},
            )
        if request.method == "GET":
            wanted = query["identifier"][0]
            entries = [
                {"resource": r}
                for (rtype, _), r in self.resources.items()
                if rtype == kind and wanted in _tokens(r)
            ]
            return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})
        if request.method == "DELETE":
            rid = path.split("/")[3]
            removed = self.resources.pop((kind, rid), None)
            return httpx.Response(200 if removed else 404, json={})
        return httpx.Response(405)


def _tokens(resource: dict) -> set[str]:
    return {f"{i['system']}|{i['value']}" for i in resource.get("identifier") or []}


@pytest.fixture
def env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)


def _settings(tmp_path, **extra):
    return load_settings(
        data_dir=tmp_path,
        node_id="site-a",
        hub_url=HUB,
        tenants={"tenant-a": {"organization": "org-a"}},
        issuers=[{"issuer": f"{HUB}/idp"}],
        hub_client_id="site-a",
        hub_client_secret="s3cret",
        **extra,
    )


@pytest.fixture
def world(tmp_path, env):
    hub = FakeHub()
    clock = Clock()
    settings = _settings(tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = FileKeyStore(tmp_path / "keys", master_key(None, tmp_path / "m.key"), ["tenant-a"])
    store = InstanceStore(engine, tmp_path / "blobs", keys, 10 * 1024 * 1024)
    box = Outbox(engine, clock=clock)
    http = httpx.Client(transport=httpx.MockTransport(hub))
    client = HubClient(settings, http=http, clock=clock)
    publisher = Publisher(settings, store, box, client, clock=clock, rand=lambda: 1.0)
    return hub, clock, store, box, publisher


def _store_study(store, slices=2, accession="PUB1"):
    results = [
        store.store("tenant-a", io.BytesIO(d))
        for d in generated(patient_id="MRN-9", accession=accession, slices=slices)
    ]
    return results[0].study_uid


def _deliver_one(box, publisher, clock):
    clock.now += 1
    (entry,) = box.due()
    assert box.claim(entry)
    return publisher.deliver(entry)


def test_publishes_endpoint_patient_and_study_and_removes_the_row(world):
    hub, clock, store, box, publisher = world
    uid = _store_study(store)
    assert _deliver_one(box, publisher, clock) is Result.DONE
    assert box.entries() == []
    puts = [path for method, path in hub.calls if method == "PUT"]
    assert puts == ["/fhir/Endpoint", "/fhir/Patient", "/fhir/ImagingStudy"]
    endpoint = hub.resources[("Endpoint", "site-a")]
    assert endpoint["identifier"] == [{"system": "urn:exchange:node", "value": "site-a"}]
    assert endpoint["managingOrganization"] == {"reference": "Organization/org-a"}
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    ((_, sid),) = [k for k in hub.resources if k[0] == "ImagingStudy"]
    study = hub.resources[("ImagingStudy", sid)]
    assert study["identifier"][0]["value"] == f"urn:oid:{uid}"
    assert study["endpoint"] == [{"reference": "Endpoint/site-a"}]
    assert study["numberOfInstances"] == 2
    ((_, pid),) = [k for k in hub.resources if k[0] == "Patient"]
    assert study["subject"]["reference"] == f"Patient/{pid}"
    assert study["subject"]["identifier"] == {"system": "urn:exchange:org-a:mrn", "value": "MRN-9"}
    patient = hub.resources[("Patient", pid)]
    assert patient["managingOrganization"] == {"reference": "Organization/org-a"}
    assert patient["name"][0]["family"] == "Test"
    # One token, found by discovery, serves every call.
    assert hub.tokens_issued == 1


def test_a_hub_outage_keeps_the_row_and_backs_off(world):
    hub, clock, store, box, publisher = world
    _store_study(store)
    hub.fail_with = 503
    assert _deliver_one(box, publisher, clock) is Result.RETRY
    (entry,) = box.entries()
    assert (entry.state, entry.attempts) == (PENDING, 1)
    assert entry.due_at == pytest.approx(clock.now + 0.5)
    assert publisher.deliver_due() == pytest.approx(0.5)  # the worker pauses as a whole
    clock.now += 0.5
    entry = box.due()[0]
    box.claim(entry)
    assert publisher.deliver(entry) is Result.RETRY
    assert box.entries()[0].due_at == pytest.approx(clock.now + 1.0)  # doubled
    hub.fail_with = None
    clock.now += 1.0
    publisher.deliver_due()
    assert box.entries() == []


def test_a_refusal_parks_the_row_as_failed_with_the_hubs_reason(world):
    hub, clock, store, box, publisher = world
    _store_study(store)
    hub.fail_with = 422
    assert _deliver_one(box, publisher, clock) is Result.FAILED
    (entry,) = box.entries()
    assert entry.state == FAILED
    assert "nope" in (entry.last_error or "")
    hub.fail_with = None
    clock.now += 3600
    assert box.due() == []  # not retried by the worker; reconcile retries it


def test_a_401_gets_one_fresh_token(world):
    hub, clock, store, box, publisher = world
    _store_study(store)
    hub.reject_tokens = 1
    assert _deliver_one(box, publisher, clock) is Result.DONE
    assert hub.tokens_issued == 2


def test_new_instances_during_a_send_are_sent_again(world):
    hub, clock, store, box, publisher = world
    _store_study(store, slices=1, accession="RACE")
    clock.now += 1
    (entry,) = box.due()
    box.claim(entry)
    extra = generated(patient_id="MRN-9", accession="RACE", slices=2)[1]
    store.store("tenant-a", io.BytesIO(extra))  # arrives while the first send is under way
    assert publisher.deliver(entry) is Result.SKIPPED
    assert _deliver_one(box, publisher, clock) is Result.DONE
    ((_, sid),) = [k for k in hub.resources if k[0] == "ImagingStudy"]
    assert hub.resources[("ImagingStudy", sid)]["numberOfInstances"] == 2


def test_deleting_retracts_the_study_at_the_hub(world):
    hub, clock, store, box, publisher = world
    uid = _store_study(store)
    _deliver_one(box, publisher, clock)
    assert store.delete_study("tenant-a", uid) == 2
    assert _deliver_one(box, publisher, clock) is Result.DONE
    assert not [k for k in hub.resources if k[0] == "ImagingStudy"]
    assert box.entries() == []
    assert ("DELETE", "/fhir/ImagingStudy/imagingstudy-2") in hub.calls


def test_token_is_cached_until_shortly_before_expiry(env):
    issued = []

    def idp(request: httpx.Request) -> httpx.Response:
        issued.append(request)
        return httpx.Response(200, json={"access_token": f"t{len(issued)}", "expires_in": 300})

    clock = Clock()
    source = TokenSource(
        httpx.Client(transport=httpx.MockTransport(idp)),
        client_id="c",
        client_secret="s",
        token_url=f"{HUB}/token",
        clock=clock,
    )
    assert source.token() == "t1"
    clock.now += 239
    assert source.token() == "t1"
    clock.now += 2  # within the last minute of its 5: renewed
    assert source.token() == "t2"
    source.invalidate()
    assert source.token() == "t3"
    form = parse_qs(issued[0].content.decode())
    assert form["grant_type"] == ["client_credentials"]
    assert issued[0].headers["authorization"].startswith("Basic ")


def test_token_endpoint_down_is_transient_and_static_tokens_need_no_idp():
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = httpx.Client(transport=httpx.MockTransport(down))
    with pytest.raises(Transient):
        TokenSource(http, client_id="c", client_secret="s", issuer=f"{HUB}/idp").token()
    assert TokenSource(http, static="fixed").token() == "fixed"
    with pytest.raises(ConfigurationError):
        TokenSource(http, client_id="c", client_secret="s")


def test_endpoint_identifier_is_the_node_id_unless_several_organisations_share_the_node(
    tmp_path, env
):
    single = _settings(tmp_path)
    assert endpoint_identifier(single, "org-a") == "site-a"
    several = load_settings(
        node_id="site-a",
        tenants={"t1": {"organization": "org-a"}, "t2": {"organization": "org-b"}},
    )
    assert endpoint_identifier(several, "org-a") != endpoint_identifier(several, "org-b")


def test_client_id_without_secret_is_a_configuration_error(tmp_path, env):
    with pytest.raises(ConfigurationError, match="hub_client_secret"):
        load_settings(hub_client_id="x")


def test_outcome_text_reads_the_operation_outcome():
    response = httpx.Response(
        422,
        json={
            "resourceType": "OperationOutcome",
            "issue": [{"diagnostics": "bad date", "expression": ["ImagingStudy.started"]}],
        },
    )
    assert outcome_text(response) == "HTTP 422: bad date at ImagingStudy.started"


def test_the_worker_thread_is_woken_by_a_store_and_stops_cleanly(tmp_path, env):
    hub = FakeHub()
    settings = _settings(tmp_path, outbox_poll_seconds=60)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = FileKeyStore(tmp_path / "keys", master_key(None, tmp_path / "m.key"), ["tenant-a"])
    store = InstanceStore(engine, tmp_path / "blobs", keys, 10 * 1024 * 1024)
    box = Outbox(engine)
    client = HubClient(settings, http=httpx.Client(transport=httpx.MockTransport(hub)))
    publisher = Publisher(settings, store, box, client)
    store.on_outbox = publisher.wake
    publisher.start()
    try:
        _store_study(store, slices=1, accession="THREAD")
        deadline = time.monotonic() + 10
        while box.entries() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.entries() == []  # woken at once: the 60 s poll never came into play
        assert [k for k in hub.resources if k[0] == "ImagingStudy"]
    finally:
        started = time.monotonic()
        publisher.stop()
        assert time.monotonic() - started < 2
