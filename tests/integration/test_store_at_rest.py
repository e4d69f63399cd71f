"""Nothing identifying is written in clear under a node's data directory."""

from __future__ import annotations

import httpx
import pydicom
import pytest

from exchange.dicom.samples import StudySpec, write_study

pytestmark = pytest.mark.integration

SPEC = StudySpec(
    patient_id="ATREST-MRN-55501",
    patient_name="Zyxwvutsky^Atrestia",
    accession="ATREST-ACC-9",
    description="At rest check",
    slices=3,
    size=32,
)


def test_no_identifier_is_stored_in_clear(federation, tmp_path):
    paths = write_study(SPEC, tmp_path / "study")
    federation.import_into("site-a", tmp_path / "study")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    study = headers[0].StudyInstanceUID
    secrets = {
        SPEC.patient_id,
        "Zyxwvutsky",
        SPEC.accession,
        study,
        headers[0].SeriesInstanceUID,
        *(h.SOPInstanceUID for h in headers),
    }

    # Use the node as a viewer would first, so anything it caches or spills is on disk too.
    node = federation.node("site-a").url
    found = httpx.get(
        f"{node}/dicomweb/studies",
        params={"PatientID": SPEC.patient_id},
        headers={"X-API-Key": federation.api_key("site-a")},
    )
    assert [r["0020000D"]["Value"][0] for r in found.json()] == [study]
    grant = {"Authorization": f"Bearer {federation.grant('site-a', study, 'export')}"}
    for suffix in ("", "/metadata", "/rendered"):
        assert httpx.get(f"{node}/dicomweb/studies/{study}{suffix}", headers=grant).is_success

    data_dir = federation.node("site-a").data_dir
    files = [
        p
        for p in data_dir.rglob("*")
        if p.is_file() and "quarantine" not in p.relative_to(data_dir).parts
    ]
    assert any(p.suffix == ".enc" for p in files)
    if federation.database_url("site-a").startswith("sqlite"):
        assert any(p.name == "exchange.db" for p in files)
    leaks = [
        (str(p.relative_to(data_dir)), secret)
        for p in files
        for secret in secrets
        if secret.encode() in p.read_bytes()
    ]
    assert leaks == []
