"""Search parameter parsing and index extraction: the rules a FHIR client relies on."""

from datetime import UTC, datetime

import pytest

from exchange.errors import BadRequest
from exchange.fhir import search
from exchange.fhir import searchparams as sp

BASE = "https://hub.example/fhir"


def ms(*parts: int) -> int:
    return sp.to_ms(datetime(*parts, tzinfo=UTC))


# -- dates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026", ms(2026, 1, 1), ms(2027, 1, 1)),
        ("2026-02", ms(2026, 2, 1), ms(2026, 3, 1)),
        ("2026-12", ms(2026, 12, 1), ms(2027, 1, 1)),
        ("2026-03-10", ms(2026, 3, 10), ms(2026, 3, 11)),
        ("2026-03-10T12:30", ms(2026, 3, 10, 12, 30), ms(2026, 3, 10, 12, 31)),
        ("2026-03-10T12:30:05Z", ms(2026, 3, 10, 12, 30, 5), ms(2026, 3, 10, 12, 30, 6)),
        (
            "2026-03-10T12:30:05.5Z",
            ms(2026, 3, 10, 12, 30, 5) + 500,
            ms(2026, 3, 10, 12, 30, 5) + 600,
        ),
        (
            "2026-03-10T12:30:05.123Z",
            ms(2026, 3, 10, 12, 30, 5) + 123,
            ms(2026, 3, 10, 12, 30, 5) + 124,
        ),
        ("2026-03-10T13:30:00+01:00", ms(2026, 3, 10, 12, 30), ms(2026, 3, 10, 12, 30, 1)),
        # an unencoded '+' in a URL arrives as a space
        ("2026-03-10T13:30:00 01:00", ms(2026, 3, 10, 12, 30), ms(2026, 3, 10, 12, 30, 1)),
    ],
)
def test_a_date_denotes_the_range_of_its_precision(text, start, end):
    assert sp.parse_date(text) == (start, end)


@pytest.mark.parametrize(
    "text", ["26", "2026-13", "2026-02-30", "2026-03-10T25:00", "yesterday", ""]
)
def test_invalid_dates_are_refused(text):
    with pytest.raises(ValueError, match="date"):
        sp.parse_date(text)


@pytest.mark.parametrize("prefix", sp.DATE_PREFIXES)
def test_every_date_prefix_is_understood(prefix):
    value = sp.parse_date_value(f"{prefix}2026-03-01")
    assert value.prefix == prefix
    assert (value.start, value.end) == (ms(2026, 3, 1), ms(2026, 3, 2))


def test_no_prefix_means_eq():
    assert sp.parse_date_value("2026").prefix == "eq"


def test_approximately_widens_by_a_tenth_of_the_distance_from_now():
    value = sp.parse_date_value("ap2016-03-10")
    now = ms(2026, 3, 10)
    low, high = sp.approximate(value, now)
    assert value.start - low == (now - value.start) // 10
    assert high - value.end == (now - value.start) // 10
    near = sp.parse_date_value("ap2026-03-10")
    low, high = sp.approximate(near, now)
    assert near.start - low == 86_400_000  # at least a day


# -- tokens, strings, references ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "system", "code"),
    [
        ("CT", None, "CT"),
        ("urn:dicom:uid|urn:oid:1.2.3", "urn:dicom:uid", "urn:oid:1.2.3"),
        ("|CT", "", "CT"),
        ("urn:mrn|", "urn:mrn", None),
        (r"urn:x|a\|b", "urn:x", "a|b"),
    ],
)
def test_token_forms(text, system, code):
    assert sp.parse_token(text) == sp.Token(system, code)


@pytest.mark.parametrize("text", ["", "|"])
def test_empty_tokens_are_refused(text):
    with pytest.raises(ValueError, match="token"):
        sp.parse_token(text)


def test_values_split_on_unescaped_commas_only():
    assert sp.split_values("a,b") == ["a", "b"]
    assert sp.split_values(r"Smith\, John,Doe") == ["Smith, John", "Doe"]
    assert sp.split_values(r"urn:x|a\|b") == [r"urn:x|a\|b"]  # left for the token parser


def test_strings_are_compared_without_case_or_accents():
    assert sp.normalise("  Müller-Lüdenscheidt  ÅSA ") == "muller-ludenscheidt asa"
    assert sp.normalise("Ǆ") == sp.normalise("dž")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", sp.RefValue(None, "123")),
        ("Patient/123", sp.RefValue("Patient", "123")),
        ("Patient/123/_history/4", sp.RefValue("Patient", "123")),
        (f"{BASE}/Patient/123", sp.RefValue("Patient", "123")),
        (
            "https://other.example/fhir/Patient/9",
            sp.RefValue("Patient", "https://other.example/fhir/Patient/9"),
        ),
    ],
)
def test_reference_values(text, expected):
    assert sp.parse_reference(text, BASE) == expected


