"""What a resource must be beyond parsing: fhir.resources' gaps and our profiles.

``fhir.resources.R4B`` checks structure and datatypes, but no terminology, no
invariants, and it stops at the first failing layer (a missing ``recorded`` is
only noticed once the other fields parse). Every check here reports *every*
problem as an :class:`~exchange.errors.Issue` located by an indexed FHIRPath
expression (``ImagingStudy.series[1].modality.system``), so a site fixes a
resource in one round trip.

The StructureDefinitions in ``fhir_profiles/`` are the one statement of our
rules, for us and for any other FHIR validator. This module enforces the part of
ElementDefinition they use: ``min``/``max``, ``fixed[x]``/``pattern[x]``,
required bindings to the ValueSets beside them, Reference target types, and
invariants by ``key``, each implemented below in Python (we run no FHIRPath
engine; the SD's ``expression`` is for other validators). Loading refuses a
profile that asks for anything else, so a rule is never written down and
silently not enforced.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource as R4BResource
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from exchange.errors import ConfigurationError, Issue
from exchange.uids import is_uid

PROFILES_DIR = Path(__file__).resolve().parent.parent.parent / "fhir_profiles"

DICOM_UID_SYSTEM = "urn:dicom:uid"
WADO_RS = ("http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "dicom-wado-rs")

#: Elements that contain themselves in R4 (``contentReference``): rules for
#: ``Consent.provision.*`` hold for nested provisions at any depth too.
_NESTED: dict[tuple[str, tuple[str, ...]], str] = {("Consent", ("provision",)): "provision"}

#: A DICOM UID as nodes accept it (exchange.dicom.part10): digits and dots, at
#: most 64 characters. Leading zeros are tolerated: legacy equipment writes them.
_REFERENCE = re.compile(
    r"(?:https?://\S+/)?(?P<type>[A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)
_FHIR_DATETIME = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(T.+)?)?)?")


def _issue(expression: str, text: str, code: str, severity: str = "error") -> Issue:
    return Issue(f"{expression}: {text}", expression, code, severity)


def _absent(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


# -- parsing with fhir.resources ----------------------------------------------------------------


def parse(resource_type: str, data: dict[str, Any]) -> tuple[FHIRAbstractModel | None, list[Issue]]:
    """``data`` as an R4B model, or ``None`` with every problem R4B (and its metadata) finds.

    Beyond R4B's own errors this reports the required code bindings it declares
    but does not check (``Patient.gender``, ``ImagingStudy.status``, ...).
    """
    issues = _contained_issues(resource_type, data)
    if issues:
        return None, issues
    try:
        model = get_fhir_model_class(resource_type).model_validate(data)
    except ValidationError as exc:
        return None, _unique(_pydantic_issue(resource_type, error) for error in exc.errors())
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # fhir_core raises these on some malformed input; still the client's fault, never a 500.
        text = f"is not a valid FHIR R4 {resource_type} ({type(exc).__name__})"
        return None, [_issue(resource_type, text, "structure")]
    return model, list(_code_issues(model, resource_type))


def _contained_issues(expression: str, data: dict[str, Any]) -> list[Issue]:
    """fhir_core crashes on a contained resource of unknown type, so check those first."""
    contained = data.get("contained")
    if not isinstance(contained, list):
        return []
    issues = []
    for index, item in enumerate(contained):
        where = f"{expression}.contained[{index}]"
        kind = item.get("resourceType") if isinstance(item, dict) else None
        if not _is_resource_type(kind):
            text = f"{kind!r} is not a FHIR R4 resource type"
            issues.append(_issue(f"{where}.resourceType", text, "structure"))
        elif isinstance(item, dict):
            issues += _contained_issues(where, item)
    return issues


def _is_resource_type(name: Any) -> bool:
    if not isinstance(name, str) or name in ("Resource", "DomainResource"):
        return False
    try:
        return issubclass(get_fhir_model_class(name), R4BResource)
    except (KeyError, ValueError):
        return False


def _pydantic_issue(resource_type: str, error: ErrorDetails) -> Issue:
    expression = resource_type + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part.removeprefix('_')}"
        for part in error["loc"]
        if isinstance(part, int) or part.lstrip("_").isidentifier()
    )
    kind, given = error["type"], error.get("input")
    if kind == "missing" or kind.endswith(".missing"):
        return _issue(expression, "is required", "required")
    if kind == "extra_forbidden":
        return _issue(expression, f"is not an element of FHIR R4 {resource_type}", "structure")
    if kind in ("json_invalid", "model_type", "model_attributes_type", "dict_type"):
        return _issue(expression, "must be a JSON object", "structure")
    text = error["msg"].removeprefix("Value error, ")
    if match := re.match(r"(\w+) value string does not match spec regex", text):
        datatype = match[1][0].lower() + match[1][1:]
        return _issue(expression, f"{given!r} is not a valid FHIR {datatype}", "value")
    if isinstance(given, str | int | float | bool) and repr(given) not in text:
        text += f" (got {given!r:.60})"
    return _issue(expression, text, "structure" if kind.endswith("_type") else "value")


def _code_issues(model: FHIRAbstractModel, expression: str) -> Iterator[Issue]:
    """Codes outside the required bindings that R4B lists as ``enum_values`` (and ignores)."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        where = f"{expression}.{field.alias or name}"
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        allowed = extra.get("enum_values")
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            at = f"{where}[{index}]" if isinstance(value, list) else where
            if isinstance(allowed, list) and isinstance(item, str) and item not in allowed:
                expected = " | ".join(str(code) for code in allowed)
                yield _issue(at, f"{item!r} is not one of {expected}", "code-invalid")
            elif isinstance(item, FHIRAbstractModel):
                yield from _code_issues(item, at)


