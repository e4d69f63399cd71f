"""The ImagingStudy a node builds is valid under the hub's profile."""

import io

import pydicom
import pytest

from exchange.dicom.imagingstudy import build, started
from exchange.fhir.resources import validate
from exchange.node.catalog import dicom_json
from tests.dicomdata import bundled, generated


def _attributes(data: bytes):
    return dicom_json(pydicom.dcmread(io.BytesIO(data)))


def test_generated_series_builds_a_profile_valid_study():
    instances = [_attributes(d) for d in generated(patient_id="MRN-7", accession="ACC7", slices=3)]
    study = build(
        reversed(instances),
        endpoint="Endpoint/site-a",
        mrn_system="urn:exchange:site-a:mrn",
        accession_system="urn:exchange:site-a:acc",
        utc_offset="+01:00",
    )
    validate("ImagingStudy", study)  # raises with every problem if not valid
    assert study["identifier"][0]["value"].startswith("urn:oid:1.2.826.0.1.3680043.10.1386.")
    assert study["subject"]["identifier"] == {"system": "urn:exchange:site-a:mrn", "value": "MRN-7"}
    assert study["numberOfInstances"] == 3
    assert [i["number"] for i in study["series"][0]["instance"]] == [1, 2, 3]
    assert study["modality"] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    ]
    assert study["started"] == "2026-01-01T12:00:00+01:00"


def test_bundled_file_builds_a_profile_valid_study():
    study = build(
        [dicom_json(pydicom.dcmread(bundled("MR_small.dcm")))],
        endpoint="Endpoint/site-b",
        mrn_system="urn:exchange:site-b:mrn",
    )
    validate("ImagingStudy", study)
    assert study["modality"][0]["code"] == "MR"


@pytest.mark.parametrize(
    ("date", "time", "offset", "expected"),
    [
        ("20260310", "121530.123", "+01:00", "2026-03-10T12:15:30+01:00"),
        ("20260310", "1215", "Z", "2026-03-10T12:15:00Z"),
        ("20260310", "121530", None, "2026-03-10"),
        ("20260310", None, "+01:00", "2026-03-10"),
        ("2026", None, None, None),
        (None, None, None, None),
    ],
)
def test_started_never_guesses_a_timezone(date, time, offset, expected):
    assert started(date, time, offset) == expected


def test_no_instances_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        build([], endpoint="Endpoint/x", mrn_system="urn:x")
