"""Operator tools over the policy alone: explain one decision, and what-if for a consent.

They work offline: the study facts and the consents come from files, not from
the hub's database, so an operator can ask "why?" and "what would change?"
against a copy of ``policies/`` before deploying it.

Files:
- study file: one resource-facts object or a list of them, the keys of
  ``ResourceFacts.as_input``: ``{"study", "uid", "patient": [..], "custodian",
  "security_labels": [..], "date"}``.
- consents: a FHIR Bundle (``entry[].resource``), a JSON array of Consent
  resources, or one Consent.
- claims: a JSON object of token claims (``sub``, ``role``, ``org``,
  ``purpose_of_use``, ``patient``); a list of them for what-if callers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from exchange.errors import ConfigurationError
from exchange.policy.decisions import (
    ACTIONS,
    Decision,
    DecisionInput,
    ResourceFacts,
    Subject,
    decide_batch,
)
from exchange.policy.engine import PolicyEngine


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigurationError(f"the {what} {path} is not valid JSON: {exc}") from None


def load_studies(path: Path) -> list[ResourceFacts]:
    data = read_json(path, "study file")
    items = data if isinstance(data, list) else [data]
    studies = []
    for n, item in enumerate(items):
        try:
            studies.append(ResourceFacts.from_json(item))
        except ValueError as exc:
            raise ConfigurationError(f"{path}: study {n + 1}: {exc}") from None
    if not studies:
        raise ConfigurationError(f"{path} holds no study")
    return studies


def pick_study(studies: Sequence[ResourceFacts], wanted: str | None, source: Path) -> ResourceFacts:
    if wanted is None:
        if len(studies) == 1:
            return studies[0]
        raise ConfigurationError(f"{source} holds {len(studies)} studies; name one with --study")
    plain = wanted.removeprefix("urn:oid:")
    for study in studies:
        if wanted in (study.study, f"ImagingStudy/{study.study}") or plain == study.uid:
            return study
    raise ConfigurationError(f"no study {wanted!r} in {source}")


def load_consents(path: Path | None) -> list[dict[str, Any]]:
    """Consent resources from a Bundle, an array, or one resource."""
    if path is None:
        return []
    data = read_json(path, "consent file")
    if isinstance(data, Mapping) and data.get("resourceType") == "Bundle":
        items: Iterable[Any] = (e.get("resource") for e in data.get("entry", []) or [])
    elif isinstance(data, list):
        items = data
    else:
        items = [data]
    consents = [dict(c) for c in items if isinstance(c, Mapping)]
    wrong = [c.get("resourceType") for c in consents if c.get("resourceType") != "Consent"]
    if wrong or not consents:
        raise ConfigurationError(f"{path} must hold Consent resources (found {wrong or 'none'})")
    return consents


def load_claims(path: Path) -> Any:
    return read_json(path, "claims file")


def claims_from_token(token: str) -> dict[str, Any]:
    """The claims of a JWT, read without checking its signature (explaining is not access)."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise ConfigurationError("the token is not a well-formed JWT") from None
    return dict(claims)


def subject_of(claims: Any, reason: str | None = None, purposes: Sequence[str] = ()) -> Subject:
    if not isinstance(claims, Mapping) or not claims.get("role"):
        raise ConfigurationError("the claims must be a JSON object with at least 'sub' and 'role'")
    subject = Subject.from_claims(claims, reason)
    if purposes:
        subject = Subject(
            subject.id,
            subject.role,
            subject.organization,
            tuple(purposes),
            subject.patient,
            subject.reason,
        )
    return subject


def check_action(action: str) -> str:
    if action not in ACTIONS:
        raise ConfigurationError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    return action


def explain(
    engine: PolicyEngine,
    subject: Subject,
    study: ResourceFacts,
    action: str,
    consents: Sequence[Mapping[str, Any]],
    now: datetime | None = None,
) -> Decision:
    question = DecisionInput(subject, check_action(action), study, tuple(consents), now)
    return decide_batch(engine, [question])[0]


