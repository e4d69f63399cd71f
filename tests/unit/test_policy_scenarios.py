"""The access policy as a table: callers x consents x actions x purposes x labels x dates.

Every row runs on both engines: embedded (regorus in process) and the OPA server
path (ServerEngine through opa-python-client, over real HTTP to a minimal OPA
Data API on loopback), and must give the same decision and reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from exchange.policy.decisions import (
    DecisionInput,
    ResourceFacts,
    Subject,
    decide,
    decide_batch,
)
from exchange.policy.engine import EmbeddedEngine, PolicyEngine, ServerEngine
from tests.opa_stub import OpaStub

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
NOW = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
ROLE_SYSTEM = "https://exchange.example.org/fhir/CodeSystem/exchange-role"
EXPORT = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "use"},
        {"system": "https://exchange.example.org/fhir/CodeSystem/consent-action", "code": "export"},
    ]
}


# -- callers ------------------------------------------------------------------------------


def clinician(org: str, *purposes: str, sub: str = "", reason: str | None = None) -> Subject:
    return Subject(sub or f"dr-{org}", "clinician", org, purposes, reason=reason)


CLIN_A = clinician("site-a", "TREAT")
CLIN_B = clinician("site-b", "TREAT")
CLIN_C = clinician("site-c", "TREAT")
DR_BO = clinician("site-b", "TREAT", sub="dr-bo")
PAYER_B = clinician("site-b", "HPAYMT")
SILENT_B = clinician("site-b")
EMERGENCY_B = clinician("site-b", "ETREAT", reason="unconscious after a fall, CT needed now")
EMERGENCY_NO_REASON = clinician("site-b", "ETREAT", reason="  ")
SYSTEM_B = Subject("site-b", "system", "site-b", ("TREAT",))
OPERATOR = Subject("op-olu", "operator", "hie", ("HOPERAT",))
OPERATOR_ETREAT = Subject("op-olu", "operator", "hie", ("ETREAT",), reason="test")
PATIENT_P1 = Subject("pat-1", "patient", None, patient="hie-1")
PATIENT_P2 = Subject("pat-2", "patient", None, patient="p2")


# -- consents (FHIR R4 Consent, IHE PCF) ---------------------------------------------------


def consent(provision: dict[str, Any], patient: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": {"text": "exchange"},
        "provision": provision,
        **extra,
    }


def actor(reference: str) -> dict[str, Any]:
    return {"reference": {"reference": reference}}


def action(code: str) -> dict[str, Any]:
    system = "http://terminology.hl7.org/CodeSystem/consentaction"
    return {"coding": [{"system": system, "code": code}]}


def labels(*codes: str) -> list[dict[str, str]]:
    return [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": c} for c in codes
    ]


def purposes(*codes: str) -> list[dict[str, str]]:
    return [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": c} for c in codes
    ]


OPT_OUT = consent({"type": "deny"})
PERMIT_B = consent({"type": "permit", "actor": [actor("Organization/site-b")]})
PERMIT_B_VIEW = consent(
    {"type": "permit", "actor": [actor("Organization/site-b")], "action": [action("access")]}
)
PERMIT_B_EXPORT = consent(
    {"type": "permit", "actor": [actor("Organization/site-b")], "action": [EXPORT]}
)
PERMIT_B_PSY = consent(
    {"type": "permit", "actor": [actor("Organization/site-b")], "securityLabel": labels("PSY")}
)
PERMIT_B_TREAT = consent(
    {"type": "permit", "actor": [actor("Organization/site-b")], "purpose": purposes("TREAT")}
)
DENY_B = consent({"type": "deny", "actor": [actor("Organization/site-b")]})
DENY_DR_BO = consent({"type": "deny", "actor": [actor("Practitioner/dr-bo")]})
DENY_TREAT = consent({"type": "deny", "purpose": purposes("TREAT")})
DENY_MARKETING = consent({"type": "deny", "purpose": purposes("HMARKT")})
OPT_OUT_EXCEPT_B = consent(
    {"type": "deny", "provision": [{"type": "permit", "actor": [actor("Organization/site-b")]}]}
)
PERMIT_B_EXCEPT_R = consent(
    {
        "type": "permit",
        "actor": [actor("Organization/site-b")],
        "provision": [{"type": "deny", "securityLabel": labels("R")}],
    }
)
PERMIT_B_2025 = consent(
    {
        "type": "permit",
        "actor": [actor("Organization/site-b")],
        "period": {"start": "2025-01-01", "end": "2025-12-31"},
    }
)
PERMIT_B_FROM_JULY = consent(
    {"type": "permit", "actor": [actor("Organization/site-b")], "period": {"start": "2026-07-01"}}
)
PERMIT_B_OLD_DATA = consent(
    {
        "type": "permit",
        "actor": [actor("Organization/site-b")],
        "dataPeriod": {"end": "2025-12-31"},
    }
)
PERMIT_CLINICIANS = consent(
    {
        "type": "permit",
        "actor": [
            {
                "role": {"coding": [{"system": ROLE_SYSTEM, "code": "clinician"}]},
                "reference": {"identifier": {"system": ROLE_SYSTEM, "value": "clinician"}},
            }
        ],
    }
)
OPT_OUT_INACTIVE = {**OPT_OUT, "status": "inactive"}
OPT_OUT_OTHER_PATIENT = consent({"type": "deny"}, patient="p2")
OPT_OUT_LINKED_ID = consent({"type": "deny"}, patient="hie-1")
PERMIT_THIS_STUDY = consent(
    {
        "type": "permit",
        "actor": [actor("Organization/site-b")],
        "data": [{"meaning": "instance", "reference": {"reference": "ImagingStudy/s1"}}],
    }
)
PERMIT_OTHER_STUDY = consent(
    {
        "type": "permit",
        "actor": [actor("Organization/site-b")],
        "data": [{"meaning": "instance", "reference": {"reference": "ImagingStudy/s9"}}],
    }
)
SHARE_WITH_C = consent(
    {
        "type": "permit",
        "actor": [actor("Practitioner/dr-site-c")],
        "action": [action("access")],
        "purpose": purposes("TREAT"),
        "period": {"start": "2026-05-20T09:00:00Z", "end": "2026-06-19T09:00:00Z"},
        "data": [{"meaning": "instance", "reference": {"reference": "ImagingStudy/s1"}}],
    },
    policy=[{"uri": "urn:exchange:policy:provider-share"}],
    performer=[{"reference": "Practitioner/dr-site-b"}],
)


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    caller: Subject
    action: str
    consents: tuple[dict[str, Any], ...]
    allow: bool
    reason: str
    labels: tuple[str, ...] = ()
    date: str = "20260310"
    obligations: tuple[str, ...] = field(default=())

    def question(self) -> DecisionInput:
        study = ResourceFacts(
            study="s1",
            uid="1.2.826.0.1.3680043.10.1386.1.1",
            custodian="site-a",
            patients=("p1", "hie-1"),
            security_labels=self.labels,
            date=self.date,
        )
        return DecisionInput(self.caller, self.action, study, self.consents, NOW)


SHARED = "the exchange shares images for treatment unless the patient has opted out"
CONSENTED = "the patient's consent permits this"
OWN = "staff of the organisation that holds a study may always see it"
OPTED_OUT = "the patient has opted out of sharing their images"
NEEDS_EXPORT = "downloading the original images needs the patient's explicit permission"
SENSITIVE = "the study holds sensitive information that needs the patient's explicit consent"
EMERGENCY = "emergency (break-the-glass) access"

ROWS = [
    Row("own-site-views-despite-opt-out", CLIN_A, "view", (OPT_OUT,), True, OWN),
    Row("own-site-exports", CLIN_A, "export", (), True, OWN),
    Row("own-site-sensitive", CLIN_A, "view", (), True, OWN, labels=("PSY", "HIV")),
    Row("opt-out-hie-treatment-view", CLIN_B, "view", (), True, SHARED),
    Row("opt-out-hie-treatment-search", CLIN_B, "search", (), True, SHARED),
    Row("opt-out-hie-treatment-read", CLIN_B, "read", (), True, SHARED),
    Row("patient-opted-out", CLIN_B, "view", (OPT_OUT,), False, OPTED_OUT),
    Row("patient-opted-out-search", CLIN_B, "search", (OPT_OUT,), False, OPTED_OUT),
    Row("opt-out-under-linked-id", CLIN_B, "view", (OPT_OUT_LINKED_ID,), False, OPTED_OUT),
    Row("inactive-opt-out-ignored", CLIN_B, "view", (OPT_OUT_INACTIVE,), True, SHARED),
    Row("other-patients-opt-out-ignored", CLIN_B, "view", (OPT_OUT_OTHER_PATIENT,), True, SHARED),
    Row("export-is-not-default", CLIN_B, "export", (), False, NEEDS_EXPORT),
    Row("view-permit-is-not-export", CLIN_B, "export", (PERMIT_B_VIEW,), False, NEEDS_EXPORT),
    Row("export-permit", CLIN_B, "export", (PERMIT_B_EXPORT,), True, CONSENTED),
    Row("export-permit-also-views", CLIN_B, "view", (PERMIT_B_EXPORT,), True, CONSENTED),
    Row(
        "payment-needs-consent",
        PAYER_B,
        "view",
        (),
        False,
        "purpose of use HPAYMT needs the patient's explicit consent",
    ),
    Row("payment-with-consent", PAYER_B, "view", (PERMIT_B,), True, CONSENTED),
    Row(
        "payment-outside-treatment-consent",
        PAYER_B,
        "view",
        (PERMIT_B_TREAT,),
        False,
        "purpose of use HPAYMT",
    ),
    Row("no-purpose", SILENT_B, "view", (), False, "no purpose of use was stated"),
    Row("sensitive-needs-permit", CLIN_B, "view", (), False, SENSITIVE, labels=("PSY",)),
    Row("sensitive-permit-names-it", CLIN_B, "view", (PERMIT_B_PSY,), True, CONSENTED, ("PSY",)),
    Row(
        "permit-does-not-cover-other-label",
        CLIN_B,
        "view",
        (PERMIT_B_PSY,),
        False,
        SENSITIVE,
        ("HIV",),
    ),
    Row(
        "restricted-carved-out",
        CLIN_B,
        "view",
        (PERMIT_B_EXCEPT_R,),
        False,
        "the patient's consent refuses sharing this kind of sensitive information",
        labels=("R",),
    ),
    Row("normal-data-under-carve-out", CLIN_B, "view", (PERMIT_B_EXCEPT_R,), True, CONSENTED),
    Row(
        "organisation-denied",
        CLIN_B,
        "view",
        (DENY_B,),
        False,
        "the patient has opted out of sharing with Organization site-b",
    ),
    Row("other-organisation-unaffected", CLIN_C, "view", (DENY_B,), True, SHARED),
    Row(
        "practitioner-denied",
        DR_BO,
        "view",
        (DENY_DR_BO,),
        False,
        "the patient has opted out of sharing with Practitioner dr-bo",
    ),
    Row("colleague-of-denied-practitioner", CLIN_B, "view", (DENY_DR_BO,), True, SHARED),
    Row("opt-out-with-exception", CLIN_B, "view", (OPT_OUT_EXCEPT_B,), True, CONSENTED),
    Row("opt-out-exception-is-not-others", CLIN_C, "view", (OPT_OUT_EXCEPT_B,), False, OPTED_OUT),
    Row("deny-beats-permit", CLIN_B, "view", (PERMIT_B, OPT_OUT), False, OPTED_OUT),
    Row(
        "purpose-denied",
        CLIN_B,
        "view",
        (DENY_TREAT,),
        False,
        "the patient's consent refuses sharing for this purpose of use",
    ),
    Row("other-purpose-denied", CLIN_B, "view", (DENY_MARKETING,), True, SHARED),
    Row("role-permit", PAYER_B, "view", (PERMIT_CLINICIANS,), True, CONSENTED),
    Row("permit-naming-this-study", PAYER_B, "view", (PERMIT_THIS_STUDY,), True, CONSENTED),
    Row(
        "permit-naming-another-study",
        PAYER_B,
        "view",
        (PERMIT_OTHER_STUDY,),
        False,
        "purpose of use HPAYMT",
    ),
    Row(
        "consent-period-ended",
        PAYER_B,
        "view",
        (PERMIT_B_2025,),
        False,
        "the patient's consent for this ended on 2025-12-31",
    ),
    Row(
        "consent-period-not-started",
        PAYER_B,
        "view",
        (PERMIT_B_FROM_JULY,),
        False,
        "the patient's consent for this only takes effect on 2026-07-01",
    ),
    Row(
        "data-period-covers-old-study",
        PAYER_B,
        "view",
        (PERMIT_B_OLD_DATA,),
        True,
        CONSENTED,
        date="2025-06-01",
    ),
    Row(
        "data-period-excludes-new-study",
        PAYER_B,
        "view",
        (PERMIT_B_OLD_DATA,),
        False,
        "purpose of use HPAYMT",
    ),
    Row(
        "break-the-glass",
        EMERGENCY_B,
        "view",
        (OPT_OUT,),
        True,
        EMERGENCY,
        obligations=("audit-emergency-access", "notify-custodian"),
    ),
    Row(
        "break-the-glass-needs-reason",
        EMERGENCY_NO_REASON,
        "view",
        (),
        False,
        "break-the-glass access needs a stated reason",
    ),
    Row(
        "break-the-glass-does-not-export",
        EMERGENCY_B,
        "export",
        (),
        False,
        "break-the-glass access does not let you download",
    ),
    Row(
        "break-the-glass-not-sensitive",
        EMERGENCY_B,
        "view",
        (),
        False,
        "break-the-glass access does not open",
        labels=("SUD",),
    ),
    Row(
        "operators-do-not-break-the-glass",
        OPERATOR_ETREAT,
        "view",
        (),
        False,
        'role "operator" may not use break-the-glass access',
    ),
    Row(
        "operators-do-not-view",
        OPERATOR,
        "view",
        (),
        False,
        'role "operator" may not view studies held by another organisation',
    ),
    Row(
        "other-site-systems-do-not-search",
        SYSTEM_B,
        "search",
        (),
        False,
        'role "system" may not find studies held by another organisation',
    ),
    Row("patient-views-own", PATIENT_P1, "view", (OPT_OUT,), True, "patients may see"),
    Row("patient-exports-own", PATIENT_P1, "export", (), True, "patients may see and download"),
    Row("patient-not-others", PATIENT_P2, "view", (), False, "patients may only see their own"),
    Row("holder-shares", CLIN_A, "share", (), True, "may share it with another provider"),
    Row("consented-viewer-shares", CLIN_B, "share", (PERMIT_B,), True, "may view a study may"),
    Row("recipient-views-share", CLIN_C, "view", (SHARE_WITH_C,), True, CONSENTED),
    Row("recipient-cannot-share-on", CLIN_C, "share", (SHARE_WITH_C,), False, "shared further"),
    Row("recipient-does-not-export", CLIN_C, "export", (SHARE_WITH_C,), False, NEEDS_EXPORT),
    Row("non-viewer-cannot-share", CLIN_B, "share", (OPT_OUT,), False, "share studies you may"),
    Row("opted-out-not-shared", CLIN_A, "share", (OPT_OUT,), False, OPTED_OUT),
    Row("sensitive-not-shared-by-provider", CLIN_A, "share", (), False, "sensitive", ("PSY",)),
    Row("patient-writes-consent", PATIENT_P1, "write-consent", (), True, "record their own"),
    Row("clinician-does-not-write-consent", CLIN_B, "write-consent", (), False, "only the patient"),
    Row("operator-reads-audit", OPERATOR, "read-audit", (), True, "audit trail is open"),
    Row("patient-reads-own-audit", PATIENT_P1, "read-audit", (), True, "audit trail is open"),
    Row("stranger-reads-no-audit", CLIN_B, "read-audit", (), False, "can read this audit trail"),
    Row("unknown-action", CLIN_A, "delete", (), False, '"delete" is not an action'),
]


def test_the_table_is_large_enough():
    assert len(ROWS) >= 30
    assert len({row.id for row in ROWS}) == len(ROWS)


# -- the engines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> EmbeddedEngine:
    return EmbeddedEngine(POLICY_DIR)


@pytest.fixture(scope="module")
def stub() -> Iterator[OpaStub]:
    with OpaStub(POLICY_DIR) as running:
        yield running


@pytest.fixture(scope="module", params=["embedded", "server"])
def engine(request: pytest.FixtureRequest, embedded: EmbeddedEngine, stub: OpaStub) -> PolicyEngine:
    if request.param == "embedded":
        return embedded
    return ServerEngine(stub.url, timeout=5)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_scenario(engine: PolicyEngine, row: Row):
    decision = decide(engine, row.question())
    assert decision.allow is row.allow, decision.reasons
    assert any(row.reason in reason for reason in decision.reasons), decision.reasons
    assert tuple(o["code"] for o in decision.obligations) == row.obligations
    assert decision.policy_version.startswith("0.4.0+")
    assert len(decision.input_digest) == 64


def test_batch_gives_the_same_answers(engine: PolicyEngine):
    questions = [row.question() for row in ROWS]
    batch = decide_batch(engine, questions)
    single = [decide(engine, q) for q in questions]
    assert [(d.allow, d.reasons, d.obligations) for d in batch] == [
        (d.allow, d.reasons, d.obligations) for d in single
    ]
    assert [d.input_digest for d in batch] == [d.input_digest for d in single]
    assert len({d.decision_id for d in batch + single}) == 2 * len(ROWS)


def test_both_engines_report_the_same_policy_version(embedded: EmbeddedEngine, stub: OpaStub):
    question = ROWS[0].question()
    here = decide(embedded, question)
    there = decide(ServerEngine(stub.url), question)
    assert here.policy_version == there.policy_version == f"0.4.0+{embedded.version}"