# -- index extraction ------------------------------------------------------------------


def study(uid="1.2.3", patient="p1", endpoint="e1"):
    return {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": "2026-03-10T12:00:00Z",
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
        "endpoint": [{"reference": f"{BASE}/Endpoint/{endpoint}"}],
        "series": [
            {
                "uid": "1.2.3.1",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "MR",
                },
            }
        ],
    }


def test_imaging_study_index():
    entries = sp.extract_index("ImagingStudy", study(), BASE)
    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    assert ("identifier", "urn:dicom:uid", "urn:oid:1.2.3") in entries.tokens
    assert ("status", "http://hl7.org/fhir/imagingstudy-status", "available") in entries.tokens
    assert {("modality", dcm, "CT"), ("modality", dcm, "MR")} <= entries.tokens
    assert entries.refs == {
        ("patient", "Patient", "p1"),
        ("subject", "Patient", "p1"),
        ("endpoint", "Endpoint", "e1"),  # our own absolute URL, made relative
    }
    start = ms(2026, 3, 10, 12)
    assert entries.dates == {("started", start, start + 1000)}
    facts = sp.access_facts("ImagingStudy", entries)
    assert facts == {
        "endpoint": ["Endpoint/e1"],
        "identifier": ["urn:dicom:uid|urn:oid:1.2.3"],
        "patient": ["Patient/p1"],
        "started": ["2026-03-10"],  # the study's day, for consents' data periods
        "subject": ["Patient/p1"],
    }


def test_a_group_subject_is_not_a_patient():
    body = study()
    body["subject"] = {"reference": "Group/g1"}
    refs = sp.extract_index("ImagingStudy", body).refs
    assert refs >= {("subject", "Group", "g1")}
    assert not any(p == "patient" for p, _, _ in refs)


def test_a_logical_subject_is_searchable_by_identifier():
    body = study()
    body["subject"] = {"identifier": {"system": "urn:mrn:site-a", "value": "MRN-1"}}
    entries = sp.extract_index("ImagingStudy", body)
    assert ("patient:identifier", "urn:mrn:site-a", "MRN-1") in entries.tokens
    assert sp.access_facts("ImagingStudy", entries)["subject:identifier"] == [
        "urn:mrn:site-a|MRN-1"
    ]


def test_patient_index():
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": "A1"}],
        "name": [{"family": "Müller", "given": ["Jörg", "Karl"], "prefix": ["Dr"]}],
        "birthDate": "1970-05",
        "gender": "male",
        "link": [{"other": {"reference": "Patient/p2"}, "type": "seealso"}],
    }
    entries = sp.extract_index("Patient", patient)
    names = {(p, n) for p, n, _ in entries.strings}
    assert {("family", "muller"), ("given", "jorg"), ("given", "karl")} <= names
    assert {("name", "muller"), ("name", "jorg"), ("name", "dr")} <= names
    assert ("family", "muller", "Müller") in entries.strings  # the exact text is kept too
    assert entries.dates == {("birthdate", ms(1970, 5, 1), ms(1970, 6, 1))}
    assert ("gender", "http://hl7.org/fhir/administrative-gender", "male") in entries.tokens
    assert ("link", "Patient", "p2") in entries.refs


def test_consent_audit_endpoint_organization_index():
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
        "dateTime": "2026-01-02",
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "provision": {"actor": [{"reference": {"reference": "Organization/o1"}}]},
    }
    entries = sp.extract_index("Consent", consent)
    assert ("category", "http://loinc.org", "59284-0") in entries.tokens
    assert {("patient", "Patient", "p1"), ("actor", "Organization", "o1")} <= entries.refs

    audit = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110112"},
        "action": "E",
        "recorded": "2026-03-10T12:00:00.250Z",
        "outcome": "0",
        "agent": [{"who": {"reference": "Practitioner/dr"}, "requestor": True}],
        "source": {"observer": {"display": "hub"}},
        "entity": [
            {"what": {"reference": "Patient/p1"}},
            {"what": {"reference": "ImagingStudy/s1"}},
        ],
    }
    entries = sp.extract_index("AuditEvent", audit)
    assert ("action", "http://hl7.org/fhir/audit-event-action", "E") in entries.tokens
    assert ("outcome", "http://hl7.org/fhir/audit-event-outcome", "0") in entries.tokens
    assert {("patient", "Patient", "p1"), ("entity", "ImagingStudy", "s1")} <= entries.refs
    assert ("agent", "Practitioner", "dr") in entries.refs

    endpoint = {
        "resourceType": "Endpoint",
        "name": "WADO",
        "managingOrganization": {"reference": "Organization/o1"},
    }
    assert sp.extract_index("Endpoint", endpoint).refs == {("organization", "Organization", "o1")}
    org = {"resourceType": "Organization", "name": "Radiology One", "alias": ["R1"]}
    assert {n for _, n, _ in sp.extract_index("Organization", org).strings} == {
        "radiology one",
        "r1",
    }


