"""The fast ingest paths give what the plain ones gave: bytes, results, JSON, headers.

Blob writers (direct I/O and its fallback, source ownership, back-pressure), the index
check at commit, decoding simple raw elements without pydicom's conversion, the
import's read-ahead, and the start-up of ``exchange import``.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from exchange.database import make_engine
from exchange.dicom.part10 import InvalidInstance, read_header
from exchange.node import store as store_module
from exchange.node.catalog import ALL_KEYWORDS, dicom_json
from exchange.node.store import IN_FLIGHT, InstanceStore, Outcome
from exchange.security import envelope
from exchange.security.keystore import FileKeyStore, master_key
from tests.dicomdata import generated, with_preamble

PE_HEADER = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff"


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    keys = FileKeyStore(tmp_path / "keys", master_key(None, tmp_path / "master.key"), ["t"])
    return InstanceStore(engine, tmp_path / "blobs", keys, max_instance_bytes=64 * 1024 * 1024)


def _read(store: InstanceStore, sop_uid: str) -> bytes:
    out = io.BytesIO()
    store.copy_out("t", sop_uid, out)
    return out.getvalue()


def _files(tmp_path: Path, pattern: str) -> list[Path]:
    return sorted(p for p in (tmp_path / "blobs").rglob(pattern) if p.is_file())


class _Closing(io.BytesIO):
    closed_by_store = False

    def close(self) -> None:
        type(self).closed_by_store = True
        super().close()


# -- blob writers ----------------------------------------------------------------------
def test_a_blob_is_exactly_its_envelope_and_reads_back(store, tmp_path):
    data = with_preamble(generated(size=200)[0], PE_HEADER)  # not a multiple of any block
    result = store.store("t", io.BytesIO(data))
    assert result.outcome is Outcome.STORED
    assert result.preamble_sanitised
    assert _read(store, result.sop_uid) == bytes(128) + data[128:]
    (blob,) = _files(tmp_path, "*.enc")
    raw = blob.read_bytes()
    header_length = int.from_bytes(raw[4:8], "big")
    # magic, header length, header, ciphertext, tag: no padding left from direct I/O
    assert len(raw) == 8 + header_length + len(data) + envelope.TAG_BYTES


def test_refused_direct_io_falls_back_to_buffered_writes(store, tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def write(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    data = generated(size=300)[0]  # larger than one aligned block
    result = store.store("t", io.BytesIO(data))
    monkeypatch.undo()
    if hasattr(os, "O_DIRECT"):
        assert refused
    assert _read(store, result.sop_uid) == data


def test_the_store_closes_each_source(store):
    _Closing.closed_by_store = False
    store.store("t", _Closing(generated()[0]))
    assert _Closing.closed_by_store
    _Closing.closed_by_store = False
    with pytest.raises(InvalidInstance):
        store.store("t", _Closing(b"not dicom" * 50))
    assert _Closing.closed_by_store


def test_sending_again_is_already_present_and_leaves_no_temp_file(store, tmp_path):
    series = generated(slices=3)
    with store.batch("t") as batch:
        for data in series:
            batch.add(io.BytesIO(data))
        assert [r.outcome for r in batch.commit()] == [Outcome.STORED] * 3
    with store.batch("t") as batch:
        for data in series:
            batch.add(io.BytesIO(data))
        results = batch.commit()
    assert [r.outcome for r in results] == [Outcome.ALREADY_PRESENT] * 3
    assert len(_files(tmp_path, "*.enc")) == 3
    assert _files(tmp_path, ".incoming-*") == []


def test_streamed_chunks_are_the_stored_instance(store):
    data = generated(size=96)[0]
    result = store.store("t", io.BytesIO(data))
    (view,) = store.instances("t", sop_uid=result.sop_uid)
    assert b"".join(store.chunks(view)) == _read(store, result.sop_uid) == data


class _Gate(io.BytesIO):
    """A source whose first read waits until the test opens the gate."""

    def __init__(self, data: bytes, gate: threading.Event) -> None:
        super().__init__(data)
        self._gate = gate
        self._waited = False

    def readinto(self, buffer: Any) -> int:
        if not self._waited:
            self._waited = True
            assert self._gate.wait(10)
        return super().readinto(buffer)


def test_a_batch_is_not_ready_while_all_its_writers_are_busy(store):
    gate = threading.Event()
    series = generated(slices=IN_FLIGHT + 1)
    headers = [read_header(io.BytesIO(data)) for data in series]
    with store.batch("t") as batch:
        assert batch.ready()
        for data, header in zip(series[:IN_FLIGHT], headers, strict=False):
            batch.add(_Gate(data, gate), header)
        assert not batch.ready()
        gate.set()
        batch.add(io.BytesIO(series[-1]), headers[-1])  # waits for a writer, then goes on
        results = batch.commit()
    assert [r.outcome for r in results] == [Outcome.STORED] * (IN_FLIGHT + 1)
    assert batch.ready()


def test_a_failed_writer_fails_its_instance_only(store, tmp_path, monkeypatch):
    real = store_module._write_blob
    calls = []

    def flaky(source: Any, blob: Any) -> Any:
        calls.append(blob.sop_uid)
        if len(calls) == 2:
            source.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, blob)

    monkeypatch.setattr(store_module, "_write_blob", flaky)
    with store.batch("t") as batch:
        for data in generated(slices=3):
            batch.add(io.BytesIO(data))
        results = batch.commit()
    assert isinstance(results[1], OSError)
    assert [r.outcome for r in (results[0], results[2])] == [Outcome.STORED] * 2
    assert len(_files(tmp_path, "*.enc")) == 2
    assert _files(tmp_path, ".incoming-*") == []


def test_decrypting_from_a_file_without_readinto(store):
    class Plain:
        def __init__(self, data: bytes) -> None:
            self._buffer = io.BytesIO(data)
            self.read, self.seek, self.tell = (
                self._buffer.read,
                self._buffer.seek,
                self._buffer.tell,
            )

    out = io.BytesIO()
    data = os.urandom(5000)
    envelope.encrypt([data], out, store._keys, "t", b"aad")
    plain = Plain(out.getvalue())
    assert b"".join(envelope.decrypt_chunks(plain, store._keys, "t", b"aad", 777)) == data  # type: ignore[arg-type]


# -- raw elements decoded without pydicom's conversion ----------------------------------
def _dataset(syntax: str, **values: Any) -> bytes:
    """A small data set written in ``syntax``; a value "987" is replaced by "12A" (bad IS)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1386.1.2.3"  # odd length: NUL-padded
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1386.1.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1386.1.2.9"
    ds.PatientID = "P1"
    ds.Modality = "CT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue().replace(b"987 ", b"12A ")


