"""The SQL repository and the search pipeline on a real SQLite database (tmp dir)."""

import pytest
from fhir.resources.R4B.bundle import Bundle

from exchange.database import make_engine
from exchange.errors import BadRequest, Conflict, Gone, NotFound, PreconditionFailed
from exchange.fhir import bundle, search
from exchange.fhir.repository import SqlRepository

BASE = "https://hub.example/fhir"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.fixture
def repo(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    yield SqlRepository(engine, local_base=BASE)
    engine.dispose()


def patient(mrn="A1", family="Müller", given="Jörg", birth="1970-05-01"):
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:mrn:site-a", "value": mrn}],
        "name": [{"family": family, "given": [given]}],
        "gender": "male",
    }
    if birth:
        body["birthDate"] = birth
    return body


def study(n, patient_id="p1", started="2026-03-10T12:00:00Z", modality="CT", endpoint="e1"):
    return {
        "resourceType": "ImagingStudy",
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:1.2.826.0.1.3680043.10.1386.{n}"}
        ],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": started,
        "modality": [{"system": DCM, "code": modality}],
        "endpoint": [{"reference": f"Endpoint/{endpoint}"}],
        "numberOfSeries": 1,
        "numberOfInstances": 1,
    }


def endpoint(name):
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "name": name,
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "payloadType": [{"text": "DICOM"}],
        "address": "https://hub.example/dicomweb",
    }


def uid_query(n):
    return search.parse(
        "ImagingStudy", [("identifier", f"urn:dicom:uid|urn:oid:1.2.826.0.1.3680043.10.1386.{n}")]
    )


def run(repo, rtype, *items, visible=None, may_read_type=None, lenient=False):
    query = search.parse(rtype, list(items), lenient=lenient, local_base=BASE)
    return search.execute(
        repo,
        query,
        visible=visible or (lambda batch: list(batch)),
        may_read_type=may_read_type or (lambda _t: True),
    )


def ids(result):
    return [m.id for m in result.matches]


# -- versions -----------------------------------------------------------------------


def test_create_read_update_vread(repo):
    created = repo.create("Patient", patient())
    assert created.outcome == "created"
    rid = created.stored.id
    assert created.stored.body["meta"]["versionId"] == "1"
    assert repo.read("Patient", rid).body["name"][0]["family"] == "Müller"

    changed = patient(family="Meier")
    updated = repo.update("Patient", rid, changed, if_match='W/"1"')
    assert (updated.outcome, updated.stored.version) == ("updated", 2)
    with pytest.raises(PreconditionFailed):
        repo.update("Patient", rid, patient(family="Lost"), if_match='W/"1"')
    assert repo.read("Patient", rid).body["name"][0]["family"] == "Meier"
    assert repo.vread("Patient", rid, 1).body["name"][0]["family"] == "Müller"
    with pytest.raises(NotFound):
        repo.vread("Patient", rid, 9)
    with pytest.raises(NotFound):
        repo.read("Patient", "nobody")


def test_the_same_content_again_is_not_a_new_version(repo):
    rid = repo.create("Patient", patient()).stored.id
    again = {
        **patient(),
        "id": rid,
        "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"},
    }
    written = repo.update("Patient", rid, again)
    assert (written.outcome, written.stored.version) == ("unchanged", 1)
    assert repo.history("Patient", rid, 0, 10).total == 1


def test_update_creates_with_a_client_id(repo):
    written = repo.update("Organization", "org-x", {"resourceType": "Organization", "name": "X"})
    assert (written.outcome, written.stored.version) == ("created", 1)
    with pytest.raises(PreconditionFailed):
        repo.update("Organization", "org-y", {"resourceType": "Organization"}, if_match='W/"1"')


