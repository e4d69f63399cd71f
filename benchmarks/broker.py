"""What the hub's DICOMweb broker costs: retrieval through it, straight from the node, raw.

Run:  .venv/bin/python benchmarks/broker.py [--quick] [--rounds N] [--requests N]

One run starts a hub (development IdP) and one site node as real processes on
loopback, STOWs one fixed study to the node (50 synthetic CT slices of 512x512
16-bit, ~512 KiB each; deterministic UIDs) and publishes it to the hub's index as
the site's system would. Then, on one keep-alive client each:

* **study retrieval** (``GET …/studies/{uid}``, multipart/related
  application/dicom, as stored), MB/s and studies/s:
  - through the broker (``{hub}/dicomweb``, the holding organisation's own
    clinician, so the policy allows ``export``): token check, index lookup,
    decision, AuditEvent, grant, node call, relay;
  - straight from the node with a hub ``export`` grant (signed before the
    clock starts);
  - raw loopback: a bare uvicorn ASGI app (uvloop + httptools, like ours) that
    sends the same number of bytes from memory in 1 MiB chunks: what HTTP on
    this machine costs with no store, no decryption and no hop.
* **added latency per small request**: ``…/instances/{sop}/metadata`` of one
  instance, broker and direct alternating, p50 / p99 of each and the difference.

Rounds alternate between the paths, so drift on a shared machine hits them alike.
Every answer is checked (status, number of parts, bytes). MB is 10^6 bytes.
Targets (issue 7, acceptance 8): broker >= 0.6x direct throughput; <= 3 ms p99
added per small request. Exit status is 0 whether or not they are met.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.studies import publish
from exchange.dicom.samples import StudySpec
from exchange.federation import LocalFederation, NodeSpec, free_port

MB = 1_000_000
MiB = 1024 * 1024
SITE = NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a")
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
THROUGHPUT_TARGET = 0.6
LATENCY_TARGET_MS = 3.0


# -- raw loopback baseline (runs in its own process) ------------------------------------------


def serve_raw(port: int, size: int) -> None:  # pragma: no cover - a child process
    """A bare ASGI app answering ``size`` bytes from memory in 1 MiB chunks."""
    import uvicorn

    chunk = b"\0" * MiB

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")],
            }
        )
        left = size
        while left > 0:
            part = chunk if left >= MiB else chunk[:left]
            left -= len(part)
            await send({"type": "http.response.body", "body": part, "more_body": left > 0})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


# -- set-up -------------------------------------------------------------------------------------


@dataclass
class Setup:
    federation: LocalFederation
    uid: str
    series: str
    sop: str
    instances: int
    study_bytes: int
    token: str


def set_up(root: Path, slices: int, size: int) -> Setup:
    federation = LocalFederation(root=root, nodes=[SITE], publishing=False).start()
    spec = StudySpec(
        patient_id="BENCH-1",
        patient_name="Bench^Broker",
        accession="BENCH-BROKER-1",
        slices=slices,
        size=size,
    )
    published = publish(federation, SITE, spec)
    first = published.datasets[0]
    return Setup(
        federation=federation,
        uid=published.uid,
        series=str(first.SeriesInstanceUID),
        sop=str(first.SOPInstanceUID),
        instances=len(published.files),
        study_bytes=sum(len(f) for f in published.files),
        token=published.idp.issue(
            sub="dr-bench", role="clinician", org=SITE.organization, purpose=["TREAT"]
        ),
    )


# -- measuring ----------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _fetch(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Stream one answer; its length and its last bytes (for checking)."""
    total = 0
    tail = b""
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:200]}")
        for chunk in response.iter_raw(MiB):
            total += len(chunk)
            tail = (tail + chunk)[-64:]
    return total, tail


