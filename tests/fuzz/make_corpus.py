"""Write the seed corpus under ``corpus/`` (synthetic only: no real patient, no network).

Run from the repository root: ``.venv/bin/python -m tests.fuzz.make_corpus``. The files
are committed; pydicom's own bundled test files are seeds too, named in ``seeds.py``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from exchange.dicom.samples import StudySpec, study

CORPUS = Path(__file__).parent / "corpus"
ROOT = "2.25.1111"


def _save(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _base(n: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{ROOT}.{n}.3"
    ds.StudyInstanceUID = f"{ROOT}.{n}.1"
    ds.SeriesInstanceUID = f"{ROOT}.{n}.2"
    ds.PatientID = f"FUZZ-{n}"
    ds.PatientName = "Fuzz^Seed"
    ds.Modality = "OT"
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    return ds


def _nested(depth: int) -> Dataset:
    """Sequences inside sequences, ``depth`` levels down."""
    ds = _base(2)
    inner = Dataset()
    inner.CodeValue = "LEAF"
    for level in range(depth):
        outer = Dataset()
        outer.CodeMeaning = f"level {level}"
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner, Dataset()])
    return ds


def _unicode() -> Dataset:
    """UTF-8 values, several values in one element, an empty element."""
    ds = _base(3)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ñandú^Zoë=山田^太郎"
    ds.StudyDescription = "Thorax — ∆ ✓"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AccessionNumber = ""
    ds.PixelSpacing = [0.5, 0.5]
    return ds


def dicom() -> dict[str, bytes]:
    ct = study(StudySpec("FUZZ-1", "Fuzz^Ct", "FZ1", slices=1, size=8))[0]
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    out = {"ct-8x8.dcm": buffer.getvalue()}
    implicit = _nested(3)
    deflated = study(StudySpec("FUZZ-5", "Fuzz^Deflated", "FZ5", slices=1, size=256))[0]
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    deflated.save_as(buffer, enforce_file_format=True)  # 128 KiB of pixels in ~2 KiB
    out["ct-256-deflated.dcm"] = buffer.getvalue()
    return out | {
        "nested-sq-12.dcm": _save(_nested(12)),
        "nested-sq-implicit.dcm": _save(implicit, ImplicitVRLittleEndian),
        "unicode.dcm": _save(_unicode()),
    }


def fhir() -> dict[str, dict[str, object]]:
    org = {"reference": "Organization/org-a"}
    return {
        "patient.json": {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:fuzz:mrn", "value": "FZ-1"}],
            "name": [{"family": "Seed", "given": ["Fuzz"]}],
            "gender": "other",
            "birthDate": "1970-01-01",
            "managingOrganization": org,
        },
        "organization.json": {
            "resourceType": "Organization",
            "identifier": [{"system": "urn:fuzz:org", "value": "org-fz"}],
            "name": "Fuzz Imaging",
            "active": True,
        },
        "endpoint.json": {
            "resourceType": "Endpoint",
            "status": "active",
            "identifier": [{"system": "urn:exchange:node", "value": "node-fz"}],
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "managingOrganization": org,
            "payloadType": [{"text": "DICOM"}],
            "address": "http://node-fz.test/dicomweb",
        },
    }


def main() -> None:
    for name, data in dicom().items():
        path = CORPUS / "dicom" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for name, body in fhir().items():
        path = CORPUS / "fhir" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