def _reference(ds: Dataset) -> dict[str, Any]:
    subset = Dataset()
    for keyword in ALL_KEYWORDS:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    result: dict[str, Any] = subset.to_json_dict()
    return result


EDGE_VALUES: list[dict[str, Any]] = [
    {"PatientName": "Doe^John ", "StudyDescription": "  leading spaces kept"},
    {"PatientID": " 12 ", "AccessionNumber": "A1 ", "SeriesNumber": " +7", "InstanceNumber": ""},
    {"StudyDate": "20240101", "StudyTime": "101500.5 ", "Rows": 512, "Columns": 3},
    {"Laterality": "L\\R", "PatientName": "A^B\\C^D"},  # several values: pydicom's way
    {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg", "StudyID": "é"},
    {
        "SpecificCharacterSet": "ISO 2022 IR 87",
        "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    },
    {"PatientName": "", "ReferringPhysicianName": "", "NumberOfFrames": "3", "BitsAllocated": 16},
    {"InstanceNumber": "987", "SeriesNumber": "007"},
]


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("values", EDGE_VALUES)
def test_raw_decoding_gives_pydicoms_json_and_header(syntax, values):
    data = _dataset(syntax, **values)
    ours = pydicom.dcmread(io.BytesIO(data), defer_size=64 * 1024)
    theirs = pydicom.dcmread(io.BytesIO(data), defer_size=64 * 1024)
    try:
        expected = _reference(theirs)
    except Exception as exc:  # pydicom refuses it: so must we, the same way
        with pytest.raises(type(exc)):
            dicom_json(ours)
    else:
        assert dicom_json(ours) == expected
    header = read_header(io.BytesIO(data))
    plain = pydicom.dcmread(io.BytesIO(data))
    assert header.patient_id == str(plain.PatientID).strip()
    assert header.sop_uid == str(plain.SOPInstanceUID)
    assert header.modality == (str(plain.get("Modality") or "") or None)
    assert header.accession == (str(plain.get("AccessionNumber") or "") or None)
    for keyword, field in (
        ("SeriesNumber", "series_number"),
        ("InstanceNumber", "instance_number"),
    ):
        try:
            value = plain.get(keyword)
            expected_number = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            expected_number = None
        assert getattr(header, field) == expected_number


# -- exchange import --------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path, monkeypatch):
    from exchange.config import load_settings

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    return load_settings(
        data_dir=tmp_path / "node", node_id="n1", tenants={"t1": {"organization": "org-1"}}
    )


def test_a_file_that_cannot_be_read_is_rejected_and_the_rest_stored(
    settings, tmp_path, monkeypatch
):
    from exchange.node import importer

    folder = tmp_path / "in"
    folder.mkdir()
    for index, data in enumerate(generated(slices=4)):
        (folder / f"{index}.dcm").write_bytes(data)
    real = importer._open

    def refuse(path: Path) -> Any:
        if path.name == "2.dcm":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(importer, "_open", refuse)
    report, _ = importer.import_path(settings, folder, "t1")
    assert report.counts["stored"] == 3
    assert [(p.name, reason) for p, reason in report.rejected] == [
        ("2.dcm", "cannot be read (Permission denied)")
    ]


def test_the_read_ahead_stops_when_the_import_fails(settings, tmp_path, monkeypatch):
    from exchange.node import importer
    from exchange.node.store import StoreBatch

    folder = tmp_path / "in"
    folder.mkdir()
    for index, data in enumerate(generated(slices=importer.READ_AHEAD * 3)):
        (folder / f"{index:03d}.dcm").write_bytes(data)

    def broken(self: StoreBatch) -> list[Any]:
        raise RuntimeError("database gone")

    monkeypatch.setattr(StoreBatch, "commit", broken)
    monkeypatch.setattr(importer, "GROUP_FILES", 2)
    with pytest.raises(RuntimeError, match="database gone"):
        importer.import_path(settings, folder, "t1")
    assert not [t for t in threading.enumerate() if t.name == "import-reader"]


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_the_command_line_parser_does_not_load_the_token_or_policy_modules():
    loaded = _python(
        "import sys, exchange.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('httpx', 'jwt', 'exchange.security.tokens', "
        "'exchange.policy.decisions') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_import_loads_pydicom_without_its_pixel_libraries_which_stay_importable():
    out = _python(
        "import sys, exchange.cli as c; c._pydicom_without_pixel_libraries(); "
        "import pydicom; from pydicom.data import get_testdata_file; "
        "ds = pydicom.dcmread(get_testdata_file('CT_small.dcm', download=False)); "
        "print(ds.Modality, 'numpy' in sys.modules, 'PIL' in sys.modules); "
        "import numpy; print(numpy.__name__)"
    )
    assert out.splitlines() == ["CT False False", "numpy"]


def test_a_value_that_cannot_be_decoded_is_a_clear_refusal(store, tmp_path):
    data = _dataset(ExplicitVRLittleEndian, InstanceNumber="987")  # written as "12A"
    with pytest.raises(InvalidInstance, match="cannot be decoded"):
        store.store("t", io.BytesIO(data))
    assert store.instances("t") == []
    assert _files(tmp_path, "*") == []


# -- the STOW-RS answer ----------------------------------------------------------------
def _pydicom_response(results: list[Any], base: str) -> dict[str, Any]:
    """The answer as the route used to build it: a pydicom data set, then its JSON."""
    from exchange.node.routes.stow import Failure, _lo
    from exchange.node.store import StoreResult

    stored = [r for r in results if isinstance(r, StoreResult)]
    failed = [r for r in results if isinstance(r, Failure)]
    ds = Dataset()
    if stored:
        studies = {r.study_uid for r in stored}
        ds.RetrieveURL = f"{base}/dicomweb/studies/{min(studies)}" if len(studies) == 1 else ""
        items = []
        for r in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = r.sop_class_uid
            item.ReferencedSOPInstanceUID = r.sop_uid
            item.RetrieveURL = (
                f"{base}/dicomweb/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
            )
            items.append(item)
        ds.ReferencedSOPSequence = items
    if failed:
        items = []
        for f in failed:
            item = Dataset()
            if f.sop_class_uid:
                item.ReferencedSOPClassUID = f.sop_class_uid
            if f.sop_uid:
                item.ReferencedSOPInstanceUID = f.sop_uid
            item.FailureReason = f.reason
            item.ErrorComment = _lo(f.message)
            items.append(item)
        ds.FailedSOPSequence = items
    reference: dict[str, Any] = ds.to_json_dict()
    return reference


def test_the_store_response_is_pydicoms_dicom_json():
    from exchange.node.routes.stow import Failure, _response
    from exchange.node.store import StoreResult

    ct = "1.2.840.10008.5.1.4.1.1.2"

    def stored(study: str, sop: str) -> StoreResult:
        return StoreResult(Outcome.STORED, "t", study, f"{study}.1", sop, ct, False)

    cases: list[list[Any]] = [
        [stored("1.2.3", "1.2.3.1.1"), stored("1.2.3", "1.2.3.1.2")],
        [stored("1.2.3", "1.2.3.1.1"), stored("1.2.4", "1.2.4.1.1")],  # two studies
        [stored("1.2.3", "1.2.3.1.1"), Failure(0xC000, "not DICOM\\ at all " * 9, ct, "1.2.9")],
        [Failure(0xA700, "too large"), Failure(0x0110, "", None, "1.2.8")],
    ]
    for results in cases:
        assert _response(results, "http://node") == _pydicom_response(results, "http://node")
