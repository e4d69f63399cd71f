"""STOW-RS at a real node: third-party client, per-instance results, credentials, streaming."""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from exchange.config import load_settings
from exchange.federation import LocalFederation, NodeSpec
from exchange.node.app import create_app
from exchange.node.importer import collect
from exchange.node.services import build
from exchange.node.store import InstanceStore, StoreBatch
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests.dicomdata import bundled, generated, with_preamble, without

pytestmark = pytest.mark.integration

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC409
MiB = 1024 * 1024
# A Windows PE header in the preamble: the file is also an executable (CVE-2019-11687).
PE_PREAMBLE = b"MZ\x90\x00" + bytes(0x38) + struct.pack("<I", 0x40) + b"PE\x00\x00"
Parts = list[tuple[str | None, bytes]]


# -- helpers -----------------------------------------------------------------
def multipart(parts: Parts, content_type: str | None = None) -> tuple[bytes, str]:
    """A STOW-RS body built by hand, so parts can be anything; and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for part_type, data in parts:
        body += f"--{boundary}\r\n".encode()
        if part_type:
            body += f"Content-Type: {part_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    if content_type is None:
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return bytes(body), content_type.replace("{boundary}", boundary)


def post(
    url: str,
    parts: Parts,
    *,
    key: str | None = None,
    study: str | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = None,
) -> httpx.Response:
    body, header = multipart(parts, content_type)
    sent = {**({"Content-Type": header} if header else {}), **(headers or {})}
    if key:
        sent["X-API-Key"] = key
    target = f"{url}/dicomweb/studies" + (f"/{study}" if study else "")
    return httpx.post(target, content=body, headers=sent, timeout=60)


def uids(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def referenced(answer: dict[str, Any]) -> list[str]:
    items = answer.get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def failed(answer: dict[str, Any]) -> list[tuple[str | None, int, str]]:
    """(SOP Instance UID when known, FailureReason, ErrorComment) per failed part."""
    out = []
    for item in answer.get("00081198", {}).get("Value", []):
        sop = item.get("00081155", {}).get("Value", [None])[0]
        out.append((sop, item["00081197"]["Value"][0], item["00000902"]["Value"][0]))
    return out


def nested(depth: int) -> Sequence:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    return Sequence(inner.ContentSequence)


def with_nested_sequences(data: bytes, depth: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ContentSequence = nested(depth)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def patched_length(data: bytes, tag_and_vr: bytes, length: int) -> bytes:
    """``data`` with the 4-byte length of the explicit-VR element ``tag_and_vr`` replaced."""
    at = data.index(tag_and_vr) + len(tag_and_vr) + 2
    return data[:at] + struct.pack("<I", length) + data[at + 4 :]


@contextmanager
def node_store(federation: LocalFederation, node_id: str) -> Iterator[InstanceStore]:
    """The node's own store, opened beside the running node (as ``exchange import`` does)."""
    env = federation.node(node_id).env
    settings = load_settings(
        data_dir=Path(env["EXCHANGE_DATA_DIR"]),
        node_id=node_id,
        tenants=json.loads(env["EXCHANGE_TENANTS"]),
        database_url=env.get("EXCHANGE_DATABASE_URL"),
    )
    services = build(settings)
    try:
        yield services.store
    finally:
        services.close()


def peak_rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


# -- fixtures ----------------------------------------------------------------
@pytest.fixture(scope="module")
def site_a(federation: LocalFederation) -> str:
    return federation.node("site-a").url


@pytest.fixture(scope="module")
def key(federation: LocalFederation) -> str:
    return federation.api_key("site-a")


@pytest.fixture(scope="module")
def trusting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """This module's own federation whose nodes also trust the hub's development IdP.

    The shared federation's nodes take API keys only (no issuers configured), and the
    bundled pydicom files stored here must not show up in other modules' studies.
    """
    specs = [NodeSpec("site-a", "org-a", "tenant-a"), NodeSpec("site-b", "org-b", "tenant-b")]
    fed = LocalFederation(root=tmp_path_factory.mktemp("stow-federation"), nodes=specs)
    with fed:
        issuers = json.dumps([{"issuer": f"{fed.hub.url}/idp"}])
        for spec in specs:
            fed.node(spec.node_id).env["EXCHANGE_ISSUERS"] = issuers
            fed.kill(spec.node_id)
            fed.restart(spec.node_id)
        yield fed


