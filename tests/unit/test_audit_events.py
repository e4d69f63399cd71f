"""AuditEvent building: IHE BALP shapes, valid FHIR R4, ids only, findable by search."""

import base64
import json
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from exchange.audit import events
from exchange.audit.events import AUDIT_ACTIONS, AUDIT_SYSTEM, What, Who, build
from exchange.audit.log import AuditLog
from exchange.database import make_engine
from exchange.fhir import search
from exchange.fhir.repository import SqlRepository
from exchange.policy.decisions import Decision

HUB = "https://hub.example"
WHO = Who(
    user="dr-b",
    role="clinician",
    organization="org-b",
    purpose_of_use=("TREAT",),
    client="viewer-app",
    address="192.0.2.7",
)
WHAT = What(
    patients=("p1",),
    study="s1",
    study_uid="1.2.826.0.1.3680043.10.1386.1",
    query="patient.identifier=urn:mrn:site-a|A1",
)
DECISION = Decision(
    allow=True,
    reasons=("the patient's consent permits treatment access",),
    policy_version="3+abc123",
    decision_id="dec-42",
    input_digest="f" * 64,
)


def codes(codings):
    return {(c["system"], c["code"]) for c in codings}


def detail(event, kind):
    for entity in event.get("entity", []):
        for item in entity.get("detail", []):
            if item["type"] == kind:
                return item["valueString"]
    return None


@pytest.mark.parametrize("action", AUDIT_ACTIONS)
@pytest.mark.parametrize("allowed", [True, False])
def test_every_action_is_a_valid_r4_audit_event(action, allowed):
    event = build(
        action=action, who=WHO, what=WHAT, allowed=allowed, observer=HUB, decision=DECISION
    )
    AuditEvent.model_validate(event)  # raises on any structural problem
    assert event["outcome"] == ("0" if allowed else "4")
    assert (AUDIT_SYSTEM, action) in codes(event["subtype"])
    assert "id" not in event
    assert "meta" not in event


@pytest.mark.parametrize(
    ("action", "type_code", "subtype", "verb"),
    [
        ("search", "rest", "search-type", "E"),
        ("read", "rest", "read", "R"),
        ("view", "110103", "110103", "R"),
        ("export", "110106", "110106", "R"),
        ("login-failure", "110114", "110122", "E"),
        ("share", "rest", "create", "C"),
        ("publish", "rest", "update", "U"),
        ("retract", "rest", "delete", "D"),
    ],
)
def test_codes_follow_the_mapping_table(action, type_code, subtype, verb):
    event = build(action=action, who=WHO, what=WHAT, allowed=True, observer=HUB)
    assert event["type"]["code"] == type_code
    assert subtype in {c["code"] for c in event["subtype"]}
    assert event["action"] == verb


@pytest.mark.parametrize(
    ("interaction", "verb"), [("create", "C"), ("update", "U"), ("delete", "D")]
)
def test_consent_change_says_which_write(interaction, verb):
    event = build(
        action="consent-change",
        who=WHO,
        what=What(patients=("p1",), resource="Consent/c1"),
        allowed=True,
        observer=HUB,
        interaction=interaction,
    )
    assert event["type"]["code"] == "rest"
    assert (events.RESTFUL, interaction) in codes(event["subtype"])
    assert event["action"] == verb
    assert {"reference": "Consent/c1"} in [e.get("what") for e in event["entity"]]


def test_who_when_why_and_outcome_are_there():
    when = datetime(2026, 11, 3, 9, 30, tzinfo=UTC)
    event = build(
        action="view",
        who=WHO,
        what=WHAT,
        allowed=True,
        observer=HUB,
        decision=DECISION,
        when=when,
    )
    assert event["recorded"] == "2026-11-03T09:30:00.000Z"
    user, org, client, hub = event["agent"]
    assert user["requestor"] is True
    assert user["who"]["identifier"]["value"] == "dr-b"
    assert user["role"][0]["coding"][0]["code"] == "clinician"
    assert org["who"] == {"reference": "Organization/org-b"}
    assert client["who"]["identifier"]["value"] == "viewer-app"
    assert client["network"] == {"address": "192.0.2.7", "type": "2"}
    assert hub["who"]["identifier"]["value"] == HUB
    assert event["source"]["observer"]["identifier"]["value"] == HUB
    assert codes(c for p in event["purposeOfEvent"] for c in p["coding"]) == {
        (events.ACT_REASON, "TREAT")
    }
    assert event["outcomeDesc"] == "the patient's consent permits treatment access"
    assert detail(event, "policy-version") == "3+abc123"
    assert detail(event, "decision-id") == "dec-42"
    assert detail(event, "input-digest") == "f" * 64


def test_entities_patient_study_and_query():
    event = build(action="search", who=WHO, what=WHAT, allowed=True, observer=HUB)
    by_role = {e["role"]["code"]: e for e in event["entity"]}
    assert by_role["1"]["what"] == {"reference": "Patient/p1"}
    assert by_role["1"]["type"]["code"] == "1"
    study = by_role["3"]
    assert study["what"]["reference"] == "ImagingStudy/s1"
    assert study["what"]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": "urn:oid:1.2.826.0.1.3680043.10.1386.1",
    }
    assert study["type"]["code"] == "2"
    assert base64.b64decode(by_role["24"]["query"]).decode() == WHAT.query


def test_refusal_and_error_outcomes():
    refused = build(
        action="view",
        who=WHO,
        what=WHAT,
        allowed=False,
        observer=HUB,
        reason="the patient has opted out of sharing with Organization org-b",
    )
    assert refused["outcome"] == "4"
    assert refused["outcomeDesc"] == "the patient has opted out of sharing with Organization org-b"
    failed = build(
        action="view",
        who=WHO,
        what=WHAT,
        allowed=True,
        error=True,
        observer=HUB,
        reason="site-a did not answer",
    )
    assert failed["outcome"] == "8"


