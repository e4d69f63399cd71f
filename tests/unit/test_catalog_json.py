"""``catalog.dicom_json`` is pydicom's ``to_json_dict`` for the catalog's keywords, exactly."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset

from exchange.dicom.samples import StudySpec, study
from exchange.node.catalog import ALL_KEYWORDS, dicom_json


def _reference(ds: Dataset) -> dict[str, Any]:
    subset = Dataset()
    for keyword in ALL_KEYWORDS:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    result: dict[str, Any] = subset.to_json_dict()
    return result


def _bundled() -> list[Dataset]:
    datasets = []
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(bundled.rglob("*.dcm")):
        try:
            datasets.append(pydicom.dcmread(path, defer_size=64 * 1024))
        except Exception:  # some bundled files are deliberately broken
            continue
    return datasets


def _generated() -> list[Dataset]:
    out = []
    for ds in study(StudySpec("JSON-1", "Doe^Jane^^Dr", "ACC-J", slices=2, size=16)):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    return out


def test_parity_with_pydicom_over_the_bundled_files_and_generated_studies() -> None:
    datasets = _bundled() + _generated()
    assert len(datasets) > 50
    compared = 0
    for ds in datasets:
        try:
            expected = _reference(ds)
        except Exception as exc:  # pydicom refuses it: so must we, the same way
            with pytest.raises(type(exc)):
                dicom_json(ds)
            continue
        got = dicom_json(ds)
        assert got == expected, getattr(ds, "filename", "generated")
        assert list(got) == list(expected)
        compared += 1
    assert compared > 50


def test_edge_values_match_pydicom() -> None:
    ds = Dataset()
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.PatientID = ""
    ds.StudyDescription = None
    ds.SeriesNumber = None
    ds.InstanceNumber = "7"
    ds.Rows = 512
    ds.NumberOfFrames = "3"
    ds.StudyDate = "20240101"
    ds.Laterality = ["L", "R"]  # multi-valued: pydicom's own path
    ds.ReferringPhysicianName = ""
    assert dicom_json(ds) == _reference(ds)
