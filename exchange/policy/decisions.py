"""Ask the policy a question built from plain values; get allow, reasons and obligations.

``DecisionInput`` is the one place that defines what the access policy
(``policies/exchange/access``) is given: who asks (``Subject``), for what
action, about which study (``ResourceFacts``), the patient's consents (FHIR
``Consent`` JSON as stored) and the time. ``decide`` and ``decide_batch`` work
over either engine and never raise: an engine error, a timeout, an undefined
or malformed answer, or an obligation this service cannot honour is a deny
with a reason. Every decision has an id, the policy version that made it and
a digest of its input.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from exchange.policy.engine import PolicyEngine, PolicyError

Action = Literal[
    "search", "read", "view", "export", "share", "revoke-share", "write-consent", "read-audit"
]
ACTIONS: tuple[Action, ...] = get_args(Action)

DECISION_RULE = "data.exchange.access.decision"
BATCH_RULE = "data.exchange.access.decisions"

#: Obligations this service knows how to fulfil; a permit carrying any other is refused.
OBLIGATIONS = frozenset({"audit-emergency-access", "notify-custodian"})

#: The policy version recorded when no policy answered.
NO_POLICY = "none"

_DICOM_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_ISO_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(T.*)?$")


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Subject:
    """Who asks: the token's claims the policy needs, plus a break-the-glass reason."""

    id: str
    role: str
    organization: str | None
    purpose_of_use: tuple[str, ...] = ()
    patient: str | None = None
    #: The reason stated for break-the-glass (purpose of use ETREAT) access.
    reason: str | None = None
    #: A patient session opened with an access code covers only these studies (ids).
    studies: tuple[str, ...] | None = None

    def as_input(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "organization": self.organization,
            "purpose_of_use": list(self.purpose_of_use),
            "patient": self.patient,
            "reason": self.reason,
        }
        if self.studies is not None:
            found["studies"] = list(self.studies)
        return found

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], reason: str | None = None) -> Subject:
        """From token claims (``sub``, ``role``, ``org``, ``purpose_of_use``, ``patient``;
        ``break_glass_reason`` if the identity provider carries one)."""
        purpose = claims.get("purpose_of_use") or ()
        if isinstance(purpose, str):
            purpose = (purpose,)
        stated = reason if reason is not None else claims.get("break_glass_reason")
        return cls(
            id=str(claims.get("sub", "")),
            role=str(claims.get("role", "")),
            organization=_optional_str(claims.get("org", claims.get("organization"))),
            purpose_of_use=tuple(str(p) for p in purpose),
            patient=_optional_str(claims.get("patient")),
            reason=_optional_str(stated),
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _plain_id(value: str, kind: str) -> str:
    """``Patient/p1`` or a full URL to it -> ``p1``; a bare id stays as it is."""
    parts = value.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind else value


def _label_code(label: Any) -> str:
    """A security label given as a code or as a FHIR Coding."""
    if isinstance(label, Mapping):
        return str(label.get("code", ""))
    return str(label)


def study_date(value: str | None) -> str | None:
    """A DICOM ``YYYYMMDD`` or FHIR date/dateTime -> ``YYYY-MM-DD``; anything else -> None."""
    if not value:
        return None
    value = value.strip()
    if match := _DICOM_DATE.match(value):
        return "-".join(match.groups())
    if match := _ISO_DATE.match(value):
        return match.group(1)
    return None


@dataclass(frozen=True)
class ResourceFacts:
    """What the policy needs to know about a study (or the study an audit or consent is about).

    ``patients`` holds every id the patient is known by (linked ids from the
    master patient index too): consents are matched against all of them.
    """

    study: str
    custodian: str | None
    patients: tuple[str, ...]
    uid: str | None = None
    security_labels: tuple[str, ...] = ()
    date: str | None = None
    type: str = "ImagingStudy"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "patients", tuple(_plain_id(str(p), "Patient") for p in self.patients)
        )
        object.__setattr__(
            self, "security_labels", tuple(_label_code(x) for x in self.security_labels)
        )
        object.__setattr__(self, "date", study_date(self.date))
        if self.uid and self.uid.startswith("urn:oid:"):
            object.__setattr__(self, "uid", self.uid.removeprefix("urn:oid:"))

    def as_input(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "study": self.study,
            "uid": self.uid,
            "patient": list(self.patients),
            "custodian": self.custodian,
            "security_labels": list(self.security_labels),
            "date": self.date,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResourceFacts:
        """From the resource-facts JSON the CLI reads (the keys of ``as_input``;
        ``patient`` may be one id or a list)."""
        if not isinstance(data, Mapping):
            raise ValueError("resource facts must be a JSON object")
        patients = data.get("patient", data.get("patients", ()))
        if isinstance(patients, str):
            patients = [patients]
        if not isinstance(data.get("study"), str):
            raise ValueError("resource facts need 'study' (the ImagingStudy id)")
        return cls(
            study=data["study"],
            custodian=_optional_str(data.get("custodian")),
            patients=tuple(str(p) for p in patients or ()),
            uid=_optional_str(data.get("uid")),
            security_labels=tuple(data.get("security_labels") or ()),
            date=_optional_str(data.get("date")),
            type=str(data.get("type", "ImagingStudy")),
        )


def _instant(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DecisionInput:
    """The whole question put to ``data.exchange.access.decision``."""

    subject: Subject
    action: str
    resource: ResourceFacts
    consents: tuple[Mapping[str, Any], ...] = ()
    #: When the decision is made (consent periods are checked against it); default: now.
    now: datetime | None = None

    def as_input(self) -> dict[str, Any]:
        return {
            "subject": self.subject.as_input(),
            "action": self.action,
            "resource": self.resource.as_input(),
            "consents": [dict(c) for c in self.consents],
            "now": _instant(self.now),
        }


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...]
    obligations: tuple[Mapping[str, Any], ...] = ()
    #: ``<data.json policy_version>+<bundle hash>`` as the policy reported it.
    policy_version: str = NO_POLICY
    decision_id: str = field(default_factory=_new_id)
    input_digest: str = ""

    def reason(self) -> str:
        return "; ".join(self.reasons) or "the policy does not allow this"

    def as_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "allow": self.allow,
            "reasons": list(self.reasons),
            "obligations": [dict(o) for o in self.obligations],
            "policy_version": self.policy_version,
            "input_digest": self.input_digest,
        }


