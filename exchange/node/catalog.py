"""The node's metadata index, with nothing identifying in clear text.

QIDO needs to match on Patient ID, accession number and UIDs, and to answer
with names and descriptions. The database holds, per instance:

- *blind indexes*: HMAC-SHA256 of each exact-match value under a tenant
  sub-key, so equality queries work without storing the value;
- the study date and modality in clear (for ranges and modality filters);
- the QIDO/ImagingStudy attributes as DICOM JSON sealed with AES-256-GCM
  under another tenant sub-key (associated data: tenant and row key).

Crypto-shredding the tenant key therefore makes its index unreadable too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import IS, DSfloat, PersonName
from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from exchange.dicom.part10 import raw_text
from exchange.security.keystore import KeyStore

#: Attributes kept (sealed) per instance, for QIDO answers and ImagingStudy building.
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "BodyPartExamined",
    "Laterality",
)
INSTANCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "PhotometricInterpretation",
)
ALL_KEYWORDS = STUDY_KEYWORDS + SERIES_KEYWORDS + INSTANCE_KEYWORDS


class InstanceRow(SQLModel, table=True):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("tenant", "sop_key"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(index=True, max_length=64)
    study_key: str = Field(index=True, max_length=64)
    series_key: str = Field(index=True, max_length=64)
    sop_key: str = Field(max_length=64)
    patient_key: str = Field(index=True, max_length=64)
    accession_key: str | None = Field(default=None, index=True, max_length=64)
    study_date: str | None = Field(default=None, index=True, max_length=8)
    modality: str | None = Field(default=None, max_length=16)
    series_number: int | None = None
    instance_number: int | None = None
    transfer_syntax_uid: str = Field(max_length=64)
    size: int
    sha256: str = Field(max_length=64)
    blob: str = Field(max_length=200)
    preamble_sanitised: bool = False
    stored_at: datetime
    attributes: bytes


class OutboxRow(SQLModel, table=True):
    """A study waiting to be published to (or retracted from) the hub: one row per study.

    Written in the transaction that changes the study's instances, so the index
    and the intent to publish can never disagree; new changes coalesce into the
    waiting row and bump ``revision``. Nothing identifying in clear: the study is
    its blind index, and its UID (needed to retract it once its instances are
    gone) is sealed like the catalog's attributes.
    """

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("tenant", "study_key"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant: str = Field(max_length=64)
    study_key: str = Field(max_length=64)
    #: "publish" or "retract": what the hub must end up with.
    action: str = Field(max_length=16)
    #: Bumped by every change; a delivery completes only the revision it sent.
    revision: int = 1
    #: "pending" (the worker retries it) or "failed" (the hub refused it; reconcile retries).
    state: str = Field(default="pending", index=True, max_length=16)
    attempts: int = 0
    #: Not before (epoch seconds): debounce after a change, backoff after a failure.
    due_at: float = Field(index=True)
    #: A worker is sending it until then (epoch seconds); others leave it alone.
    claimed_until: float | None = None
    sealed_uid: bytes
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TenantSeal:
    """Blind indexes and sealed attributes for one tenant."""

    tenant: str
    index_key: bytes
    seal_key: bytes

    @classmethod
    def of(cls, keys: KeyStore, tenant: str) -> TenantSeal:
        return cls(tenant, keys.subkey(tenant, "blind-index"), keys.subkey(tenant, "metadata"))

    def blind(self, kind: str, value: str) -> str:
        message = f"{kind}\0{value.strip()}".encode()
        return hmac.new(self.index_key, message, hashlib.sha256).hexdigest()

    def seal(self, attributes: dict[str, Any], row_key: str) -> bytes:
        nonce = secrets.token_bytes(12)
        aad = f"exchange:meta:{self.tenant}:{row_key}".encode()
        return nonce + AESGCM(self.seal_key).encrypt(nonce, json.dumps(attributes).encode(), aad)

    def unseal(self, sealed: bytes, row_key: str) -> dict[str, Any]:
        aad = f"exchange:meta:{self.tenant}:{row_key}".encode()
        data: dict[str, Any] = json.loads(
            AESGCM(self.seal_key).decrypt(sealed[:12], sealed[12:], aad)
        )
        return data


#: VRs whose single value is a ``str`` in pydicom and a JSON string in DICOM JSON.
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "IS"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


@lru_cache(maxsize=8)
def _tags(keywords: tuple[str, ...]) -> tuple[tuple[int, str, str], ...]:
    """(tag, JSON key, dictionary VR) of each keyword."""
    return tuple(
        (tag, f"{tag:08X}", dictionary_VR(tag))
        for tag in (tag_for_keyword(k) for k in keywords)
        if tag is not None
    )


_INTEGER = re.compile(r" *[+-]?[0-9]+")


def _raw_json(raw: object, vr: str) -> dict[str, Any] | None:
    """The DICOM JSON of a simple raw element without converting it; None if not simple.

    What pydicom's conversion then ``to_json_dict`` would give: US from its two bytes,
    the string VRs through ``part10.raw_text`` (an empty value has no ``Value``).
    """
    if vr == "US":
        if (
            type(raw) is RawDataElement
            and raw.VR in (None, "US")
            and type(raw.value) is bytes
            and len(raw.value) == 2
        ):
            value = int.from_bytes(raw.value, "little" if raw.is_little_endian else "big")
            return {"vr": vr, "Value": [value]}
        return None
    text = raw_text(raw, vr)
    if text is None:
        return None
    if not text:
        return {"vr": vr}
    if vr == "PN":
        # Alphabetic only: with "=" (ideographic, phonetic) pydicom's own way.
        return None if "=" in text else {"vr": vr, "Value": [{"Alphabetic": text}]}
    if vr == "IS":
        return {"vr": vr, "Value": [int(text)]} if _INTEGER.fullmatch(text) else None
    return {"vr": vr, "Value": [text]}


def _element_json(element: DataElement) -> dict[str, Any]:
    """``element.to_json_dict`` for the common single-valued cases, exactly; else pydicom's."""
    vr = str(element.VR)
    value = element.value
    if value is None and vr not in _BINARY_OR_SQ:
        return {"vr": vr}
    kind = type(value)
    if vr in _STRING_VRS and kind is str:
        return {"vr": vr, "Value": [value]} if value else {"vr": vr}
    if vr in _INT_VRS and (kind is int or kind is IS):
        return {"vr": vr, "Value": [int(value)]}
    if vr in _FLOAT_VRS and (kind is float or kind is DSfloat):
        return {"vr": vr, "Value": [float(value)]}
    if vr == "PN" and kind is PersonName:
        if not value:
            return {"vr": vr}
        components = value.components
        name = {"Alphabetic": components[0]}
        if len(components) > 1:
            name["Ideographic"] = components[1]
        if len(components) > 2:
            name["Phonetic"] = components[2]
        return {"vr": vr, "Value": [name]}
    result: dict[str, Any] = element.to_json_dict(None, 1024)
    return result


_BINARY_OR_SQ = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ", "OB or OW"})


def dicom_json(ds: Dataset, keywords: tuple[str, ...] = ALL_KEYWORDS) -> dict[str, Any]:
    """The ``keywords`` present in ``ds`` as DICOM JSON (PS3.18 F.2).

    The same as pydicom's ``Dataset.to_json_dict`` of those elements (a unit test
    holds them equal), without building a sub-dataset and its generic machinery, and
    for simple values without converting the raw element at all.
    """
    result: dict[str, Any] = {}
    for tag, key, vr in _tags(keywords):
        raw = ds.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        fast = _raw_json(raw, vr)
        result[key] = fast if fast is not None else _element_json(ds[tag])
    return result
