"""One client floods the broker; does another client on the same address notice?

Run:  .venv/bin/python benchmarks/flood.py [--quick] [--requests N] [--connections N]

Issue 10, acceptance 4: one client flooding the broker gets 429s while a second
client's requests all succeed with p99 latency within 2x of its unloaded p99.

A hub (development IdP) and one site node start as real processes on loopback,
with the hub's limits set low enough to matter on this machine: per credential
``--rate`` requests/s (burst the same), per address four times that, at most 4
broker streams per caller. One small fixed study (2 synthetic CT slices) is
STOWed to the node and published to the hub's index by the site's system.

* **steady**: a clinician fetching one instance's metadata
  (``…/instances/{sop}/metadata``, through the broker: token, decision,
  AuditEvent, grant, node call) at a fixed pace (``--pace`` requests/s, below its
  allowance) on one keep-alive connection: first alone, then during the flood.
* **flood**: another clinician of the same organisation, from the same address,
  in a separate process (so its CPU is not the steady client's GIL), sending the
  same request on ``--connections`` keep-alive connections as fast as answers
  come, never waiting for ``Retry-After``.

Prints the steady client's p50 / p99 alone and during the flood and their ratio,
every steady answer that was not 200 (there should be none), and the flooder's
answers by status (429s with and without ``Retry-After``). Exit status 0 either way;
``TARGET MISSED`` when the p99 ratio exceeds 2.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.studies import publish
from exchange.dicom.samples import StudySpec
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider

SITE = NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a")
RATIO_TARGET = 2.0


def limits_env(rate: int, streams: int = 4) -> dict[str, str]:
    """Hub settings for a flood test: small limits that a flood reaches at once."""
    return {
        "EXCHANGE_RATE_LIMIT_PER_SECOND": str(rate),
        "EXCHANGE_RATE_LIMIT_BURST": str(rate),
        "EXCHANGE_RATE_LIMIT_ADDRESS_PER_SECOND": str(rate * 4),
        "EXCHANGE_RATE_LIMIT_ADDRESS_BURST": str(rate * 4),
        "EXCHANGE_BROKER_STREAMS_PER_CALLER": str(streams),
    }


@dataclass
class World:
    federation: LocalFederation
    idp: DevIdentityProvider
    uid: str
    series: str
    sop: str
    patient_id: str
    patient_name: str

    @property
    def hub(self) -> str:
        return self.federation.hub.url

    @property
    def metadata_path(self) -> str:
        return f"/dicomweb/studies/{self.uid}/series/{self.series}/instances/{self.sop}/metadata"

    def clinician(self, sub: str) -> str:
        return self.idp.issue(sub=sub, role="clinician", org=SITE.organization, purpose=["TREAT"])


def set_up(root: Path, hub_env: dict[str, str], node_env: dict[str, str] | None = None) -> World:
    """A hub and one node (publishing off) holding one small published study."""
    federation = LocalFederation(
        root=root, nodes=[SITE], publishing=False, hub_env=hub_env, node_env=node_env or {}
    ).start()
    try:
        return _publish(federation)
    except BaseException:
        federation.stop()
        raise


def _publish(federation: LocalFederation) -> World:
    spec = StudySpec(
        patient_id="FLOOD-1",
        patient_name="Flood^Steady",
        accession="FLOOD-ACC-1",
        slices=2,
        size=64,
    )
    published = publish(federation, SITE, spec)
    first = published.datasets[0]
    return World(
        federation,
        published.idp,
        published.uid,
        str(first.SeriesInstanceUID),
        str(first.SOPInstanceUID),
        spec.patient_id,
        spec.patient_name,
    )


# -- the two clients ------------------------------------------------------------------------


def steady(url: str, token: str, requests: int, pace: float) -> tuple[list[float], Counter[int]]:
    """``requests`` sequential GETs, one every 1/pace s: latencies (s) and statuses."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    interval = 1.0 / pace
    with httpx.Client(headers=headers, timeout=30) as client:
        client.get(url)  # connect and warm the token cache; not counted
        time.sleep(interval)
        start = time.perf_counter()
        for i in range(requests):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            response = client.get(url)
            latencies.append(time.perf_counter() - began)
            statuses[response.status_code] += 1
    return latencies, statuses


