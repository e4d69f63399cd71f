"""compose/ followed as written, without a container engine: real processes on loopback.

Each service runs with its compose environment and secrets (files from make-secrets.sh
in an ``EXCHANGE_SECRETS_DIR``, named as compose mounts them), certificates from the
``certs`` service's own ``exchange certs init`` arguments, and the migrate services'
``exchange db upgrade`` before start-up (the services do not upgrade themselves). What
differs from containers is only where things are: certificate and data paths under a
scratch directory, SQLite files instead of the PostgreSQL servers, free loopback ports,
and the OPA server replaced by tests/opa_stub.py over the same ``policies/``. The
dev-idp profile is followed, because it is the one with an IdP that runs here: register
the node's client (``exchange dev client``), register the organisations as an operator,
import a study at the node and see it published to the hub over HTTPS.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom.data import get_testdata_file

from exchange.federation import free_port
from tests.opa_stub import OpaStub
from tests.unit.test_compose import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    MAKE_SECRETS,
    _command,
    _env_example,
    _environment,
    _interpolate,
    _secrets,
)

pytestmark = pytest.mark.integration

CONTAINER_CERTS = "/certs"
CONTAINER_DATA = "/var/lib/exchange"


@dataclass
class Recipe:
    root: Path
    services: dict[str, dict[str, Any]]
    hub_url: str
    ports: dict[str, int]
    opa_url: str
    processes: list[subprocess.Popen[bytes]]

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.pem"

    def env(self, name: str) -> dict[str, str]:
        """What the container of ``name`` sees, with its paths moved under ``root``."""
        service = self.services[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
        for key, value in _environment(service).items():
            env[key] = value.replace(f"{CONTAINER_CERTS}/", f"{self.root / 'certs'}/")
        run_secrets = self.root / "run" / name
        run_secrets.mkdir(parents=True, exist_ok=True)
        for source, target in _secrets(service):
            (run_secrets / target).write_bytes((self.root / "secrets" / source).read_bytes())
        env["EXCHANGE_SECRETS_DIR"] = str(run_secrets)
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == CONTAINER_DATA:
                env["EXCHANGE_DATA_DIR"] = str(self.root / "volumes" / source)
        env["EXCHANGE_HOST"] = "127.0.0.1"
        if name in self.ports:
            env["EXCHANGE_PORT"] = str(self.ports[name])
        if env.get("EXCHANGE_OPA_URL"):
            env["EXCHANGE_OPA_URL"] = self.opa_url
        return env

    def exchange(self, name: str, *args: str) -> str:
        """Run ``exchange ARGS`` as the service's container would (``docker compose exec``)."""
        done = subprocess.run(
            [sys.executable, "-m", "exchange", *args],
            env=self.env(name),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"exchange {' '.join(args)}: {done.stderr}"
        return done.stdout

    def run_service(self, name: str) -> None:
        """The service's own command, once (one-shot) or in the background."""
        command = _command(self.services[name])
        if self.services[name].get("restart") == "no":
            self.exchange(name, *command)
            return
        log = (self.root / f"{name}.log").open("wb")
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "exchange", *command],
                env=self.env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        """Until the service's compose health check passes (the probe itself, as Docker runs it)."""
        test = self.services[name]["healthcheck"]["test"][1:]
        assert test[0] == "python"
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                [sys.executable, *test[1:]], env=self.env(name), capture_output=True, text=True
            )
            if done.returncode == 0:
                return
            for process in self.processes:
                assert process.poll() is None, (self.root / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.3)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recipe]:
    root = tmp_path_factory.mktemp("compose")
    hub_port, node_port = free_port(), free_port()
    values = _env_example() | {
        "COMPOSE_PROFILES": "dev-idp",
        "HUB_HOSTNAME": "localhost",
        "HUB_PORT": str(hub_port),
        "OIDC_ISSUER": f"https://localhost:{hub_port}/idp",
    }
    services = _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), values)["services"]
    opa = services["opa"]
    policies = (COMPOSE_DIR / opa["volumes"][0].split(":")[0]).resolve()
    # ./make-secrets.sh, then the databases as SQLite files instead of PostgreSQL servers.
    subprocess.run(["sh", str(MAKE_SECRETS), str(root / "secrets")], check=True)
    for prefix in ("hub", "site_a", "site_b"):
        (root / "secrets" / f"{prefix}_database_url").write_text(
            f"sqlite:///{root / (prefix + '.db')}\n"
        )
    with OpaStub(policies) as stub:
        made = Recipe(
            root,
            services,
            f"https://localhost:{hub_port}",
            {"hub-dev-idp": hub_port, "site-a": node_port},
            stub.url,
            [],
        )
        certs = _command(services["certs"])
        certs[certs.index("--dir") + 1] = str(root / "certs")
        made.exchange("certs", *certs)
        try:
            yield made
        finally:
            for process in made.processes:
                process.terminate()
            for process in made.processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module")
