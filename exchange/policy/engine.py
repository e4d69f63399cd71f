"""Policy engines behind one protocol: embedded (regorus) or an OPA server.

Both answer the value of a Rego rule for an input. An error, a timeout or an
undefined result is never an answer: callers get ``PolicyError`` and deny.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Protocol

import regorus

from exchange.errors import ConfigurationError, Unavailable

#: The rule whose evaluation proves the engine answers (readiness).
HEALTH_RULE = "data.exchange.access.allow"


class PolicyError(Unavailable):
    """The engine could not decide. Treated as deny (fail closed)."""


class PolicyEngine(Protocol):
    def evaluate(self, rule: str, input_: dict[str, Any]) -> Any:
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


class EmbeddedEngine:
    """regorus, in process.

    A regorus engine may only be used on the thread that made it, so each
    worker thread compiles its own copy from the same sources on first use.
    """

    def __init__(self, policy_dir: Path, *, include_tests: bool = False) -> None:
        policies, tests = policy_files(policy_dir)
        if not policies:
            raise ConfigurationError(f"EXCHANGE_POLICY_DIR: no Rego policies in {policy_dir}")
        self._sources = [
            (str(p.relative_to(policy_dir)), p.read_text())
            for p in policies + (tests if include_tests else [])
        ]
        data_file = policy_dir / "data.json"
        try:
            self._data = json.loads(data_file.read_text()) if data_file.exists() else {}
        except ValueError as exc:
            raise ConfigurationError(f"{data_file} is not valid JSON: {exc}") from None
        self._local = threading.local()
        try:
            self.packages: list[str] = list(self._engine().get_packages())
        except RuntimeError as exc:
            raise ConfigurationError(f"policies in {policy_dir} do not load: {exc}") from None

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = regorus.Engine()
            for name, text in self._sources:
                engine.add_policy(name, text)
            engine.add_data(self._data)
            self._local.engine = engine
        return engine

    def evaluate(self, rule: str, input_: dict[str, Any]) -> Any:
        try:
            engine = self._engine()
            engine.set_input(input_)
            value = engine.eval_rule(rule)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # regorus raises RuntimeError, or a pyo3 panic
            raise PolicyError(f"policy evaluation failed: {type(exc).__name__}") from None
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
    """A real OPA server reached over its REST Data API."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        from urllib.parse import urlsplit

        from opa_client import OpaClient

        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigurationError(f"EXCHANGE_OPA_URL: {url!r} has no host")
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
            timeout=timeout,
        )

    def evaluate(self, rule: str, input_: dict[str, Any]) -> Any:
        package, _, name = rule.removeprefix("data.").rpartition(".")
        try:
            answer = self._client.query_rule(
                input_data=input_, package_path=package.replace(".", "/"), rule_name=name
            )
        except Exception as exc:  # network errors, HTTP errors: all mean "no decision"
            raise PolicyError(f"OPA server did not answer: {type(exc).__name__}") from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise PolicyError(f"policy rule {rule} is undefined")
        return answer["result"]

    def check(self) -> None:
        if not isinstance(self.evaluate(HEALTH_RULE, {}), bool):
            raise PolicyError(f"{HEALTH_RULE} is not a boolean")


def open_engine(kind: str, policy_dir: Path, opa_url: str | None) -> PolicyEngine:
    if kind == "server":
        if not opa_url:
            raise ConfigurationError("EXCHANGE_OPA_URL is required for the server policy engine")
        return ServerEngine(opa_url)
    return EmbeddedEngine(policy_dir)
