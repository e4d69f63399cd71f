"""compose/ against the code: no container engine runs here, so the deployment is read.

Every check names what an operator would hit: a variable the code does not read (silently
ignored), a value the settings refuse (a service that never starts), a verb that does not
exist, a secret in the open, a certificate path that ``exchange certs init`` never writes,
a page of docs/deploy.md that no longer matches.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shlex
import subprocess
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from exchange import cli, config
from exchange.config import ENV_PREFIX, Settings, load_settings
from exchange.security import tls
from exchange.web import health

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
MAKE_SECRETS = COMPOSE_DIR / "make-secrets.sh"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

#: Variables compose itself reads from .env (not interpolated into the file).
COMPOSE_OWN = {"COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"}
#: EXCHANGE_* variables read by the settings loader rather than being settings.
LOADER_VARIABLES = {f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}SECRETS_DIR"}
#: Images of other projects the deployment may run, and what for.
THIRD_PARTY_IMAGES = {"openpolicyagent/opa": "policy", "postgres": "database"}
DEV_PROFILE = "dev-idp"
CERTS = tls.Layout(Path("/certs"))
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|TOKEN|KEY$|DATABASE_URL")

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


# -- reading the deployment ------------------------------------------------------------------


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env.example line {number} is not NAME=VALUE: {line!r}"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f".env.example: bad name {name!r}"
        assert name not in values, f".env.example sets {name} twice"
        values[name] = value
    return values


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution, on every string."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            name, op, default = match.group(1), match.group(2), match.group(3) or ""
            if name in env and (env[name] or op not in (":-",)):
                return env[name]
            if op in ("-", ":-"):
                return default
            raise AssertionError(f"${{{name}}} has no value in .env.example")

        return _VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return _env_example()


@pytest.fixture(scope="module")
def compose(env_example: dict[str, str]) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(raw, dict)
    data = _interpolate(raw, env_example)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    assert found
    return found


def _project(services: dict[str, dict[str, Any]], image: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("image") == image}


@pytest.fixture(scope="module")
def image(env_example: dict[str, str]) -> str:
    return env_example["EXCHANGE_IMAGE"]


@pytest.fixture(scope="module")
def ours(services: dict[str, dict[str, Any]], image: str) -> dict[str, dict[str, Any]]:
    return _project(services, image)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _secrets(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, file name in /run/secrets) of each secret the service mounts."""
    found = []
    for entry in service.get("secrets", []):
        if isinstance(entry, str):
            found.append((entry, entry))
        else:
            found.append((entry["source"], entry.get("target", entry["source"])))
    return found


