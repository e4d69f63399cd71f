"""One-hop provider sharing: a clinician who may view a study shares it with another provider.

A share is a FHIR ``Consent`` the hub writes (IHE PCF shape: a permit whose actor is
the recipient, action ``access``, a purpose, a period and ``data`` = the ImagingStudy;
``policy`` ``urn:exchange:policy:provider-share``) and a ``Provenance`` naming the
sharer, both in one transaction, then an AuditEvent. The route never decides: the
access policy answers ``share`` (who may view the study other than through a share
may share it; a recipient cannot share it on) and ``revoke-share``, and the consent
rules read the share as a permit for the recipient, so viewing needs nothing here.

Revoking makes the Consent ``inactive`` (a new version; history keeps the old one).
Decisions read consents fresh, so no grant is issued after that; grants already out
expire within ``grant_ttl_seconds`` (at most 60 s).

The functions taking a ``SqlRepository`` (listing, revoking) serve the CLI too, which
works on the hub's database directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from exchange.audit.events import AuditAction, What
from exchange.errors import (
    BadRequest,
    ExchangeError,
    Forbidden,
    Gone,
    NotFound,
    Unavailable,
    Unprocessable,
)
from exchange.fhir import resources
from exchange.fhir.repository import SqlRepository, Stored
from exchange.hub import access, auditing
from exchange.policy.decisions import Decision
from exchange.policy.engine import PolicyEngine, PolicyError
from exchange.security.scopes import require
from exchange.security.tokens import Principal

if TYPE_CHECKING:
    from exchange.hub.services import HubServices

log = logging.getLogger(__name__)

PROVIDER_SHARE_POLICY = "urn:exchange:policy:provider-share"
CONSENT_KIND_SYSTEM = "https://exchange.example.org/fhir/CodeSystem/consent-kind"
NOTE_EXTENSION = "https://exchange.example.org/fhir/StructureDefinition/share-note"
CONSENT_PROFILE = "https://exchange.example.org/fhir/StructureDefinition/exchange-consent"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SHARING_RULE = "data.exchange.access.sharing"
MAX_NOTE_CHARS = 1000
MAX_RECIPIENTS = 10
#: A dateTime end may run this far past the maximum (clocks, rounding to the second).
_SLACK = timedelta(minutes=1)

_RECIPIENT = re.compile(r"^(Practitioner|Organization)/[A-Za-z0-9\-.]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PARAMETERS = ("recipient", "purpose", "end", "days", "note")


class NotSupported(ExchangeError):
    """This hub's configuration cannot do what was asked."""

    status = 501
    code = "not-supported"


def is_fhir_id(value: str) -> bool:
    return bool(_ID.match(value))


# -- what a client asks -------------------------------------------------------------------


@dataclass(frozen=True)
class ShareRequest:
    """``$share``'s Parameters: recipients (``Practitioner/<sub>`` or ``Organization/<id>``),
    a v3 PurposeOfUse code, an end (FHIR date or dateTime) or a number of days, a note."""

    recipients: tuple[str, ...]
    purpose: str = "TREAT"
    end: str | None = None
    days: int | None = None
    note: str | None = None


def _value(parameter: Mapping[str, Any], name: str, kinds: Sequence[str]) -> Any:
    given = [k for k in parameter if k.startswith("value")]
    found = [k for k in given if k in kinds]
    if len(given) != 1 or not found:
        expected = " or ".join(kinds)
        raise BadRequest(f"parameter {name!r} needs one of {expected}")
    return parameter[found[0]]


