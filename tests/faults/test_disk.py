"""A node whose disk fills up, and one whose data directory is (or becomes) read-only.

As root, permission bits stop nothing, so the node runs in a private mount namespace
(``unshare -m``, held open by a ``sleep`` process): its data directory there is a
small tmpfs, which this test fills through ``/proc/<pid>/root`` and can remount
read-only with ``nsenter``. Nothing is mounted in the test's own namespace.

Expected: STOW-RS into a full disk answers 507 (every part refused with FailureReason
A700 "Out of Resources" and a plain message), keeps what it acknowledged before, shows
nothing half-written, goes on serving reads, and stores again once there is room; a
read-only data directory answers writes 503 the same way, or refuses to start with a
one-line reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from exchange.federation import LocalFederation, NodeSpec, Service, _die_with_parent
from tests import reliability
from tests.dicomdata import generated
from tests.faults.harness import Site, Tally, sop_uid, study_uid

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SPEC = NodeSpec("site-fd", "org-fd", "tenant-fd")
OUT_OF_RESOURCES = 0xA700
TMPFS_BYTES = 24 * 1024 * 1024


def _namespaces_unavailable() -> str | None:
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"
    return None


@dataclass
class MountNamespace:
    """A private mount namespace kept alive by a sleeping process."""

    holder: subprocess.Popen[bytes]

    @classmethod
    def open(cls) -> MountNamespace:
        holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sleep", "infinity"],
            preexec_fn=_die_with_parent,
        )
        return cls(holder)

    def run(self, *command: str) -> None:
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "--", *command], check=True)

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def seen(self, path: Path) -> Path:
        """``path`` as the namespace sees it, from outside."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


