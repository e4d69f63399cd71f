"""Bundles as plain dicts (searchset, history), and ``_elements``/``_summary`` subsetting.

Pages can hold hundreds of resources that were validated when written, so
Bundles are assembled directly rather than through the R4B models; the tests
check that what comes out validates as an R4B ``Bundle``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from fhir.resources.R4B import get_fhir_model_class

if TYPE_CHECKING:
    from exchange.fhir.repository import History
    from exchange.fhir.search import SearchQuery, SearchResult

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_ALWAYS = ("resourceType", "id", "meta")
_STATUS = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _instant(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@cache
def _summary_elements(resource_type: str) -> frozenset[str]:
    model = get_fhir_model_class(resource_type)
    return frozenset(model.summary_elements_sequence())


def _subsetted(body: dict[str, Any], keep: set[str] | frozenset[str]) -> dict[str, Any]:
    shaped = {k: v for k, v in body.items() if k in keep or k in _ALWAYS}
    meta = dict(shaped.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if SUBSETTED not in tags:
        tags.append(SUBSETTED)
    shaped["meta"] = {**meta, "tag": tags}
    return shaped


def shape(body: dict[str, Any], query: SearchQuery) -> dict[str, Any]:
    """Apply ``_elements`` / ``_summary=true|data``; a subset is marked SUBSETTED."""
    if query.elements:
        return _subsetted(body, set(query.elements))
    if query.summary == "true":
        return _subsetted(body, _summary_elements(str(body["resourceType"])))
    if query.summary == "data":
        return _subsetted(body, set(body) - {"text"})
    return body


def _link(url: str, params: Sequence[tuple[str, str]]) -> str:
    return f"{url}?{urlencode(params, quote_via=quote, safe=':/,')}" if params else url


def _page_links(
    url: str, params: list[tuple[str, str]], offset: int, count: int, has_next: bool
) -> list[dict[str, str]]:
    def at(position: int) -> str:
        paging = [("_count", str(count))] + ([("_offset", str(position))] if position else [])
        return _link(url, params + paging)

    links = [{"relation": "self", "url": at(offset)}]
    if offset > 0:
        links.append({"relation": "first", "url": at(0)})
        links.append({"relation": "previous", "url": at(max(0, offset - count))})
    if has_next:
        links.append({"relation": "next", "url": at(offset + count)})
    return links


def outcome(messages: Sequence[str], severity: str = "warning") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": severity, "code": "informational", "diagnostics": m} for m in messages
        ],
    }


def searchset(result: SearchResult, fhir_base: str) -> dict[str, Any]:
    """A searchset Bundle: ``total``, paging links on ``fhir_base``, match/include entries."""
    query = result.query
    url = f"{fhir_base}/{query.resource_type}"
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _now()},
        "type": "searchset",
    }
    if result.total is not None:
        bundle["total"] = result.total
    if query.count_only:
        zero = [("_count", "0")] if query.count == 0 else []
        bundle["link"] = [{"relation": "self", "url": _link(url, query.link_params + zero)}]
    else:
        bundle["link"] = _page_links(
            url, query.link_params, query.offset, query.count, result.has_next
        )
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{fhir_base}/{stored.resource_type}/{stored.id}",
            "resource": shape(stored.body, query),
            "search": {"mode": "match"},
        }
        for stored in result.matches
    ]
    entries += [
        {
            "fullUrl": f"{fhir_base}/{stored.resource_type}/{stored.id}",
            "resource": stored.body,
            "search": {"mode": "include"},
        }
        for stored in result.included
    ]
    if query.warnings:
        entries.append({"resource": outcome(query.warnings), "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def history(found: History, fhir_base: str, offset: int, count: int) -> dict[str, Any]:
    """An instance history Bundle, newest version first; deletions have no resource."""
    ref = found.current
    url = f"{fhir_base}/{ref.resource_type}/{ref.id}"
    entries = []
    for version in found.versions:
        entry: dict[str, Any] = {"fullUrl": url}
        if version.body is not None:
            entry["resource"] = version.body
        entry["request"] = {
            "method": version.method,
            "url": ref.resource_type
            if version.method == "POST"
            else f"{ref.resource_type}/{ref.id}",
        }
        entry["response"] = {
            "status": _STATUS.get(version.method, "200 OK"),
            "etag": f'W/"{version.version}"',
            "lastModified": _instant(version.last_updated),
        }
        entries.append(entry)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _now()},
        "type": "history",
        "total": found.total,
        "link": _page_links(
            f"{url}/_history", [], offset, count, offset + len(found.versions) < found.total
        ),
    }
    if entries:
        bundle["entry"] = entries
    return bundle