@dataclass
class Throughput:
    name: str
    seconds: list[float]
    body_bytes: int
    cpu: dict[str, float]

    @property
    def best(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_s(self) -> float:
        return self.body_bytes / MB / self.best

    @property
    def studies_s(self) -> float:
        return 1 / self.best


def measure_throughput(setup: Setup, raw_url: str, rounds: int) -> list[Throughput]:
    federation = setup.federation
    hub, node = federation.hub, federation.node(SITE.node_id)
    pids = {"hub": hub.process.pid, "node": node.process.pid}  # type: ignore[union-attr]
    broker_url = f"{hub.url}/dicomweb/studies/{setup.uid}"
    node_url = f"{node.url}/dicomweb/studies/{setup.uid}"
    user = {"Authorization": f"Bearer {setup.token}", "Accept": DICOM_ACCEPT}
    results = {
        name: Throughput(name, [], 0, {k: 0.0 for k in pids})
        for name in ("broker", "direct", "raw")
    }
    with httpx.Client(timeout=120) as client:

        def path(name: str) -> tuple[str, Callable[[], dict[str, str]]]:
            if name == "broker":
                return broker_url, lambda: user
            if name == "direct":
                return node_url, lambda: {
                    "Authorization": "Bearer "
                    + federation.grant(SITE.node_id, setup.uid, "export", ttl=60),
                    "Accept": DICOM_ACCEPT,
                }
            return raw_url, dict

        for name in results:  # warm-up: connections, page cache, code paths
            url, headers = path(name)
            _fetch(client, url, headers())
        for round_ in range(rounds):
            order = ["broker", "direct", "raw"]
            order = order[round_ % 3 :] + order[: round_ % 3]
            for name in order:
                url, headers = path(name)
                sent = headers()  # the grant is signed before the clock starts
                cpu = {k: _cpu_seconds(p) for k, p in pids.items()}
                started = time.perf_counter()
                size, tail = _fetch(client, url, sent)
                results[name].seconds.append(time.perf_counter() - started)
                for k, p in pids.items():
                    results[name].cpu[k] += _cpu_seconds(p) - cpu[k]
                if name != "raw" and not tail.rstrip().endswith(b"--"):
                    raise RuntimeError(f"{name}: the multipart answer did not close")
                results[name].body_bytes = size
    return list(results.values())


def measure_latency(setup: Setup, requests: int) -> dict[str, list[float]]:
    federation = setup.federation
    suffix = f"/dicomweb/studies/{setup.uid}/series/{setup.series}/instances/{setup.sop}/metadata"
    broker_url = federation.hub.url + suffix
    node_url = federation.node(SITE.node_id).url + suffix
    user = {"Authorization": f"Bearer {setup.token}", "Accept": "application/dicom+json"}
    times: dict[str, list[float]] = {"broker": [], "direct": []}
    grant_made = 0.0
    grant = ""
    with httpx.Client(timeout=30) as client:
        for n in range(requests + 20):
            if time.monotonic() - grant_made > 30:
                grant = federation.grant(SITE.node_id, setup.uid, "view", ttl=60)
                grant_made = time.monotonic()
            direct = {"Authorization": f"Bearer {grant}", "Accept": "application/dicom+json"}
            order = [("broker", broker_url, user), ("direct", node_url, direct)]
            for name, url, headers in order if n % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                response = client.get(url, headers=headers)
                elapsed = time.perf_counter() - started
                if response.status_code != 200 or setup.sop not in response.text:
                    raise RuntimeError(f"{name} metadata: {response.status_code}")
                if n >= 20:  # the first 20 pairs warm up
                    times[name].append(elapsed * 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def grant_signing_ms() -> float:
    """In-process RS256 grant signing time (what the broker adds per request for it)."""
    from exchange.security import grants
    from exchange.security.keys import load_or_create as load

    with tempfile.TemporaryDirectory() as tmp:
        key = load(Path(tmp) / "k.pem")
        args: dict[str, Any] = {
            "issuer": "http://hub",
            "node": "n",
            "caller": "c",
            "study": "1.2.3",
            "action": "view",
            "decision": "d",
        }
        for _ in range(50):
            grants.issue(key, **args)
        started = time.perf_counter()
        for _ in range(500):
            grants.issue(key, **args)
        return (time.perf_counter() - started) / 500 * 1000


# -- report -------------------------------------------------------------------------------------


def report(
    setup: Setup,
    rows: list[Throughput],
    latency: dict[str, list[float]],
    others: float,
    rounds: int,
) -> None:
    by = {r.name: r for r in rows}
    print()
    print(
        f"study: {setup.instances} instances, {setup.study_bytes / MB:.1f} MB as files, "
        f"{by['broker'].body_bytes / MB:.1f} MB as multipart/related; median of {rounds} rounds"
    )
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}")
    print()
    print("| study retrieval | MB/s | studies/s | hub CPU s/study | node CPU s/study |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        hub_cpu = r.cpu["hub"] / rounds
        node_cpu = r.cpu["node"] / rounds
        print(f"| {r.name} | {r.mb_s:.0f} | {r.studies_s:.2f} | {hub_cpu:.2f} | {node_cpu:.2f} |")
    ratio = by["broker"].mb_s / by["direct"].mb_s
    raw_ratio = by["direct"].mb_s / by["raw"].mb_s
    verdict = "met" if ratio >= THROUGHPUT_TARGET else "TARGET MISSED"
    print()
    print(f"broker / direct: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}: {verdict})")
    print(f"direct / raw loopback: {raw_ratio:.2f}x")
    print()
    b, d = latency["broker"], latency["direct"]
    p50 = (percentile(b, 50), percentile(d, 50))
    p99 = (percentile(b, 99), percentile(d, 99))
    print(f"| instance metadata ({len(b)} requests each) | p50 ms | p99 ms |")
    print("| --- | --- | --- |")
    print(f"| broker | {p50[0]:.2f} | {p99[0]:.2f} |")
    print(f"| direct | {p50[1]:.2f} | {p99[1]:.2f} |")
    print(f"| added by the broker | {p50[0] - p50[1]:.2f} | {p99[0] - p99[1]:.2f} |")
    added = p99[0] - p99[1]
    verdict = "met" if added <= LATENCY_TARGET_MS else "TARGET MISSED"
    print()
    print(f"added p99: {added:.2f} ms (target <= {LATENCY_TARGET_MS} ms: {verdict})")
    print(f"grant signing (RS256, in process): {grant_signing_ms():.2f} ms")
    print(f"other processes used {others:.0%} of the machine during the run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10 slices, 3 rounds, 200 requests")
    parser.add_argument("--rounds", type=int, default=None, help="timed retrievals per path (7)")
    parser.add_argument("--requests", type=int, default=None, help="metadata requests (1000)")
    parser.add_argument(
        "--serve-raw", nargs=2, type=int, metavar=("PORT", "SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve_raw:
        serve_raw(*args.serve_raw)
        return 0
    slices = 10 if args.quick else 50
    rounds = args.rounds or (3 if args.quick else 7)
    requests = args.requests or (200 if args.quick else 1000)

    with tempfile.TemporaryDirectory(prefix="exchange-broker-bench-") as tmp:
        print(f"starting a hub and a node, storing {slices} CT slices of 512x512 …", flush=True)
        setup = set_up(Path(tmp), slices, 512)
        raw = None
        try:
            # The raw baseline sends as many bytes as the node's answer has.
            size, _ = _fetch(
                httpx.Client(timeout=120),
                f"{setup.federation.node(SITE.node_id).url}/dicomweb/studies/{setup.uid}",
                {
                    "Authorization": "Bearer "
                    + setup.federation.grant(SITE.node_id, setup.uid, "export"),
                    "Accept": DICOM_ACCEPT,
                },
            )
            port = free_port()
            raw = subprocess.Popen(
                [sys.executable, __file__, "--serve-raw", str(port), str(size)],
                stdin=subprocess.DEVNULL,
            )
            raw_url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(raw_url, timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            print(f"measuring: {rounds} rounds of retrieval, {requests} metadata requests …")
            busy = _machine_busy_seconds()
            wall = time.monotonic()
            ours = [
                setup.federation.hub.process.pid,  # type: ignore[union-attr]
                setup.federation.node(SITE.node_id).process.pid,  # type: ignore[union-attr]
                raw.pid,
            ]
            ours_cpu = sum(_cpu_seconds(p) for p in ours) + time.process_time()
            rows = measure_throughput(setup, raw_url, rounds)
            latency = measure_latency(setup, requests)
            used = _machine_busy_seconds() - busy
            mine = sum(_cpu_seconds(p) for p in ours) + time.process_time() - ours_cpu
            others = max(0.0, used - mine) / ((time.monotonic() - wall) * (os.cpu_count() or 1))
            report(setup, rows, latency, others, rounds)
        finally:
            if raw is not None:
                raw.terminate()
                raw.wait(10)
            setup.federation.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
