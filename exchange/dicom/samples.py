"""Synthetic studies for the demo and the tests: no real patient, no network.

UIDs are derived from the inputs, so generating the same study twice gives
the same instances (imports stay idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

PREFIX = "1.2.826.0.1.3680043.10.1386."  # our synthetic-data UID root

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class StudySpec:
    patient_id: str
    patient_name: str
    accession: str
    modality: str = "CT"
    description: str = "Synthetic chest"
    study_date: str = "20260101"
    slices: int = 12
    size: int = 128
    birth_date: str = "19700101"
    sex: str = "O"
    issuer: str = ""


def _uid(*parts: str) -> UID:
    return generate_uid(prefix=PREFIX, entropy_srcs=list(parts))


def _phantom(size: int, index: int, slices: int) -> np.ndarray:
    """A body-like ellipse with 'lungs' and a 'spine' whose shape changes along the series."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    z = (index + 0.5) / slices - 0.5
    image = np.full((size, size), -1000, dtype=np.int16)  # air
    image[(x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1] = 40  # soft tissue
    lung_r = 0.28 * (1 - 2 * z * z)
    for cx in (-0.38, 0.38):
        image[((x - cx) / lung_r) ** 2 + (y / (lung_r * 1.6)) ** 2 <= 1] = -800
    image[(x / 0.1) ** 2 + ((y - 0.45) / 0.1) ** 2 <= 1] = 700  # bone
    return image


def study(spec: StudySpec) -> list[Dataset]:
    study_uid = _uid("study", spec.patient_id, spec.accession)
    series_uid = _uid("series", spec.patient_id, spec.accession, "1")
    sop_class = _SOP_CLASS[spec.modality]
    instances = []
    for index in range(spec.slices):
        sop_uid = _uid("instance", spec.patient_id, spec.accession, str(index))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = spec.patient_id
        if spec.issuer:
            ds.IssuerOfPatientID = spec.issuer
        ds.PatientName = spec.patient_name
        ds.PatientBirthDate = spec.birth_date
        ds.PatientSex = spec.sex
        ds.AccessionNumber = spec.accession
        ds.StudyDate = ds.SeriesDate = spec.study_date
        ds.StudyTime = "120000"
        ds.StudyDescription = spec.description
        ds.SeriesDescription = f"{spec.description} axial"
        ds.StudyID = spec.accession[-8:]
        ds.Modality = spec.modality
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0, 0, index * 2.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [400 / spec.size, 400 / spec.size]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = spec.size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = _phantom(spec.size, index, spec.slices).tobytes()
        instances.append(ds)
    return instances


def write_study(spec: StudySpec, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study(spec):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
