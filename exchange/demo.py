"""``exchange demo``: a hub (development IdP on) and two sites on loopback.

It writes a state file (DESIGN.md §3) with the URLs, a token per persona and
the demo patients, prints what to try, and runs until Ctrl-C or SIGTERM, when
it stops every process it started.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from exchange.config import load_settings
from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec
from exchange.files import write_atomic
from exchange.node.importer import import_path
from exchange.security import devidp
from exchange.security.keys import load_or_create

AUDIENCE = "exchange"
SITES = [
    NodeSpec(node_id="site-a", organization="site-a", tenant="site-a"),
    NodeSpec(node_id="site-b", organization="site-b", tenant="site-b"),
]
HIE_ORGANIZATION = "hie"

#: Synthetic patients. ``value`` is the HIE-wide identifier; each site also has its own MRN.
PATIENT_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777.1"
PATIENTS: dict[str, dict[str, Any]] = {
    "p1": {
        "system": PATIENT_SYSTEM,
        "value": "HIE-1001",
        "name": "Demo^Avery",
        "mrn": {"site-a": "A-1001", "site-b": "B-7001"},
    },
    "p2": {
        "system": PATIENT_SYSTEM,
        "value": "HIE-1002",
        "name": "Demo^Blake",
        "mrn": {"site-a": "A-1002"},
    },
    "p3": {
        "system": PATIENT_SYSTEM,
        "value": "HIE-1003",
        "name": "Demo^Casey",
        "mrn": {"site-b": "B-7003"},
    },
}

#: persona -> (sub, role, organization, purpose of use)
PERSONAS: dict[str, tuple[str, str, str, list[str]]] = {
    "clinician_a": ("dr-ada", "clinician", "site-a", ["TREAT"]),
    "clinician_b": ("dr-bo", "clinician", "site-b", ["TREAT"]),
    "operator": ("op-olu", "operator", HIE_ORGANIZATION, ["HOPERAT"]),
    "site_a_system": ("site-a", "system", "site-a", ["HOPERAT"]),
    "site_b_system": ("site-b", "system", "site-b", ["HOPERAT"]),
}


#: (patient key, site, modality, description, date, slices) for the generated studies.
STUDIES = [
    ("p1", "site-a", "CT", "CT chest", "20260310", 24),
    ("p1", "site-b", "MR", "MR brain", "20260702", 16),
    ("p2", "site-a", "CT", "CT abdomen", "20251120", 16),
    ("p3", "site-b", "CT", "CT chest", "20260815", 16),
]
#: pydicom's bundled files, one per site (their own synthetic patients).
BUNDLED = {"site-a": "CT_small.dcm", "site-b": "MR_small.dcm"}


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _register_sites(hub: str, token: str, nodes: dict[str, dict[str, str]]) -> None:
    """Record the HIE and each site's Organization in the hub's index (the operator's job).

    Each node publishes its own DICOMweb Endpoint, managed by its organisation.
    """
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    with httpx.Client(base_url=f"{hub}/fhir", headers=headers, timeout=30) as fhir:
        fhir.put(
            f"/Organization/{HIE_ORGANIZATION}",
            json={
                "resourceType": "Organization",
                "id": HIE_ORGANIZATION,
                "active": True,
                "name": "Demo Health Information Exchange",
            },
        ).raise_for_status()
        for node_id, node in nodes.items():
            org = node["organization"]
            fhir.put(
                f"/Organization/{org}",
                json={
                    "resourceType": "Organization",
                    "id": org,
                    "active": True,
                    "identifier": [{"system": "urn:exchange:organization", "value": org}],
                    "name": f"Demo imaging site {node_id[-1].upper()}",
                    "partOf": {"reference": f"Organization/{HIE_ORGANIZATION}"},
                },
            ).raise_for_status()


def expected_studies(federation: LocalFederation) -> int:
    """How many studies ``import_samples`` puts at the sites."""
    from pydicom.data import get_testdata_file

    sites = {spec.node_id for spec in federation.nodes}
    generated = sum(1 for study in STUDIES if study[1] in sites)
    bundled = sum(
        1 for site in sites if get_testdata_file(BUNDLED[site], download=False) is not None
    )
    return generated + bundled


def wait_until_indexed(hub: str, token: str, studies: int, timeout: float = 60.0) -> bool:
    """Wait (bounded) until the nodes have published ``studies`` studies to the hub."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(
                f"{hub}/fhir/ImagingStudy",
                params={"_summary": "count"},
                headers=headers,
                timeout=10,
            )
            if answer.status_code == 200 and int(answer.json().get("total", 0)) >= studies:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    return False