def _unique(issues: Iterable[Issue]) -> list[Issue]:
    return list(dict.fromkeys(issues))


def merge(first: list[Issue], then: list[Issue]) -> list[Issue]:
    """``first``, then what ``then`` says about places ``first`` has not mentioned."""
    seen = {issue.expression for issue in first}
    return _unique(first + [issue for issue in then if issue.expression not in seen])


# -- loading the profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSet:
    """A ValueSet's ``compose.include`` as ``system -> codes`` (no filters, no imports)."""

    url: str
    title: str
    codes: dict[str, tuple[str, ...]]  # in the ValueSet's order, for messages

    def describe(self) -> str:
        every = [code for codes in self.codes.values() for code in codes]
        listed = f": {' | '.join(every)}" if len(every) <= 12 else ""
        return f"{self.title} ({self.url}){listed}"


@dataclass(frozen=True)
class _Constraint:
    key: str
    severity: str


@dataclass(frozen=True)
class _Element:
    """One differential element, reduced to what we enforce."""

    path: tuple[str, ...]  # below the resource type: ("series", "uid")
    min: int = 0
    max: int | None = None
    fixed: Any = None
    pattern: Any = None
    value_set: ValueSet | None = None
    targets: frozenset[str] = frozenset()
    constraints: tuple[_Constraint, ...] = ()


@dataclass(frozen=True)
class Profile:
    url: str
    resource_type: str
    elements: tuple[_Element, ...]


@dataclass(frozen=True)
class Profiles:
    by_type: dict[str, Profile]
    value_sets: dict[str, ValueSet]


#: ElementDefinition keys that document but do not constrain.
_DESCRIPTIVE = {
    "id", "path", "short", "definition", "comment", "requirements", "alias", "label",
    "mustSupport", "isSummary", "mapping", "example",
}  # fmt: skip


def load(directory: Path = PROFILES_DIR) -> Profiles:
    """Read ``StructureDefinition-*.json`` and ``ValueSet-*.json`` from ``directory``."""
    return _load(directory.resolve())