def test_emergency_access_is_flagged():
    who = Who("dr-b", "clinician", "org-b", ("TREAT",), reason="unconscious patient in ED")
    event = build(
        action="view",
        who=who,
        what=WHAT,
        allowed=True,
        observer=HUB,
        decision=DECISION,
        emergency=True,
    )
    AuditEvent.model_validate(event)
    assert (AUDIT_SYSTEM, "emergency-access") in codes(event["subtype"])
    purposes = [c["code"] for p in event["purposeOfEvent"] for c in p["coding"]]
    assert purposes == ["TREAT", "ETREAT"]
    assert detail(event, "break-glass-reason") == "unconscious patient in ED"
    plain = build(action="view", who=who, what=WHAT, allowed=True, observer=HUB)
    assert (AUDIT_SYSTEM, "emergency-access") not in codes(plain["subtype"])
    assert detail(plain, "break-glass-reason") is None


def test_only_ids_no_names():
    """The builder takes ids only; nothing identifying beyond what it was given appears."""
    event = build(
        action="export", who=WHO, what=WHAT, allowed=True, observer=HUB, decision=DECISION
    )
    text = json.dumps(event)
    for field in ('"name"', '"family"', '"given"', '"birthDate"', '"telecom"'):
        assert field not in text
    references = [e["what"].get("reference") for e in event["entity"] if "what" in e]
    assert "Patient/p1" in references


def test_patient_acting_for_themselves_is_an_agent_reference():
    me = Who("pat-1", "patient", None, ("PATRQT",), patient="p1")
    event = build(action="read", who=me, what=What(patients=("p1",)), allowed=True, observer=HUB)
    assert event["agent"][0]["who"] == {"identifier": {"value": "pat-1"}, "reference": "Patient/p1"}
    assert len(event["agent"]) == 2  # the patient and the hub: no organisation


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="unknown audit action"):
        build(action="peek", who=WHO, what=WHAT, allowed=True, observer=HUB)  # type: ignore[arg-type]


# -- found through the hub's search pipeline ------------------------------------------


@pytest.fixture
def audit(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    repo = SqlRepository(engine, local_base=f"{HUB}/fhir")
    yield AuditLog(engine, repo), repo
    engine.dispose()


def run(repo, **params):
    query = search.parse("AuditEvent", list(params.items()), local_base=f"{HUB}/fhir")
    result = search.execute(repo, query, visible=lambda c: c, may_read_type=lambda _t: True)
    return [m.body for m in result.matches]


def test_searchable_by_patient_entity_agent_date_outcome_subtype(audit):
    log, repo = audit
    when = datetime(2026, 11, 3, 9, 30, tzinfo=UTC)
    viewed = log.record(
        build(action="view", who=WHO, what=WHAT, allowed=True, observer=HUB, when=when)
    )
    other = What(patients=("p2",), study="s2", study_uid="1.2.3.4")
    refused = log.record(
        build(action="export", who=WHO, what=other, allowed=False, observer=HUB, when=when)
    )

    def ids(**params):
        return sorted(b["id"] for b in run(repo, **params))

    assert ids(patient="p1") == [viewed]
    assert ids(patient="Patient/p2") == [refused]
    assert ids(entity="ImagingStudy/s1") == [viewed]
    assert ids(agent="Organization/org-b") == sorted([viewed, refused])
    assert ids(date="2026-11-03") == sorted([viewed, refused])
    assert ids(date="lt2026-11-01") == []
    assert ids(outcome="4") == [refused]
    assert ids(subtype=f"{AUDIT_SYSTEM}|view") == [viewed]
    assert ids(**{"entity:identifier": "urn:dicom:uid|urn:oid:1.2.3.4"}) == [refused]
    assert ids(**{"agent:identifier": "dr-b"}) == sorted([viewed, refused])


def test_a_patient_reading_their_disclosures_sees_who_when_why_and_outcome(audit):
    log, repo = audit
    log.record(
        build(action="view", who=WHO, what=WHAT, allowed=True, observer=HUB, decision=DECISION)
    )
    log.record(
        build(
            action="view",
            who=Who("dr-c", "clinician", "org-c", ("TREAT",)),
            what=What(patients=("someone-else",), study="s9"),
            allowed=True,
            observer=HUB,
        )
    )
    (mine,) = run(repo, patient="p1")
    event = AuditEvent.model_validate(mine)
    user = next(a for a in event.agent if a.requestor)
    org = next(a for a in event.agent if a.who and a.who.reference)
    assert user.who.identifier.value == "dr-b"
    assert org.who.reference == "Organization/org-b"
    assert event.recorded is not None
    assert [c.code for p in event.purposeOfEvent for c in p.coding] == ["TREAT"]
    assert event.outcome == "0"


def test_every_built_event_conforms_to_the_exchange_auditevent_profile():
    """What the hub writes passes the same profile validation as anything stored."""
    from exchange.fhir import resources

    who = Who("dr", "clinician", "org-a", ("ETREAT",), reason="trauma")
    what = What(patients=("p1",), study="s1", study_uid="1.2.3", query="x=1")
    for action in AUDIT_ACTIONS:
        for allowed in (True, False):
            event = build(
                action=action,
                who=who,
                what=what,
                allowed=allowed,
                observer="http://hub.example",
                emergency=allowed and action == "view",
            )
            resources.validate("AuditEvent", event)
