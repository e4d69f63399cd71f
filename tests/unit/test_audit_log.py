"""The hash-chained audit log on a real SQLite file: one line under concurrent writers,
tampering found and located, export, checkpoints, no audit -> no access."""

import hashlib
import io
import json
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from exchange.audit.events import What, Who, build
from exchange.audit.log import (
    CHECKPOINT_TYPE,
    GENESIS,
    AuditLog,
    chain_link,
    digest,
)
from exchange.database import make_engine
from exchange.errors import AuditUnavailable, Unavailable
from exchange.fhir.repository import SqlRepository
from exchange.security.keys import load_or_create

HUB = "https://hub.example"


def event(n, when=None, patient="p1"):
    return build(
        action="view",
        who=Who(f"user-{n}", "clinician", "org-b", ("TREAT",)),
        what=What(patients=(patient,), study=f"s{n}", study_uid=f"1.2.3.{n}"),
        allowed=True,
        observer=HUB,
        when=when,
    )


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return load_or_create(tmp_path_factory.mktemp("keys") / "hub.pem")


@pytest.fixture
def db(tmp_path):
    return tmp_path / "hub.db"


@pytest.fixture
def open_log(db, key):
    engines = []

    def opener(**kw):
        engine = make_engine(f"sqlite:///{db}")
        engines.append(engine)
        kw.setdefault("signer", key)
        return AuditLog(engine, SqlRepository(engine), **kw)

    yield opener
    for engine in engines:
        engine.dispose()


def sql(db, statement, *params):
    with sqlite3.connect(db) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


def body_of(db, rid):
    (text,) = sql(db, "SELECT body FROM fhir_resource WHERE rtype='AuditEvent' AND id=?", rid)[0]
    return json.loads(text)


def id_at(db, seq):
    return sql(db, "SELECT resource_id FROM audit_chain WHERE seq=?", seq)[0][0]


def filled(open_log, n=30, **kw):
    log = open_log(**kw)
    ids = [log.record(event(i)) for i in range(n)]
    assert log.verify().ok
    return log, ids


# -- one linear chain ------------------------------------------------------------------


def test_200_events_from_8_threads_form_one_linear_chain(open_log, db):
    log = open_log(checkpoint_every=50)
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def writer(t):
        try:
            start.wait()
            for i in range(25):
                rid = log.record(event(t * 100 + i))
                with lock:
                    ids.append(rid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(ids)) == 200

    result = log.verify()
    assert result.ok, result.problem
    assert (result.records, result.checkpoints) == (200, 4)
    chain = sql(db, "SELECT seq, resource_id, hash FROM audit_chain ORDER BY seq")
    assert [seq for seq, _, _ in chain] == list(range(1, 201))
    assert {rid for _, rid, _ in chain} == set(ids)
    previous = GENESIS
    for seq, rid, stored_hash in chain:
        body = body_of(db, rid)
        assert chain_link(body) == (seq, previous)
        assert digest(body) == stored_hash
        previous = stored_hash
    assert sql(db, "SELECT seq, hash FROM audit_head") == [(200, previous)]


def test_record_many_is_one_contiguous_run(open_log, db):
    log = open_log()
    log.record(event(0))
    ids = log.record_many([event(i) for i in range(1, 6)])
    assert [id_at(db, seq) for seq in range(2, 7)] == ids
    assert log.record_many([]) == []
    assert log.verify().records == 6


def test_the_hash_covers_the_stored_canonical_body(open_log, db):
    log = open_log()
    rid = log.record(event(1))
    body = body_of(db, rid)
    assert body["id"] == rid
    assert body["meta"]["versionId"] == "1"
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert sql(db, "SELECT hash FROM audit_chain WHERE seq=1") == [(expected,)]
    assert chain_link(body) == (1, GENESIS)


# -- tampering, each on a fresh log -----------------------------------------------------


def test_an_altered_body_is_found_and_located(open_log, db):
    log, ids = filled(open_log)
    body = body_of(db, ids[16])
    body["outcome"] = "4"
    sql(db, "UPDATE fhir_resource SET body=? WHERE id=?", json.dumps(body), ids[16])
    result = log.verify()
    assert not result.ok
    assert (result.first_broken_seq, result.first_broken_id) == (17, ids[16])
    assert result.problem.startswith(f"record 17 (AuditEvent/{ids[16]}) was altered")


