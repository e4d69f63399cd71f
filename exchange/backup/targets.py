"""Where backups go: a directory, or S3-compatible object storage through boto3.

Both offer the same few operations on keys (``/``-separated paths relative to the
backup location), and every write is all-or-nothing: a directory gets a temp file,
fsynced, renamed into place; an S3 object appears only when its upload completes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from exchange.backup.errors import BackupError, MissingFile
from exchange.config import Settings
from exchange.files import write_atomic

CHUNK = 1024 * 1024
_TEMP_PREFIX = ".incoming-"


class Target(Protocol):
    #: For messages: the location as the operator gave it.
    description: str

    def list(self, prefix: str) -> dict[str, int]:
        """Every key under ``prefix`` with its size."""
        ...

    def size(self, key: str) -> int | None:
        """The object's size, None if absent."""
        ...

    def put_file(self, key: str, source: Path) -> None:
        """Store a local file under ``key`` atomically."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """The object's content (``MissingFile`` if absent)."""
        ...

    def open(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A readable stream over the object (``MissingFile`` if absent)."""
        ...

    def scratch(self) -> Path:
        """A new local directory for files on their way in or out (caller removes it)."""
        ...


def _clean_key(key: str) -> str:
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BackupError(f"invalid path in backup: {key!r}")
    return str(path)


class DirectoryTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def list(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix) if prefix else self.root
        found: dict[str, int] = {}
        if not base.is_dir():
            return found
        for directory, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(_TEMP_PREFIX):
                    continue
                path = Path(directory) / name
                with contextlib.suppress(FileNotFoundError):
                    found[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return found

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data, mode=0o600)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingFile(f"{key} is missing from {self.description}") from None

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        try:
            handle = self._path(key).open("rb")
        except FileNotFoundError:
            raise MissingFile(f"{key} is missing from {self.description}") from None
        with handle:
            yield handle

    def scratch(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=_TEMP_PREFIX))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Target:
    """An ``s3://bucket/prefix`` location (boto3; any S3-compatible service)."""

    def __init__(self, bucket: str, prefix: str, client: Any, description: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.description = description
        self._client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}{_clean_key(key)}"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "error"))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise MissingFile(f"{what} is missing from {self.description}") from None
            raise BackupError(
                f"{self.description}: {what}: {code} {error.get('Message', '')}".rstrip()
            ) from None
        except BotoCoreError as exc:
            raise BackupError(f"{self.description}: {what}: {exc}") from None

    def list(self, prefix: str) -> dict[str, int]:
        found: dict[str, int] = {}
        full = f"{self.prefix}{prefix}"
        with self._errors(f"listing {prefix or '/'}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found[str(item["Key"])[len(self.prefix) :]] = int(item["Size"])
        return found

    def size(self, key: str) -> int | None:
        try:
            with self._errors(key):
                head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except MissingFile:
            return None
        return int(head["ContentLength"])

    def put_file(self, key: str, source: Path) -> None:
        with self._errors(f"uploading {key}"):
            self._client.upload_file(str(source), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"uploading {key}"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        with self._errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            with self._errors(key):
                yield body
        finally:
            body.close()

    def scratch(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="exchange-backup-"))


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def open_target(location: str, settings: Settings, *, create: bool = False) -> Target:
    """The backup location ``location``: a directory path or ``s3://bucket/prefix``."""
    if is_s3(location):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise BackupError(f"{location}: no bucket named (s3://BUCKET/PREFIX)")
        prefix = prefix.strip("/")
        return S3Target(
            bucket, f"{prefix}/" if prefix else "", _s3_client(settings), location.rstrip("/")
        )
    root = Path(location).expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    elif not root.exists():
        raise BackupError(f"{root} does not exist")
    if not root.is_dir():
        raise BackupError(f"{root} is not a directory")
    return DirectoryTarget(root)


def _s3_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    endpoint = settings.backup_s3_endpoint_url
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise BackupError("EXCHANGE_BACKUP_S3_ENDPOINT_URL must be an http:// or https:// URL")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )
