"""Build the FHIR ``ImagingStudy`` (and its ``Patient``) a node publishes for a study.

Input is what the node's catalog keeps per instance (DICOM JSON of the study,
series and instance attributes); output is a resource shaped by the
``exchange-imagingstudy`` profile (fhir_profiles/): DICOM UID identifier,
subject by the site's MRN, modality codings from DCM, series and instances,
and the Endpoint through which the study is retrieved. What real data gets
wrong (no StudyDate, a modality outside DCM, padded Patient IDs) is repaired
here, so that one odd instance never keeps a whole study out of the index.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from exchange.fhir import profiles

PROFILE = "https://exchange.example.org/fhir/StructureDefinition/exchange-imagingstudy"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACCESSION_TYPE = {"coding": [{"system": V2_0203, "code": "ACSN"}]}
MRN_TYPE = {"coding": [{"system": V2_0203, "code": "MR"}]}
MODALITY_VALUE_SET = "https://exchange.example.org/fhir/ValueSet/dicom-modality"
#: DICOM Patient's Sex -> FHIR administrative gender.
GENDER = {"M": "male", "F": "female", "O": "other"}


@functools.cache
def _modalities() -> frozenset[str]:
    """The DCM codes the hub's profile accepts (``fhir_profiles/``, the one list)."""
    return frozenset(profiles.load().value_sets[MODALITY_VALUE_SET].codes.get(DCM, ()))


def modality_code(value: str | None) -> str:
    """The DCM code for a Modality value; OT (other) for anything the profile does not know."""
    code = (value or "").strip().upper()
    return code if code in _modalities() else "OT"


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


def _date(value: str | None) -> str | None:
    """FHIR date from DICOM DA (YYYYMMDD), or None when it is not a plausible date."""
    digits = (value or "").strip()
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    month, day = int(digits[4:6]), int(digits[6:8])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"


def _coding(modality: str) -> dict[str, str]:
    return {"system": DCM, "code": modality}


def _started(datasets: list[Dataset], utc_offset: str | None) -> str:
    """StudyDate (with StudyTime), else the earliest SeriesDate: the profile needs ``started``."""
    first = datasets[0]
    study_date = _text(first, "StudyDate")
    if _date(study_date):
        when = started(study_date, _text(first, "StudyTime"), utc_offset)
        assert when is not None
        return when
    series_dates = sorted(d for ds in datasets if (d := _date(_text(ds, "SeriesDate"))))
    if series_dates:
        return series_dates[0]
    raise ValueError("the study has no StudyDate or SeriesDate; the index needs when it started")


def build(
    instances: Iterable[Mapping[str, Any]],
    *,
    endpoint: str,
    mrn_system: str,
    accession_system: str | None = None,
    utc_offset: str | None = None,
    status: str = "available",
    patient_reference: str | None = None,
) -> dict[str, Any]:
    """The ImagingStudy for the instances of one study.

    ``patient_reference`` (``Patient/<id>`` at the hub) is sent beside the MRN
    identifier so that the hub's consent checks and patient searches find the
    patient without resolving identifiers. Raises ``ValueError`` when no valid
    resource can be made (no instances, no date at all).
    """
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
        modality = modality_code(_text(head, "Modality"))
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
    subject: dict[str, Any] = {
        "type": "Patient",
        "identifier": {"system": mrn_system, "value": patient_id(first)},
    }
    if patient_reference:
        subject = {"reference": patient_reference, **subject}
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "meta": {"profile": [PROFILE]},
        "identifier": identifiers,
        "status": status,
        "modality": [_coding(m) for m in modalities],
        "subject": subject,
        "started": _started(datasets, utc_offset),
        "endpoint": [{"reference": endpoint}],
        "numberOfSeries": len(series_entries),
        "numberOfInstances": len(datasets),
        "series": series_entries,
    }
    if description := _text(first, "StudyDescription"):
        study["description"] = description
    return study


def patient_id(ds: Dataset) -> str:
    """Patient ID without DICOM's insignificant padding (as the catalog's blind index)."""
    value = _text(ds, "PatientID")
    if not value:
        raise ValueError("the study has no Patient ID")
    return value


def _name(value: Any) -> dict[str, Any] | None:
    """FHIR HumanName from a DICOM PN (family^given^middle^prefix^suffix)."""
    if value in (None, ""):
        return None
    name = PersonName(str(value)) if not isinstance(value, PersonName) else value
    human: dict[str, Any] = {"use": "official"}
    if family := (name.family_name or "").strip():
        human["family"] = family
    given = [p.strip() for p in (name.given_name, name.middle_name) if p and p.strip()]
    if given:
        human["given"] = given
    if prefix := (name.name_prefix or "").strip():
        human["prefix"] = [prefix]
    if suffix := (name.name_suffix or "").strip():
        human["suffix"] = [suffix]
    if len(human) == 1:
        text = str(value).replace("^", " ").strip()
        if not text:
            return None
        human["text"] = text
    return human


def patient(attributes: Mapping[str, Any], *, mrn_system: str, organization: str) -> dict[str, Any]:
    """The site's Patient record for a study (from one instance's attributes).

    Identified by the site's MRN, managed by the site's organisation; name, birth
    date and sex come from the DICOM header. This is PHI: it goes to the HIE's
    index over TLS, and never into a log.
    """
    ds = _dataset(attributes)
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [
            {"use": "usual", "type": MRN_TYPE, "system": mrn_system, "value": patient_id(ds)}
        ],
        "managingOrganization": {"reference": f"Organization/{organization}"},
    }
    if name := _name(ds.get("PatientName")):
        body["name"] = [name]
    sex = (_text(ds, "PatientSex") or "").upper()
    body["gender"] = GENDER.get(sex, "unknown")
    if birth := _date(_text(ds, "PatientBirthDate")):
        body["birthDate"] = birth
    return body
