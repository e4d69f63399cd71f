"""QIDO-RS matching over the sealed catalog (PS3.18 §10.6, PS3.4 C.2.2.2).

The catalog holds nothing identifying in clear, so matching runs in two
stages. Exact keys (Patient ID, accession number, the UIDs) become equality
tests on their blind indexes, and the study date and modality are tested in
clear, all in SQL. Everything else (names, descriptions, wildcards, numbers)
is matched after unsealing, on one representative instance per result when
the key is constant within it (a study's patient name), or on every
candidate instance when it is not (a series description at study level).
Counts and modalities come from the clear columns, so they need no unsealing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import islice
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Engine, and_, func, or_
from sqlmodel import Session, col, select

from exchange.errors import BadRequest
from exchange.node.catalog import (
    INSTANCE_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    InstanceRow,
    TenantSeal,
)
from exchange.node.store import InstanceStore, InstanceView

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: The largest OFFSET SQL takes (a signed 64-bit integer).
_MAX_OFFSET = 2**63 - 1
#: Rows fetched per SQL round trip while filtering after unsealing.
BATCH = 500


class Level(IntEnum):
    """Query/retrieve levels; a lower value is a higher level."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


@dataclass(frozen=True)
class _Attribute:
    keyword: str
    tag: str
    vr: str
    #: The highest level at which the value is constant.
    level: Level


def _attributes() -> dict[str, _Attribute]:
    table: dict[str, _Attribute] = {}
    for level, keywords in (
        (Level.STUDY, STUDY_KEYWORDS),
        (Level.SERIES, SERIES_KEYWORDS),
        (Level.INSTANCE, INSTANCE_KEYWORDS),
    ):
        for keyword in keywords:
            tag = _tag(keyword)
            table[keyword] = _Attribute(keyword, tag, dictionary_VR(int(tag, 16)), level)
    return table


#: Attributes the catalog holds (sealed), by keyword.
ATTRIBUTES = _attributes()
MODALITIES_IN_STUDY = "ModalitiesInStudy"
#: Attributes computed from the clear columns, returned but never sealed.
COMPUTED = {
    MODALITIES_IN_STUDY: (_tag(MODALITIES_IN_STUDY), "CS"),
    "NumberOfStudyRelatedSeries": (_tag("NumberOfStudyRelatedSeries"), "IS"),
    "NumberOfStudyRelatedInstances": (_tag("NumberOfStudyRelatedInstances"), "IS"),
    "NumberOfSeriesRelatedInstances": (_tag("NumberOfSeriesRelatedInstances"), "IS"),
    "RetrieveURL": (_tag("RetrieveURL"), "UR"),
}

#: PS3.18 Table 6.7.1-2, -2a, -2b, restricted to what the catalog holds.
DEFAULTS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        *STUDY_KEYWORDS,
        MODALITIES_IN_STUDY,
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "RetrieveURL",
    ),
    Level.SERIES: (
        "StudyInstanceUID",
        *SERIES_KEYWORDS,
        "NumberOfSeriesRelatedInstances",
        "RetrieveURL",
    ),
    Level.INSTANCE: (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        *INSTANCE_KEYWORDS,
        "RetrieveURL",
    ),
}