def input_digest(input_: Mapping[str, Any]) -> str:
    """SHA-256 of the input's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(input_, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _refuse(reason: str, digest: str) -> Decision:
    return Decision(False, (reason,), input_digest=digest)


def _unavailable(exc: PolicyError) -> str:
    return f"the access policy could not be evaluated ({exc.message}), so access is refused"


def _decision(answer: Any, digest: str) -> Decision:
    """An engine's answer as a Decision, or a refusal saying what was wrong with it."""
    if not isinstance(answer, Mapping) or not isinstance(answer.get("allow"), bool):
        return _refuse("the access policy gave no yes-or-no answer, so access is refused", digest)
    reasons = answer.get("reasons", [])
    obligations = answer.get("obligations", [])
    version = answer.get("policy_version")
    if (
        not isinstance(reasons, list | tuple)
        or not all(isinstance(r, str) for r in reasons)
        or not isinstance(obligations, list | tuple)
        or not all(isinstance(o, Mapping) for o in obligations)
        or not isinstance(version, str)
    ):
        return _refuse("the access policy gave a malformed answer, so access is refused", digest)
    allow: bool = answer["allow"]
    unknown = sorted({str(o.get("code")) for o in obligations} - OBLIGATIONS)
    if allow and unknown:
        return Decision(
            False,
            (f"the access policy asks for {', '.join(unknown)}, which this service cannot do",),
            policy_version=version,
            input_digest=digest,
        )
    return Decision(
        allow,
        tuple(reasons),
        tuple(dict(o) for o in obligations),
        policy_version=version,
        input_digest=digest,
    )


def _as_input(question: DecisionInput | Mapping[str, Any]) -> dict[str, Any]:
    return question.as_input() if isinstance(question, DecisionInput) else dict(question)


def decide(engine: PolicyEngine, question: DecisionInput | Mapping[str, Any]) -> Decision:
    """The access decision for one question. Never raises: failure is a deny."""
    try:
        input_ = _as_input(question)
        digest = input_digest(input_)
    except (TypeError, ValueError) as exc:
        return _refuse(f"the decision input is not valid JSON ({exc}), so access is refused", "")
    try:
        answer = engine.evaluate(DECISION_RULE, input_)
    except PolicyError as exc:
        return _refuse(_unavailable(exc), digest)
    return _decision(answer, digest)


def decide_batch(
    engine: PolicyEngine, questions: Sequence[DecisionInput | Mapping[str, Any]]
) -> list[Decision]:
    """Decisions for a page of questions in one engine call (one round trip to a server)."""
    if not questions:
        return []
    try:
        inputs = [_as_input(q) for q in questions]
        digests = [input_digest(i) for i in inputs]
    except (TypeError, ValueError) as exc:
        reason = f"the decision input is not valid JSON ({exc}), so access is refused"
        return [_refuse(reason, "") for _ in questions]
    try:
        answers = engine.evaluate(BATCH_RULE, {"batch": inputs})
    except PolicyError as exc:
        return [_refuse(_unavailable(exc), d) for d in digests]
    if not isinstance(answers, list | tuple) or len(answers) != len(inputs):
        reason = "the access policy answered a batch with the wrong number of decisions"
        return [_refuse(reason, d) for d in digests]
    return [_decision(answer, d) for answer, d in zip(answers, digests, strict=True)]


# -- direct FHIR interactions (package exchange.fhir) --------------------------------------


def _decide(engine: PolicyEngine, package: str, input_: dict[str, Any]) -> Decision:
    """Raises ``PolicyError`` when the engine cannot decide (callers answer 503)."""
    allow = engine.evaluate(f"data.{package}.allow", input_) is True
    reasons: Iterable[Any] = () if allow else engine.evaluate(f"data.{package}.reasons", input_)
    return Decision(
        allow, tuple(sorted(str(r) for r in reasons)), input_digest=input_digest(input_)
    )


def fhir_interaction(
    engine: PolicyEngine, subject: Subject, interaction: str, resource_type: str
) -> Decision:
    """May ``subject`` perform a direct FHIR ``interaction`` on ``resource_type``?"""
    return _decide(
        engine,
        "exchange.fhir",
        {
            "subject": subject.as_input(),
            "interaction": interaction,
            "resource_type": resource_type,
        },
    )