def test_conditional_create(repo):
    first = repo.create("ImagingStudy", study(1), if_none_exist=uid_query(1))
    again = repo.create("ImagingStudy", study(1), if_none_exist=uid_query(1))
    assert (first.outcome, again.outcome) == ("created", "existing")
    assert again.stored.id == first.stored.id
    repo.create("ImagingStudy", study(1))  # an unconditional duplicate
    with pytest.raises(PreconditionFailed):
        repo.create("ImagingStudy", study(1), if_none_exist=uid_query(1))


def test_conditional_update_is_idempotent_publishing(repo):
    created = repo.conditional_update("ImagingStudy", uid_query(2), study(2))
    assert (created.outcome, created.stored.version) == ("created", 1)
    same = repo.conditional_update("ImagingStudy", uid_query(2), study(2))
    assert (same.outcome, same.stored.version, same.stored.id) == (
        "unchanged",
        1,
        created.stored.id,
    )
    changed = repo.conditional_update("ImagingStudy", uid_query(2), study(2, modality="MR"))
    assert (changed.outcome, changed.stored.version) == ("updated", 2)
    with pytest.raises(BadRequest):
        repo.conditional_update("ImagingStudy", uid_query(2), {**study(2), "id": "someone-else"})
    repo.create("ImagingStudy", study(2))
    with pytest.raises(PreconditionFailed):
        repo.conditional_update("ImagingStudy", uid_query(2), study(2))
    with pytest.raises(BadRequest):
        repo.conditional_update("ImagingStudy", search.parse("ImagingStudy", []), study(2))


def test_delete_keeps_history_and_reads_answer_gone(repo):
    rid = repo.create("ImagingStudy", study(3)).stored.id
    with pytest.raises(PreconditionFailed):
        repo.delete("ImagingStudy", rid, if_match='W/"5"')
    deleted = repo.delete("ImagingStudy", rid)
    assert (deleted.outcome, deleted.stored.version) == ("deleted", 2)
    with pytest.raises(Gone):
        repo.read("ImagingStudy", rid)
    with pytest.raises(Gone):
        repo.vread("ImagingStudy", rid, 2)
    assert repo.vread("ImagingStudy", rid, 1).body["status"] == "available"
    history = repo.history("ImagingStudy", rid, 0, 10)
    assert [(v.version, v.method, v.body is None) for v in history.versions] == [
        (2, "DELETE", True),
        (1, "POST", False),
    ]
    assert repo.delete("ImagingStudy", rid).outcome == "gone"
    assert run(repo, "ImagingStudy", ("identifier", "urn:dicom:uid|")).total == 0
    with pytest.raises(NotFound):
        repo.delete("ImagingStudy", "never-was")
    # writing it again continues the version sequence
    again = repo.update("ImagingStudy", rid, study(3))
    assert (again.outcome, again.stored.version) == ("created", 3)
    assert ids(run(repo, "ImagingStudy", ("_id", rid))) == [rid]


