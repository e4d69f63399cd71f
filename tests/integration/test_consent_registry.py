"""The HIE's external consent registry: another FHIR server, behind a bounded-staleness cache.

A second real hub plays the registry (any FHIR server will do). Consents are written to it
with an operator token from its development IdP and about *its* Patient records, whose ids
are not the hub's: the consent source finds them by the patients' identifiers.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exchange.errors import Unavailable
from exchange.federation import LocalFederation
from exchange.hub.consents import RegistryConsentSource
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create

pytestmark = pytest.mark.integration

FHIR = "application/fhir+json"
HIE = "urn:oid:2.16.840.1.113883.3.7777.1"
MRN_A = "urn:exchange:site-a:mrn"
EXAMPLE = (
    Path(__file__).resolve().parents[2] / "fhir_profiles" / "examples" / "consent-example.json"
)
#: Small bounds, so the test can outlive them: fresh for 0.2 s, usable for 1 s when down.
CACHE_SECONDS = 0.2
MAX_STALENESS_SECONDS = 1.0


class Registry:
    """A running hub used as the HIE's consent registry, and what was written to it."""

    def __init__(self, federation: LocalFederation) -> None:
        self.federation = federation
        self.url = f"{federation.hub.url}/fhir"
        idp = DevIdentityProvider(
            f"{federation.hub.url}/idp",
            load_or_create(key_path(federation.hub.data_dir)),
            "exchange",
        )
        self.token = idp.issue(sub="consent-admin", role="operator", org="hie")
        self.headers = {"Authorization": f"Bearer {self.token}", "Content-Type": FHIR}

    def put(self, path: str, body: dict) -> dict:
        response = httpx.put(f"{self.url}/{path}", json=body, headers=self.headers, timeout=30)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def patient(self, identifiers: list[tuple[str, str]]) -> str:
        system, value = identifiers[0]
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": s, "value": v} for s, v in identifiers],
            "name": [{"family": "Registry", "given": [value]}],
        }
        return str(self.put(f"Patient?identifier={system}|{value}", body)["id"])

    def consent(self, cid: str, patient: str, kind: str = "permit", status: str = "active") -> None:
        body = copy.deepcopy(json.loads(EXAMPLE.read_text()))
        body["id"] = cid
        body["status"] = status
        body["patient"] = {"reference": f"Patient/{patient}"}
        body["provision"]["type"] = kind
        del body["provision"]["data"]
        self.put(f"Consent/{cid}", body)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh registry per test: the tests stop it."""
    with LocalFederation(tmp_path / "registry", []) as federation:
        registry = Registry(federation)
        # The registry's own records of two people; its ids are its own.
        avery = registry.patient([(HIE, "HIE-100"), ("urn:registry:local", "R-1")])
        blake = registry.patient([(HIE, "HIE-200")])
        registry.consent("avery-permit", avery)
        registry.consent("avery-old-optout", avery, kind="deny", status="inactive")
        registry.consent("blake-optout", blake, kind="deny")
        yield registry


#: The hub's Patient records (ids as in the hub's index) and their identifiers.
HUB_PATIENTS = {
    "hub-avery-a": [(MRN_A, "A-100"), (HIE, "HIE-100")],
    "hub-avery-b": [("urn:exchange:site-b:mrn", "B-100")],  # unknown to the registry
    "hub-blake": [(HIE, "HIE-200")],
    "hub-nobody": [(MRN_A, "A-999")],
}


def _source(registry: Registry) -> RegistryConsentSource:
    return RegistryConsentSource(
        registry.url,
        identifiers=lambda pid: HUB_PATIENTS.get(pid, []),
        token=registry.token,
        cache_seconds=CACHE_SECONDS,
        max_staleness_seconds=MAX_STALENESS_SECONDS,
        timeout=2,
    )


def _ids(consents: list[dict]) -> list[str]:
    return sorted(c["id"] for c in consents)


def test_registry_consents_for_a_hub_patient(registry):
    source = _source(registry)
    try:
        avery = source.consents_for(["hub-avery-a", "hub-avery-b"])
        assert _ids(avery) == ["avery-old-optout", "avery-permit"]
        assert {c["patient"]["reference"] for c in avery} == {"Patient/hub-avery-a"}
        assert {c["meta"]["source"] for c in avery} == {
            f"{registry.url}/Consent/avery-permit",
            f"{registry.url}/Consent/avery-old-optout",
        }
        assert _ids(source.consents_for(["hub-blake"])) == ["blake-optout"]
        assert source.consents_for(["hub-nobody"]) == []
        source.check()
    finally:
        source.close()


def test_registry_down_cached_within_staleness_then_unavailable(registry):
    source = _source(registry)
    try:
        before = source.consents_for(["hub-avery-a"])
        assert _ids(before) == ["avery-old-optout", "avery-permit"]
        registry.federation.kill("hub")  # at once: the bounds are short
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{registry.url}/metadata", timeout=2)

        time.sleep(CACHE_SECONDS + 0.1)  # no longer fresh: it asks, fails, serves the cache
        assert source.consents_for(["hub-avery-a"]) == before
        with pytest.raises(Unavailable):  # never fetched: nothing to fall back on
            source.consents_for(["hub-blake"])

        time.sleep(MAX_STALENESS_SECONDS)
        with pytest.raises(Unavailable) as raised:
            source.consents_for(["hub-avery-a"])
        assert "consent registry is unreachable" in raised.value.message
        with pytest.raises(Unavailable):
            source.check()
    finally:
        source.close()


def test_hub_readiness_follows_its_consent_registry(registry, tmp_path):
    hub_env = {
        "EXCHANGE_CONSENT_SOURCE": "registry",
        "EXCHANGE_CONSENT_REGISTRY_URL": registry.url,
        "EXCHANGE_CONSENT_REGISTRY_TOKEN": registry.token,
        "EXCHANGE_CONSENT_CACHE_SECONDS": str(CACHE_SECONDS),
        "EXCHANGE_CONSENT_MAX_STALENESS_SECONDS": str(MAX_STALENESS_SECONDS),
        "EXCHANGE_CONSENT_TIMEOUT_SECONDS": "2",
    }
    with LocalFederation(tmp_path / "hub", [], hub_env=hub_env) as federation:
        ready = httpx.get(f"{federation.hub.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["consents"] == "ok"

        registry.federation.stop()
        time.sleep(MAX_STALENESS_SECONDS + 0.2)
        refused = httpx.get(f"{federation.hub.url}/readyz", timeout=10)
        assert refused.status_code == 503, refused.text
        checks = refused.json()["checks"]
        assert checks["consents"].startswith("failing")
        assert {name for name, result in checks.items() if result != "ok"} == {"consents"}


def test_index_is_the_default_consent_source(tmp_path):
    with LocalFederation(tmp_path / "hub", []) as federation:
        ready = httpx.get(f"{federation.hub.url}/readyz", timeout=10).json()
        assert ready["checks"]["consents"] == "ok"
