from pathlib import Path

import pytest

from exchange.config import load_settings
from exchange.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EXCHANGE_"):
            monkeypatch.delenv(key)


def test_defaults_are_safe():
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.dev_idp is False
    assert settings.dev_mode is False
    assert settings.policy_engine == "embedded"
    assert settings.grant_ttl_seconds <= 60
    assert settings.database("hub").startswith("sqlite:///")
    assert settings.data_path("hub").name == "hub"


def test_environment_overrides_toml_and_flags_override_environment(tmp_path, monkeypatch):
    config = tmp_path / "exchange.toml"
    config.write_text('port = 9001\nnode_id = "from-file"\nlog_level = "debug"\n')
    monkeypatch.setenv("EXCHANGE_PORT", "9002")
    settings = load_settings(config)
    assert settings.port == 9002
    assert settings.node_id == "from-file"
    assert settings.log_level == "debug"
    assert load_settings(config, port=9003).port == 9003


def test_config_file_from_environment(tmp_path, monkeypatch):
    config = tmp_path / "exchange.toml"
    config.write_text('[tenants.radiology]\norganization = "org-r"\n')
    monkeypatch.setenv("EXCHANGE_CONFIG", str(config))
    assert load_settings().tenants["radiology"].organization == "org-r"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("EXCHANGE_PORT", "notaport", "EXCHANGE_PORT"),
        ("EXCHANGE_PORT", "70000", "EXCHANGE_PORT"),
        ("EXCHANGE_LOG_LEVEL", "loud", "EXCHANGE_LOG_LEVEL"),
        ("EXCHANGE_GRANT_TTL_SECONDS", "3600", "EXCHANGE_GRANT_TTL_SECONDS"),
        ("EXCHANGE_HUB_URL", "ftp://hub", "EXCHANGE_HUB_URL"),
        ("EXCHANGE_TENANTS", "{not json", "tenants"),
    ],
)
def test_bad_values_name_the_setting(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    assert named in raised.value.message
    assert "\n" not in raised.value.message


def test_unknown_key_in_toml_is_refused(tmp_path):
    config = tmp_path / "exchange.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigurationError, match="EXCHANGE_PROT"):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_dev_idp_requires_dev_mode(monkeypatch):
    monkeypatch.setenv("EXCHANGE_DEV_IDP", "true")
    with pytest.raises(ConfigurationError, match="dev_mode"):
        load_settings()


def test_server_policy_engine_needs_url(monkeypatch):
    monkeypatch.setenv("EXCHANGE_POLICY_ENGINE", "server")
    with pytest.raises(ConfigurationError, match="opa_url"):
        load_settings()


def test_invalid_tenant_id_is_refused(monkeypatch):
    monkeypatch.setenv("EXCHANGE_TENANTS", '{"../etc": {"organization": "o"}}')
    with pytest.raises(ConfigurationError, match="TENANTS"):
        load_settings()


def test_data_dir_is_used(tmp_path: Path):
    settings = load_settings(data_dir=tmp_path)
    assert settings.data_path("hub") == tmp_path.resolve()
    assert str(tmp_path.resolve()) in settings.database("hub")