def test_a_failed_write_leaves_the_previous_version(repo, monkeypatch):
    rid = repo.create("ImagingStudy", study(4)).stored.id

    def broken(*_args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(SqlRepository, "_insert_index", staticmethod(broken))
    with pytest.raises(RuntimeError):
        repo.update("ImagingStudy", rid, study(4, modality="MR"))
    monkeypatch.undo()
    current = repo.read("ImagingStudy", rid)
    assert (current.version, current.body["modality"][0]["code"]) == (1, "CT")
    assert ids(run(repo, "ImagingStudy", ("modality", "CT"))) == [rid]
    assert repo.history("ImagingStudy", rid, 0, 10).total == 1


def test_a_concurrent_writer_is_a_conflict_not_a_lost_update(repo, monkeypatch):
    rid = repo.create("Patient", patient()).stored.id
    with repo._engine.connect() as conn:
        stale = repo._current(conn, "Patient", rid)
    repo.update("Patient", rid, patient(family="First"))
    monkeypatch.setattr(SqlRepository, "_current", lambda *_a, **_k: stale)
    with pytest.raises(Conflict):
        repo.update("Patient", rid, patient(family="Second"))
    monkeypatch.undo()
    assert repo.read("Patient", rid).body["name"][0]["family"] == "First"


# -- search -------------------------------------------------------------------------


@pytest.fixture
def dated(repo):
    """Studies whose ``started`` has different precisions and instants."""
    values = {
        "dec31": "2025-12-31T23:30:00Z",
        "mar01": "2026-03-01T00:00:00Z",
        "mar10": "2026-03-10T12:00:00Z",
        "april": "2026-04",
        "year": "2026",
    }
    return {
        name: repo.update("ImagingStudy", name, study(i, started=value)).stored.id
        for i, (name, value) in enumerate(values.items())
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026", {"mar01", "mar10", "april", "year"}),
        ("eq2026-03", {"mar01", "mar10"}),
        ("ne2026-03", {"dec31", "april", "year"}),
        ("2026-03-10", {"mar10"}),
        ("gt2026-03-01", {"mar10", "april", "year"}),
        ("ge2026-03-01", {"mar01", "mar10", "april", "year"}),
        ("lt2026-03-01", {"dec31", "year"}),
        ("le2026-03-01", {"dec31", "mar01", "year"}),
        ("sa2026-03-31", {"april"}),
        ("eb2026-01-01", {"dec31"}),
        ("ap2026-03-10", {"mar01", "mar10", "april", "year"}),
        ("ge2026-03-01,lt2026", {"dec31", "mar01", "mar10", "april", "year"}),
    ],
)
def test_date_prefixes_follow_the_spec(repo, dated, value, expected):
    assert set(ids(run(repo, "ImagingStudy", ("started", value), ("_count", "50")))) == expected


def test_date_criteria_are_anded(repo, dated):
    result = run(repo, "ImagingStudy", ("started", "ge2026-03-01"), ("started", "lt2026-03-05"))
    assert ids(result) == ["mar01", "year"]  # the year-precision range overlaps both sides


def test_last_updated(repo):
    old = repo.create("Organization", {"resourceType": "Organization", "name": "Old"}).stored
    assert ids(run(repo, "Organization", ("_lastUpdated", "ge2020-01-01"))) == [old.id]
    assert run(repo, "Organization", ("_lastUpdated", "lt2020-01-01")).total == 0
    when = old.body["meta"]["lastUpdated"]
    assert ids(run(repo, "Organization", ("_lastUpdated", when))) == [old.id]


def test_strings(repo):
    a = repo.create("Patient", patient("A1", "Müller", "Jörg")).stored.id
    b = repo.create("Patient", patient("B2", "Mullins", "Ann")).stored.id
    c = repo.create("Patient", patient("C3", "Schmidt", "Jo")).stored.id
    assert set(ids(run(repo, "Patient", ("family", "mul")))) == {a, b}
    assert ids(run(repo, "Patient", ("family", "MÜLLER"))) == [a]
    assert ids(run(repo, "Patient", ("family:exact", "Müller"))) == [a]
    assert ids(run(repo, "Patient", ("family:exact", "muller"))) == []
    assert ids(run(repo, "Patient", ("family:contains", "MID"))) == [c]
    assert set(ids(run(repo, "Patient", ("name", "jo")))) == {a, c}
    assert set(ids(run(repo, "Patient", ("given", "jo,ann")))) == {a, b, c}
    assert ids(run(repo, "Patient", ("family:contains", "%"))) == []


def test_tokens(repo):
    a = repo.create("Patient", patient("A1")).stored.id
    b = repo.create(
        "Patient", {"resourceType": "Patient", "identifier": [{"value": "A1"}], "gender": "female"}
    ).stored.id
    assert set(ids(run(repo, "Patient", ("identifier", "A1")))) == {a, b}
    assert ids(run(repo, "Patient", ("identifier", "urn:mrn:site-a|A1"))) == [a]
    assert ids(run(repo, "Patient", ("identifier", "|A1"))) == [b]
    assert ids(run(repo, "Patient", ("identifier", "urn:mrn:site-a|"))) == [a]
    assert ids(run(repo, "Patient", ("gender:not", "male"))) == [b]
    assert ids(run(repo, "Patient", ("birthdate:missing", "true"))) == [b]
    assert ids(run(repo, "Patient", ("birthdate:missing", "false"))) == [a]
    gender = "http://hl7.org/fhir/administrative-gender|female"
    assert ids(run(repo, "Patient", ("gender", gender))) == [b]


