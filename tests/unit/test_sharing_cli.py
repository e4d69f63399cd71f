"""``exchange share list`` and ``exchange share revoke`` on a hub database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from exchange.cli import main
from exchange.config import load_settings
from exchange.database import make_engine
from exchange.fhir.repository import SqlRepository
from exchange.hub import sharing
from exchange.hub.services import SERVICE


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _share(
    repository: SqlRepository,
    patient: str,
    study: str,
    recipient: str,
    *,
    days: int = 30,
    note: str | None = None,
    start: datetime | None = None,
) -> str:
    moment = start or datetime.now(UTC)
    asked = sharing.ShareRequest((recipient,), days=days, note=note)
    period = sharing.share_period(asked, sharing.SharingSettings(30, 90), moment)
    consent = sharing.consent_body(
        study=study,
        patient=patient,
        sharer="Practitioner/dr-b1",
        organization="org-a",
        request=asked,
        period=period,
        now=moment,
    )
    stored, _ = sharing.record_share(
        repository,
        consent,
        lambda cid: sharing.provenance_body(
            consent=cid,
            study=study,
            sharer="Practitioner/dr-b1",
            organization="org-a",
            purpose="TREAT",
            now=moment,
        ),
    )
    return stored.id


@pytest.fixture
def hub(tmp_path: Path) -> dict[str, Any]:
    """A hub database with one patient, two active shares, one ended and one revoked."""
    data = tmp_path / "hub"
    settings = load_settings(data_dir=data)
    settings.data_path(SERVICE).mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database(SERVICE))
    repository = SqlRepository(engine)
    patient = repository.create(
        "Patient",
        {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "M1"}]},
    ).stored.id
    active = _share(repository, patient, "s1", "Practitioner/dr-c1", note="knee, second opinion")
    other = _share(repository, patient, "s2", "Organization/org-c")
    _share(
        repository,
        patient,
        "s3",
        "Practitioner/dr-x",
        days=1,
        start=datetime.now(UTC) - timedelta(days=5),
    )
    revoked = _share(repository, patient, "s4", "Practitioner/dr-y")
    sharing.end_share(repository, repository.read("Consent", revoked))
    repository.create(  # the patient's own consent: not a share
        "Consent",
        {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{patient}"},
            "policy": [{"uri": "urn:exchange:policy:imaging-sharing"}],
            "provision": {"type": "deny"},
        },
    )
    engine.dispose()
    return {"data": str(data), "patient": patient, "active": active, "other": other}


def test_list_shows_the_shares_in_force(
    hub: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["share", "list", "--patient", hub["patient"], "--data-dir", hub["data"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    (first,) = [line for line in lines if line.startswith(hub["active"])]
    assert "ImagingStudy/s1" in first
    assert "from Practitioner/dr-b1 (Organization/org-a)" in first
    assert "to Practitioner/dr-c1" in first
    assert "TREAT" in first
    assert first.endswith("note: knee, second opinion")


def test_list_as_json_and_with_ended_ones(
    hub: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["share", "list", "--patient", f"Patient/{hub['patient']}", "--data-dir", hub["data"]]
    assert main([*args, "--json", "--all"]) == 0
    shares = json.loads(capsys.readouterr().out)
    assert sorted(s["status"] for s in shares) == ["active", "active", "active", "inactive"]
    assert {s["study"] for s in shares} == {"s1", "s2", "s3", "s4"}
    assert all(
        set(s) >= {"id", "study", "sharer", "recipients", "purpose", "period", "note"}
        for s in shares
    )


def test_revoke_ends_the_share_and_is_audited(
    hub: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["share", "revoke", hub["active"], "--data-dir", hub["data"]]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"revoked Consent/{hub['active']} (now version 2, inactive)"
    )
    assert (
        main(["share", "list", "--patient", hub["patient"], "--data-dir", hub["data"], "--json"])
        == 0
    )
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [hub["other"]]

    assert main(["share", "revoke", hub["active"], "--data-dir", hub["data"]]) == 0
    assert "had already ended" in capsys.readouterr().out

    assert main(["audit", "export", "--data-dir", hub["data"]]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    revokes = [
        e
        for e in events
        if {"system": "https://exchange.example.org/fhir/CodeSystem/audit", "code": "revoke"}
        in e["subtype"]
    ]
    assert len(revokes) == 2
    assert revokes[0]["agent"][0]["who"]["identifier"]["value"].startswith("cli:")
    assert f"Consent/{hub['active']}" in json.dumps(revokes[0]["entity"])
    assert "ImagingStudy/s1" in json.dumps(revokes[0]["entity"])
    assert main(["audit", "verify", "--data-dir", hub["data"]]) == 0


def test_errors_are_one_line_with_exit_codes(
    hub: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["share", "revoke", "no-such-share", "--data-dir", hub["data"]]) == 1
    assert "Consent/no-such-share" in capsys.readouterr().err
    engine = make_engine(load_settings(data_dir=Path(hub["data"])).database(SERVICE))
    consents = SqlRepository(engine).referencing("Consent", "patient", "Patient", [hub["patient"]])
    engine.dispose()
    not_share = next(b["id"] for b in consents if not sharing.is_share(b))
    assert main(["share", "revoke", not_share, "--data-dir", hub["data"]]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a provider share" in err
    assert len(err.splitlines()) == 1
    assert main(["share", "list", "--patient", "x y", "--data-dir", hub["data"]]) == 2
    assert main(["share", "list", "--patient", "p", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no hub database" in capsys.readouterr().err
    assert main(["share"]) == 2
    assert main(["share", "list"]) == 2