@functools.cache
def _load(directory: Path) -> Profiles:
    if not directory.is_dir():
        raise ConfigurationError(f"FHIR profiles directory {directory} does not exist")
    value_sets = {}
    for path in sorted(directory.glob("ValueSet-*.json")):
        value_set = _value_set(path.name, _read(path))
        value_sets[value_set.url] = value_set
    by_type: dict[str, Profile] = {}
    for path in sorted(directory.glob("StructureDefinition-*.json")):
        raw = _read(path)
        url, resource_type = raw["url"], raw["type"]
        if resource_type in by_type:
            raise ConfigurationError(f"{path.name}: a second profile for {resource_type}")
        elements = tuple(
            _element(url, element, value_sets) for element in raw["differential"]["element"]
        )
        by_type[resource_type] = Profile(url, resource_type, elements)
    return Profiles(by_type, value_sets)


def _value_set(name: str, raw: dict[str, Any]) -> ValueSet:
    """Only enumerated concepts: a filter or an imported set would be silently ignored."""
    compose = raw.get("compose", {})
    includes = compose.get("include", [])
    if set(compose) - {"include"} or any(set(i) - {"system", "concept"} for i in includes):
        raise ConfigurationError(f"{name}: only compose.include with system and concept is read")
    codes: dict[str, tuple[str, ...]] = {}
    for include in includes:
        codes[include["system"]] = codes.get(include["system"], ()) + tuple(
            concept["code"] for concept in include.get("concept", [])
        )
    return ValueSet(raw["url"], raw.get("title") or raw["name"], codes)


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"FHIR profile file {path} does not load: {exc}") from None
    return data


def _element(url: str, raw: dict[str, Any], value_sets: dict[str, ValueSet]) -> _Element:
    where = f"{url}: {raw['id']}"

    def refuse(what: str) -> ConfigurationError:
        return ConfigurationError(f"{where}: {what} is not enforced by exchange.fhir.profiles")

    fixed = [value for key, value in raw.items() if key.startswith("fixed")]
    pattern = [value for key, value in raw.items() if key.startswith("pattern")]
    unknown = set(raw) - _DESCRIPTIVE - {"min", "max", "binding", "type", "constraint"}
    unknown -= {key for key in raw if key.startswith(("fixed", "pattern"))}
    if unknown:
        raise refuse(", ".join(sorted(unknown)))
    value_set = None
    binding = raw.get("binding")
    if binding and binding.get("strength") == "required":
        value_set = value_sets.get(binding["valueSet"].split("|")[0])
        if value_set is None:
            missing = binding["valueSet"]
            raise ConfigurationError(f"{where}: ValueSet {missing} is not in the profiles")
    targets = set()
    for kind in raw.get("type", []):
        if kind.get("code") != "Reference" or set(kind) - {"code", "targetProfile"}:
            raise refuse(f"type {kind}")
        targets |= {profile.rsplit("/", 1)[-1] for profile in kind.get("targetProfile", [])}
    constraints = []
    for constraint in raw.get("constraint", []):
        if constraint["key"] not in _INVARIANTS:
            raise refuse(f"invariant {constraint['key']}")
        constraints.append(_Constraint(constraint["key"], constraint["severity"]))
    maximum = raw.get("max", "*")
    return _Element(
        path=tuple(raw["path"].split(".")[1:]),
        min=int(raw.get("min", 0)),
        max=None if maximum == "*" else int(maximum),
        fixed=fixed[0] if fixed else None,
        pattern=pattern[0] if pattern else None,
        value_set=value_set,
        targets=frozenset(targets),
        constraints=tuple(constraints),
    )


# -- applying a profile -------------------------------------------------------------------------

_Located = tuple[Any, str]  # a value and its FHIRPath expression


def validate_profile(resource_type: str, data: dict[str, Any]) -> list[Issue]:
    """Every way ``data`` breaks our profile for ``resource_type`` (none if it has no profile).

    Works on the raw JSON, so it also reports on input that R4B refused.
    """
    profile = load().by_type.get(resource_type)
    if profile is None:
        return []
    issues: list[Issue] = []
    for element in profile.elements:
        if element.path and (element.min or element.max is not None):
            parents = _instances(resource_type, data, element.path[:-1])
            issues += _cardinality(element, parents)
        for value, expression in _instances(resource_type, data, element.path):
            issues += _check(element, value, expression)
    return _unique(issues)


