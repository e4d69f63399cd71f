"""The backup key: it encrypts database dumps and wraps exported keys (``cryptography``).

One random 256-bit key, held by the operator apart from the backups (a 0600 file or
an environment secret). Two subkeys are derived from it with HKDF, one for database
dumps (streamed through the same envelope format as node blobs) and one for key
bundles (AES-256-GCM over the whole bundle, its header bound as associated data), so
neither use can be turned into the other. A key id (also derived) lets a restore say
"wrong backup key" instead of failing obscurely.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from exchange.backup.errors import BackupError
from exchange.config import Settings
from exchange.errors import ConfigurationError
from exchange.security import envelope

KEY_BYTES = 32
NONCE_BYTES = 12
BUNDLE_FORMAT = "exchange-keys/1"
#: The envelope's "tenant" for dump files (the envelope API names whose key wraps).
_DUMP_OWNER = "backup"
NO_KEY = (
    "no backup key: set EXCHANGE_BACKUP_KEY_FILE (or EXCHANGE_BACKUP_KEY), or pass "
    "--backup-key-file; 'exchange backup key --out FILE' makes one"
)


def _derive(key: bytes, purpose: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose.encode()
    ).derive(key)


class WrongBackupKey(BackupError):
    """Data was sealed with another backup key (or was altered)."""


class _DumpKeys:
    """The envelope's ``KeyStore`` over the backup key: wraps each dump file's data key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def wrap(self, tenant: str, data_key: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self._key).encrypt(nonce, data_key, aad)

    def unwrap(self, tenant: str, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(self._key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise WrongBackupKey(
                "the backup does not open with this backup key (another key, or altered data)"
            ) from None

    def subkey(self, tenant: str, purpose: str) -> bytes:  # pragma: no cover - unused here
        raise NotImplementedError


class BackupKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError("the backup key must be 32 bytes (base64-encoded)")
        self._dump = _DumpKeys(_derive(key, "exchange-backup:v1:dump"))
        self._bundle = _derive(key, "exchange-backup:v1:keys")
        self.key_id = _derive(key, "exchange-backup:v1:id").hex()[:16]

    # -- dump files --------------------------------------------------------
    def encrypt(self, chunks: Iterable[bytes], out: BinaryIO, aad: bytes) -> None:
        envelope.encrypt(chunks, out, self._dump, _DUMP_OWNER, aad)

    def decrypt(self, raw: BinaryIO, aad: bytes) -> Iterator[bytes]:
        """Plaintext chunks; the tag is checked after the last (``WrongBackupKey`` or
        ``DamagedBlob``), so consume them all before trusting any."""
        return envelope.decrypt_chunks(raw, self._dump, _DUMP_OWNER, aad)

    # -- key bundles -------------------------------------------------------
    def wrap_bundle(self, header: dict[str, Any], files: dict[str, bytes]) -> bytes:
        header = {**header, "format": BUNDLE_FORMAT, "key_id": self.key_id}
        aad = _canonical(header)
        payload = _canonical({k: base64.b64encode(v).decode() for k, v in files.items()})
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self._bundle).encrypt(nonce, payload, aad)
        return _canonical(
            {
                "header": header,
                "nonce": base64.b64encode(nonce).decode(),
                "ciphertext": base64.b64encode(sealed).decode(),
            }
        )

    def unwrap_bundle(self, data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            outer = json.loads(data)
            header = outer["header"]
            nonce = base64.b64decode(outer["nonce"], validate=True)
            sealed = base64.b64decode(outer["ciphertext"], validate=True)
        except (ValueError, KeyError, TypeError):
            raise BackupError("the key bundle is damaged (not a key bundle)") from None
        if not isinstance(header, dict) or header.get("format") != BUNDLE_FORMAT:
            raise BackupError("the key bundle is damaged or of an unknown format")
        if header.get("key_id") != self.key_id:
            raise WrongBackupKey(
                f"the key bundle was wrapped with another backup key (id {header.get('key_id')},"
                f" this key's id is {self.key_id})"
            )
        try:
            payload = AESGCM(self._bundle).decrypt(nonce, sealed, _canonical(header))
        except (InvalidTag, ValueError):
            raise BackupError("the key bundle is damaged: it fails authentication") from None
        files = {k: base64.b64decode(v) for k, v in json.loads(payload).items()}
        return header, files


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def load_backup_key(settings: Settings, key_file: Path | None = None) -> BackupKey | None:
    """The backup key from ``key_file``, else the settings (file, then secret); None if none."""
    path = key_file or settings.backup_key_file
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"backup key file {path}: {exc.strerror or exc}") from None
        return BackupKey(_decode(raw.strip(), f"backup key file {path}"))
    if settings.backup_key is not None:
        secret = settings.backup_key.get_secret_value().encode()
        return BackupKey(_decode(secret, "EXCHANGE_BACKUP_KEY"))
    return None


def require_backup_key(settings: Settings, key_file: Path | None = None) -> BackupKey:
    key = load_backup_key(settings, key_file)
    if key is None:
        raise ConfigurationError(NO_KEY)
    return key


def _decode(text: bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{where}: not base64 of 32 bytes") from None
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"{where}: must be 32 bytes (base64-encoded)")
    return key


def create_key_file(path: Path) -> str:
    """Write a new random backup key to ``path`` (0600, never over an existing file)."""
    key = base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists; a backup key is never overwritten") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
        handle.flush()
        os.fsync(handle.fileno())
    return BackupKey(base64.b64decode(key.strip())).key_id


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a local file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(envelope.CHUNK)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return digest.hexdigest(), size