@dataclass
class NamespacedFederation(LocalFederation):
    """A LocalFederation whose processes (and CLI runs) live in ``namespace``."""

    namespace: MountNamespace | None = None

    def _launch(self, service: Service, args: list[str]) -> None:  # type: ignore[override]
        assert self.namespace is not None
        with service.log_path.open("ab") as log:
            service.process = subprocess.Popen(
                [*self.namespace.prefix(), sys.executable, "-m", "exchange", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=service.env,
                preexec_fn=_die_with_parent,
            )

    def exchange(self, service: str, *args: str) -> str:
        assert self.namespace is not None
        result = subprocess.run(
            [*self.namespace.prefix(), sys.executable, "-m", "exchange", *args],
            env=self.services[service].env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"exchange {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout


@pytest.fixture(scope="module")
def namespace() -> Iterator[MountNamespace]:
    reason = _namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    space = MountNamespace.open()
    try:
        yield space
    finally:
        space.close()


@pytest.fixture(scope="module")
def site(namespace: MountNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("fault-disk")
    data = root / SPEC.node_id
    data.mkdir()
    namespace.run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(data))
    federation = NamespacedFederation(root, [SPEC], publishing=False, namespace=namespace)
    with federation:
        yield Site(federation, SPEC)


def _failures(answer: httpx.Response) -> list[dict[str, object]]:
    items: list[dict[str, object]] = answer.json().get("00081198", {}).get("Value", [])
    return items


def _stored(answer: httpx.Response) -> list[str]:
    if answer.status_code not in (200, 202):
        return []
    return [i["00081155"]["Value"][0] for i in answer.json().get("00081199", {}).get("Value", [])]


def test_a_full_disk_refuses_with_507_keeps_serving_and_recovers(
    site: Site, namespace: MountNamespace
) -> None:
    tally = Tally()
    data_dir = namespace.seen(site.federation.node(SPEC.node_id).data_dir)
    ballast = data_dir / "ballast"
    studies = [
        generated(patient_id="FD-1", accession=f"FD-{n}", slices=10, size=160) for n in range(6)
    ]
    originals = {sop_uid(d): d for study in studies for d in study}
    uids = [study_uid(study[0]) for study in studies]
    acknowledged: list[str] = []
    refused: list[httpx.Response] = []
    try:
        with httpx.Client(timeout=60) as client:
            answer = site.stow(client, studies[0])
            assert answer.status_code == 200, answer.text
            acknowledged += _stored(answer)
            # Leave about two instances' worth of room, then keep storing.
            free = os.statvfs(data_dir).f_bavail * os.statvfs(data_dir).f_frsize
            with ballast.open("wb") as out:
                out.truncate(0)
                out.write(b"\0" * max(0, free - 120 * 1024))
            for study in studies[1:]:
                answer = site.stow(client, study)
                tally.inputs += 1
                acknowledged += _stored(answer)
                if answer.status_code >= 500 and answer.status_code not in (503, 507):
                    tally.problem("server_errors", f"STOW-RS answered {answer.status_code}")
                if answer.status_code not in (200, 202):
                    refused.append(answer)
            assert refused, "the disk never filled up"
            for answer in refused:
                assert answer.status_code == 507, answer.text
                for failure in _failures(answer):
                    assert failure["00081197"] == {"vr": "US", "Value": [OUT_OF_RESOURCES]}
                    assert "storage is full" in str(failure["00000902"])
            # Reads go on; nothing acknowledged is lost, nothing half-written is visible.
            assert httpx.get(f"{site.node}/healthz", timeout=10).status_code == 200
            site.check_intact(tally, originals, uids, acknowledged)

            # Room again: sending everything once more stores the rest.
            ballast.unlink()
            for study in studies:
                answer = site.stow(client, study)
                assert answer.status_code == 200, answer.text
        served = site.check_intact(tally, originals, uids, originals)
        assert len(served) == len(originals)
        # No temp file of a refused instance was left behind in the blob store.
        leftovers = list((data_dir / "blobs").rglob(".incoming-*"))
        assert leftovers == [], leftovers
    finally:
        ballast.unlink(missing_ok=True)
        reliability.report("faults:disk", **tally.figures(), kind="disk full")
    assert tally.problems == [], tally.problems


def test_a_data_directory_turned_read_only_refuses_writes_with_503_and_serves_reads(
    site: Site, namespace: MountNamespace
) -> None:
    tally = Tally()
    data_dir = site.federation.node(SPEC.node_id).data_dir
    study = generated(patient_id="FD-2", accession="FD-RO", slices=4, size=64)
    later = generated(patient_id="FD-2", accession="FD-RO-2", slices=2, size=64)
    originals = {sop_uid(d): d for d in study + later}
    with httpx.Client(timeout=60) as client:
        answer = site.stow(client, study)
        assert answer.status_code == 200, answer.text
        # A read-only bind mount over it (a tmpfs with files open for writing cannot be
        # remounted read-only itself); unmounting it makes the directory writable again.
        namespace.run("mount", "--bind", str(data_dir), str(data_dir))
        namespace.run("mount", "-o", "remount,bind,ro", str(data_dir))
        try:
            answer = site.stow(client, later)
            tally.inputs += 1
            assert answer.status_code == 503, answer.text
            for failure in _failures(answer):
                assert failure["00081197"] == {"vr": "US", "Value": [OUT_OF_RESOURCES]}
                assert "read-only" in str(failure["00000902"])
            site.check_intact(tally, originals, [study_uid(study[0])], _stored_uids(study))
        finally:
            namespace.run("umount", str(data_dir))
        answer = site.stow(client, later)
        assert answer.status_code == 200, answer.text
    reliability.report("faults:disk", **tally.figures(), kind="read-only data directory")
    assert tally.problems == [], tally.problems


def _stored_uids(instances: list[bytes]) -> list[str]:
    return [sop_uid(d) for d in instances]


def test_a_node_on_a_read_only_data_directory_says_why_it_cannot_start(
    namespace: MountNamespace, tmp_path: Path
) -> None:
    data = tmp_path / "ro-node"
    data.mkdir()
    namespace.run("mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(data))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EXCHANGE_")},
        "EXCHANGE_DATA_DIR": str(data),
        "EXCHANGE_NODE_ID": "ro-node",
        "EXCHANGE_TENANTS": '{"t": {"organization": "o"}}',
        "EXCHANGE_HOST": "127.0.0.1",
        "EXCHANGE_PORT": "9",
        "EXCHANGE_DEV_MODE": "true",
    }
    try:
        result = subprocess.run(
            [*namespace.prefix(), sys.executable, "-m", "exchange", "serve", "node"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        namespace.run("umount", str(data))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "read-only" in result.stderr.lower(), result.stderr
