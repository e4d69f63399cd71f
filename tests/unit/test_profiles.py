"""Validation: R4B structure plus our profiles in fhir_profiles/, every problem located."""

import copy
import json
from pathlib import Path

import pytest
from fhir.resources.R4B.structuredefinition import StructureDefinition
from fhir.resources.R4B.valueset import ValueSet

from exchange.errors import BadRequest, ConfigurationError, Unprocessable
from exchange.fhir import profiles, resources
from exchange.web.errors import operation_outcome

PROFILES = profiles.PROFILES_DIR
EXAMPLES = PROFILES / "examples"
CANONICAL = "https://exchange.example.org/fhir"
DCM = "http://dicom.nema.org/resources/ontology/DCM"

#: What each invalid example must be rejected for: exactly these (expression, code) pairs.
INVALID = {
    "invalid-imagingstudy-missing-subject.json": {("ImagingStudy.subject", "required")},
    "invalid-imagingstudy-identifier-system.json": {
        ("ImagingStudy.identifier[0].system", "invariant")
    },
    "invalid-imagingstudy-bad-date.json": {("ImagingStudy.started", "value")},
    "invalid-imagingstudy-modality-system.json": {
        ("ImagingStudy.series[1].modality.system", "code-invalid")
    },
    "invalid-imagingstudy-modality-code.json": {("ImagingStudy.modality[0].code", "code-invalid")},
    "invalid-imagingstudy-uid.json": {("ImagingStudy.series[0].instance[1].uid", "invariant")},
    "invalid-imagingstudy-many-problems.json": {
        ("ImagingStudy.status", "code-invalid"),
        ("ImagingStudy.identifier[0].value", "invariant"),
        ("ImagingStudy.modality[0].system", "code-invalid"),
        ("ImagingStudy.subject.reference", "value"),
        ("ImagingStudy.endpoint", "required"),
        ("ImagingStudy.series[0].uid", "invariant"),
        ("ImagingStudy.series[0].instance[0].sopClass.system", "value"),
    },
    "invalid-consent-period.json": {("Consent.provision.period", "invariant")},
    "invalid-consent-purpose.json": {("Consent.provision.purpose[0].code", "code-invalid")},
    "invalid-consent-nested-provision.json": {
        ("Consent", "invariant"),
        ("Consent.scope", "value"),
        ("Consent.provision.provision[0].type", "required"),
        ("Consent.provision.provision[0].purpose[1].system", "code-invalid"),
    },
    "invalid-auditevent-codes.json": {
        ("AuditEvent.type.code", "code-invalid"),
        ("AuditEvent.action", "code-invalid"),
        ("AuditEvent.outcome", "code-invalid"),
        ("AuditEvent.agent", "invariant"),
    },
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _example(name: str) -> dict:
    return _load(EXAMPLES / f"{name}-example.json")


def _problems(data: dict, resource_type: str | None = None) -> set[tuple[str | None, str]]:
    """(expression, code) of every issue; fails the test if ``data`` is accepted."""
    with pytest.raises(Unprocessable) as caught:
        resources.validate(resource_type or data["resourceType"], data)
    assert caught.value.status == 422
    assert caught.value.message.startswith(f"invalid {data['resourceType']}: ")
    return {(issue.expression, issue.code) for issue in caught.value.issues}


# -- the files in fhir_profiles/ -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(PROFILES.glob("StructureDefinition-*.json")), ids=lambda p: p.name
)
def test_structure_definitions_are_r4_constraints_on_their_base(path):
    sd = StructureDefinition.model_validate(_load(path))
    assert sd.fhirVersion == "4.0.1"
    assert sd.derivation == "constraint"
    assert sd.kind == "resource"
    assert sd.baseDefinition == f"http://hl7.org/fhir/StructureDefinition/{sd.type}"
    assert sd.url == f"{CANONICAL}/StructureDefinition/{sd.id}"
    assert path.name == f"StructureDefinition-{sd.id}.json"
    for element in sd.differential.element:
        assert element.id == element.path
        assert element.path.split(".")[0] == sd.type
        if element.binding is not None:
            assert element.binding.valueSet.startswith(f"{CANONICAL}/ValueSet/")


