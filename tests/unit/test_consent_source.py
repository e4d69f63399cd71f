"""Consent sources: the hub's index, and the external registry's bounded-staleness cache.

The registry is a fake FHIR server (``httpx.MockTransport``) and time is a fake clock,
so every staleness bound is tested exactly, without sleeping.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from exchange.config import load_settings
from exchange.database import make_engine
from exchange.errors import ConfigurationError, Unavailable
from exchange.fhir.repository import SqlRepository
from exchange.hub.consents import IndexConsentSource, RegistryConsentSource, index_identifiers

REGISTRY = "https://consents.hie.example/fhir"
MRN = "urn:exchange:site-a:mrn"
HIE = "urn:oid:2.16.840.1.113883.3.7777.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    """A FHIR server's Consent search; ``up`` False makes every request fail to connect."""

    def __init__(self) -> None:
        self.up = True
        self.requests: list[httpx.Request] = []
        #: identifier token -> Consents of the registry's patient with that identifier
        self.consents: dict[str, list[dict]] = {}
        self.page_size = 100
        self.fail_page: int | None = None
        self.next_base = REGISTRY

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path.endswith("/metadata"):
            return httpx.Response(200, json={"resourceType": "CapabilityStatement"})
        params = dict(parse_qsl(request.url.query.decode()))
        page = int(params.get("page", "0"))
        if self.fail_page is not None and page == self.fail_page:
            return httpx.Response(500, json={"resourceType": "OperationOutcome"})
        tokens = params["patient.identifier"].split(",")
        matched = [c for token in tokens for c in self.consents.get(token, [])]
        chunk = matched[page * self.page_size : (page + 1) * self.page_size]
        body: dict = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {
                    "fullUrl": f"{REGISTRY}/Consent/{c['id']}",
                    "resource": c,
                    "search": {"mode": "match"},
                }
                for c in chunk
            ]
            + [{"resource": {"resourceType": "Patient", "id": "x"}, "search": {"mode": "include"}}],
        }
        if (page + 1) * self.page_size < len(matched):
            query = {**params, "page": str(page + 1)}
            link = f"{self.next_base}/Consent?" + "&".join(f"{k}={v}" for k, v in query.items())
            body["link"] = [{"relation": "next", "url": link}]
        return httpx.Response(200, json=body)


def consent(cid: str, registry_patient: str = "r-1", status: str = "active") -> dict:
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{registry_patient}"},
        "provision": {"type": "deny"},
    }


HUB_PATIENTS = {
    "hub-p1": [(MRN, "A-1"), (HIE, "HIE-1")],
    "hub-p2": [(MRN, "A-2")],
    "hub-none": [],
}


@pytest.fixture
def registry() -> FakeRegistry:
    fake = FakeRegistry()
    fake.consents[f"{HIE}|HIE-1"] = [consent("c1"), consent("c2", status="inactive")]
    fake.consents[f"{MRN}|A-2"] = [consent("c3", "r-2")]
    return fake


def source(registry: FakeRegistry, clock: Clock, **kwargs) -> RegistryConsentSource:
    options = {"cache_seconds": 60.0, "max_staleness_seconds": 300.0, **kwargs}
    return RegistryConsentSource(
        REGISTRY,
        identifiers=lambda pid: HUB_PATIENTS.get(pid, []),
        token="registry-token",
        clock=clock,
        transport=httpx.MockTransport(registry.handler),
        **options,
    )


def ids(consents: list[dict]) -> list[str]:
    return sorted(c["id"] for c in consents)


def test_searches_by_the_hub_patients_identifiers_and_names_the_hub_patient(registry):
    found = source(registry, Clock()).consents_for(["hub-p1"])
    assert ids(found) == ["c1", "c2"]  # active and inactive; the included Patient is not one
    assert {c["patient"]["reference"] for c in found} == {"Patient/hub-p1"}
    assert {c["meta"]["source"] for c in found} == {
        f"{REGISTRY}/Consent/c1",
        f"{REGISTRY}/Consent/c2",
    }
    request = registry.requests[0]
    assert request.headers["Authorization"] == "Bearer registry-token"
    assert request.url.path == "/fhir/Consent"
    assert dict(parse_qsl(request.url.query.decode()))["patient.identifier"] == (
        f"{MRN}|A-1,{HIE}|HIE-1"
    )


def test_several_patients_and_unknown_ones(registry):
    found = source(registry, Clock()).consents_for(["hub-p1", "hub-p2", "hub-none", "not an id"])
    assert ids(found) == ["c1", "c2", "c3"]
    by_patient = {c["id"]: c["patient"]["reference"] for c in found}
    assert by_patient["c3"] == "Patient/hub-p2"
    assert len(registry.requests) == 2  # no identifiers, or not an id: nothing to ask


