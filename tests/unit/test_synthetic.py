"""Synthetic bulk data (``exchange hub load-synthetic``) and the search benchmark's smoke run."""

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from exchange.cli import main
from exchange.database import make_engine
from exchange.fhir import profiles, resources, search, synthetic
from exchange.fhir.repository import DATE, REF, RES, STR, TOK, SqlRepository
from exchange.uids import is_uid

BASE = "https://hub.example/fhir"
SPEC = synthetic.Spec(studies=200, patients=20, seed=7, sites=3)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def loaded(engine):
    summary = synthetic.load(engine, SPEC, local_base=BASE, batch=64)
    return summary, SqlRepository(engine, local_base=BASE)


def run(repo, rtype, *items):
    query = search.parse(rtype, list(items), local_base=BASE)
    return search.execute(repo, query, visible=lambda b: list(b), may_read_type=lambda _t: True)


def test_counts(loaded, engine):
    summary, repo = loaded
    expected = {"Organization": 3, "Endpoint": 3, "Patient": 20, "ImagingStudy": 200}
    assert synthetic.counts(engine) == expected
    assert summary.written.by_type == expected
    assert summary.written.resources == SPEC.total == 226
    assert summary.written.skipped == 0
    assert summary.written.rows > 2 * 226
    assert run(repo, "ImagingStudy", ("_summary", "count")).total == 200
    assert run(repo, "Patient", ("family", "Synthetic"), ("_summary", "count")).total == 20
    assert "226 resources" in summary.describe()


def test_patient_search_returns_exactly_that_patients_studies(loaded):
    _, repo = loaded
    by_patient: dict[str, set[str]] = {}
    for rtype, body in synthetic.generate(SPEC):
        if rtype == "ImagingStudy":
            pid = body["subject"]["reference"].removeprefix("Patient/")
            by_patient.setdefault(pid, set()).add(body["id"])
    assert len(by_patient) == SPEC.patients  # every patient has a study
    assert sum(len(s) for s in by_patient.values()) == SPEC.studies
    for n in (1, 7, 20):
        pid = synthetic.patient_id(SPEC, n)
        result = run(repo, "ImagingStudy", ("patient", pid), ("_count", "500"))
        assert result.total == len(by_patient[pid])
        assert {s.id for s in result.matches} == by_patient[pid]
        assert all(s.body["subject"]["reference"] == f"Patient/{pid}" for s in result.matches)


def test_include_returns_the_endpoints(loaded):
    _, repo = loaded
    pid = synthetic.patient_id(SPEC, 3)
    result = run(repo, "ImagingStudy", ("patient", pid), ("_include", "ImagingStudy:endpoint"))
    assert result.matches
    wanted = {s.body["endpoint"][0]["reference"] for s in result.matches}
    assert {f"Endpoint/{s.id}" for s in result.included} == wanted
    for endpoint in result.included:
        assert endpoint.resource_type == "Endpoint"
        assert profiles.endpoint_is_wado_rs(endpoint.body) == []
        org = endpoint.body["managingOrganization"]["reference"]
        assert org == f"Organization/{endpoint.id}"


def test_identifiers_dates_and_modalities_are_searchable(loaded):
    _, repo = loaded
    pid = synthetic.patient_id(SPEC, 5)
    patient = repo.read("Patient", pid).body
    hie = next(i["value"] for i in patient["identifier"] if i["system"] == synthetic.HIE_SYSTEM)
    found = run(repo, "Patient", ("identifier", f"{synthetic.HIE_SYSTEM}|{hie}"))
    assert [s.id for s in found.matches] == [pid]
    mrn = next(i for i in patient["identifier"] if i["system"].endswith(":mrn"))
    chained = run(repo, "ImagingStudy", ("patient.identifier", f"{mrn['system']}|{mrn['value']}"))
    everything = run(repo, "ImagingStudy", ("patient", pid))
    assert chained.total == everything.total
    assert chained.total
    ct_2023 = run(
        repo,
        "ImagingStudy",
        ("started", "ge2023-01-01"),
        ("started", "lt2024-01-01"),
        ("modality", "CT"),
        ("_count", "500"),
    )
    assert ct_2023.total
    for stored in ct_2023.matches:
        assert stored.body["started"].startswith(("2022-12-31", "2023", "2024-01-01"))
        assert "CT" in {s["modality"]["code"] for s in stored.body["series"]}


def test_generated_resources_are_profile_valid():
    items = list(synthetic.generate(SPEC))
    sample = items[: 2 * SPEC.sites + 10] + items[-60:]
    synthetic.check(sample)  # raises on the first invalid one
    for rtype, body in sample:
        resources.validate(rtype, body)
    tagged = all(synthetic.TEST_DATA_TAG in body["meta"]["tag"] for _, body in items)
    assert tagged


