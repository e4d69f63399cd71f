"""``exchange backup verify``: check a backup without restoring it.

Every file the manifest lists is read back and checked for presence, size and
SHA-256; each one that fails is named. With the backup key, the dump's schema is
decrypted (the key opens the dump) and, with the key location, the key bundle is
checked and opened.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

from exchange.backup import manifest
from exchange.backup.crypto import BackupKey
from exchange.backup.errors import BackupError, MissingFile
from exchange.backup.manifest import Manifest
from exchange.backup.progress import Progress
from exchange.backup.snapshot import SCHEMA_FILE, dump_aad
from exchange.backup.targets import CHUNK, Target


@dataclass
class VerifyReport:
    snapshots: list[Manifest]
    checked: int = 0
    checked_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        lines = [
            f"snapshot {m.id} ({m.service}, {m.created}): {len(m.files)} database files, "
            f"{len(m.blobs)} blobs"
            for m in self.snapshots
        ]
        lines.append(f"checked {self.checked} files ({self.checked_bytes:,} bytes)")
        lines += [f"  note: {note}" for note in self.notes]
        if self.problems:
            lines.append(f"BACKUP DAMAGED: {len(self.problems)} problem(s)")
            lines += [f"  {problem}" for problem in self.problems]
        else:
            lines.append("backup intact")
        return lines


def check_file(target: Target, key: str, size: int, sha256: str) -> str | None:
    """What is wrong with one file of the backup, None if nothing."""
    digest = hashlib.sha256()
    seen = 0
    try:
        with target.open(key) as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                seen += len(chunk)
    except MissingFile:
        return f"{key}: missing"
    if seen != size:
        return f"{key}: corrupted (size {seen:,} bytes, the manifest says {size:,})"
    if digest.hexdigest() != sha256:
        return f"{key}: corrupted (SHA-256 differs from the manifest)"
    return None


def verify(
    target: Target,
    snapshots: list[Manifest],
    key: BackupKey | None,
    keys_target: Target | None,
    progress: Progress,
) -> VerifyReport:
    report = VerifyReport(snapshots)
    seen_blobs: set[str] = set()
    for snapshot in snapshots:
        blobs = [b for b in snapshot.blobs if b.key not in seen_blobs]
        seen_blobs.update(b.key for b in blobs)
        with progress.task("verifying", len(snapshot.files) + len(blobs)) as advance:
            for entry in snapshot.files:
                problem = check_file(target, entry.path, entry.size, entry.sha256)
                _count(report, problem, entry.size)
                advance(1)
            for blob in blobs:
                problem = check_file(target, blob.key, blob.size, blob.sha256)
                if problem is not None:
                    problem += f" [node blob {blob.blob}]"
                _count(report, problem, blob.size)
                advance(1)
        if key is not None:
            _check_dump_key(target, snapshot, key, report)
        _check_keys(snapshot, key, keys_target, report)
    if key is None:
        report.notes.append("no backup key given: the dump's encryption was not checked")
    return report


def _count(report: VerifyReport, problem: str | None, size: int) -> None:
    report.checked += 1
    if problem is None:
        report.checked_bytes += size
    else:
        report.problems.append(problem)


def _check_dump_key(
    target: Target, snapshot: Manifest, key: BackupKey, report: VerifyReport
) -> None:
    schema_key = manifest.snapshot_key(snapshot.id, f"db/{SCHEMA_FILE}")
    try:
        data = target.get_bytes(schema_key)
        for _chunk in key.decrypt(io.BytesIO(data), dump_aad(snapshot.id, SCHEMA_FILE)):
            pass
    except MissingFile:
        return  # already reported
    except BackupError as exc:
        report.problems.append(f"{schema_key}: {exc.message}")
    except Exception as exc:  # DamagedBlob and the like: the file fails authentication
        report.problems.append(f"{schema_key}: does not decrypt ({type(exc).__name__})")


def _check_keys(
    snapshot: Manifest, key: BackupKey | None, keys_target: Target | None, report: VerifyReport
) -> None:
    if snapshot.keys is None:
        report.notes.append(f"snapshot {snapshot.id} has no key bundle (taken with --no-keys)")
        return
    if keys_target is None:
        report.notes.append(
            f"key bundle {snapshot.keys['file']} not checked (no --keys-from location)"
        )
        return
    name = str(snapshot.keys["file"])
    problem = check_file(
        keys_target, name, int(snapshot.keys["size"]), str(snapshot.keys["sha256"])
    )
    if problem is not None:
        report.problems.append(f"{keys_target.description}/{problem}")
        return
    report.checked += 1
    if key is None:
        return
    try:
        key.unwrap_bundle(keys_target.get_bytes(name))
    except BackupError as exc:
        report.problems.append(f"{keys_target.description}/{name}: {exc.message}")
