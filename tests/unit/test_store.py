"""The encrypted multi-tenant store, on a real SQLite database and real files."""

import io
import os

import pytest

from exchange.database import make_engine
from exchange.dicom.part10 import REASON_DUPLICATE, InvalidInstance
from exchange.node.store import InstanceStore, Outcome
from exchange.security.keystore import FileKeyStore, KeyUnavailable, master_key
from tests.dicomdata import generated, with_preamble

PE_HEADER = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff"


def _keys(tmp_path, tenants):
    return FileKeyStore(tmp_path / "keys", master_key(None, tmp_path / "master.key"), tenants)


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = _keys(tmp_path, ["tenant-a", "tenant-b"])
    return InstanceStore(engine, tmp_path / "blobs", keys, max_instance_bytes=10 * 1024 * 1024)


def _read(store, tenant, sop_uid) -> bytes:
    out = io.BytesIO()
    store.copy_out(tenant, sop_uid, out)
    return out.getvalue()


def test_round_trip_returns_the_same_bytes(store):
    data = generated()[0]
    result = store.store("tenant-a", io.BytesIO(data))
    assert result.outcome is Outcome.STORED
    assert _read(store, "tenant-a", result.sop_uid) == data


def test_data_at_rest_is_encrypted(store, tmp_path):
    data = generated(patient_id="SECRET-MRN-123")[0]
    store.store("tenant-a", io.BytesIO(data))
    blobs = [p for p in (tmp_path / "blobs").rglob("*.enc")]
    assert len(blobs) == 1
    raw = blobs[0].read_bytes()
    assert b"SECRET-MRN-123" not in raw
    assert b"DICM" not in raw
    assert b"Test^Patient" not in raw


def test_executable_preamble_is_zeroed_and_recorded(store):
    data = with_preamble(generated()[0], PE_HEADER)
    result = store.store("tenant-a", io.BytesIO(data))
    assert result.preamble_sanitised
    stored = _read(store, "tenant-a", result.sop_uid)
    assert stored[:128] == bytes(128)
    assert stored[128:] == data[128:]


def test_storing_twice_is_idempotent(store):
    data = generated()[0]
    store.store("tenant-a", io.BytesIO(data))
    again = store.store("tenant-a", io.BytesIO(data))
    assert again.outcome is Outcome.ALREADY_PRESENT
    assert len(store.instances("tenant-a")) == 1


def test_different_content_under_same_uid_is_refused_and_original_kept(store):
    data = generated()[0]
    result = store.store("tenant-a", io.BytesIO(data))
    tampered = data[:-4] + b"\x01\x02\x03\x04"
    with pytest.raises(InvalidInstance) as raised:
        store.store("tenant-a", io.BytesIO(tampered))
    assert raised.value.reason == REASON_DUPLICATE
    assert _read(store, "tenant-a", result.sop_uid) == data


def test_tenants_are_isolated(store):
    data = generated()[0]
    result = store.store("tenant-a", io.BytesIO(data))
    assert store.instances("tenant-b") == []
    with pytest.raises(KeyError):
        _read(store, "tenant-b", result.sop_uid)


def test_a_blob_moved_to_another_tenant_does_not_decrypt(store, tmp_path):
    """Even with database access, tenant B's key cannot open tenant A's blob."""
    a = store.store("tenant-a", io.BytesIO(generated(accession="A")[0]))
    b = store.store("tenant-b", io.BytesIO(generated(accession="B")[0]))
    blob_a = store.rows("tenant-a", sop_uid=a.sop_uid)[0].blob
    blob_b = store.rows("tenant-b", sop_uid=b.sop_uid)[0].blob
    (tmp_path / "blobs" / blob_b).write_bytes((tmp_path / "blobs" / blob_a).read_bytes())
    with pytest.raises(KeyUnavailable):
        _read(store, "tenant-b", b.sop_uid)


def test_rejected_input_stores_nothing(store, tmp_path):
    with pytest.raises(InvalidInstance):
        store.store("tenant-a", io.BytesIO(b"not dicom at all" * 20))
    assert store.instances("tenant-a") == []
    assert not [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]


