"""Per-tenant data-encryption keys (Tink streaming AEAD keysets).

Each tenant's DICOM is encrypted under its own AES-256-GCM-HKDF streaming key,
so one tenant's key opens nothing of another's and a multi-GB instance is
encrypted in 1 MiB segments without being held in memory. Keys live behind
the ``KeyStore`` protocol: 0600 files here, a KMS-wrapped keyset in a larger
deployment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

import tink
from tink import secret_key_access, streaming_aead

from exchange.errors import ConfigurationError
from exchange.files import write_atomic

streaming_aead.register()

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TEMPLATE = streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB


class KeyStore(Protocol):
    def cipher_for(self, tenant: str) -> streaming_aead.StreamingAead:
        """The tenant's streaming cipher (``KeyError`` for an unknown tenant)."""
        ...


class FileKeyStore:
    """Keysets as 0600 files under ``directory``, created for the configured tenants."""

    def __init__(self, directory: Path, tenants: list[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._directory = directory
        self._ciphers = {tenant: self._load_or_create(tenant) for tenant in tenants}

    def _load_or_create(self, tenant: str) -> streaming_aead.StreamingAead:
        if not _TENANT.match(tenant):
            raise ConfigurationError(f"EXCHANGE_TENANTS: invalid tenant id {tenant!r}")
        path = self._directory / f"{tenant}.keyset"
        if path.exists():
            try:
                handle = tink.proto_keyset_format.parse(path.read_bytes(), secret_key_access.TOKEN)
            except tink.TinkError:
                raise ConfigurationError(f"the key for tenant {tenant!r} is damaged") from None
        else:
            handle = tink.new_keyset_handle(_TEMPLATE)
            data = tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
            write_atomic(path, data, mode=0o600)
        return handle.primitive(streaming_aead.StreamingAead)

    def cipher_for(self, tenant: str) -> streaming_aead.StreamingAead:
        return self._ciphers[tenant]

    @property
    def tenants(self) -> list[str]:
        return sorted(self._ciphers)
