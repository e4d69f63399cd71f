"""Fuzzing folder and DICOMDIR import (``exchange import``) in process.

A DICOMDIR is written by pydicom's ``FileSet`` from synthetic instances, then damaged:
its bytes mutated, or a record's Referenced File ID made hostile (``..``, absolute,
NUL, empty, very long, missing). Properties: only ``ConfigurationError`` (the CLI's
clear message) escapes; every file the import reads lies inside the DICOMDIR's
folder; every file found is counted stored, present or rejected, and what is stored
is exactly what the report says.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.fileset import FileSet

from exchange.database import make_engine
from exchange.dicom.samples import StudySpec, study
from exchange.errors import ConfigurationError
from exchange.node.importer import collect, import_files
from exchange.node.store import InstanceStore
from exchange.security.keystore import FileKeyStore, master_key
from tests.fuzz import strategies
from tests.fuzz.harness import fuzz, tally

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

IMPORT = tally("dicomdir-import")
TENANT = "tenant-imp"
#: Referenced File ID values (CS, up to 8 components) that must not lead anywhere odd.
HOSTILE = (
    ["..", "..", "..", "etc", "hostname"],
    ["/etc", "hostname"],
    ["PT000000", "..", "..", "OUTSIDE"],
    ["IM\x00X"],
    [""],
    ["A" * 300],
    ["NOSUCH", "FILE"],
    ["PT000000"],  # a directory, not a file
    "DICOMDIR",  # itself
)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a DICOMDIR and the two instances it references."""
    root: Path = tmp_path_factory.mktemp("dicomdir-seed") / "media"
    files = FileSet()
    for ds in study(StudySpec("FZ-DIR", "Fuzz^Dir", "FZD", slices=2, size=8)):
        files.add(ds)
    files.write(root)
    (root.parent / "OUTSIDE").write_bytes(b"outside the media folder")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstanceStore]:
    root: Path = tmp_path_factory.mktemp("fuzz-import-store")
    engine = make_engine(f"sqlite:///{root / 'node.db'}")
    keys = FileKeyStore(root / "keys", master_key(None, root / "master.key"), [TENANT])
    yield InstanceStore(engine, root / "blobs", keys, max_instance_bytes=4 * 1024 * 1024)
    engine.dispose()


@st.composite
def damaged_dicomdirs(draw: st.DrawFn) -> tuple[str, object]:
    if draw(st.booleans()):
        return "bytes", draw(st.integers(0, 2**32))
    return "reference", draw(st.sampled_from(HOSTILE))


def _damage(directory: Path, how: tuple[str, object], draw_bytes: bytes) -> None:
    path = directory / "DICOMDIR"
    kind, value = how
    if kind == "bytes":
        data = bytearray(path.read_bytes())
        for i, byte in enumerate(draw_bytes):
            at = (int(value) * (i + 1) * 2654435761) % len(data)  # type: ignore[call-overload]
            data[at] = byte
        cut = int(value) % (len(data) + 1) if draw_bytes[:1] == b"\x00" else len(data)  # type: ignore[call-overload]
        path.write_bytes(bytes(data[:cut]))
        return
    ds = pydicom.dcmread(path)
    images = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    images[0].ReferencedFileID = value
    out = io.BytesIO()
    ds.save_as(out)
    path.write_bytes(out.getvalue())


@given(damaged_dicomdirs(), st.binary(min_size=1, max_size=12))
@fuzz(examples=60)
def test_damaged_dicomdirs_import_cleanly(
    seed: Path,
    store: InstanceStore,
    tmp_path_factory: pytest.TempPathFactory,
    how: tuple[str, object],
    noise: bytes,
) -> None:
    work: Path = tmp_path_factory.mktemp("import") / "media"
    shutil.copytree(seed, work)
    (work.parent / "OUTSIDE").write_bytes(b"outside the media folder")
    _damage(work, how, noise)
    with IMPORT.example():
        _import_checked(store, work, work / "DICOMDIR")


@given(strategies.mutated_dicom())
@fuzz(examples=30)
def test_mutated_files_in_a_folder_import_cleanly(
    store: InstanceStore, tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    work: Path = tmp_path_factory.mktemp("folder") / "media"
    work.mkdir()
    (work / "one.dcm").write_bytes(data)
    with IMPORT.example():
        _import_checked(store, work, work)


def _import_checked(store: InstanceStore, folder: Path, target: Path) -> None:
    try:
        files = collect(target)
    except ConfigurationError:
        return
    inside = folder.resolve()
    for path in files:
        assert path.resolve().is_relative_to(inside), f"the import reads {path}"
    report = import_files(store, TENANT, files, folder.parent / "quarantine")
    try:
        assert report.total == len(files)
        held = store.instances(TENANT)
        assert len(held) == report.counts["stored"]
    finally:
        for view in store.instances(TENANT):
            store.delete_study(TENANT, view.study_uid)
