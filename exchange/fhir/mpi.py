"""Master patient index: one person, many sites' Patient records.

Sites publish patients under their own MRN systems. The hub links records of
the same person with ``Patient.link`` (type ``seealso``), a hub-managed
element that sites cannot set or remove:

- the same HIE-wide identifier (configured system) is a *certain* match and is
  linked at once;
- the same family and given names, birth date and gender is a *probable*
  match: it is held for an operator to confirm or reject, never linked
  automatically.

Searches by patient then expand to every linked record, so
``ImagingStudy?patient=X`` returns the studies every site holds for X.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine, UniqueConstraint
from sqlmodel import Field, Session, SQLModel, select

from exchange.errors import BadRequest, Gone, NotFound
from exchange.fhir import searchparams as sp
from exchange.fhir.repository import Repository
from exchange.fhir.search import Criterion, SearchQuery, parse
from exchange.migrations import ensure_schema

LINK_TYPE = "seealso"
MAX_LINKED = 50
Certainty = Literal["certain", "probable"]


class ReviewItem(SQLModel, table=True):
    """A probable match waiting for an operator (or decided by one)."""

    __tablename__ = "mpi_review"
    __table_args__ = (UniqueConstraint("first", "second"),)

    id: int | None = Field(default=None, primary_key=True)
    first: str = Field(max_length=64)
    second: str = Field(max_length=64)
    reason: str = Field(max_length=200)
    status: str = Field(default="pending", max_length=16)  # pending | linked | rejected
    created_at: datetime
    decided_at: datetime | None = None


@dataclass(frozen=True)
class Match:
    other: str
    certainty: Certainty
    reason: str


def _linked_ids(body: dict[str, Any]) -> list[str]:
    ids = []
    for link in body.get("link") or []:
        reference = str((link.get("other") or {}).get("reference", ""))
        if reference.startswith("Patient/"):
            ids.append(reference.removeprefix("Patient/"))
    return ids


def preserve_links(
    current: dict[str, Any] | None, body: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Write hook for Patient: ``link`` belongs to the hub, whatever a client sends."""
    if body is None:
        return None
    kept = dict(body)
    links = (current or {}).get("link")
    if links:
        kept["link"] = links
    else:
        kept.pop("link", None)
    return kept