@pytest.fixture(scope="module")
def idp(trusting: LocalFederation) -> DevIdentityProvider:
    hub = trusting.hub
    return DevIdentityProvider(f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange")


# -- the third-party client ------------------------------------------------------
def test_dicomweb_client_stores_the_bundled_files(trusting):
    files = [bundled(n) for n in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")]
    files += collect(bundled("DICOMDIR"))  # the files the DICOMDIR set refers to
    assert any("77654033" in str(f) for f in files)
    datasets = [pydicom.dcmread(f) for f in files]
    node = trusting.node("site-a").url
    client = DICOMwebClient(
        url=f"{node}/dicomweb", headers={"X-API-Key": trusting.api_key("site-a")}
    )

    answer = client.store_instances(datasets=datasets)

    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    assert [str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence] == sops
    assert "FailedSOPSequence" not in answer
    assert not answer.get("RetrieveURL")  # several studies: empty, as PS3.18 says
    first = answer.ReferencedSOPSequence[0]
    ct = datasets[0]
    assert first.ReferencedSOPClassUID == ct.SOPClassUID
    assert first.RetrieveURL == (
        f"{node}/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
        f"/instances/{ct.SOPInstanceUID}"
    )
    # Storing the same instances again is still a success (already present).
    again = client.store_instances(datasets=datasets[:3])
    assert len(again.ReferencedSOPSequence) == 3
    with node_store(trusting, "site-a") as store:
        assert set(sops) <= {v.sop_uid for v in store.instances("tenant-a")}


def test_one_study_answers_its_retrieve_url_and_restoring_is_idempotent(
    federation, site_a, key, tmp_path
):
    instances = generated(patient_id="STOW-IDEM", accession="STOWIDEM", slices=3)
    study = str(uids(instances[0]).StudyInstanceUID)
    client = DICOMwebClient(url=f"{site_a}/dicomweb", headers={"X-API-Key": key})
    datasets = [pydicom.dcmread(io.BytesIO(d)) for d in instances]

    first = client.store_instances(datasets=datasets)
    assert first.RetrieveURL == f"{site_a}/dicomweb/studies/{study}"
    assert len(first.ReferencedSOPSequence) == 3

    response = post(site_a, [(DICOM, d) for d in instances], key=key)
    assert response.status_code == 200
    assert response.headers["content-type"] == DICOM_JSON
    assert referenced(response.json()) == [str(ds.SOPInstanceUID) for ds in datasets]

    for index, data in enumerate(instances):
        (tmp_path / f"{index}.dcm").write_bytes(data)
    summary = federation.import_into("site-a", tmp_path)
    assert "3 files: 0 stored, 3 already present" in summary


# -- per-instance results -------------------------------------------------------
def test_good_and_bad_parts_answer_202_with_a_reason_for_each_bad_one(site_a, key):
    good = generated(patient_id="STOW-MIX", accession="STOWMIX", slices=2)
    parts: Parts = [
        (DICOM, good[0]),
        ("text/plain", b"hello"),
        (DICOM, b"this is not DICOM at all" * 20),
        (DICOM, good[1]),
    ]

    response = post(site_a, parts, key=key)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert referenced(answer) == [str(uids(d).SOPInstanceUID) for d in good]
    [wrong_type, not_dicom] = failed(answer)
    assert wrong_type == (None, CANNOT_UNDERSTAND, "the part is not application/dicom")
    assert not_dicom[:2] == (None, CANNOT_UNDERSTAND)
    assert not_dicom[2].startswith("not a DICOM Part 10 file")


def test_all_bad_answers_409_and_no_parts_400(site_a, key):
    response = post(site_a, [(DICOM, b""), ("application/octet-stream", b"\0" * 200)], key=key)
    assert response.status_code == 409
    assert [reason for _, reason, _ in failed(response.json())] == [CANNOT_UNDERSTAND] * 2
    assert "00081199" not in response.json()

    empty = post(site_a, [], key=key)
    assert empty.status_code == 400
    assert empty.json()["error"]["message"] == "the request holds no instances"
    nothing = httpx.post(
        f"{site_a}/dicomweb/studies",
        content=b"",
        headers={"X-API-Key": key, "Content-Type": "multipart/related; boundary=x"},
    )
    assert nothing.status_code == 400
    assert "empty" in nothing.json()["error"]["message"]


def test_a_body_cut_short_is_400_and_only_complete_parts_count(federation, site_a, key):
    complete, cut = generated(patient_id="STOW-CUT", accession="STOWCUT", slices=2)
    body, content_type = multipart([(DICOM, complete), (DICOM, cut)])
    truncated = body[: len(body) - len(cut) // 2]

    response = httpx.post(
        f"{site_a}/dicomweb/studies",
        content=truncated,
        headers={"X-API-Key": key, "Content-Type": content_type},
    )

    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "ended before the closing multipart boundary" in message
    assert "(1 stored)" in message
    with node_store(federation, "site-a") as store:
        study = str(uids(complete).StudyInstanceUID)
        stored = [v.sop_uid for v in store.instances("tenant-a", study_uid=study)]
    assert stored == [str(uids(complete).SOPInstanceUID)]


def test_garbage_is_400(site_a, key):
    response = httpx.post(
        f"{site_a}/dicomweb/studies",
        content=b"\x00garbage without any boundary" * 1000,
        headers={"X-API-Key": key, "Content-Type": "multipart/related; boundary=abc"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the body contains no multipart boundary"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary={boundary}',
        "multipart/form-data; boundary={boundary}",
        "",
    ],
)
def test_other_media_types_are_415(site_a, key, content_type):
    data = generated(patient_id="STOW-415", accession="STOW415", slices=1)[0]
    response = post(site_a, [(DICOM, data)], key=key, content_type=content_type)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "not-supported"


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/related; type=application/dicom; boundary={boundary}",
        "Multipart/Related; Type=Application/DICOM; boundary={boundary}",
        'multipart/related; boundary="{boundary}"',  # no type: the parts say application/dicom
    ],
)
def test_type_parameter_quoted_unquoted_or_absent(site_a, key, content_type):
    data = generated(patient_id="STOW-TYPE", accession="STOWTYPE", slices=1)[0]
    response = post(site_a, [(DICOM, data)], key=key, content_type=content_type)
    assert response.status_code == 200, response.text


def test_a_part_without_content_type_is_of_the_declared_type(site_a, key):
    data = generated(patient_id="STOW-UNTYPED", accession="STOWUNTYPED", slices=1)[0]
    assert post(site_a, [(None, data)], key=key).status_code == 200
    undeclared = "multipart/related; boundary={boundary}"
    refused = post(site_a, [(None, data)], key=key, content_type=undeclared)
    assert refused.status_code == 409
    assert failed(refused.json())[0][2] == "the part is not application/dicom"


def test_missing_boundary_is_400(site_a, key):
    response = post(site_a, [], key=key, content_type='multipart/related; type="application/dicom"')
    assert response.status_code == 400
    assert "boundary" in response.json()["error"]["message"]


# -- the study in the URL ---------------------------------------------------------
def test_instances_of_another_study_are_refused_with_c409(federation, site_a, key):
    mine = generated(patient_id="STOW-URL", accession="STOWURL", slices=1)[0]
    other = generated(patient_id="STOW-URL", accession="STOWOTHER", slices=1)[0]
    study, sop = str(uids(mine).StudyInstanceUID), str(uids(mine).SOPInstanceUID)
    other_study = str(uids(other).StudyInstanceUID)

    refused = post(site_a, [(DICOM, mine)], key=key, study=other_study)
    assert refused.status_code == 409
    assert failed(refused.json()) == [(sop, STUDY_MISMATCH, "Study Instance UID mismatch")]
    with node_store(federation, "site-a") as store:
        assert store.instances("tenant-a", study_uid=study) == []

    accepted = post(site_a, [(DICOM, mine), (DICOM, other)], key=key, study=study)
    assert accepted.status_code == 202
    assert accepted.json()["00081190"]["Value"] == [f"{site_a}/dicomweb/studies/{study}"]
    assert referenced(accepted.json()) == [sop]
    assert post(site_a, [(DICOM, mine)], key=key, study="not-a-uid").status_code == 400


# -- hostile and broken input --------------------------------------------------------
def test_a_malformed_corpus_gets_a_result_per_instance_and_stores_only_the_good(
    federation, site_a, key, tmp_path
):
    originals = generated(patient_id="STOW-BAD", accession="STOWBAD", slices=7)
    good, header_cut, no_sop, absurd, polyglot, deep, good2 = originals
    corpus: list[tuple[bytes, int | None]] = [  # (part, failure reason or None if stored)
        (good, None),
        (header_cut[:300], CANNOT_UNDERSTAND),
        (b"", CANNOT_UNDERSTAND),
        (b"MZ\x90\x00not DICOM, but an executable's start" * 8, CANNOT_UNDERSTAND),
        (without(no_sop, "SOPInstanceUID"), CANNOT_UNDERSTAND),
        # File Meta Information Version (0002,0001) OB claiming ~4 GiB.
        (patched_length(absurd, b"\x02\x00\x01\x00OB", 0xFFFFFFF0), CANNOT_UNDERSTAND),
        (with_preamble(polyglot, PE_PREAMBLE), None),
        (with_nested_sequences(deep, 200), None),
        (good2, None),
    ]

    response = post(site_a, [(DICOM, data) for data, _ in corpus], key=key)

    assert response.status_code == 202, response.text
    answer = response.json()
    assert referenced(answer) == [str(uids(d).SOPInstanceUID) for d, r in corpus if r is None]
    assert [reason for _, reason, _ in failed(answer)] == [r for _, r in corpus if r is not None]
    comments = [comment for _, _, comment in failed(answer)]
    assert "missing SOP Instance UID" in comments
    assert all(len(c) <= 64 for c in comments)

    study = str(uids(good).StudyInstanceUID)
    polyglot_sop = str(uids(polyglot).SOPInstanceUID)
    with node_store(federation, "site-a") as store:
        stored = {v.sop_uid for v in store.instances("tenant-a", study_uid=study)}
        out = io.BytesIO()
        store.copy_out("tenant-a", polyglot_sop, out)
    assert stored == {str(uids(d).SOPInstanceUID) for d in (good, polyglot, deep, good2)}
    assert out.getvalue()[:128] == bytes(128)  # the executable header is gone
    assert out.getvalue()[128:] == polyglot[128:]

    # The intact originals of what was refused are new to the node; the rest are not.
    for index in (0, 1, 2, 3, 4, 6):
        (tmp_path / f"{index}.dcm").write_bytes(originals[index])
    summary = federation.import_into("site-a", tmp_path)
    assert "6 files: 3 stored, 3 already present" in summary


def test_instances_broken_inside_pixel_data_are_refused(site_a, key):
    cut, lying = generated(patient_id="STOW-PIX", accession="STOWPIX", slices=2)
    parts: Parts = [
        (DICOM, cut[: len(cut) // 2]),
        (DICOM, patched_length(lying, b"\xe0\x7f\x10\x00OW", 0xFFFFFFF0)),
    ]
    response = post(site_a, parts, key=key)
    assert response.status_code == 409


# -- credentials ----------------------------------------------------------------------
def test_no_credential_or_a_bogus_one_is_401(federation, site_a):
    data = generated(patient_id="STOW-AUTH", accession="STOWAUTH", slices=1)[0]
    anonymous = post(site_a, [(DICOM, data)])
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer ")
    for headers in (
        {"X-API-Key": "exk_bogus"},
        {"Authorization": "ApiKey exk_bogus"},
        {"Authorization": "Bearer exk_bogus"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ):
        response = post(site_a, [(DICOM, data)], headers=headers)
        assert response.status_code == 401, headers
        assert "www-authenticate" in response.headers


def test_every_api_key_form_works_and_only_at_its_own_node(federation, site_a, key):
    data = generated(patient_id="STOW-KEYS", accession="STOWKEYS", slices=1)[0]
    for headers in (
        {"X-API-Key": key},
        {"Authorization": f"ApiKey {key}"},
        {"Authorization": f"Bearer {key}"},
    ):
        assert post(site_a, [(DICOM, data)], headers=headers).status_code == 200, headers
    site_b = federation.node("site-b").url
    assert post(site_b, [(DICOM, data)], key=key).status_code == 401


def test_site_system_tokens_store_only_into_their_own_tenant(trusting, idp):
    data = generated(patient_id="STOW-TOKEN", accession="STOWTOKEN", slices=1)[0]
    site_a, site_b = trusting.node("site-a").url, trusting.node("site-b").url
    system_a = {"Authorization": f"Bearer {idp.issue(sub='pacs-a', role='system', org='org-a')}"}
    clinician = {"Authorization": f"Bearer {idp.issue(sub='dr', role='clinician', org='org-a')}"}

    user = post(site_a, [(DICOM, data)], headers=clinician)
    assert user.status_code == 403
    assert "user tokens are not accepted" in user.json()["error"]["message"]
    assert post(site_b, [(DICOM, data)], headers=system_a).status_code == 403
    with node_store(trusting, "site-b") as store:
        assert store.instances("tenant-b") == []

    assert post(site_a, [(DICOM, data)], headers=system_a).status_code == 200
    system_b = {"Authorization": f"Bearer {idp.issue(sub='pacs-b', role='system', org='org-b')}"}
    assert post(site_b, [(DICOM, data)], headers=system_b).status_code == 200


# -- streaming --------------------------------------------------------------------------
def test_a_64_mib_upload_streams_without_being_held_in_memory(federation, site_a, key):
    instances = generated(patient_id="STOW-BIG", accession="STOWBIG", slices=8, size=2048)
    total = sum(len(d) for d in instances)
    assert total >= 64 * MiB
    boundary = uuid.uuid4().hex

    def chunks() -> Iterator[bytes]:  # sent with chunked transfer encoding
        for data in instances:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            for offset in range(0, len(data), MiB):
                yield data[offset : offset + MiB]
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    process = federation.node("site-a").process
    assert process is not None
    pid = process.pid
    rss_before, _ = peak_rss_kib(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    response = httpx.post(
        f"{site_a}/dicomweb/studies",
        content=chunks(),
        headers={
            "X-API-Key": key,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
        timeout=300,
    )
    _, peak = peak_rss_kib(pid)

    assert response.status_code == 200, response.text
    assert len(referenced(response.json())) == 8
    growth_mib = (peak - rss_before) / 1024
    print(f"STOW-RS {total / MiB:.0f} MiB: node peak RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.1f} MiB for a {total} byte upload"


# -- our own failures ---------------------------------------------------------------------
def test_an_internal_error_fails_only_its_instance_and_is_logged_without_phi(
    tmp_path, caplog, monkeypatch
):
    """In-process, because a real node cannot be made to fail on demand."""
    settings = load_settings(
        data_dir=tmp_path, node_id="local", tenants={"t": {"organization": "org-t"}}
    )
    app = create_app(settings)
    services = app.state.services
    key = services.credentials.create_api_key("t")
    good, unlucky = generated(patient_id="STOW-BUG", accession="STOWBUG", slices=2)
    unlucky_sop = str(uids(unlucky).SOPInstanceUID)
    real_add = StoreBatch.add

    def flaky_add(batch: StoreBatch, source: Any, header: Any = None) -> Any:
        source.seek(0)
        if str(uids(source.read()).SOPInstanceUID) == unlucky_sop:
            raise RuntimeError(f"disk on fire while writing STOW-BUG {unlucky_sop}")
        return real_add(batch, source, header)

    monkeypatch.setattr(StoreBatch, "add", flaky_add)

    async def send(parts: Parts) -> httpx.Response:
        body, content_type = multipart(parts)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.post(
                "/dicomweb/studies",
                content=body,
                headers={"X-API-Key": key, "Content-Type": content_type},
            )

    mixed = anyio.run(send, [(DICOM, good), (DICOM, unlucky)])
    assert mixed.status_code == 202
    assert failed(mixed.json()) == [(unlucky_sop, 0x0110, "internal error storing this instance")]
    only_unlucky = anyio.run(send, [(DICOM, unlucky)])
    assert only_unlucky.status_code == 500  # our fault, not a conflict in the data
    assert failed(only_unlucky.json())[0][1] == 0x0110
    services.close()

    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [getattr(r, "error", None) for r in errors] == ["RuntimeError", "RuntimeError"]
    assert "_store_part" in getattr(errors[0], "at", "")
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "STOW-BUG" not in logged
    assert unlucky_sop not in logged
