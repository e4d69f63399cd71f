"""Synthetic DICOM for tests: pydicom's bundled files and generated studies."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from exchange.dicom.samples import StudySpec, study


def bundled(name: str = "CT_small.dcm") -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(path)


def generated(
    patient_id: str = "T-1", accession: str = "ACC1", slices: int = 3, size: int = 32
) -> list[bytes]:
    """Part 10 bytes of a small synthetic CT series."""
    out = []
    for ds in study(
        StudySpec(
            patient_id=patient_id,
            patient_name="Test^Patient",
            accession=accession,
            slices=slices,
            size=size,
        )
    ):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def with_preamble(data: bytes, preamble: bytes) -> bytes:
    assert len(preamble) <= 128
    return preamble.ljust(128, b"\0") + data[128:]


def without(data: bytes, keyword: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