class PatientIndex:
    def __init__(
        self,
        engine: Engine,
        repository: Repository,
        hie_system: str | None,
        local_base: str | None = None,
    ) -> None:
        self._engine = engine
        self._repository = repository
        self._hie_system = hie_system
        self._base = local_base
        ensure_schema(engine, "hub")

    # -- matching --------------------------------------------------------------
    def _ids(self, resource_type: str, items: list[tuple[str, str]]) -> list[str]:
        query = parse(resource_type, items, local_base=self._base)
        found: list[str] = []
        for batch in self._repository.candidate_batches(query, 200):
            found += [c.id for c in batch]
        return found

    def matches(self, rid: str, body: dict[str, Any]) -> list[Match]:
        found: dict[str, Match] = {}
        if self._hie_system:
            for identifier in body.get("identifier") or []:
                if identifier.get("system") == self._hie_system and identifier.get("value"):
                    token = f"{self._hie_system}|{identifier['value']}"
                    for other in self._ids("Patient", [("identifier", token)]):
                        found[other] = Match(other, "certain", "same HIE identifier")
        names = body.get("name") or []
        family = (names[0].get("family") if names else None) or None
        given = _given(names[0]) if names else ""
        birth, gender = body.get("birthDate"), body.get("gender")
        if family and given and birth and gender:
            items = [("family:exact", family), ("birthdate", birth), ("gender", gender)]
            for other in self._ids("Patient", items):
                if other in found:
                    continue
                candidate = self._repository.read("Patient", other).body
                other_names = candidate.get("name") or [{}]
                if _given(other_names[0]) == given:
                    found[other] = Match(other, "probable", "same name, birth date and gender")
        found.pop(rid, None)
        return list(found.values())

    def reconcile(self, rid: str) -> list[Match]:
        """After a Patient write: link certain matches, queue probable ones for review."""
        body = self._repository.read("Patient", rid).body
        matches = self.matches(rid, body)
        for match in matches:
            if match.certainty == "certain":
                self.link(rid, match.other)
            else:
                self._queue(rid, match.other, match.reason)
        return matches

    # -- operator actions --------------------------------------------------------
    def link(self, first: str, second: str) -> None:
        if first == second:
            raise BadRequest("a patient cannot be linked to itself")
        for rid, other in ((first, second), (second, first)):
            self._set_link(rid, other, present=True)
        self._decide(first, second, "linked")

    def unlink(self, first: str, second: str) -> None:
        for rid, other in ((first, second), (second, first)):
            self._set_link(rid, other, present=False)
        self._decide(first, second, "rejected")

    def _set_link(self, rid: str, other: str, *, present: bool) -> None:
        reference = f"Patient/{other}"
        current = self._repository.read("Patient", rid)  # NotFound / Gone for the caller

        def hook(
            existing: dict[str, Any] | None, body: dict[str, Any] | None
        ) -> dict[str, Any] | None:
            base = dict(existing or body or {})
            links = [
                link
                for link in base.get("link") or []
                if (link.get("other") or {}).get("reference") != reference
            ]
            if present:
                links.append({"other": {"reference": reference}, "type": LINK_TYPE})
            if links:
                base["link"] = links
            else:
                base.pop("link", None)
            return base

        self._repository.update("Patient", rid, dict(current.body), hook=hook)

    def _pair(self, first: str, second: str) -> tuple[str, str]:
        return (first, second) if first < second else (second, first)

    def _queue(self, first: str, second: str, reason: str) -> None:
        a, b = self._pair(first, second)
        with Session(self._engine) as session:
            existing = session.exec(
                select(ReviewItem).where(ReviewItem.first == a, ReviewItem.second == b)
            ).first()
            if existing is None:
                session.add(
                    ReviewItem(first=a, second=b, reason=reason, created_at=datetime.now(UTC))
                )
                session.commit()

    def _decide(self, first: str, second: str, status: str) -> None:
        a, b = self._pair(first, second)
        with Session(self._engine) as session:
            item = session.exec(
                select(ReviewItem).where(ReviewItem.first == a, ReviewItem.second == b)
            ).first()
            if item is not None:
                item.status = status
                item.decided_at = datetime.now(UTC)
                session.add(item)
                session.commit()

    def review(self, status: str = "pending") -> list[ReviewItem]:
        with Session(self._engine) as session:
            return list(session.exec(select(ReviewItem).where(ReviewItem.status == status)))

    # -- search expansion ---------------------------------------------------------
    def linked(self, rids: Iterable[str]) -> list[str]:
        """``rids`` and every record linked to them, transitively (bounded)."""
        seen: list[str] = []
        queue = list(rids)
        while queue and len(seen) < MAX_LINKED:
            rid = queue.pop(0)
            if rid in seen:
                continue
            seen.append(rid)
            try:
                body = self._repository.read("Patient", rid).body
            except (NotFound, Gone):
                continue
            queue += [other for other in _linked_ids(body) if other not in seen]
        return seen

    def expand(self, query: SearchQuery) -> SearchQuery:
        """Patient criteria of an ImagingStudy, Consent or AuditEvent search widened to linked
        records."""
        if query.resource_type not in ("ImagingStudy", "Consent", "AuditEvent"):
            return query
        criteria = []
        for criterion in query.criteria:
            if criterion.param.name in ("patient", "subject") and (
                criterion.chain is None or "Patient" in criterion.chain_types
            ):
                criterion = self._expanded(criterion)
            criteria.append(criterion)
        return dataclasses.replace(query, criteria=criteria)

    def _expanded(self, criterion: Criterion) -> Criterion:
        if criterion.modifier not in (None, "Patient"):
            return criterion
        if criterion.chain is not None:
            inner = dataclasses.replace(
                SearchQuery("Patient"), criteria=[criterion.chain], count=MAX_LINKED
            )
            direct = [
                c.id for batch in self._repository.candidate_batches(inner, 200) for c in batch
            ]
        else:
            direct = [
                v.id
                for v in criterion.values
                if isinstance(v, sp.RefValue) and v.type in (None, "Patient")
            ]
            if len(direct) != len(criterion.values):
                return criterion  # other target types or absolute URLs: leave as asked
        # Nobody: a reference no resource can have ("!" is not in FHIR ids; not NUL, which
        # PostgreSQL text refuses).
        everyone = self.linked(direct) or ["!no-such-patient"]
        return Criterion(
            criterion.param, None, tuple(sp.RefValue("Patient", rid) for rid in everyone)
        )


def _given(name: dict[str, Any]) -> str:
    """A HumanName's given names as one string; FHIR JSON may carry ``null`` for a name
    part that only has an extension (``_given``), which is no name to match on."""
    return " ".join(part for part in name.get("given") or [] if isinstance(part, str))
