"""A node killed mid-delivery leaves its claim behind; its next start frees it (issue 11).

Found by tests/faults/test_kill_publishing.py: the claim held the study back from the
hub for a minute (``CLAIM_SECONDS``) after every such crash.
"""

from __future__ import annotations

from exchange.database import make_engine
from exchange.node import outbox
from exchange.node.outbox import PUBLISH, Outbox
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key


def test_a_claim_left_by_a_killed_node_is_freed_when_it_starts_again(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = FileKeyStore(tmp_path / "keys", master_key(None, tmp_path / "master.key"), ["t"])
    store = InstanceStore(engine, tmp_path / "blobs", keys, max_instance_bytes=1024 * 1024)
    seal = store.seal("t")
    key = seal.blind("study", "1.2.3")
    box = Outbox(engine, clock=lambda: 1_000_000.0)
    box.enqueue("t", {key: outbox.seal_uid(seal, key, "1.2.3")}, PUBLISH)
    (entry,) = box.due()
    assert box.claim(entry, seconds=60)  # then the process died, mid-delivery
    assert box.due() == []

    assert box.release_claims() == 1  # what the publisher does when it starts
    (again,) = box.due()
    assert again.id == entry.id
    assert box.claim(again)