def test_unparseable_values_are_left_out_not_fatal():
    body = study()
    body["started"] = "not a date"
    assert sp.extract_index("ImagingStudy", body).dates == set()


# -- request parsing ---------------------------------------------------------------------


def parse(rtype, *items, lenient=False):
    return search.parse(rtype, list(items), lenient=lenient, local_base=BASE)


def test_modifiers_and_or_values():
    query = parse(
        "Patient",
        ("name:exact", "Müller"),
        ("family:contains", "ll"),
        ("identifier", "urn:a|1,urn:b|2"),
        ("gender:not", "male"),
        ("birthdate:missing", "true"),
    )
    by_name = {c.param.name: c for c in query.criteria}
    assert by_name["name"].modifier == "exact"
    assert by_name["identifier"].values == (sp.Token("urn:a", "1"), sp.Token("urn:b", "2"))
    assert by_name["gender"].modifier == "not"
    assert by_name["birthdate"].values == (True,)


def test_reference_values_take_the_single_target_type():
    query = parse("ImagingStudy", ("patient", "p1"), ("subject:Patient", "p2"), ("subject", "p3"))
    assert [c.values[0] for c in query.criteria] == [
        sp.RefValue("Patient", "p1"),
        sp.RefValue("Patient", "p2"),
        sp.RefValue(None, "p3"),
    ]


def test_chained_identifier():
    for key in ("patient.identifier", "subject:Patient.identifier"):
        (criterion,) = parse("ImagingStudy", (key, "urn:mrn|A1")).criteria
        assert criterion.chain_types == ("Patient",)
        assert criterion.chain is not None
        assert criterion.chain.values == (sp.Token("urn:mrn", "A1"),)


def test_result_parameters():
    query = parse(
        "ImagingStudy",
        ("_count", "5"),
        ("_offset", "10"),
        ("_sort", "-started,_id"),
        ("_include", "ImagingStudy:endpoint"),
        ("_elements", "identifier,status"),
        ("_total", "none"),
    )
    assert (query.count, query.offset) == (5, 10)
    assert [(k.param.name, k.descending) for k in query.sort] == [("started", True), ("_id", False)]
    assert [i.param.name for i in query.includes] == ["endpoint"]
    assert query.elements == ("identifier", "status")
    assert ("_count", "5") not in query.link_params  # paging is added per link
    assert ("_sort", "-started,_id") in query.link_params


def test_count_is_bounded_with_a_warning():
    query = parse("Organization", ("_count", "100000"))
    assert query.count == search.MAX_COUNT
    assert query.warnings


def test_summary_count_and_count_zero_ask_for_the_total_only():
    assert parse("Organization", ("_summary", "count")).count_only
    assert parse("Organization", ("_count", "0")).count_only


@pytest.mark.parametrize(
    "item",
    [
        ("colour", "red"),
        ("_has:Observation:patient:code", "x"),
        ("_include", "ImagingStudy:basedOn"),
    ],
)
def test_unknown_parameters_are_refused_or_ignored_when_lenient(item):
    with pytest.raises(BadRequest) as refused:
        parse("ImagingStudy", item)
    assert refused.value.issues[0].code == "not-supported"
    lenient = parse("ImagingStudy", item, ("status", "available"), lenient=True)
    assert [c.param.name for c in lenient.criteria] == ["status"]
    assert lenient.warnings
    assert item not in lenient.link_params


@pytest.mark.parametrize(
    "item",
    [
        ("started", "last tuesday"),
        ("started", "xx2026"),
        ("started:exact", "2026"),
        ("_count", "-1"),
        ("_count", "many"),
        ("_sort", "modality"),
        ("_summary", "text"),
        ("patient.name.family", "x"),
        ("status:missing", "maybe"),
        ("subject:Organization", "o1"),
        ("_format", "xml"),
    ],
)
def test_bad_values_are_400_even_when_lenient(item):
    with pytest.raises(BadRequest):
        parse("ImagingStudy", item, lenient=True)


def test_empty_values_are_ignored_but_unknown_names_are_not():
    query = parse("Patient", ("name", ""), ("_count", ""), ("gender", "female"))
    assert [c.param.name for c in query.criteria] == ["gender"]
    assert query.link_params == [("gender", "female")]
    with pytest.raises(BadRequest):
        parse("Patient", ("colour", ""))


def test_every_problem_is_reported_at_once():
    with pytest.raises(BadRequest) as refused:
        parse("ImagingStudy", ("started", "nope"), ("colour", "red"))
    assert len(refused.value.issues) == 2
