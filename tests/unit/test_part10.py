import io

import pytest

from exchange.dicom.part10 import InvalidInstance, read_header, read_header_bytes
from tests.dicomdata import bundled, generated, with_preamble, without

PE_HEADER = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff"


def test_valid_instance_is_read():
    header = read_header_bytes(generated(patient_id="P-9")[0])
    assert header.patient_id == "P-9"
    assert header.modality == "CT"
    assert header.preamble_was_clean


def test_bundled_file_is_read():
    with bundled().open("rb") as handle:
        header = read_header(handle)
    assert header.sop_uid
    assert header.study_uid


def test_executable_preamble_is_noticed():
    header = read_header_bytes(with_preamble(generated()[0], PE_HEADER))
    assert header.preamble_was_clean is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a DICOM Part 10 file"),
        (b"hello world" * 20, "not a DICOM Part 10 file"),
        (bytes(128) + b"DICM" + b"\xff" * 50, "cannot be parsed|no Transfer Syntax"),
    ],
)
def test_garbage_is_rejected(data, message):
    with pytest.raises(InvalidInstance, match=message):
        read_header(io.BytesIO(data))


@pytest.mark.parametrize(
    ("keyword", "named"),
    [
        ("PatientID", "Patient ID"),
        ("StudyInstanceUID", "Study Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
    ],
)
def test_missing_identifiers_are_rejected(keyword, named):
    with pytest.raises(InvalidInstance, match=f"missing {named}"):
        read_header_bytes(without(generated()[0], keyword))


def test_file_without_meta_is_rejected():
    path = bundled("no_meta.dcm")
    with pytest.raises(InvalidInstance, match="Part 10"):
        read_header(path.open("rb"))


def test_truncated_file_is_rejected():
    data = generated()[0]
    with pytest.raises(InvalidInstance):
        read_header_bytes(data[:200])


def test_file_cut_inside_pixel_data_is_rejected():
    data = generated(size=64)[0]
    with pytest.raises(InvalidInstance, match="file ends before"):
        read_header_bytes(data[:-100])


def test_absurd_pixel_data_length_is_rejected():
    data = generated(size=64)[0]
    marker = b"\xe0\x7f\x10\x00OW\x00\x00"
    at = data.rfind(marker) + len(marker)
    lying = data[:at] + (0xFFFFFFF0).to_bytes(4, "little") + data[at + 4 :]
    with pytest.raises(InvalidInstance):
        read_header_bytes(lying)