def _instances(resource_type: str, data: Any, path: tuple[str, ...]) -> list[_Located]:
    """Every value at ``path``, with its expression; list items get their index."""
    found: list[_Located] = [(data, resource_type)]
    for depth, name in enumerate(path, 1):
        found = [child for node, expr in found for child in _children(node, name, expr)]
        nested = _NESTED.get((resource_type, path[:depth]))
        if nested:
            found = [item for located in found for item in _with_nested(located, nested)]
    return found


def _children(node: Any, name: str, expression: str) -> list[_Located]:
    value = node.get(name) if isinstance(node, dict) else None
    if _absent(value):
        return []
    if isinstance(value, list):
        return [(item, f"{expression}.{name}[{i}]") for i, item in enumerate(value)]
    return [(value, f"{expression}.{name}")]


def _with_nested(located: _Located, name: str) -> list[_Located]:
    """``located`` and its ``name`` children at any depth, in document order (no recursion)."""
    out, stack = [], [located]
    while stack:
        node, expression = stack.pop()
        out.append((node, expression))
        stack += reversed(_children(node, name, expression))
    return out


def _cardinality(element: _Element, parents: list[_Located]) -> list[Issue]:
    name, issues = element.path[-1], []
    for node, expression in parents:
        if not isinstance(node, dict):
            continue  # malformed; R4B has said so
        value = node.get(name)
        count = 0 if _absent(value) else len(value) if isinstance(value, list) else 1
        where = f"{expression}.{name}"
        if count < element.min:
            text = "is required" if element.min == 1 else f"needs at least {element.min}"
            issues.append(_issue(where, text, "required"))
        elif element.max is not None and count > element.max:
            issues.append(_issue(where, f"allows at most {element.max}, found {count}", "value"))
    return issues


def _check(element: _Element, value: Any, expression: str) -> list[Issue]:
    issues = []
    if element.fixed is not None and value != element.fixed:
        issues.append(_issue(expression, f"must be {element.fixed!r}, found {value!r}", "value"))
    if element.pattern is not None and not _matches(element.pattern, value):
        issues.append(_issue(expression, f"must include {_describe(element.pattern)}", "value"))
    if element.value_set is not None:
        issues += _binding(value, expression, element.value_set)
    if element.targets:
        issues += _reference(value, expression, element.targets)
    for constraint in element.constraints:
        for where, text in _INVARIANTS[constraint.key](value, expression):
            issues.append(_issue(where, text, "invariant", constraint.severity))
    return issues


