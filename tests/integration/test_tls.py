"""Issue 10, TLS everywhere: the federation over real HTTPS with mutual TLS hub -> node.

One module-scoped federation (hub + two publishing nodes) started with ``tls=True``:
every service serves HTTPS from a ``certs init`` PKI, the hub presents its client
certificate to nodes, nodes honour grants only with it. Clients are the ones users
have (dicomweb-client over a requests session trusting the CA, httpx for FHIR).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security import devidp, tls
from exchange.security.keys import load_or_create

SITES = [
    NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a"),
    NodeSpec(node_id="site-b", organization="org-b", tenant="tenant-b"),
]
INDEX_WAIT_SECONDS = 20.0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(
        root=tmp_path_factory.mktemp("tls"), nodes=SITES, tls=True, publishing=True
    ) as fed:
        yield fed


@pytest.fixture(scope="module")
def uploaded(federation: LocalFederation) -> Iterator[tuple[str, list[pydicom.Dataset]]]:
    """A study stored at site-a by STOW-RS over HTTPS (API key, no client certificate)."""
    paths = write_study(
        StudySpec(
            patient_id=f"TLS-{uuid.uuid4().hex[:6]}",
            patient_name="Synthetic^Tls",
            accession=uuid.uuid4().hex[:12],
            slices=3,
            size=64,
            issuer="org-a",
        ),
        federation.root / "studies" / uuid.uuid4().hex[:8],
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    session = _session(federation)
    client = DICOMwebClient(
        url=f"{federation.node('site-a').url}/dicomweb",
        session=session,
        headers={"X-API-Key": federation.api_key("site-a")},
    )
    answer = client.store_instances(datasets=datasets)
    assert "FailedSOPSequence" not in answer
    yield str(datasets[0].StudyInstanceUID), datasets
    session.close()


def _session(federation: LocalFederation) -> requests.Session:
    """A requests session trusting the federation's CA (and not REQUESTS_CA_BUNDLE)."""
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE would override ``verify``
    session.verify = str(federation.pki.ca.cert)
    return session


def _idp(federation: LocalFederation) -> devidp.DevIdentityProvider:
    key = load_or_create(devidp.key_path(federation.hub.data_dir))
    return devidp.DevIdentityProvider(f"{federation.hub.url}/idp", key, "exchange")


def _token(federation: LocalFederation, role: str, org: str) -> str:
    return _idp(federation).issue(sub=f"{role}-{org}", role=role, org=org, purpose=["TREAT"])


