"""``exchange demo`` exactly as a newcomer runs it: start, use, Ctrl-C, nothing left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

STATE_KEYS = {"hub", "idp", "nodes", "tokens", "patients"}
PERSONAS = {"clinician_a", "clinician_b", "operator", "site_a_system", "site_b_system"}


def _processes_using(root: Path) -> list[int]:
    """PIDs whose environment points into ``root`` (our servers carry EXCHANGE_DATA_DIR)."""
    marker = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def demo(tmp_path):
    state = tmp_path / "demo.json"
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "exchange", "demo", "--state", str(state), "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 120
    while not state.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"demo did not write its state file:\n{output}")
        time.sleep(0.2)
    yield process, json.loads(state.read_text()), data
    if process.poll() is None:
        process.kill()
        process.wait()


def test_demo_runs_the_federation_and_stops_cleanly(demo):
    process, state, data = demo
    assert set(state) >= STATE_KEYS
    assert set(state["tokens"]) >= PERSONAS
    assert set(state["nodes"]) == {"site-a", "site-b"}
    for node in state["nodes"].values():
        assert {"url", "organization", "tenant"} <= set(node)
    organizations = {node["organization"] for node in state["nodes"].values()}
    tenants = {node["tenant"] for node in state["nodes"].values()}
    assert len(organizations) == 2
    assert len(tenants) == 2
    for patient in state["patients"].values():
        assert {"system", "value", "name"} <= set(patient)

    urls = [state["hub"]] + [node["url"] for node in state["nodes"].values()]
    for url in urls:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200

    # The personas' tokens work against the hub, and the sites are registered there.
    operator = {"Authorization": f"Bearer {state['tokens']['operator']}"}
    org = httpx.get(f"{state['hub']}/fhir/Organization/site-a", headers=operator)
    assert org.status_code == 200, org.text
    endpoint = httpx.get(f"{state['hub']}/fhir/Endpoint/site-b", headers=operator).json()
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    discovery = httpx.get(f"{state['idp']}/.well-known/openid-configuration").json()
    assert discovery["issuer"] == state["idp"]

    # Sample studies were imported (encrypted) at both sites.
    for node_id in state["nodes"]:
        assert list((data / node_id / "blobs").rglob("*.enc")), node_id

    # `exchange dev token --state` signs with the running demo's IdP.
    minted = subprocess.run(
        [
            sys.executable,
            "-m",
            "exchange",
            "dev",
            "token",
            "--state",
            str(data.parent / "demo.json"),
            "--sub",
            "dr-new",
            "--role",
            "clinician",
            "--org",
            "site-b",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    headers = {"Authorization": f"Bearer {minted.stdout.strip()}"}
    assert httpx.get(f"{state['hub']}/fhir/Organization/site-b", headers=headers).status_code == 200

    assert _processes_using(data), "the servers should be running"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    time.sleep(0.5)
    assert _processes_using(data) == []
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_demo_stops_on_sigterm(demo):
    process, _state, data = demo
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    time.sleep(0.5)
    assert _processes_using(data) == []