def test_references_chains_and_logical_subjects(repo):
    p1 = repo.update("Patient", "p1", patient("A1")).stored.id
    repo.update("Patient", "p2", patient("B2"))
    s1 = repo.create("ImagingStudy", study(1, patient_id=p1)).stored.id
    s2 = repo.create("ImagingStudy", study(2, patient_id="p2")).stored.id
    logical = study(3)
    logical["subject"] = {"identifier": {"system": "urn:mrn:site-a", "value": "A1"}}
    s3 = repo.create("ImagingStudy", logical).stored.id
    for value in ("p1", "Patient/p1", f"{BASE}/Patient/p1"):
        assert ids(run(repo, "ImagingStudy", ("patient", value))) == [s1]
    assert ids(run(repo, "ImagingStudy", ("subject:Patient", "p2"))) == [s2]
    assert ids(run(repo, "ImagingStudy", ("patient", "p1,p2"))) == [s1, s2]
    chained = run(repo, "ImagingStudy", ("patient.identifier", "urn:mrn:site-a|A1"))
    assert ids(chained) == [s1, s3]
    assert ids(run(repo, "ImagingStudy", ("subject:Patient.identifier", "B2"))) == [s2]
    assert ids(run(repo, "ImagingStudy", ("subject:identifier", "urn:mrn:site-a|A1"))) == [s3]
    assert ids(run(repo, "ImagingStudy", ("patient.family", "mül"))) == [s1, s2]


def test_sort_with_missing_values_last_and_ties_by_id(repo):
    repo.update("Patient", "c", patient("1", "Zeta", birth="1990-01-01"))
    repo.update("Patient", "a", patient("2", "Alpha", birth=None))
    repo.update("Patient", "b", patient("3", "Alpha", birth="1980-01-01"))
    assert ids(run(repo, "Patient", ("_sort", "birthdate"))) == ["b", "c", "a"]
    assert ids(run(repo, "Patient", ("_sort", "-birthdate"))) == ["c", "b", "a"]
    assert ids(run(repo, "Patient", ("_sort", "name"))) == ["a", "b", "c"]
    assert ids(run(repo, "Patient", ("_sort", "-name,-_id"))) == ["c", "b", "a"]
    assert ids(run(repo, "Patient", ("_sort", "_id"))) == ["a", "b", "c"]


def test_paging_returns_each_match_exactly_once(repo):
    for n in range(45):
        repo.create("Organization", {"resourceType": "Organization", "name": f"Org {n:02d}"})
    seen, offset = [], 0
    while True:
        page = run(
            repo, "Organization", ("_count", "10"), ("_offset", str(offset)), ("_sort", "name")
        )
        assert page.total == 45
        seen += ids(page)
        if not page.has_next:
            break
        offset += 10
    assert len(seen) == len(set(seen)) == 45


def test_include_and_revinclude(repo):
    repo.update("Endpoint", "e1", endpoint("WADO e1"))
    repo.update("Patient", "p1", patient())
    s1 = repo.create("ImagingStudy", study(1)).stored.id
    s2 = repo.create("ImagingStudy", study(2)).stored.id
    result = run(repo, "ImagingStudy", ("_include", "ImagingStudy:endpoint"))
    assert ids(result) == [s1, s2]
    assert [(i.resource_type, i.id) for i in result.included] == [("Endpoint", "e1")]
    both = run(repo, "ImagingStudy", ("_include", "ImagingStudy:endpoint,ImagingStudy:subject"))
    assert {(i.resource_type, i.id) for i in both.included} == {
        ("Endpoint", "e1"),
        ("Patient", "p1"),
    }
    rev = run(repo, "Patient", ("_revinclude", "ImagingStudy:patient"))
    assert {i.id for i in rev.included} == {s1, s2}
    json = bundle.searchset(both, BASE)
    Bundle.model_validate(json)
    assert [e["search"]["mode"] for e in json["entry"]] == ["match", "match", "include", "include"]


