"""``exchange import``: files, folders and DICOMDIRs into a node's store.

Every input file ends up counted as stored, already present or rejected; a
rejected file is copied to the quarantine folder with a ``.reason.txt`` beside
it. Nothing is silently dropped, and a re-run only reports "already present".
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from exchange.config import Settings
from exchange.dicom.part10 import InvalidInstance
from exchange.errors import ConfigurationError
from exchange.node.services import build, service_name
from exchange.node.store import InstanceStore, Outcome

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class ImportReport:
    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    sanitised: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # not DICOM at all: it will be rejected on import
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def _dicomdir_files(path: Path) -> Iterator[Path]:
    try:
        directory = pydicom.dcmread(path)
    except Exception as exc:
        raise ConfigurationError(
            f"{path} is not a readable DICOMDIR ({type(exc).__name__})"
        ) from None
    root = path.parent
    for record in directory.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if file_id:
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            yield root.joinpath(*parts)


def collect(path: Path) -> list[Path]:
    """The instance files ``path`` names: a file, a DICOMDIR's references, or a folder's files."""
    if not path.exists():
        raise ConfigurationError(f"{path} does not exist")
    if path.is_file():
        return list(_dicomdir_files(path)) if _is_dicomdir(path) else [path]
    files = []
    for candidate in sorted(path.rglob("*")):
        if (
            candidate.is_file()
            and not candidate.name.startswith(".")
            and not _is_dicomdir(candidate)
        ):
            files.append(candidate)
    return files


def _quarantine(directory: Path, source: Path, reason: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)[:80] or "file"
    target = directory / f"{stamp}-{safe}"
    if source.exists():
        shutil.copy2(source, target)
    target.with_name(target.name + ".reason.txt").write_text(
        f"source: {source}\nreason: {reason}\nat: {datetime.now(UTC).isoformat()}\n"
    )


def import_files(
    store: InstanceStore, tenant: str, files: list[Path], quarantine: Path, progress: bool = False
) -> ImportReport:
    report = ImportReport()
    with Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("import", total=len(files), status="")
        for path in files:
            try:
                with path.open("rb") as source:
                    result = store.store(tenant, source)
                report.counts[result.outcome.value] += 1
                report.sanitised += result.preamble_sanitised and result.outcome is Outcome.STORED
            except InvalidInstance as exc:
                report.counts["rejected"] += 1
                report.rejected.append((path, exc.message))
                _quarantine(quarantine, path, exc.message)
            except OSError as exc:
                report.counts["rejected"] += 1
                reason = f"cannot be read ({exc.strerror or type(exc).__name__})"
                report.rejected.append((path, reason))
                _quarantine(quarantine, path, reason)
            bar.update(task, advance=1, status=f"{report.counts['rejected']} rejected")
    return report


def import_path(
    settings: Settings,
    path: Path,
    tenant: str,
    quarantine: Path | None = None,
    progress: bool = False,
) -> tuple[ImportReport, Path]:
    """Import ``path`` for ``tenant`` into the node ``settings`` describe."""
    if tenant not in settings.tenants:
        known = ", ".join(sorted(settings.tenants)) or "none configured (EXCHANGE_TENANTS)"
        raise ConfigurationError(f"unknown tenant {tenant!r} on this node (known: {known})")
    files = collect(path)
    services = build(settings)
    quarantine_dir = quarantine or settings.data_path(service_name(settings)) / "quarantine"
    try:
        report = import_files(services.store, tenant, files, quarantine_dir, progress)
    finally:
        services.close()
    return report, quarantine_dir


def run(
    settings: Settings, path: Path, tenant: str, quarantine: Path | None, progress: bool = True
) -> int:
    report, quarantine_dir = import_path(
        settings, path, tenant, quarantine, progress=progress and sys.stderr.isatty()
    )
    print(
        f"{report.total} files: {report.counts['stored']} stored, "
        f"{report.counts['already present']} already present, "
        + (f"{report.counts['replaced']} replaced, " if report.counts["replaced"] else "")
        + f"{report.counts['rejected']} rejected"
        + (f"; {report.sanitised} had a non-zero preamble, now zeroed" if report.sanitised else "")
    )
    for rejected, reason in report.rejected:
        print(f"  rejected {rejected}: {reason}")
    if report.rejected:
        print(f"  rejected files were copied to {quarantine_dir} with a reason file beside each")
    return 1 if report.rejected else 0