def test_oversized_instance_is_refused(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = _keys(tmp_path, ["t"])
    small = InstanceStore(engine, tmp_path / "blobs", keys, max_instance_bytes=1024)
    with pytest.raises(InvalidInstance, match="exceeds the limit"):
        small.store("t", io.BytesIO(generated()[0]))


def test_keys_are_private_files_and_survive_restart(tmp_path):
    keys = _keys(tmp_path, ["t"])
    path = tmp_path / "keys" / "t.key"
    assert path.stat().st_mode & 0o777 == 0o600
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    store = InstanceStore(engine, tmp_path / "blobs", keys, 10 * 1024 * 1024)
    data = generated()[0]
    result = store.store("t", io.BytesIO(data))
    reopened = InstanceStore(engine, tmp_path / "blobs", _keys(tmp_path, ["t"]), 10 * 1024 * 1024)
    assert _read(reopened, "t", result.sop_uid) == data
    assert oct(os.stat(tmp_path / "keys").st_mode & 0o777) == oct(0o700)


def test_tenant_policy_may_replace_a_conflicting_instance(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    store = InstanceStore(
        engine,
        tmp_path / "blobs",
        _keys(tmp_path, ["t"]),
        10 * 1024 * 1024,
        replace_on_conflict=["t"],
    )
    data = generated()[0]
    first = store.store("t", io.BytesIO(data))
    corrected = data[:-4] + b"\x01\x02\x03\x04"
    second = store.store("t", io.BytesIO(corrected))
    assert second.outcome is Outcome.REPLACED
    assert _read(store, "t", first.sop_uid) == corrected
    assert len(store.instances("t")) == 1
    assert len([p for p in (tmp_path / "blobs").rglob("*.enc")]) == 1  # the old blob is gone


# -- batches -------------------------------------------------------------------------
def _blobs(tmp_path):
    return sorted(p for p in (tmp_path / "blobs").rglob("*") if p.is_file())


def test_a_batch_stores_each_instance_and_fails_only_the_bad_ones(store, tmp_path):
    good = generated(slices=3)
    with store.batch("tenant-a") as batch:
        tickets = [batch.add(io.BytesIO(good[0]))]
        with pytest.raises(InvalidInstance):
            batch.add(io.BytesIO(b"not dicom at all" * 20))
        tickets += [batch.add(io.BytesIO(data)) for data in good[1:]]
        results = batch.commit()
    assert tickets == [0, 1, 2]
    assert [r.outcome for r in results] == [Outcome.STORED] * 3
    for data, result in zip(good, results, strict=True):
        assert _read(store, "tenant-a", result.sop_uid) == data
    # One directory per tenant and hour: one fsync covers the batch. No temp file is left.
    blobs = _blobs(tmp_path)
    assert len(blobs) == 3
    assert len({p.parent for p in blobs}) == 1
    assert all(p.suffix == ".enc" for p in blobs)


def test_the_same_instance_twice_in_a_batch_is_stored_once(store, tmp_path):
    data = generated()[0]
    with store.batch("tenant-a") as batch:
        batch.add(io.BytesIO(data))
        batch.add(io.BytesIO(data))
        with pytest.raises(InvalidInstance) as raised:
            batch.add(io.BytesIO(data[:-4] + b"\x01\x02\x03\x04"))
        results = batch.commit()
    assert raised.value.reason == REASON_DUPLICATE
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.ALREADY_PRESENT]
    assert len(store.instances("tenant-a")) == 1
    assert len(_blobs(tmp_path)) == 1


def test_a_batch_sees_what_is_already_stored(store):
    first, second = generated(slices=2)
    store.store("tenant-a", io.BytesIO(first))
    with store.batch("tenant-a") as batch:
        batch.add(io.BytesIO(first))
        batch.add(io.BytesIO(second))
        results = batch.commit()
    assert [r.outcome for r in results] == [Outcome.ALREADY_PRESENT, Outcome.STORED]


def test_replace_policy_within_one_batch_keeps_the_last(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    store = InstanceStore(
        engine, tmp_path / "blobs", _keys(tmp_path, ["t"]), 10**7, replace_on_conflict=["t"]
    )
    data = generated()[0]
    corrected = data[:-4] + b"\x01\x02\x03\x04"
    with store.batch("t") as batch:
        batch.add(io.BytesIO(data))
        batch.add(io.BytesIO(corrected))
        results = batch.commit()
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.REPLACED]
    assert _read(store, "t", results[0].sop_uid) == corrected
    assert len(_blobs(tmp_path)) == 1


def test_a_failed_commit_fails_its_instances_and_removes_their_blobs(store, tmp_path, monkeypatch):
    import sqlalchemy.engine

    def broken(*args, **kwargs):
        raise OSError("database on fire")

    with store.batch("tenant-a") as batch:
        for data in generated(slices=2):
            batch.add(io.BytesIO(data))
        monkeypatch.setattr(sqlalchemy.engine.Engine, "begin", broken)
        results = batch.commit()
    assert all(isinstance(r, OSError) for r in results)
    monkeypatch.undo()
    assert store.instances("tenant-a") == []
    assert _blobs(tmp_path) == []


def test_a_concurrent_insert_is_settled_per_instance(store, tmp_path):
    """Another writer commits the same instance between this batch's check and commit."""
    first, second = generated(slices=2)
    with store.batch("tenant-a") as batch:
        batch.add(io.BytesIO(first))
        batch.add(io.BytesIO(second))
        store.store("tenant-a", io.BytesIO(first))  # the other writer wins the race
        results = batch.commit()
    assert [r.outcome for r in results] == [Outcome.ALREADY_PRESENT, Outcome.STORED]
    assert len(store.instances("tenant-a")) == 2
    assert len(_blobs(tmp_path)) == 2  # the loser's blob was removed


def test_an_uncommitted_batch_leaves_nothing(store, tmp_path):
    with store.batch("tenant-a") as batch:
        batch.add(io.BytesIO(generated()[0]))
    assert store.instances("tenant-a") == []
    assert _blobs(tmp_path) == []


def test_a_header_already_read_is_not_read_again(store, monkeypatch):
    from exchange.dicom.part10 import read_header
    from exchange.node import store as store_module

    data = generated()[0]
    header = read_header(io.BytesIO(data))

    def no(*args, **kwargs):
        raise AssertionError("parsed twice")

    monkeypatch.setattr(store_module, "read_header", no)
    result = store.store("tenant-a", io.BytesIO(data), header)
    assert result.outcome is Outcome.STORED
    assert _read(store, "tenant-a", result.sop_uid) == data
