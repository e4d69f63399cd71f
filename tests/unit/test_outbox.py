"""The publishing outbox: one row per study, revisions, claims, backoff (real SQLite)."""

from __future__ import annotations

import io

import pytest

from exchange.database import make_engine
from exchange.node import outbox
from exchange.node.outbox import FAILED, PENDING, PUBLISH, RETRACT, Outbox, backoff
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key
from tests.dicomdata import generated


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = FileKeyStore(
        tmp_path / "keys", master_key(None, tmp_path / "master.key"), ["tenant-a", "tenant-b"]
    )
    return InstanceStore(engine, tmp_path / "blobs", keys, max_instance_bytes=10 * 1024 * 1024)


@pytest.fixture
def box(store, clock) -> Outbox:
    return Outbox(store._engine, clock=clock)


def _sealed(store: InstanceStore, tenant: str, uid: str) -> dict[str, bytes]:
    seal = store.seal(tenant)
    key = seal.blind("study", uid)
    return {key: outbox.seal_uid(seal, key, uid)}


def test_changes_to_one_study_coalesce_into_one_row_with_a_new_revision(store, box, clock):
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.4"), PUBLISH)
    box.enqueue("tenant-b", _sealed(store, "tenant-b", "1.2.3"), PUBLISH)
    rows = box.entries()
    assert len(rows) == 3
    by = {
        (r.tenant, outbox.unseal_uid(store.seal(r.tenant), r.study_key, r.sealed_uid)): r
        for r in rows
    }
    assert by[("tenant-a", "1.2.3")].revision == 2
    assert by[("tenant-a", "1.2.4")].revision == 1
    assert by[("tenant-b", "1.2.3")].revision == 1
    # A deletion after a publication is still one row: the latest intent wins.
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), RETRACT)
    (row,) = [r for r in box.entries("tenant-a") if r.revision == 3]
    assert row.action == RETRACT


def test_a_send_that_raced_with_a_change_does_not_remove_the_row(store, box):
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    (sent,) = box.due()
    assert box.claim(sent)
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)  # new instances
    assert box.complete(sent) is False
    (again,) = box.due()  # released, and due again with the new revision
    assert again.revision == sent.revision + 1
    assert box.claim(again)
    assert box.complete(again) is True
    assert box.entries() == []


def test_a_claimed_row_is_left_alone_until_its_claim_expires(store, box, clock):
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    (entry,) = box.due()
    assert box.claim(entry, seconds=60)
    assert box.due() == []
    assert box.claim(entry) is False  # another worker
    clock.now += 61
    (entry,) = box.due()
    assert box.claim(entry)


def test_retry_later_keeps_the_row_and_delays_it(store, box, clock):
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    (entry,) = box.due()
    box.claim(entry)
    box.retry_later(entry, 5.0, "the hub is unreachable (ConnectError)")
    assert box.due() == []
    assert box.next_due() == pytest.approx(clock.now + 5.0)
    clock.now += 5.0
    (entry,) = box.due()
    assert entry.attempts == 1
    assert entry.last_error == "the hub is unreachable (ConnectError)"


def test_failed_rows_wait_for_reconcile_or_a_new_change(store, box, clock):
    box.enqueue("tenant-a", _sealed(store, "tenant-a", "1.2.3"), PUBLISH)
    box.enqueue("tenant-b", _sealed(store, "tenant-b", "1.2.9"), PUBLISH)
    for entry in box.due():
        box.claim(entry)
        assert box.fail(entry, "HTTP 422: invalid ImagingStudy")
    clock.now += 3600
    assert box.due() == []
    assert box.next_due() is None
    depth = box.depth()
    assert (depth.pending, depth.failed) == (0, 2)
    assert box.retry_failed("tenant-a") == 1
    (entry,) = box.due()
    assert (entry.tenant, entry.state, entry.attempts) == ("tenant-a", PENDING, 0)
    # A new change to a failed study makes it pending again too.
    box.enqueue("tenant-b", _sealed(store, "tenant-b", "1.2.9"), PUBLISH)
    assert {e.tenant for e in box.entries(state=PENDING)} == {"tenant-a", "tenant-b"}
    assert box.entries(state=FAILED) == []


def test_storing_queues_the_study_in_the_same_transaction(store, box):
    first, second, third = generated(patient_id="OUTBOX-MRN-1", accession="OB1", slices=3)
    with store.batch("tenant-a") as batch:
        batch.add(io.BytesIO(first))
        batch.add(io.BytesIO(second))
        results = batch.commit()
    (entry,) = box.entries("tenant-a")
    assert (entry.action, entry.revision) == (PUBLISH, 1)
    uid = results[0].study_uid
    assert outbox.unseal_uid(store.seal("tenant-a"), entry.study_key, entry.sealed_uid) == uid
    store.store("tenant-a", io.BytesIO(third))
    (entry,) = box.entries("tenant-a")
    assert entry.revision == 2
    store.store("tenant-a", io.BytesIO(third))  # already present: nothing changes
    assert box.entries("tenant-a")[0].revision == 2


def test_wake_up_is_called_after_commit(store, box):
    calls = []
    store.on_outbox = lambda: calls.append(len(box.entries()))
    store.store("tenant-a", io.BytesIO(generated(accession="WAKE")[0]))
    assert calls == [1]  # the row was committed before the worker was woken


def test_deleting_a_study_removes_rows_and_blobs_and_queues_a_retraction(store, box, tmp_path):
    data = generated(patient_id="DEL-1", accession="DEL1", slices=2)
    uid = store.store("tenant-a", io.BytesIO(data[0])).study_uid
    store.store("tenant-a", io.BytesIO(data[1]))
    assert len(list((tmp_path / "blobs").rglob("*.enc"))) == 2
    assert store.delete_study("tenant-b", uid) == 0  # another tenant's study is not there
    assert store.delete_study("tenant-a", uid) == 2
    assert store.rows("tenant-a", study_uid=uid) == []
    assert list((tmp_path / "blobs").rglob("*.enc")) == []
    (entry,) = box.entries("tenant-a")
    assert entry.action == RETRACT
    assert outbox.unseal_uid(store.seal("tenant-a"), entry.study_key, entry.sealed_uid) == uid
    assert store.delete_study("tenant-a", uid) == 0


def test_no_uid_or_patient_data_in_clear_in_the_database(store, tmp_path):
    data = generated(patient_id="SECRET-MRN-777", accession="SECRETACC")
    uid = store.store("tenant-a", io.BytesIO(data[0])).study_uid
    store.delete_study("tenant-a", uid)
    store._engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("node.db*"))
    assert uid.encode() not in raw
    assert b"SECRET-MRN-777" not in raw


def test_backoff_grows_from_half_a_second_to_the_cap_with_jitter():
    ceilings = [backoff(n, cap=30.0, rand=lambda: 1.0) for n in range(1, 10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    floors = [backoff(n, cap=30.0, rand=lambda: 0.0) for n in range(1, 10)]
    assert floors == [c / 2 for c in ceilings]
    assert backoff(10_000, cap=30.0) <= 30.0