@pytest.mark.parametrize("path", sorted(PROFILES.glob("ValueSet-*.json")), ids=lambda p: p.name)
def test_value_sets_are_r4_value_sets(path):
    vs = ValueSet.model_validate(_load(path))
    assert vs.url == f"{CANONICAL}/ValueSet/{vs.id}"
    assert all(include.concept for include in vs.compose.include)


def test_profiles_cover_the_three_resource_types_and_load():
    loaded = profiles.load()
    assert set(loaded.by_type) == {"ImagingStudy", "Consent", "AuditEvent"}
    modality = loaded.value_sets[f"{CANONICAL}/ValueSet/dicom-modality"]
    assert {"CT", "MR", "US", "SEG", "RTSTRUCT", "SM"} <= set(modality.codes[DCM])


@pytest.mark.parametrize(
    "path",
    sorted(p for p in EXAMPLES.glob("*.json") if not p.name.startswith("invalid-")),
    ids=lambda p: p.name,
)
def test_valid_examples_validate(path):
    data = _load(path)
    resources.validate(data["resourceType"], data)
    assert profiles.validate_profile(data["resourceType"], data) == []


def test_every_invalid_example_has_an_expectation():
    assert {p.name for p in EXAMPLES.glob("invalid-*.json")} == set(INVALID)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_examples_are_rejected_precisely(name):
    assert _problems(_load(EXAMPLES / name)) == INVALID[name]


# -- precise cases ------------------------------------------------------------------------------


def test_missing_subject():
    study = _example("imagingstudy")
    del study["subject"]
    assert _problems(study) == {("ImagingStudy.subject", "required")}


def test_subject_by_mrn_identifier_is_enough_but_display_alone_is_not():
    study = _example("imagingstudy")
    assert study["subject"]["identifier"]  # how nodes publish: the site's MRN
    resources.validate("ImagingStudy", study)
    study["subject"] = {"display": "Someone"}
    assert _problems(study) == {("ImagingStudy.subject", "required")}


def test_wrong_identifier_system():
    study = _example("imagingstudy")
    study["identifier"][0]["system"] = "urn:ietf:rfc:3986"
    assert _problems(study) == {("ImagingStudy.identifier[0].system", "invariant")}


def test_no_study_uid_identifier_at_all():
    study = _example("imagingstudy")
    study["identifier"] = study["identifier"][1:]  # only the accession number is left
    assert _problems(study) == {("ImagingStudy.identifier", "invariant")}


def test_two_study_uids():
    study = _example("imagingstudy")
    study["identifier"].append({"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"})
    assert _problems(study) == {("ImagingStudy.identifier[2].system", "invariant")}


@pytest.mark.parametrize(
    "started",
    ["2026-13-45", "2026-02-30", "2026-02-30T10:00:00Z", "2026-03-10T12:00:00", "10/03/2026", ""],
)
def test_bad_dates(started):
    study = _example("imagingstudy")
    study["started"] = started
    assert _problems(study) == {("ImagingStudy.started", "value")}


@pytest.mark.parametrize("started", ["2026", "2026-03", "2026-03-10", "2026-03-10T12:00:00.5Z"])
def test_partial_and_precise_dates_are_fine(started):
    study = _example("imagingstudy")
    study["started"] = started
    resources.validate("ImagingStudy", study)


def test_unknown_modality_system():
    study = _example("imagingstudy")
    study["series"][1]["modality"]["system"] = "http://snomed.info/sct"
    problems = _problems(study)
    assert problems == {("ImagingStudy.series[1].modality.system", "code-invalid")}


def test_unknown_modality_code():
    study = _example("imagingstudy")
    study["series"][0]["modality"]["code"] = "XRAY"
    assert _problems(study) == {("ImagingStudy.series[0].modality.code", "code-invalid")}


@pytest.mark.parametrize(
    ("uid", "code"),
    [
        ("1.2.x", "invariant"),
        ("1..2", "invariant"),
        (".1.2", "invariant"),
        ("1.2.", "invariant"),
        ("1." + "2" * 63, "invariant"),
        # R4B already refuses these as FHIR ``id`` values
        ("urn:oid:1.2.3", "value"),
        (" 1.2", "value"),
        (12, "structure"),
    ],
)
def test_invalid_series_uid(uid, code):
    study = _example("imagingstudy")
    study["series"][0]["uid"] = uid
    assert _problems(study) == {("ImagingStudy.series[0].uid", code)}


