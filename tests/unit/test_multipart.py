"""The streaming multipart/related reader: any chunking gives the same parts, bad bodies fail."""

from __future__ import annotations

import random

import pytest

from exchange.dicom.multipart import MultipartError, MultipartReader, Part, media_type

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
DICOM = {"Content-Type": "application/dicom"}

# Bodies that look like delimiters but are not, or end where a delimiter could start.
TRICKY = [
    b"",
    b"plain",
    b"\r",
    b"\r\n",
    b"\r\n-",
    b"\r\n--",
    b"\r\n--" + BOUNDARY[:10].encode(),
    b"x\r\n--" + BOUNDARY.encode() + b"X and more",
    b"x\r\n--" + BOUNDARY.encode() + b"-X",
    b"--" + BOUNDARY.encode() + b"\r\n not at a line start",
    b"\r\r\n\r\n--\r\n--" + BOUNDARY[:-1].encode() + b"\r\n",
    bytes(range(256)) * 40,
]


def body(
    parts: list[tuple[dict[str, str], bytes]],
    boundary: str = BOUNDARY,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    close: bool = True,
) -> bytes:
    out = bytearray(preamble)
    for i, (headers, content) in enumerate(parts):
        out += (b"\r\n" if i or preamble else b"") + f"--{boundary}\r\n".encode()
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + content
    if close:
        out += f"\r\n--{boundary}--".encode() + epilogue
    return bytes(out)


def read(data: bytes, sizes: list[int] | int, boundary: str = BOUNDARY, **kw: int) -> list[Part]:
    reader = MultipartReader(boundary, **kw)  # type: ignore[arg-type]
    parts: list[Part] = []
    offset = 0
    index = 0
    while offset < len(data):
        size = sizes if isinstance(sizes, int) else sizes[index % len(sizes)]
        parts += reader.feed(data[offset : offset + size])
        offset += size
        index += 1
    reader.finish()
    return parts


def contents(parts: list[Part]) -> list[bytes]:
    return [p.body.read() for p in parts]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 41, 64, 1000, 1 << 20])
def test_any_fixed_chunk_size_gives_the_same_parts(size):
    data = body([(DICOM, content) for content in TRICKY])
    parts = read(data, size)
    assert contents(parts) == TRICKY
    assert [p.size for p in parts] == [len(c) for c in TRICKY]


def test_random_chunkings_give_the_same_parts():
    rng = random.Random(1386)
    for _ in range(200):
        chosen = [rng.choice(TRICKY) + bytes([rng.randrange(256)]) * rng.randrange(3)]
        chosen += rng.sample(TRICKY, 4)
        data = body([(DICOM, c) for c in chosen], preamble=rng.choice([b"", b"pre\r\n"]))
        sizes = [rng.randrange(1, 90) for _ in range(rng.randrange(1, 12))]
        assert contents(read(data, sizes)) == chosen


def test_preamble_and_epilogue_are_ignored():
    data = body(
        [(DICOM, b"one"), (DICOM, b"two")],
        preamble=b"This is a preamble --" + BOUNDARY[:5].encode() + b"\r\n",
        epilogue=b"\r\nand an epilogue\r\n--" + BOUNDARY.encode() + b"\r\nignored",
    )
    for size in (1, 4, len(data)):
        assert contents(read(data, size)) == [b"one", b"two"]


def test_leading_crlf_as_dicomweb_client_sends_it():
    data = b"\r\n" + body([(DICOM, b"one")])
    assert contents(read(data, 3)) == [b"one"]


def test_part_headers_are_parsed_with_lower_case_names():
    headers = {
        "Content-Type": 'application/dicom; transfer-syntax="1.2.840.10008.1.2.1"',
        "content-LOCATION": "urn:x",
        "Content-ID": "<a@b>",
    }
    [part] = read(body([(headers, b"x")]), 2)
    assert part.headers == {
        "content-type": 'application/dicom; transfer-syntax="1.2.840.10008.1.2.1"',
        "content-location": "urn:x",
        "content-id": "<a@b>",
    }
    assert part.content_type == "application/dicom"
    [bare] = read(body([({}, b"x")]), 2)
    assert bare.headers == {}
    assert bare.content_type is None


@pytest.mark.parametrize(
    "header",
    [
        f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"',
        f"Multipart/Related; TYPE=application/DICOM; Boundary={BOUNDARY}",
        f'multipart/related;boundary={BOUNDARY};type="application/dicom"',
    ],
)
def test_content_type_parameters_quoted_or_not(header):
    kind, params = media_type(header)
    assert kind == "multipart/related"
    assert params["boundary"] == BOUNDARY
    assert params["type"].lower() == "application/dicom"


def test_a_quoted_boundary_with_a_space():
    boundary = "my boundary"
    _, params = media_type(f'multipart/related; boundary="{boundary}"')
    assert contents(read(body([(DICOM, b"a b")], boundary=boundary), 1, params["boundary"])) == [
        b"a b"
    ]


def test_missing_closing_boundary_keeps_only_complete_parts():
    data = body([(DICOM, b"complete"), (DICOM, b"cut off")], close=False)
    reader = MultipartReader(BOUNDARY)
    parts = reader.feed(data)
    assert contents(parts) == [b"complete"]
    with pytest.raises(MultipartError, match="ended before the closing"):
        reader.finish()
    reader.close()


def test_a_body_cut_inside_the_closing_delimiter_is_an_error():
    data = body([(DICOM, b"x")])
    with pytest.raises(MultipartError):
        read(data[:-1], 1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"just some bytes, no boundary at all" * 100, "no multipart boundary"),
        (f"--{BOUNDARY}\r\nBad Header\r\n\r\nx".encode(), "malformed"),
        (f"--{BOUNDARY}garbage\r\n".encode(), "malformed"),
    ],
)
def test_malformed_bodies(data, message):
    with pytest.raises(MultipartError, match=message):
        read(data, 7)


def test_an_error_is_raised_after_the_parts_completed_before_it():
    good = body([(DICOM, b"first")], close=False) + f"\r\n--{BOUNDARY}\r\n".encode()
    reader = MultipartReader(BOUNDARY)
    parts = reader.feed(good + b"No Colon Here\r\n\r\n")
    assert contents(parts) == [b"first"]
    with pytest.raises(MultipartError):
        reader.feed(b"more")
    with pytest.raises(MultipartError):
        reader.finish()


def test_no_parts_is_not_an_error_for_the_reader():
    assert read(f"--{BOUNDARY}--\r\n".encode(), 1) == []


def test_too_many_parts():
    with pytest.raises(MultipartError, match="more than 3 parts"):
        read(body([(DICOM, b"x")] * 4), 5, max_parts=3)


def test_large_parts_are_spooled_to_disk(tmp_path):
    big = bytes(range(256)) * 4096  # 1 MiB
    parts = read(body([(DICOM, big), (DICOM, b"small")]), 65536, spool_bytes=1024)
    assert contents(parts) == [big, b"small"]
    assert getattr(parts[0].body, "_rolled") is True  # noqa: B009 - SpooledTemporaryFile state
    assert getattr(parts[1].body, "_rolled") is False  # noqa: B009


def test_bad_boundaries_are_refused():
    with pytest.raises(MultipartError):
        MultipartReader("")
    with pytest.raises(MultipartError):
        MultipartReader("x" * 201)
