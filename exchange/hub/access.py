"""Which stored resources a caller may see: the one hook every read, search and retrieval passes.

Searches call ``filter_visible`` on *candidates* (type, id and the facts kept with
each resource: an ImagingStudy's subject, identifiers, endpoints, date and
security labels) before anything is counted, paged or included, so a hidden
resource cannot show through ``total``, ``_include``, paging links or
``_summary=count``. Direct reads, version reads and history call
``require_visible``, which refuses with a 403 and the policy's plain reason.

Studies and audit records are decided per resource by the access policy
(``policies/exchange/access``), a page at a time in one engine call
(``decide_batch``); the policy is given the study's patient under every id the
master patient index links, the holding organisation (the managing organisation
of the study's DICOMweb Endpoint) and the patient's Consents. Directory
resources (Organization, Endpoint) and index administration types (Patient,
Consent) are decided by type alone, before this hook. Anything that cannot be
decided (policy engine down, consent registry unreachable) is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from exchange import metrics
from exchange.errors import ExchangeError, Forbidden, Gone, NotFound
from exchange.policy.decisions import (
    Action,
    Decision,
    DecisionInput,
    ResourceFacts,
    Subject,
    decide_batch,
)
from exchange.security.tokens import Principal

if TYPE_CHECKING:
    from exchange.hub.services import HubServices

log = logging.getLogger(__name__)

#: The header carrying the reason stated for break-the-glass access (purpose ETREAT).
BREAK_GLASS_HEADER = "X-Break-Glass-Reason"
DICOM_UID_SYSTEM = "urn:dicom:uid"
NODE_IDENTIFIER_SYSTEM = "urn:exchange:node"
#: Resource types decided per resource by the access policy.
DECIDED = frozenset({"ImagingStudy", "AuditEvent"})


class Visible(Protocol):
    """What the hook is given: the resource's identity and its access facts."""

    @property
    def resource_type(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def facts(self) -> Mapping[str, Sequence[str]]: ...


T = TypeVar("T", bound=Visible)


def subject_of(principal: Principal, reason: str | None = None) -> Subject:
    """The policy's view of the caller; ``reason`` is a stated break-the-glass reason."""
    claimed = principal.claims.get("break_glass_reason")
    stated = reason if reason and reason.strip() else claimed
    studies = principal.claims.get("studies")
    return Subject(
        id=principal.sub,
        role=principal.role,
        organization=principal.organization,
        purpose_of_use=principal.purpose_of_use,
        patient=principal.patient,
        reason=str(stated).strip() if stated else None,
        studies=tuple(str(s) for s in studies) if isinstance(studies, list) else None,
    )


def _ids(values: Sequence[str], kind: str) -> list[str]:
    prefix = f"{kind}/"
    return [v.removeprefix(prefix) for v in values if v.startswith(prefix)]


def code_of(values: Sequence[str], system: str) -> str | None:
    for value in values:
        found_system, _, code = value.partition("|")
        if found_system == system and code:
            return code
    return None


@dataclass(frozen=True)
class Holder:
    """Where a study is held: the site's Endpoint as the index knows it."""

    endpoint: str
    organization: str | None
    node: str
    address: str | None


def holder_of(body: Mapping[str, Any], endpoint_id: str) -> Holder:
    """A DICOMweb Endpoint as a holder: its managing organisation, node id and address."""
    org = str((body.get("managingOrganization") or {}).get("reference", ""))
    node = endpoint_id
    for identifier in body.get("identifier") or []:
        if isinstance(identifier, Mapping) and identifier.get("system") == NODE_IDENTIFIER_SYSTEM:
            node = str(identifier.get("value") or endpoint_id)
    address = body.get("address")
    return Holder(
        endpoint=endpoint_id,
        organization=org.removeprefix("Organization/") if org.startswith("Organization/") else None,
        node=node,
        address=str(address) if isinstance(address, str) else None,
    )


class FactsCache:
    """Sites' Endpoints and the MPI's patient links, kept a few seconds across requests.

    Both change rarely and are read on every decision; a write through this hub clears
    the cache at once, and ``ttl`` bounds how long another hub process's change can go
    unseen. Consents are never cached here: a patient's new refusal counts at once.
    """

    def __init__(self, ttl: float = 10.0, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._lock = threading.Lock()
        self._holders: dict[str, tuple[float, Holder | None]] = {}
        self._linked: dict[str, tuple[float, tuple[str, ...]]] = {}

    def clear(self) -> None:
        with self._lock:
            self._holders.clear()
            self._linked.clear()

    def _get(self, table: dict[str, tuple[float, Any]], key: str) -> tuple[bool, Any]:
        found = table.get(key)
        if found is None or found[0] < time.monotonic():
            return False, None
        return True, found[1]

    def _put(self, table: dict[str, tuple[float, Any]], key: str, value: Any) -> None:
        with self._lock:
            if len(table) >= self._size:
                table.clear()  # crude but bounded; refilled from the index on demand
            table[key] = (time.monotonic() + self._ttl, value)

    def holder(self, services: HubServices, endpoint_id: str) -> Holder | None:
        hit, value = self._get(self._holders, endpoint_id)
        if hit:
            return cast(Holder | None, value)
        try:
            found: Holder | None = holder_of(
                services.resources.read("Endpoint", endpoint_id).body, endpoint_id
            )
        except (NotFound, Gone):
            found = None
        self._put(self._holders, endpoint_id, found)
        return found

    def linked(self, services: HubServices, patient_id: str) -> tuple[str, ...]:
        hit, value = self._get(self._linked, patient_id)
        if hit:
            return cast(tuple[str, ...], value)
        found = tuple(services.patients.linked([patient_id]))
        self._put(self._linked, patient_id, found)
        return found


def _patients(services: HubServices, direct: Sequence[str]) -> tuple[str, ...]:
    """``direct`` and every Patient id the master patient index links to them."""
    everyone: list[str] = []
    for rid in direct:
        everyone += [p for p in services.facts.linked(services, rid) if p not in everyone]
    return tuple(everyone)


def _study_facts(services: HubServices, item: Visible) -> ResourceFacts:
    facts = item.facts
    endpoints = _ids(facts.get("endpoint", ()), "Endpoint")
    holders = [services.facts.holder(services, e) for e in endpoints]
    custodians = {h.organization for h in holders if h is not None and h.organization}
    return ResourceFacts(
        study=item.id,
        # A study held by no known site, or claimed by two, has no custodian to grant it.
        custodian=custodians.pop() if len(custodians) == 1 else None,
        patients=_patients(services, _ids(facts.get("patient", ()), "Patient")),
        uid=code_of(facts.get("identifier", ()), DICOM_UID_SYSTEM),
        security_labels=tuple(v.partition("|")[2] for v in facts.get("_security", ())),
        date=next(iter(facts.get("started", ())), None),
    )


def _audit_facts(services: HubServices, item: Visible) -> ResourceFacts:
    facts = item.facts
    studies = _ids(facts.get("entity", ()), "ImagingStudy")
    return ResourceFacts(
        type="AuditEvent",
        study=studies[0] if studies else "",
        custodian=None,
        patients=_patients(services, _ids(facts.get("patient", ()), "Patient")),
    )


def resource_facts(services: HubServices, item: Visible) -> ResourceFacts:
    if item.resource_type == "AuditEvent":
        return _audit_facts(services, item)
    return _study_facts(services, item)


def _undecidable(exc: ExchangeError) -> Decision:
    return Decision(False, (f"access cannot be decided now ({exc.message}), so it is refused",))


def _consents(services: HubServices, facts: Sequence[ResourceFacts]) -> list[dict[str, Any]]:
    patients = list(dict.fromkeys(p for f in facts for p in f.patients))
    return services.consents.consents_for(patients) if patients else []


def _about(consent: Mapping[str, Any]) -> str:
    reference = str((consent.get("patient") or {}).get("reference", ""))
    return reference.rsplit("/", 1)[-1]


def decide(
    services: HubServices,
    principal: Principal,
    action: Action,
    items: Sequence[Visible],
    reason: str | None = None,
) -> list[Decision]:
    """One decision per item, in one engine call. Never raises: failure is a refusal."""
    if not items:
        return []
    subject = subject_of(principal, reason)
    try:
        facts = [resource_facts(services, item) for item in items]
        consents = _consents(services, facts)
    except ExchangeError as exc:
        metrics.count_decisions(action, 0, len(items))
        return [_undecidable(exc) for _ in items]
    by_patient: dict[str, list[Mapping[str, Any]]] = {}
    for consent in consents:
        by_patient.setdefault(_about(consent), []).append(consent)
    questions = []
    for fact in facts:
        mine = [c for p in fact.patients for c in by_patient.get(p, ())]
        unique = list({id(c): c for c in mine}.values())
        # An audit record is read under the audit rule whatever the interaction.
        asked: Action = "read-audit" if fact.type == "AuditEvent" else action
        questions.append(DecisionInput(subject, asked, fact, tuple(unique)))
    verdicts = decide_batch(services.policy, questions)
    allowed = sum(1 for verdict in verdicts if verdict.allow)
    metrics.count_decisions(action, allowed, len(verdicts) - allowed)
    return verdicts


def filter_visible(
    services: HubServices,
    principal: Principal,
    items: Sequence[T],
    action: Action = "search",
    reason: str | None = None,
) -> list[T]:
    """The items ``principal`` may see, in their original order (one decision round for a
    whole page of candidates). Types not decided per resource pass through."""
    decided = [item for item in items if item.resource_type in DECIDED]
    if not decided:
        return list(items)
    verdicts = decide(services, principal, action, decided, reason)
    refused = {id(item) for item, d in zip(decided, verdicts, strict=True) if not d.allow}
    return [item for item in items if id(item) not in refused]


def require_visible(
    services: HubServices,
    principal: Principal,
    item: Visible,
    action: Action = "read",
    reason: str | None = None,
) -> Decision | None:
    """403 with the policy's reason unless ``principal`` may see ``item``; the decision
    (None for types decided by type alone)."""
    if item.resource_type not in DECIDED:
        return None
    decision = decide(services, principal, action, [item], reason)[0]
    if not decision.allow:
        raise Forbidden(decision.reason())
    return decision


def decide_study(
    services: HubServices,
    principal: Principal,
    action: Action,
    study: Visible,
    reason: str | None = None,
) -> Decision:
    """The decision for one indexed ImagingStudy (the broker's question)."""
    return decide(services, principal, action, [study], reason)[0]


def decide_with(
    services: HubServices,
    principal: Principal,
    action: str,
    item: Visible,
    extra: Mapping[str, Any],
) -> Decision:
    """One decision about ``item`` given more than its facts: ``extra`` is added to the
    policy input (``share``: the provider-share Consent a ``revoke-share`` would end).
    Never raises: failure is a refusal."""
    try:
        fact = resource_facts(services, item)
        consents = _consents(services, [fact])
    except ExchangeError as exc:
        metrics.count_decisions(action, 0, 1)
        return _undecidable(exc)
    question = DecisionInput(subject_of(principal), action, fact, tuple(consents))
    decision = decide_batch(services.policy, [{**question.as_input(), **extra}])[0]
    metrics.count_decisions(action, int(decision.allow), int(not decision.allow))
    return decision


def study_patients(services: HubServices, study: Visible) -> tuple[str, ...]:
    """Every Patient id the study's patient is known by (for the audit)."""
    return _patients(services, _ids(study.facts.get("patient", ()), "Patient"))


def holder(services: HubServices, study: Visible) -> Holder | None:
    """The site holding ``study`` (its first DICOMweb Endpoint the index knows)."""
    for endpoint in _ids(study.facts.get("endpoint", ()), "Endpoint"):
        found = services.facts.holder(services, endpoint)
        if found is not None:
            return found
    return None


def broker_view(body: dict[str, Any], broker: str) -> dict[str, Any]:
    """An Endpoint as callers see it: a DICOMweb address is the hub's broker, never a node."""
    if body.get("resourceType") != "Endpoint" or "address" not in body:
        return body
    connection = body.get("connectionType")
    code = connection.get("code") if isinstance(connection, Mapping) else None
    if code not in ("dicom-wado-rs", "dicom-qido-rs", "dicom-stow-rs"):
        return body
    return {**body, "address": broker}
