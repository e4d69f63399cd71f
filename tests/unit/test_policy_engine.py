"""The decision point around the engines: versions, reloads, threads, fail-closed answers."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from exchange.policy import engine as engine_module
from exchange.policy.decisions import (
    Decision,
    DecisionInput,
    ResourceFacts,
    Subject,
    decide,
    decide_batch,
    fhir_interaction,
    input_digest,
    study_date,
)
from exchange.policy.engine import EmbeddedEngine, PolicyError, load_bundle, open_engine

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
CLIN_B = Subject("dr-bo", "clinician", "site-b", ("TREAT",))
STUDY = ResourceFacts(study="s1", custodian="site-a", patients=("p1",), date="20260310")
VIEW = DecisionInput(CLIN_B, "view", STUDY, (), datetime(2026, 6, 1, tzinfo=UTC))


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    copy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, copy)
    return copy


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "RELOAD_INTERVAL_SECONDS", 0.0)


def _set_mode(policies: Path, mode: str) -> None:
    data_file = policies / "data.json"
    data = json.loads(data_file.read_text())
    data["exchange"]["settings"]["mode"] = mode
    data_file.write_text(json.dumps(data))


# -- versions ---------------------------------------------------------------------------------


def test_version_is_a_hash_of_the_bundle(policies: Path):
    first = load_bundle(policies).version
    assert len(first) == 16
    assert int(first, 16) >= 0
    assert load_bundle(policies).version == first
    (policies / "exchange" / "access" / "access_test.rego").write_text("package x_test\n")
    assert load_bundle(policies).version == first, "tests are not part of the bundle"
    _set_mode(policies, "opt-in")
    assert load_bundle(policies).version != first


def test_decisions_name_the_version(policies: Path):
    engine = EmbeddedEngine(policies)
    decision = decide(engine, VIEW)
    assert decision.policy_version == f"0.4.0+{engine.version}"


# -- reloading --------------------------------------------------------------------------------


def test_an_edit_is_picked_up_without_restart(policies: Path, fast_reload: None):
    engine = EmbeddedEngine(policies)
    before = decide(engine, VIEW)
    assert before.allow
    _set_mode(policies, "opt-in")
    after = decide(engine, VIEW)
    assert not after.allow
    assert "has not consented" in after.reason()
    assert after.policy_version != before.policy_version


def test_reload_is_checked_at_most_once_a_second(policies: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(engine_module, "RELOAD_INTERVAL_SECONDS", 60.0)
    engine = EmbeddedEngine(policies)
    assert decide(engine, VIEW).allow
    _set_mode(policies, "opt-in")
    assert decide(engine, VIEW).allow, "too soon to look again"
    engine.refresh(force=True)
    assert not decide(engine, VIEW).allow


def test_other_threads_get_the_new_version(policies: Path, fast_reload: None):
    engine = EmbeddedEngine(policies)
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: decide(engine, VIEW).allow, range(8)))
        _set_mode(policies, "opt-in")
        answers = list(pool.map(lambda _: decide(engine, VIEW), range(8)))
    assert not any(d.allow for d in answers)
    assert {d.policy_version for d in answers} == {f"0.4.0+{engine.version}"}


def test_a_broken_edit_keeps_the_last_good_policies(policies: Path, fast_reload: None):
    engine = EmbeddedEngine(policies)
    version = engine.version
    (policies / "exchange" / "access" / "access.rego").write_text(
        "package exchange.access\nallow if {"
    )
    decision = decide(engine, VIEW)
    assert decision.allow
    assert engine.version == version
    assert engine.reload_error is not None
    assert "do not load" in engine.reload_error


def test_concurrent_decisions_during_reloads(policies: Path, fast_reload: None):
    engine = EmbeddedEngine(policies)
    stop = threading.Event()
    problems: list[str] = []

    def flip() -> None:
        mode = "opt-in"
        while not stop.is_set():
            _set_mode(policies, mode)
            mode = "opt-out" if mode == "opt-in" else "opt-in"
            time.sleep(0.005)

    def ask(_: int) -> Decision:
        decision = decide(engine, VIEW)
        if not decision.reasons or "could not be evaluated" in decision.reason():
            problems.append(decision.reason())
        return decision

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(400)))
    finally:
        stop.set()
        flipper.join()
    assert not problems
    assert {d.allow for d in answers} <= {True, False}


# -- fail closed ------------------------------------------------------------------------------


class _Fake:
    def __init__(self, answer: Any = None, error: Exception | None = None) -> None:
        self.answer, self.error = answer, error

    def evaluate(self, rule: str, input_: Any) -> Any:
        if self.error:
            raise self.error
        return self.answer

    def check(self) -> None:
        pass


GOOD = {"allow": True, "reasons": ["ok"], "obligations": [], "policy_version": "1+x"}


@pytest.mark.parametrize(
    ("answer", "error", "expected"),
    [
        (None, PolicyError("OPA server is unreachable"), "could not be evaluated"),
        ("yes", None, "no yes-or-no answer"),
        ({"allow": "true"}, None, "no yes-or-no answer"),
        ({**GOOD, "reasons": "ok"}, None, "malformed"),
        ({**GOOD, "obligations": ["audit"]}, None, "malformed"),
        ({**GOOD, "policy_version": 3}, None, "malformed"),
        ({**GOOD, "obligations": [{"code": "shred-the-images"}]}, None, "cannot do"),
    ],
)
def test_anything_but_a_clean_answer_is_a_deny(answer: Any, error: Exception | None, expected: str):
    decision = decide(_Fake(answer, error), VIEW)
    assert not decision.allow
    assert expected in decision.reason()
    assert decision.decision_id
    assert decision.input_digest == input_digest(VIEW.as_input())


def test_a_clean_answer_is_taken():
    decision = decide(_Fake(GOOD), VIEW)
    assert decision.allow
    assert decision.reasons == ("ok",)
    assert decision.policy_version == "1+x"


def test_batch_fails_closed_as_a_whole():
    assert not any(d.allow for d in decide_batch(_Fake(error=PolicyError("down")), [VIEW] * 3))
    short = decide_batch(_Fake([GOOD]), [VIEW, VIEW])
    assert [d.allow for d in short] == [False, False]
    assert "wrong number" in short[0].reason()
    assert decide_batch(_Fake([GOOD]), []) == []


def test_input_that_is_not_json_is_a_deny():
    decision = decide(_Fake(GOOD), {"subject": object()})
    assert not decision.allow
    assert "not valid JSON" in decision.reason()


def test_embedded_engine_errors_are_denies(tmp_path: Path):
    (tmp_path / "p.rego").write_text(
        "package exchange.access\nimport rego.v1\ndefault allow := false\n"
        "decision := {'allow': count(input.n) > 0}\n".replace("'", '"')
    )
    (tmp_path / "p_test.rego").write_text("package exchange.access_test\n")
    decision = decide(EmbeddedEngine(tmp_path), {"n": 5})
    assert not decision.allow
    assert "could not be evaluated (policy evaluation failed" in decision.reason()


# -- ids, digests, inputs ---------------------------------------------------------------------


def test_every_decision_has_its_own_id_and_a_stable_digest():
    engine = EmbeddedEngine(POLICY_DIR)
    first, second = decide(engine, VIEW), decide(engine, VIEW)
    assert first.decision_id != second.decision_id
    assert first.input_digest == second.input_digest
    other = DecisionInput(CLIN_B, "export", STUDY, (), VIEW.now)
    assert decide(engine, other).input_digest != first.input_digest


def test_decision_as_json():
    decision = decide(_Fake(GOOD), VIEW)
    body = decision.as_json()
    assert body["allow"] is True
    assert body["decision_id"] == decision.decision_id
    assert json.dumps(body)


def test_resource_facts_are_normalised():
    facts = ResourceFacts(
        study="s1",
        custodian="site-a",
        patients=("Patient/p1", "http://hub/fhir/Patient/hie-1", "p3"),
        uid="urn:oid:1.2.3",
        security_labels=({"system": "x", "code": "PSY"}, "R"),
        date="20260310",
    )
    assert facts.patients == ("p1", "hie-1", "p3")
    assert facts.uid == "1.2.3"
    assert facts.security_labels == ("PSY", "R")
    assert facts.as_input()["date"] == "2026-03-10"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("20260310", "2026-03-10"),
        ("2026-03-10", "2026-03-10"),
        ("2026-03-10T12:00:00+01:00", "2026-03-10"),
        ("2026-03", None),
        ("yesterday", None),
        (None, None),
    ],
)
def test_study_dates(given: str | None, expected: str | None):
    assert study_date(given) == expected


def test_resource_facts_from_json():
    facts = ResourceFacts.from_json({"study": "s1", "patient": "p1", "custodian": "site-a"})
    assert facts.patients == ("p1",)
    with pytest.raises(ValueError, match="study"):
        ResourceFacts.from_json({"patient": "p1"})


def test_subject_from_claims():
    subject = Subject.from_claims(
        {"sub": "dr", "role": "clinician", "org": "site-b", "purpose_of_use": "ETREAT"},
        reason="stroke",
    )
    assert subject == Subject("dr", "clinician", "site-b", ("ETREAT",), None, "stroke")
    assert (
        Subject.from_claims({"sub": "x", "role": "patient", "break_glass_reason": "r"}).reason
        == "r"
    )


def test_now_is_utc_seconds():
    local = datetime.fromisoformat("2026-06-01T12:00:00.5+02:00")
    assert (
        DecisionInput(CLIN_B, "view", STUDY, (), local).as_input()["now"] == "2026-06-01T10:00:00Z"
    )
    assert DecisionInput(CLIN_B, "view", STUDY).as_input()["now"].endswith("Z")


def test_fhir_interaction_still_answers():
    engine = EmbeddedEngine(POLICY_DIR)
    assert fhir_interaction(engine, CLIN_B, "read", "Endpoint").allow
    refused = fhir_interaction(engine, CLIN_B, "read", "Consent")
    assert not refused.allow
    assert "consent-checked" in refused.reason()


def test_open_engine_kinds(tmp_path: Path):
    assert isinstance(open_engine("embedded", POLICY_DIR, None), EmbeddedEngine)
    with pytest.raises(Exception, match="EXCHANGE_OPA_URL"):
        open_engine("server", POLICY_DIR, None)
    with pytest.raises(Exception, match="path prefix"):
        open_engine("server", POLICY_DIR, "http://127.0.0.1:8181/opa")