def _serving(ours: dict[str, dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The services running ``exchange serve ROLE``: name -> (role, service)."""
    found = {}
    for name, service in ours.items():
        command = _command(service)
        if command[:1] == ["serve"]:
            found[name] = (command[1], service)
    return found


def _verb_path(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The sub-command words of ``words`` (``serve hub``, ``db upgrade``...)."""
    path: list[str] = []
    current = parser
    for word in words:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        path.append(word)
        current = sub.choices[word]
    leaf_has_verbs = any(isinstance(a, argparse._SubParsersAction) for a in current._actions)
    assert not leaf_has_verbs, f"`exchange {' '.join(words)}` stops before a sub-command"
    return path


def _field_of(name: str) -> tuple[str, Any]:
    """The Settings field an ``EXCHANGE_*`` variable sets (nested delimiter ``__``)."""
    parts = name.removeprefix(ENV_PREFIX).lower().split("__")
    fields: Mapping[str, Any] = Settings.model_fields
    field = None
    for part in parts:
        assert part in fields, f"{name}: {part!r} is not a setting the code reads"
        field = fields[part]
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
        models = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        fields = models[0].model_fields if models else {}
    return parts[0], field


# -- the variables are the code's -------------------------------------------------------------


def test_every_variable_used_is_in_env_example_and_every_line_there_is_used(
    env_example: dict[str, str],
) -> None:
    text = COMPOSE_FILE.read_text()
    used = {m.group(1) for m in _VARIABLE.finditer(text)}
    assert used, "the compose file interpolates nothing"
    missing = used - env_example.keys()
    assert not missing, f".env.example lacks {sorted(missing)}"
    unused = env_example.keys() - used - COMPOSE_OWN
    assert not unused, f".env.example sets {sorted(unused)}, which the compose file never uses"
    assert env_example.get("COMPOSE_PROFILES") in ("oidc", DEV_PROFILE)


def test_every_exchange_variable_is_a_setting(ours: dict[str, dict[str, Any]]) -> None:
    source = inspect.getsource(config)
    for name in LOADER_VARIABLES:
        assert name.removeprefix(ENV_PREFIX) in source, f"config.py no longer reads {name}"
    checked = 0
    for service_name, service in ours.items():
        for name in _environment(service):
            assert name.startswith(ENV_PREFIX), f"{service_name}: {name} is read by nothing"
            if name not in LOADER_VARIABLES:
                _field_of(name)
                checked += 1
        for _, target in _secrets(service):
            assert target.startswith(ENV_PREFIX), (
                f"{service_name}: secret file {target} is named after no setting"
            )
            _field_of(target)
    assert checked > 20


def test_every_project_service_runs_a_real_verb_of_the_project_image(
    services: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]], image: str
) -> None:
    parser = cli.build_parser()
    for name, service in services.items():
        if name in ours:
            build = service.get("build") or {}
            context = (COMPOSE_DIR / build.get("context", ".")).resolve()
            assert context == ROOT, f"{name}: builds from {context}, not the repository"
            assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
            assert "entrypoint" not in service, f"{name}: the image's entrypoint is `exchange`"
            command = _command(service)
            try:
                parser.parse_args(command)
            except SystemExit:
                pytest.fail(f"{name}: `exchange {' '.join(command)}` is not a valid command")
            assert _verb_path(parser, command), f"{name}: no exchange verb in {command}"
        else:
            repository = service["image"].rsplit(":", 1)[0]
            assert repository in THIRD_PARTY_IMAGES, f"{name}: image {service['image']}"
            assert ":" in service["image"], f"{name}: pin the image's version"
    roles = sorted(role for role, _ in _serving(ours).values())
    assert roles.count("node") == 2
    assert "hub" in roles


def _secret_files(tmp_path: Path) -> Path:
    """The secrets ./make-secrets.sh writes (run for real, into a scratch directory)."""
    made = tmp_path / "secrets"
    subprocess.run(["sh", str(MAKE_SECRETS), str(made)], check=True, capture_output=True)
    return made


