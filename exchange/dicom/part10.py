"""DICOM Part 10 validation and preamble sanitising.

An instance is accepted only if it is a Part 10 file (128-byte preamble,
``DICM``, File Meta Information) carrying the identifiers the exchange needs.
The preamble is free-form by the standard, which lets a file be both a valid
DICOM object and a Windows/ELF executable (CVE-2019-11687); we always replace
it with zeros and record when it was not already zero.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from exchange.uids import is_uid

PREAMBLE_LENGTH = 128
_UNDEFINED = 0xFFFFFFFF
PREFIX = b"DICM"
ZERO_PREAMBLE = bytes(PREAMBLE_LENGTH)

_REQUIRED = {
    "StudyInstanceUID": "Study Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SOPClassUID": "SOP Class UID",
    "PatientID": "Patient ID",
}

# Failure reasons from PS3.4 / PS3.18 (Store Instances Response).
REASON_PROCESSING_FAILURE = 0x0110
REASON_DUPLICATE = 0x0111
REASON_CANNOT_UNDERSTAND = 0xC000
REASON_TOO_LARGE = 0xA700  # "out of resources"
REASON_NOT_AUTHORISED = 0x0124


class InvalidInstance(Exception):
    """The input is not an instance we accept. ``reason`` is a PS3.4 failure code."""

    def __init__(self, message: str, reason: int = REASON_CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """What the store indexes about one instance. Never logged (it holds PHI)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    patient_id: str
    transfer_syntax_uid: str
    modality: str | None
    study_date: str | None
    series_number: int | None
    instance_number: int | None
    preamble_was_clean: bool
    dataset: Dataset
    accession: str | None = None


#: The single-valued string VRs whose raw value ``raw_text`` decodes.
_TEXT_VRS = frozenset({"CS", "DA", "IS", "LO", "PN", "SH", "TM", "UI"})
_DATE_TIME_VRS = frozenset({"DA", "TM"})
_INTEGER = re.compile(r" *[+-]?[0-9]+")
#: (keyword, tag, VR) of what ``read_header`` takes from the data set.
_FIELDS = {
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SOPClassUID": (0x00080016, "UI"),
    "PatientID": (0x00100020, "LO"),
    "Modality": (0x00080060, "CS"),
    "StudyDate": (0x00080020, "DA"),
    "SeriesNumber": (0x00200011, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "AccessionNumber": (0x00080050, "SH"),
}


def raw_text(raw: object, vr: str) -> str | None:
    """A simple element's value decoded from its raw bytes, as pydicom would decode it.

    Simple: not yet converted, of the expected ``vr`` (one of ``_TEXT_VRS``), ASCII
    only, one value (no backslash), no ISO 2022 escape. Such bytes read the same in
    every DICOM character set, and pydicom only strips their trailing spaces and NULs.
    Anything else is None: ask pydicom, whose conversion of an element costs ~5 us
    (with ~30 elements read per instance, that was a tenth of the ingest time).
    """
    if type(raw) is not RawDataElement or raw.VR not in (None, vr):
        return None
    value = raw.value
    if type(value) is not bytes or not value.isascii() or b"\\" in value or b"\x1b" in value:
        return None
    if vr in _DATE_TIME_VRS and pydicom.config.datetime_conversion:
        return None
    return value.decode("ascii").rstrip("\0 ")


def _text(ds: Dataset, keyword: str) -> str:
    """The value as text ("" when absent or empty), the fast way when it is simple."""
    tag, vr = _FIELDS[keyword]
    text = raw_text(ds.get_item(tag, keep_deferred=True), vr)
    if text is None:
        text = str(ds.get(keyword) or "")
    return text


def _uid(ds: Dataset, keyword: str) -> str:
    text = _text(ds, keyword).strip()
    if not text:
        raise InvalidInstance(f"missing {_REQUIRED[keyword]}")
    if keyword != "PatientID" and not is_uid(text):
        raise InvalidInstance(f"{_REQUIRED[keyword]} is not a valid UID")
    return text


def _int(ds: Dataset, keyword: str) -> int | None:
    tag, vr = _FIELDS[keyword]
    text = raw_text(ds.get_item(tag, keep_deferred=True), vr)
    if text is not None and _INTEGER.fullmatch(text):
        return int(text)
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


#: Values larger than this are not read, only located (so Pixel Data is never loaded).
_DEFER_BYTES = 64 * 1024
#: A deflated data set is held inflated in memory: larger than this is refused.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024
_DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")
#: A File Meta group up to this size is checked for the deflated syntax without parsing.
_META_PEEK = 64 * 1024
#: Explicit VRs with a 4-byte length (after 2 reserved bytes), as pydicom reads them.
_LONG_LENGTH_VRS = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)