def test_sop_class_must_be_an_oid_urn():
    study = _example("imagingstudy")
    study["series"][0]["instance"][0]["sopClass"]["code"] = "1.2.840.10008.5.1.4.1.1.2"
    assert _problems(study) == {("ImagingStudy.series[0].instance[0].sopClass.code", "invariant")}


def test_endpoint_must_be_a_reference_to_an_endpoint():
    study = _example("imagingstudy")
    study["endpoint"] = [{"reference": "Endpoint/site-a"}, {"reference": "Patient/p1"}]
    assert _problems(study) == {("ImagingStudy.endpoint[1].reference", "value")}
    study["endpoint"] = [{"display": "somewhere"}]
    assert ("ImagingStudy.endpoint[0].reference", "required") in _problems(study)


def test_consent_period_end_before_start():
    consent = _example("consent")
    consent["provision"]["period"] = {
        "start": "2026-04-01T10:00:00Z",
        "end": "2026-04-01T09:00:00Z",
    }
    problems = _problems(consent)
    assert problems == {("Consent.provision.period", "invariant")}


@pytest.mark.parametrize(
    ("start", "end"),
    [("2026-04", "2026-04-15"), ("2026-04-01", "2026-04-01"), ("2026", "2026-01-01T00:00:00Z")],
)
def test_consent_period_of_overlapping_precision_is_fine(start, end):
    consent = _example("consent")
    consent["provision"]["period"] = {"start": start, "end": end}
    resources.validate("Consent", consent)


def test_consent_unknown_purpose_code():
    consent = _example("consent")
    consent["provision"]["purpose"][0]["code"] = "SHOPPING"
    assert _problems(consent) == {("Consent.provision.purpose[0].code", "code-invalid")}


def test_consent_rules_hold_in_nested_provisions():
    consent = _example("consent")
    nested = consent["provision"]["provision"][0]
    nested["provision"] = [{"type": "maybe", "period": {"start": "2027", "end": "2026"}}]
    assert _problems(consent) == {
        ("Consent.provision.provision[0].provision[0].type", "code-invalid"),
        ("Consent.provision.provision[0].provision[0].period", "invariant"),
    }


def test_consent_category_needs_one_known_coding():
    consent = _example("consent")
    consent["category"][0]["coding"].append({"system": "urn:local", "code": "x"})
    resources.validate("Consent", consent)  # one coding from the value set is enough
    consent["category"] = [{"text": "a consent"}]
    assert _problems(consent) == {("Consent.category[0]", "code-invalid")}


def test_audit_event_missing_everything_is_reported_at_once():
    problems = _problems({"resourceType": "AuditEvent"})
    expected = {"type", "action", "recorded", "outcome", "agent", "source", "entity"}
    assert problems == {(f"AuditEvent.{name}", "required") for name in expected}


def test_multiple_problems_at_once_from_structure_and_profile():
    study = _example("imagingstudy")
    del study["subject"]
    study["started"] = "2026-13-45"
    study["color"] = "blue"
    study["series"][1]["modality"]["system"] = "urn:local"
    study["series"][0]["instance"][1]["uid"] = "1.2.x"
    assert _problems(study) == {
        ("ImagingStudy.subject", "required"),
        ("ImagingStudy.started", "value"),
        ("ImagingStudy.color", "structure"),
        ("ImagingStudy.series[1].modality.system", "code-invalid"),
        ("ImagingStudy.series[0].instance[1].uid", "invariant"),
    }


def test_base_required_codes_that_r4b_ignores_are_checked_everywhere():
    assert _problems({"resourceType": "Patient", "gender": "x"}) == {
        ("Patient.gender", "code-invalid")
    }


def test_unknown_contained_resource_is_a_422_not_a_crash():
    patient = {"resourceType": "Patient", "contained": [{"resourceType": "Nope"}, {}]}
    assert _problems(patient) == {
        ("Patient.contained[0].resourceType", "structure"),
        ("Patient.contained[1].resourceType", "structure"),
    }