def test_identifier_values_are_escaped(registry):
    HUB_PATIENTS["hub-odd"] = [("urn:x", "a,b|c$d\\e")]
    try:
        source(registry, Clock()).consents_for(["hub-odd"])
    finally:
        del HUB_PATIENTS["hub-odd"]
    sent = dict(parse_qsl(registry.requests[0].url.query.decode()))["patient.identifier"]
    assert sent == "urn:x|a\\,b\\|c\\$d\\\\e"


def test_fresh_cache_answers_without_asking(registry):
    clock = Clock()
    consents = source(registry, clock)
    first = consents.consents_for(["hub-p1"])
    clock.now += 59.9
    registry.consents[f"{HIE}|HIE-1"] = []  # changed at the registry, not yet seen
    assert consents.consents_for(["hub-p1"]) == first
    assert len(registry.requests) == 1


def test_answers_are_copies(registry):
    consents = source(registry, Clock())
    consents.consents_for(["hub-p1"])[0]["status"] = "tampered"
    assert {c["status"] for c in consents.consents_for(["hub-p1"])} == {"active", "inactive"}


def test_refreshes_after_cache_seconds(registry):
    clock = Clock()
    consents = source(registry, clock)
    assert ids(consents.consents_for(["hub-p1"])) == ["c1", "c2"]
    registry.consents[f"{HIE}|HIE-1"] = [consent("c9")]
    clock.now += 60
    assert ids(consents.consents_for(["hub-p1"])) == ["c9"]
    assert len(registry.requests) == 2


def test_registry_down_within_staleness_serves_the_cached_answer(registry):
    clock = Clock()
    consents = source(registry, clock)
    answer = consents.consents_for(["hub-p1"])
    registry.up = False
    clock.now += 300  # exactly the bound: still served
    assert consents.consents_for(["hub-p1"]) == answer
    assert len(registry.requests) == 2  # it did ask again first


def test_registry_down_beyond_staleness_is_unavailable(registry):
    clock = Clock()
    consents = source(registry, clock)
    consents.consents_for(["hub-p1"])
    registry.up = False
    clock.now += 300.1
    with pytest.raises(Unavailable) as raised:
        consents.consents_for(["hub-p1"])
    assert "older than 300 s" in raised.value.message
    assert raised.value.status == 503
    # and it stays that way: an old answer is never served again, however often asked
    with pytest.raises(Unavailable):
        consents.consents_for(["hub-p1"])


def test_registry_down_with_nothing_cached_is_unavailable(registry):
    registry.up = False
    with pytest.raises(Unavailable):
        source(registry, Clock()).consents_for(["hub-p1"])


def test_an_error_answer_counts_as_down(registry):
    consents = source(registry, Clock(), cache_seconds=0, max_staleness_seconds=0)
    registry.fail_page = 0
    with pytest.raises(Unavailable):
        consents.consents_for(["hub-p1"])


def test_never_a_partial_answer_across_patients(registry):
    clock = Clock()
    consents = source(registry, clock)
    consents.consents_for(["hub-p1"])  # cached, fresh
    registry.up = False
    with pytest.raises(Unavailable):
        consents.consents_for(["hub-p1", "hub-p2"])  # hub-p2 was never fetched


def test_follows_next_links_and_never_answers_with_some_pages(registry):
    registry.page_size = 2
    registry.consents[f"{MRN}|A-2"] = [consent(f"n{i}", "r-2") for i in range(5)]
    clock = Clock()
    consents = source(registry, clock, cache_seconds=0, max_staleness_seconds=0)
    assert ids(consents.consents_for(["hub-p2"])) == [f"n{i}" for i in range(5)]
    assert len(registry.requests) == 3
    registry.fail_page = 2
    clock.now += 0.1
    with pytest.raises(Unavailable):
        consents.consents_for(["hub-p2"])


def test_a_next_link_to_another_server_is_not_followed(registry):
    registry.page_size = 1
    registry.next_base = "https://elsewhere.example/fhir"
    registry.consents[f"{MRN}|A-2"] = [consent("n1", "r-2"), consent("n2", "r-2")]
    with pytest.raises(Unavailable):
        source(registry, Clock()).consents_for(["hub-p2"])
    assert all(urlsplit(str(r.url)).hostname == "consents.hie.example" for r in registry.requests)


