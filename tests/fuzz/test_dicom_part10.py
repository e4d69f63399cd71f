"""Fuzzing DICOM intake in process: Part 10 parsing, the fast header decoding, the store.

Properties, for mutated seed files and generated data sets alike:

- only ``InvalidInstance`` (the intake's declared refusal) escapes parsing and storing;
- a refused instance leaves nothing behind: no index row, no blob, no temp file;
- an accepted instance round-trips: the stored bytes are the input with a zeroed
  preamble, its header reads back the same, and its metadata (WADO-RS) can be built.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from exchange.database import make_engine
from exchange.dicom import part10
from exchange.dicom.part10 import ZERO_PREAMBLE, InstanceHeader, InvalidInstance, read_header
from exchange.node.catalog import ALL_KEYWORDS, dicom_json
from exchange.node.routes.wado import metadata
from exchange.node.store import InstanceStore, Outcome
from exchange.security.keystore import FileKeyStore, master_key
from tests.fuzz import strategies
from tests.fuzz.harness import fuzz, tally

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TENANT = "tenant-fz"
PARSE = tally("dicom-part10")
STORE = tally("dicom-store")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstanceStore]:
    root: Path = tmp_path_factory.mktemp("fuzz-store")
    engine = make_engine(f"sqlite:///{root / 'node.db'}")
    keys = FileKeyStore(root / "keys", master_key(None, root / "master.key"), [TENANT])
    yield InstanceStore(engine, root / "blobs", keys, max_instance_bytes=4 * 1024 * 1024)
    engine.dispose()


def _parse(data: bytes) -> InstanceHeader | None:
    """The header, or None when refused; also builds what the catalogue stores."""
    try:
        header = read_header(io.BytesIO(data))
    except InvalidInstance:
        return None
    try:
        dicom_json(header.dataset)
    except Exception:  # the store refuses it then (InvalidInstance, "cannot be decoded")
        return None
    return header


@given(strategies.mutated_dicom())
@fuzz(examples=300)
def test_mutated_files_parse_or_are_refused(data: bytes) -> None:
    with PARSE.example():
        if _parse(data) is not None:
            PARSE.count("accepted")


def _files(store: InstanceStore) -> set[Path]:
    return {p for p in store._blob_dir.rglob("*") if p.is_file()}


def _check_store(store: InstanceStore, data: bytes) -> bool:
    """Store ``data``: refused leaves nothing, accepted round-trips. True when accepted."""
    before_rows = len(store.rows(TENANT))
    before_files = _files(store)
    try:
        result = store.store(TENANT, io.BytesIO(data))
    except InvalidInstance:
        assert len(store.rows(TENANT)) == before_rows, "a refused instance left an index row"
        assert _files(store) == before_files, "a refused instance left a file"
        return False
    try:
        assert result.outcome is Outcome.STORED
        out = io.BytesIO()
        store.copy_out(TENANT, result.sop_uid, out)
        stored = out.getvalue()
        assert stored == ZERO_PREAMBLE + data[128:]
        again = read_header(io.BytesIO(stored))
        assert (again.study_uid, again.sop_uid, again.patient_id) == (
            result.study_uid,
            result.sop_uid,
            read_header(io.BytesIO(data)).patient_id,
        )
        (view,) = store.instances(TENANT, sop_uid=result.sop_uid)
        url = f"http://node.test/dicomweb/studies/{result.study_uid}"
        json.dumps(
            metadata(store.header(TENANT, result.sop_uid), view.row.transfer_syntax_uid, url)
        )
    finally:
        store.delete_study(TENANT, result.study_uid)
    assert len(store.rows(TENANT)) == before_rows
    return True


@given(strategies.mutated_dicom())
@fuzz(examples=120)
def test_mutated_files_are_stored_whole_or_not_at_all(store: InstanceStore, data: bytes) -> None:
    with STORE.example():
        if _check_store(store, data):
            STORE.count("accepted")


@given(strategies.garbage_preamble())
@fuzz(examples=25)
def test_any_preamble_is_accepted_and_zeroed(store: InstanceStore, data: bytes) -> None:
    with STORE.example():
        header = _parse(data)
        if header is not None:  # a few bundled seeds lack what the exchange needs
            assert _check_store(store, data)


def _save(ds: Dataset, implicit: bool) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@given(strategies.generated_dataset(), st.booleans())
@fuzz(examples=40)
def test_generated_instances_round_trip(store: InstanceStore, ds: Dataset, implicit: bool) -> None:
    with STORE.example():
        try:
            data = _save(ds, implicit)
        except (ValueError, OverflowError, TypeError):
            return  # pydicom would not write it: not an input anyone can send
        if _check_store(store, data):
            STORE.count("accepted")


FAST = tally("dicom-fast-decoding")


def _reference_json(data: bytes) -> dict[str, object]:
    """pydicom's own ``to_json_dict`` of the catalogue's keywords, from a fresh parse."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=64 * 1024)
    subset = Dataset()
    for keyword in ALL_KEYWORDS:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    result: dict[str, object] = subset.to_json_dict()
    return result


@given(strategies.mutated_dicom())
@fuzz(examples=200)
def test_fast_decoding_agrees_with_pydicom(data: bytes) -> None:
    """The raw-bytes shortcuts (``part10.raw_text``, ``catalog.dicom_json``) give what
    pydicom's own conversion gives, on every instance the intake accepts."""
    with FAST.example():
        try:
            header = read_header(io.BytesIO(data))
        except InvalidInstance:
            return
        try:
            expected = _reference_json(data)
        except Exception as exc:  # pydicom cannot convert it: neither may we (then refused)
            with pytest.raises(type(exc)):
                dicom_json(header.dataset)
            return
        FAST.count("compared")
        assert dicom_json(header.dataset) == expected
        slow = pydicom.dcmread(io.BytesIO(data), defer_size=64 * 1024)
        assert header.patient_id == str(slow.PatientID).strip()
        assert header.modality == (str(slow.get("Modality") or "") or None)
        assert header.accession == (str(slow.get("AccessionNumber") or "") or None)


@given(strategies.mutated_dicom())
@fuzz(examples=200)
def test_the_quick_deflate_check_agrees_with_pydicom(data: bytes) -> None:
    """``part10._deflated`` answers most files without parsing their File Meta; it must
    say what pydicom's own reading of the meta says (else a deflate bomb could pass)."""
    with FAST.example():
        quick = part10._deflated(_after_prefix(data))
        try:
            meta = _read_file_meta_info(_after_prefix(data))
            slow = str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
        except Exception:
            return
        assert quick == slow


def _after_prefix(data: bytes) -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.seek(132)
    return stream
