"""Search parameters: what each served type can be searched by, and how values are read.

One registry drives three things so they cannot drift apart: the index rows
written beside every resource version (``extract_index``), the parsing of
search values (``parse_date``, ``parse_token``, …) and the
CapabilityStatement. Values are read from the resource JSON by simple dotted
paths; the FHIR datatype found there (Identifier, CodeableConcept, HumanName,
Period, Reference, …) decides how it is indexed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

ParamType = Literal["token", "string", "date", "reference"]

#: Stored string values are cut here (an index, not a copy of the resource).
STRING_INDEX_LENGTH = 200

#: Date ranges are [start, end) in milliseconds since the Unix epoch, UTC.
MIN_MS = -62135596800000  # 0001-01-01T00:00:00Z
MAX_MS = 253402300800000  # 10000-01-01T00:00:00Z

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    #: Dotted paths from the resource root; lists along the way are flattened.
    paths: tuple[str, ...] = ()
    #: Reference parameters: the types a target may have (empty: any type).
    targets: tuple[str, ...] = ()
    #: Token parameters on a plain ``code``: the system the code belongs to.
    system: str | None = None
    #: ``id`` or ``updated``: searched on the resource row itself, not an index table.
    column: str | None = None
    #: String parameters: sort on this parameter's values instead (Patient name by family).
    sort_by: str | None = None
    documentation: str = ""


def _p(name: str, type_: ParamType, *paths: str, doc: str, **kw: Any) -> SearchParam:
    return SearchParam(name, type_, paths, documentation=doc, **kw)


_COMMON = (
    SearchParam("_id", "token", column="id", documentation="The logical id of the resource"),
    SearchParam(
        "_lastUpdated", "date", column="updated", documentation="When the resource last changed"
    ),
    SearchParam(
        "_security",
        "token",
        ("meta.security",),
        documentation="Security labels (confidentiality, sensitivity) on the resource",
    ),
)

_AGENT_TYPES = ("Practitioner", "PractitionerRole", "Organization", "Device", "Patient")

#: resource type -> parameter name -> definition.
PARAMS: dict[str, dict[str, SearchParam]] = {
    rtype: {p.name: p for p in (*_COMMON, *params)}
    for rtype, params in {
        "ImagingStudy": (
            _p("identifier", "token", "identifier", doc="Study identifier (urn:dicom:uid)"),
            _p("patient", "reference", "subject", targets=("Patient",), doc="The patient"),
            _p(
                "subject",
                "reference",
                "subject",
                targets=("Patient", "Group", "Device"),
                doc="Who the study is about",
            ),
            _p("started", "date", "started", doc="When the study was started"),
            _p(
                "modality",
                "token",
                "modality",
                "series.modality",
                doc="Modality of the study or of a series (DICOM DCM codes)",
            ),
            _p(
                "status",
                "token",
                "status",
                system="http://hl7.org/fhir/imagingstudy-status",
                doc="The status of the study",
            ),
            _p(
                "endpoint",
                "reference",
                "endpoint",
                "series.endpoint",
                targets=("Endpoint",),
                doc="Where the study (or a series) can be retrieved",
            ),
        ),
        "Patient": (
            _p("identifier", "token", "identifier", doc="A patient identifier"),
            _p(
                "name",
                "string",
                "name",
                sort_by="family",
                doc="Any part of a name (family, given, prefix, suffix, text)",
            ),
            _p("family", "string", "name.family", doc="Family name"),
            _p("given", "string", "name.given", doc="Given names"),
            _p("birthdate", "date", "birthDate", doc="Date of birth"),
            _p(
                "gender",
                "token",
                "gender",
                system="http://hl7.org/fhir/administrative-gender",
                doc="Administrative gender",
            ),
            _p(
                "link",
                "reference",
                "link.other",
                targets=("Patient", "RelatedPerson"),
                doc="Another patient record for the same person",
            ),
        ),
        "Consent": (
            _p("patient", "reference", "patient", targets=("Patient",), doc="Whose consent"),
            _p(
                "status",
                "token",
                "status",
                system="http://hl7.org/fhir/consent-state-codes",
                doc="draft | proposed | active | rejected | inactive | entered-in-error",
            ),
            _p("category", "token", "category", doc="Classification of the consent"),
            _p("date", "date", "dateTime", doc="When the consent was agreed"),
            _p(
                "actor",
                "reference",
                "provision.actor.reference",
                "provision.provision.actor.reference",
                targets=(*_AGENT_TYPES, "RelatedPerson", "Group", "CareTeam"),
                doc="Who the consent applies to",
            ),
            _p(
                "organization",
                "reference",
                "organization",
                targets=("Organization",),
                doc="Custodian of the consent",
            ),
        ),
        "Organization": (
            _p("identifier", "token", "identifier", doc="An organisation identifier"),
            _p("name", "string", "name", "alias", doc="Name or alias"),
        ),
        "Endpoint": (
            _p("identifier", "token", "identifier", doc="An endpoint identifier"),
            _p("name", "string", "name", doc="Name of the endpoint"),
            _p(
                "organization",
                "reference",
                "managingOrganization",
                targets=("Organization",),
                doc="The organisation that manages the endpoint",
            ),
        ),
        "AuditEvent": (
            _p(
                "patient",
                "reference",
                "entity.what",
                "agent.who",
                targets=("Patient",),
                doc="The patient the event concerns",
            ),
            _p("entity", "reference", "entity.what", doc="What was used (any resource)"),
            _p(
                "agent",
                "reference",
                "agent.who",
                targets=(*_AGENT_TYPES, "RelatedPerson"),
                doc="Who took part",
            ),
            _p("date", "date", "recorded", doc="When the event was recorded"),
            _p("type", "token", "type", doc="Type of event"),
            _p("subtype", "token", "subtype", doc="More specific type of event"),
            _p(
                "outcome",
                "token",
                "outcome",
                system="http://hl7.org/fhir/audit-event-outcome",
                doc="0 success, 4 minor, 8 serious, 12 major failure",
            ),
            _p(
                "action",
                "token",
                "action",
                system="http://hl7.org/fhir/audit-event-action",
                doc="C | R | U | D | E",
            ),
        ),
        "Provenance": (
            _p("target", "reference", "target", doc="The resource(s) the provenance is about"),
            _p(
                "agent",
                "reference",
                "agent.who",
                targets=(*_AGENT_TYPES, "RelatedPerson"),
                doc="Who took part",
            ),
            _p("entity", "reference", "entity.what", doc="What was used"),
            _p("recorded", "date", "recorded", doc="When the activity was recorded"),
        ),
    }.items()
}

#: ``_include`` values per type: "Type:param" -> the reference parameter followed.
INCLUDES: dict[str, tuple[str, ...]] = {
    "ImagingStudy": ("ImagingStudy:endpoint", "ImagingStudy:patient", "ImagingStudy:subject"),
    "Endpoint": ("Endpoint:organization",),
    "Consent": ("Consent:patient",),
}

#: ``_revinclude`` values per type (the resources that point at a match).
REVINCLUDES: dict[str, tuple[str, ...]] = {
    "Patient": ("ImagingStudy:patient", "Consent:patient"),
    "Endpoint": ("ImagingStudy:endpoint",),
}

#: What an access decision may need about a resource (parameters whose values are kept
#: with the current version, so deciding visibility never needs the whole body).
ACCESS_FACTS: dict[str, tuple[str, ...]] = {
    "ImagingStudy": (
        "patient",
        "subject",
        "subject:identifier",
        "identifier",
        "endpoint",
        "started",
        "_security",
    ),
    "Patient": ("identifier", "link"),
    "Consent": ("patient", "actor", "organization"),
    "Organization": ("identifier",),
    "Endpoint": ("organization",),
    "AuditEvent": ("patient", "agent", "entity"),
}

SORTABLE_TYPES: tuple[ParamType, ...] = ("date", "string")


def param(resource_type: str, name: str) -> SearchParam | None:
    return PARAMS.get(resource_type, {}).get(name)


# -- values ------------------------------------------------------------------


def split_values(raw: str) -> list[str]:
    """Split a parameter value on unescaped commas (OR); ``\\,`` stays a comma."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(raw)
    for char in chars:
        if char == "\\":
            nxt = next(chars, "")
            current.append(char + nxt if nxt in "|$" else nxt)
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def normalise(text: str) -> str:
    """Lower-case, accents removed, whitespace collapsed: how string searches compare."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join(folded.split())[:STRING_INDEX_LENGTH]


@dataclass(frozen=True)
class Token:
    """``system|code``; ``system`` None matches any system, "" matches no system."""

    system: str | None
    code: str | None


def parse_token(text: str) -> Token:
    """``code``, ``system|code``, ``|code`` (no system) or ``system|`` (any code)."""
    match = re.match(r"^((?:[^|\\]|\\.)*)\|(.*)$", text)
    if match is None:
        if not text:
            raise ValueError("an empty token")
        return Token(None, _unescape(text))
    system, code = _unescape(match.group(1)), _unescape(match.group(2))
    if not system and not code:
        raise ValueError("a token needs a system or a code")
    return Token(system, code or None)


_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def now_ms() -> int:
    return to_ms(datetime.now(UTC))


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def parse_date(text: str) -> tuple[int, int]:
    """A FHIR date, dateTime or instant as the range it denotes: [start, end) in ms.

    The precision written is the width of the range: ``2026`` is the whole
    year, ``2026-03-10T12:00`` one minute. A time without a zone is UTC.
    """
    match = _DATE.match(text.strip().replace(" ", "+"))
    if match is None:
        raise ValueError(f"{text!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DDThh:mm:ssZ…)")
    g = match.groupdict()
    tz: timezone = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
        tz = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
    try:
        year = int(g["y"])
        start = datetime(
            year,
            int(g["m"] or 1),
            int(g["d"] or 1),
            int(g["H"] or 0),
            int(g["M"] or 0),
            int(g["S"] or 0),
            int((g["f"] or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date: {exc}") from None
    # Fixed widths are added in ms: a datetime past 9999-12-31 cannot exist (OverflowError).
    start_ms = to_ms(start)
    if g["f"]:
        end_ms = start_ms + (1 if len(g["f"]) >= 3 else 10 ** (3 - len(g["f"])))
    elif g["S"]:
        end_ms = start_ms + 1000
    elif g["M"]:
        end_ms = start_ms + 60_000
    elif g["d"]:
        end_ms = start_ms + 86_400_000
    elif g["m"]:
        month = start.month % 12 + 1
        if year == 9999 and month == 1:
            end_ms = MAX_MS
        else:
            end_ms = to_ms(start.replace(year=year + (start.month == 12), month=month))
    else:
        end_ms = to_ms(start.replace(year=year + 1)) if year < 9999 else MAX_MS
    return start_ms, end_ms


DatePrefix = Literal["eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap"]
DATE_PREFIXES: tuple[DatePrefix, ...] = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")


@dataclass(frozen=True)
class DateValue:
    prefix: DatePrefix
    start: int
    end: int


def parse_date_value(text: str) -> DateValue:
    """``[prefix]date``: ``ge2026-03-01``, ``2026``, ``ap2026-03-10T12:00``."""
    prefix = text[:2]
    if prefix in DATE_PREFIXES:
        text = text[2:]
    else:
        prefix = "eq"
    start, end = parse_date(text)
    return DateValue(prefix, start, end)  # type: ignore[arg-type]


def approximate(value: DateValue, now_ms: int) -> tuple[int, int]:
    """``ap``: the range widened by 10% of its distance from now (at least a day)."""
    slack = max(abs(now_ms - value.start) // 10, 86_400_000)
    return value.start - slack, value.end + slack


@dataclass(frozen=True)
class RefValue:
    """A reference search value: ``type`` None means any type with that id."""

    type: str | None
    id: str


_REF = re.compile(r"^(?:(?P<base>.*)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})$")


def parse_reference(text: str, local_base: str | None) -> RefValue:
    """``123``, ``Patient/123`` or an absolute URL (ours made relative, others kept whole)."""
    text = text.strip()
    if not text:
        raise ValueError("an empty reference")
    if "/" not in text:
        return RefValue(None, text)
    text = re.sub(r"/_history/[^/]+$", "", text)
    if local_base and text.startswith(local_base.rstrip("/") + "/"):
        text = text[len(local_base.rstrip("/")) + 1 :]
    match = _REF.match(text)
    if match is None:
        return RefValue(None, text)
    if match.group("base"):
        return RefValue(match.group("type"), text)
    return RefValue(match.group("type"), match.group("id"))


# -- index extraction ----------------------------------------------------------


@dataclass
class IndexEntries:
    """The rows a resource version contributes to the search-index tables."""

    tokens: set[tuple[str, str, str]] = field(default_factory=set)  # (param, system, code)
    strings: set[tuple[str, str, str]] = field(default_factory=set)  # (param, norm, exact)
    dates: set[tuple[str, int, int]] = field(default_factory=set)  # (param, start, end)
    refs: set[tuple[str, str, str]] = field(default_factory=set)  # (param, type, id)


def _walk(node: Any, path: Sequence[str]) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
        return
    if not path:
        if node is not None:
            yield node
        return
    if isinstance(node, dict):
        yield from _walk(node.get(path[0]), path[1:])


def values_at(resource: Mapping[str, Any], path: str) -> Iterator[Any]:
    return _walk(resource, path.split("."))


def _tokens(value: Any, implicit_system: str | None) -> Iterator[tuple[str, str]]:
    if isinstance(value, bool):
        yield "", "true" if value else "false"
    elif isinstance(value, str):
        yield implicit_system or "", value
    elif isinstance(value, dict):
        if "coding" in value or "text" in value:  # CodeableConcept
            for coding in value.get("coding") or []:
                yield from _tokens(coding, None)
        elif "value" in value and isinstance(value["value"], str):  # Identifier
            yield str(value.get("system") or ""), value["value"]
        elif isinstance(value.get("code"), str):  # Coding
            yield str(value.get("system") or ""), value["code"]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName (and anything with text)
        for key in ("text", "family"):
            if isinstance(value.get(key), str):
                yield value[key]
        for key in ("given", "prefix", "suffix"):
            for part in value.get(key) or []:
                if isinstance(part, str):
                    yield part


def _dates(value: Any) -> Iterator[tuple[int, int]]:
    try:
        if isinstance(value, str):
            yield parse_date(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            start = parse_date(value["start"])[0] if value.get("start") else MIN_MS
            end = parse_date(value["end"])[1] if value.get("end") else MAX_MS
            yield start, end
    except ValueError:
        return  # unparseable dates are left out of the index, never refused here


def extract_index(
    resource_type: str, resource: Mapping[str, Any], local_base: str | None = None
) -> IndexEntries:
    """Every index row ``resource`` contributes, deduplicated."""
    entries = IndexEntries()
    for spec in PARAMS.get(resource_type, {}).values():
        for path in spec.paths:
            for value in values_at(resource, path):
                _index_value(entries, spec, value, local_base)
    return entries


def _index_value(entries: IndexEntries, spec: SearchParam, value: Any, base: str | None) -> None:
    if spec.type == "token":
        entries.tokens.update((spec.name, s, c) for s, c in _tokens(value, spec.system))
    elif spec.type == "string":
        entries.strings.update(
            (spec.name, normalise(text), text[:STRING_INDEX_LENGTH])
            for text in _strings(value)
            if text.strip()
        )
    elif spec.type == "date":
        entries.dates.update((spec.name, start, end) for start, end in _dates(value))
    elif isinstance(value, dict):  # reference
        logical = value.get("identifier")
        if isinstance(logical, dict):  # a logical reference: searchable with :identifier
            entries.tokens.update(
                (f"{spec.name}:identifier", s, c) for s, c in _tokens(logical, None)
            )
        target = value.get("reference")
        if isinstance(target, str) and not target.startswith("#"):
            try:
                ref = parse_reference(target, base)
            except ValueError:
                return
            if ref.type is None or (spec.targets and ref.type not in spec.targets):
                return
            entries.refs.add((spec.name, ref.type, ref.id))


def access_facts(resource_type: str, entries: IndexEntries) -> dict[str, list[str]]:
    """The values an access decision may look at: references as ``Type/id``, tokens as
    ``system|code``, dates as the UTC day they start (``YYYY-MM-DD``)."""
    wanted = ACCESS_FACTS.get(resource_type, ())
    facts: dict[str, set[str]] = {}
    for name, start, _end in entries.dates:
        if name in wanted and MIN_MS < start < MAX_MS:
            facts.setdefault(name, set()).add(from_ms(start).date().isoformat())
    for name, type_, rid in entries.refs:
        if name in wanted:
            facts.setdefault(name, set()).add(f"{type_}/{rid}")
    for name, system, code in entries.tokens:
        if name in wanted:
            facts.setdefault(name, set()).add(f"{system}|{code}")
    return {name: sorted(values) for name, values in sorted(facts.items())}