def _check_declared_lengths(ds: Dataset, stream: BinaryIO) -> None:
    """Every value pydicom skipped over must lie inside the file.

    A truncated file, or one whose Pixel Data declares an absurd length, parses
    without error when large values are deferred; it must not be accepted.
    """
    size = stream.seek(0, io.SEEK_END)
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields converted elements
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
            continue
        if raw.value is None:  # deferred: located, not read
            short = raw.value_tell + raw.length > size
        else:  # read: pydicom silently accepts fewer bytes than declared at end of file
            short = len(raw.value) < raw.length
        if short:
            raise InvalidInstance(
                f"element {tag} declares {raw.length} bytes but the file ends before them"
            )


def _meta_end(data: bytes) -> int | None:
    """Where the File Meta group (explicit VR little endian) that ``data`` starts with ends,
    or None when it does not end inside ``data``. Walked the way pydicom reads it: element
    after element up to the first of another group (its group length is not trusted)."""
    at = 0
    while at + 8 <= len(data):
        if data[at : at + 2] != b"\x02\x00":
            return at
        vr = data[at + 4 : at + 6]
        if vr in _LONG_LENGTH_VRS:
            at += 12 + int.from_bytes(data[at + 8 : at + 12], "little")
        elif not b"AA" <= vr <= b"ZZ":  # pydicom then reads it as implicit VR
            at += 8 + int.from_bytes(data[at + 4 : at + 8], "little")
        else:
            at += 8 + int.from_bytes(data[at + 6 : at + 8], "little")
    return None


def _deflated(stream: BinaryIO) -> bool:
    """Whether the File Meta Information names the deflated transfer syntax; if so,
    ``stream`` is left at the start of the (deflated) data set.

    ``stream`` is positioned after the ``DICM`` prefix. The usual case is answered by
    walking the meta's elements and a byte search (parsing it twice cost ~15% of a header).
    """
    start = stream.tell()
    peek = stream.read(_META_PEEK)
    end = _meta_end(peek)
    if end is not None and _DEFLATED_UID not in peek[:end]:
        return False
    stream.seek(start)
    try:
        meta = _read_file_meta_info(stream)
        return str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    except Exception:  # the full parse below says what is wrong with it
        return False


def _check_inflated_size(stream: BinaryIO) -> None:
    """pydicom inflates a deflated data set whole, in memory: refuse a deflate bomb first.

    Inflated chunk by chunk here, keeping only the count, from the stream's position.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := stream.read(_INFLATE_CHUNK):
            while chunk:
                total += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                if total > MAX_INFLATED_BYTES:
                    raise InvalidInstance(
                        f"the deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes",
                        REASON_TOO_LARGE,
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise InvalidInstance("the deflated data set cannot be inflated") from None


def read_header(stream: BinaryIO) -> InstanceHeader:
    """Validate a Part 10 instance read from ``stream`` (positioned at its start)."""
    preamble = stream.read(PREAMBLE_LENGTH)
    prefix = stream.read(len(PREFIX))
    if len(preamble) < PREAMBLE_LENGTH or prefix != PREFIX:
        raise InvalidInstance("not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)")
    # Deflated: pydicom holds it inflated whole, and deferred values' offsets would point
    # into that inflated copy, not into ``stream``; so bound its size and defer nothing.
    defer: int | None = _DEFER_BYTES
    if _deflated(stream):
        _check_inflated_size(stream)
        defer = None
    stream.seek(0)
    try:
        ds = pydicom.dcmread(stream, defer_size=defer, force=False)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise InvalidInstance(f"the DICOM data cannot be parsed ({type(exc).__name__})") from None
    except Exception as exc:  # pydicom raises a wide variety on hostile input
        raise InvalidInstance(f"the DICOM data cannot be parsed ({type(exc).__name__})") from None
    _check_declared_lengths(ds, stream)
    meta = getattr(ds, "file_meta", None)
    try:
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        meta_sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "") if meta else ""
    except Exception as exc:  # e.g. an unknown VR: pydicom converts such an element only now
        raise InvalidInstance(
            f"the File Meta Information cannot be decoded ({type(exc).__name__})"
        ) from None
    if not syntax:
        raise InvalidInstance("the File Meta Information has no Transfer Syntax UID")
    try:
        header = InstanceHeader(
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            sop_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_uid(ds, "SOPClassUID"),
            patient_id=_uid(ds, "PatientID"),
            transfer_syntax_uid=syntax,
            modality=_text(ds, "Modality") or None,
            study_date=_text(ds, "StudyDate") or None,
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            preamble_was_clean=preamble == ZERO_PREAMBLE,
            dataset=ds,
            accession=_text(ds, "AccessionNumber") or None,
        )
    except InvalidInstance:
        raise
    except Exception as exc:  # a value that cannot be decoded is bad input, not our failure
        raise InvalidInstance(f"the DICOM data cannot be decoded ({type(exc).__name__})") from None
    if meta_sop and meta_sop != header.sop_uid:
        raise InvalidInstance("File Meta SOP Instance UID does not match the data set's")
    return header


def read_header_bytes(data: bytes) -> InstanceHeader:
    return read_header(io.BytesIO(data))