def operator(recipe: Recipe) -> str:
    """The dev-idp profile's first start, as docs/deploy.md tells it; an operator's token."""
    # docker compose up -d hub-dev-idp: its database is upgraded first, then it serves.
    recipe.run_service("migrate-hub")
    recipe.run_service("hub-dev-idp")
    recipe.wait_healthy("hub-dev-idp")
    # docker compose exec -T hub-dev-idp exchange dev client ... > secrets/site_a_client_secret
    secret = recipe.exchange("hub-dev-idp", "dev", "client", "--id", "site-a", "--org", "site-a")
    (recipe.root / "secrets" / "site_a_client_secret").write_text(secret)
    token = recipe.exchange(
        "hub-dev-idp", "dev", "token", "--sub", "op", "--role", "operator", "--org", "hie"
    ).strip()
    with _hub(recipe, token) as hub:
        for org, part_of in (("hie", None), ("site-a", "hie")):
            body: dict[str, Any] = {"resourceType": "Organization", "id": org, "active": True}
            if part_of:
                body["partOf"] = {"reference": f"Organization/{part_of}"}
            answer = hub.put(
                f"/Organization/{org}",
                content=json.dumps(body),
                headers={"Content-Type": "application/fhir+json"},
            )
            assert answer.status_code in (200, 201), answer.text
    # docker compose up -d: the node, in production mode, behind mutual TLS.
    recipe.run_service("migrate-site-a")
    recipe.run_service("site-a")
    recipe.wait_healthy("site-a")
    return token


def _trust(recipe: Recipe) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(recipe.ca))


def _hub(recipe: Recipe, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{recipe.hub_url}/fhir",
        verify=_trust(recipe),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_the_dev_idp_recipe_publishes_a_site_study_to_the_hub(
    recipe: Recipe, operator: str
) -> None:
    sample = get_testdata_file("CT_small.dcm", download=False)
    assert sample is not None
    # exchange import at the node, beside the running service (its outbox publishes).
    recipe.exchange("site-a", "import", str(sample), "--tenant", "site-a", "--quiet")
    with _hub(recipe, operator) as hub:
        deadline = time.monotonic() + 60
        while True:
            found = hub.get("/ImagingStudy", params={"_summary": "count"})
            assert found.status_code == 200, found.text
            if found.json().get("total", 0) >= 1:
                break
            assert time.monotonic() < deadline, (recipe.root / "site-a.log").read_text()[-3000:]
            time.sleep(0.3)
        endpoint = hub.get("/Endpoint", params={"identifier": "urn:exchange:node|site-a"})
        assert endpoint.status_code == 200
        assert endpoint.json().get("total", 1) >= 1


def test_the_node_wants_the_hub_certificate_and_a_grant(recipe: Recipe, operator: str) -> None:
    """mTLS as compose configures it: without the hub's client certificate no grant is
    even looked at, and the certificate alone is no grant either."""
    url = f"https://localhost:{recipe.ports['site-a']}/dicomweb/studies"
    with httpx.Client(verify=_trust(recipe), timeout=10) as client:
        answer = client.get(url)
    assert answer.status_code in (401, 403), answer.text
    context = _trust(recipe)
    certs = recipe.root / "certs"
    context.load_cert_chain(certs / "hub-client.pem", certs / "hub-client.key")
    with httpx.Client(verify=context, timeout=10) as client:
        answer = client.get(url)
    assert answer.status_code == 401, answer.text