def test_an_altered_body_with_its_hashes_rewritten_breaks_the_next_link(open_log, db):
    log, ids = filled(open_log, checkpoint_every=1000)
    rid = ids[9]
    body = body_of(db, rid)
    body["agent"][0]["who"]["identifier"]["value"] = "someone-else"
    text = json.dumps(body, separators=(",", ":"))
    sql(db, "UPDATE fhir_resource SET body=? WHERE id=?", text, rid)
    sql(db, "UPDATE fhir_history SET body=? WHERE id=?", text, rid)
    sql(db, "UPDATE audit_chain SET hash=? WHERE seq=10", digest(body))
    result = log.verify()
    assert not result.ok
    assert (result.first_broken_seq, result.first_broken_id) == (10, rid)
    assert "record 11 carries a different hash" in result.problem


def test_a_deleted_record_is_found(open_log, db):
    log, ids = filled(open_log)
    rid = ids[8]
    (pk,) = sql(db, "SELECT pk FROM fhir_resource WHERE id=?", rid)[0]
    for table in ("fhir_idx_token", "fhir_idx_string", "fhir_idx_date", "fhir_idx_ref"):
        sql(db, f"DELETE FROM {table} WHERE res_pk=?", pk)
    sql(db, "DELETE FROM fhir_resource WHERE pk=?", pk)
    sql(db, "DELETE FROM fhir_history WHERE id=?", rid)
    sql(db, "DELETE FROM audit_chain WHERE seq=9")
    result = log.verify()
    assert not result.ok
    assert result.first_broken_seq == 9
    assert result.problem == "record 9 is missing (deleted)"


def test_a_record_deleted_from_the_index_only_is_found(open_log, db):
    log, ids = filled(open_log)
    sql(
        db,
        "DELETE FROM fhir_idx_ref WHERE res_pk=(SELECT pk FROM fhir_resource WHERE id=?)",
        ids[3],
    )
    sql(
        db,
        "DELETE FROM fhir_idx_token WHERE res_pk=(SELECT pk FROM fhir_resource WHERE id=?)",
        ids[3],
    )
    sql(
        db,
        "DELETE FROM fhir_idx_date WHERE res_pk=(SELECT pk FROM fhir_resource WHERE id=?)",
        ids[3],
    )
    sql(db, "DELETE FROM fhir_resource WHERE id=?", ids[3])
    result = log.verify()
    assert (result.ok, result.first_broken_seq, result.first_broken_id) == (False, 4, ids[3])
    assert "is missing (deleted)" in result.problem


def test_the_newest_record_deleted_is_found(open_log, db):
    log, _ = filled(open_log)
    sql(db, "DELETE FROM audit_chain WHERE seq=30")
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 30)
    assert result.problem == "record 30 is missing (deleted)"


def test_reordered_records_are_found(open_log, db):
    log, ids = filled(open_log)
    sql(db, "UPDATE audit_chain SET seq=-1 WHERE seq=12")
    sql(db, "UPDATE audit_chain SET seq=12 WHERE seq=13")
    sql(db, "UPDATE audit_chain SET seq=13 WHERE seq=-1")
    result = log.verify()
    assert not result.ok
    assert (result.first_broken_seq, result.first_broken_id) == (12, ids[12])
    assert result.problem.startswith("records out of order at 12")


def test_a_rewritten_tail_is_caught_by_the_signed_checkpoint(open_log, db, key):
    """Someone with the database but not the key recomputes every hash after a change."""
    log, ids = filled(open_log, n=25, checkpoint_every=10)
    assert log.verify().checkpoints == 2
    previous = sql(db, "SELECT hash FROM audit_chain WHERE seq=4")[0][0]
    for seq in range(5, 26):
        rid = ids[seq - 1]
        body = body_of(db, rid)
        if seq == 5:
            body["outcome"] = "4"
        body["extension"][-1]["extension"][1]["valueString"] = previous
        text = json.dumps(body, separators=(",", ":"))
        sql(db, "UPDATE fhir_resource SET body=? WHERE id=?", text, rid)
        sql(db, "UPDATE fhir_history SET body=? WHERE id=?", text, rid)
        previous = digest(body)
        sql(db, "UPDATE audit_chain SET hash=? WHERE seq=?", previous, seq)
    sql(db, "UPDATE audit_head SET hash=?", previous)
    result = log.verify()
    assert not result.ok
    assert result.first_broken_seq == 10
    assert "does not match the checkpoint" in result.problem


