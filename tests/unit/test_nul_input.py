"""NUL characters are not FHIR (strings exclude control characters) and PostgreSQL text
cannot hold them: a clear 400 on every database, never a 500 from the driver."""

from __future__ import annotations

import pytest

from exchange.errors import BadRequest
from exchange.fhir.resources import parse_json
from exchange.fhir.search import parse


@pytest.mark.parametrize(
    "items",
    [[("name", "a\0b")], [("identifier", "sys|\0")], [("_id", "x\0")], [("na\0me", "x")]],
)
def test_a_search_value_with_nul_is_a_bad_request(items):
    with pytest.raises(BadRequest, match="NUL character"):
        parse("Patient", items)


def test_a_body_with_nul_is_a_bad_request_but_an_escaped_backslash_is_not():
    with pytest.raises(BadRequest, match="NUL character"):
        parse_json(b'{"resourceType": "Patient", "name": [{"family": "a\\u0000b"}]}')
    literal = parse_json(b'{"resourceType": "Patient", "name": [{"family": "a\\\\u0000b"}]}')
    assert literal["name"][0]["family"] == "a\\u0000b"