def test_a_non_bundle_answer_counts_as_down():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"resourceType": "OperationOutcome"})

    consents = RegistryConsentSource(
        REGISTRY,
        identifiers=lambda pid: HUB_PATIENTS[pid],
        transport=httpx.MockTransport(handler),
    )
    with pytest.raises(Unavailable):
        consents.consents_for(["hub-p1"])


def test_search_by_id_when_the_registry_shares_the_hubs_ids(registry):
    def handler(request: httpx.Request) -> httpx.Response:
        registry.requests.append(request)
        rid = dict(parse_qsl(request.url.query.decode()))["patient"]
        entry = {"resource": consent("c-" + rid, rid)}
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": [entry]})

    consents = RegistryConsentSource(
        REGISTRY,
        identifiers=lambda pid: [],
        basic=("hub", "secret"),
        match="id",
        transport=httpx.MockTransport(handler),
    )
    found = consents.consents_for(["p7"])
    assert [c["patient"]["reference"] for c in found] == ["Patient/p7"]
    assert registry.requests[0].headers["Authorization"].startswith("Basic ")


def test_readiness_follows_the_registry_within_the_bound(registry):
    clock = Clock()
    consents = source(registry, clock, cache_seconds=1, max_staleness_seconds=10)
    consents.check()
    registry.up = False
    clock.now += 10
    consents.check()  # the registry was seen 10 s ago: still within the bound
    clock.now += 0.1
    with pytest.raises(Unavailable):
        consents.check()


def test_readiness_fails_when_the_registry_was_never_reached(registry):
    registry.up = False
    with pytest.raises(Unavailable):
        source(registry, Clock()).check()


def test_staleness_cannot_be_shorter_than_the_cache(registry):
    with pytest.raises(ValueError, match="at least"):
        source(registry, Clock(), cache_seconds=60, max_staleness_seconds=30)


# -- the hub's own index -----------------------------------------------------------


def test_index_source_reads_the_hubs_own_consents(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        repo = SqlRepository(engine, local_base="https://hub.example/fhir")
        for cid, patient, status in (
            ("k1", "p1", "active"),
            ("k2", "p1", "inactive"),
            ("k3", "p2", "active"),
            ("k4", "p3", "active"),
        ):
            body = consent(cid, patient, status)
            repo.update("Consent", cid, body)
        repo.update(
            "Consent",
            "k5",
            {**consent("k5"), "patient": {"reference": "https://hub.example/fhir/Patient/p2"}},
        )
        repo.delete("Consent", "k3")
        source = IndexConsentSource(repo)
        assert ids(source.consents_for(["p1", "p2"])) == ["k1", "k2", "k5"]
        assert source.consents_for([]) == []
        assert source.consents_for(["no,such", "p9"]) == []
        source.check()

        repo.update(
            "Patient",
            "p1",
            {
                "resourceType": "Patient",
                "identifier": [{"system": MRN, "value": "A-1"}, {"value": "no system"}],
            },
        )
        identifiers = index_identifiers(repo)
        assert list(identifiers("p1")) == [(MRN, "A-1")]
        assert list(identifiers("p-unknown")) == []
    finally:
        engine.dispose()


# -- settings ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)


def test_settings_defaults_and_validation(clean_env):
    settings = load_settings()
    assert settings.consent_source == "index"
    assert settings.consent_max_staleness_seconds >= settings.consent_cache_seconds
    with pytest.raises(ConfigurationError, match="consent_registry_url"):
        load_settings(consent_source="registry")
    with pytest.raises(ConfigurationError, match="EXCHANGE_CONSENT_REGISTRY_URL"):
        load_settings(consent_registry_url="ftp://registry")
    with pytest.raises(ConfigurationError, match="at least consent_cache_seconds"):
        load_settings(consent_cache_seconds=60, consent_max_staleness_seconds=30)
    registry = load_settings(
        consent_source="registry",
        consent_registry_url="https://consents.example/fhir/",
        consent_registry_token="t0k",
    )
    assert registry.consent_registry_url == "https://consents.example/fhir"
    assert "t0k" not in repr(registry)


def test_concurrent_callers_all_get_the_whole_answer(registry):
    from concurrent.futures import ThreadPoolExecutor

    clock = Clock()
    consents = source(registry, clock, cache_seconds=0, max_staleness_seconds=0)
    with ThreadPoolExecutor(16) as pool:
        answers = list(
            pool.map(lambda _: ids(consents.consents_for(["hub-p1", "hub-p2"])), range(200))
        )
    assert all(answer == ["c1", "c2", "c3"] for answer in answers)