def _matches(pattern: Any, value: Any) -> bool:
    """FHIR ``pattern[x]``: everything the pattern says is in the value; lists by any item."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            _matches(p, value.get(k)) for k, p in pattern.items()
        )
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_matches(p, v) for v in value) for p in pattern)
    return bool(pattern == value)


def _describe(pattern: Any) -> str:
    codings = pattern.get("coding", [pattern]) if isinstance(pattern, dict) else []
    named = [f"{c['system']}#{c['code']}" for c in codings if {"system", "code"} <= set(c)]
    return " and ".join(named) if named else json.dumps(pattern)


def _binding(value: Any, expression: str, value_set: ValueSet) -> list[Issue]:
    """A code, Coding or CodeableConcept (one coding from the set suffices) in ``value_set``."""
    if isinstance(value, str):
        if any(value in codes for codes in value_set.codes.values()):
            return []
        text = f"{value!r} is not in {value_set.describe()}"
        return [_issue(expression, text, "code-invalid")]
    if not isinstance(value, dict):
        return []
    if "coding" not in value and "text" not in value:
        return _coding(value, expression, value_set)
    codings = value.get("coding") if isinstance(value.get("coding"), list) else []
    if not codings:
        return [_issue(expression, f"needs a coding from {value_set.describe()}", "code-invalid")]
    found = [_coding(c, f"{expression}.coding[{i}]", value_set) for i, c in enumerate(codings)]
    if any(not problems for problems in found):
        return []
    return [issue for problems in found for issue in problems]


def _coding(coding: Any, expression: str, value_set: ValueSet) -> list[Issue]:
    if not isinstance(coding, dict):
        return []
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(system, str) or system not in value_set.codes:
        systems = " or ".join(value_set.codes)
        if system is None:
            return [_issue(f"{expression}.system", f"is required ({systems})", "required")]
        text = f"{system!r} is not a code system of {value_set.title}; expected {systems}"
        return [_issue(f"{expression}.system", text, "code-invalid")]
    if code not in value_set.codes[system]:
        text = f"{code!r} is not in {value_set.describe()}"
        return [_issue(f"{expression}.code", text, "code-invalid")]
    return []


def _reference(value: Any, expression: str, targets: frozenset[str]) -> list[Issue]:
    """A Reference to one of ``targets``: by ``reference`` or (logically) by ``identifier``."""
    if not isinstance(value, dict):
        return []
    expected = " or ".join(sorted(targets))
    issues = []
    reference, kind = value.get("reference"), value.get("type")
    if isinstance(reference, str):
        if match := _REFERENCE.fullmatch(reference):
            if match["type"] not in targets:
                text = f"{reference!r} is not a reference to a {expected}"
                issues.append(_issue(f"{expression}.reference", text, "value"))
        elif not reference.startswith(("#", "urn:uuid:", "urn:oid:")):
            text = f"{reference!r} is not a FHIR reference (Type/id, a URL, #id or urn:uuid:)"
            issues.append(_issue(f"{expression}.reference", text, "value"))
    elif _absent(value.get("identifier")):
        text = f"needs a reference or an identifier of the {expected}"
        issues.append(_issue(expression, text, "required"))
    if isinstance(kind, str) and kind not in targets:
        issues.append(_issue(f"{expression}.type", f"must be {expected}, found {kind!r}", "value"))
    return issues


# -- invariants, by the key the StructureDefinitions give them ----------------------------------

_Invariant = Callable[[Any, str], list[tuple[str, str]]]
_INVARIANTS: dict[str, _Invariant] = {}


def _invariant(key: str) -> Callable[[_Invariant], _Invariant]:
    def register(check: _Invariant) -> _Invariant:
        _INVARIANTS[key] = check
        return check

    return register


def _is_oid_urn(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("urn:oid:") and is_uid(value[8:])


@_invariant("exch-uid")
def _uid(value: Any, expression: str) -> list[tuple[str, str]]:
    if is_uid(value):
        return []
    hint = "; give the bare UID, without urn:oid:" if _is_oid_urn(value) else ""
    return [
        (expression, f"{value!r} is not a DICOM UID (digits and dots, at most 64 characters){hint}")
    ]


@_invariant("exch-oid-uri")
def _oid_uri(value: Any, expression: str) -> list[tuple[str, str]]:
    if _is_oid_urn(value):
        return []
    hint = f"; use 'urn:oid:{value}'" if is_uid(value) else ""
    return [(expression, f"{value!r} is not urn:oid: followed by a DICOM UID{hint}")]


@_invariant("exch-study-uid")
def _study_uid(study: Any, expression: str) -> list[tuple[str, str]]:
    """One ``urn:dicom:uid`` identifier, ``urn:oid:<StudyInstanceUID>``: the study's key."""
    listed = study.get("identifier") if isinstance(study, dict) else None
    identifiers = [
        (identifier, f"{expression}.identifier[{index}]")
        for index, identifier in enumerate(listed if isinstance(listed, list) else [])
        if isinstance(identifier, dict)
    ]
    if not identifiers:
        return []  # the cardinality rule says so
    dicom = [(i, where) for i, where in identifiers if i.get("system") == DICOM_UID_SYSTEM]
    if not dicom:
        # A UID under another system is most likely the study UID with the wrong system.
        misfiled = [
            (where, i.get("system"))
            for i, where in identifiers
            if _is_oid_urn(i.get("value")) or is_uid(i.get("value"))
        ]
        if misfiled:
            expected = f"must be {DICOM_UID_SYSTEM} for the Study Instance UID"
            return [
                (f"{where}.system", f"{expected}, found {system!r}") for where, system in misfiled
            ]
        text = f"needs one with system {DICOM_UID_SYSTEM} (the Study Instance UID)"
        return [(f"{expression}.identifier", text)]
    problems = [
        (f"{where}.system", f"only one identifier may have system {DICOM_UID_SYSTEM}")
        for _, where in dicom[1:]
    ]
    for identifier, where in dicom:
        value = identifier.get("value")
        if not _is_oid_urn(value):
            hint = f"; use 'urn:oid:{value}'" if is_uid(value) else ""
            text = f"{value!r} is not urn:oid: followed by the Study Instance UID{hint}"
            problems.append((f"{where}.value", text))
    return problems


