"""``exchange policy test|explain|what-if``: offline tools over the policies alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jwt
import pytest

from exchange.cli import main

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
NOW = "2026-06-01T10:00:00Z"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    studies = [
        {
            "study": "s1",
            "uid": "1.2.3",
            "patient": ["p1"],
            "custodian": "site-a",
            "date": "20260310",
        },
        {"study": "s2", "patient": "p1", "custodian": "site-b", "security_labels": ["PSY"]},
        {"study": "s3", "patient": ["p2"], "custodian": "site-a"},
    ]
    opt_out = {
        "resourceType": "Consent",
        "id": "c-opt-out",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
        "provision": {"type": "deny"},
    }
    permit_b_export = {
        "resourceType": "Consent",
        "id": "c-export",
        "status": "active",
        "patient": {"reference": "Patient/p1"},
        "provision": {
            "type": "permit",
            "actor": [{"reference": {"reference": "Organization/site-b"}}],
            "action": [{"coding": [{"code": "use"}, {"code": "export"}]}],
        },
    }
    return {
        "studies": _write(tmp_path / "studies.json", studies),
        "one_study": _write(tmp_path / "study.json", studies[0]),
        "opt_out": _write(tmp_path / "opt-out.json", opt_out),
        "bundle": _write(
            tmp_path / "bundle.json",
            {"resourceType": "Bundle", "entry": [{"resource": permit_b_export}]},
        ),
        "clinician_b": _write(
            tmp_path / "b.json",
            {"sub": "dr-bo", "role": "clinician", "org": "site-b", "purpose_of_use": ["TREAT"]},
        ),
    }


# -- test ---------------------------------------------------------------------------------


def test_policy_test_runs_every_rule_and_reports_coverage(capsys: pytest.CaptureFixture[str]):
    assert main(["policy", "test", "--policy-dir", str(POLICY_DIR)]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out
    total = float(out.split("total: ")[1].split("%")[0])
    assert total >= 90
    for package in ("access", "consent"):
        assert f"exchange/{package}/{package}.rego" in out


def test_policy_test_uses_the_configured_policy_dir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("EXCHANGE_POLICY_DIR", str(POLICY_DIR))
    assert main(["policy", "test", "-v"]) == 0
    assert "PASS exchange/access/access_test.rego::" in capsys.readouterr().out


def test_a_failing_rule_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    copy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, copy)
    test_file = copy / "exchange" / "access" / "access_test.rego"
    test_file.write_text(
        test_file.read_text() + "\ntest_wrong if data.exchange.access.allow with input as {}\n"
    )
    assert main(["policy", "test", "--policy-dir", str(copy)]) == 1
    assert "FAIL exchange/access/access_test.rego::test_wrong: undefined" in capsys.readouterr().out


def test_low_coverage_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    copy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, copy)
    untested = copy / "exchange" / "extra"
    untested.mkdir()
    (untested / "extra.rego").write_text(
        "package exchange.extra\n\nimport rego.v1\n\ndefault allow := false\n\n"
        + "".join(f"r{n} if input.x == {n}\n\n" for n in range(60))
    )
    capsys.readouterr()
    assert main(["policy", "test", "--policy-dir", str(copy)]) == 1
    captured = capsys.readouterr()
    assert "exchange/extra/extra.rego: 0.0%" in captured.out
    assert "below 90%" in captured.err


def test_broken_policies_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "bad.rego").write_text("package x\nallow if {")
    assert main(["policy", "test", "--policy-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "do not load" in err
    assert "Traceback" not in err


def test_min_coverage_must_be_a_percentage(capsys: pytest.CaptureFixture[str]):
    assert main(["policy", "test", "--min-coverage", "120"]) == 2
    assert "between 0 and 100" in capsys.readouterr().err


# -- explain ----------------------------------------------------------------------------------


def _explain(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "policy",
        "explain",
        "--policy-dir",
        str(POLICY_DIR),
        "--study-file",
        str(files["studies"]),
        "--now",
        NOW,
        *extra,
    ]


def test_explain_with_claims_and_consents(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
):
    argv = _explain(files, "--claims", str(files["clinician_b"]), "--study", "s1")
    assert main([*argv, "--consents", str(files["opt_out"])]) == 0
    out = capsys.readouterr().out
    assert (
        "view of study s1 by dr-bo (clinician; organisation site-b; purpose TREAT): REFUSED" in out
    )
    assert "- the patient has opted out of sharing their images" in out
    assert "policy version 0.4.0+" in out
    assert main(argv) == 0
    assert "ALLOWED" in capsys.readouterr().out


def test_explain_with_a_token_as_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    token = jwt.encode(
        {"sub": "dr-bo", "role": "clinician", "org": "site-b", "purpose_of_use": ["TREAT"]},
        "a signature key the explain tool never checks",
        algorithm="HS256",
    )
    argv = _explain(files, "--token", token, "--study", "urn:oid:1.2.3", "--action", "export")
    assert main([*argv, "--consents", str(files["bundle"]), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["allow"] is True
    assert body["reasons"] == ["the patient's consent permits this"]


def test_explain_break_the_glass(files: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    argv = _explain(files, "--claims", str(files["clinician_b"]), "--study", "s1")
    argv += ["--purpose", "ETREAT", "--reason", "stroke", "--consents", str(files["opt_out"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ALLOWED" in out
    assert "obligation audit-emergency-access" in out
    assert "obligation notify-custodian" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token", "not-a-jwt"], "not a well-formed JWT"),
        (["--claims", "missing.json"], "cannot read the claims file"),
        (["--claims", "{b}"], "holds 3 studies; name one with --study"),
        (["--claims", "{b}", "--study", "s9"], "no study 's9'"),
        (["--claims", "{b}", "--study", "s1", "--consents", "{studies}"], "must hold Consent"),
    ],
)
def test_explain_input_errors_are_one_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
):
    filled = [
        x.replace("{b}", str(files["clinician_b"])).replace("{studies}", str(files["studies"]))
        for x in extra
    ]
    assert main(_explain(files, *filled)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_explain_needs_a_caller(files: dict[str, Path], capsys: pytest.CaptureFixture[str]):
    assert main(_explain(files)) == 2
    assert "one of the arguments --token --claims is required" in capsys.readouterr().err


# -- what-if ----------------------------------------------------------------------------------


def test_what_if_lists_the_decisions_that_would_change(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
):
    argv = [
        "policy",
        "what-if",
        "--policy-dir",
        str(POLICY_DIR),
        "--patient",
        "p1",
        "--consent",
        str(files["opt_out"]),
        "--study-file",
        str(files["studies"]),
        "--now",
        NOW,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 studies x 2 callers x 2 actions: 1 of 8 decisions change" in out
    assert (
        "study s1, view by clinician@site-b (clinician; organisation site-b; purpose TREAT): "
        "allowed -> refused (the patient has opted out of sharing their images)"
    ) in out

    assert main([*argv, "--consents", str(files["bundle"]), "--json"]) == 0
    changes = json.loads(capsys.readouterr().out)
    assert {(c["study"], c["action"]) for c in changes} == {("s1", "view"), ("s1", "export")}
    assert all(c["before"]["allow"] and not c["after"]["allow"] for c in changes)


def test_what_if_with_named_callers(files: dict[str, Path], tmp_path: Path, capsys):
    callers = _write(
        tmp_path / "callers.json",
        [{"sub": "dr-cy", "role": "clinician", "org": "site-c", "purpose_of_use": ["TREAT"]}],
    )
    argv = ["policy", "what-if", "--patient", "Patient/p1", "--consent", str(files["bundle"])]
    argv += ["--study-file", str(files["studies"]), "--callers", str(callers), "--action", "view"]
    assert main([*argv, "--policy-dir", str(POLICY_DIR)]) == 0
    assert "0 of 2 decisions change" in capsys.readouterr().out


def test_what_if_for_a_patient_without_studies(files: dict[str, Path], capsys):
    argv = ["policy", "what-if", "--patient", "p9", "--consent", str(files["opt_out"])]
    assert main([*argv, "--study-file", str(files["studies"])]) == 2
    assert "no study of patient 'p9'" in capsys.readouterr().err


def test_policy_without_a_tool_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    assert main(["policy"]) == 2
    assert "TOOL is required" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["test", "explain", "what-if"])
def test_every_policy_tool_has_help(tool: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        main(["policy", tool, "--help"])
    assert exited.value.code == 0
    assert f"usage: exchange policy {tool}" in capsys.readouterr().out
