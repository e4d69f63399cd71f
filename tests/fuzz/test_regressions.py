"""Every defect the fuzzers found, each pinned by its own test (issue 11).

Each docstring names the defect as it was before the fix; the test asserts the fixed
behaviour: a declared refusal (4xx, ``InvalidInstance``, ``ConfigurationError``,
``NotAuthenticated``) instead of a crash, or the right answer instead of a wrong one.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import jwt
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.uid import DeflatedExplicitVRLittleEndian

from exchange.database import make_engine
from exchange.dicom.part10 import (
    MAX_INFLATED_BYTES,
    REASON_TOO_LARGE,
    ZERO_PREAMBLE,
    InvalidInstance,
    read_header,
)
from exchange.dicom.samples import StudySpec, study
from exchange.errors import ConfigurationError, NotAuthenticated
from exchange.fhir import searchparams
from exchange.node import query
from exchange.node.importer import collect, import_files
from exchange.node.store import InstanceStore
from exchange.security.keys import SigningKey, load_or_create
from exchange.security.keystore import FileKeyStore, master_key
from exchange.security.tokens import JwtValidator, now, static_resolver
from exchange.web.errors import operation_outcome
from tests.dicomdata import generated
from tests.fuzz.hub import Hub, running_hub

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TENANT = "t-reg"
ISSUER = "https://idp.reg.test"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstanceStore]:
    root: Path = tmp_path_factory.mktemp("regressions-store")
    engine = make_engine(f"sqlite:///{root / 'node.db'}")
    keys = FileKeyStore(root / "keys", master_key(None, root / "master.key"), [TENANT])
    yield InstanceStore(engine, root / "blobs", keys, max_instance_bytes=64 * 1024 * 1024)
    engine.dispose()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with running_hub(tmp_path_factory.mktemp("regressions-hub")) as running:
        yield running


# -- DICOMDIR import ---------------------------------------------------------------------


def _media(root: Path, reference: object) -> Path:
    """A folder with a DICOMDIR whose first image record references ``reference``."""
    media = root / "media"
    files = FileSet()
    for ds in study(StudySpec("REG-DIR", "Reg^Dir", "RGD", slices=2, size=8)):
        files.add(ds)
    files.write(media)
    path = media / "DICOMDIR"
    ds = pydicom.dcmread(path)
    next(
        r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r
    ).ReferencedFileID = reference
    ds.save_as(path)
    return media


def _import(store: InstanceStore, media: Path) -> tuple[int, int, int]:
    files = collect(media / "DICOMDIR")
    report = import_files(store, TENANT, files, media.parent / "quarantine")
    for view in store.instances(TENANT):
        store.delete_study(TENANT, view.study_uid)
    return report.total, report.counts["stored"], report.counts["rejected"]


def test_dicomdir_referencing_a_directory_rejects_that_entry(
    store: InstanceStore, tmp_path: Path
) -> None:
    """Defect: a DICOMDIR record naming a directory crashed ``exchange import`` with
    IsADirectoryError while the rejected entry was being copied to quarantine."""
    media = _media(tmp_path, ["PT000000"])
    assert _import(store, media) == (2, 1, 1)
    reasons = list((tmp_path / "quarantine").glob("*.reason.txt"))
    assert len(reasons) == 1


def test_dicomdir_reference_with_an_overlong_name_rejects_that_entry(
    store: InstanceStore, tmp_path: Path
) -> None:
    """Defect: a referenced file name longer than the file system allows crashed the
    import with OSError (ENAMETOOLONG) in the quarantine step."""
    media = _media(tmp_path, ["A" * 255, "B" * 255])
    assert _import(store, media) == (2, 1, 1)


def test_dicomdir_reference_with_a_nul_is_a_clear_error(tmp_path: Path) -> None:
    """Defect: a NUL byte in a Referenced File ID crashed the import's reader thread with
    ValueError ("embedded null byte"), a traceback from the CLI."""
    media = _media(tmp_path, ["IM\x00X"])
    with pytest.raises(ConfigurationError, match="invalid name"):
        collect(media / "DICOMDIR")


@pytest.mark.parametrize(
    "reference",
    [["..", "..", "etc", "hostname"], ["/etc", "hostname"], ["PT000000", "..", "..", "SECRET"]],
)
def test_dicomdir_cannot_reference_files_outside_its_folder(
    tmp_path: Path, reference: list[str]
) -> None:
    """Defect (path traversal): a DICOMDIR's Referenced File ID with ``..`` or an absolute
    component made the import read a file outside the media folder, and copy it into
    the quarantine folder when it was not DICOM."""
    (tmp_path / "SECRET").write_text("not for the import")
    media = _media(tmp_path, reference)
    with pytest.raises(ConfigurationError, match="outside its folder"):
        collect(media / "DICOMDIR")


# -- tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return load_or_create(tmp_path_factory.mktemp("regressions-key") / "key.pem")


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes: object) -> dict[str, object]:
    issued = now()
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": "exchange",
        "sub": "dr-reg",
        "iat": issued,
        "exp": issued + 300,
        "role": "clinician",
        "org": "org-reg",
    }
    return claims | changes


def test_token_with_an_allowed_algorithm_of_another_key_type_is_refused(key: SigningKey) -> None:
    """Defect: a token whose header says ES256 (allowed) for an issuer with an RSA key made
    PyJWT raise TypeError ("Expecting a PEM-formatted key"): a 500 for anyone on the net."""
    validator = JwtValidator({ISSUER: static_resolver(key.private.public_key())}, "exchange")
    header = _b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": key.kid}).encode())
    token = f"{header}.{_b64(json.dumps(_claims()).encode())}.{_b64(b'x' * 64)}"
    with pytest.raises(NotAuthenticated, match="does not fit"):
        validator.validate(token)


def test_token_with_an_allowed_algorithm_of_another_key_type_is_401_at_the_hub(hub: Hub) -> None:
    """The same defect, seen by a client of the hub: 401 with WWW-Authenticate, not 500."""
    assert hub.services.idp is not None
    issued = hub.services.idp.issue(sub="dr-reg", role="clinician", org="org-a")
    _, payload, _ = issued.split(".")
    header = _b64(
        json.dumps(
            {"alg": "ES256", "typ": "JWT", "kid": jwt.get_unverified_header(issued)["kid"]}
        ).encode()
    )
    response = hub.client.get(
        "/fhir/ImagingStudy",
        headers={"Authorization": f"Bearer {header}.{payload}.{_b64(b'x' * 64)}"},
    )
    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


@pytest.mark.parametrize(
    "changes",
    [
        {"purpose_of_use": 5},
        {"purpose_of_use": [["TREAT"]]},
        {"org": ["org-a", "org-b"]},
        {"patient": {"id": "p1"}},
        {"scope": ["user/*.cruds"]},
        {"fhirUser": 7},
    ],
)
def test_signed_token_with_mistyped_claims_is_refused(
    key: SigningKey, changes: dict[str, object]
) -> None:
    """Defect: a token signed by a trusted issuer with ``purpose_of_use`` a number crashed
    with TypeError (500); with ``org``, ``patient``, ``fhirUser`` or ``jti`` of another type
    than text, the mistyped value went on into policy inputs and audit records (PyJWT itself
    refuses a ``jti`` that is not text)."""
    validator = JwtValidator({ISSUER: static_resolver(key.private.public_key())}, "exchange")
    token = jwt.encode(_claims(**changes), key.private, algorithm="RS256")
    with pytest.raises(NotAuthenticated, match="expected types"):
        validator.validate(token)


# -- FHIR ----------------------------------------------------------------------------------


def test_outcome_with_a_form_feed_in_a_parameter_name_renders() -> None:
    """Defect: an OperationOutcome echoing a client's parameter name that held a form feed
    (or another whitespace FHIR strings forbid) failed its own validation: a 500."""
    from exchange.errors import Issue

    outcome = operation_outcome("bad", "invalid", issues=[Issue("unknown '\\x0c'", "\x0c\x0b")])
    assert outcome["issue"][0]["expression"] == ["  "]


@pytest.mark.parametrize("where", ["query", "if-none-exist"])
def test_search_parameter_with_a_form_feed_is_a_400(hub: Hub, where: str) -> None:
    """The same defect over HTTP: ``GET /fhir/Patient?%0C=1`` or a conditional create with
    ``If-None-Exist: \\x0c`` answered 500 instead of 400."""
    headers = {"Authorization": f"Bearer {hub.operator}"}
    if where == "query":
        response = hub.client.get("/fhir/Patient?%0C=1", headers=headers)
    else:
        body = {"resourceType": "Patient", "name": [{"family": "Reg"}]}
        response = hub.client.post(
            "/fhir/Patient", json=body, headers={**headers, "If-None-Exist": "\x0c"}
        )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("text", "end"),
    [
        ("9999", searchparams.MAX_MS),
        ("9999-12", searchparams.MAX_MS),
        ("9999-12-31", searchparams.MAX_MS),
        ("9999-12-31T23:59", searchparams.MAX_MS),
        ("9999-12-31T23:59:59.999Z", searchparams.MAX_MS),
    ],
)
def test_dates_at_the_end_of_year_9999_parse(text: str, end: int) -> None:
    """Defect: the end of a date's range past 9999-12-31 raised OverflowError, which the
    search parser (catching ValueError) let through: ``?birthdate=9999-12-31`` was a 500."""
    start, stop = searchparams.parse_date(text)
    assert start < stop == end


def test_resource_with_a_date_at_the_end_of_year_9999_is_stored(hub: Hub) -> None:
    """The same defect on writes: indexing ``birthDate: 9999-12-31`` raised OverflowError,
    so creating such a Patient was a 500 (nothing is wrong with the resource)."""
    headers = {"Authorization": f"Bearer {hub.operator}"}
    body = {"resourceType": "Patient", "name": [{"family": "Reg"}], "birthDate": "9999-12-31"}
    created = hub.client.post("/fhir/Patient", json=body, headers=headers)
    assert created.status_code == 201, created.text
    found = hub.client.get("/fhir/Patient?birthdate=9999-12-31", headers=headers)
    assert found.status_code == 200
    assert created.json()["id"] in {e["resource"]["id"] for e in found.json()["entry"]}


def test_history_offset_beyond_64_bits_is_an_empty_page(hub: Hub) -> None:
    """Defect: ``_history?_offset=9223372036854775808`` (2**63) reached SQLite as OFFSET and
    raised OverflowError: a 500."""
    headers = {"Authorization": f"Bearer {hub.operator}"}
    body = {"resourceType": "Organization", "name": "Reg"}
    assert hub.client.put("/fhir/Organization/reg-1", json=body, headers=headers).status_code in (
        200,
        201,
    )
    response = hub.client.get(
        "/fhir/Organization/reg-1/_history?_offset=9223372036854775808", headers=headers
    )
    assert response.status_code == 200
    assert not response.json().get("entry")


# -- DICOMweb ------------------------------------------------------------------------------


def test_node_qido_offset_beyond_64_bits_is_an_empty_page(store: InstanceStore) -> None:
    """Defect: a QIDO-RS ``offset`` of 2**63 or more reached SQLite and raised OverflowError:
    a 500 from the node's search at every level."""
    for data in generated(patient_id="REG-Q", accession="REGQ", slices=1, size=8):
        store.store(TENANT, io.BytesIO(data))
    runner = query.CatalogSearch(store._engine, store, "http://node.test")
    try:
        for level in query.Level:
            search = query.parse(level, [("offset", str(2**63)), ("limit", "5")])
            assert runner.run(search, query.Scope(TENANT)).results == []
    finally:
        for view in store.instances(TENANT):
            store.delete_study(TENANT, view.study_uid)