def describe_subject(subject: Subject) -> str:
    parts = [subject.role]
    if subject.organization:
        parts.append(f"organisation {subject.organization}")
    if subject.purpose_of_use:
        parts.append(f"purpose {', '.join(subject.purpose_of_use)}")
    return f"{subject.id} ({'; '.join(parts)})"


# -- what-if --------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    study: str
    caller: Subject
    action: str
    before: Decision
    after: Decision

    def as_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "caller": self.caller.as_input(),
            "action": self.action,
            "before": {"allow": self.before.allow, "reasons": list(self.before.reasons)},
            "after": {"allow": self.after.allow, "reasons": list(self.after.reasons)},
        }


@dataclass(frozen=True)
class WhatIf:
    studies: tuple[ResourceFacts, ...]
    callers: tuple[Subject, ...]
    actions: tuple[str, ...]
    changes: tuple[Change, ...]

    @property
    def compared(self) -> int:
        return len(self.studies) * len(self.callers) * len(self.actions)


def with_consent(
    consents: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """``consents`` with ``new`` added; one with the same id replaces the stored one."""
    replaced = {c.get("id") for c in new if c.get("id")}
    return [c for c in consents if c.get("id") not in replaced or not c.get("id")] + list(new)


def _references(consents: Iterable[Mapping[str, Any]], kind: str) -> set[str]:
    found = set()

    def walk(provision: Any) -> None:
        if not isinstance(provision, Mapping):
            return
        for actor in provision.get("actor") or []:
            ref = ((actor or {}).get("reference") or {}).get("reference")
            if isinstance(ref, str) and ref.startswith(f"{kind}/"):
                found.add(ref.split("/", 1)[1])
        for nested in provision.get("provision") or []:
            walk(nested)

    for consent in consents:
        walk(consent.get("provision"))
    return found


def default_callers(
    studies: Iterable[ResourceFacts], consents: Iterable[Mapping[str, Any]]
) -> list[Subject]:
    """A clinician (purpose TREAT) of every organisation the studies or consents name,
    and every practitioner the consents name."""
    consents = list(consents)
    organisations = {s.custodian for s in studies if s.custodian} | _references(
        consents, "Organization"
    )
    callers = [
        Subject(f"clinician@{org}", "clinician", org, ("TREAT",)) for org in sorted(organisations)
    ]
    callers += [
        Subject(practitioner, "clinician", None, ("TREAT",))
        for practitioner in sorted(_references(consents, "Practitioner"))
    ]
    return callers


def what_if(
    engine: PolicyEngine,
    patient: str,
    studies: Sequence[ResourceFacts],
    consents: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    callers: Sequence[Subject] | None = None,
    actions: Sequence[str] = ("view", "export"),
    now: datetime | None = None,
) -> WhatIf:
    """Which decisions about ``patient``'s studies would change with ``new`` consents."""
    plain = patient.removeprefix("Patient/")
    mine = tuple(s for s in studies if plain in s.patients)
    if not mine:
        raise ConfigurationError(f"no study of patient {plain!r} in the study file")
    after = with_consent(consents, new)
    who = tuple(callers) if callers else tuple(default_callers(mine, [*consents, *new]))
    for action in actions:
        check_action(action)
    cases = [(s, c, a) for s in mine for c in who for a in actions]
    before_d = decide_batch(
        engine, [DecisionInput(c, a, s, tuple(consents), now) for s, c, a in cases]
    )
    after_d = decide_batch(engine, [DecisionInput(c, a, s, tuple(after), now) for s, c, a in cases])
    changes = tuple(
        Change(s.study, c, a, b, d)
        for (s, c, a), b, d in zip(cases, before_d, after_d, strict=True)
        if b.allow != d.allow
    )
    return WhatIf(mine, who, tuple(actions), changes)
