"""The ``exchange backup`` / ``backup verify`` / ``backup key`` / ``restore`` verbs.

Each returns an exit code and prints its report; errors are ``ExchangeError`` s that
the CLI turns into one line (exit 1, or 2 for configuration and usage).
"""

from __future__ import annotations

import sys
from pathlib import Path

from exchange.backup import manifest
from exchange.backup.crypto import create_key_file, load_backup_key, require_backup_key
from exchange.backup.layout import service_for
from exchange.backup.progress import Progress
from exchange.backup.restore import choose, read_bundle, restore
from exchange.backup.snapshot import backup
from exchange.backup.targets import is_s3, open_target
from exchange.backup.verify import verify
from exchange.config import Settings
from exchange.errors import ConfigurationError


def _same_place(first: str, second: str) -> bool:
    if is_s3(first) or is_s3(second):
        return first.rstrip("/") == second.rstrip("/")
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def run_backup(
    settings: Settings,
    destination: str,
    *,
    role: str | None,
    keys_to: str | None,
    no_keys: bool,
    key_file: Path | None,
    quiet: bool,
) -> int:
    if keys_to is None and not no_keys:
        raise ConfigurationError(
            "the keys are exported apart from the data: pass --keys-to LOCATION (another "
            "directory or bucket; the same as --to only if you mean it), or --no-keys"
        )
    if keys_to is not None and no_keys:
        raise ConfigurationError("--keys-to and --no-keys exclude each other")
    service = service_for(settings, role)
    key = require_backup_key(settings, key_file)
    target = open_target(destination, settings, create=True)
    keys_target = open_target(keys_to, settings, create=True) if keys_to else None
    report = backup(service, target, keys_target, key, Progress(not quiet))
    if keys_to is not None and _same_place(destination, keys_to):
        report.notes.append("the key bundle is stored beside the data (--keys-to = --to)")
    print("\n".join(report.lines()))
    return 0


def run_verify(
    settings: Settings,
    source: str,
    *,
    snapshot_id: str | None,
    keys_from: str | None,
    key_file: Path | None,
    quiet: bool,
) -> int:
    target = open_target(source, settings)
    snapshots = manifest.select(target, snapshot_id, None)
    keys_target = None
    if keys_from is not None:
        path = Path(keys_from).expanduser()
        if not is_s3(keys_from) and path.is_file():
            keys_target = open_target(str(path.parent), settings)
        else:
            keys_target = open_target(keys_from, settings)
    key = load_backup_key(settings, key_file)
    report = verify(target, snapshots, key, keys_target, Progress(not quiet))
    print("\n".join(report.lines()))
    if not report.ok:
        for problem in report.problems:
            print(f"exchange: error: {problem}", file=sys.stderr)
        return 1
    return 0


def run_restore(
    settings: Settings,
    source: str,
    *,
    role: str | None,
    snapshot_id: str | None,
    keys_from: str | None,
    key_file: Path | None,
    force: bool,
    quiet: bool,
) -> int:
    service = service_for(settings, role)
    key = require_backup_key(settings, key_file)
    target = open_target(source, settings)
    chosen = choose(target, snapshot_id, service)
    keys_target = None
    if keys_from is not None and (is_s3(keys_from) or Path(keys_from).expanduser().is_dir()):
        keys_target = open_target(keys_from, settings)
    elif keys_from is not None and not Path(keys_from).expanduser().is_file():
        raise ConfigurationError(f"--keys-from {keys_from}: no such file or directory")
    bundle = read_bundle(keys_target, keys_from, chosen)
    secret = settings.master_key.get_secret_value() if settings.master_key else None
    report = restore(service, target, chosen, bundle, key, force, Progress(not quiet), secret)
    print("\n".join(report.lines()))
    return 0


def run_keygen(out: Path) -> int:
    key_id = create_key_file(out)
    print(f"wrote a new backup key to {out} (mode 0600, key id {key_id})")
    print("keep it apart from the backups: without it they cannot be restored")
    return 0