async def _flood(url: str, token: str, connections: int, seconds: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:

        async def one() -> None:
            while time.monotonic() < deadline:
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    counts[type(exc).__name__] += 1
                    continue
                counts[str(response.status_code)] += 1
                if response.status_code == 429:
                    counts[
                        "429 with Retry-After"
                        if "retry-after" in response.headers
                        else "429 without Retry-After"
                    ] += 1

        await asyncio.gather(*(one() for _ in range(connections)))
    return dict(counts)


def _flood_process(
    url: str, token: str, connections: int, seconds: float, out: Any
) -> None:  # pragma: no cover - a child process
    out.put(asyncio.run(_flood(url, token, connections, seconds)))


class Flood:
    """The flooder in its own process, for ``seconds``."""

    def __init__(self, url: str, token: str, connections: int, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._process = context.Process(
            target=_flood_process, args=(url, token, connections, seconds, self._queue)
        )

    def __enter__(self) -> Flood:
        self._process.start()
        return self

    def result(self, timeout: float = 120.0) -> dict[str, int]:
        counts: dict[str, int] = self._queue.get(timeout=timeout)
        self._process.join(10)
        return counts

    def __exit__(self, *_exc: object) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


# -- reporting ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service_cpu(world: World) -> dict[str, float]:
    return {
        name: _cpu_seconds(service.process.pid)
        for name, service in world.federation.services.items()
        if service.process is not None
    }


def _machine_busy() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(sum(fields[:3]) + sum(fields[5:7])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 steady requests")
    parser.add_argument("--requests", type=int, default=None, help="steady requests (400)")
    parser.add_argument("--pace", type=float, default=20.0, help="steady requests/s (20)")
    parser.add_argument("--rate", type=int, default=50, help="hub: requests/s per credential")
    parser.add_argument("--connections", type=int, default=8, help="flooder connections (8)")
    args = parser.parse_args(argv)
    requests = args.requests or (100 if args.quick else 400)
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        world = set_up(Path(tmp), limits_env(args.rate))
        try:
            url = world.hub + world.metadata_path
            calm_token, flood_token = world.clinician("dr-steady"), world.clinician("dr-flood")
            print(
                f"hub limits: {args.rate} requests/s per credential, {args.rate * 4} per "
                f"address (unaccepted credentials), 4 broker streams per caller"
            )
            print(f"steady client: {requests} metadata requests at {args.pace:g}/s")
            cpu_start, busy_start = _service_cpu(world), _machine_busy()
            alone, alone_status = steady(url, calm_token, requests, args.pace)
            cpu_alone = {k: v - cpu_start[k] for k, v in _service_cpu(world).items()}
            busy_alone = _machine_busy() - busy_start
            seconds = requests / args.pace + 5
            cpu_before, busy_before = _service_cpu(world), _machine_busy()
            with Flood(url, flood_token, args.connections, seconds) as flood:
                time.sleep(2.0)  # the flood is under way before the steady client starts
                loaded, loaded_status = steady(url, calm_token, requests, args.pace)
                counts = flood.result()
            busy = _machine_busy() - busy_before
            cpu_flood = {k: v - cpu_before[k] for k, v in _service_cpu(world).items()}
        finally:
            world.federation.stop()
    p50a, p99a = percentile(alone, 50) * 1000, percentile(alone, 99) * 1000
    p50l, p99l = percentile(loaded, 50) * 1000, percentile(loaded, 99) * 1000
    ratio = p99l / p99a
    print()
    print("| steady client | p50 ms | p99 ms | statuses |")
    print("| --- | --- | --- | --- |")
    print(f"| alone | {p50a:.2f} | {p99a:.2f} | {dict(alone_status)} |")
    print(f"| during the flood | {p50l:.2f} | {p99l:.2f} | {dict(loaded_status)} |")
    print(f"| ratio | {p50l / p50a:.2f}x | **{ratio:.2f}x** | |")
    print()
    total = sum(v for k, v in counts.items() if k.isdigit())
    print(f"flooder ({args.connections} connections, {seconds:.0f} s): {total} answers, {counts}")
    cores = os.cpu_count() or 1
    alone_s = requests / args.pace
    print(
        f"machine busy: {busy_alone:.1f} CPU-s of {cores * alone_s:.0f} alone, "
        f"{busy:.1f} of {cores * seconds:.0f} during the flood ({cores} cores)"
    )
    for name in cpu_flood:
        print(
            f"{name} CPU: {cpu_alone[name]:.2f} s alone ({alone_s:.0f} s), "
            f"{cpu_flood[name]:.2f} s during the flood ({seconds:.0f} s)"
        )
    failed = sum(v for k, v in loaded_status.items() if k != 200)
    verdict = "met" if ratio <= RATIO_TARGET and not failed else "TARGET MISSED"
    print(f"target (all steady requests 200, p99 ratio <= {RATIO_TARGET:g}x): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
