"""What the fault-injection tests share: a seeded random source, a site (node + hub)
spoken to only over HTTP and the CLI, and the checks made after every restart.

The checks look from outside, as a client would: an instance is there when the node
serves it through a hub grant, byte for byte (the 128-byte preamble aside, which the
node zeroes); QIDO must list exactly what WADO serves, so a half-written instance
would show up as a difference.
"""

from __future__ import annotations

import io
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pydicom

from exchange.dicom.multipart import MultipartReader, media_type
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create

SEED_ENV = "EXCHANGE_FAULT_SEED"
DICOM_UID = "urn:dicom:uid"
EXPORT_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
T = TypeVar("T")
#: The nodes of the kill -9 modules' shared federation (conftest.py).
INGEST = NodeSpec("site-fi", "org-fi", "tenant-fi")
PUBLISHING = NodeSpec("site-fp", "org-fp", "tenant-fp")


def seed(name: str) -> int:
    """This run's seed (``EXCHANGE_FAULT_SEED`` replays one), printed for the record."""
    value = int(os.environ.get(SEED_ENV) or secrets.randbelow(2**31))
    print(f"{name}: fault seed {value} (replay with {SEED_ENV}={value})")
    return value


def stow_body(instances: Iterable[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
            for data in instances
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def study_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


def eventually(check: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


@dataclass
class Tally:
    """What one fault suite tried and what went wrong, for ``reliability.report``."""

    inputs: int = 0
    crashes: int = 0
    server_errors: int = 0
    lost: int = 0
    audit_gaps: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, figure: str, text: str) -> None:
        setattr(self, figure, getattr(self, figure) + 1)
        if len(self.problems) < 20:
            self.problems.append(f"{figure}: {text}")

    def figures(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "crashes": self.crashes,
            "server_errors": self.server_errors,
            "lost": self.lost,
            "audit_gaps": self.audit_gaps,
        }


class Site:
    """One node of a ``LocalFederation`` and its hub, as the tests speak to them."""

    def __init__(self, federation: LocalFederation, spec: NodeSpec) -> None:
        self.federation = federation
        self.spec = spec
        hub = federation.hub
        self.idp = DevIdentityProvider(
            f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange"
        )
        self.key = federation.api_key(spec.node_id)
        self.operator = {
            "Authorization": f"Bearer {self.idp.issue(sub='op', role='operator', org='hie')}"
        }

    @property
    def node(self) -> str:
        return self.federation.node(self.spec.node_id).url

    @property
    def hub(self) -> str:
        return self.federation.hub.url

    # -- node ----------------------------------------------------------------------------
    def stow(self, client: httpx.Client, instances: list[bytes]) -> httpx.Response:
        body, content_type = stow_body(instances)
        return client.post(
            f"{self.node}/dicomweb/studies",
            content=body,
            headers={"Content-Type": content_type, "X-API-Key": self.key},
        )

    def served(self, study: str) -> dict[str, bytes]:
        """The study's instances as the node serves them to an export grant, by SOP UID."""
        grant = self.federation.grant(self.spec.node_id, study, "export")
        answer = httpx.get(
            f"{self.node}/dicomweb/studies/{study}",
            headers={"Authorization": f"Bearer {grant}", "Accept": EXPORT_ACCEPT},
            timeout=60,
        )
        if answer.status_code == 404:
            return {}
        answer.raise_for_status()
        _kind, params = media_type(answer.headers["content-type"])
        reader = MultipartReader(params["boundary"])
        parts = reader.feed(answer.content)
        reader.finish()
        found = {}
        for part in parts:
            data = part.body.read()
            part.close()
            found[sop_uid(data)] = data
        return found

    def listed(self, study: str) -> int:
        """How many instances QIDO-RS lists for the study (to a view grant)."""
        grant = self.federation.grant(self.spec.node_id, study, "view")
        answer = httpx.get(
            f"{self.node}/dicomweb/studies/{study}/instances",
            headers={"Authorization": f"Bearer {grant}"},
            timeout=60,
        )
        if answer.status_code in (204, 404):
            return 0
        answer.raise_for_status()
        return len(answer.json())

    def outbox(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.node}/admin/outbox", headers={"X-API-Key": self.key}, timeout=30)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    # -- hub -----------------------------------------------------------------------------
    def hub_studies(self, uid: str) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.hub}/fhir/ImagingStudy",
            params={"identifier": f"{DICOM_UID}|urn:oid:{uid}"},
            headers=self.operator,
            timeout=30,
        )
        answer.raise_for_status()
        return [e["resource"] for e in answer.json().get("entry", [])]

    # -- checks --------------------------------------------------------------------------
    def check_intact(
        self,
        tally: Tally,
        originals: dict[str, bytes],
        studies: Iterable[str],
        acknowledged: Iterable[str],
    ) -> dict[str, bytes]:
        """Count what was acknowledged and is gone, and what is visible but not whole.

        Returns everything the node serves of ``studies``.
        """
        served: dict[str, bytes] = {}
        for study in set(studies):
            got = self.served(study)
            listed = self.listed(study)
            if listed != len(got):
                tally.problem("lost", f"study {study}: QIDO lists {listed}, WADO serves {len(got)}")
            for sop, data in got.items():
                if sop not in originals or data[128:] != originals[sop][128:]:
                    tally.problem("lost", f"instance {sop} is served but not what was sent")
            served.update(got)
        for sop in set(acknowledged):
            if sop not in served:
                tally.problem("lost", f"acknowledged instance {sop} is gone")
        return served

    def restart(self, tally: Tally, name: str) -> None:
        """Restart a killed service; one that will not come back counts as a crash."""
        try:
            self.federation.restart(name)
        except RuntimeError as exc:
            tally.problem("crashes", f"{name} did not restart: {str(exc)[-500:]}")
            raise
