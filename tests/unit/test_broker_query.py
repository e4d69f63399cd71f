"""The broker's pure parts: QIDO-RS keys to an index search, URL rewriting, headers, paths."""

from __future__ import annotations

import httpx
import pytest

from exchange.errors import BadRequest, NotAcceptable
from exchange.hub.broker import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Rewriter,
    accepts_json,
    parse_study_query,
    passed_headers,
)
from exchange.hub.routes.dicomweb import checked

DCM = "http://dicom.nema.org/resources/ontology/DCM"


def criteria(*params: tuple[str, str]) -> list[tuple[str, str]]:
    return list(parse_study_query(list(params)).criteria)


# -- QIDO-RS keys -> ImagingStudy search ---------------------------------------------------


def test_no_keys_is_every_study_newest_first() -> None:
    query = parse_study_query([])
    assert query.criteria == (("_sort", "-started"),)
    assert (query.limit, query.offset) == (DEFAULT_LIMIT, 0)


def test_keys_by_keyword_and_by_tag_mean_the_same() -> None:
    by_keyword = criteria(("PatientID", "MRN-1"), ("AccessionNumber", "ACC-9"))
    by_tag = criteria(("00100020", "MRN-1"), ("00080050", "ACC-9"))
    assert by_keyword == by_tag
    assert ("patient.identifier", "MRN-1") in by_keyword
    assert ("identifier", "ACC-9") in by_keyword


def test_study_uids_are_alternatives_in_any_list_form() -> None:
    found = criteria(("StudyInstanceUID", "1.2.3,1.2.4"), ("0020000d", "1.2.5\\1.2.6"))
    assert found[0] == (
        "identifier",
        ",".join(f"urn:dicom:uid|urn:oid:1.2.{n}" for n in (3, 4, 5, 6)),
    )


def test_modalities_are_dcm_codes() -> None:
    assert ("modality", f"{DCM}|CT,{DCM}|MR") in criteria(("ModalitiesInStudy", "CT,MR"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260101", [("started", "2026-01-01")]),
        ("20260101-20260131", [("started", "ge2026-01-01"), ("started", "le2026-01-31")]),
        ("-20260131", [("started", "le2026-01-31")]),
        ("20260101-", [("started", "ge2026-01-01")]),
    ],
)
def test_study_date_and_ranges(value: str, expected: list[tuple[str, str]]) -> None:
    assert criteria(("StudyDate", value))[:-1] == expected


def test_values_with_search_syntax_are_escaped_and_commas_separate_alternatives() -> None:
    found = criteria(("PatientID", "A,B|C$D\\E"))
    assert ("patient.identifier", "A,B\\|C\\$D\\\\E") in found


def test_empty_values_are_universal_matching() -> None:
    assert criteria(("PatientID", ""), ("StudyDate", "")) == [("_sort", "-started")]


def test_paging_and_fields() -> None:
    query = parse_study_query(
        [
            ("limit", "5000"),
            ("offset", "7"),
            ("includefield", "StudyDescription,00081030"),
            ("includefield", "all"),
            ("fuzzymatching", "false"),
        ]
    )
    assert (query.limit, query.offset) == (MAX_LIMIT, 7)
    assert query.includefields == ("StudyDescription", "00081030", "all")


def test_patient_ids_are_kept_for_the_audit() -> None:
    assert parse_study_query([("PatientID", "P1,P2")]).patient_ids == ("P1", "P2")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ([("PatientName", "DOE^J")], "cannot search studies by 'PatientName'"),
        ([("00100010", "DOE^J")], "cannot search studies by '00100010'"),
        ([("StudyInstanceUID", "1.2.x")], "not a DICOM UID"),
        ([("StudyInstanceUID", "..")], "not a DICOM UID"),
        ([("PatientID", "MRN*")], "no * or ?"),
        ([("AccessionNumber", "A?C")], "no * or ?"),
        ([("StudyDate", "2026-01-01")], "not a date or range"),
        ([("StudyDate", "20260101"), ("StudyDate", "20260102")], "one date or one range"),
        ([("StudyDate", "-")], "not a date or range"),
        ([("ModalitiesInStudy", "ct scan")], "not a modality code"),
        ([("limit", "0")], "limit must be at least 1"),
        ([("offset", "x")], "offset must be an integer"),
        ([("includefield", "NotAKeyword")], "not a DICOM keyword or tag"),
        ([("fuzzymatching", "maybe")], "fuzzymatching must be true or false"),
    ],
)
def test_unsupported_or_bad_keys_are_400_naming_them(
    params: list[tuple[str, str]], says: str
) -> None:
    with pytest.raises(BadRequest, match=None) as refused:
        parse_study_query(params)
    assert says in refused.value.message


# -- streaming rewrite -------------------------------------------------------------------------


OLD = b"http://127.0.0.1:40001/dicomweb"
NEW = b"http://hub.example.org/dicomweb"


def test_rewriting_finds_urls_cut_anywhere_by_chunks() -> None:
    body = (
        b'[{"00081190":{"vr":"UR","Value":["' + OLD + b'/studies/1.2.3"]},'
        b'"7FE00010":{"vr":"OW","BulkDataURI":"'
        + OLD
        + b'/studies/1.2.3/bulkdata/7FE00010"}}]'
        + OLD
    )
    expected = body.replace(OLD, NEW)
    for size in (1, 2, 3, 7, len(OLD) - 1, len(OLD), len(OLD) + 1, 64, len(body)):
        rewriter = Rewriter(OLD, NEW)
        out = b"".join(rewriter.feed(body[i : i + size]) for i in range(0, len(body), size))
        assert out + rewriter.flush() == expected, size


def test_rewriting_never_rewrites_its_own_output() -> None:
    rewriter = Rewriter(b"ab", b"a")
    out = rewriter.feed(b"xa") + rewriter.feed(b"bb") + rewriter.flush()
    assert out == b"xab"


# -- headers, Accept, path parameters --------------------------------------------------------


def test_only_end_to_end_headers_are_passed_on() -> None:
    upstream = httpx.Headers(
        [
            ("Content-Type", "application/dicom+json"),
            ("Content-Length", "120"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Server", "uvicorn"),
            ("Set-Cookie", "a=b"),
            ("X-Request-ID", "node-internal"),
            ("Warning", '299 node "more"'),
        ]
    )
    assert passed_headers(upstream, rewritten=False) == {
        "content-type": "application/dicom+json",
        "content-length": "120",
        "warning": '299 node "more"',
    }
    assert "content-length" not in passed_headers(upstream, rewritten=True)


def test_search_results_must_be_acceptable_as_json() -> None:
    for accept in (None, "", "application/dicom+json", "application/json, */*;q=0.1", "*/*"):
        accepts_json(accept)
    with pytest.raises(NotAcceptable):
        accepts_json('multipart/related; type="application/dicom"')
    with pytest.raises(NotAcceptable):
        accepts_json("application/dicom+json;q=0")


@pytest.mark.parametrize(
    "params",
    [
        {"study": ".."},
        {"study": "1.2", "series": "1..2"},
        {"study": "1.2", "series": "1.3", "sop": "x"},
        {"study": "1.2", "series": "1.3", "sop": "1.4", "frames": "1,,2"},
        {"study": "1.2", "series": "1.3", "sop": "1.4", "tag": "7FE0001"},
    ],
)
def test_path_parameters_are_uids_and_numbers(params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        checked(params)


def test_good_path_parameters_pass() -> None:
    params = {"study": "1.2", "series": "1.3", "sop": "1.4", "frames": "1,2,10", "tag": "7fe00010"}
    assert checked(params) == params
