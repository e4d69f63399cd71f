"""``exchange audit verify`` and ``exchange audit export`` on a hub database."""

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from exchange.audit.events import What, Who, build
from exchange.audit.log import AuditLog
from exchange.cli import main
from exchange.config import load_settings
from exchange.database import make_engine
from exchange.fhir.repository import SqlRepository
from exchange.hub.services import SERVICE, grant_key_path
from exchange.security.keys import load_or_create


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def hub(tmp_path):
    """A hub data directory with 12 audit records (one checkpoint) written as the hub would."""
    data = tmp_path / "hub"
    settings = load_settings(data_dir=data)
    engine = make_engine(settings.database(SERVICE))
    log = AuditLog(
        engine, SqlRepository(engine), load_or_create(grant_key_path(settings)), checkpoint_every=10
    )
    start = datetime(2026, 10, 30, tzinfo=UTC)
    ids = [
        log.record(
            build(
                action="search",
                who=Who("dr-b", "clinician", "org-b", ("TREAT",)),
                what=What(patients=("p1",), query="patient=p1"),
                allowed=True,
                observer="http://hub",
                when=start + timedelta(days=i),
            )
        )
        for i in range(12)
    ]
    engine.dispose()
    return data, ids


def test_verify_a_good_chain(hub, capsys):
    data, _ = hub
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == "audit chain intact: 12 records, 1 checkpoints"


def test_verify_a_tampered_chain(hub, capsys):
    data, ids = hub
    with sqlite3.connect(data / "exchange.db") as conn:
        (text,) = conn.execute("SELECT body FROM fhir_resource WHERE id=?", (ids[6],)).fetchone()
        body = json.loads(text)
        body["outcome"] = "4"
        conn.execute("UPDATE fhir_resource SET body=? WHERE id=?", (json.dumps(body), ids[6]))
    conn.close()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"audit chain BROKEN at record 7 (AuditEvent/{ids[6]}): ")
    assert "altered" in out


def test_verify_a_deleted_record(hub, capsys):
    data, _ = hub
    with sqlite3.connect(data / "exchange.db") as conn:
        conn.execute("DELETE FROM audit_chain WHERE seq=3")
    conn.close()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 1
    assert capsys.readouterr().out.strip() == (
        "audit chain BROKEN at record 3: it is missing (deleted)"
    )


def test_verify_without_a_hub_database(tmp_path, capsys):
    assert main(["audit", "verify", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exchange: error: no hub database at ")
    assert not (tmp_path / "nowhere" / "exchange.db").exists()


def test_export_to_stdout_and_since(hub, capsys):
    data, ids = hub
    assert main(["audit", "export", "--data-dir", str(data)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == ids
    assert "exported 12 AuditEvents" in captured.err
    assert (
        main(["audit", "export", "--since", "2026-11-08", "--data-dir", str(data), "--out", "-"])
        == 0
    )
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == ids[9:]


def test_export_to_a_file_atomically(hub, tmp_path, capsys):
    data, ids = hub
    out = tmp_path / "siem" / "audit.ndjson"
    argv = ["audit", "export", "--since", "2026-11-01T00:00:00Z", "--out", str(out)]
    assert main([*argv, "--data-dir", str(data)]) == 0
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids[2:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["audit.ndjson"]  # no temp left
    assert f"exported 10 AuditEvents to {out}" in capsys.readouterr().err


def test_export_with_a_bad_since_is_a_usage_error(hub, capsys):
    data, _ = hub
    assert main(["audit", "export", "--since", "last tuesday", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "invalid date/time 'last tuesday'" in err


def test_audit_without_a_tool_is_a_usage_error(capsys):
    assert main(["audit"]) == 2
    assert "TOOL is required" in capsys.readouterr().err
