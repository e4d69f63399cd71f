"""The ``exchange`` command: verbs, help, exit codes, one-line errors."""

import jwt
import pytest

from exchange import __version__
from exchange.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for verb in ("serve", "demo", "import", "dev"):
        assert verb in out


@pytest.mark.parametrize(
    "argv", [["serve", "hub"], ["serve", "node"], ["demo"], ["import"], ["dev", "token"]]
)
def test_every_verb_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    assert "usage: exchange" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_bad_port_is_one_line_and_exit_2(capsys):
    assert main(["serve", "hub", "--port", "notaport"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "invalid port 'notaport'" in err


def test_bad_environment_value_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("EXCHANGE_LOG_LEVEL", "shouty")
    assert main(["serve", "hub"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "EXCHANGE_LOG_LEVEL" in err


def test_unknown_verb_is_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_dev_token_refuses_when_idp_is_off(capsys):
    assert main(["dev", "token", "--sub", "a", "--role", "clinician", "--org", "o"]) == 2
    assert "development IdP is off" in capsys.readouterr().err


def test_dev_token_with_idp_on(capsys, monkeypatch):
    monkeypatch.setenv("EXCHANGE_DEV_MODE", "true")
    monkeypatch.setenv("EXCHANGE_DEV_IDP", "true")
    assert (
        main(
            [
                "dev",
                "token",
                "--sub",
                "dr-x",
                "--role",
                "clinician",
                "--org",
                "org-b",
                "--purpose",
                "ETREAT",
                "--patient",
                "p1",
                "--ttl",
                "60",
            ]
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "dr-x"
    assert claims["org"] == "org-b"
    assert claims["purpose_of_use"] == ["ETREAT"]
    assert claims["patient"] == "p1"
    assert claims["exp"] - claims["iat"] == 60


def test_dev_token_rejects_unknown_role(capsys):
    assert main(["dev", "token", "--sub", "a", "--role", "admin", "--org", "o"]) == 2


def test_dev_token_with_a_bad_state_file(capsys, tmp_path):
    state = tmp_path / "state.json"
    state.write_text("{}")
    assert (
        main(
            [
                "dev",
                "token",
                "--sub",
                "a",
                "--role",
                "clinician",
                "--org",
                "o",
                "--state",
                str(state),
            ]
        )
        == 2
    )
    assert "not a demo state file" in capsys.readouterr().err


def test_import_of_missing_path_is_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EXCHANGE_TENANTS", '{"t": {"organization": "o"}}')
    assert (
        main(
            ["import", str(tmp_path / "absent"), "--tenant", "t", "--data-dir", str(tmp_path / "d")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
