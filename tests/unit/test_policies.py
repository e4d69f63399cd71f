"""Runs the Rego ``test_`` rules beside each policy, and checks fail-closed behaviour."""

import re
from pathlib import Path

import pytest

from exchange.errors import ConfigurationError
from exchange.policy.engine import EmbeddedEngine, PolicyError, policy_files

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _rego_tests():
    _policies, tests = policy_files(POLICY_DIR)
    for path in tests:
        package = re.search(r"^package\s+([\w.]+)", path.read_text(), re.M).group(1)
        for name in re.findall(r"^(test_\w+)\b", path.read_text(), re.M):
            yield pytest.param(package, name, id=f"{path.relative_to(POLICY_DIR)}::{name}")


@pytest.fixture(scope="module")
def engine():
    return EmbeddedEngine(POLICY_DIR, include_tests=True)


def test_every_policy_has_tests_beside_it():
    policies, tests = policy_files(POLICY_DIR)
    assert policies
    for policy in policies:
        assert policy.with_name(policy.stem + "_test.rego") in tests, policy


def test_every_policy_defaults_to_deny():
    policies, _ = policy_files(POLICY_DIR)
    for policy in policies:
        assert "default allow := false" in policy.read_text(), policy


@pytest.mark.parametrize(("package", "rule"), list(_rego_tests()))
def test_rego(engine, package, rule):
    assert engine.evaluate(f"data.{package}.{rule}", {}) is True


def test_undefined_rule_is_an_error_not_an_answer(engine):
    with pytest.raises(PolicyError):
        engine.evaluate("data.exchange.access.no_such_rule", {})


def test_engine_answers_readiness(engine):
    engine.check()


def test_broken_policy_refuses_to_load(tmp_path):
    (tmp_path / "bad.rego").write_text("package x\n allow if {")
    with pytest.raises(ConfigurationError, match="do not load"):
        EmbeddedEngine(tmp_path)


def test_empty_policy_dir_refuses_to_load(tmp_path):
    with pytest.raises(ConfigurationError, match="no Rego policies"):
        EmbeddedEngine(tmp_path)


def test_engine_works_from_many_threads(engine):
    from concurrent.futures import ThreadPoolExecutor

    decision_input = {
        "subject": {"role": "clinician", "organization": "a"},
        "action": "view",
        "resource": {"custodian": "a"},
    }
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: engine.evaluate("data.exchange.access.allow", decision_input), range(64)
            )
        )
    assert answers == [True] * 64