def import_samples(federation: LocalFederation) -> dict[str, int]:
    """Generate and import the sample studies at each site; returns instances stored per site."""
    from pydicom.data import get_testdata_file

    counts = {}
    samples = federation.root / "samples"
    for spec in federation.nodes:
        folder = samples / spec.node_id
        for key, site, modality, description, date, slices in STUDIES:
            if site != spec.node_id:
                continue
            patient = PATIENTS[key]
            write_study(
                StudySpec(
                    patient_id=patient["mrn"][site],
                    patient_name=patient["name"],
                    accession=f"{site[-1].upper()}{key}{date}",
                    modality=modality,
                    description=description,
                    study_date=date,
                    slices=slices,
                    issuer=spec.organization,
                ),
                folder / f"{key}-{date}",
            )
        bundled = get_testdata_file(BUNDLED[spec.node_id], download=False)
        if bundled:
            shutil.copy(bundled, folder / BUNDLED[spec.node_id])
        node = federation.node(spec.node_id)
        settings = load_settings(
            data_dir=node.data_dir,
            node_id=spec.node_id,
            tenants={spec.tenant: {"organization": spec.organization}},
        )
        report, _ = import_path(settings, folder, spec.tenant)
        if report.rejected:
            raise RuntimeError(f"sample import at {spec.node_id} rejected {report.rejected}")
        counts[spec.node_id] = report.counts["stored"] + report.counts["already present"]
    return counts


def build_state(federation: LocalFederation) -> dict[str, Any]:
    hub = federation.hub
    issuer = f"{hub.url}/idp"
    key_file = devidp.key_path(hub.data_dir)
    idp = devidp.DevIdentityProvider(issuer, load_or_create(key_file), AUDIENCE)
    tokens = {
        persona: idp.issue(sub=sub, role=role, org=org, purpose=purpose, ttl=12 * 3600)
        for persona, (sub, role, org, purpose) in PERSONAS.items()
    }
    nodes = {
        spec.node_id: {
            "url": federation.node(spec.node_id).url,
            "organization": spec.organization,
            "tenant": spec.tenant,
        }
        for spec in federation.nodes
    }
    return {
        "hub": hub.url,
        "idp": issuer,
        "nodes": nodes,
        "tokens": tokens,
        "patients": PATIENTS,
        "dev": {"idp_key": str(key_file), "audience": AUDIENCE, "data_dir": str(federation.root)},
    }


def _summary(state: dict[str, Any], state_file: Path, imported: dict[str, int]) -> str:
    lines = [
        "",
        "Exchange demo federation is running (development IdP ON; not for production).",
        f"  hub      {state['hub']}   (FHIR {state['hub']}/fhir, health {state['hub']}/readyz)",
        f"  idp      {state['idp']}",
    ]
    lines += [
        f"  {node_id:<8} {node['url']}   organization {node['organization']}, "
        f"tenant {node['tenant']}, {imported.get(node_id, 0)} sample instances"
        for node_id, node in state["nodes"].items()
    ]
    lines += [
        f"  state    {state_file}  (tokens for {', '.join(state['tokens'])})",
        "",
        "Try:",
        f"  curl -s {state['hub']}/fhir/metadata",
        f"  TOKEN=$(jq -r .tokens.operator {state_file})",
        f'  curl -s -H "Authorization: Bearer $TOKEN" {state["hub"]}/fhir/Organization/site-a',
        f"  exchange dev token --state {state_file} --sub dr-x --role clinician --org site-b",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def run(state_file: Path, data_dir: Path | None = None) -> int:
    root = data_dir.resolve() if data_dir else Path(tempfile.mkdtemp(prefix="exchange-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    federation = LocalFederation(
        root=root,
        nodes=SITES,
        hub_env={"EXCHANGE_AUDIENCE": AUDIENCE, "EXCHANGE_HIE_IDENTIFIER_SYSTEM": PATIENT_SYSTEM},
    )
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"Starting the demo federation in {root} …", flush=True)
        federation.start()
        state = build_state(federation)
        _register_sites(state["hub"], state["tokens"]["operator"], state["nodes"])
        imported = import_samples(federation)
        operator = state["tokens"]["operator"]
        if not wait_until_indexed(state["hub"], operator, expected_studies(federation)):
            print(
                "exchange: warning: the hub's index does not list every sample study yet; "
                "the sites keep publishing in the background",
                file=sys.stderr,
            )
        write_atomic(state_file, json.dumps(state, indent=2).encode(), mode=0o600)
        print(_summary(state, state_file.resolve(), imported), flush=True)
        while True:
            for service in federation.services.values():
                if service.process is not None and service.process.poll() is not None:
                    print(
                        f"exchange: error: {service.name} stopped unexpectedly:\n"
                        f"{service.log_tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except _Stop:
        print("\nStopping the demo federation …", flush=True)
        return 0
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"exchange: error: the demo could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        federation.stop()
        if data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
