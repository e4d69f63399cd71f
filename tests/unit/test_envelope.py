"""Envelope encryption: per-blob data keys, authenticated, streamed, shreddable."""

import io

import pytest

from exchange.security import envelope
from exchange.security.keystore import FileKeyStore, KeyUnavailable, master_key, shred


@pytest.fixture
def keys(tmp_path):
    return FileKeyStore(tmp_path / "tenants", master_key(None, tmp_path / "master.key"), ["a", "b"])


def _seal(keys, data: bytes, tenant="a", aad=b"aad") -> bytes:
    out = io.BytesIO()
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert envelope.encrypt(chunks, out, keys, tenant, aad) == len(data)
    return out.getvalue()


def _open(keys, blob: bytes, tenant="a", aad=b"aad") -> bytes:
    return b"".join(envelope.decrypt_chunks(io.BytesIO(blob), keys, tenant, aad, chunk_size=777))


def test_round_trip_in_chunks(keys):
    data = bytes(range(256)) * 5000
    assert _open(keys, _seal(keys, data)) == data


def test_each_blob_has_its_own_data_key(keys):
    data = b"same plaintext" * 100
    assert _seal(keys, data) != _seal(keys, data)


@pytest.mark.parametrize("position", [0, 20, -1, -20, -200])
def test_any_flipped_byte_is_detected(keys, position):
    blob = bytearray(_seal(keys, b"x" * 5000))
    blob[position] ^= 0x01
    with pytest.raises((envelope.DamagedBlob, KeyUnavailable)):
        _open(keys, bytes(blob))


def test_truncation_is_detected(keys):
    blob = _seal(keys, b"y" * 5000)
    with pytest.raises(envelope.DamagedBlob):
        _open(keys, blob[:-100])


def test_other_associated_data_does_not_open(keys):
    with pytest.raises(KeyUnavailable):
        _open(keys, _seal(keys, b"z" * 100, aad=b"sop-1"), aad=b"sop-2")


def test_other_tenant_does_not_open(keys):
    with pytest.raises(KeyUnavailable):
        _open(keys, _seal(keys, b"z" * 100, tenant="a"), tenant="b")


def test_wrong_master_key_refuses_to_start(tmp_path):
    FileKeyStore(tmp_path / "tenants", master_key(None, tmp_path / "m1"), ["a"])
    from exchange.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="master key"):
        FileKeyStore(tmp_path / "tenants", master_key(None, tmp_path / "m2"), ["a"])


def test_master_key_from_environment_secret(tmp_path):
    import base64

    secret = base64.b64encode(bytes(range(32))).decode()
    assert master_key(secret, tmp_path / "unused") == bytes(range(32))
    assert not (tmp_path / "unused").exists()
    from exchange.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="32 bytes"):
        master_key(base64.b64encode(b"short").decode(), tmp_path / "unused")


def test_shredding_makes_data_unreadable_for_ever(tmp_path):
    master = master_key(None, tmp_path / "master.key")
    keys = FileKeyStore(tmp_path / "tenants", master, ["a"])
    blob = _seal(keys, b"patient images" * 100)
    assert shred(tmp_path / "tenants", "a")
    assert not (tmp_path / "tenants" / "a.key").exists()
    from exchange.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="shredded"):
        FileKeyStore(tmp_path / "tenants", master, ["a"])
    reopened = FileKeyStore(tmp_path / "tenants", master, [])
    with pytest.raises(KeyUnavailable):
        _open(reopened, blob)