def test_hidden_resources_never_show_through_total_paging_include_or_count(repo):
    repo.update("Endpoint", "e1", endpoint("visible"))
    repo.update("Endpoint", "e2", endpoint("hidden"))
    for n in range(30):
        repo.create("ImagingStudy", study(n, endpoint="e2" if n % 3 == 0 else "e1"))

    def visible(batch):
        return [
            c for c in batch if "Endpoint/e2" not in c.facts.get("endpoint", []) and c.id != "e2"
        ]

    seen, offset = [], 0
    while True:
        page = run(
            repo,
            "ImagingStudy",
            ("_count", "7"),
            ("_offset", str(offset)),
            ("_include", "ImagingStudy:endpoint"),
            visible=visible,
        )
        assert page.total == 20
        assert {i.id for i in page.included} <= {"e1"}
        seen += ids(page)
        if not page.has_next:
            break
        offset += 7
    assert len(seen) == len(set(seen)) == 20
    counted = run(repo, "ImagingStudy", ("_summary", "count"), visible=visible)
    assert (counted.total, counted.matches) == (20, [])
    # a type the caller may not read is never included, whatever the hook says
    no_endpoints = run(
        repo,
        "ImagingStudy",
        ("_include", "ImagingStudy:endpoint"),
        may_read_type=lambda t: t != "Endpoint",
    )
    assert no_endpoints.included == []


def test_total_none_stops_after_the_page(repo):
    for n in range(5):
        repo.create("Organization", {"resourceType": "Organization", "name": f"O{n}"})
    result = run(repo, "Organization", ("_count", "2"), ("_total", "none"))
    assert (result.total, len(result.matches), result.has_next) == (None, 2, True)


def test_searchset_bundle_shape(repo):
    for n in range(3):
        repo.create(
            "Organization", {"resourceType": "Organization", "name": f"O{n}", "active": True}
        )
    result = run(
        repo,
        "Organization",
        ("name", "o"),
        ("_count", "1"),
        ("_offset", "1"),
        ("_elements", "name"),
        ("colour", "red"),
        lenient=True,
    )
    json = bundle.searchset(result, BASE)
    Bundle.model_validate(json)
    links = {link["relation"]: link["url"] for link in json["link"]}
    assert links["self"] == f"{BASE}/Organization?name=o&_elements=name&_count=1&_offset=1"
    assert links["next"].endswith("_count=1&_offset=2")
    assert links["previous"].endswith("_elements=name&_count=1")
    assert json["total"] == 3
    match, warning = json["entry"]
    assert set(match["resource"]) == {"resourceType", "id", "meta", "name"}
    assert match["resource"]["meta"]["tag"][0]["code"] == "SUBSETTED"
    assert warning["search"]["mode"] == "outcome"
    assert "colour" in warning["resource"]["issue"][0]["diagnostics"]


def test_history_bundle_validates(repo):
    rid = repo.create("Organization", {"resourceType": "Organization", "name": "A"}).stored.id
    repo.update("Organization", rid, {"resourceType": "Organization", "name": "B"})
    repo.delete("Organization", rid)
    found = repo.history("Organization", rid, 0, 2)
    json = bundle.history(found, BASE, 0, 2)
    Bundle.model_validate(json)
    assert json["total"] == 3
    assert [e["request"]["method"] for e in json["entry"]] == ["DELETE", "PUT"]
    assert any(link["relation"] == "next" for link in json["link"])
