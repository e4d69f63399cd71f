"""Ask the policy a question built from plain values; get allow + plain-words reasons."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exchange.policy.engine import PolicyEngine


@dataclass(frozen=True)
class Subject:
    id: str
    role: str
    organization: str | None
    purpose_of_use: tuple[str, ...] = ()
    patient: str | None = None

    def as_input(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "organization": self.organization,
            "purpose_of_use": list(self.purpose_of_use),
            "patient": self.patient,
        }


@dataclass(frozen=True)
class Decision:
    allow: bool
    reasons: tuple[str, ...]

    def reason(self) -> str:
        return "; ".join(self.reasons) or "the policy does not allow this"


def _decide(engine: PolicyEngine, package: str, input_: dict[str, Any]) -> Decision:
    allow = engine.evaluate(f"data.{package}.allow", input_) is True
    reasons: Iterable[Any] = () if allow else engine.evaluate(f"data.{package}.reasons", input_)
    return Decision(allow, tuple(sorted(str(r) for r in reasons)))


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