def parse_parameters(body: Mapping[str, Any]) -> ShareRequest:
    """A ``Parameters`` resource as a share request; 400/422 saying what is wrong."""
    resources.validate("Parameters", dict(body))
    recipients: list[str] = []
    single: dict[str, Any] = {}
    for parameter in body.get("parameter") or []:
        name = parameter.get("name")
        if name not in _PARAMETERS:
            raise BadRequest(f"unknown parameter {name!r}; $share takes {', '.join(_PARAMETERS)}")
        if name == "recipient":
            reference = _value(parameter, name, ("valueReference",)).get("reference")
            if not isinstance(reference, str) or not _RECIPIENT.match(reference):
                raise BadRequest(
                    "recipient must be a reference to Practitioner/<id> (the person, as the "
                    "HIE's tokens name them) or Organization/<id>"
                )
            if reference not in recipients:
                recipients.append(reference)
            continue
        if name in single:
            raise BadRequest(f"parameter {name!r} may be given once")
        if name == "purpose":
            coding = _value(parameter, name, ("valueCoding", "valueCode"))
            if isinstance(coding, Mapping):
                if coding.get("system", ACT_REASON) != ACT_REASON:
                    raise BadRequest(f"purpose must be a code of {ACT_REASON} (PurposeOfUse)")
                coding = coding.get("code")
            if not isinstance(coding, str) or not coding:
                raise BadRequest("purpose needs a code (for example TREAT)")
            single[name] = coding
        elif name == "end":
            single[name] = _value(parameter, name, ("valueDate", "valueDateTime"))
        elif name == "days":
            single[name] = _value(
                parameter, name, ("valueInteger", "valuePositiveInt", "valueUnsignedInt")
            )
        else:
            note = str(_value(parameter, name, ("valueString",))).strip()
            if len(note) > MAX_NOTE_CHARS:
                raise BadRequest(f"note is longer than {MAX_NOTE_CHARS} characters")
            single[name] = note or None
    if not recipients:
        raise BadRequest("$share needs a recipient (Practitioner/<id> or Organization/<id>)")
    if len(recipients) > MAX_RECIPIENTS:
        raise BadRequest(f"a share names at most {MAX_RECIPIENTS} recipients")
    if "end" in single and "days" in single:
        raise BadRequest("give the share's end or its length in days, not both")
    return ShareRequest(
        recipients=tuple(recipients),
        purpose=single.get("purpose", "TREAT"),
        end=single.get("end"),
        days=single.get("days"),
        note=single.get("note"),
    )


# -- the HIE's settings (policies/data.json, through the policy engine) -------------------


@dataclass(frozen=True)
class SharingSettings:
    default_days: int
    max_days: int
    emergency_purposes: frozenset[str] = frozenset()


def sharing_settings(engine: PolicyEngine) -> SharingSettings:
    """Periods and refused purposes from the policy bundle; ``Unavailable`` when the
    engine cannot say (no share is made on a guess)."""
    try:
        found = engine.evaluate(SHARING_RULE, {})
    except PolicyError as exc:
        raise Unavailable(f"the sharing settings could not be read ({exc.message})") from None
    default, maximum = (found or {}).get("default_days"), (found or {}).get("max_days")
    if not (isinstance(default, int) and isinstance(maximum, int) and 0 < default <= maximum):
        raise Unavailable("the sharing settings in the policy bundle are not valid")
    emergency = found.get("emergency_purposes") or []
    return SharingSettings(default, maximum, frozenset(str(p) for p in emergency))


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def share_period(request: ShareRequest, settings: SharingSettings, now: datetime) -> dict[str, str]:
    """The share's period, from now: ``days`` or ``end`` if given, else the default; never
    longer than the maximum. An end date includes its whole (UTC) day."""
    start = {"start": _instant(now)}
    longest = f"a share may last at most {settings.max_days} days"
    if request.days is not None:
        if request.days < 1:
            raise BadRequest("days must be at least 1")
        if request.days > settings.max_days:
            raise Unprocessable(f"{longest}; {request.days} were asked")
        return {**start, "end": _instant(now + timedelta(days=request.days))}
    if request.end is None:
        return {**start, "end": _instant(now + timedelta(days=settings.default_days))}
    end = request.end
    if _DATE.match(end):
        day = date.fromisoformat(end)
        if day < now.astimezone(UTC).date():
            raise BadRequest(f"the share's end ({end}) has passed")
        if day > (now + timedelta(days=settings.max_days)).astimezone(UTC).date():
            raise Unprocessable(f"{longest}; it would end on {end}")
        return {**start, "end": end}
    moment: datetime | None
    try:
        moment = datetime.fromisoformat(end)
    except ValueError:
        moment = None
    if moment is None or "T" not in end or moment.tzinfo is None:
        raise BadRequest(
            f"end {end!r} must be a whole date (YYYY-MM-DD) or a dateTime with a time zone"
        )
    if moment <= now:
        raise BadRequest(f"the share's end ({end}) has passed")
    if moment - now > timedelta(days=settings.max_days) + _SLACK:
        raise Unprocessable(f"{longest}; it would end at {_instant(moment)}")
    return {**start, "end": _instant(moment)}


