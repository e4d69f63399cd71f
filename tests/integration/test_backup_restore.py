"""Issue 10, acceptance 3: back up a running hub and node, lose them, restore, carry on.

Real processes on loopback (LocalFederation, publishing on), the real ``exchange``
command, a real S3-compatible server (``moto_server``) and a throwaway PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import text

from exchange.database import make_engine
from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec, free_port
from exchange.security import devidp
from exchange.security.keys import load_or_create
from tests.pg import postgres_server, requested, unavailable_reason

pytestmark = [
    pytest.mark.integration,
    # Its own restore-into-PostgreSQL test covers that database in the first pass; the
    # "lose everything" step here deletes data directories, not a shared server's databases.
    pytest.mark.skipif(requested(), reason="covers PostgreSQL in the first pass"),
]

SITE = NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a")
INDEX_WAIT_SECONDS = 20.0


@dataclass
class World:
    federation: LocalFederation
    root: Path
    backup_key: Path
    idp: devidp.DevIdentityProvider

    @property
    def hub(self) -> str:
        return self.federation.hub.url

    def token(self, role: str = "clinician", org: str = "org-a", purpose: str = "TREAT") -> str:
        return self.idp.issue(sub=f"{role}-{org}", role=role, org=org, purpose=[purpose])

    @property
    def operator(self) -> str:
        return self.token("operator", "hie", "HOPERAT")

    def cli(self, service: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``exchange ARGS`` with ``service``'s configuration (plus ``env``)."""
        return subprocess.run(
            [sys.executable, "-m", "exchange", *args],
            env={**self.federation.services[service].env, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(self, service: str, *args: str, **env: str) -> str:
        result = self.cli(service, *args, **env)
        assert result.returncode == 0, f"exchange {' '.join(args)}: {result.stderr}"
        return result.stdout

    def search(self, path: str, token: str | None = None) -> dict[str, Any]:
        response = httpx.get(
            f"{self.hub}/fhir/{path}",
            headers={"Authorization": f"Bearer {token or self.operator}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_indexed(self, uid: str) -> None:
        deadline = time.monotonic() + INDEX_WAIT_SECONDS
        while self.search(f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}")["total"] != 1:
            assert time.monotonic() < deadline, "study not indexed in time"
            time.sleep(0.2)

    def import_study(self, mrn: str, slices: int = 2) -> str:
        folder = self.root / "studies" / f"{mrn}-{uuid.uuid4().hex[:6]}"
        paths = write_study(
            StudySpec(
                patient_id=mrn,
                patient_name=f"Synthetic^{mrn}",
                accession=uuid.uuid4().hex[:12],
                slices=slices,
                size=32,
                issuer=SITE.organization,
            ),
            folder,
        )
        self.federation.import_into(SITE.node_id, folder)
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        self.wait_indexed(uid)
        return uid

    def retrieve(self, uid: str) -> dict[str, bytes]:
        """The study's instances through the broker, as raw Part 10 bytes by SOP UID."""
        token = self.token()
        response = httpx.get(
            f"{self.hub}/dicomweb/studies/{uid}",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        instances = {}
        for part in _parts(response):
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part), stop_before_pixels=True)
            instances[str(ds.SOPInstanceUID)] = part
        # and as a viewer's client sees them
        client = DICOMwebClient(
            url=f"{self.hub}/dicomweb", headers={"Authorization": f"Bearer {token}"}
        )
        assert sorted(str(d.SOPInstanceUID) for d in client.retrieve_study(uid)) == sorted(
            instances
        )
        return instances


def _parts(response: httpx.Response) -> list[bytes]:
    boundary = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"])
    assert boundary is not None
    delimiter = b"--" + boundary.group(1).encode()
    parts = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body.removesuffix(b"\r\n"))
    return parts


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("backup")
    federation = LocalFederation(root=root, nodes=[SITE])
    federation.start()
    try:
        key = load_or_create(devidp.key_path(federation.hub.data_dir))
        idp = devidp.DevIdentityProvider(f"{federation.hub.url}/idp", key, "exchange")
        w = World(federation, root, root / "secrets" / "backup.key", idp)
        w.ok("hub", "backup", "key", "--out", str(w.backup_key))
        yield w
    finally:
        federation.stop()


def _backup(w: World, service: str, dest: Path | str, keys: Path | str, **env: str) -> str:
    return w.ok(
        service,
        "backup",
        "--to",
        str(dest),
        "--keys-to",
        str(keys),
        "--backup-key-file",
        str(w.backup_key),
        "--quiet",
        **env,
    )


def _records(audit_verify: str) -> int:
    found = re.search(r"(\d+) records", audit_verify)
    assert found is not None, audit_verify
    return int(found.group(1))


def _copied_reused(report: str) -> tuple[int, int]:
    found = re.search(r"(\d+) copied \([\d,]+ bytes\), (\d+) reused", report)
    assert found is not None, report
    return int(found.group(1)), int(found.group(2))


def test_backup_lose_everything_restore_and_carry_on(world: World) -> None:
    w, fed = world, world.federation
    studies = [w.import_study("BK-1", slices=3), w.import_study("BK-2", slices=2)]
    before = {uid: w.retrieve(uid) for uid in studies}  # audited requests
    indexed = w.search("ImagingStudy?_summary=count")["total"]
    dest, keys = w.root / "backups", w.root / "vault"
    audited_before = _records(w.ok("hub", "audit", "verify"))

    # Back up both while they run, the hub under a steady load of audited searches.
    stop = threading.Event()
    searches = [0]

    def load() -> None:
        token = w.token()
        while not stop.is_set():
            w.search("ImagingStudy?patient.identifier=BK-1", token)
            searches[0] += 1

    loader = threading.Thread(target=load)
    loader.start()
    try:
        hub_report = _backup(w, "hub", dest, keys)
        node_report = _backup(w, "site-a", dest, keys)
    finally:
        stop.set()
        loader.join()
    assert searches[0] > 0
    assert "backed up hub" in hub_report
    assert _copied_reused(node_report) == (5, 0)  # 3 + 2 instances, all new
    assert (
        w.ok(
            "hub",
            "backup",
            "verify",
            "--from",
            str(dest),
            "--keys-from",
            str(keys),
            "--backup-key-file",
            str(w.backup_key),
        )
        .rstrip()
        .endswith("backup intact")
    )
    # the keys are nowhere in the backup itself, and wrapped where they are
    assert not list(dest.rglob("*.key"))
    assert not list(dest.rglob("*.pem"))
    bundle = next(keys.glob("*-node-site-a.keys")).read_bytes()
    master = (fed.node("site-a").data_dir / "keys" / "master.key").read_bytes()
    assert base64.b64encode(master) not in bundle
    assert master not in bundle

    # Disaster: both services and all their data are gone.
    fed.stop()
    shutil.rmtree(fed.hub.data_dir)
    shutil.rmtree(fed.node("site-a").data_dir)
    for service in ("hub", "site-a"):
        out = w.ok(
            service,
            "restore",
            "--from",
            str(dest),
            "--keys-from",
            str(keys),
            "--backup-key-file",
            str(w.backup_key),
            "--quiet",
        )
        assert "restored" in out
    refused = w.cli(
        "hub",
        "restore",
        "--from",
        str(dest),
        "--keys-from",
        str(keys),
        "--backup-key-file",
        str(w.backup_key),
    )
    assert refused.returncode == 2
    assert "refuses to overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    fed.restart("hub")
    fed.restart("site-a")

    # Every study retrieves byte-identical through the broker; index and audit intact.
    for uid, instances in before.items():
        assert w.retrieve(uid) == instances
    assert w.search("ImagingStudy?_summary=count")["total"] == indexed
    audit = w.ok("hub", "audit", "verify")
    assert "audit chain intact" in audit
    snapshot = json.loads(next(dest.rglob("*-hub/manifest.json")).read_text())
    in_backup = snapshot["counts"]["audit_records"]
    assert in_backup > audited_before  # searches of the load, up to the snapshot, are there
    assert _records(audit) >= in_backup

    # The restored keys work: a new study is stored, published and retrieved.
    third = w.import_study("BK-3", slices=2)
    assert len(w.retrieve(third)) == 2

    # An incremental backup copies only the new study's blobs.
    again = _backup(w, "site-a", dest, keys)
    assert _copied_reused(again) == (2, 5)
    blob_files = [p for p in (dest / "blobs").rglob("*") if p.is_file()]
    assert len(blob_files) == 7


def test_verify_names_damage_and_restore_refuses_bad_input(world: World, tmp_path: Path) -> None:
    w = world
    dest = tmp_path / "backups"
    _backup(w, "site-a", dest, tmp_path / "vault")
    other = tmp_path / "other.key"
    w.ok("hub", "backup", "key", "--out", str(other))
    wrong = w.cli(
        "site-a",
        "restore",
        "--from",
        str(dest),
        "--keys-from",
        str(tmp_path / "vault"),
        "--backup-key-file",
        str(other),
        EXCHANGE_DATA_DIR=str(tmp_path / "elsewhere"),
    )
    assert wrong.returncode == 1
    assert "another backup key" in wrong.stderr
    assert not (tmp_path / "elsewhere").exists()

    blob = sorted(p for p in (dest / "blobs").rglob("*") if p.is_file())[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    table = next(dest.rglob("*-instance.ndjson.enc"))
    table.unlink()

    result = w.cli("hub", "backup", "verify", "--from", str(dest), "--quiet")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    relative_blob = blob.relative_to(dest).as_posix()
    relative_table = table.relative_to(dest).as_posix()
    assert f"{relative_blob}: corrupted" in result.stderr
    assert f"{relative_table}: missing" in result.stderr
    assert "BACKUP DAMAGED" in result.stdout

    # and a restore from it refuses before touching anything
    target = tmp_path / "restored-node"
    failed = w.cli(
        "site-a",
        "restore",
        "--from",
        str(dest),
        "--keys-from",
        str(tmp_path / "vault"),
        "--backup-key-file",
        str(w.backup_key),
        EXCHANGE_DATA_DIR=str(target),
    )
    assert failed.returncode == 1
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored-node")]


# -- S3-compatible storage: a real moto_server on loopback ---------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "EXCHANGE_BACKUP_S3_ENDPOINT_URL": url,
        }
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="backups")
        client.create_bucket(Bucket="vault")
        yield env
    finally:
        process.terminate()
        process.wait(10)


def _rows(url: str, table: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all())
    finally:
        engine.dispose()


def test_s3_round_trip(world: World, s3: dict[str, str], tmp_path: Path) -> None:
    w = world
    first = _backup(w, "site-a", "s3://backups/exchange", "s3://vault/keys", **s3)
    copied, reused = _copied_reused(first)
    assert copied > 0
    assert reused == 0
    again = _backup(w, "site-a", "s3://backups/exchange", "s3://vault/keys", **s3)
    assert _copied_reused(again) == (0, copied)
    verified = w.ok(
        "site-a",
        "backup",
        "verify",
        "--from",
        "s3://backups/exchange",
        "--keys-from",
        "s3://vault/keys",
        "--backup-key-file",
        str(w.backup_key),
        **s3,
    )
    assert verified.rstrip().endswith("backup intact")

    target = tmp_path / "node"
    w.ok(
        "site-a",
        "restore",
        "--from",
        "s3://backups/exchange",
        "--keys-from",
        "s3://vault/keys",
        "--backup-key-file",
        str(w.backup_key),
        EXCHANGE_DATA_DIR=str(target),
        **s3,
    )
    source = w.federation.node("site-a").data_dir
    originals = {p.relative_to(source): p.read_bytes() for p in (source / "blobs").rglob("*.enc")}
    restored = {p.relative_to(target): p.read_bytes() for p in (target / "blobs").rglob("*.enc")}
    assert restored == originals
    for name in ("keys/master.key", "keys/tenants/tenant-a.key"):
        assert (target / name).read_bytes() == (source / name).read_bytes()
    assert _rows(f"sqlite:///{target / 'exchange.db'}", "instance") == _rows(
        f"sqlite:///{source / 'exchange.db'}", "instance"
    )


# -- PostgreSQL: the same dump restores into (and is taken from) PostgreSQL ----------


def test_hub_restores_into_postgresql(world: World, tmp_path: Path) -> None:
    """The SQLite hub's dump restores into PostgreSQL (the dump is portable)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    w = world
    _backup(w, "hub", tmp_path / "b", tmp_path / "k")
    snapshot = json.loads(next((tmp_path / "b").rglob("manifest.json")).read_text())
    records = snapshot["counts"]["audit_records"]
    with postgres_server() as url:
        pg = {"EXCHANGE_DATABASE_URL": url, "EXCHANGE_DATA_DIR": str(tmp_path / "hub-pg")}
        w.ok(
            "hub",
            "restore",
            "--from",
            str(tmp_path / "b"),
            "--keys-from",
            str(tmp_path / "k"),
            "--backup-key-file",
            str(w.backup_key),
            **pg,
        )
        assert f"{records} records" in w.ok("hub", "audit", "verify", **pg)
    key_file = tmp_path / "hub-pg" / "keys" / "grant-signing.pem"
    assert os.stat(key_file).st_mode & 0o077 == 0
