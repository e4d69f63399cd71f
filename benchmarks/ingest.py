"""Ingest and retrieval throughput of an Exchange node, side by side with Orthanc.

Run:  sudo scripts/benchmark-deps.sh && .venv/bin/python benchmarks/ingest.py [--quick]

What it measures, on the same fixed inputs and in the same run:

* **STOW-RS ingest**: instances/s and MB/s posting multipart/related batches
  (``--batch`` instances a request, one keep-alive client) to the node's
  ``/dicomweb/studies`` and to Orthanc's ``/dicom-web/studies``.
* **Folder import**: ``exchange import FOLDER`` (a fresh process that reads
  the files and stores them directly, timed from start to exit) against
  Orthanc's own way of importing a folder, its ``ImportDicomFiles.py``: one
  ``POST /instances`` a file over HTTP. The two are not the same mechanism;
  each is what that product offers a site operator with a folder of files.
* **WADO-RS retrieval**: MB/s of ``GET …/studies/{study}`` (whole studies as
  multipart/related application/dicom) from the node, with a hub export
  grant, and from Orthanc, against reading the same plain files from disk.
* **Memory**: peak RSS (VmHWM) of the node process and of Orthanc, and of the
  ``exchange import`` process.
* **STOW-RS while publishing**, for information: the same STOW-RS with the node
  sending each study to the hub as it arrives (the rows above are like for like with
  Orthanc, which publishes nothing, so their nodes do not publish).

Orthanc binds every interface, so the script re-executes itself in a new
network namespace whose only interface is ``lo``; Orthanc, the node and the
client all live there and nothing is reachable from outside. Where Orthanc is
not installed, or cannot be confined, the script says why and measures
Exchange alone. MB is 10^6 bytes. Exit status is 0 whether or not the target
is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file

from exchange.dicom.samples import StudySpec, write_study
from exchange.federation import LocalFederation, NodeSpec, free_port

TARGET_RATIO = 1.5
NETNS_MARKER = "EXCHANGE_BENCH_IN_NETNS"
DICOM = "application/dicom"
MULTIPART_DICOM = f'multipart/related; type="{DICOM}"'
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
# Orthanc compresses answers for clients that accept gzip; measure the raw bytes on both sides.
NO_COMPRESSION = {"Accept-Encoding": "identity"}
STARTUP_SECONDS = 60.0
IMPORT_TIMEOUT_SECONDS = 900.0
ORTHANC_MISSING = (
    "Orthanc is not installed (Debian packages orthanc and orthanc-dicomweb: run "
    "`sudo scripts/benchmark-deps.sh`)"
)
MB = 1e6

MEASUREMENTS = ("ingest STOW-RS", "ingest folder import", "retrieve WADO-RS")
#: For information, not a target: Orthanc publishes nothing, and the hub that receives
#: the node's ImagingStudies shares this machine's cores (in production it runs elsewhere).
PUBLISHING = "STOW-RS, publishing"
STOW_NODE = "bench"
IMPORT_NODE = "bench-import"
PUBLISHING_NODE = "bench-publishing"


# -- network namespace -------------------------------------------------------


def _reexec_in_private_netns(argv: list[str]) -> str:
    """Re-execute this script in a new network namespace with only ``lo`` up.

    Returns only when that is impossible, with the reason.
    """
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (needed to bring lo up in the namespace)"
    attempts = [["unshare", "--net"], ["unshare", "--net", "--map-root-user"]]
    if os.geteuid() != 0:
        attempts.reverse()
    failures = []
    for prefix in attempts:
        probe = subprocess.run(
            [*prefix, "ip", "link", "set", "lo", "up"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            sys.stdout.flush()
            env = {**os.environ, NETNS_MARKER: "1"}
            command = [*prefix, "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
            os.execvpe(prefix[0], [*command, sys.executable, *argv], env)
        failures.append(f"`{' '.join(prefix)}`: {probe.stderr.strip() or probe.returncode}")
    return "cannot create a network namespace (" + "; ".join(failures) + ")"


# -- processes ---------------------------------------------------------------


def _die_with_parent() -> None:  # runs in the child
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cores() -> int:
    return len(os.sched_getaffinity(0))


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the servers, imports)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _machine_busy_seconds() -> float:
    """CPU time all processes used (user, nice, system, irq, softirq), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWatch:
    """How much of the machine other processes took while the benchmark ran."""

    wall: float = field(default_factory=time.monotonic)
    busy: float = field(default_factory=_machine_busy_seconds)
    own: float = field(default_factory=_own_cpu_seconds)

    def others_share(self) -> float:
        others = (_machine_busy_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        return max(0.0, others) / ((time.monotonic() - self.wall) * cores())


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        return None
    return None


def compile_bytecode() -> str:
    """Bring the package's bytecode up to date, as installing it does (pip compiles it).

    With PYTHONDONTWRITEBYTECODE set (as in the project's shells), every module edited
    since its bytecode was written is compiled again by every process that imports it:
    ~40 ms of each ``exchange import`` that an installed node does not pay.
    """
    import exchange

    package = Path(exchange.__file__).parent
    done = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(package)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"bytecode of {package} not compiled ({done.stderr.strip()[:200]})"
    return f"bytecode of {package} compiled before the run, as an installation does"


# -- data ----------------------------------------------------------------------


@dataclass
class Inputs:
    folder: Path
    files: list[Path]
    #: study UID -> its files
    studies: dict[str, list[Path]]
    sizes: dict[Path, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def make_inputs(folder: Path, studies: int, slices: int, size: int) -> Inputs:
    """Deterministic synthetic CT studies plus pydicom's bundled CT_small and MR_small."""
    files: list[Path] = []
    for index in range(studies):
        spec = StudySpec(
            patient_id=f"BENCH{index:03d}",
            patient_name=f"Bench^Patient{index:03d}",
            accession=f"BENCHACC{index:04d}",
            modality="CT",
            description="Benchmark chest",
            slices=slices,
            size=size,
        )
        files += write_study(spec, folder / f"study{index:02d}")
    bundled = folder / "pydicom"
    bundled.mkdir(parents=True, exist_ok=True)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        source = get_testdata_file(name, download=False)
        if source is None:
            print(f"note: pydicom's {name} is not available; left out")
            continue
        target = bundled / name
        shutil.copyfile(source, target)
        files.append(target)
    by_study: dict[str, list[Path]] = {}
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        by_study.setdefault(uid, []).append(path)
    return Inputs(folder, files, by_study, {f: f.stat().st_size for f in files})


def warmup_files(folder: Path) -> list[Path]:
    """A small study of its own, sent to each server before timing starts."""
    spec = StudySpec("WARMUP", "Warm^Up", "WARMUPACC", slices=4, size=128)
    return write_study(spec, folder)


def multipart_body(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        parts.append(f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode())
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"{MULTIPART_DICOM}; boundary={boundary}"


def batches(files: list[Path], size: int) -> list[list[Path]]:
    return [files[i : i + size] for i in range(0, len(files), size)]


def count_parts(body: bytes, content_type: str) -> int:
    """Parts of a multipart/related answer (enough to check a retrieval was whole)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        return 0
    return body.count(b"--" + boundary.encode() + b"\r\n")


# -- measurements --------------------------------------------------------------


@dataclass
class Figure:
    instances: int
    nbytes: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.nbytes / MB / self.seconds


class Unavailable(Exception):
    """A measurement that cannot be made here; the message says why."""


@dataclass
class Results:
    #: every round's figure of (measurement, product)
    figures: dict[tuple[str, str], list[Figure]] = field(default_factory=dict)
    notes: dict[tuple[str, str], str] = field(default_factory=dict)
    #: the largest peak RSS seen, by process, in MB
    memory: dict[str, float] = field(default_factory=dict)
    remarks: list[str] = field(default_factory=list)
    cpu: CpuWatch | None = None
    #: seconds `exchange import` takes for an empty folder: its fixed start-up cost
    import_startup: list[float] = field(default_factory=list)

    def run(self, what: str, who: str, measure: Callable[[], Figure]) -> None:
        # Write back what earlier phases left dirty, so that no phase pays for another's writes.
        os.sync()
        try:
            figure = measure()
        except Unavailable as exc:
            self.notes[what, who] = str(exc)
            print(f"  {what} / {who}: {exc}")
            return
        except Exception as exc:  # a failed measurement is reported, the others still run
            self.notes[what, who] = f"failed: {type(exc).__name__}: {exc}"
            print(f"  {what} / {who}: failed: {type(exc).__name__}: {exc}")
            return
        self.figures.setdefault((what, who), []).append(figure)
        print(f"  {what} / {who}: {figure.per_second:.1f} inst/s, {figure.mb_per_second:.1f} MB/s")

    def median(self, what: str, who: str) -> Figure | None:
        figures = sorted(self.figures.get((what, who), []), key=lambda f: f.seconds)
        return figures[len(figures) // 2] if figures else None

    def best(self, what: str, who: str) -> Figure | None:
        return min(self.figures.get((what, who), []), key=lambda f: f.seconds, default=None)

    def peak(self, process: str, pid: int) -> None:
        rss = peak_rss_mb(pid)
        if rss is not None:
            self.memory[process] = max(rss, self.memory.get(process, 0.0))


def stow(
    client: httpx.Client,
    url: str,
    headers: dict[str, str],
    bodies: list[tuple[bytes, str, int]],
    clients: int,
) -> float:
    """POST every prepared batch; returns the elapsed seconds. Checks every answer."""

    def send(item: tuple[bytes, str, int]) -> None:
        body, content_type, expected = item
        answer = client.post(url, content=body, headers={**headers, "Content-Type": content_type})
        if answer.status_code in (404, 405) and (
            answer.status_code == 405 or "route" in answer.text
        ):
            raise Unavailable("STOW-RS not available on this node")
        if answer.status_code != 200:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")
        stored = answer.json().get("00081199", {}).get("Value", [])
        if len(stored) != expected:
            raise RuntimeError(f"{len(stored)} of {expected} instances stored: {answer.text[:300]}")

    start = time.perf_counter()
    if clients <= 1:
        for item in bodies:
            send(item)
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, bodies))
    return time.perf_counter() - start


def retrieve(
    client: httpx.Client,
    url_of: Callable[[str], str],
    headers_of: Callable[[str], dict[str, str]],
    data: Inputs,
) -> Figure:
    """GET every study whole; the answers are checked after the clock stops."""
    headers = {study: headers_of(study) for study in data.studies}  # grants: outside the clock
    answers: list[tuple[str, int, str, bytes]] = []
    start = time.perf_counter()
    for study in data.studies:
        with client.stream(
            "GET", url_of(study), headers={**headers[study], "Accept": MULTIPART_DICOM}
        ) as answer:
            body = answer.read()
            answers.append(
                (study, answer.status_code, answer.headers.get("content-type", ""), body)
            )
    seconds = time.perf_counter() - start
    received = 0
    for study, status, content_type, body in answers:
        if status in (404, 405) and (status == 405 or b"route" in body):
            raise Unavailable("WADO-RS not available on this node (GET /dicomweb/studies/{uid})")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
        parts = count_parts(body, content_type)
        if parts != len(data.studies[study]):
            raise RuntimeError(f"study answered {parts} of {len(data.studies[study])} instances")
        received += len(body)
    print(f"  received {received / MB:.1f} MB in {len(answers)} studies")
    return Figure(len(data.files), data.total_bytes, seconds)


def read_plain_files(data: Inputs) -> Figure:
    start = time.perf_counter()
    total = 0
    for files in data.studies.values():
        for path in files:
            total += len(path.read_bytes())
    return Figure(len(data.files), total, time.perf_counter() - start)


# -- Exchange ------------------------------------------------------------------


def exchange_import(
    federation: LocalFederation, node_id: str, folder: Path
) -> tuple[str, float | None]:
    """``federation.import_into``, run here so that its peak RSS can be read."""
    spec = next(s for s in federation.nodes if s.node_id == node_id)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exchange",
                "import",
                str(folder),
                "--tenant",
                spec.tenant,
                "--quiet",
            ],
            env=federation.node(node_id).env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        # The child's VmHWM, polled: wait4's ru_maxrss would count this process's memory too
        # (rusage keeps the high-water mark of the image the child replaced at exec).
        rss: float | None = None
        deadline = time.monotonic() + IMPORT_TIMEOUT_SECONDS
        while True:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                _, status = os.waitpid(process.pid, 0)
                raise RuntimeError(f"exchange import took over {IMPORT_TIMEOUT_SECONDS:.0f}s")
            rss = max(rss or 0.0, peak_rss_mb(process.pid) or 0.0)
            time.sleep(0.01)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        summary, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"exchange import exited with {process.returncode}: {errors[-500:]}")
    return summary.strip(), rss


def measure_exchange(
    root: Path,
    data: Inputs,
    warmup: list[Path],
    bodies: list[tuple[bytes, str, int]],
    args: argparse.Namespace,
    results: Results,
) -> None:
    nodes = [
        NodeSpec(STOW_NODE, "org-bench", "tenant-bench"),
        NodeSpec(IMPORT_NODE, "org-bench-import", "tenant-bench-import"),
    ]
    print("exchange: starting a hub and two nodes (not publishing to the hub) …")
    # Like for like with Orthanc, which publishes nothing: the nodes do not send their
    # studies to the hub here. The cost of publishing is measured by measure_publishing.
    with LocalFederation(
        root / "exchange", nodes, node_env={"EXCHANGE_LOG_LEVEL": "warning"}, publishing=False
    ) as fed:
        node = fed.node(STOW_NODE)
        assert node.process is not None
        key = fed.api_key(STOW_NODE)
        stow_headers = {"X-API-Key": key, "Accept": "application/dicom+json", **NO_COMPRESSION}
        url = f"{node.url}/dicomweb/studies"
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            stored = False

            def stow_ours() -> Figure:
                nonlocal stored
                warm_body, warm_type = multipart_body(warmup)
                stow(client, url, stow_headers, [(warm_body, warm_type, len(warmup))], 1)
                seconds = stow(client, url, stow_headers, bodies, args.clients)
                stored = True
                return Figure(len(data.files), data.total_bytes, seconds)

            print("exchange: STOW-RS …")
            results.run("ingest STOW-RS", "exchange", stow_ours)

            def wado_ours() -> Figure:
                if not stored:
                    raise Unavailable("skipped: nothing was stored by STOW-RS to retrieve")
                return retrieve(
                    client,
                    lambda study: f"{node.url}/dicomweb/studies/{study}",
                    lambda study: {
                        "Authorization": f"Bearer {fed.grant(STOW_NODE, study, 'export', ttl=60)}",
                        **NO_COMPRESSION,
                    },
                    data,
                )

            print("exchange: WADO-RS retrieval …")
            results.run("retrieve WADO-RS", "exchange", wado_ours)
        results.peak("exchange node (STOW-RS, WADO-RS)", node.process.pid)

        def import_ours() -> Figure:
            start = time.perf_counter()
            summary, rss = exchange_import(fed, IMPORT_NODE, data.folder)
            seconds = time.perf_counter() - start
            expected = f"{len(data.files)} files: {len(data.files)} stored"
            if not summary.startswith(expected):
                raise RuntimeError(f"exchange import said {summary!r}, expected {expected!r}")
            if rss is not None:
                key = "exchange import process"
                results.memory[key] = max(rss, results.memory.get(key, 0.0))
            return Figure(len(data.files), data.total_bytes, seconds)

        print("exchange: folder import …")
        results.run("ingest folder import", "exchange", import_ours)
        empty = root / "empty"
        empty.mkdir()
        start = time.perf_counter()
        with contextlib.suppress(Exception):
            exchange_import(fed, IMPORT_NODE, empty)
            results.import_startup.append(time.perf_counter() - start)


def measure_publishing(
    root: Path,
    data: Inputs,
    warmup: list[Path],
    bodies: list[tuple[bytes, str, int]],
    args: argparse.Namespace,
    results: Results,
) -> None:
    """STOW-RS again, with the node publishing each study to the hub as it arrives.

    The node's outbox sends an ImagingStudy per changed study a moment after its commit,
    so during a bulk STOW-RS the node also builds and sends those, and the hub (on the
    same cores here) validates and indexes them. For information: not like for like.
    """
    nodes = [NodeSpec(PUBLISHING_NODE, "org-bench-publishing", "tenant-bench-publishing")]
    print("exchange: starting a hub and a node that publishes to it …")
    with LocalFederation(
        root / "exchange-publishing", nodes, node_env={"EXCHANGE_LOG_LEVEL": "warning"}
    ) as fed:
        node = fed.node(PUBLISHING_NODE)
        assert node.process is not None
        headers = {
            "X-API-Key": fed.api_key(PUBLISHING_NODE),
            "Accept": "application/dicom+json",
            **NO_COMPRESSION,
        }
        url = f"{node.url}/dicomweb/studies"
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:

            def stow_publishing() -> Figure:
                warm_body, warm_type = multipart_body(warmup)
                stow(client, url, headers, [(warm_body, warm_type, len(warmup))], 1)
                seconds = stow(client, url, headers, bodies, args.clients)
                return Figure(len(data.files), data.total_bytes, seconds)

            print("exchange: STOW-RS while publishing …")
            results.run(PUBLISHING, "exchange", stow_publishing)
        results.peak("exchange node (STOW-RS, publishing)", node.process.pid)


# -- Orthanc -------------------------------------------------------------------


def dicomweb_plugin() -> Path | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        for line in listed:
            if "/plugins/" in line and line.endswith(".so"):
                return Path(line)
        for line in listed:
            if "DicomWeb" in line and ".so" in line:
                return Path(line)
    return None


@dataclass
class Orthanc:
    root: Path
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    dicomweb: bool = False

    @property
    def log(self) -> Path:
        return self.root / "orthanc.log"

    def start(self) -> Orthanc:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise Unavailable(ORTHANC_MISSING)
        plugin = dicomweb_plugin()
        self.root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": port,
            "DicomPort": free_port(),
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(plugin)] if plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, str(self.root / "orthanc.json")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"Orthanc exited with {self.process.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    plugins = httpx.get(f"{self.url}/plugins", timeout=5).json()
                    self.dicomweb = "dicom-web" in plugins
                    return self
            time.sleep(0.1)
        raise Unavailable(f"Orthanc did not answer /system within {STARTUP_SECONDS:.0f}s")

    def tail(self, lines: int = 5) -> str:
        """Orthanc's error lines (``E…``), else the end of its log."""
        with contextlib.suppress(OSError):
            logged = self.log.read_text(errors="replace").splitlines()
            errors = [line for line in logged if line.startswith("E")]
            return " | ".join((errors or logged)[-lines:]) + f" ({self.log}; --keep keeps it)"
        return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def running_orthanc(root: Path) -> Iterator[Orthanc]:
    orthanc = Orthanc(root)
    try:
        yield orthanc.start()
    finally:
        orthanc.stop()


def orthanc_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package} ${Version}\n", "orthanc", "orthanc-dicomweb"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return ", ".join(out.split("\n")[:-1]) or "?"
    return "?"


def measure_orthanc(
    root: Path,
    data: Inputs,
    warmup: list[Path],
    bodies: list[tuple[bytes, str, int]],
    args: argparse.Namespace,
    results: Results,
) -> None:
    headers = {"Accept": "application/dicom+json", **NO_COMPRESSION}
    print("orthanc: starting (STOW-RS and retrieval) …")
    with (
        running_orthanc(root / "orthanc-stow") as orthanc,
        httpx.Client(timeout=HTTP_TIMEOUT) as client,
    ):
        assert orthanc.process is not None
        url = f"{orthanc.url}/dicom-web/studies"
        if not orthanc.dicomweb:
            reason = "the orthanc-dicomweb plugin is not loaded (Debian package orthanc-dicomweb)"
            results.notes["ingest STOW-RS", "orthanc"] = reason
            results.notes["retrieve WADO-RS", "orthanc"] = reason
        else:

            def stow_theirs() -> Figure:
                warm_body, warm_type = multipart_body(warmup)
                stow(client, url, headers, [(warm_body, warm_type, len(warmup))], 1)
                seconds = stow(client, url, headers, bodies, args.clients)
                return Figure(len(data.files), data.total_bytes, seconds)

            print("orthanc: STOW-RS …")
            results.run("ingest STOW-RS", "orthanc", stow_theirs)
            print("orthanc: WADO-RS retrieval …")
            results.run(
                "retrieve WADO-RS",
                "orthanc",
                lambda: retrieve(
                    client, lambda study: f"{url}/{study}", lambda _study: NO_COMPRESSION, data
                ),
            )
        results.peak("orthanc (STOW-RS, WADO-RS)", orthanc.process.pid)

    print("orthanc: starting afresh (folder import) …")
    with (
        running_orthanc(root / "orthanc-import") as orthanc,
        httpx.Client(timeout=HTTP_TIMEOUT) as client,
    ):
        assert orthanc.process is not None

        def post_file(path: Path) -> None:
            answer = client.post(
                f"{orthanc.url}/instances",
                content=path.read_bytes(),
                headers={"Content-Type": DICOM, **NO_COMPRESSION},
            )
            if answer.status_code != 200 or answer.json().get("Status") != "Success":
                raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")

        def import_theirs() -> Figure:
            for path in warmup:
                post_file(path)
            start = time.perf_counter()
            for path in data.files:  # ImportDicomFiles.py: one POST a file, in order
                post_file(path)
            return Figure(len(data.files), data.total_bytes, time.perf_counter() - start)

        print("orthanc: folder import (POST /instances a file) …")
        results.run("ingest folder import", "orthanc", import_theirs)
        results.peak("orthanc (folder import)", orthanc.process.pid)


# -- report --------------------------------------------------------------------


def _cell(figure: Figure | None) -> str:
    if figure is None:
        return "n/a"
    return f"{figure.per_second:7.1f} inst/s  {figure.mb_per_second:7.1f} MB/s"


def report(results: Results, data: Inputs, baseline: Figure | None, rounds: int) -> bool:
    """Print the table; True when every ingest ratio that could be measured meets the target."""
    met = True
    measured_any = False
    print()
    print(
        f"{'median of ' + str(rounds) + ' round(s)':22} {'exchange':>28} | {'orthanc':>28} | "
        "ratio (exchange / orthanc)"
    )
    for what in MEASUREMENTS:
        ours = results.median(what, "exchange")
        theirs = results.median(what, "orthanc")
        line = f"{what:22} {_cell(ours):>28} | {_cell(theirs):>28} | "
        if ours is not None and theirs is not None:
            ratio = ours.per_second / theirs.per_second
            line += f"{ratio:.2f}x"
            if what.startswith("ingest"):
                measured_any = True
                line += f" (target >= {TARGET_RATIO})"
                if ratio < TARGET_RATIO:
                    met = False
                    line += "  TARGET MISSED"
        else:
            line += "n/a"
        print(line)
    publishing = results.median(PUBLISHING, "exchange")
    if publishing is not None:
        line = f"{PUBLISHING:22} {_cell(publishing):>28} | "
        theirs = results.median("ingest STOW-RS", "orthanc")
        if theirs is not None:
            ratio = publishing.per_second / theirs.per_second
            line += f"{'(orthanc publishes nothing)':>28} | {ratio:.2f}x of orthanc's STOW-RS"
        print(line + " (for information, not a target)")
    if baseline is not None:
        print(f"{'read plain files':22} {_cell(baseline):>28} | (baseline for retrieval)")
        ours = results.median("retrieve WADO-RS", "exchange")
        theirs = results.median("retrieve WADO-RS", "orthanc")
        for name, figure in (("exchange", ours), ("orthanc", theirs)):
            if figure is not None:
                share = figure.mb_per_second / baseline.mb_per_second
                print(f"  {name} WADO-RS retrieval runs at {share:.1%} of the plain-file read rate")
    for (what, who), note in sorted(results.notes.items()):
        measured = len(results.figures.get((what, who), []))
        if measured:
            print(f"  note: {what} / {who}: measured in {measured} round(s); other rounds: {note}")
        else:
            print(f"  n/a {what} / {who}: {note}")
    for process, rss in results.memory.items():
        print(f"  memory: {process}: peak RSS {rss:.0f} MB")
    for (what, who), figures in sorted(results.figures.items()):
        if len(figures) > 1:
            rates = ", ".join(f"{f.per_second:.1f}" for f in figures)
            print(f"  rounds: {what} / {who}: {rates} inst/s")
    for what in MEASUREMENTS:
        ours, theirs = results.best(what, "exchange"), results.best(what, "orthanc")
        if ours is not None and theirs is not None and len(results.figures[what, "exchange"]) > 1:
            print(
                f"  best rounds: {what}: exchange {ours.per_second:.1f} / orthanc "
                f"{theirs.per_second:.1f} inst/s = {ours.per_second / theirs.per_second:.2f}x "
                "(the fastest round of each: the least disturbed)"
            )
    if results.import_startup:
        startup = sorted(results.import_startup)[len(results.import_startup) // 2]
        print(
            f"  note: `exchange import` of an empty folder takes {startup:.2f} s (interpreter, "
            "imports, opening the store): included in the folder-import figure"
        )
        ours = results.median("ingest folder import", "exchange")
        theirs = results.median("ingest folder import", "orthanc")
        if ours is not None and ours.seconds > startup:
            rate = ours.instances / (ours.seconds - startup)
            versus = f", {rate / theirs.per_second:.2f}x orthanc" if theirs is not None else ""
            print(f"  note: without it, exchange folder import ran at {rate:.1f} inst/s{versus}")
    if results.cpu is not None:
        others = results.cpu.others_share()
        skewed = " - other work competed for the CPU: figures are skewed" if others > 0.1 else ""
        print(
            f"  note: other processes used {others:.0%} of the {cores()} cores in the run{skewed}"
        )
    for line in results.remarks:
        print(f"  note: {line}")
    print(
        f"  data: {len(data.files)} instances, {data.total_bytes / MB:.1f} MB in "
        f"{len(data.studies)} studies"
    )
    if not measured_any:
        print("  target: not assessed (no ingest measured on both sides)")
    elif met:
        print(f"  target met: ingest >= {TARGET_RATIO}x Orthanc's instances/s")
    else:
        print(f"  TARGET MISSED: ingest below {TARGET_RATIO}x Orthanc's instances/s")
    return met


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 40 s)")
    parser.add_argument("--batch", type=int, default=20, help="instances a STOW-RS request")
    parser.add_argument("--clients", type=int, default=1, help="concurrent STOW-RS requests")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds, each on fresh stores; the median is reported (default 5, --quick 3)",
    )
    parser.add_argument(
        "--studies", type=int, default=None, help="synthetic CT studies (10; --quick 4)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices a study (100, an archive-sized folder of ~1000 instances; --quick 10)",
    )
    parser.add_argument("--no-orthanc", action="store_true", help="measure Exchange only")
    parser.add_argument(
        "--no-publishing",
        action="store_true",
        help="skip the STOW-RS row with the node publishing to the hub",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="stay in the current network namespace (Orthanc is then not started)",
    )
    args = parser.parse_args(raw)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5

    orthanc_reason: str | None = "--no-orthanc" if args.no_orthanc else None
    if orthanc_reason is None and shutil.which("Orthanc") is None:
        orthanc_reason = ORTHANC_MISSING
    if orthanc_reason is None and not os.environ.get(NETNS_MARKER):
        if args.no_netns:
            orthanc_reason = (
                "--no-netns: Orthanc binds every interface, so it runs only in a private "
                "network namespace"
            )
        else:
            why = _reexec_in_private_netns([str(Path(__file__).resolve()), *raw])
            orthanc_reason = (
                f"{why}; Orthanc binds every interface, so it is started only in a private "
                "network namespace"
            )

    # A site's folder import is an archive (a CT study alone has 100-500 slices); at 20
    # slices a study the import's fixed start-up (~0.5 s) was most of what was measured.
    studies, slices, size = (4, 10, 256) if args.quick else (10, 100, 512)
    studies = args.studies or studies
    slices = args.slices or slices
    root = Path(tempfile.mkdtemp(prefix="exchange-bench-"))
    try:
        print(
            f"Exchange ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{cores()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.2f}"
            + (", private network namespace" if os.environ.get(NETNS_MARKER) else "")
        )
        bytecode = compile_bytecode()
        data = make_inputs(root / "data", studies, slices, size)
        warmup = warmup_files(root / "warmup")
        print(
            f"data: {len(data.files)} instances ({studies} synthetic CT studies of {slices} "
            f"{size}x{size} slices + pydicom CT_small, MR_small), {data.total_bytes / MB:.1f} MB; "
            f"STOW-RS batches of {args.batch}, {args.clients} client(s)"
        )
        bodies = []
        for batch in batches(data.files, args.batch):
            body, content_type = multipart_body(batch)
            bodies.append((body, content_type, len(batch)))

        results = Results()
        results.remarks.append(bytecode)
        with contextlib.suppress(OSError, ValueError):
            results.cpu = CpuWatch()
        for index in range(args.rounds):
            print(f"round {index + 1} of {args.rounds}")
            try:
                measure_exchange(root / f"round{index}", data, warmup, bodies, args, results)
            except RuntimeError as exc:  # the federation did not start: say why, go on
                print(f"exchange: not measured in this round: {exc}")
                results.remarks.append(f"exchange did not start in a round: {exc}")
            if orthanc_reason is None:
                try:
                    measure_orthanc(root / f"round{index}", data, warmup, bodies, args, results)
                except Unavailable as exc:
                    orthanc_reason = str(exc)
            if not args.no_publishing:
                try:
                    measure_publishing(root / f"round{index}", data, warmup, bodies, args, results)
                except RuntimeError as exc:
                    print(f"exchange (publishing): not measured in this round: {exc}")
        if orthanc_reason is None:
            results.remarks.append(f"Debian {orthanc_version()}; Orthanc at its default settings")
        if orthanc_reason is not None:
            print(f"orthanc: not measured: {orthanc_reason}")
            results.remarks.append(f"orthanc not measured: {orthanc_reason}")
        results.remarks.append(
            "folder import: exchange = `exchange import FOLDER` (process start to exit, direct "
            "to the store); orthanc = POST /instances a file over HTTP (ImportDicomFiles.py)"
        )
        baseline = read_plain_files(data)
        report(results, data, baseline, args.rounds)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