def _wait_indexed(federation: LocalFederation, uid: str, token: str) -> dict[str, Any]:
    deadline = time.monotonic() + INDEX_WAIT_SECONDS
    with federation.http(base_url=federation.hub.url, timeout=30) as http:
        while True:
            found = http.get(
                f"/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert found.status_code == 200, found.text
            if found.json().get("total") == 1:
                return dict(found.json()["entry"][0]["resource"])
            assert time.monotonic() < deadline, "the study was not published over HTTPS"
            time.sleep(0.2)


def test_every_service_is_https(federation: LocalFederation) -> None:
    assert all(s.url.startswith("https://") for s in federation.services.values())


def test_publish_search_and_brokered_retrieval_over_tls(
    federation: LocalFederation, uploaded: tuple[str, list[pydicom.Dataset]]
) -> None:
    uid, originals = uploaded
    clinician = _token(federation, "clinician", "org-a")
    _wait_indexed(federation, uid, clinician)
    with federation.http(base_url=federation.hub.url, timeout=30) as http:
        found = http.get(
            f"/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"
            "&_include=ImagingStudy:endpoint",
            headers={"Authorization": f"Bearer {clinician}"},
        ).json()
    kinds = {e["resource"]["resourceType"]: e["resource"] for e in found["entry"]}
    assert kinds["Endpoint"]["address"] == f"{federation.hub.url}/dicomweb"

    session = _session(federation)
    client = DICOMwebClient(
        url=f"{federation.hub.url}/dicomweb",
        session=session,
        headers={"Authorization": f"Bearer {clinician}"},
    )
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": uid})
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
    instances = client.retrieve_study(uid)  # the custodian's own clinician may export
    by_uid = {str(d.SOPInstanceUID): d for d in originals}
    assert sorted(by_uid) == sorted(str(i.SOPInstanceUID) for i in instances)
    for instance in instances:
        assert instance.PixelData == by_uid[str(instance.SOPInstanceUID)].PixelData
    session.close()


def test_node_cli_calls_the_hub_over_tls(
    federation: LocalFederation, uploaded: tuple[str, list[pydicom.Dataset]]
) -> None:
    _wait_indexed(federation, uploaded[0], _token(federation, "operator", "hie"))
    report = federation.exchange("site-a", "node", "reconcile", "--dry-run")
    assert "tenant tenant-a (organization org-a): 1 study here, 1 at the hub; in sync 1" in report


def _node_paths(federation: LocalFederation, uid: str) -> list[str]:
    node = federation.node("site-a").url
    return [
        f"{node}/dicomweb/studies?StudyInstanceUID={uid}",  # QIDO-RS
        f"{node}/dicomweb/studies/{uid}/metadata",  # WADO-RS
    ]


def test_node_honours_grants_only_with_the_hubs_client_certificate(
    federation: LocalFederation, uploaded: tuple[str, list[pydicom.Dataset]]
) -> None:
    uid = uploaded[0]
    grant = {"Authorization": f"Bearer {federation.grant('site-a', uid, 'view')}"}
    with federation.http(as_hub=True) as hub, federation.http() as anonymous:
        for path in _node_paths(federation, uid):
            assert hub.get(path, headers=grant).status_code == 200, path
            refused = anonymous.get(path, headers=grant)
            assert refused.status_code == 403, path
            assert "client certificate" in refused.text
        # Probes and the site's own systems need no certificate.
        assert anonymous.get(f"{federation.node('site-a').url}/readyz").status_code == 200


def test_node_refuses_certificates_that_are_not_the_hubs(
    federation: LocalFederation, uploaded: tuple[str, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    uid = uploaded[0]
    grant = {"Authorization": f"Bearer {federation.grant('site-a', uid, 'view')}"}
    pki = federation.pki
    # Another node's (server) certificate does not chain to the client CA: no handshake.
    other = ssl.create_default_context(cafile=pki.ca.cert)
    other.load_cert_chain(pki.node("site-b").cert, pki.node("site-b").key)
    for path in _node_paths(federation, uid):
        with pytest.raises(httpx.HTTPError), httpx.Client(verify=other) as client:
            client.get(path, headers=grant)
    # A certificate from the client CA under another name: handshake, then 403.
    stranger = tls.Pair(tmp_path / "stranger.pem", tmp_path / "stranger.key")
    tls.issue_client_certificate(pki.client_ca, "site-system-x", stranger)
    context = ssl.create_default_context(cafile=pki.ca.cert)
    context.load_cert_chain(stranger.cert, stranger.key)
    with httpx.Client(verify=context) as client:
        for path in _node_paths(federation, uid):
            refused = client.get(path, headers=grant)
            assert refused.status_code == 403, path
            assert "not the hub's" in refused.text


def test_plain_http_to_an_https_port_fails(federation: LocalFederation) -> None:
    for service in federation.services.values():
        plain = service.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/healthz", timeout=5)


def test_untrusted_clients_cannot_verify_the_services(federation: LocalFederation) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{federation.hub.url}/healthz", timeout=5)  # public CAs only


def _serve(role: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    return subprocess.run(
        [sys.executable, "-m", "exchange", "serve", role],
        env={**clean, "EXCHANGE_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_production_without_a_certificate_refuses_to_start(tmp_path: Path) -> None:
    result = _serve("hub", {}, tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "EXCHANGE_TLS_CERT_FILE is not set" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "exchange.db").exists()  # nothing created before the check


def test_production_node_with_a_plain_http_hub_url_refuses_to_start(
    federation: LocalFederation, tmp_path: Path
) -> None:
    pki = federation.pki
    env = {
        "EXCHANGE_TLS_CERT_FILE": str(pki.node("site-a").cert),
        "EXCHANGE_TLS_KEY_FILE": str(pki.node("site-a").key),
        "EXCHANGE_TLS_CLIENT_CA_FILE": str(pki.client_ca.cert),
        "EXCHANGE_HUB_URL": "http://hub.example.org",
    }
    result = _serve("node", env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("exchange: error: EXCHANGE_HUB_URL:")
    assert len(result.stderr.strip().splitlines()) == 1