def test_a_forged_checkpoint_is_found(open_log, db, tmp_path):
    log, _ = filled(open_log, n=10, checkpoint_every=5)
    other = load_or_create(tmp_path / "other.pem")
    forged = jwt.encode({"seq": 5, "hash": "0" * 64}, other.private, algorithm="RS256")
    sql(db, "UPDATE audit_checkpoint SET jws=? WHERE seq=5", forged)
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 5)
    assert "invalid signature" in result.problem


def test_an_audit_event_outside_the_chain_is_found(open_log, db):
    log, _ = filled(open_log, n=5)
    stray = SqlRepository(make_engine(f"sqlite:///{db}")).create("AuditEvent", event(99))
    result = log.verify()
    assert not result.ok
    assert result.first_broken_id == stray.stored.id
    assert "not part of the chain" in result.problem


def test_a_second_version_is_found(open_log, db):
    log, ids = filled(open_log, n=5)
    repo = SqlRepository(make_engine(f"sqlite:///{db}"))
    body = body_of(db, ids[2])
    body["outcome"] = "8"
    repo.update("AuditEvent", ids[2], body)
    result = log.verify()
    assert (result.ok, result.first_broken_seq) == (False, 3)
    assert "more than one version" in result.problem


# -- checkpoints -------------------------------------------------------------------------


def test_checkpoints_are_signed_heads(open_log, db, key):
    log = open_log(checkpoint_every=3)
    for i in range(7):
        log.record(event(i))
    rows = sql(db, "SELECT seq, hash, jws FROM audit_checkpoint ORDER BY seq")
    assert [seq for seq, _, _ in rows] == [3, 6]
    _, head_hash, token = rows[1]
    assert jwt.get_unverified_header(token)["typ"] == CHECKPOINT_TYPE
    claims = jwt.decode(token, key.private.public_key(), algorithms=["RS256"])
    assert (claims["seq"], claims["hash"]) == (6, head_hash)
    latest = log.checkpoint()
    assert latest is not None
    assert latest.seq == 7
    assert log.checkpoint().jws == latest.jws  # the same head is signed once
    assert log.verify().checkpoints == 3


def test_without_a_key_no_checkpoints_and_none_can_be_checked(open_log, db):
    log = open_log(signer=None, checkpoint_every=2)
    for i in range(4):
        log.record(event(i))
    assert log.checkpoint() is None
    assert log.verify().ok
    signed = open_log(checkpoint_every=1000)
    signed.checkpoint()
    result = open_log(signer=None).verify()
    assert not result.ok
    assert "without the hub's signing key" in result.problem


# -- export --------------------------------------------------------------------------------


def test_export_is_ndjson_in_chain_order_and_since_filters(open_log):
    log = open_log()
    start = datetime(2026, 11, 1, tzinfo=UTC)
    ids = [log.record(event(i, when=start + timedelta(days=i - 2))) for i in range(5)]
    out = io.StringIO()
    assert log.export(out) == 5
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids
    recent = io.StringIO()
    assert log.export(recent, since=start) == 3
    assert [json.loads(line)["id"] for line in recent.getvalue().splitlines()] == ids[2:]
    naive = io.StringIO()
    assert log.export(naive, since=datetime(2026, 11, 2, 12)) == 1  # naive: UTC


# -- no audit, no access -----------------------------------------------------------------


def test_a_failed_write_is_unavailable_and_leaves_nothing(open_log, db):
    log, _ = filled(open_log, n=3)
    sql(db, "DROP TABLE audit_chain")
    with pytest.raises(AuditUnavailable, match="could not be written, so access is refused") as err:
        log.record(event(9))
    assert isinstance(err.value, Unavailable)
    assert err.value.status == 503
    assert sql(db, "SELECT count(*) FROM fhir_resource WHERE rtype='AuditEvent'") == [(3,)]
    assert sql(db, "SELECT seq FROM audit_head") == [(3,)]


def test_check_raises_without_a_chain_head(open_log, db):
    log = open_log()
    log.check()
    sql(db, "DELETE FROM audit_head")
    with pytest.raises(Unavailable):
        log.check()
    with pytest.raises(AuditUnavailable):
        log.record(event(1))
