"""What compose/ relies on in the code: the health probe, the secrets directory, dev clients."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from exchange import cli, probe
from exchange.config import load_settings
from exchange.errors import ConfigurationError
from exchange.security import devidp


class _Health(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        status = {"/healthz": 200, "/readyz": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_probe_targets_its_own_service_over_https_when_it_serves_https() -> None:
    assert probe.target(None, {"EXCHANGE_PORT": "9000"}) == "http://127.0.0.1:9000/healthz"
    env = {"EXCHANGE_PORT": "8443", "EXCHANGE_TLS_CERT_FILE": "/certs/hub.pem"}
    assert probe.target("/readyz", env) == "https://127.0.0.1:8443/readyz"
    assert probe.target("http://x:1/healthz", env) == "http://x:1/healthz"


def test_probe_exits_0_only_on_200(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"EXCHANGE_PORT": str(server)}
    assert probe.main([f"http://127.0.0.1:{server}/healthz"]) == 0
    assert probe.main([f"http://127.0.0.1:{server}/readyz"]) == 1
    assert "HTTP 503" in capsys.readouterr().err
    assert probe.probe(probe.target("/nothing", env), env)[0] is False
    assert probe.main(["a", "b"]) == 2


def test_probe_reports_a_service_that_is_down() -> None:
    from exchange.federation import free_port

    healthy, line = probe.probe(f"https://127.0.0.1:{free_port()}/healthz", {}, timeout=2)
    assert not healthy
    assert "ConnectionRefusedError" in line


def test_settings_read_secret_files_named_after_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "EXCHANGE_MASTER_KEY").write_text("a2V5\n")
    (tmp_path / "EXCHANGE_DATABASE_URL").write_text("postgresql+psycopg://u:p@db/x\n")
    monkeypatch.setenv("EXCHANGE_SECRETS_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.master_key is not None
    assert settings.master_key.get_secret_value() == "a2V5"
    assert settings.database_url == "postgresql+psycopg://u:p@db/x"
    monkeypatch.setenv("EXCHANGE_DATABASE_URL", "sqlite:///env.db")  # the environment wins
    assert load_settings().database_url == "sqlite:///env.db"


def test_a_missing_secrets_directory_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGE_SECRETS_DIR", "/nonexistent/secrets")
    with pytest.raises(ConfigurationError, match="EXCHANGE_SECRETS_DIR"):
        load_settings()


def test_dev_client_registers_a_client_the_dev_idp_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXCHANGE_DATA_DIR", str(tmp_path))
    assert cli.main(["dev", "client", "--id", "site-a", "--org", "site-a"]) == 2  # IdP off
    assert "development IdP is off" in capsys.readouterr().err
    monkeypatch.setenv("EXCHANGE_DEV_MODE", "true")
    monkeypatch.setenv("EXCHANGE_DEV_IDP", "true")
    assert cli.main(["dev", "client", "--id", "site-a", "--org", "site-a"]) == 0
    secret = capsys.readouterr().out.strip()
    idp = devidp.DevIdentityProvider.open(tmp_path, "http://127.0.0.1:8080/idp", "exchange")
    answer = idp.token({"grant_type": "client_credentials"}, ("site-a", secret))
    assert answer["access_token"]
    with pytest.raises(devidp.OAuthError):
        idp.token({"grant_type": "client_credentials"}, ("site-a", secret + "x"))
    assert cli.main(["dev", "client", "--id", "bad id", "--org", "site-a"]) == 2
