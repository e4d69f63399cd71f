"""Start a hub and site nodes as real processes on loopback.

The demo and the integration tests both use this, so what the tests exercise
is exactly what a newcomer runs: ``python -m exchange serve …`` processes on
free ports, each with its own data directory and log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from exchange.security import devidp, grants
from exchange.security.grants import Action
from exchange.security.keys import load_or_create
from exchange.security.tls import HUB_CLIENT_NAME, Layout, init_pki

READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0

#: Gives each service of every federation started from now on its own database (called
#: with the service's name, returns a SQLAlchemy URL). The test suite sets it when
#: EXCHANGE_TEST_DATABASE=postgresql; None: SQLite in each service's data directory.
database_provider: Callable[[str], str] | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM if the parent dies, so nothing is left behind."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Service:
    name: str
    url: str
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class NodeSpec:
    node_id: str
    organization: str
    tenant: str
    #: Further tenants hosted on the same node (tenant -> organisation), for multi-tenant tests.
    more_tenants: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalFederation:
    root: Path
    nodes: list[NodeSpec]
    hub_env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, str] = field(default_factory=dict)
    #: Nodes publish their studies to the hub (a dev-IdP client each); off for tests that
    #: want a hub index untouched by the nodes.
    publishing: bool = True
    services: dict[str, Service] = field(default_factory=dict)
    #: HTTPS everywhere from a development PKI (``certs init`` into ``root/pki``); nodes
    #: take hub grants only with the hub's client certificate (mutual TLS).
    tls: bool = False

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> LocalFederation:
        try:
            if self.tls:
                init_pki(self.pki.directory, nodes=[s.node_id for s in self.nodes], force=True)
            hub = self._spawn(
                "hub",
                ["serve", "hub"],
                {
                    "EXCHANGE_DEV_MODE": "true",
                    "EXCHANGE_DEV_IDP": "true",
                    **self._tls_env("hub"),
                    **self.hub_env,
                },
            )
            self._wait_ready(hub)
            for spec in self.nodes:
                tenants = {spec.tenant: {"organization": spec.organization}}
                tenants |= {t: {"organization": o} for t, o in spec.more_tenants.items()}
                node = self._spawn(
                    spec.node_id,
                    ["serve", "node"],
                    {
                        "EXCHANGE_NODE_ID": spec.node_id,
                        "EXCHANGE_TENANTS": json.dumps(tenants),
                        "EXCHANGE_HUB_URL": hub.url,
                        # Site systems authenticate with tokens from the hub's development IdP.
                        "EXCHANGE_ISSUERS": json.dumps([{"issuer": f"{hub.url}/idp"}]),
                        "EXCHANGE_DEV_MODE": "true",
                        **self._publishing_env(spec),
                        **self._tls_env(spec.node_id),
                        **self.node_env,
                    },
                )
                self._wait_ready(node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is still there."""
        running = [s for s in self.services.values() if s.process and s.process.poll() is None]
        for service in running:
            assert service.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for service in running:
            assert service.process is not None
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- access --------------------------------------------------------------
    @property
    def hub(self) -> Service:
        return self.services["hub"]

    def node(self, node_id: str) -> Service:
        return self.services[node_id]

    def kill(self, name: str) -> None:
        """SIGKILL a service's process group (crash tests)."""
        process = self.services[name].process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def restart(self, name: str) -> Service:
        """Start a stopped or killed service again, same port, data and settings."""
        service = self.services[name]
        if service.process is not None and service.process.poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._launch(service, ["serve", "hub"] if name == "hub" else ["serve", "node"])
        self._wait_ready(service)
        return service

    def replica(self, name: str, new_name: str) -> Service:
        """Start another process of service ``name`` on a new port, sharing its settings,
        data directory (keys), database and public URL: scale-out behind a load balancer
        (needs a database both can share, i.e. PostgreSQL)."""
        source = self.services[name]
        port = free_port()
        env = {
            **source.env,
            "EXCHANGE_PORT": str(port),
            "EXCHANGE_PUBLIC_URL": source.env.get("EXCHANGE_PUBLIC_URL", source.url),
        }
        scheme = source.url.split("://", 1)[0]
        replica = Service(
            new_name,
            f"{scheme}://127.0.0.1:{port}",
            source.data_dir,
            self.root / f"{new_name}.log",
            env=env,
        )
        self.services[new_name] = replica
        self._launch(replica, ["serve", "hub"] if name == "hub" else ["serve", "node"])
        self._wait_ready(replica)
        return replica

    def exchange(self, service: str, *args: str) -> str:
        """Run an ``exchange`` command with ``service``'s configuration; its stdout."""
        result = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "exchange", *args],
            env=self.services[service].env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"exchange {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def api_key(self, node_id: str) -> str:
        """A new STOW-RS API key for the node's tenant."""
        spec = next(s for s in self.nodes if s.node_id == node_id)
        return self.exchange(node_id, "node", "api-key", "--tenant", spec.tenant).strip()

    def import_into(self, node_id: str, path: Path) -> str:
        """``exchange import`` into the node's tenant, as a site operator would."""
        spec = next(s for s in self.nodes if s.node_id == node_id)
        return self.exchange(node_id, "import", str(path), "--tenant", spec.tenant, "--quiet")

    def grant(
        self,
        node_id: str,
        study: str,
        action: Action = "view",
        ttl: int = 30,
        caller: str = "test-caller",
    ) -> str:
        """A hub grant for ``study`` at ``node_id``, signed with the hub's key."""
        spec = next(s for s in self.nodes if s.node_id == node_id)
        key = load_or_create(self.hub.data_dir / "keys" / "grant-signing.pem")
        return grants.issue(
            key,
            issuer=self.hub.url,
            node=node_id,
            caller=caller,
            study=study,
            action=action,
            decision="test-decision",
            organization=spec.organization,
            ttl=ttl,
        )

    # -- TLS (tls=True) ---------------------------------------------------------
    @property
    def pki(self) -> Layout:
        return Layout(self.root / "pki")

    def verify(self, *, as_hub: bool = False) -> ssl.SSLContext | bool:
        """httpx ``verify=`` for calls into the federation: trust its CA; with ``as_hub``
        also present the hub's client certificate (what nodes require for grants)."""
        if not self.tls:
            return True
        context = ssl.create_default_context(cafile=self.pki.ca.cert)
        if as_hub:
            context.load_cert_chain(self.pki.hub_client.cert, self.pki.hub_client.key)
        return context

    def http(self, *, as_hub: bool = False, **options: Any) -> httpx.Client:
        """An httpx client that reaches the federation's services (see ``verify``)."""
        return httpx.Client(verify=self.verify(as_hub=as_hub), **options)

    def _tls_env(self, name: str) -> dict[str, str]:
        if not self.tls:
            return {}
        own = self.pki.hub if name == "hub" else self.pki.node(name)
        env = {
            "EXCHANGE_TLS_CERT_FILE": str(own.cert),
            "EXCHANGE_TLS_KEY_FILE": str(own.key),
            "EXCHANGE_TLS_CA_FILE": str(self.pki.ca.cert),
        }
        if name == "hub":
            env["EXCHANGE_TLS_CLIENT_CERT_FILE"] = str(self.pki.hub_client.cert)
            env["EXCHANGE_TLS_CLIENT_KEY_FILE"] = str(self.pki.hub_client.key)
        else:
            env["EXCHANGE_TLS_CLIENT_CA_FILE"] = str(self.pki.client_ca.cert)
            env["EXCHANGE_TLS_CLIENT_NAMES"] = json.dumps([HUB_CLIENT_NAME])
        return env

    def database_url(self, name: str) -> str:
        """The SQLAlchemy URL of ``name``'s database (its setting, else its SQLite file)."""
        service = self.services[name]
        return service.env.get("EXCHANGE_DATABASE_URL") or (
            f"sqlite:///{service.data_dir / 'exchange.db'}"
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name} ({s.log_path}) ---\n{s.log_tail()}" for s in self.services.values()
        )

    # -- internals -----------------------------------------------------------
    def _publishing_env(self, spec: NodeSpec) -> dict[str, str]:
        """The node's site-system client at the hub's development IdP (registered now)."""
        if not self.publishing:
            return {}
        hub = self.hub
        audience = self.hub_env.get("EXCHANGE_AUDIENCE", "exchange")
        idp = devidp.DevIdentityProvider.open(hub.data_dir, f"{hub.url}/idp", audience)
        return {
            "EXCHANGE_HUB_CLIENT_ID": spec.node_id,
            "EXCHANGE_HUB_CLIENT_SECRET": idp.register_client(spec.node_id, spec.organization),
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Service:
        port = free_port()
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")},
            "EXCHANGE_HOST": "127.0.0.1",
            "EXCHANGE_PORT": str(port),
            "EXCHANGE_DATA_DIR": str(data_dir),
            **({"EXCHANGE_DATABASE_URL": database_provider(name)} if database_provider else {}),
            **env,
        }
        service = Service(
            name,
            f"{'https' if self.tls else 'http'}://127.0.0.1:{port}",
            data_dir,
            self.root / f"{name}.log",
            env=full_env,
        )
        self._launch(service, args)
        self.services[name] = service
        return service

    @staticmethod
    def _launch(service: Service, args: list[str]) -> None:
        with service.log_path.open("ab") as log:
            service.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "exchange", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=service.env,
                preexec_fn=_die_with_parent,
            )

    def _wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert service.process is not None
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}:\n"
                    f"{service.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{service.url}/readyz", timeout=2, verify=self.verify())
                if ready.status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"{service.name} was not ready within {READY_TIMEOUT_SECONDS:.0f}s:\n"
            f"{service.log_tail()}"
        )
