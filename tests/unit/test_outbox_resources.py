"""What a node publishes is valid at the hub even when the DICOM is odd."""

from __future__ import annotations

import io

import pydicom
import pytest

from exchange.dicom.imagingstudy import build, modality_code, patient
from exchange.fhir.resources import validate
from exchange.node.catalog import dicom_json
from tests.dicomdata import generated


def _attributes(data: bytes, **changes: object) -> dict:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return dicom_json(ds)


def _study(**changes: object) -> dict:
    instances = [_attributes(d, **changes) for d in generated(slices=2)]
    study = build(
        instances,
        endpoint="Endpoint/site-a",
        mrn_system="urn:exchange:org-a:mrn",
        patient_reference="Patient/p1",
    )
    validate("ImagingStudy", study)
    return study


def test_subject_has_the_hub_patient_and_the_site_mrn():
    study = _study(PatientID="  T-1 ")
    assert study["subject"] == {
        "reference": "Patient/p1",
        "type": "Patient",
        "identifier": {"system": "urn:exchange:org-a:mrn", "value": "T-1"},
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_no_study_date_falls_back_to_the_series_date_and_none_at_all_is_an_error():
    assert _study(StudyDate=None, SeriesDate="20250102")["started"] == "2025-01-02"
    with pytest.raises(ValueError, match="StudyDate"):
        _study(StudyDate=None, SeriesDate=None)
    with pytest.raises(ValueError, match="StudyDate"):
        _study(StudyDate="20251340", SeriesDate=None)  # not a date


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_modalities_outside_the_profiles_value_set_become_ot():
    assert modality_code(" mr ") == "MR"
    assert modality_code("CD") == "OT"  # retired, not in the hub's value set
    assert modality_code(None) == "OT"
    study = _study(Modality="xyz")
    assert study["modality"][0]["code"] == "OT"


def test_patient_resource_from_the_dicom_header():
    body = patient(
        _attributes(generated()[0], PatientName="Doe^Jane^Q^Dr", PatientSex="F"),
        mrn_system="urn:exchange:org-a:mrn",
        organization="org-a",
    )
    validate("Patient", body)
    assert body["identifier"][0]["system"] == "urn:exchange:org-a:mrn"
    assert body["identifier"][0]["value"] == "T-1"
    assert body["managingOrganization"] == {"reference": "Organization/org-a"}
    assert body["name"] == [
        {"use": "official", "family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"]}
    ]
    assert body["gender"] == "female"
    assert body["birthDate"] == "1970-01-01"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_patient_without_name_or_valid_birth_date_is_still_valid():
    body = patient(
        _attributes(generated()[0], PatientName="", PatientSex="X", PatientBirthDate="1970"),
        mrn_system="urn:x",
        organization="org-a",
    )
    validate("Patient", body)
    assert "name" not in body
    assert "birthDate" not in body
    assert body["gender"] == "unknown"