def _load(
    service: dict[str, Any], made: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The service's settings, as its container would load them."""
    run_secrets = tmp / "run-secrets"
    run_secrets.mkdir(parents=True)
    declared = {}
    for source, target in _secrets(service):
        declared[source] = target
        (run_secrets / target).write_bytes((made / source).read_bytes())
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            patch.delenv(name)
        for name, value in _environment(service).items():
            patch.setenv(name, value)
        if "EXCHANGE_SECRETS_DIR" in _environment(service):
            patch.setenv("EXCHANGE_SECRETS_DIR", str(run_secrets))
        return load_settings()


def test_every_service_loads_its_settings_and_production_ones_pass_the_start_up_checks(
    ours: dict[str, dict[str, Any]],
    compose: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = _secret_files(tmp_path)
    for source, declared in compose["secrets"].items():
        assert set(declared) == {"file"}, f"secret {source}: only files, never inline values"
        path = (COMPOSE_DIR / declared["file"]).resolve()
        assert path.parent == COMPOSE_DIR / "secrets", f"secret {source}: outside ./secrets"
        assert (made / path.name).is_file(), f"make-secrets.sh does not create {path.name}"
    serving = _serving(ours)
    for name, service in ours.items():
        profiles = service.get("profiles", [])
        settings = _load(service, made, tmp_path / name, monkeypatch)
        if name not in serving:
            continue
        role, _ = serving[name]
        if DEV_PROFILE in profiles:
            assert settings.dev_mode
            assert settings.dev_idp
        else:
            assert not settings.dev_mode, f"{name}: development mode"
            assert not settings.dev_idp, f"{name}: development IdP"
            # exactly what `exchange serve` checks first: HTTPS, https:// URLs, mTLS.
            tls.require_secure_transport(settings, role)
        assert settings.tls_cert_file, f"{name}: no HTTPS"
        assert settings.tls_key_file, f"{name}: no HTTPS key"
        assert settings.tls_ca_file is not None, f"{name}: trusts the public CAs only"
        assert not settings.database_auto_upgrade, f"{name}: the migrate step upgrades"
        assert (settings.database_url or "").startswith("postgresql+psycopg://")
        assert settings.metrics_token is not None
        assert settings.backup_key is not None
        if role == "node":
            assert settings.master_key is not None
            assert settings.hub_client_secret is not None
            assert settings.tenants, f"{name}: a node without a tenant"


def test_dev_mode_only_in_the_dev_idp_profile(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = _environment(service)
        dev = any(
            env.get(f"{ENV_PREFIX}{v}", "false").lower() in ("true", "1", "yes")
            for v in ("DEV_MODE", "DEV_IDP")
        )
        assert dev == (DEV_PROFILE in service.get("profiles", [])), name
    hubs = [n for n, s in services.items() if _command(s)[:2] == ["serve", "hub"]]
    profiles = sorted(p for n in hubs for p in services[n].get("profiles", []))
    assert profiles == [DEV_PROFILE, "oidc"], "one hub per IdP choice, each in its profile"


def test_the_pieces_fit_certificates_urls_grants(
    ours: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    serving = _serving(ours)
    certs = next(s for s in ours.values() if _command(s)[:2] == ["certs", "init"])
    args = cli.build_parser().parse_args(_command(certs))
    assert args.dir == CERTS.directory
    hubs = {n: s for n, (role, s) in serving.items() if role == "hub"}
    nodes = {n: s for n, (role, s) in serving.items() if role == "node"}
    assert sorted(args.node) == sorted(nodes), "certs init must make one certificate per node"
    public = {_environment(s)["EXCHANGE_PUBLIC_URL"] for s in hubs.values()}
    assert len(public) == 1
    hub_url = public.pop()
    assert urlsplit(hub_url).hostname in args.hub_host
    for name, service in hubs.items():
        env = _environment(service)
        assert env["EXCHANGE_TLS_CERT_FILE"] == str(CERTS.hub.cert)
        assert env["EXCHANGE_TLS_KEY_FILE"] == str(CERTS.hub.key)
        assert env["EXCHANGE_TLS_CLIENT_CERT_FILE"] == str(CERTS.hub_client.cert)
        assert env["EXCHANGE_TLS_CLIENT_KEY_FILE"] == str(CERTS.hub_client.key)
        aliases = service["networks"]["federation"]["aliases"]
        assert urlsplit(hub_url).hostname in aliases, f"{name}: nodes cannot reach {hub_url}"
        assert f"{urlsplit(hub_url).port}:{urlsplit(hub_url).port}" in service["ports"]
    for name, service in nodes.items():
        env = _environment(service)
        assert env["EXCHANGE_NODE_ID"] == name, "the node's id is its host name and cert name"
        assert urlsplit(env["EXCHANGE_PUBLIC_URL"]).hostname == name
        # a grant's issuer is the hub's public URL: the node must call it that.
        assert env["EXCHANGE_HUB_URL"] == hub_url
        assert env["EXCHANGE_TLS_CERT_FILE"] == str(CERTS.node(name).cert)
        assert env["EXCHANGE_TLS_KEY_FILE"] == str(CERTS.node(name).key)
        assert env["EXCHANGE_TLS_CLIENT_CA_FILE"] == str(CERTS.client_ca.cert)
        assert tls.HUB_CLIENT_NAME in env["EXCHANGE_TLS_CLIENT_NAMES"]
        assert "federation" in service["networks"]
    assert env_example["TLS_CA_FILE"].startswith(f"{CERTS.directory}/")


def test_only_the_hub_publishes_a_port_and_databases_stay_private(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {n for n, s in services.items() if _command(s)[:2] == ["serve", "hub"]}
    for name, service in services.items():
        assert "network_mode" not in service or service["network_mode"] == "none", name
        assert "privileged" not in service, name
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: network {network} is undeclared"
    for name, network in compose["networks"].items():
        if name != "federation":
            assert network.get("internal") is True, f"network {name} must be internal"


def test_opa_loads_the_policies_directory_read_only(
    services: dict[str, dict[str, Any]], ours: dict[str, dict[str, Any]]
) -> None:
    opa = [(n, s) for n, s in services.items() if s["image"].startswith("openpolicyagent/opa:")]
    assert len(opa) == 1
    name, service = opa[0]
    command = _command(service)
    assert command[:2] == ["run", "--server"]
    (volume,) = service["volumes"]
    source, target, mode = volume.split(":")
    assert (COMPOSE_DIR / source).resolve() == ROOT / "policies"
    assert mode == "ro"
    assert command[-1] == target, "OPA must load the mounted policies"
    assert list((ROOT / "policies").rglob("*.rego"))
    assert (ROOT / "policies" / "data.json").is_file()
    port = next(c for c in command if c.startswith("--addr=")).rsplit(":", 1)[1]
    for hub_name, (role, hub) in _serving(ours).items():
        if role != "hub":
            continue
        env = _environment(hub)
        assert env["EXCHANGE_POLICY_ENGINE"] == "server"
        url = urlsplit(env["EXCHANGE_OPA_URL"])
        assert (url.hostname, str(url.port)) == (name, port), hub_name
        assert set(hub["networks"]) & set(service["networks"]), f"{hub_name} cannot reach OPA"
        assert hub["depends_on"][name]


def test_health_checks_hit_paths_the_apps_serve(services: dict[str, dict[str, Any]]) -> None:
    served = {route.path for route in health.router(list).routes}
    assert {"/healthz", "/readyz"} <= served
    from exchange.hub import app as hub_app
    from exchange.node import app as node_app

    for module in (hub_app, node_app):
        assert "finish(" in inspect.getsource(module), "health routes come with web.app.finish"
    for name, service in services.items():
        check = service.get("healthcheck")
        one_shot = service.get("restart") == "no"
        if one_shot:
            assert check == {"disable": True} or check is None, name
            continue
        if name == "opa":
            continue  # no shell or client in OPA's image; the hub's /readyz checks it
        assert check, f"{name}: no health check"
        assert not check.get("disable"), f"{name}: health check disabled"
        test = check["test"]
        assert test[0] == "CMD"
        if service["image"].startswith("postgres:"):
            assert test[1] == "pg_isready"
        else:
            assert test[1:4] == ["python", "-m", "exchange.probe"], name
            assert test[4] in served, f"{name}: {test[4]} is not served"
    (probe,) = [rest for word, rest in _dockerfile_instructions() if word == "HEALTHCHECK"]
    assert '"exchange.probe"' in probe
    assert re.search(r'"(/healthz|/readyz)"', probe)


def test_secrets_are_files_and_no_secret_is_inline(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    declared = set(compose["secrets"])
    used: set[str] = set()
    secret_fields = {
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in (field.annotation, *typing.get_args(field.annotation))
    }
    assert {"master_key", "hub_client_secret", "backup_key"} <= secret_fields
    for name, service in services.items():
        for source, _ in _secrets(service):
            assert source in declared, f"{name}: secret {source} is not declared"
            used.add(source)
        for key, value in _environment(service).items():
            if key.endswith("_FILE") or key in LOADER_VARIABLES:
                continue
            field = key.removeprefix(ENV_PREFIX).lower()
            assert field not in secret_fields, f"{name}: {key} belongs in a secret file"
            assert not SECRET_WORDS.search(key), f"{name}: {key} looks like a secret value"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{name}: {key} has a password"
        assert "env_file" not in service, f"{name}: env files end up in `docker inspect`"
    assert used == declared, f"declared but unused secrets: {sorted(declared - used)}"
    postgres = [s for s in services.values() if s["image"].startswith("postgres:")]
    assert len(postgres) == 3
    for service in postgres:
        env = _environment(service)
        assert "POSTGRES_PASSWORD" not in env
        assert env["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_volumes_restart_policies_and_order(
    services: dict[str, dict[str, Any]], compose: dict[str, Any], ours: dict[str, Any]
) -> None:
    named = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in named, f"{name}: volume {source} is not declared"
        expected = "no" if service.get("restart") == "no" else "unless-stopped"
        assert service.get("restart") == expected, f"{name}: restart policy"
        for needed, condition in (service.get("depends_on") or {}).items():
            assert needed in services, f"{name} depends on unknown {needed}"
            if services[needed].get("restart") == "no":
                assert condition["condition"] == "service_completed_successfully"
    for name, (_, service) in _serving(ours).items():
        data = [v for v in service["volumes"] if v.endswith(":/var/lib/exchange")]
        assert data, f"{name}: no data volume"
        assert data[0].split(":")[0] in named, f"{name}: its data on a named volume"
        assert f"{CERTS.directory}:ro" in " ".join(service["volumes"]), f"{name}: certs read-only"
        migrations = [
            d for d in service["depends_on"] if _command(services[d])[:2] == ["db", "upgrade"]
        ]
        assert migrations, f"{name} must start after `exchange db upgrade`"


def _dockerfile_instructions() -> Iterator[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def test_dockerfile_copies_what_the_package_needs_and_runs_unprivileged() -> None:
    instructions = list(_dockerfile_instructions())
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "the image must name its user"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    copied = {
        part.rstrip("/")
        for word, rest in instructions
        if word == "COPY" and not rest.startswith("--from")
        for part in rest.split()[:-1]
    }
    for needed in ("pyproject.toml", "constraints.txt", "exchange", "policies", "fhir_profiles"):
        assert needed in copied, f"the image lacks {needed}"
        assert (ROOT / needed).exists()
    # the package finds policies/ and fhir_profiles/ beside its own directory
    assert config._repo_policies() == ROOT / "policies"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "-c constraints.txt" in runs, "install pinned by constraints.txt, as bootstrap.sh does"
    for word, rest in instructions:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z][A-Z0-9_]*)=", rest):
                assert not SECRET_WORDS.search(name), f"the image bakes in {name}"
                if name.startswith(ENV_PREFIX):
                    _field_of(name)
    entry = next(rest for word, rest in instructions if word == "ENTRYPOINT")
    assert entry == '["exchange"]'
    ignored = DOCKERIGNORE.read_text().splitlines()
    assert "*" in ignored, ".dockerignore must start from nothing: no local state in the image"
    for needed in ("pyproject.toml", "constraints.txt", "exchange/", "policies/", "fhir_profiles/"):
        assert f"!{needed}" in ignored, f".dockerignore leaves out {needed}"


def test_deploy_doc_matches_the_compose_file(
    services: dict[str, dict[str, Any]], env_example: dict[str, str], compose: dict[str, Any]
) -> None:
    doc = DEPLOY_DOC.read_text()
    for name in services:
        assert f"`{name}`" in doc, f"docs/deploy.md does not mention service {name}"
    for name in env_example:
        assert f"`{name}`" in doc, f"docs/deploy.md does not mention {name}"
    for name in compose["secrets"]:
        assert f"`{name}`" in doc, f"docs/deploy.md does not mention secret {name}"
    for verb in (
        "exchange db upgrade",
        "exchange backup",
        "exchange restore",
        "exchange node api-key",
        "exchange certs init",
        "exchange dev client",
    ):
        assert verb in doc, f"docs/deploy.md does not explain `{verb}`"
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()