# -- DICOM intake --------------------------------------------------------------------------


def _deflated(size: int) -> bytes:
    ds = study(StudySpec("REG-DFL", "Reg^Dfl", "RGF", slices=1, size=size))[0]
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_deflated_instance_with_large_pixel_data_is_accepted(store: InstanceStore) -> None:
    """Defect (a wrong refusal, found from the corpus): in a deflated instance the offsets
    pydicom records point into its inflated copy, so Pixel Data over 64 KiB was refused as
    "declares N bytes but the file ends before them"."""
    data = _deflated(256)
    header = read_header(io.BytesIO(data))
    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    result = store.store(TENANT, io.BytesIO(data))
    try:
        out = io.BytesIO()
        store.copy_out(TENANT, result.sop_uid, out)
        assert out.getvalue() == ZERO_PREAMBLE + data[128:]
    finally:
        store.delete_study(TENANT, result.study_uid)


def _deflate_bomb(inflated: int, meta_padding: int = 0) -> bytes:
    """A deflated instance whose data set inflates to ``inflated`` bytes (mostly zeros);
    ``meta_padding`` bytes more in the File Meta (to push the syntax UID further away)."""
    good = _deflated(8)
    ds = pydicom.dcmread(io.BytesIO(good))
    meta = io.BytesIO()
    if meta_padding:
        ds.file_meta.FileMetaInformationVersion = b"\x00\x01" + bytes(meta_padding)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    plain = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    del ds.PixelData
    ds.save_as(plain, enforce_file_format=True)
    body = plain.getvalue()[128 + 4 + len(meta.getvalue()) :]
    filler = inflated - len(body) - 12
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body + struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, filler))]
    zeros = bytes(1024 * 1024)
    for _ in range(filler // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.compress(bytes(filler % len(zeros))) + packer.flush())
    return bytes(128) + b"DICM" + meta.getvalue() + b"".join(parts)


@pytest.mark.parametrize("meta_padding", [0, 70_000])
def test_deflate_bomb_is_refused_before_it_is_inflated(meta_padding: int) -> None:
    """Defect (memory exhaustion): pydicom inflates a deflated data set whole in memory, so a
    small upload could make the node allocate gigabytes; it is now refused, as too large,
    after counting its inflated size chunk by chunk."""
    bomb = _deflate_bomb(MAX_INFLATED_BYTES + 1024 * 1024, meta_padding)
    assert len(bomb) < MAX_INFLATED_BYTES // 500
    with pytest.raises(InvalidInstance) as refused:
        read_header(io.BytesIO(bomb))
    assert refused.value.reason == REASON_TOO_LARGE


def _unknown_vr_in_file_meta() -> bytes:
    data = bytearray((Path(__file__).parent / "corpus" / "dicom" / "ct-8x8.dcm").read_bytes())
    at = data.find(b"\x02\x00\x03\x00UI")  # (0002,0003) Media Storage SOP Instance UID
    data[at + 4 : at + 6] = b"AI"
    return bytes(data)


def test_unknown_vr_in_the_file_meta_is_refused() -> None:
    """Defect: a File Meta element with an unknown VR parsed (pydicom converts it lazily)
    and then raised NotImplementedError when the Media Storage SOP Instance UID was read:
    out of ``read_header``, past STOW-RS's per-part handling (a 500 for the whole request)
    and past ``exchange import``'s (a traceback)."""
    with pytest.raises(InvalidInstance, match="File Meta Information cannot be decoded"):
        read_header(io.BytesIO(_unknown_vr_in_file_meta()))


def test_unknown_vr_in_the_file_meta_fails_only_its_stow_part(tmp_path: Path) -> None:
    """The same defect at the node's STOW-RS: the bad part fails alone (202), the good one
    is stored."""
    from fastapi.testclient import TestClient

    from exchange.config import load_settings
    from exchange.node.app import create_app

    settings = load_settings(
        data_dir=tmp_path, node_id="node-reg", tenants={TENANT: {"organization": "org-reg"}}
    )
    app = create_app(settings)
    good = generated(patient_id="REG-S", accession="REGS", slices=1, size=8)[0]
    body = b""
    for part in (_unknown_vr_in_file_meta(), good):
        body += b"--reg\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    body += b"--reg--"
    with TestClient(app, raise_server_exceptions=False) as client:
        key = app.state.services.credentials.create_api_key(TENANT)
        response = client.post(
            "/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=reg',
                "X-API-Key": key,
            },
        )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert len(answer["00081198"]["Value"]) == 1
    assert len(answer["00081199"]["Value"]) == 1


def test_patient_whose_given_names_include_null_is_stored_and_matched(hub: Hub) -> None:
    """Defect: FHIR JSON may carry ``null`` in ``name.given`` (a part with only a ``_given``
    extension); the master patient index joined the parts and raised TypeError, so the
    write was stored but answered 500. Found by the long FHIR-write fuzzing run."""
    body = {
        "resourceType": "Patient",
        "name": [{"family": "Regression", "given": [None, "Ada"]}],
        "_name": None,
        "birthDate": "1970-01-01",
        "gender": "female",
    }
    body.pop("_name")
    headers = {"Authorization": f"Bearer {hub.operator}", "Content-Type": "application/fhir+json"}
    first = hub.client.post("/fhir/Patient", content=json.dumps(body), headers=headers)
    assert first.status_code == 201, first.text
    # A second one with the same name, birth date and gender goes through the matching path.
    second = hub.client.post("/fhir/Patient", content=json.dumps(body), headers=headers)
    assert second.status_code == 201, second.text
