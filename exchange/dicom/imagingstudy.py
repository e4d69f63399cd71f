"""Build the FHIR ``ImagingStudy`` a node publishes for one of its studies.

Input is what the node's catalog keeps per instance (DICOM JSON of the study,
series and instance attributes); output is a resource shaped by the
``exchange-imagingstudy`` profile (fhir_profiles/): DICOM UID identifier,
subject by the site's MRN, modality codings from DCM, series and instances,
and the Endpoint through which the study is retrieved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.dataset import Dataset

PROFILE = "https://exchange.example.org/fhir/StructureDefinition/exchange-imagingstudy"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
ACCESSION_TYPE = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
}


def _dataset(attributes: Mapping[str, Any]) -> Dataset:
    return Dataset.from_json(dict(attributes))


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def started(study_date: str | None, study_time: str | None, utc_offset: str | None) -> str | None:
    """FHIR dateTime from DICOM DA/TM; with a time only when the site's UTC offset is known."""
    if not study_date or len(study_date) < 8 or not study_date[:8].isdigit():
        return None
    date = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}"
    digits = (study_time or "").split(".")[0]
    if utc_offset and len(digits) >= 4 and digits.isdigit():
        seconds = digits[4:6] or "00"
        return f"{date}T{digits[:2]}:{digits[2:4]}:{seconds}{utc_offset}"
    return date


def _coding(modality: str) -> dict[str, str]:
    return {"system": DCM, "code": modality}


def build(
    instances: Iterable[Mapping[str, Any]],
    *,
    endpoint: str,
    mrn_system: str,
    accession_system: str | None = None,
    utc_offset: str | None = None,
    status: str = "available",
) -> dict[str, Any]:
    """The ImagingStudy for the instances of one study (raises ``ValueError`` if none)."""
    datasets = [_dataset(attributes) for attributes in instances]
    if not datasets:
        raise ValueError("a study needs at least one instance")
    first = datasets[0]
    series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)

    def series_key(items: list[Dataset]) -> tuple[int, str]:
        number = _int(items[0], "SeriesNumber")
        return (number if number is not None else 1 << 30, str(items[0].SeriesInstanceUID))

    series_entries = []
    modalities: list[str] = []
    for members in sorted(series.values(), key=series_key):
        head = members[0]
        modality = _text(head, "Modality") or "OT"
        if modality not in modalities:
            modalities.append(modality)
        members.sort(key=lambda d: (_int(d, "InstanceNumber") or 0, str(d.SOPInstanceUID)))
        entry: dict[str, Any] = {
            "uid": str(head.SeriesInstanceUID),
            "modality": _coding(modality),
            "numberOfInstances": len(members),
            "instance": [
                {
                    "uid": str(d.SOPInstanceUID),
                    "sopClass": {"system": RFC3986, "code": f"urn:oid:{d.SOPClassUID}"},
                }
                | ({"number": n} if (n := _int(d, "InstanceNumber")) is not None else {})
                for d in members
            ],
        }
        if (number := _int(head, "SeriesNumber")) is not None:
            entry["number"] = number
        if description := _text(head, "SeriesDescription"):
            entry["description"] = description
        series_entries.append(entry)

    identifiers: list[dict[str, Any]] = [
        {"system": DICOM_UID, "value": f"urn:oid:{first.StudyInstanceUID}"}
    ]
    accession = _text(first, "AccessionNumber")
    if accession and accession_system:
        identifiers.append({"type": ACCESSION_TYPE, "system": accession_system, "value": accession})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "meta": {"profile": [PROFILE]},
        "identifier": identifiers,
        "status": status,
        "modality": [_coding(m) for m in modalities],
        "subject": {
            "type": "Patient",
            "identifier": {"system": mrn_system, "value": str(first.PatientID)},
        },
        "endpoint": [{"reference": endpoint}],
        "numberOfSeries": len(series_entries),
        "numberOfInstances": len(datasets),
        "series": series_entries,
    }
    when = started(_text(first, "StudyDate"), _text(first, "StudyTime"), utc_offset)
    if when:
        study["started"] = when
    if description := _text(first, "StudyDescription"):
        study["description"] = description
    return study