# -- the resources --------------------------------------------------------------------------


def is_share(consent: Mapping[str, Any]) -> bool:
    """Whether a Consent is a provider share (as the consent policy recognises one)."""
    if any(p.get("uri") == PROVIDER_SHARE_POLICY for p in consent.get("policy") or []):
        return True
    return any(
        c.get("system") == CONSENT_KIND_SYSTEM and c.get("code") == "provider-share"
        for concept in consent.get("category") or []
        for c in concept.get("coding") or []
    )


def _actor(reference: str) -> dict[str, Any]:
    return {
        "role": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "IRCP",
                    "display": "information recipient",
                }
            ]
        },
        "reference": {"reference": reference},
    }


def consent_body(
    *,
    study: str,
    patient: str,
    sharer: str,
    organization: str | None,
    request: ShareRequest,
    period: Mapping[str, str],
    now: datetime,
) -> dict[str, Any]:
    """The provider-share Consent (``exchange-consent`` profile)."""
    body: dict[str, Any] = {
        "resourceType": "Consent",
        "meta": {"profile": [CONSENT_PROFILE]},
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": "64292-6",
                        "display": "Release of information consent",
                    },
                    {
                        "system": CONSENT_KIND_SYSTEM,
                        "code": "provider-share",
                        "display": "provider share",
                    },
                ]
            }
        ],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": _instant(now),
        "performer": [{"reference": sharer}],
        "policy": [{"uri": PROVIDER_SHARE_POLICY}],
        "provision": {
            "type": "permit",
            "period": dict(period),
            "actor": [_actor(r) for r in request.recipients],
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "access",
                        }
                    ]
                }
            ],
            "purpose": [{"system": ACT_REASON, "code": request.purpose}],
            "data": [{"meaning": "instance", "reference": {"reference": f"ImagingStudy/{study}"}}],
        },
    }
    if organization:
        body["organization"] = [{"reference": f"Organization/{organization}"}]
    if request.note:
        body["extension"] = [{"url": NOTE_EXTENSION, "valueString": request.note}]
    return body


def provenance_body(
    *,
    consent: str,
    study: str,
    sharer: str,
    organization: str | None,
    purpose: str,
    now: datetime,
) -> dict[str, Any]:
    """Who made the share, for whom, from which study."""
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "author",
                }
            ]
        },
        "who": {"reference": sharer},
    }
    if organization:
        agent["onBehalfOf"] = {"reference": f"Organization/{organization}"}
    return {
        "resourceType": "Provenance",
        "target": [{"reference": f"Consent/{consent}"}],
        "recorded": _instant(now),
        "policy": [PROVIDER_SHARE_POLICY],
        "reason": [{"coding": [{"system": ACT_REASON, "code": purpose}]}],
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                }
            ]
        },
        "agent": [agent],
        "entity": [{"role": "source", "what": {"reference": f"ImagingStudy/{study}"}}],
    }


def record_share(
    repository: SqlRepository,
    consent: dict[str, Any],
    provenance_for: Callable[[str], dict[str, Any]],
) -> tuple[Stored, Stored]:
    """Validate and store the Consent and its Provenance in one transaction (neither
    without the other)."""
    body = resources.to_json(resources.validate("Consent", consent))
    try:
        with repository.transaction() as conn:
            stored = repository.insert_new(conn, "Consent", body)
            provenance = resources.validate("Provenance", provenance_for(stored.id))
            made = repository.insert_new(conn, "Provenance", resources.to_json(provenance))
    except SQLAlchemyError as exc:
        log.error("a share could not be stored", extra={"error": type(exc).__name__})
        raise Unavailable("the share could not be recorded; nothing was shared") from None
    return stored, made


