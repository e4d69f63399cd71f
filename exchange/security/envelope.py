"""Envelope-encrypted blobs: one random AES-256-GCM data key per blob.

Layout: ``EXV1`` | header length (4 bytes, big-endian) | header | ciphertext | tag (16).
The header holds the data key wrapped by the tenant key and the GCM nonce.
The associated data (tenant and SOP Instance UID) is bound into both the
wrapped key and the content, so a blob moved to another tenant or instance
fails to decrypt. Encryption and decryption stream in chunks: memory stays
bounded whatever the size of the instance.
"""

from __future__ import annotations

import io
import json
import secrets
import struct
from base64 import b64decode, b64encode
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from exchange.errors import ExchangeError
from exchange.security.keystore import KeyStore

MAGIC = b"EXV1"
TAG_BYTES = 16
NONCE_BYTES = 12
CHUNK = 1024 * 1024


class DamagedBlob(ExchangeError):
    """The blob failed authentication: it was altered, moved or truncated."""

    status = 500
    code = "exception"


class Sealer:
    """Encrypts one blob: its envelope header, then the content in pieces, then the tag.

    ``update_into`` writes into the caller's buffer, so a writer can reuse the same two
    buffers for every blob instead of allocating (and page-faulting) fresh ones per chunk.
    """

    def __init__(self, keys: KeyStore, tenant: str, aad: bytes) -> None:
        data_key = secrets.token_bytes(32)
        nonce = secrets.token_bytes(NONCE_BYTES)
        header = json.dumps(
            {
                "alg": "A256GCM",
                "wrapped_key": b64encode(keys.wrap(tenant, data_key, aad)).decode(),
                "nonce": b64encode(nonce).decode(),
            }
        ).encode()
        #: What precedes the ciphertext in the blob.
        self.prefix = MAGIC + struct.pack(">I", len(header)) + header
        self._encryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
        self._encryptor.authenticate_additional_data(aad + header)

    def update(self, chunk: bytes) -> bytes:
        return self._encryptor.update(chunk)

    def update_into(self, chunk: bytes | memoryview, out: bytearray | memoryview) -> int:
        """Encrypt ``chunk`` into ``out`` (at least ``len(chunk) + 15`` bytes); bytes written."""
        return self._encryptor.update_into(chunk, out)

    def finalize(self) -> bytes:
        """What follows the ciphertext: the rest of it (none for GCM) and the tag."""
        final = self._encryptor.finalize()
        return final + self._encryptor.tag


def encrypt(chunks: Iterable[bytes], out: BinaryIO, keys: KeyStore, tenant: str, aad: bytes) -> int:
    """Write the envelope of ``chunks`` to ``out``; returns the plaintext length."""
    sealer = Sealer(keys, tenant, aad)
    out.write(sealer.prefix)
    length = 0
    for chunk in chunks:
        length += len(chunk)
        out.write(sealer.update(chunk))
    out.write(sealer.finalize())
    return length


def _read_header(raw: BinaryIO) -> tuple[dict[str, str], bytes]:
    prefix = raw.read(8)
    if len(prefix) != 8 or prefix[:4] != MAGIC:
        raise DamagedBlob("stored blob has no envelope header")
    (length,) = struct.unpack(">I", prefix[4:])
    if length > 64 * 1024:
        raise DamagedBlob("stored blob header is implausibly long")
    header_bytes = raw.read(length)
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise DamagedBlob("stored blob header is damaged") from None
    return header, header_bytes


def decrypt_chunks(
    raw: BinaryIO, keys: KeyStore, tenant: str, aad: bytes, chunk_size: int = CHUNK
) -> Iterator[bytes]:
    """Plaintext of the blob in ``raw`` (a seekable file), chunk by chunk.

    The GCM tag is checked when the last chunk has been produced; a damaged
    blob raises ``DamagedBlob`` then, so a streaming caller must abort.
    """
    header, header_bytes = _read_header(raw)
    try:
        wrapped = b64decode(header["wrapped_key"])
        nonce = b64decode(header["nonce"])
    except (KeyError, ValueError):
        raise DamagedBlob("stored blob header is damaged") from None
    data_key = keys.unwrap(tenant, wrapped, aad)
    start = raw.tell()
    end = raw.seek(0, io.SEEK_END)
    if end - start < TAG_BYTES:
        raise DamagedBlob("stored blob is truncated")
    raw.seek(end - TAG_BYTES)
    tag = raw.read(TAG_BYTES)
    raw.seek(start)
    decryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce, tag)).decryptor()
    decryptor.authenticate_additional_data(aad + header_bytes)
    remaining = end - TAG_BYTES - start
    # One reused input buffer: a fresh 1 MiB bytes per chunk costs more than decrypting it.
    buffer = memoryview(bytearray(min(chunk_size, max(remaining, 0))))
    readinto = getattr(raw, "readinto", None)
    while remaining > 0:
        wanted = buffer[: min(chunk_size, remaining)]
        if readinto is not None:
            count = readinto(wanted) or 0
        else:
            data = raw.read(len(wanted))
            count = len(data)
            wanted[:count] = data
        if not count:
            raise DamagedBlob("stored blob is truncated")
        remaining -= count
        yield decryptor.update(wanted[:count])
    try:
        final = decryptor.finalize()
    except InvalidTag:
        raise DamagedBlob("stored blob failed authentication") from None
    if final:
        yield final


class DecryptingReader(io.RawIOBase):
    """A read-only file object over ``decrypt_chunks`` (for pydicom and copy loops)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size
