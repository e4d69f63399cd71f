"""FHIR search: parse a request into a query, then run it so that filtering never leaks.

The pipeline is fixed on purpose. The repository yields *candidates* in the
requested order (ids plus the few facts an access decision needs, no
bodies); the caller's ``visible`` hook removes what the caller may not see;
only then are ``total``, the page, ``next``/``previous`` links and
``_include``\\ d resources computed, so none of them can reveal a hidden
resource. Bodies are loaded for the visible page only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from exchange.errors import BadRequest, Issue
from exchange.fhir import searchparams as sp
from exchange.fhir.resources import SERVED

if TYPE_CHECKING:
    from exchange.fhir.repository import Candidate, Repository, Stored

DEFAULT_COUNT = 20
MAX_COUNT = 500
#: Candidates handed to the access hook at a time.
BATCH = 500
#: Most resources one page may pull in through ``_include``/``_revinclude``.
MAX_INCLUDED = 1000

Summary = Literal["count", "data", "true", "false"]
Total = Literal["none", "estimate", "accurate"]

_STRING_MODIFIERS = {"exact", "contains", "missing"}
_TOKEN_MODIFIERS = {"not", "missing"}
_DATE_MODIFIERS = {"missing"}
_REF_MODIFIERS = {"missing", "identifier"}
#: Accepted and harmless: formatting switches, and fhirpy's ``count()`` marker.
_IGNORED = {"_pretty", "_totalMethod"}
_JSON_FORMATS = {"json", "application/json", "application/fhir+json"}
_CONTROLS = {
    "_count",
    "_offset",
    "_format",
    "_sort",
    "_include",
    "_revinclude",
    "_elements",
    "_summary",
    "_total",
    *_IGNORED,
}


@dataclass(frozen=True)
class Criterion:
    """One search parameter occurrence; its values are ORed, criteria are ANDed."""

    param: sp.SearchParam
    modifier: str | None
    values: tuple[Any, ...]
    #: A chained search (``patient.identifier``): the criterion on the targets ...
    chain: Criterion | None = None
    #: ... and the target types it is applied to.
    chain_types: tuple[str, ...] = ()
    #: Reference values given as a bare id are taken to be of this type.
    ref_type: str | None = None


@dataclass(frozen=True)
class SortKey:
    param: sp.SearchParam
    descending: bool


@dataclass(frozen=True)
class Include:
    """``_include=Source:param[:Target]`` (or ``_revinclude`` when ``reverse``)."""

    source_type: str
    param: sp.SearchParam
    target_type: str | None
    reverse: bool = False


@dataclass
class SearchQuery:
    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    includes: list[Include] = field(default_factory=list)
    elements: tuple[str, ...] | None = None
    summary: Summary | None = None
    total: Total | None = None
    #: The accepted parameters in request order (``_count``/``_offset`` excepted): links.
    link_params: list[tuple[str, str]] = field(default_factory=list)
    #: Things the client should know (ignored parameters, a capped ``_count``).
    warnings: list[str] = field(default_factory=list)

    @property
    def count_only(self) -> bool:
        return self.summary == "count" or self.count == 0


def _int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


class _Parser:
    def __init__(self, resource_type: str, lenient: bool, local_base: str | None) -> None:
        self.query = SearchQuery(resource_type)
        self.lenient = lenient
        self.local_base = local_base
        self.issues: list[Issue] = []

    def unknown(self, key: str, message: str) -> None:
        if self.lenient:
            self.query.warnings.append(f"{message}; ignored (Prefer: handling=lenient)")
        else:
            self.issues.append(Issue(message, expression=key, code="not-supported"))

    def invalid(self, key: str, message: str) -> None:
        self.issues.append(Issue(message, expression=key))

    def add(self, key: str, raw: str) -> None:
        query = self.query
        if raw == "" and self._known(key):
            return  # FHIR: a parameter without a value is ignored
        try:
            if key == "_count":
                count = _int(key, raw)
                if count > MAX_COUNT:
                    query.warnings.append(f"_count={count} is more than {MAX_COUNT}; capped")
                query.count = min(count, MAX_COUNT)
                return
            if key == "_offset":
                query.offset = _int(key, raw)
                return
            if key in _IGNORED:
                return
            if key.startswith(("_include:", "_revinclude:")):
                self.unknown(key, f"{key} is not supported (no :iterate)")
                return
            if key == "_format":
                if raw not in _JSON_FORMATS:
                    self.invalid(key, "only JSON (application/fhir+json) is served")
                return
            handler = {
                "_sort": self._sort,
                "_include": self._include,
                "_revinclude": self._revinclude,
                "_elements": self._elements,
                "_summary": self._summary,
                "_total": self._total,
            }.get(key)
            if handler is not None:
                if handler(key, raw):
                    query.link_params.append((key, raw))
                return
            criterion = self._criterion(key, raw)
        except ValueError as exc:
            self.invalid(key, str(exc))
            return
        if criterion is not None:
            query.criteria.append(criterion)
            query.link_params.append((key, raw))

    def _known(self, key: str) -> bool:
        name = key.partition(".")[0].partition(":")[0]
        return name in _CONTROLS or sp.param(self.query.resource_type, name) is not None

    # -- result parameters -----------------------------------------------------
    def _sort(self, key: str, raw: str) -> bool:
        for item in raw.split(","):
            name = item.strip().removeprefix("-")
            spec = sp.param(self.query.resource_type, name)
            if spec is None or not (spec.column or spec.type in sp.SORTABLE_TYPES):
                raise ValueError(f"cannot sort {self.query.resource_type} by {name!r}")
            self.query.sort.append(SortKey(spec, item.strip().startswith("-")))
        return True

    def _include(self, key: str, raw: str, reverse: bool = False) -> bool:
        table = sp.REVINCLUDES if reverse else sp.INCLUDES
        allowed = table.get(self.query.resource_type, ())
        for value in raw.split(","):
            parts = value.split(":")
            if ":".join(parts[:2]) not in allowed or len(parts) > 3:
                self.unknown(key, f"{key}={value} is not supported on {self.query.resource_type}")
                return False
            spec = sp.param(parts[0], parts[1])
            assert spec is not None
            target = parts[2] if len(parts) == 3 else None
            if target is not None and spec.targets and target not in spec.targets:
                raise ValueError(f"{parts[0]}:{parts[1]} cannot point at {target}")
            self.query.includes.append(Include(parts[0], spec, target, reverse))
        return True

    def _revinclude(self, key: str, raw: str) -> bool:
        return self._include(key, raw, reverse=True)

    def _elements(self, key: str, raw: str) -> bool:
        names = tuple(n.strip() for n in raw.split(",") if n.strip())
        self.query.elements = names or None
        return True

    def _summary(self, key: str, raw: str) -> bool:
        if raw not in ("count", "data", "true", "false"):
            raise ValueError("_summary must be count, data, true or false (text is not supported)")
        self.query.summary = raw  # type: ignore[assignment]
        return True

    def _total(self, key: str, raw: str) -> bool:
        if raw not in ("none", "estimate", "accurate"):
            raise ValueError("_total must be none, estimate or accurate")
        self.query.total = raw  # type: ignore[assignment]
        return True

    # -- criteria --------------------------------------------------------------
    def _criterion(self, key: str, raw: str) -> Criterion | None:
        rtype = self.query.resource_type
        head, _, chained = key.partition(".")
        name, _, modifier = head.partition(":")
        spec = sp.param(rtype, name)
        if spec is None:
            self.unknown(key, f"unknown search parameter {name!r} for {rtype}")
            return None
        if chained:
            return self._chain(key, spec, modifier or None, chained, raw)
        return self.criterion(spec, modifier or None, raw)

    def criterion(self, spec: sp.SearchParam, modifier: str | None, raw: str) -> Criterion:
        ref_type = None
        if modifier is not None:
            allowed = {
                "token": _TOKEN_MODIFIERS,
                "string": _STRING_MODIFIERS,
                "date": _DATE_MODIFIERS,
                "reference": _REF_MODIFIERS,
            }[spec.type]
            if spec.column is not None:
                allowed = set()
            if spec.type == "reference" and modifier[:1].isupper():
                if spec.targets and modifier not in spec.targets:
                    raise ValueError(f"{spec.name} cannot point at {modifier}")
                ref_type, modifier = modifier, None
            elif modifier not in allowed:
                raise ValueError(f"modifier :{modifier} is not supported on {spec.name}")
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise ValueError(f"{spec.name}:missing must be true or false")
            return Criterion(spec, modifier, (raw == "true",))
        values = tuple(self._value(spec, modifier, ref_type, v) for v in sp.split_values(raw))
        return Criterion(spec, modifier, values, ref_type=ref_type)

    def _value(
        self, spec: sp.SearchParam, modifier: str | None, ref_type: str | None, raw: str
    ) -> Any:
        if spec.column == "id":
            if not raw:
                raise ValueError("_id needs a value")
            return raw
        if spec.type == "token" or modifier == "identifier":
            return sp.parse_token(raw)
        if spec.type == "string":
            if not raw.strip():
                raise ValueError(f"{spec.name} needs a value")
            return raw
        if spec.type == "date":
            return sp.parse_date_value(raw)
        ref = sp.parse_reference(raw, self.local_base)
        if ref.type is None and "/" not in ref.id:
            only = ref_type or (spec.targets[0] if len(spec.targets) == 1 else None)
            return sp.RefValue(only, ref.id)
        if ref_type is not None and ref.type not in (None, ref_type):
            raise ValueError(f"{raw!r} is not a {ref_type} reference")
        return ref

    def _chain(
        self, key: str, spec: sp.SearchParam, modifier: str | None, chained: str, raw: str
    ) -> Criterion | None:
        if spec.type != "reference" or "." in chained:
            raise ValueError(f"{key}: only one level of chaining on a reference is supported")
        if modifier is not None and not modifier[:1].isupper():
            raise ValueError(f"{key}: modifier :{modifier} cannot be chained")
        if modifier is not None and spec.targets and modifier not in spec.targets:
            raise ValueError(f"{key}: {spec.name} cannot point at {modifier}")
        candidates = (modifier,) if modifier else (spec.targets or tuple(SERVED))
        name, _, inner_modifier = chained.partition(":")
        types = tuple(t for t in candidates if sp.param(t, name) is not None)
        if not types:
            self.unknown(key, f"{key}: no target of {spec.name} can be searched by {name!r}")
            return None
        inner_specs = {sp.param(t, name) for t in types}
        inner = self.criterion(next(iter(s for s in inner_specs if s)), inner_modifier or None, raw)
        if len({(s.type if s else None) for s in inner_specs}) != 1:
            raise ValueError(f"{key}: {name!r} means different things on {', '.join(types)}")
        return Criterion(spec, None, (), chain=inner, chain_types=types)


def parse(
    resource_type: str,
    items: Iterable[tuple[str, str]],
    *,
    lenient: bool = False,
    local_base: str | None = None,
) -> SearchQuery:
    """A ``SearchQuery`` from request parameters; 400 listing every problem otherwise."""
    parser = _Parser(resource_type, lenient, local_base)
    for key, raw in items:
        if "\0" in key or "\0" in raw:  # no FHIR value has one; PostgreSQL text refuses it
            raise BadRequest(f"invalid search: {key.replace(chr(0), '')!r} holds a NUL character")
        parser.add(key, raw)
    if parser.issues:
        first = parser.issues[0].diagnostics
        raise BadRequest(f"invalid search: {first}", issues=parser.issues)
    return parser.query


# -- running a search --------------------------------------------------------------

Visible = Callable[[Sequence["Candidate"]], Sequence["Candidate"]]


@dataclass
class SearchResult:
    query: SearchQuery
    total: int | None
    matches: list[Stored]
    included: list[Stored]
    has_next: bool
    elapsed_ms: float = 0.0


def execute(
    repository: Repository,
    query: SearchQuery,
    *,
    visible: Visible,
    may_read_type: Callable[[str], bool],
) -> SearchResult:
    """Run ``query``; everything counted or returned has passed ``visible`` first."""
    started = time.perf_counter()
    need_total = query.count_only or query.total != "none"
    stop_after = query.offset + query.count
    page: list[Candidate] = []
    seen = 0
    has_next = False
    complete = True
    with closing(repository.candidate_batches(query, BATCH)) as batches:
        for batch in batches:
            for candidate in visible(batch):
                if query.count_only:
                    pass
                elif seen >= stop_after:
                    has_next = True
                elif seen >= query.offset:
                    page.append(candidate)
                seen += 1
            if has_next and not need_total:
                complete = False
                break
    matches: list[Stored] = []
    included: list[Stored] = []
    if page:
        loaded = repository.load([c.pk for c in page])
        matches = [loaded[c.pk] for c in page if c.pk in loaded]
        if query.includes:
            included = _included(repository, query, matches, visible, may_read_type)
    return SearchResult(
        query=query,
        total=seen if complete else None,
        matches=matches,
        included=included,
        has_next=has_next,
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


def _included(
    repository: Repository,
    query: SearchQuery,
    matches: list[Stored],
    visible: Visible,
    may_read_type: Callable[[str], bool],
) -> list[Stored]:
    """Included resources pass the same type-level check and hook as matches."""
    found = repository.include_candidates(matches, query.includes, MAX_INCLUDED)
    already = {(m.resource_type, m.id) for m in matches}
    allowed_types = {t for t in {c.resource_type for c in found} if may_read_type(t)}
    wanted = [
        c
        for c in found
        if c.resource_type in allowed_types and (c.resource_type, c.id) not in already
    ]
    shown = visible(wanted) if wanted else []
    loaded = repository.load([c.pk for c in shown])
    return [loaded[c.pk] for c in shown if c.pk in loaded]