#: Exact-match keys answered from a blind index: keyword -> (blind kind, column).
_BLIND = {
    "StudyInstanceUID": ("study", InstanceRow.study_key),
    "SeriesInstanceUID": ("series", InstanceRow.series_key),
    "SOPInstanceUID": ("sop", InstanceRow.sop_key),
    "PatientID": ("patient", InstanceRow.patient_key),
    "AccessionNumber": ("accession", InstanceRow.accession_key),
}
#: Identifiers compare case-sensitively; other text (names, descriptions) does not.
_CASE_SENSITIVE = {"PatientID", "AccessionNumber", "StudyID", "IssuerOfPatientID"}
_PARAMETERS = {"includefield", "limit", "offset", "fuzzymatching"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _text(value: Any) -> list[str]:
    """The strings a DICOM JSON value matches as (every representation of a name)."""
    if isinstance(value, dict):
        return [str(v) for k, v in value.items() if k in ("Alphabetic", "Ideographic", "Phonetic")]
    return [] if value is None else [str(value)]


def _wildcard(pattern: str, case_sensitive: bool) -> Callable[[str], bool]:
    fold = (lambda text: text) if case_sensitive else str.casefold
    wanted = fold(pattern.strip())
    return lambda value: _glob(wanted, fold(value.strip()))


def _glob(pattern: str, text: str) -> bool:
    """``*`` and ``?`` matching in O(len(pattern) * len(text)), never exponential.

    A regular expression would backtrack catastrophically on patterns such as
    ``*a*a*a*a*b``, and the pattern comes from the query string.
    """
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif star >= 0:
            p, resume = star + 1, resume + 1
            t = resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _time_key(value: str) -> str:
    """HHMMSS.ffffff with missing parts as zeros, so times compare as strings."""
    whole, _, fraction = value.replace(":", "").strip().partition(".")
    return whole.ljust(6, "0") + "." + fraction.ljust(6, "0")


def _range(
    keyword: str, value: str, pattern: re.Pattern[str], key: Callable[[str], str]
) -> Callable[[str], bool]:
    low, dash, high = value.partition("-")
    if not dash:
        low = high = value
    if (not low and not high) or any(part and not pattern.fullmatch(part) for part in (low, high)):
        raise BadRequest(f"{keyword}: {value!r} is not a value or a range (A-B, -B, A-)")
    lo, hi = (key(low) if low else None), (key(high) if high else None)
    return lambda stored: (lo is None or key(stored) >= lo) and (hi is None or key(stored) <= hi)


@dataclass(frozen=True)
class Match:
    """One matching key: its alternatives (a list or repeated key); any one may match."""

    keyword: str
    values: tuple[str, ...]
    #: Tests on one stored value (after unsealing); empty when matched in SQL.
    tests: tuple[Callable[[str], bool], ...] = field(default=(), compare=False)

    @property
    def universal(self) -> bool:
        return not self.values


@dataclass(frozen=True)
class Search:
    """A parsed QIDO-RS query."""

    level: Level
    matches: tuple[Match, ...]
    #: Extra attributes asked for with ``includefield`` (keywords), or every one.
    include: frozenset[str]
    include_all: bool
    limit: int
    offset: int

    def match(self, keyword: str) -> Match | None:
        return next((m for m in self.matches if m.keyword == keyword), None)


@dataclass(frozen=True)
class Scope:
    """Where a search may look: one tenant, optionally one study or series (from the path)."""

    tenant: str
    study_uid: str | None = None
    series_uid: str | None = None


@dataclass(frozen=True)
class Page:
    results: list[dict[str, Any]]
    #: More results match beyond ``limit`` (answered with a ``Warning`` header).
    more: bool


def keyword_of(attribute_id: str) -> str | None:
    """``PatientID`` or ``00100020`` -> ``PatientID``; None if neither."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", attribute_id):
        return keyword_for_tag(int(attribute_id, 16)) or None
    return attribute_id if tag_for_keyword(attribute_id) is not None else None


def _split(keyword: str, values: list[str]) -> tuple[str, ...]:
    """UIDs and code strings may be listed with commas or backslashes (PS3.18 8.3.4.1)."""
    vr = ATTRIBUTES[keyword].vr if keyword in ATTRIBUTES else "CS"
    out: list[str] = []
    for value in values:
        parts = re.split(r"[,\\]", value) if vr in ("UI", "CS") else [value]
        out.extend(p.strip() for p in parts if p.strip() not in ("", "*"))
    return tuple(out)


def _tests(keyword: str, values: tuple[str, ...]) -> tuple[Callable[[str], bool], ...]:
    vr = ATTRIBUTES[keyword].vr if keyword in ATTRIBUTES else "CS"
    tests: list[Callable[[str], bool]] = []
    for value in values:
        if vr == "UI":
            if not _UID.fullmatch(value) or len(value) > 64:
                raise BadRequest(f"{keyword}: {value!r} is not a UID")
            tests.append(value.__eq__)
        elif vr == "DA":
            tests.append(_range(keyword, value, _DATE, lambda v: v.strip()[:8]))
        elif vr == "TM":
            tests.append(_range(keyword, value, _TIME, _time_key))
        elif vr in ("IS", "US", "UL", "SS", "SL", "DS"):
            try:
                number = float(value)
            except ValueError:
                raise BadRequest(f"{keyword}: {value!r} is not a number") from None
            tests.append(_equals(number))
        else:
            tests.append(_wildcard(value, keyword in _CASE_SENSITIVE))
    return tuple(tests)


def _equals(number: float) -> Callable[[str], bool]:
    def test(stored: str) -> bool:
        try:
            return float(stored) == number
        except ValueError:
            return False

    return test


def _integer(name: str, value: str, default: int, low: int) -> int:
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer (got {value!r})") from None
    if number < low:
        raise BadRequest(f"{name} must be at least {low} (got {number})")
    return number


def _includes(values: list[str]) -> tuple[frozenset[str], bool]:
    keywords: set[str] = set()
    every = False
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item.lower() == "all":
                every = True
                continue
            keyword = keyword_of(item)
            if keyword is None:
                raise BadRequest(f"includefield: {item!r} is not a DICOM keyword or tag")
            keywords.add(keyword)  # attributes the catalog does not hold are left out
    return frozenset(keywords), every


def parse(level: Level, params: Sequence[tuple[str, str]]) -> Search:
    """Validate query parameters (keywords or tags); unknown names are refused by name."""
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        if name in _PARAMETERS:
            key = name
        else:
            keyword = keyword_of(name)
            if keyword is None:
                raise BadRequest(f"unknown query parameter {name!r}")
            if keyword not in ATTRIBUTES and keyword not in (MODALITIES_IN_STUDY,):
                raise BadRequest(f"{name!r} is not supported as a matching key on this node")
            key = keyword
        grouped.setdefault(key, []).append(value)
    fuzzy = grouped.pop("fuzzymatching", ["false"])[-1].lower()
    if fuzzy not in ("true", "false"):
        raise BadRequest(f"fuzzymatching must be true or false (got {fuzzy!r})")
    limit = min(_integer("limit", grouped.pop("limit", [""])[-1], DEFAULT_LIMIT, 1), MAX_LIMIT)
    # Beyond a 64-bit SQL integer there is nothing to skip to (and SQLite overflows).
    offset = min(_integer("offset", grouped.pop("offset", [""])[-1], 0, 0), _MAX_OFFSET)
    include, include_all = _includes(grouped.pop("includefield", []))
    matches = []
    for keyword, values in grouped.items():
        split = _split(keyword, values)
        matches.append(Match(keyword, split, _tests(keyword, split)))
    return Search(level, tuple(matches), include, include_all, limit, offset)


def study_uids(params: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The StudyInstanceUID values a query names (for checking a grant before parsing)."""
    values = [v for k, v in params if keyword_of(k) == "StudyInstanceUID"]
    return _split("StudyInstanceUID", values)


# -- execution ----------------------------------------------------------------


def _has_wildcard(values: tuple[str, ...]) -> bool:
    return any("*" in v or "?" in v for v in values)


@dataclass
class _Plan:
    criteria: list[ColumnElement[bool]]
    #: Matches tested after unsealing.
    sealed: list[Match]


def _plan(search: Search, scope: Scope, seal: TenantSeal) -> _Plan:
    criteria: list[ColumnElement[bool]] = [col(InstanceRow.tenant) == scope.tenant]
    if scope.study_uid is not None:
        criteria.append(col(InstanceRow.study_key) == seal.blind("study", scope.study_uid))
    if scope.series_uid is not None:
        criteria.append(col(InstanceRow.series_key) == seal.blind("series", scope.series_uid))
    sealed: list[Match] = []
    for match in search.matches:
        if match.universal:
            continue
        if match.keyword in _BLIND and not _has_wildcard(match.values):
            kind, column = _BLIND[match.keyword]
            criteria.append(col(column).in_([seal.blind(kind, v) for v in match.values]))
        elif match.keyword == "StudyDate":
            criteria.append(or_(*(_date_criterion(v) for v in match.values)))
        elif match.keyword in ("Modality", MODALITIES_IN_STUDY) and not _has_wildcard(match.values):
            criteria.append(col(InstanceRow.modality).in_(match.values))
        elif match.keyword == MODALITIES_IN_STUDY:
            tests = _tests("Modality", match.values)
            sealed.append(Match("Modality", match.values, tests))
        else:
            sealed.append(match)
    return _Plan(criteria, sealed)


def _date_criterion(value: str) -> ColumnElement[bool]:
    low, dash, high = value.partition("-")
    column = col(InstanceRow.study_date)
    if not dash:
        return column == value
    parts = []
    if low:
        parts.append(column >= low)
    if high:
        parts.append(column <= high)
    return and_(*parts)


def _matches(view: InstanceView, sealed: list[Match]) -> bool:
    for match in sealed:
        tag = ATTRIBUTES[match.keyword].tag
        element = view.attributes.get(tag) or {}
        stored = [s for v in element.get("Value") or [] for s in _text(v)]
        if not any(test(s) for test in match.tests for s in stored):
            return False
    return True


class CatalogSearch:
    """Runs one parsed search for one tenant."""

    def __init__(self, engine: Engine, store: InstanceStore, base_url: str) -> None:
        self._engine = engine
        self._store = store
        self._base = f"{base_url.rstrip('/')}/dicomweb"

    def run(self, search: Search, scope: Scope) -> Page:
        plan = _plan(search, scope, self._store.seal(scope.tenant))
        with Session(self._engine) as session:
            found = self._find(session, search.level, plan, search.offset, search.limit + 1)
            page = found[: search.limit]
            counts = self._counts(session, search.level, scope.tenant, [v.row for v in page])
        return Page([self._result(search, v, counts) for v in page], len(found) > search.limit)

    # -- finding -------------------------------------------------------------
    def _find(
        self, session: Session, level: Level, plan: _Plan, offset: int, count: int
    ) -> list[InstanceView]:
        """One unsealed row per matching study/series/instance, in a stable order."""
        if any(ATTRIBUTES[m.keyword].level > level for m in plan.sealed):
            found = self._first_matching_rows(session, level, plan)
            return list(islice(found, offset, offset + count))
        statement = _groups(level, plan.criteria)
        if not plan.sealed:  # SQL decides alone, so it pages too
            ids = list(session.exec(statement.offset(offset).limit(count)))
            return [self._store.view(r) for r in _rows(session, ids)]
        return list(islice(self._filtered(session, statement, plan.sealed), offset, offset + count))

    def _filtered(
        self, session: Session, statement: Any, sealed: list[Match]
    ) -> Iterator[InstanceView]:
        """Representatives of ``statement``'s groups that pass the sealed matches, in batches."""
        offset = 0
        while ids := list(session.exec(statement.offset(offset).limit(BATCH))):
            offset += len(ids)
            for row in _rows(session, ids):
                view = self._store.view(row)
                if _matches(view, sealed):
                    yield view

    def _first_matching_rows(
        self, session: Session, level: Level, plan: _Plan
    ) -> Iterator[InstanceView]:
        """For keys below the result level: scan candidate instances, keep each group's first."""
        seen: set[str] = set()
        last = 0
        while True:
            batch = list(
                session.exec(
                    select(InstanceRow)
                    .where(*plan.criteria, col(InstanceRow.id) > last)
                    .order_by(col(InstanceRow.id))
                    .limit(BATCH)
                )
            )
            if not batch:
                return
            last = batch[-1].id or last
            for row in batch:
                key = _group_key(level, row)
                if key in seen:
                    continue
                view = self._store.view(row)
                if _matches(view, plan.sealed):
                    seen.add(key)
                    yield view

    # -- counting ------------------------------------------------------------
    def _counts(
        self, session: Session, level: Level, tenant: str, rows: list[InstanceRow]
    ) -> dict[str, dict[str, Any]]:
        """Per study: series, instances and modalities; per series: instances."""
        if level is Level.INSTANCE or not rows:
            return {}
        studies = sorted({r.study_key for r in rows})
        statement = (
            select(
                col(InstanceRow.study_key),
                col(InstanceRow.series_key),
                col(InstanceRow.modality),
                func.count(col(InstanceRow.id)),
            )
            .where(col(InstanceRow.tenant) == tenant, col(InstanceRow.study_key).in_(studies))
            .group_by(
                col(InstanceRow.study_key), col(InstanceRow.series_key), col(InstanceRow.modality)
            )
        )
        counts: dict[str, dict[str, Any]] = {}
        for study_key, series_key, modality, number in session.exec(statement):
            study = counts.setdefault(
                study_key, {"series": set(), "instances": 0, "modalities": set()}
            )
            study["series"].add(series_key)
            study["instances"] += number
            if modality:
                study["modalities"].add(modality)
            series = counts.setdefault(f"{study_key}/{series_key}", {"instances": 0})
            series["instances"] += number
        return counts

    # -- answering -----------------------------------------------------------
    def _result(
        self, search: Search, view: InstanceView, counts: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        level = search.level
        row = view.row
        keywords = set(DEFAULTS[level]) | search.include | {m.keyword for m in search.matches}
        if search.include_all:
            keywords |= {k for k, a in ATTRIBUTES.items() if a.level <= level}
        result: dict[str, Any] = {}
        for keyword in keywords:
            attribute = ATTRIBUTES.get(keyword)
            if attribute is not None and attribute.level <= level:
                element = view.attributes.get(attribute.tag)
                result[attribute.tag] = element or {"vr": attribute.vr}
        study = counts.get(row.study_key, {})
        computed: dict[str, Any] = {"RetrieveURL": self._url(level, view)}
        if level is Level.STUDY:
            computed |= {
                MODALITIES_IN_STUDY: sorted(study.get("modalities", ())),
                "NumberOfStudyRelatedSeries": len(study.get("series", ())),
                "NumberOfStudyRelatedInstances": study.get("instances", 0),
            }
        elif level is Level.SERIES:
            series = counts.get(f"{row.study_key}/{row.series_key}", {})
            computed["NumberOfSeriesRelatedInstances"] = series.get("instances", 0)
        for keyword, value in computed.items():
            if keyword in keywords:
                tag, vr = COMPUTED[keyword]
                values = value if isinstance(value, list) else [value]
                result[tag] = {"vr": vr, "Value": values} if values else {"vr": vr}
        return dict(sorted(result.items()))

    def _url(self, level: Level, view: InstanceView) -> str:
        url = f"{self._base}/studies/{view.study_uid}"
        if level >= Level.SERIES:
            url += f"/series/{view.series_uid}"
        if level is Level.INSTANCE:
            url += f"/instances/{view.sop_uid}"
        return url


def _group_key(level: Level, row: InstanceRow) -> str:
    if level is Level.STUDY:
        return row.study_key
    if level is Level.SERIES:
        return f"{row.study_key}/{row.series_key}"
    return row.sop_key


def _groups(level: Level, criteria: list[ColumnElement[bool]]) -> Any:
    """Ids of one row per group, in result order (studies as stored, series by number)."""
    row_id = col(InstanceRow.id)
    if level is Level.INSTANCE:
        return (
            select(row_id)
            .where(*criteria)
            .order_by(col(InstanceRow.series_number), col(InstanceRow.instance_number), row_id)
        )
    if level is Level.STUDY:
        return (
            select(func.min(row_id))
            .where(*criteria)
            .group_by(col(InstanceRow.study_key))
            .order_by(func.min(row_id))
        )
    return (
        select(func.min(row_id))
        .where(*criteria)
        .group_by(col(InstanceRow.study_key), col(InstanceRow.series_key))
        .order_by(func.min(col(InstanceRow.series_number)), func.min(row_id))
    )


def _rows(session: Session, ids: list[int]) -> list[InstanceRow]:
    """The rows with ``ids``, in that order."""
    if not ids:
        return []
    found = {r.id: r for r in session.exec(select(InstanceRow).where(col(InstanceRow.id).in_(ids)))}
    return [found[i] for i in ids if i in found]
