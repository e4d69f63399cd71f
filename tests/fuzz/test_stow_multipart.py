"""Fuzzing STOW-RS intake: the multipart/related reader, then the node's STOW-RS route.

The reader: a well-formed body gives back exactly its parts however it is cut into
chunks; a damaged one raises only ``MultipartError``. The route, driven in process
over a real SQLite data directory: never a 5xx, and what it answers stored is exactly
what the store holds afterwards (a refused part stores nothing).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from exchange.config import load_settings
from exchange.dicom.multipart import MultipartError, MultipartReader, Part
from exchange.node.app import create_app
from exchange.node.services import NodeServices
from tests.fuzz import strategies
from tests.fuzz.harness import fuzz, no_server_error, tally

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

READER = tally("stow-multipart")
ROUTE = tally("stow-route")
TENANT = "t-fz"

_BOUNDARY_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\;')
boundaries = st.text(_BOUNDARY_CHARS, min_size=1, max_size=70)
_HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
part_headers = st.dictionaries(
    st.sampled_from(("Content-Type", "Content-ID", "Content-Location", "X-Fuzz")),
    _HEADER_VALUE.map(str.strip).filter(bool),
    max_size=3,
)
contents = st.binary(max_size=300) | st.sampled_from(
    (b"", b"\r\n", b"\r\n--", b"--", b"\r\n\r\n", b"-- \r\n")
)


def build(
    parts: list[tuple[dict[str, str], bytes]], boundary: str, preamble: bytes, epilogue: bytes
) -> bytes:
    out = bytearray(preamble + (b"\r\n" if preamble else b""))
    for i, (headers, content) in enumerate(parts):
        out += (b"\r\n" if i else b"") + f"--{boundary}\r\n".encode()
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + content
    out += f"\r\n--{boundary}--".encode() + epilogue
    return bytes(out)


def read(data: bytes, boundary: str, cuts: list[int]) -> list[Part]:
    """Feed ``data`` cut at ``cuts``; every part is closed before this returns."""
    reader = MultipartReader(boundary)
    parts: list[Part] = []
    try:
        edges = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        for start, end in itertools.pairwise(edges):
            parts += reader.feed(data[start:end])
        reader.finish()
        return [Part(p.headers, _Bytes(p.body.read()), p.size) for p in parts]  # type: ignore[arg-type]
    finally:
        for part in parts:
            part.close()
        reader.close()


@dataclass
class _Bytes:
    data: bytes

    def read(self) -> bytes:
        return self.data

    def close(self) -> None:
        pass


@given(
    st.lists(st.tuples(part_headers, contents), min_size=1, max_size=5),
    boundaries,
    st.sampled_from((b"", b"preamble text", b"--not-it")),
    st.sampled_from((b"", b"\r\n", b"epilogue \r\n--x--")),
    st.lists(st.integers(0, 4000), max_size=8),
)
@fuzz(examples=200)
def test_well_formed_bodies_give_back_their_parts(
    parts: list[tuple[dict[str, str], bytes]],
    boundary: str,
    preamble: bytes,
    epilogue: bytes,
    cuts: list[int],
) -> None:
    with READER.example():
        delimiter = f"\r\n--{boundary}".encode()
        if any(delimiter in b"\r\n" + c + b"\r\n" for _, c in parts) or delimiter in (
            b"\r\n" + preamble
        ):
            return  # the content itself would end the part: not a well-formed body
        got = read(build(parts, boundary, preamble, epilogue), boundary, cuts)
        assert [p.body.read() for p in got] == [c for _, c in parts]
        assert [p.headers for p in got] == [{k.lower(): v for k, v in h.items()} for h, _ in parts]


@st.composite
def damaged_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(boundaries)
    parts = draw(st.lists(st.tuples(part_headers, contents), min_size=1, max_size=4))
    data = bytearray(build(parts, boundary, b"", b""))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "headers")))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:  # a flood of part headers, or one very long
            data[at:at] = draw(
                st.sampled_from((b"X-A: b\r\n" * 40, b"X-Long: " + b"a" * 5000 + b"\r\n"))
            )
    return bytes(data), boundary


@given(damaged_bodies(), st.lists(st.integers(0, 4000), max_size=8))
@fuzz(examples=300)
def test_damaged_bodies_fail_only_with_multipart_error(
    damaged: tuple[bytes, str], cuts: list[int]
) -> None:
    data, boundary = damaged
    with READER.example(), contextlib.suppress(MultipartError):
        read(data, boundary, cuts)


@given(st.text(max_size=300))
@fuzz(examples=100)
def test_any_boundary_is_taken_or_refused_cleanly(boundary: str) -> None:
    with READER.example():
        try:
            read(
                build([({}, b"x")], boundary, b"", b"") if boundary.isascii() else b"", boundary, []
            )
        except MultipartError:
            pass
        except UnicodeEncodeError:
            pass  # a surrogate in the test's own build(): never reaches the reader


# -- the route ---------------------------------------------------------------------


@dataclass
class Node:
    client: TestClient
    services: NodeServices
    key: str


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root: Path = tmp_path_factory.mktemp("fuzz-node")
    settings = load_settings(
        data_dir=root, node_id="node-fz", tenants={TENANT: {"organization": "org-fz"}}
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://node-fz.test", raise_server_exceptions=False) as client:
        services: NodeServices = app.state.services
        yield Node(client, services, services.credentials.create_api_key(TENANT))


_CONTENT_TYPES = st.sampled_from(
    (
        'multipart/related; type="application/dicom"; boundary={b}',
        "multipart/related; boundary={b}",
        'multipart/related; type="application/dicom"; boundary="{b}"',
        "multipart/related; type=application/dicom+json; boundary={b}",
        "multipart/related",
        "multipart/related; boundary=",
        "application/dicom",
        "text/plain; boundary={b}",
        "",
    )
)
_PART_TYPES = st.sampled_from(
    ({"Content-Type": "application/dicom"}, {}, {"Content-Type": "application/octet-stream"})
)


@st.composite
def stow_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(("fz-boundary", "x")) | boundaries)
    instances = st.one_of(
        strategies.mutated_dicom(), st.sampled_from(strategies.seeds()).map(lambda s: s.data)
    )
    parts = draw(st.lists(st.tuples(_PART_TYPES, instances), min_size=0, max_size=4))
    data = build(parts, boundary, b"", b"")
    if draw(st.booleans()):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        data = data[:at] if draw(st.booleans()) else data[:at] + b"\x00garbage" + data[at:]
    return draw(_CONTENT_TYPES).format(b=boundary), data


def _sops(services: NodeServices) -> set[str]:
    return {view.sop_uid for view in services.store.instances(TENANT)}


@given(stow_requests(), st.sampled_from(("", "/2.25.1", "/not-a-uid")))
@fuzz(examples=60)
def test_stow_never_fails_on_the_server_and_stores_what_it_says(
    node: Node, request: tuple[str, bytes], study: str
) -> None:
    content_type, data = request
    with ROUTE.example():
        assert not _sops(node.services)
        response = node.client.post(
            f"/dicomweb/studies{study}",
            content=data,
            headers={"Content-Type": content_type, "X-API-Key": node.key},
        )
        held = _sops(node.services)
        try:
            no_server_error(response)
            said: set[str] = set()
            if response.status_code in (200, 202):
                body = json.loads(response.text)
                for item in body.get("00081199", {}).get("Value", []):
                    said.add(item["00081155"]["Value"][0])
            assert held <= said, "the store holds an instance the answer did not report"
            assert said <= held, "the answer reports an instance the store does not hold"
        finally:
            for view in node.services.store.instances(TENANT):
                node.services.store.delete_study(TENANT, view.study_uid)
