"""FHIR R4 ``AuditEvent`` resources in IHE Basic Audit Log Patterns (BALP) shapes.

``build`` turns plain facts (who, what, the decision, the outcome) into one
AuditEvent as JSON; ``AuditLog`` stores it. Only ids go in: names and other
demographics never do, so an audit record discloses no more than the request did.

How each action is coded (``type`` / ``subtype`` / ``action``)::

    action          type                          subtype                          action
    search          rest "RESTful Operation"      search-type (restful-interaction) E
    read            rest                          read                              R
    view            DCM 110103 "DICOM Instances   DCM 110103 (BALP image access)    R
                    Accessed"
    export          DCM 110106 "Export"           DCM 110106                        R
    consent-change  rest                          create | update | delete          C | U | D
    share           rest                          create                            C
    revoke          rest                          update                            U
    login-failure   DCM 110114 "User              DCM 110122 "Login"                E
                    Authentication"
    publish         rest                          update (conditional update)       U
    retract         rest                          delete                            D
    access-code-    rest                          create                            C
      issue         (a patient access code issued after identity verification)
    access-code-    DCM 110114 "User              DCM 110122 "Login"                E
      redeem        Authentication"               (a code exchanged for a patient session)
    access-code-    DCM 110114                    DCM 110122                        E
      lockout       (a code locked after too many wrong attempts; outcome 4)
    access-code-    rest                          update                            U
      revoke

Every event also carries a subtype from our own code system
(``AUDIT_SYSTEM|<action>``) so ``AuditEvent?subtype=AUDIT_SYSTEM|view`` finds one
kind of event whatever its standard coding; break-the-glass adds
``AUDIT_SYSTEM|emergency-access``.

``outcome``: ``0`` success, ``4`` a refusal (minor failure: the system did its
job and said no), ``8`` an error (serious failure: the policy engine, a node or
the database failed). ``outcomeDesc`` is the reason in plain words.

Agents: the user (requestor, ``who.identifier`` = token ``sub``; a patient acting
for themselves also ``who.reference`` = their Patient), their organisation, the
OAuth client app, and the hub (``source.observer``). Entities: the patients
(``what`` = Patient, type 1 Person, role 1 Patient), the study (``what`` =
ImagingStudy plus its ``urn:dicom:uid``, type 2 System Object, role 3 Report),
another resource (role 4 Domain Resource), the query (base64, role 24 Query) and
the access decision (role 13 Security Resource) whose ``detail`` holds
``policy-version``, ``decision-id``, ``input-digest`` and ``break-glass-reason``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from exchange.policy.decisions import Decision

AuditAction = Literal[
    "search",
    "read",
    "view",
    "export",
    "consent-change",
    "share",
    "revoke",
    "login-failure",
    "publish",
    "retract",
    "access-code-issue",
    "access-code-redeem",
    "access-code-lockout",
    "access-code-revoke",
]
AUDIT_ACTIONS: tuple[AuditAction, ...] = get_args(AuditAction)

Interaction = Literal["create", "update", "delete"]

#: Our own codes: one per action, plus ``emergency-access``.
AUDIT_SYSTEM = "https://exchange.example.org/fhir/CodeSystem/audit"
ROLE_SYSTEM = "https://exchange.example.org/fhir/CodeSystem/role"
DECISION_SYSTEM = "https://exchange.example.org/fhir/NamingSystem/decision-id"
EMERGENCY = "emergency-access"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
URI = "urn:ietf:rfc:3986"
DICOM_UID = "urn:dicom:uid"

OUTCOME_SUCCESS, OUTCOME_REFUSED, OUTCOME_ERROR = "0", "4", "8"

_PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "HPAYMT": "healthcare payment",
    "HOPERAT": "healthcare operations",
    "PATRQT": "patient requested",
    "PUBHLTH": "public health",
    "HRESCH": "healthcare research",
    "CAREMGT": "care management",
    "HSYSADMIN": "health system administration",
}


@dataclass(frozen=True)
class Who:
    """The caller, from its validated token (ids only)."""

    user: str
    role: str
    organization: str | None
    purpose_of_use: tuple[str, ...] = ()
    patient: str | None = None
    client: str | None = None
    address: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class What:
    """What the event concerns (plain ids; ``resource`` as ``Type/id``)."""

    patients: tuple[str, ...] = ()
    study: str | None = None
    study_uid: str | None = None
    resource: str | None = None
    query: str | None = None


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


_REST = _coding(EVENT_TYPE, "rest", "RESTful Operation")
_INTERACTION_ACTION = {"create": "C", "update": "U", "delete": "D"}

#: action -> (type, standard subtypes, AuditEvent.action)
_CODES: dict[str, tuple[dict[str, Any], list[dict[str, Any]], str]] = {
    "search": (_REST, [_coding(RESTFUL, "search-type", "search type")], "E"),
    "read": (_REST, [_coding(RESTFUL, "read", "read")], "R"),
    "view": (
        _coding(DCM, "110103", "DICOM Instances Accessed"),
        [_coding(DCM, "110103", "DICOM Instances Accessed")],
        "R",
    ),
    "export": (_coding(DCM, "110106", "Export"), [_coding(DCM, "110106", "Export")], "R"),
    "share": (_REST, [_coding(RESTFUL, "create", "create")], "C"),
    "revoke": (_REST, [_coding(RESTFUL, "update", "update")], "U"),
    "login-failure": (
        _coding(DCM, "110114", "User Authentication"),
        [_coding(DCM, "110122", "Login")],
        "E",
    ),
    "publish": (_REST, [_coding(RESTFUL, "update", "update")], "U"),
    "retract": (_REST, [_coding(RESTFUL, "delete", "delete")], "D"),
    "access-code-issue": (_REST, [_coding(RESTFUL, "create", "create")], "C"),
    "access-code-redeem": (
        _coding(DCM, "110114", "User Authentication"),
        [_coding(DCM, "110122", "Login")],
        "E",
    ),
    "access-code-lockout": (
        _coding(DCM, "110114", "User Authentication"),
        [_coding(DCM, "110122", "Login")],
        "E",
    ),
    "access-code-revoke": (_REST, [_coding(RESTFUL, "update", "update")], "U"),
}


def _plain(value: str, kind: str) -> str:
    """``Organization/x`` (or a URL ending so) -> ``x``; a bare id stays."""
    parts = value.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind else value


def _instant(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _purpose(code: str) -> dict[str, Any]:
    return _concept(ACT_REASON, code, _PURPOSES.get(code))


def _agents(
    who: Who, observer: str, purposes: list[dict[str, Any]], about: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    user_who: dict[str, Any] = {"identifier": {"value": who.user}}
    # A patient acting on their own records is named as that Patient; acting on anyone
    # else's (a refused attempt), only by the user id, so that the event is not among the
    # disclosures that patient reads about themselves with another patient's id in it.
    if who.role == "patient" and who.patient:
        own = _plain(who.patient, "Patient")
        if not about or own in {_plain(p, "Patient") for p in about}:
            user_who["reference"] = f"Patient/{own}"
    user: dict[str, Any] = {
        "type": _concept(PARTICIPATION, "IRCP", "information recipient"),
        "role": [_concept(ROLE_SYSTEM, who.role or "unknown")],
        "who": user_who,
        "requestor": True,
    }
    if purposes:
        user["purposeOfUse"] = purposes
    agents: list[dict[str, Any]] = [user]
    if who.organization:
        agents.append(
            {
                "type": _concept(PARTICIPATION, "RESP", "responsible party"),
                "who": {"reference": f"Organization/{_plain(who.organization, 'Organization')}"},
                "requestor": False,
            }
        )
    network = {"address": who.address, "type": "2"} if who.address else None
    if who.client:
        client: dict[str, Any] = {
            "type": _concept(DCM, "110153", "Source Role ID"),
            "who": {
                "identifier": {"system": "urn:ietf:params:oauth:client-id", "value": who.client}
            },
            "requestor": False,
        }
        if network:
            client["network"] = network
        agents.append(client)
    elif network:
        user["network"] = network
    agents.append(
        {
            "type": _concept(DCM, "110152", "Destination Role ID"),
            "who": {"identifier": {"system": URI, "value": observer}, "display": observer},
            "requestor": False,
        }
    )
    return agents


def _entity(type_code: str, type_display: str, role: str, role_display: str) -> dict[str, Any]:
    return {
        "type": _coding(ENTITY_TYPE, type_code, type_display),
        "role": _coding(OBJECT_ROLE, role, role_display),
    }


def _detail(kind: str, value: str) -> dict[str, Any]:
    return {"type": kind, "valueString": value}


def _entities(
    what: What, decision: Decision | None, emergency: bool, stated: str | None
) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    patients = list(dict.fromkeys(_plain(p, "Patient") for p in what.patients))
    resource = what.resource
    if resource and resource.startswith("Patient/"):
        patient = _plain(resource, "Patient")
        if patient not in patients:
            patients.append(patient)
        resource = None
    for patient in patients:
        entities.append(
            {"what": {"reference": f"Patient/{patient}"}, **_entity("1", "Person", "1", "Patient")}
        )
    if what.study or what.study_uid:
        study: dict[str, Any] = {}
        if what.study:
            study["reference"] = f"ImagingStudy/{_plain(what.study, 'ImagingStudy')}"
        if what.study_uid:
            study["identifier"] = {
                "system": DICOM_UID,
                "value": f"urn:oid:{what.study_uid.removeprefix('urn:oid:')}",
            }
        entities.append({"what": study, **_entity("2", "System Object", "3", "Report")})
    if resource:
        entities.append(
            {
                "what": {"reference": resource},
                **_entity("2", "System Object", "4", "Domain Resource"),
            }
        )
    if what.query is not None:
        encoded = base64.b64encode(what.query.encode()).decode("ascii")
        entities.append({"query": encoded, **_entity("2", "System Object", "24", "Query")})
    details: list[dict[str, Any]] = []
    if decision is not None:
        details += [
            _detail("policy-version", decision.policy_version),
            _detail("decision-id", decision.decision_id),
        ]
        if decision.input_digest:
            details.append(_detail("input-digest", decision.input_digest))
        details += [
            _detail("obligation", str(o.get("code"))) for o in decision.obligations if o.get("code")
        ]
    if emergency:
        details.append(_detail("break-glass-reason", stated or "no reason stated"))
    if details:
        entity: dict[str, Any] = {
            **_entity("2", "System Object", "13", "Security Resource"),
            "description": "access decision",
            "detail": details,
        }
        if decision is not None:
            entity["what"] = {
                "identifier": {"system": DECISION_SYSTEM, "value": decision.decision_id}
            }
        entities.append(entity)
    return entities


def build(
    *,
    action: AuditAction,
    who: Who,
    what: What,
    allowed: bool,
    observer: str,
    decision: Decision | None = None,
    reason: str | None = None,
    emergency: bool = False,
    when: datetime | None = None,
    error: bool = False,
    interaction: Interaction | None = None,
) -> dict[str, Any]:
    """One AuditEvent (without id or meta: the log assigns them).

    ``allowed`` False is a refusal (outcome 4); ``error`` True a failure of the
    system (outcome 8) whatever ``allowed`` says. ``interaction`` says which
    write a ``consent-change`` was (default ``update``). ``reason`` defaults to
    the decision's reasons.
    """
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if action == "consent-change":
        done = interaction or "update"
        type_, subtypes, code = _REST, [_coding(RESTFUL, done, done)], _INTERACTION_ACTION[done]
    else:
        type_, subtypes, code = _CODES[action]
    subtypes = [*subtypes, _coding(AUDIT_SYSTEM, action)]
    purposes = list(dict.fromkeys(who.purpose_of_use))
    if emergency:
        subtypes.append(_coding(AUDIT_SYSTEM, EMERGENCY, "emergency access (break-the-glass)"))
        if "ETREAT" not in purposes:
            purposes.append("ETREAT")
    outcome = OUTCOME_ERROR if error else OUTCOME_SUCCESS if allowed else OUTCOME_REFUSED
    described = reason
    if described is None and decision is not None and decision.reasons:
        described = "; ".join(decision.reasons)
    purpose_concepts = [_purpose(p) for p in purposes]
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": type_,
        "subtype": subtypes,
        "action": code,
        "recorded": _instant(when),
        "outcome": outcome,
    }
    if described:
        event["outcomeDesc"] = described
    if purpose_concepts:
        event["purposeOfEvent"] = purpose_concepts
    event["agent"] = _agents(who, observer, purpose_concepts, what.patients)
    event["source"] = {
        "observer": {"identifier": {"system": URI, "value": observer}, "display": observer},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }
    entities = _entities(what, decision, emergency, who.reason)
    if entities:
        event["entity"] = entities
    return event
