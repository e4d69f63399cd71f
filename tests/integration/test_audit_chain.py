"""The audit chain across OS processes (SQLite and PostgreSQL) and in the running hub."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from exchange.audit.events import What, Who, build
from exchange.audit.log import AuditLog, chain_link
from exchange.database import make_engine
from exchange.fhir.repository import SqlRepository
from exchange.security.keys import load_or_create
from tests.pg import postgres_server, unavailable_reason

pytestmark = pytest.mark.integration

#: One writer process: waits for the go file, then appends from several threads at once.
WRITER = """
import sys, threading, time
from pathlib import Path
from exchange.audit.events import What, Who, build
from exchange.audit.log import AuditLog
from exchange.database import make_engine
from exchange.fhir.repository import SqlRepository
from exchange.security.keys import load_or_create

url, key_file, go, name = sys.argv[1:5]
threads, per_thread = int(sys.argv[5]), int(sys.argv[6])
engine = make_engine(url)
log = AuditLog(engine, SqlRepository(engine), load_or_create(Path(key_file)), checkpoint_every=50)
while not Path(go).exists():
    time.sleep(0.01)

def write(t):
    for i in range(per_thread):
        log.record(build(action="view", who=Who(f"{name}-{t}", "clinician", "org-b"),
                         what=What(patients=("p1",), study=f"{name}-{t}-{i}"),
                         allowed=True, observer="http://hub"))

workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
engine.dispose()
print("done")
"""


def _append_from_processes(url: str, root: Path, processes: int, threads: int, per: int) -> None:
    key_file = root / "hub.pem"
    # The hub creates its tables once at start-up; the writers then race only to append.
    engine = make_engine(url)
    AuditLog(engine, SqlRepository(engine), load_or_create(key_file))
    engine.dispose()
    go = root / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                url,
                str(key_file),
                str(go),
                f"w{n}",
                f"{threads}",
                f"{per}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    time.sleep(0.5)
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.strip() == "done"


def _check_one_chain(url: str, root: Path, expected: int) -> AuditLog:
    engine = make_engine(url)
    log = AuditLog(engine, SqlRepository(engine), load_or_create(root / "hub.pem"))
    result = log.verify()
    assert result.ok, result.problem
    assert result.records == expected
    assert result.checkpoints >= 1
    with engine.connect() as conn:
        seqs = conn.execute(text("SELECT seq FROM audit_chain ORDER BY seq")).scalars().all()
        bodies = conn.execute(
            text("SELECT body FROM fhir_resource WHERE rtype = 'AuditEvent'")
        ).scalars()
        links = sorted(chain_link(json.loads(b))[0] for b in bodies)
    assert seqs == list(range(1, expected + 1))
    assert links == seqs
    return log


def test_two_processes_on_one_sqlite_file_keep_one_chain(tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    _append_from_processes(url, tmp_path, processes=2, threads=4, per=25)
    _check_one_chain(url, tmp_path, 200)


@pytest.fixture(scope="module")
def pg_url():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


def test_two_processes_on_one_postgresql_database_keep_one_chain(pg_url, tmp_path):
    _append_from_processes(pg_url, tmp_path, processes=2, threads=4, per=25)
    log = _check_one_chain(pg_url, tmp_path, 200)

    # Tampering is found on PostgreSQL too (plain SQL, as an intruder would).
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        rid = conn.execute(text("SELECT resource_id FROM audit_chain WHERE seq = 77")).scalar_one()
        conn.execute(
            text(
                'UPDATE fhir_resource SET body = replace(body, \'"outcome":"0"\', '
                "'\"outcome\":\"4\"') WHERE rtype = 'AuditEvent' AND id = :id"
            ),
            {"id": rid},
        )
    result = log.verify()
    assert (result.ok, result.first_broken_seq, result.first_broken_id) == (False, 77, rid)
    assert "was altered" in (result.problem or "")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_chain WHERE seq = 5"))
    assert log.verify().problem == "record 5 is missing (deleted)"
    engine.dispose()


def test_the_hub_serves_the_audit_trail_and_verify_passes(federation):
    hub = federation.hub
    ready = httpx.get(f"{hub.url}/readyz").json()
    assert ready["checks"]["audit"] == "ok"
    out = federation.exchange("hub", "audit", "verify")
    assert out.startswith("audit chain intact: ")

    # The hub's own trail accepts records and stays verifiable beside whatever it wrote.
    engine = make_engine(federation.database_url("hub"))
    log = AuditLog(
        engine,
        SqlRepository(engine),
        load_or_create(hub.data_dir / "keys" / "grant-signing.pem"),
    )
    log.record(
        build(
            action="login-failure",
            who=Who("unknown", "unknown", None, address="127.0.0.1"),
            what=What(),
            allowed=False,
            observer=hub.url,
            reason="the token's signature is not valid",
        )
    )
    engine.dispose()
    assert federation.exchange("hub", "audit", "verify").startswith("audit chain intact: ")