@_invariant("exch-consent-policy")
def _consent_policy(consent: Any, expression: str) -> list[tuple[str, str]]:
    if not isinstance(consent, dict):
        return []
    if _absent(consent.get("policy")) and _absent(consent.get("policyRule")):
        return [(expression, "names no policy: policyRule or policy is required")]
    return []


@_invariant("exch-period")
def _period(period: Any, expression: str) -> list[tuple[str, str]]:
    """``start <= end``; partial dates count as their whole span, so only a sure reversal fails."""
    if not isinstance(period, dict):
        return []
    start, end = _span(period.get("start")), _span(period.get("end"))
    if start is None or end is None or start[0] <= end[1]:
        return []
    return [(expression, f"ends ({period['end']}) before it starts ({period['start']})")]


def _span(value: Any) -> tuple[datetime, datetime] | None:
    """The first and last instant a FHIR dateTime can mean (dates without a zone: UTC)."""
    match = _FHIR_DATETIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    year, month, day, time = match.groups()
    try:
        if time:
            moment = datetime.fromisoformat(value)
            return (moment, moment) if moment.tzinfo else None
        first = date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return None  # R4B reports bad dates
    if day:
        after = first + timedelta(days=1)
    elif month:
        after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        after = date(first.year + 1, 1, 1)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    stop = datetime(after.year, after.month, after.day, tzinfo=UTC) - timedelta(microseconds=1)
    return start, stop


@_invariant("exch-audit-requestor")
def _audit_requestor(event: Any, expression: str) -> list[tuple[str, str]]:
    agents = event.get("agent") if isinstance(event, dict) else None
    if not isinstance(agents, list) or not agents:
        return []  # the cardinality rule says so
    if any(isinstance(agent, dict) and agent.get("requestor") is True for agent in agents):
        return []
    return [(f"{expression}.agent", "no agent is the requestor (agent.requestor = true)")]


# -- checks the hub makes with what it has looked up --------------------------------------------


def endpoint_is_wado_rs(
    endpoint: dict[str, Any], *, referenced_from: str | None = None
) -> list[Issue]:
    """Why ``endpoint`` cannot serve a study's images over DICOMweb (empty if it can).

    The hub resolves ``ImagingStudy.endpoint`` in its database and calls this;
    with ``referenced_from="ImagingStudy.endpoint[0]"`` the issues are located
    through it (``ImagingStudy.endpoint[0].resolve().connectionType``).
    """
    at = f"{referenced_from}.resolve()" if referenced_from else "Endpoint"
    kind = endpoint.get("resourceType")
    if kind != "Endpoint":
        return [_issue(at, f"is a {kind!r}, not an Endpoint", "value")]
    issues = []
    connection = endpoint.get("connectionType")
    found = (
        (connection.get("system"), connection.get("code")) if isinstance(connection, dict) else None
    )
    if found != WADO_RS:
        text = f"must be {WADO_RS[0]}#{WADO_RS[1]}, found {connection!r}"
        issues.append(_issue(f"{at}.connectionType", text, "value"))
    if not isinstance(endpoint.get("address"), str) or not endpoint["address"]:
        issues.append(_issue(f"{at}.address", "is required (the DICOMweb base URL)", "required"))
    return issues
