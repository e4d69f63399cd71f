"""The hub's side of the audit trail: who asked, about what, and what was decided.

Routes call ``record`` (in a worker thread) *before* they send any data: if the
AuditEvent cannot be written, ``AuditLog.record`` raises ``Unavailable`` and the
request is answered 503 with nothing of what was asked for ("no audit, no access").
Refusals are recorded the same way, just before the 403 goes out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from exchange.audit.events import AuditAction, Interaction, What, Who, build
from exchange.hub import access
from exchange.policy.decisions import Decision
from exchange.security.tokens import Principal

if TYPE_CHECKING:
    from exchange.hub.services import HubServices

BREAK_GLASS_HEADER = access.BREAK_GLASS_HEADER
#: Patients named in one search's AuditEvent at most (a search over many patients is
#: still one event; the query itself is recorded whole).
MAX_PATIENTS = 100
EMERGENCY = "audit-emergency-access"


def who(principal: Principal | None, address: str | None, reason: str | None = None) -> Who:
    if principal is None:
        return Who(user="anonymous", role="unknown", organization=None, address=address)
    client = principal.claims.get("azp") or principal.claims.get("client_id")
    stated = access.subject_of(principal, reason).reason
    return Who(
        user=principal.sub,
        role=principal.role,
        organization=principal.organization,
        purpose_of_use=principal.purpose_of_use,
        patient=principal.patient,
        client=str(client) if client else None,
        address=address,
        reason=stated,
    )


def study_what(
    study: access.Visible, query: str | None = None, services: HubServices | None = None
) -> What:
    """A study as the audit names it: its id, DICOM UID and every id of its patient."""
    facts = study.facts
    if services is not None:
        patients = access.study_patients(services, study)
    else:
        patients = tuple(
            p.removeprefix("Patient/") for p in facts.get("patient", ()) if p.startswith("Patient/")
        )
    uid = access.code_of(facts.get("identifier", ()), access.DICOM_UID_SYSTEM)
    return What(
        patients=patients,
        study=study.id,
        study_uid=uid.removeprefix("urn:oid:") if uid else None,
        query=query,
    )


def patients_of(items: Iterable[access.Visible]) -> tuple[str, ...]:
    """The patients a page of results is about (for a search's AuditEvent)."""
    found: list[str] = []
    for item in items:
        refs = item.facts.get("patient", ())
        if item.resource_type == "Patient":
            refs = [f"Patient/{item.id}"]
        for ref in refs:
            rid = ref.removeprefix("Patient/")
            if ref.startswith("Patient/") and rid not in found:
                found.append(rid)
        if len(found) >= MAX_PATIENTS:
            break
    return tuple(found[:MAX_PATIENTS])


def _emergency(decision: Decision | None) -> bool:
    return decision is not None and any(o.get("code") == EMERGENCY for o in decision.obligations)


def record(
    services: HubServices,
    *,
    action: AuditAction,
    principal: Principal | None,
    address: str | None,
    what: What,
    decision: Decision | None,
    allowed: bool,
    reason: str | None = None,
    break_glass_reason: str | None = None,
    error: bool = False,
    interaction: Interaction | None = None,
) -> str:
    """Write the request's AuditEvent durably; raises ``Unavailable`` when it cannot.
    ``error``: the request was allowed but failed (a site down); ``interaction``: what a
    write did. A request about several people (a search whose results span patients) is
    recorded as one AuditEvent per person, all in one transaction, so that what a patient
    reads about themselves never names anyone else. Returns the first event's id."""
    events = [
        build(
            action=action,
            who=who(principal, address, break_glass_reason),
            what=part,
            allowed=allowed,
            observer=services.settings.base_url(),
            decision=decision,
            reason=reason if reason is not None else (decision.reason() if decision else None),
            emergency=allowed and _emergency(decision),
            error=error,
            interaction=interaction,
        )
        for part in _per_person(services, what)
    ]
    if len(events) == 1:
        return services.audit.record(events[0])
    return services.audit.record_many(events)[0]


def _per_person(services: HubServices, what: What) -> list[What]:
    """``what`` split by person: the ids the master patient index links stay together."""
    if len(what.patients) <= 1:
        return [what]
    people: list[list[str]] = []
    placed: dict[str, int] = {}
    for pid in what.patients:
        if pid in placed:
            continue
        group = [pid, *(p for p in services.facts.linked(services, pid) if p in what.patients)]
        index = len(people)
        people.append([])
        for member in group:
            if member not in placed:
                placed[member] = index
                people[index].append(member)
    if len(people) == 1:
        return [what]
    return [dataclasses.replace(what, patients=tuple(group)) for group in people]
