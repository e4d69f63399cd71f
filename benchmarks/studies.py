"""Fixed studies stored at a node and published as its site would: shared by benchmarks.

One place for what broker.py, flood.py and load.py each need: Part 10 bytes of generated
data sets, a STOW-RS body, a STOW-RS upload with the site's API key, and the site's
Endpoint, Patient and ImagingStudy written to the hub (for nodes started with publishing
off, so that what the hub indexes is exactly the benchmark's).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pydicom

from exchange.dicom import imagingstudy
from exchange.dicom.samples import StudySpec, study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(files: Sequence[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body of ``files`` and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n"
            for f in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(node: str, key: str, files: Sequence[bytes], timeout: float = 300) -> None:
    body, content_type = multipart(files)
    response = httpx.post(
        f"{node}/dicomweb/studies",
        content=body,
        headers={"Content-Type": content_type, "X-API-Key": key},
        timeout=timeout,
    )
    response.raise_for_status()


@dataclass
class Published:
    idp: DevIdentityProvider
    datasets: list[pydicom.Dataset]
    files: list[bytes]

    @property
    def uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def publish(federation: LocalFederation, site: NodeSpec, spec: StudySpec) -> Published:
    """Store ``spec``'s study at ``site``'s node and index it at the hub, as the site would."""
    hub = federation.hub.url
    node = federation.node(site.node_id).url
    idp = DevIdentityProvider(
        f"{hub}/idp", load_or_create(key_path(federation.hub.data_dir)), "exchange"
    )
    system = idp.issue(sub=site.node_id, role="system", org=site.organization)
    headers = {"Authorization": f"Bearer {system}", "Content-Type": "application/fhir+json"}
    endpoint = {
        "resourceType": "Endpoint",
        "identifier": [{"system": "urn:exchange:node", "value": site.node_id}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "managingOrganization": {"reference": f"Organization/{site.organization}"},
        "payloadType": [{"text": "DICOM"}],
        "address": f"{node}/dicomweb",
    }
    with httpx.Client(base_url=f"{hub}/fhir", headers=headers, timeout=60) as fhir:
        fhir.put(f"/Endpoint/{site.node_id}", json=endpoint).raise_for_status()
        datasets = study(spec)
        files = [part10(ds) for ds in datasets]
        stow(node, federation.api_key(site.node_id), files)
        attributes = [ds.to_json_dict() for ds in datasets]
        mrn_system = f"urn:exchange:{site.organization}:mrn"
        patient = imagingstudy.patient(
            attributes[0], mrn_system=mrn_system, organization=site.organization
        )
        made = fhir.put(f"/Patient?identifier={mrn_system}|{spec.patient_id}", json=patient)
        made.raise_for_status()
        body = imagingstudy.build(
            attributes,
            endpoint=f"Endpoint/{site.node_id}",
            mrn_system=mrn_system,
            patient_reference=f"Patient/{made.json()['id']}",
        )
        uid = str(datasets[0].StudyInstanceUID)
        fhir.put(
            f"/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}", json=body
        ).raise_for_status()
    return Published(idp, datasets, files)
