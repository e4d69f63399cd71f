"""kill -9 of a node in the middle of a bulk STOW-RS: nothing acknowledged is lost."""

from __future__ import annotations

import io
import json
import threading
import uuid
from pathlib import Path

import httpx
import pydicom
import pytest

from exchange.config import load_settings
from exchange.federation import LocalFederation, NodeSpec
from exchange.node.services import build
from tests.dicomdata import generated

pytestmark = pytest.mark.integration

SPEC = NodeSpec("site-k", "org-k", "tenant-k")
ITERATIONS = 3
INSTANCES = 40


def _stow_body(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _sender(
    url: str, key: str, items: list[bytes], acknowledged: list[str], started: threading.Event
) -> None:
    """Store one instance per request; record only what the node acknowledged as stored."""
    with httpx.Client(timeout=30) as client:
        for data in items:
            body, content_type = _stow_body(data)
            try:
                response = client.post(
                    f"{url}/dicomweb/studies",
                    content=body,
                    headers={"X-API-Key": key, "Content-Type": content_type},
                )
            except httpx.HTTPError:
                return  # the node died under us: whatever was not acknowledged may be lost
            if response.status_code == 200:
                stored = response.json().get("00081199", {}).get("Value", [])
                acknowledged += [item["00081155"]["Value"][0] for item in stored]
                started.set()


def _node_settings(federation: LocalFederation):  # type: ignore[no-untyped-def]
    env = federation.node(SPEC.node_id).env
    return load_settings(
        data_dir=Path(env["EXCHANGE_DATA_DIR"]),
        node_id=SPEC.node_id,
        tenants=json.loads(env["EXCHANGE_TENANTS"]),
        database_url=env.get("EXCHANGE_DATABASE_URL"),
    )


def test_acknowledged_instances_survive_kill_9(tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    originals: dict[str, bytes] = {}
    for index, data in enumerate(
        generated(patient_id="K-1", accession="KILL", slices=INSTANCES, size=96)
    ):
        originals[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = data
        (folder / f"{index:03}.dcm").write_bytes(data)
    items = list(originals.values())

    with LocalFederation(tmp_path / "fed", [SPEC]) as federation:
        key = federation.api_key(SPEC.node_id)
        acknowledged: list[str] = []
        for iteration in range(ITERATIONS):
            started = threading.Event()
            sender = threading.Thread(
                target=_sender,
                args=(federation.node(SPEC.node_id).url, key, items, acknowledged, started),
            )
            sender.start()
            assert started.wait(60), "the node acknowledged nothing"
            threading.Event().wait(0.05 * (iteration + 1))  # die at a different point each time
            federation.kill(SPEC.node_id)
            sender.join(60)
            federation.restart(SPEC.node_id)

            services = build(_node_settings(federation))
            try:
                tenant = SPEC.tenant
                for sop in set(acknowledged):
                    out = io.BytesIO()
                    services.store.copy_out(tenant, sop, out)
                    assert out.getvalue()[128:] == originals[sop][128:], sop
                # Nothing half-written is visible: every indexed instance decrypts whole.
                for view in services.store.instances(tenant):
                    out = io.BytesIO()
                    services.store.copy_out(tenant, view.sop_uid, out)
                    assert out.getvalue()[128:] == originals[view.sop_uid][128:]
            finally:
                services.close()

        # Re-running the import completes the rest, with nothing rejected.
        summary = federation.import_into(SPEC.node_id, folder)
        assert f"{INSTANCES} files:" in summary
        assert "0 rejected" in summary
        services = build(_node_settings(federation))
        try:
            assert len(services.store.instances(SPEC.tenant)) == INSTANCES
        finally:
            services.close()
        assert acknowledged, "some instances were acknowledged before the kills"