# -- reading shares -------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """A provider share as operators see it."""

    id: str
    version: int
    status: str
    study: str | None
    patient: str | None
    sharer: str | None
    organization: str | None
    recipients: tuple[str, ...]
    purpose: str | None
    start: str | None
    end: str | None
    note: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "study": self.study,
            "patient": self.patient,
            "sharer": self.sharer,
            "organization": self.organization,
            "recipients": list(self.recipients),
            "purpose": self.purpose,
            "period": {"start": self.start, "end": self.end},
            "note": self.note,
        }

    def describe(self) -> str:
        """One line for an operator's terminal."""
        by = (
            f"{self.sharer} (Organization/{self.organization})"
            if self.organization
            else self.sharer
        )
        line = (
            f"{self.id}  {self.status}  ImagingStudy/{self.study}  from {by}  "
            f"to {', '.join(self.recipients)}  {self.purpose}  {self.start} .. {self.end}"
        )
        return f"{line}  note: {self.note}" if self.note else line

    def in_force(self, now: datetime) -> bool:
        """Active and not yet ended (an end date includes its whole UTC day)."""
        if self.status != "active":
            return False
        if not self.end:
            return True
        if _DATE.match(self.end):
            return now.astimezone(UTC).date().isoformat() <= self.end
        try:
            return now <= datetime.fromisoformat(self.end)
        except ValueError:
            return False


def _first_ref(items: Any, prefix: str) -> str | None:
    for item in items or []:
        reference = (item.get("reference") or {}) if isinstance(item, Mapping) else {}
        ref = reference.get("reference") if isinstance(reference, Mapping) else None
        if isinstance(ref, str) and ref.startswith(prefix):
            return ref.removeprefix(prefix)
    return None


def share_of(body: Mapping[str, Any]) -> Share:
    """A provider-share Consent (as stored) in operators' terms."""
    provision: Mapping[str, Any] = body.get("provision") or {}
    period: Mapping[str, Any] = provision.get("period") or {}
    performer: Mapping[str, Any] = next(iter(body.get("performer") or []), {})
    organization: Mapping[str, Any] = next(iter(body.get("organization") or []), {})
    purpose: Mapping[str, Any] = next(iter(provision.get("purpose") or []), {})
    note = next(
        (
            e.get("valueString")
            for e in body.get("extension") or []
            if e.get("url") == NOTE_EXTENSION
        ),
        None,
    )
    version = str((body.get("meta") or {}).get("versionId", "1"))
    return Share(
        id=str(body.get("id")),
        version=int(version) if version.isdigit() else 1,
        status=str(body.get("status")),
        study=_first_ref(provision.get("data"), "ImagingStudy/"),
        patient=str((body.get("patient") or {}).get("reference", "")).removeprefix("Patient/")
        or None,
        sharer=performer.get("reference"),
        organization=str(organization.get("reference", "")).removeprefix("Organization/") or None,
        recipients=tuple(
            str(a["reference"]["reference"])
            for a in provision.get("actor") or []
            if isinstance((a.get("reference") or {}).get("reference"), str)
        ),
        purpose=purpose.get("code"),
        start=period.get("start"),
        end=period.get("end"),
        note=note,
    )


def shares_of_patients(
    repository: SqlRepository, patient_ids: Sequence[str], now: datetime, *, every: bool = False
) -> list[Share]:
    """The provider shares about any of ``patient_ids`` (hub ids; give linked ones too),
    newest first: those in force, or ``every`` one."""
    found: list[Share] = []
    for body in repository.referencing("Consent", "patient", "Patient", list(patient_ids)):
        if not is_share(body) or not isinstance(body.get("id"), str):
            continue
        share = share_of(body)
        if every or share.in_force(now):
            found.append(share)
    return sorted(found, key=lambda s: (s.start or "", s.id), reverse=True)