def test_studies_are_plausible_and_uids_valid():
    studies = [body for rtype, body in synthetic.generate(SPEC) if rtype == "ImagingStudy"]
    uids = set()
    for study in studies:
        uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
        assert uid.startswith(synthetic.UID_ROOT)
        assert 1 <= len(study["series"]) <= 4
        assert study["numberOfSeries"] == len(study["series"])
        count = sum(len(s["instance"]) for s in study["series"])
        assert study["numberOfInstances"] == count
        assert "2021-01-01" <= study["started"][:10] <= "2025-12-31"
        for series in study["series"]:
            uids.add(series["uid"])
            assert series["uid"].startswith(uid + ".")
            for instance in series["instance"]:
                uids.add(instance["uid"])
        uids.add(uid)
    assert all(is_uid(u) for u in uids)
    assert len(uids) == sum(1 + len(s["series"]) for s in studies) + sum(
        len(x["instance"]) for s in studies for x in s["series"]
    )
    modalities = {m["code"] for s in studies for m in s["modality"]}
    assert {"CT", "MR", "CR", "US"} <= modalities
    years = {s["started"][:4] for s in studies}
    assert years == {"2021", "2022", "2023", "2024", "2025"}
    names = {
        f"{b['name'][0]['family']}^{b['name'][0]['given'][0]}"
        for t, b in synthetic.generate(SPEC)
        if t == "Patient"
    }
    assert "Synthetic^0001" in names


def test_same_seed_same_data_other_seed_other_data():
    again = list(synthetic.generate(synthetic.Spec(200, 20, seed=7, sites=3)))
    assert list(synthetic.generate(SPEC)) == again
    other = list(synthetic.generate(synthetic.Spec(200, 20, seed=8, sites=3)))
    studies = [b for t, b in other if t == "ImagingStudy"]
    assert studies != [b for t, b in again if t == "ImagingStudy"]
    assert {b["id"] for t, b in other if t == "Patient"}.isdisjoint(
        {b["id"] for t, b in again if t == "Patient"}
    )
    # a longer run starts with the same resources: blocks, not one stream
    longer = list(synthetic.generate(synthetic.Spec(300, 20, seed=7, sites=3)))
    assert longer[: len(again)] == again


def test_loading_again_skips_what_is_stored(loaded, engine):
    summary = synthetic.load(engine, SPEC, local_base=BASE)
    assert summary.written.resources == 0
    assert summary.written.skipped == SPEC.total
    more = synthetic.load(engine, synthetic.Spec(250, 20, seed=7, sites=3))
    assert more.written.by_type == {"ImagingStudy": 50}
    assert synthetic.counts(engine)["ImagingStudy"] == 250


def _index_rows(engine, rtype, rid):
    with engine.connect() as conn:
        pk = conn.execute(select(RES.c.pk).where(RES.c.rtype == rtype, RES.c.id == rid)).scalar()
        rows = {}
        for table in (TOK, STR, DATE, REF):
            columns = [c for c in table.c if c.name not in ("row", "res_pk")]
            rows[table.name] = sorted(
                tuple(r) for r in conn.execute(select(*columns).where(table.c.res_pk == pk))
            )
        facts = conn.execute(select(RES.c.facts).where(RES.c.pk == pk)).scalar()
    return rows, facts


def test_bulk_rows_equal_what_the_repository_writes(loaded, engine, tmp_path):
    """The bulk path must index exactly as ``SqlRepository`` does (no drift)."""
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        repo = SqlRepository(other, local_base=BASE)
        for rtype, body in synthetic.sample(SPEC):
            written = repo.update(rtype, body["id"], body)
            assert written.outcome == "created"
            assert _index_rows(engine, rtype, body["id"]) == _index_rows(other, rtype, body["id"])
            bulk = SqlRepository(engine, local_base=BASE).read(rtype, body["id"])
            assert bulk.version == 1
            assert {k: v for k, v in bulk.body.items() if k != "meta"} == {
                k: v for k, v in written.stored.body.items() if k != "meta"
            }
            history = SqlRepository(engine).history(rtype, body["id"], 0, 10)
            assert [v.method for v in history.versions] == ["PUT"]
    finally:
        other.dispose()


def test_spec_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="patients"):
        synthetic.Spec(studies=1, patients=0)
    with pytest.raises(ValueError, match="seed"):
        synthetic.Spec(studies=1, patients=1, seed=-1)


def test_cli_load_synthetic(tmp_path, monkeypatch, capsys):
    for key in [k for k in __import__("os").environ if k.startswith("EXCHANGE_")]:
        monkeypatch.delenv(key)
    argv = ["hub", "load-synthetic", "--studies", "30", "--patients", "5", "--sites", "2"]
    assert main([*argv, "--data-dir", str(tmp_path / "hub")]) == 0
    captured = capsys.readouterr()
    assert "loaded 39 resources" in captured.out
    assert "30 ImagingStudy" in captured.out
    assert "rows/s" in captured.out
    engine = make_engine(f"sqlite:///{tmp_path / 'hub' / 'exchange.db'}")
    try:
        assert synthetic.counts(engine)["ImagingStudy"] == 30
    finally:
        engine.dispose()
    assert main(["hub", "load-synthetic", "--studies", "3", "--patients", "0"]) == 2
    assert "--patients" in capsys.readouterr().err
    assert main(["hub"]) == 2


def test_search_benchmark_quick_smoke_run():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| database | query" in out
    for query in ("patient=<id>", "started (1 month) + modality", "patient + _include=endpoint"):
        assert f"| SQLite   | {query}" in out
    assert "TARGET MET" in out or "TARGET MISSED" in out
