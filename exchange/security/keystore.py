"""Tenant keys for envelope encryption, protected by a master key.

Each instance gets its own random data key; the tenant's key only ever wraps
and unwraps data keys (AES-256-GCM, ``cryptography``). Tenant keys are stored
encrypted under the master key, which comes from ``EXCHANGE_MASTER_KEY``
(base64 of 32 bytes) or a 0600 file. A KMS would implement the same
``KeyStore`` protocol. Deleting a tenant's key makes all of its data
unreadable (crypto-shredding).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from exchange.errors import ConfigurationError, ExchangeError
from exchange.files import write_atomic

KEY_BYTES = 32
NONCE_BYTES = 12
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyUnavailable(ExchangeError):
    """A key needed to read data is missing or does not fit (shredded, damaged, wrong master)."""

    status = 503
    code = "transient"


class KeyStore(Protocol):
    def wrap(self, tenant: str, data_key: bytes, aad: bytes) -> bytes:
        """Encrypt a data key under the tenant's key."""
        ...

    def unwrap(self, tenant: str, wrapped: bytes, aad: bytes) -> bytes:
        """Recover a data key (``KeyUnavailable`` if the tenant key is gone or wrong)."""
        ...

    def subkey(self, tenant: str, purpose: str) -> bytes:
        """A 256-bit key for ``purpose`` (metadata sealing, blind indexes) of the tenant."""
        ...


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)


def master_key(secret: str | None, path: Path) -> bytes:
    """The master key from the environment secret, else from (or created at) ``path``."""
    if secret:
        try:
            key = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError("EXCHANGE_MASTER_KEY: not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigurationError("EXCHANGE_MASTER_KEY: must be 32 bytes (base64-encoded)")
        return key
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"master key file {path} is damaged")
        return key
    key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
    write_atomic(path, key, mode=0o600)
    return key


class FileKeyStore:
    """Tenant keys as files under ``directory``, each sealed by the master key."""

    def __init__(self, directory: Path, master: bytes, tenants: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._directory = directory
        self._master = master
        self._keys: dict[str, bytes] = {}
        for tenant in tenants:
            self._keys[tenant] = self._load_or_create(tenant)

    def _path(self, tenant: str) -> Path:
        if not _TENANT.match(tenant):
            raise ConfigurationError(f"invalid tenant id {tenant!r}")
        return self._directory / f"{tenant}.key"

    def _load_or_create(self, tenant: str) -> bytes:
        path = self._path(tenant)
        aad = f"exchange:tenant-key:{tenant}".encode()
        if path.exists():
            try:
                return _open(self._master, path.read_bytes(), aad)
            except (InvalidTag, ValueError):
                raise ConfigurationError(
                    f"the key of tenant {tenant!r} does not open with this master key"
                ) from None
        if (self._directory / f"{tenant}.shredded").exists():
            raise ConfigurationError(
                f"tenant {tenant!r} was crypto-shredded; its data is gone. "
                "Remove it from EXCHANGE_TENANTS"
            )
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        write_atomic(path, _seal(self._master, key, aad), mode=0o600)
        return key

    def wrap(self, tenant: str, data_key: bytes, aad: bytes) -> bytes:
        key = self._keys.get(tenant)
        if key is None:
            raise KeyUnavailable(f"no key for tenant {tenant!r}")
        return _seal(key, data_key, aad)

    def unwrap(self, tenant: str, wrapped: bytes, aad: bytes) -> bytes:
        key = self._keys.get(tenant)
        if key is None:
            raise KeyUnavailable(f"no key for tenant {tenant!r}")
        try:
            return _open(key, wrapped, aad)
        except (InvalidTag, ValueError):
            raise KeyUnavailable("the data key does not open with the tenant's key") from None

    def subkey(self, tenant: str, purpose: str) -> bytes:
        key = self._keys.get(tenant)
        if key is None:
            raise KeyUnavailable(f"no key for tenant {tenant!r}")
        return HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_BYTES,
            salt=None,
            info=f"exchange:{tenant}:{purpose}".encode(),
        ).derive(key)

    def has(self, tenant: str) -> bool:
        return tenant in self._keys

    @property
    def tenants(self) -> list[str]:
        return sorted(self._keys)


def shred(directory: Path, tenant: str) -> bool:
    """Destroy a tenant's key so none of its data can ever be decrypted again."""
    path = directory / f"{tenant}.key"
    if not _TENANT.match(tenant) or not path.exists():
        return False
    size = path.stat().st_size
    with path.open("r+b") as handle:  # overwrite before unlinking (best effort on COW disks)
        handle.write(secrets.token_bytes(size))
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    write_atomic(directory / f"{tenant}.shredded", b"", mode=0o600)
    return True