def test_wrong_resource_type_is_400():
    with pytest.raises(BadRequest) as caught:
        resources.validate("ImagingStudy", _example("consent"))
    assert caught.value.status == 400


@pytest.mark.parametrize("body", [b'{"resourceType": "Imag', b"\xff\xfe", b"[]", b'"x"'])
def test_not_json_or_not_an_object_is_400(body):
    with pytest.raises(BadRequest):
        resources.parse_json(body)


def test_issues_render_one_operation_outcome_issue_each():
    study = _example("imagingstudy")
    study["modality"][0]["code"] = "XRAY"
    study["series"][0]["uid"] = "x"
    with pytest.raises(Unprocessable) as caught:
        resources.validate("ImagingStudy", study)
    outcome = operation_outcome(caught.value.message, "processing", issues=caught.value.issues)
    assert [issue["expression"] for issue in outcome["issue"]] == [
        ["ImagingStudy.modality[0].code"],
        ["ImagingStudy.series[0].uid"],
    ]
    assert all(issue["severity"] == "error" for issue in outcome["issue"])
    assert "XRAY" in outcome["issue"][0]["diagnostics"]


# -- resources the demo writes, and the endpoint check the hub makes ---------------------------

DEMO_ENDPOINT = {
    "resourceType": "Endpoint",
    "id": "site-a",
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "managingOrganization": {"reference": "Organization/site-a"},
    "payloadType": [{"text": "DICOM"}],
    "payloadMimeType": ["application/dicom"],
    "address": "http://127.0.0.1:8001/dicomweb",
}


def test_the_demo_organization_and_endpoint_still_validate():
    resources.validate("Endpoint", DEMO_ENDPOINT)
    for organization in (
        {"resourceType": "Organization", "id": "hie", "active": True, "name": "Demo HIE"},
        {
            "resourceType": "Organization",
            "id": "site-a",
            "active": True,
            "identifier": [{"system": "urn:exchange:organization", "value": "site-a"}],
            "name": "Demo imaging site A",
            "partOf": {"reference": "Organization/hie"},
        },
    ):
        resources.validate("Organization", organization)


def test_endpoint_is_wado_rs():
    assert profiles.endpoint_is_wado_rs(DEMO_ENDPOINT) == []
    fhir_rest = copy.deepcopy(DEMO_ENDPOINT)
    fhir_rest["connectionType"]["code"] = "hl7-fhir-rest"
    del fhir_rest["address"]
    issues = profiles.endpoint_is_wado_rs(fhir_rest, referenced_from="ImagingStudy.endpoint[0]")
    assert [(i.expression, i.code) for i in issues] == [
        ("ImagingStudy.endpoint[0].resolve().connectionType", "value"),
        ("ImagingStudy.endpoint[0].resolve().address", "required"),
    ]
    assert [i.expression for i in profiles.endpoint_is_wado_rs({"resourceType": "Patient"})] == [
        "Endpoint"
    ]


# -- the profiles say nothing the validator does not enforce ------------------------------------


def _profiles_dir(tmp_path: Path, change) -> Path:
    for path in PROFILES.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    sd_path = tmp_path / "StructureDefinition-exchange-imagingstudy.json"
    sd = _load(sd_path)
    change(sd["differential"]["element"])
    sd_path.write_text(json.dumps(sd))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda elements: elements[1].update(maxLength=64), "maxLength"),
        (lambda elements: elements[0]["constraint"][0].update(key="exch-new"), "exch-new"),
        (lambda elements: elements[1].update(sliceName="uid"), "sliceName"),
        (
            lambda elements: elements[3]["binding"].update(valueSet=f"{CANONICAL}/ValueSet/nope"),
            "ValueSet/nope",
        ),
    ],
)
def test_a_rule_the_validator_cannot_enforce_refuses_to_load(tmp_path, change, complaint):
    with pytest.raises(ConfigurationError, match=complaint):
        profiles.load(_profiles_dir(tmp_path, change))


def test_missing_profiles_directory_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        profiles.load(tmp_path / "nowhere")


def test_absurdly_nested_json_is_a_clear_400():
    from exchange.errors import BadRequest
    from exchange.fhir.resources import parse_json

    with pytest.raises(BadRequest, match="nests too deeply"):
        parse_json(b"[" * 200_000 + b"]" * 200_000)
