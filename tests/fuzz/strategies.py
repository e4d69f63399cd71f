"""Hypothesis strategies: mutated seed files and generated inputs.

DICOM mutations follow what breaks parsers in practice: flipped bytes, truncation,
length fields set to absurd values (located from a real parse of the seed, so they
hit actual length fields), inserted or deleted runs, duplicated chunks, and a
garbage preamble (which must be accepted and zeroed, not refused).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pydicom
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from tests.fuzz.harness import corpus

#: pydicom's bundled files used as seeds (all small): VRs, byte orders, nested and
#: private sequences, compressed pixel data, deflate, undefined lengths.
BUNDLED = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
    "reportsi.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",
    "test-SR.dcm",
    "emri_small.dcm",
)

#: Values for a 4-byte length field that have broken readers.
ABSURD_LENGTHS = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 1, 3, 0x10000)
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    #: (offset, width) of each length field found in the seed (file meta and data set).
    lengths: tuple[tuple[int, int], ...]
    little_endian: bool
    #: (offset, length) of each element value of defined, non-zero length.
    values: tuple[tuple[int, int], ...] = ()


def _length_fields(
    data: bytes,
) -> tuple[tuple[tuple[int, int], ...], bool, tuple[tuple[int, int], ...]]:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=0)
    except Exception:
        return (), True, ()
    found: list[tuple[int, int]] = []
    values: list[tuple[int, int]] = []
    little = True

    def walk(dataset: Dataset, implicit: bool) -> None:
        nonlocal little
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag, keep_deferred=True)
            if not isinstance(raw, RawDataElement) or raw.value_tell is None:
                continue
            little = raw.is_little_endian
            width = 4 if implicit or raw.VR in _LONG_VRS else 2
            found.append((raw.value_tell - width, width))
            if 0 < raw.length < 0xFFFFFFFF:
                values.append((raw.value_tell, raw.length))

    walk(ds.file_meta, False)
    walk(ds, bool(getattr(ds, "is_implicit_VR", False)))
    return tuple(sorted(set(found))), little, tuple(sorted(set(values)))


@cache
def seeds() -> tuple[Seed, ...]:
    paths: list[Path] = list(corpus("dicom"))
    for name in BUNDLED:
        found = get_testdata_file(name, download=False)
        if found is not None:
            paths.append(Path(found))
    out = []
    for path in paths:
        data = path.read_bytes()
        lengths, little, values = _length_fields(data)
        out.append(Seed(path.name, data, lengths, little, values))
    return tuple(out)


def _flip(data: bytearray, draw: st.DrawFn) -> None:
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))


def _absurd_length(data: bytearray, seed: Seed, draw: st.DrawFn) -> None:
    if not seed.lengths:
        return _flip(data, draw)
    offset, width = draw(st.sampled_from(seed.lengths))
    if width == 4:
        value = draw(st.sampled_from(ABSURD_LENGTHS) | st.integers(0, 0xFFFFFFFF))
        data[offset : offset + 4] = struct.pack("<I" if seed.little_endian else ">I", value)
    else:
        value = draw(st.sampled_from((0xFFFF, 0xFFFE, 1, 3)) | st.integers(0, 0xFFFF))
        data[offset : offset + 2] = struct.pack("<H" if seed.little_endian else ">H", value)
    return None


#: Bytes that mean something inside DICOM values: VM delimiter, ISO 2022 escape, PN groups.
_VALUE_BYTES = st.sampled_from(
    (b"\\", b"\x1b$B", b"=", b"^", b"\x00", b"\xff\xfe", b"\xc3\xa9", b" ")
)


def _value(data: bytearray, seed: Seed, draw: st.DrawFn) -> None:
    """Overwrite part of one element's value (its header intact: it still parses)."""
    if not seed.values:
        return _flip(data, draw)
    start, length = draw(st.sampled_from(seed.values))
    at = start + draw(st.integers(0, length - 1))
    chunk = draw(_VALUE_BYTES | st.binary(min_size=1, max_size=8))[: max(start + length - at, 0)]
    data[at : at + len(chunk)] = chunk
    return None


@st.composite
def mutated_dicom(draw: st.DrawFn) -> bytes:
    """One seed with one to three mutations applied."""
    seed = draw(st.sampled_from(seeds()))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                (
                    "flip",
                    "length",
                    "length",
                    "value",
                    "value",
                    "value",
                    "truncate",
                    "insert",
                    "delete",
                    "dup",
                    "preamble",
                )
            )
        )
        if not data:
            break
        if kind == "flip":
            _flip(data, draw)
        elif kind == "length":
            _absurd_length(data, seed, draw)
        elif kind == "value":
            _value(data, seed, draw)
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "dup":
            at = draw(st.integers(0, len(data) - 1))
            chunk = data[at : at + draw(st.integers(1, 256))]
            where = draw(st.integers(0, len(data)))
            data[where:where] = chunk
        else:
            data[:128] = draw(st.binary(min_size=128, max_size=128))
    return bytes(data)


@st.composite
def garbage_preamble(draw: st.DrawFn) -> bytes:
    """A valid seed with a random preamble: stored, with the preamble zeroed."""
    seed = draw(st.sampled_from(seeds()))
    return draw(st.binary(min_size=128, max_size=128)) + seed.data[128:]


# -- generated data sets ------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)
_UID = st.from_regex(r"[1-9][0-9]{0,6}(\.(0|[1-9][0-9]{0,8})){1,6}", fullmatch=True)


def _element(draw: st.DrawFn, ds: Dataset, depth: int) -> None:
    kind = draw(st.sampled_from(("text", "number", "multi", "sq", "private", "bytes")))
    if kind == "text":
        keyword = draw(
            st.sampled_from(
                ("StudyDescription", "PatientName", "InstitutionName", "ReferringPhysicianName")
            )
        )
        setattr(ds, keyword, draw(_TEXT))
    elif kind == "number":
        ds.Rows = draw(st.integers(0, 0xFFFF))
        ds.SliceThickness = draw(st.floats(allow_nan=False, allow_infinity=False, width=32))
    elif kind == "multi":
        ds.ImageType = draw(st.lists(_ASCII.map(lambda s: s.replace("\\", "")), max_size=6))
    elif kind == "sq" and depth < 8:
        items = []
        for _ in range(draw(st.integers(0, 3))):
            item = Dataset()
            for _ in range(draw(st.integers(0, 3))):
                _element(draw, item, depth + 1)
            items.append(item)
        ds.ContentSequence = items
    elif kind == "private":
        block = ds.private_block(0x0011, draw(_ASCII.filter(bool)) or "FUZZ", create=True)
        block.add_new(draw(st.integers(0x10, 0xFF)), "LO", draw(_ASCII)[:64])
    else:
        ds.add_new(0x00091010, "OB", draw(st.binary(max_size=300)))


@st.composite
def generated_dataset(draw: st.DrawFn) -> Dataset:
    """A data set with the identifiers the exchange needs and random other content."""
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID = draw(_UID)
    ds.SeriesInstanceUID = draw(_UID)
    ds.SOPInstanceUID = draw(_UID)
    ds.PatientID = draw(_ASCII.map(lambda s: s.replace("\\", "").strip()[:64]).filter(bool))
    ds.Modality = draw(st.sampled_from(("CT", "MR", "OT", "SR", "")))
    ds.StudyDate = draw(st.sampled_from(("20260101", "", "19000101")))
    ds.SpecificCharacterSet = "ISO_IR 192"
    for _ in range(draw(st.integers(0, 6))):
        _element(draw, ds, 0)
    return ds
