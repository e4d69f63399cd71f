"""Fuzzing FHIR input on an in-process hub: every writable type, created and updated.

Bodies are the seed resources (``corpus/fhir``) with values replaced by JSON of the
wrong type, fields dropped or added, huge strings, deep nesting and odd unicode, plus
bodies that are not JSON at all. Properties: never a 5xx; a refused write stores
nothing (the resource table does not grow); an accepted one can be read back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.fhir import resources
from tests.fuzz.harness import corpus, fuzz, no_server_error, tally
from tests.fuzz.hub import Hub, running_hub

WRITE = tally("fhir-write")
FHIR_JSON = {"Content-Type": "application/fhir+json"}
WRITABLE = sorted(t for t, writable in resources.SERVED.items() if writable)
SEEDS: dict[str, dict[str, Any]] = {}
for _path in corpus("fhir"):
    _body = json.loads(_path.read_text())
    SEEDS.setdefault(_body["resourceType"], _body)


def test_every_writable_type_has_a_seed() -> None:
    assert sorted(SEEDS) == WRITABLE


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root: Path = tmp_path_factory.mktemp("fuzz-hub-write")
    with running_hub(root) as running:
        yield running


_TEXT = st.text(max_size=30) | st.sampled_from(
    (
        "",
        " ",
        "\x00",
        "\x0c",
        "\ud800",
        "😀" * 3,
        "a" * 100_000,
        "Robert'); DROP TABLE x;--",
        "../..",
        "9999-12-31",
        "9999-12-31T23:59:59.999Z",
        "0001-01-01T00:00:00+14:00",
    )
)
_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT
_JSON = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if len(prefix) > 12:  # not into the deep nests this test itself made
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _nest(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"url": "urn:fz", "extension": [value]} if level % 2 else [value]
    return value


@st.composite
def mutated_resources(draw: st.DrawFn) -> tuple[str, Any]:
    rtype = draw(st.sampled_from(WRITABLE))
    body: Any = json.loads(json.dumps(SEEDS[rtype]))
    body.pop("id", None)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(body) if p and p[0] != "resourceType"]
        kind = draw(st.sampled_from(("replace", "replace", "drop", "add", "nest", "type")))
        if kind == "type":
            body["resourceType"] = draw(st.sampled_from((*WRITABLE, "Bundle", "", 7)))
            continue
        if kind == "add" or not paths:
            body[draw(_TEXT)] = draw(_JSON)
            continue
        path = draw(st.sampled_from(paths))
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        if kind == "drop":
            del parent[path[-1]]
        elif kind == "nest":
            parent[path[-1]] = _nest(draw(st.sampled_from((50, 200, 400, 2000))))
        else:
            parent[path[-1]] = draw(_JSON)
    return rtype, body


def _quote(text: str, safe: str = "") -> str:
    """Percent-encoded as a client would send it (the server sees the odd text itself)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe=safe)


def _encode(body: Any) -> bytes:
    try:
        return json.dumps(body).encode()
    except (RecursionError, ValueError):
        return b'{"resourceType": '


def _check_write(hub: Hub, method: str, url: str, rtype: str, content: bytes) -> None:
    before = hub.count()
    response = hub.client.request(
        method,
        url,
        content=content,
        headers={**FHIR_JSON, "Authorization": f"Bearer {hub.operator}"},
    )
    no_server_error(response)
    if response.status_code >= 400:
        assert hub.count() == before, "a refused write stored a resource"
        assert response.json()["resourceType"] == "OperationOutcome"
        return
    stored = response.json()
    read = hub.client.get(
        f"/fhir/{rtype}/{stored['id']}", headers={"Authorization": f"Bearer {hub.operator}"}
    )
    assert read.status_code == 200, read.text[:2000]


@given(mutated_resources(), st.sampled_from(("POST", "PUT")))
@fuzz(examples=150)
def test_mutated_resources_are_stored_or_refused_cleanly(
    hub: Hub, mutated: tuple[str, Any], method: str
) -> None:
    rtype, body = mutated
    url = f"/fhir/{rtype}" if method == "POST" else f"/fhir/{rtype}/fz-{abs(hash(rtype)) % 97}"
    with WRITE.example():
        _check_write(hub, method, url, rtype, _encode(body))


@given(
    st.sampled_from(WRITABLE),
    st.binary(max_size=200)
    | st.sampled_from((b"[]", b"null", b'"x"', b"{", b"[" * 100_000, b'{"a":' * 5000)),
)
@fuzz(examples=60)
def test_bodies_that_are_not_resources_are_refused(hub: Hub, rtype: str, content: bytes) -> None:
    with WRITE.example():
        _check_write(hub, "POST", f"/fhir/{rtype}", rtype, content)


@given(
    st.sampled_from(WRITABLE),
    st.text(max_size=80),
    st.text(max_size=120),
    st.sampled_from(("POST", "PUT", "PUT-conditional")),
)
@fuzz(examples=80)
def test_odd_ids_and_conditions_are_refused_cleanly(
    hub: Hub, rtype: str, rid: str, query: str, method: str
) -> None:
    body = dict(SEEDS[rtype])
    body.pop("id", None)
    headers = {**FHIR_JSON, "Authorization": f"Bearer {hub.operator}"}
    with WRITE.example():
        if method == "POST":
            condition = (
                query.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")
            )
            response = hub.client.post(
                f"/fhir/{rtype}", json=body, headers={**headers, "If-None-Exist": condition}
            )
        elif method == "PUT":
            response = hub.client.put(f"/fhir/{rtype}/{_quote(rid)}", json=body, headers=headers)
        else:
            response = hub.client.put(
                f"/fhir/{rtype}?{_quote(query, '=&')}", json=body, headers=headers
            )
        no_server_error(response)
