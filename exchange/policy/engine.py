"""Policy engines behind one protocol: embedded (regorus) or an OPA server.

Both answer the value of a Rego rule for an input. An error, a timeout or an
undefined result is never an answer: callers get ``PolicyError`` and deny.

The embedded engine compiles ``policies/`` once per worker thread (a regorus
engine may only be used on the thread that made it), notices edits to the
policies or ``data.json`` (checked at most once a second) and recompiles, and
names what it runs by ``version``: a hash of the bundle it loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import regorus

from exchange.errors import ConfigurationError, Unavailable

log = logging.getLogger(__name__)

#: The rule whose evaluation proves the engine answers (readiness).
HEALTH_RULE = "data.exchange.access.allow"

#: How often, at most, the embedded engine looks for edited policy files.
RELOAD_INTERVAL_SECONDS = 1.0

#: Length of the bundle hash that names a policy version.
VERSION_LENGTH = 16


class PolicyError(Unavailable):
    """The engine could not decide. Treated as deny (fail closed)."""


class PolicyEngine(Protocol):
    def evaluate(self, rule: str, input_: Mapping[str, Any]) -> Any:
        """The value of ``rule`` (``data.pkg.name``) for ``input_``, or ``PolicyError``."""
        ...

    def check(self) -> None:
        """Raise unless the engine is loaded and answering."""
        ...


def policy_files(policy_dir: Path) -> tuple[list[Path], list[Path]]:
    """(policies, tests) under ``policy_dir``."""
    if not policy_dir.is_dir():
        raise ConfigurationError(f"EXCHANGE_POLICY_DIR: {policy_dir} is not a directory")
    rego = sorted(policy_dir.rglob("*.rego"))
    tests = [p for p in rego if p.name.endswith("_test.rego")]
    return [p for p in rego if p not in tests], tests


@dataclass(frozen=True)
class Bundle:
    """What a policy directory holds: Rego sources and data, named by a hash."""

    version: str
    sources: tuple[tuple[str, str], ...]
    data: Mapping[str, Any]
    tests: tuple[tuple[str, str], ...] = ()

    def data_about(self) -> dict[str, str]:
        """What the policies are told about the bundle they are in."""
        exchange = self.data.get("exchange")
        semver = exchange.get("policy_version") if isinstance(exchange, Mapping) else None
        return {
            "revision": self.version,
            "version": f"{semver or 'unversioned'}+{self.version}",
        }

    def compile(self, *, include_tests: bool = False, coverage: bool = False) -> Any:
        """A fresh regorus engine with this bundle (its data tells the policies the version)."""
        engine = regorus.Engine()
        if coverage:
            engine.set_enable_coverage(True)
        for name, text in self.sources + (self.tests if include_tests else ()):
            engine.add_policy(name, text)
        engine.add_data(dict(self.data))
        engine.add_data({"exchange": {"bundle": self.data_about()}})
        return engine


def _signature(policy_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap fingerprint of the policy files: names, sizes and modification times."""
    found = []
    for path in sorted([*policy_dir.rglob("*.rego"), policy_dir / "data.json"]):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((str(path.relative_to(policy_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def load_bundle(policy_dir: Path) -> Bundle:
    """Read ``policy_dir``: every ``*.rego`` (tests apart) and ``data.json``.

    The version is the SHA-256 of the sorted file names and contents and of
    ``data.json``, cut to 16 hex digits; ``*_test.rego`` files do not count.
    """
    policies, tests = policy_files(policy_dir)
    if not policies:
        raise ConfigurationError(f"EXCHANGE_POLICY_DIR: no Rego policies in {policy_dir}")
    digest = hashlib.sha256()
    sources = []
    for path in policies:
        name, text = str(path.relative_to(policy_dir)), path.read_text()
        sources.append((name, text))
        digest.update(f"{name}\0{len(text.encode())}\0".encode() + text.encode())
    data_file = policy_dir / "data.json"
    raw = data_file.read_bytes() if data_file.exists() else b"{}"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{data_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{data_file} must hold a JSON object")
    digest.update(b"data.json\0" + raw)
    return Bundle(
        version=digest.hexdigest()[:VERSION_LENGTH],
        sources=tuple(sources),
        data=data,
        tests=tuple((str(p.relative_to(policy_dir)), p.read_text()) for p in tests),
    )


def _first_line(exc: BaseException) -> str:
    """regorus errors carry a source excerpt and often a Rust backtrace: keep the gist."""
    text = str(exc).split("Stack backtrace")[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = next((line for line in lines if line.startswith("-->")), "")
    what = next((line for line in reversed(lines) if line.startswith("error:")), "")
    return " ".join(part for part in (what, where.removeprefix("--> ")) if part) or (
        lines[0] if lines else type(exc).__name__
    )


class EmbeddedEngine:
    """regorus, in process; one compiled engine per worker thread, reloaded on edits."""

    def __init__(
        self, policy_dir: Path, *, include_tests: bool = False, watch: bool = True
    ) -> None:
        self.policy_dir = policy_dir
        self._include_tests = include_tests
        self._watch = watch
        self._lock = threading.Lock()
        self._local = threading.local()
        self._signature = _signature(policy_dir) if policy_dir.is_dir() else ()
        self._bundle = self._load()
        self._checked = time.monotonic()
        #: Why the last reload was refused (the engine keeps the policies it had).
        self.reload_error: str | None = None

    def _load(self) -> Bundle:
        bundle = load_bundle(self.policy_dir)
        try:
            engine = bundle.compile(include_tests=self._include_tests)
            self.packages: list[str] = list(engine.get_packages())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # regorus raises RuntimeError, or a pyo3 panic
            raise ConfigurationError(
                f"policies in {self.policy_dir} do not load: {_first_line(exc)}"
            ) from None
        self._local.engine, self._local.version = engine, bundle.version
        return bundle

    @property
    def version(self) -> str:
        """The hash of the policy bundle in force."""
        return self._bundle.version

    def refresh(self, *, force: bool = False) -> None:
        """Reload if a policy file or ``data.json`` changed (looked at once a second)."""
        now = time.monotonic()
        if not force and (not self._watch or now - self._checked < RELOAD_INTERVAL_SECONDS):
            return
        with self._lock:
            if not force and now - self._checked < RELOAD_INTERVAL_SECONDS:
                return
            self._checked = now
            signature = _signature(self.policy_dir) if self.policy_dir.is_dir() else ()
            if signature == self._signature:
                return
            self._signature = signature
            old = self._bundle.version
            try:
                self._bundle = self._load()
            except ConfigurationError as exc:
                self.reload_error = exc.message
                log.error("policy reload refused, keeping version %s: %s", old, exc.message)
                return
            self.reload_error = None
            if self._bundle.version != old:
                log.info("policies reloaded: version %s -> %s", old, self._bundle.version)

    def _engine(self) -> Any:
        self.refresh()
        bundle = self._bundle
        if getattr(self._local, "version", None) != bundle.version:
            self._local.engine = bundle.compile(include_tests=self._include_tests)
            self._local.version = bundle.version
        return self._local.engine

    def evaluate(self, rule: str, input_: Mapping[str, Any]) -> Any:
        try:
            engine = self._engine()
            engine.set_input(input_ if isinstance(input_, dict) else dict(input_))
            value = engine.eval_rule(rule)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # regorus raises RuntimeError, or a pyo3 panic
            raise PolicyError(f"policy evaluation failed: {_first_line(exc)}") from None
        if value is None:
            raise PolicyError(f"policy rule {rule} is undefined")
        return value

    def query(self, query: str) -> Any:
        """Evaluate a whole query (used to run ``test_`` rules)."""
        return self._engine().eval_query(query)

    def check(self) -> None:
        if not isinstance(self.evaluate(HEALTH_RULE, {}), bool):
            raise PolicyError(f"{HEALTH_RULE} is not a boolean")


class ServerEngine:
    """A real OPA server reached over its REST Data API (``POST /v1/data/<rule>``)."""

    def __init__(self, url: str, timeout: float = 2.0, verify: str | bool = True) -> None:
        """``verify``: for https, True (public CAs) or a CA bundle path (``tls_ca_file``)."""
        from urllib.parse import urlsplit

        from opa_client import OpaClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"EXCHANGE_OPA_URL: {url!r} is not an http(s) URL")
        if parts.path not in ("", "/"):
            raise ConfigurationError(f"EXCHANGE_OPA_URL: {url!r}: a path prefix is not supported")
        self.url = url
        self.timeout = timeout
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            # opa-python-client hands ``ssl`` to requests as ``verify`` (a bool or a CA path).
            ssl=verify if parts.scheme == "https" else False,
            timeout=timeout,
            retries=0,  # a retry would only stretch the time to a fail-closed answer
        )

    def evaluate(self, rule: str, input_: Mapping[str, Any]) -> Any:
        import requests

        package, _, name = rule.removeprefix("data.").rpartition(".")
        try:
            answer = self._client.query_rule(
                input_data=dict(input_), package_path=package.replace(".", "/"), rule_name=name
            )
        except requests.Timeout:
            raise PolicyError(f"OPA server did not answer within {self.timeout:g} s") from None
        except requests.ConnectionError:
            raise PolicyError("OPA server is unreachable") from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise PolicyError(f"OPA server answered HTTP {status}") from None
        except ValueError:
            raise PolicyError("OPA server answered something that is not JSON") from None
        except Exception as exc:  # anything else the client raises: still no decision
            raise PolicyError(f"OPA server did not answer: {type(exc).__name__}") from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise PolicyError(f"policy rule {rule} is undefined")
        return answer["result"]

    def check(self) -> None:
        if not isinstance(self.evaluate(HEALTH_RULE, {}), bool):
            raise PolicyError(f"{HEALTH_RULE} is not a boolean")

    def close(self) -> None:
        self._client.close_connection()


def open_engine(
    kind: str,
    policy_dir: Path,
    opa_url: str | None,
    *,
    timeout: float = 2.0,
    verify: str | bool = True,
) -> PolicyEngine:
    if kind == "server":
        if not opa_url:
            raise ConfigurationError("EXCHANGE_OPA_URL is required for the server policy engine")
        return ServerEngine(opa_url, timeout=timeout, verify=verify)
    return EmbeddedEngine(policy_dir)
