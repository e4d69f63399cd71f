"""``exchange import``: files, folders and DICOMDIRs into a node's store.

Every input file ends up counted as stored, already present or rejected; a
rejected file is copied to the quarantine folder with a ``.reason.txt`` beside
it. Nothing is silently dropped, and a re-run only reports "already present".
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import queue
import re
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from exchange.config import Settings
from exchange.database import make_engine
from exchange.dicom.part10 import InvalidInstance
from exchange.errors import ConfigurationError
from exchange.node import storage
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
    """The files a DICOMDIR references, all inside its own folder (a hostile DICOMDIR
    must not make the import read, and quarantine, files from elsewhere)."""
    try:
        directory = pydicom.dcmread(path)
        references = [
            [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
            for record in directory.DirectoryRecordSequence
            if (file_id := record.get("ReferencedFileID"))
        ]
    except Exception as exc:
        raise ConfigurationError(
            f"{path} is not a readable DICOMDIR ({type(exc).__name__})"
        ) from None
    root = path.parent
    for parts in references:
        if not all(_FILE_ID_COMPONENT.fullmatch(part) for part in parts):
            raise ConfigurationError(
                f"{path} references a file outside its folder or by an invalid name"
            )
        yield root.joinpath(*parts)


#: A Referenced File ID component (PS3.10 8.2 allows A-Z, 0-9 and _; we accept any case
#: and "-" or "." inside): never "..", a separator, a NUL or an absolute path.
_FILE_ID_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


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
    # A source that cannot be copied (gone, a directory, a name too long) still gets its
    # reason file: the report and the reason say why it was not imported.
    with contextlib.suppress(OSError):
        shutil.copy2(source, target)
    target.with_name(target.name + ".reason.txt").write_text(
        f"source: {source}\nreason: {reason}\nat: {datetime.now(UTC).isoformat()}\n"
    )


#: Files made durable and indexed together (one directory fsync, one transaction).
GROUP_FILES = 32


#: A file up to this size is read whole into memory before it is parsed.
IN_MEMORY_BYTES = 8 * 1024 * 1024
#: Files read ahead of the parsing (each one in memory up to ``IN_MEMORY_BYTES``).
READ_AHEAD = 8


def _open(path: Path) -> BinaryIO:
    """The file, in memory when small (as STOW-RS spools its parts).

    pydicom asks a file for its position at every element, and each ``tell()`` of a
    buffered file is an ``lseek`` system call: ~280 of them per CT slice.
    """
    with path.open("rb") as source:
        if os.fstat(source.fileno()).st_size > IN_MEMORY_BYTES:
            return path.open("rb")
        return io.BytesIO(source.read())


class _ReadAhead:
    """The files opened and read by a thread of their own, in order, ahead of the parsing.

    The parsing thread then never gives the GIL away for a system call: each time it
    did (an open, a read), getting the GIL back from the blob writers took ~0.5 ms.
    """

    def __init__(self, files: list[Path]) -> None:
        self._queue: queue.Queue[tuple[Path, BinaryIO | OSError] | None] = queue.Queue(READ_AHEAD)
        self._stopping = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(files,), name="import-reader", daemon=True
        )
        self._thread.start()

    def _run(self, files: list[Path]) -> None:
        try:
            for path in files:
                if self._stopping:
                    return
                try:
                    opened: BinaryIO | OSError = _open(path)
                except OSError as exc:
                    opened = exc
                self._queue.put((path, opened))
        except BaseException as exc:  # given to the importing thread: no file goes missing
            self._failed = exc
        finally:
            self._queue.put(None)

    def __iter__(self) -> Iterator[tuple[Path, BinaryIO | OSError]]:
        while (item := self._queue.get()) is not None:
            yield item
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        """Stop reading; close what was read and not taken."""
        self._stopping = True
        while self._thread.is_alive() or not self._queue.empty():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is not None and not isinstance(item[1], OSError):
                item[1].close()
        self._thread.join()


def _reject(report: ImportReport, quarantine: Path, path: Path, reason: str) -> None:
    report.counts["rejected"] += 1
    report.rejected.append((path, reason))
    _quarantine(quarantine, path, reason)


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def import_files(
    store: InstanceStore, tenant: str, files: list[Path], quarantine: Path, progress: bool = False
) -> ImportReport:
    """Store ``files`` in groups of ``GROUP_FILES``; a file is reported only once durable."""
    report = ImportReport()
    bar = _progress(progress, len(files))
    reader = _ReadAhead(files)
    opened = iter(reader)
    try:
        for start in range(0, len(files), GROUP_FILES):
            group = files[start : start + GROUP_FILES]
            added: list[Path] = []
            with store.batch(tenant) as batch:
                for path, source in itertools.islice(opened, len(group)):
                    if isinstance(source, OSError):
                        _reject(report, quarantine, path, _unreadable(source))
                        continue
                    try:
                        batch.add(source)  # the batch closes it
                        added.append(path)
                    except InvalidInstance as exc:
                        _reject(report, quarantine, path, exc.message)
                    except OSError as exc:
                        _reject(report, quarantine, path, _unreadable(exc))
                outcomes = batch.commit()
            for path, outcome in zip(added, outcomes, strict=True):
                if isinstance(outcome, InvalidInstance):
                    _reject(report, quarantine, path, outcome.message)
                elif isinstance(outcome, OSError):
                    _reject(
                        report, quarantine, path, f"cannot be stored ({type(outcome).__name__})"
                    )
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    report.counts[outcome.outcome.value] += 1
                    report.sanitised += (
                        outcome.preamble_sanitised and outcome.outcome is Outcome.STORED
                    )
            if bar is not None:
                bar[0].update(
                    bar[1], advance=len(group), status=f"{report.counts['rejected']} rejected"
                )
    finally:
        reader.close()
        if bar is not None:
            bar[0].stop()
    return report


def _progress(enabled: bool, total: int) -> tuple[Any, Any] | None:
    """A rich progress bar, imported only when shown (start-up time of ``exchange import``)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        transient=True,
    )
    bar.start()
    return bar, bar.add_task("import", total=total, status="")


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
    directory = storage.data_dir(settings)
    quarantine_dir = quarantine or directory / "quarantine"
    engine = make_engine(settings.database(storage.service_name(settings)))
    store = storage.open_store(settings, directory, engine, storage.open_keys(settings, directory))
    try:
        report = import_files(store, tenant, files, quarantine_dir, progress)
    finally:
        engine.dispose()
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
