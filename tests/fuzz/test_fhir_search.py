"""Fuzzing FHIR search parameters: the parser directly, then searches on an in-process hub.

Queries come from a grammar over the real parameter registry (names, modifiers, chains,
prefixes, dates at the edges of the calendar, tokens with escapes, references, result
parameters) mixed with arbitrary text. Properties: ``search.parse`` gives a query or
``BadRequest``, nothing else; a search over HTTP (GET and POST ``_search``) is never a 5xx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.errors import BadRequest
from exchange.fhir import resources, search
from exchange.fhir import searchparams as sp
from tests.fuzz.harness import fuzz, no_server_error, tally
from tests.fuzz.hub import Hub, running_hub

PARSE = tally("fhir-search-parse")
HTTP = tally("fhir-search-http")
TYPES = sorted(resources.SERVED)
NAMES = sorted({name for params in sp.PARAMS.values() for name in params})
CONTROLS = (
    "_count",
    "_offset",
    "_sort",
    "_include",
    "_revinclude",
    "_elements",
    "_summary",
    "_total",
    "_format",
    "_include:iterate",
    "_revinclude:iterate",
    "_pretty",
)
MODIFIERS = (
    "",
    ":missing",
    ":exact",
    ":contains",
    ":not",
    ":text",
    ":identifier",
    ":of-type",
    ":Patient",
    ":Endpoint",
    ":Organization",
    ":below",
    ":above",
    ":in",
    ":x",
    ":",
)
PREFIXES = ("", *sp.DATE_PREFIXES, "xx")

_text = st.text(max_size=20)
_number = st.integers(-(10**20), 10**20).map(str) | st.sampled_from(
    ("1e3", "0x10", " 5", "٣", "9223372036854775808", "1" + "0" * 30, "-1", "")
)
_date = st.one_of(
    st.from_regex(
        r"-?[0-9]{1,5}(-[0-9]{1,2}(-[0-9]{1,2}(T[0-9]{2}(:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?)?"
        r"(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?",
        fullmatch=True,
    ),
    st.sampled_from(
        (
            "9999",
            "9999-12",
            "9999-12-31",
            "9999-12-31T23:59",
            "9999-12-31T23:59:59",
            "9999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.9999999-14:00",
            "0001-01-01T00:00:00+14:00",
            "0001",
            "0000",
            "2026-02-30",
            "2026-13",
            "2026-03-10T24:00:00Z",
            "2026-03-10T12:00:00+99:99",
            "2026-03-10 12:00",
        )
    ),
)
_token = st.one_of(
    _text,
    st.builds(lambda s, c: f"{s}|{c}", _text, _text),
    st.sampled_from(("|", "||", "\\|", "a\\,b", "\\", "$", "a,b,,", "urn:dicom:uid|urn:oid:1.2")),
)
_reference = st.one_of(
    _text,
    st.sampled_from(
        (
            "Patient/1",
            "Patient/",
            "/1",
            "http://hub-fz.test/fhir/Patient/p1",
            "http://elsewhere/fhir/Patient/1",
            "Patient/" + "a" * 65,
            "Endpoint/x/y",
        )
    ),
)


@st.composite
def search_items(draw: st.DrawFn, rtype: str) -> list[tuple[str, str]]:
    own = sorted(sp.PARAMS.get(rtype, {})) or NAMES
    names = st.sampled_from(own) | st.sampled_from(NAMES)
    modifiers = st.just("") | st.sampled_from(MODIFIERS)
    items = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(("param", "param", "control", "chain", "random")))
        if kind == "random":
            items.append((draw(_text), draw(_text)))
            continue
        if kind == "control":
            key = draw(st.sampled_from(CONTROLS))
            value = draw(
                st.one_of(
                    _number,
                    _text,
                    st.sampled_from(
                        (
                            "count",
                            "data",
                            "true",
                            "text",
                            "accurate",
                            "none",
                            "ImagingStudy:patient",
                            "ImagingStudy:patient:Patient",
                            "ImagingStudy:endpoint:Patient",
                            "Consent:patient",
                            "-started,_id",
                            "name",
                            "a:b:c:d",
                            "json",
                        )
                    ),
                )
            )
            items.append((key, value))
            continue
        name = draw(names) + draw(modifiers)
        if kind == "chain":
            name += "." + draw(st.sampled_from(NAMES)) + draw(modifiers)
        value = draw(
            st.one_of(
                st.builds(lambda p, d: p + d, st.sampled_from(PREFIXES), _date),
                _token,
                _reference,
                _text,
                st.sampled_from(("true", "false", "")),
            )
        )
        if draw(st.booleans()):
            value = ",".join([value, *draw(st.lists(_token, max_size=2))])
        items.append((name, value))
    return items


@given(st.data(), st.sampled_from(TYPES), st.booleans())
@fuzz(examples=600)
def test_search_parameters_parse_or_are_refused(
    data: st.DataObject, rtype: str, lenient: bool
) -> None:
    items = data.draw(search_items(rtype))
    with PARSE.example(), contextlib.suppress(BadRequest):
        search.parse(rtype, items, lenient=lenient, local_base="http://hub-fz.test/fhir")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root: Path = tmp_path_factory.mktemp("fuzz-hub-search")
    with running_hub(root) as running:
        yield running


def _query(items: list[tuple[str, str]]) -> str:
    return "&".join(
        f"{quote(k.encode('utf-8', 'surrogatepass'))}={quote(v.encode('utf-8', 'surrogatepass'))}"
        for k, v in items
    )


@given(
    st.data(),
    st.sampled_from(TYPES),
    st.sampled_from(("GET", "POST")),
    st.booleans(),
    st.booleans(),
)
@fuzz(examples=120)
def test_searches_over_http_are_never_a_server_error(
    hub: Hub, data: st.DataObject, rtype: str, method: str, operator: bool, lenient: bool
) -> None:
    items = data.draw(search_items(rtype))
    token = hub.operator if operator else hub.clinician
    headers = {"Authorization": f"Bearer {token}"}
    if lenient:
        headers["Prefer"] = "handling=lenient"
    with HTTP.example():
        if method == "GET":
            response = hub.client.get(f"/fhir/{rtype}?{_query(items)}", headers=headers)
        else:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            response = hub.client.post(
                f"/fhir/{rtype}/_search", content=_query(items).encode(), headers=headers
            )
        no_server_error(response)
        assert response.headers["content-type"].startswith("application/fhir+json")


@given(
    st.sampled_from(("Organization", "Organization", *TYPES)),
    st.lists(
        st.tuples(
            st.sampled_from(("_count", "_offset", "_format", "_since", "x")), _number | _text
        ),
        max_size=3,
    ),
)
@fuzz(examples=40)
def test_history_parameters_are_never_a_server_error(
    hub: Hub, rtype: str, items: list[tuple[str, str]]
) -> None:
    headers = {"Authorization": f"Bearer {hub.operator}"}
    organization = {"resourceType": "Organization", "name": "Fuzz history"}
    put = hub.client.put("/fhir/Organization/fz-history", json=organization, headers=headers)
    assert put.status_code in (200, 201), put.text
    with HTTP.example():
        response = hub.client.get(
            f"/fhir/{rtype}/fz-history/_history?{_query(items)}", headers=headers
        )
        no_server_error(response)