def load_share(repository: SqlRepository, consent_id: str) -> Stored:
    """The provider-share Consent ``consent_id``: 404/410 if none, 400 if it is not a share."""
    if not _ID.match(consent_id):
        raise NotFound(f"{consent_id!r} is not a FHIR id, so no Consent has it")
    stored = repository.read("Consent", consent_id)
    if not is_share(stored.body):
        raise BadRequest(
            f"Consent/{consent_id} is not a provider share; the patient's own consents are "
            "changed through the consent registry"
        )
    return stored


def end_share(repository: SqlRepository, stored: Stored) -> tuple[Stored, bool]:
    """Make the share ``inactive`` (a new version); (the share, whether it changed). One
    already ended stays as it is."""
    if stored.body.get("status") != "active":
        return stored, False
    body = {**stored.body, "status": "inactive"}
    try:
        written = repository.update("Consent", stored.id, body, if_match=stored.etag)
    except SQLAlchemyError as exc:
        log.error("a share could not be revoked", extra={"error": type(exc).__name__})
        raise Unavailable("the share could not be revoked now; try again") from None
    return written.stored, True


# -- the hub's operations -------------------------------------------------------------------


@dataclass(frozen=True)
class _Absent:
    """A study the index no longer has, as the policy sees it: its id and its patient."""

    id: str
    patient: str | None
    resource_type: str = "ImagingStudy"

    @property
    def facts(self) -> Mapping[str, Sequence[str]]:
        return {"patient": [f"Patient/{self.patient}"]} if self.patient else {}


def _repository(services: HubServices) -> SqlRepository:
    if not isinstance(services.resources, SqlRepository):  # pragma: no cover - one kind today
        raise NotSupported("this hub's index cannot record shares")
    return services.resources


def _sharer(principal: Principal) -> str:
    if principal.role == "patient" and principal.patient:
        return f"Patient/{principal.patient}"
    return f"Practitioner/{principal.sub}"


def _audit(
    services: HubServices,
    action: AuditAction,
    principal: Principal,
    address: str | None,
    what: What,
    decision: Decision | None,
    *,
    allowed: bool,
    reason: str | None = None,
) -> None:
    auditing.record(
        services,
        action=action,
        principal=principal,
        address=address,
        what=what,
        decision=decision,
        allowed=allowed,
        reason=reason,
    )


def _scope(
    services: HubServices,
    principal: Principal,
    letter: str,
    action: AuditAction,
    address: str | None,
    what: What,
) -> None:
    """The token must allow writing Consents; a refusal is audited before it is answered."""
    try:
        require(principal.scopes, "Consent", letter)
    except Forbidden as refused:
        _audit(
            services, action, principal, address, what, None, allowed=False, reason=refused.message
        )
        raise


def share_study(
    services: HubServices,
    principal: Principal,
    study_id: str,
    request: ShareRequest,
    address: str | None,
    now: datetime | None = None,
) -> Stored:
    """Share ImagingStudy ``study_id`` as ``principal`` asks: the created Consent.

    The policy decides (403 with its reason, audited); the Consent and its Provenance
    are written together, then the share is audited (if that fails the Consent is marked
    ``entered-in-error`` and the caller gets 503: no audit, no share).
    """
    repository = _repository(services)
    if services.settings.consent_source != "index":
        raise NotSupported(
            "provider shares need the hub's own consent index (consent_source = index): "
            "decisions on this hub read consents from an external registry"
        )
    if not _ID.match(study_id):
        raise NotFound(f"{study_id!r} is not a FHIR id, so no ImagingStudy has it")
    study = repository.read("ImagingStudy", study_id)
    what = auditing.study_what(study, services=services)
    _scope(services, principal, "c", "share", address, what)
    decision = access.decide(services, principal, "share", [study])[0]
    if not decision.allow:
        _audit(services, "share", principal, address, what, decision, allowed=False)
        raise Forbidden(decision.reason())

    settings = sharing_settings(services.policy)
    if request.purpose in settings.emergency_purposes:
        raise BadRequest(
            f"a share cannot be for {request.purpose}: emergency access is break-the-glass"
        )
    sharer = _sharer(principal)
    if sharer in request.recipients:
        raise BadRequest("you cannot share a study with yourself")
    patients = [
        p.removeprefix("Patient/")
        for p in study.facts.get("patient", ())
        if p.startswith("Patient/")
    ]
    if not patients:
        raise Unprocessable("the study's patient is not known to the index, so it cannot be shared")
    moment = now or datetime.now(UTC)
    period = share_period(request, settings, moment)
    consent = consent_body(
        study=study.id,
        patient=patients[0],
        sharer=sharer,
        organization=principal.organization,
        request=request,
        period=period,
        now=moment,
    )
    stored, _provenance = record_share(
        repository,
        consent,
        lambda cid: provenance_body(
            consent=cid,
            study=study.id,
            sharer=sharer,
            organization=principal.organization,
            purpose=request.purpose,
            now=moment,
        ),
    )
    try:
        _audit(
            services,
            "share",
            principal,
            address,
            dataclasses.replace(what, resource=f"Consent/{stored.id}"),
            decision,
            allowed=True,
        )
    except ExchangeError:
        _withdraw(repository, stored)
        raise
    return stored


def _withdraw(repository: SqlRepository, stored: Stored) -> None:
    """A share that could not be audited must not grant anything."""
    try:
        repository.update(
            "Consent", stored.id, {**stored.body, "status": "entered-in-error"}, stored.etag
        )
    except Exception as exc:  # the caller gets its 503 either way; an operator must look
        log.error(
            "an unaudited share could not be withdrawn",
            extra={"consent": stored.id, "error": type(exc).__name__},
        )


def revoke_share(
    services: HubServices, principal: Principal, consent_id: str, address: str | None
) -> Stored:
    """End provider share ``consent_id`` if the policy lets ``principal`` (the sharer,
    the holding organisation's staff, the patient, HIE operators); the share as it now is."""
    repository = _repository(services)
    stored = load_share(repository, consent_id)
    share = share_of(stored.body)
    study: access.Visible = _Absent(share.study or "", share.patient)
    if share.study and _ID.match(share.study):
        with contextlib.suppress(NotFound, Gone):  # a study gone from the index
            study = repository.read("ImagingStudy", share.study)
    what = dataclasses.replace(
        auditing.study_what(study, services=services), resource=f"Consent/{consent_id}"
    )
    _scope(services, principal, "u", "revoke", address, what)
    decision = access.decide_with(
        services, principal, "revoke-share", study, {"share": stored.body}
    )
    if not decision.allow:
        _audit(services, "revoke", principal, address, what, decision, allowed=False)
        raise Forbidden(decision.reason())
    ended, changed = end_share(repository, stored)
    reason = None if changed else "the share had already ended"
    _audit(services, "revoke", principal, address, what, decision, allowed=True, reason=reason)
    return ended


def list_shares(
    services: HubServices,
    principal: Principal,
    patient_id: str,
    address: str | None,
    now: datetime | None = None,
) -> list[Share]:
    """The shares in force about a patient (every linked record), for HIE operators."""
    if not _ID.match(patient_id):
        raise BadRequest(f"patient {patient_id!r} is not a FHIR id")
    what = What(patients=(patient_id,), query=f"patient={patient_id}", resource="Consent")
    if principal.role != "operator":
        reason = "only HIE operators may list a patient's shares"
        _audit(services, "search", principal, address, what, None, allowed=False, reason=reason)
        raise Forbidden(reason)
    linked = services.patients.linked([patient_id])
    found = shares_of_patients(_repository(services), linked, now or datetime.now(UTC))
    _audit(
        services,
        "search",
        principal,
        address,
        dataclasses.replace(what, patients=tuple(linked)),
        None,
        allowed=True,
    )
    return found
