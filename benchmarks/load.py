"""16 concurrent viewers against a hub and two nodes, and the same load against Orthanc.

Run:  .venv/bin/python benchmarks/load.py [--seconds 60] [--quick] [--viewers 16]

Each viewer repeats what a viewer does to open a study, as fast as it is answered:
search for it, read its metadata, fetch one instance's frame and its rendered image,
and retrieve the whole study; with Exchange all through the hub (FHIR search, then the
consent-checked broker, which audits and proxies to the holding node; half the viewers
are clinicians of site A, half of site B, each opening their own site's studies), with
Orthanc the same DICOMweb calls on its own ``/dicom-web`` (a QIDO-RS search stands for
the FHIR search). Both serve the same studies, to the same number of viewers, for the
same time, in the same run: Exchange first, then Orthanc.

Printed: requests, errors (anything but a whole 200 answer; 0 required), requests a
second, p50/p99 latency per kind of request, and the Exchange/Orthanc throughput ratio.
Under ``make reliability`` (``EXCHANGE_RELIABILITY_REPORT_DIR`` set) the figures also go
to ``figures.ndjson`` as suite ``load``. Orthanc binds every interface, so, like
benchmarks/ingest.py, the script re-executes itself in a private network namespace; where
Orthanc is missing or cannot be confined it says why and measures Exchange alone.
Exit status: 1 if any request failed, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ingest import (
    NETNS_MARKER,
    ORTHANC_MISSING,
    Unavailable,
    _reexec_in_private_netns,
    orthanc_version,
    running_orthanc,
)
from benchmarks.studies import multipart, part10
from exchange.dicom.samples import StudySpec, study
from exchange.federation import LocalFederation, NodeSpec
from exchange.security.devidp import DevIdentityProvider, key_path
from exchange.security.keys import load_or_create
from tests import reliability

SITES = [
    NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a"),
    NodeSpec(node_id="site-b", organization="org-b", tenant="tenant-b"),
]
KINDS = ("search", "metadata", "frame", "rendered", "study")
DICOM_JSON = "application/dicom+json"
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
NO_COMPRESSION = {"Accept-Encoding": "identity"}
PUBLISH_TIMEOUT = 120.0


@dataclass(frozen=True)
class Study:
    uid: str
    series: str
    sop: str
    site: str
    files: tuple[bytes, ...]


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + len(self.errors)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_studies(per_site: int, slices: int, size: int) -> list[Study]:
    studies = []
    for site in SITES:
        for n in range(per_site):
            spec = StudySpec(
                patient_id=f"LOAD-{site.node_id}-{n}",
                patient_name=f"Load^Patient{n}",
                accession=f"LOAD-{site.node_id}-{n}",
                slices=slices,
                size=size,
            )
            datasets = study(spec)
            first = datasets[0]
            studies.append(
                Study(
                    str(first.StudyInstanceUID),
                    str(first.SeriesInstanceUID),
                    str(first.SOPInstanceUID),
                    site.node_id,
                    tuple(part10(ds) for ds in datasets),
                )
            )
    return studies


# -- the viewer -----------------------------------------------------------------------------

#: One viewer's requests for one study: (kind, path, headers, check of the answer).
Plan = list[tuple[str, str, dict[str, str], Callable[[httpx.Response], bool]]]


def _whole_multipart(answer: httpx.Response) -> bool:
    return answer.content.rstrip().endswith(b"--")


def viewer_plan(base: str, item: Study, search: tuple[str, dict[str, str]]) -> Plan:
    """The requests a viewer makes to open ``item`` (``base`` is the DICOMweb root)."""
    instance = f"{base}/studies/{item.uid}/series/{item.series}/instances/{item.sop}"
    search_path, search_params = search
    query = "&".join(f"{k}={v}" for k, v in search_params.items())
    return [
        ("search", f"{search_path}?{query}", {}, lambda a: item.uid in a.text),
        (
            "metadata",
            f"{base}/studies/{item.uid}/metadata",
            {"Accept": DICOM_JSON},
            lambda a: item.sop in a.text,
        ),
        ("frame", f"{instance}/frames/1", {"Accept": FRAME_ACCEPT}, _whole_multipart),
        (
            "rendered",
            f"{instance}/rendered",
            {"Accept": "image/jpeg"},
            lambda a: len(a.content) > 100,
        ),
        ("study", f"{base}/studies/{item.uid}", {"Accept": STUDY_ACCEPT}, _whole_multipart),
    ]


async def run_viewers(
    plans: list[tuple[dict[str, str], list[Plan]]], seconds: float, tally: Tally
) -> None:
    """Each (headers, plans) pair is one viewer cycling through its studies until time is up."""
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=len(plans) * 2, max_keepalive_connections=len(plans))

    async def viewer(client: httpx.AsyncClient, auth: dict[str, str], studies: list[Plan]) -> None:
        n = 0
        while time.monotonic() < deadline:
            for kind, url, headers, check in studies[n % len(studies)]:
                started = time.perf_counter()
                try:
                    answer = await client.get(url, headers={**auth, **headers, **NO_COMPRESSION})
                    ok = answer.status_code == 200 and check(answer)
                    why = f"{kind}: HTTP {answer.status_code} {answer.text[:120]!r}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{kind}: {type(exc).__name__} {exc}"
                if ok:
                    tally.latencies[kind].append((time.perf_counter() - started) * 1000)
                else:
                    tally.errors.append(why)
            n += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(*(viewer(client, auth, studies) for auth, studies in plans))
        tally.seconds = time.monotonic() - started


async def _warm(plans: list[tuple[dict[str, str], list[Plan]]]) -> None:
    """One pass over the studies of one viewer a site (connections, caches, code paths)."""
    async with httpx.AsyncClient(timeout=120) as client:
        for auth, studies in plans[: len(SITES)]:
            for steps in studies:
                for _kind, url, headers, _check in steps:
                    await client.get(url, headers={**auth, **headers})


# -- Exchange -------------------------------------------------------------------------------


def measure_exchange(root: Path, studies: list[Study], viewers: int, seconds: float) -> Tally:
    print("exchange: starting a hub and two nodes …")
    with LocalFederation(root / "exchange", SITES) as federation:
        hub = federation.hub.url
        idp = DevIdentityProvider(
            f"{hub}/idp", load_or_create(key_path(federation.hub.data_dir)), "exchange"
        )
        operator = {
            "Authorization": f"Bearer {idp.issue(sub='op', role='operator', org='hie', ttl=3600)}"
        }
        with httpx.Client(timeout=300) as client:
            for site in SITES:
                key = federation.api_key(site.node_id)
                for item in (s for s in studies if s.site == site.node_id):
                    body, content_type = multipart(item.files)
                    client.post(
                        f"{federation.node(site.node_id).url}/dicomweb/studies",
                        content=body,
                        headers={"Content-Type": content_type, "X-API-Key": key},
                    ).raise_for_status()
            print("exchange: waiting for the nodes to publish to the hub …")
            deadline = time.monotonic() + PUBLISH_TIMEOUT
            for item in studies:
                while True:
                    found = client.get(
                        f"{hub}/fhir/ImagingStudy",
                        params={"identifier": f"urn:dicom:uid|urn:oid:{item.uid}"},
                        headers=operator,
                    ).json()
                    if found.get("entry"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"study {item.uid} was not published in time")
                    time.sleep(0.2)
        plans = []
        for n in range(viewers):
            site = SITES[n % len(SITES)]
            token = idp.issue(
                sub=f"dr-load-{n}",
                role="clinician",
                org=site.organization,
                purpose=["TREAT"],
                ttl=3600,
            )
            mine = [s for s in studies if s.site == site.node_id]
            mine = mine[n // len(SITES) % len(mine) :] + mine[: n // len(SITES) % len(mine)]
            search = f"{hub}/fhir/ImagingStudy"
            plans.append(
                (
                    {"Authorization": f"Bearer {token}"},
                    [
                        viewer_plan(
                            f"{hub}/dicomweb",
                            s,
                            (search, {"identifier": f"urn:dicom:uid|urn:oid:{s.uid}"}),
                        )
                        for s in mine
                    ],
                )
            )
        asyncio.run(_warm(plans))
        print(f"exchange: {viewers} viewers for {seconds:.0f} s …")
        tally = Tally()
        asyncio.run(run_viewers(plans, seconds, tally))
    return tally


# -- Orthanc --------------------------------------------------------------------------------


def measure_orthanc(root: Path, studies: list[Study], viewers: int, seconds: float) -> Tally:
    print("orthanc: starting …")
    with running_orthanc(root / "orthanc") as orthanc:
        if not orthanc.dicomweb:
            raise Unavailable("the orthanc-dicomweb plugin is not loaded (Debian orthanc-dicomweb)")
        base = f"{orthanc.url}/dicom-web"
        with httpx.Client(timeout=300) as client:
            for item in studies:
                body, content_type = multipart(item.files)
                client.post(
                    f"{base}/studies", content=body, headers={"Content-Type": content_type}
                ).raise_for_status()
        plans = []
        for n in range(viewers):
            site = SITES[n % len(SITES)]
            mine = [s for s in studies if s.site == site.node_id]
            mine = mine[n // len(SITES) % len(mine) :] + mine[: n // len(SITES) % len(mine)]
            plans.append(
                (
                    {},
                    [
                        viewer_plan(base, s, (f"{base}/studies", {"StudyInstanceUID": s.uid}))
                        for s in mine
                    ],
                )
            )
        asyncio.run(_warm(plans))
        print(f"orthanc: {viewers} viewers for {seconds:.0f} s …")
        tally = Tally()
        asyncio.run(run_viewers(plans, seconds, tally))
    return tally


# -- report ---------------------------------------------------------------------------------


def report(name: str, tally: Tally) -> None:
    print(
        f"\n{name}: {tally.requests} requests in {tally.seconds:.1f} s, "
        f"{tally.per_second:.1f} requests/s, {len(tally.errors)} errors"
    )
    every = [v for values in tally.latencies.values() for v in values]
    print(f"  {'request':<10} {'count':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for kind in (*KINDS, "all"):
        values = every if kind == "all" else tally.latencies[kind]
        print(
            f"  {kind:<10} {len(values):>7} {percentile(values, 50):>9.1f} "
            f"{percentile(values, 99):>9.1f}"
        )
    for error in tally.errors[:5]:
        print(f"  error: {error}")


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=None, help="load duration (default 60)")
    parser.add_argument("--quick", action="store_true", help="about 10 s of load, fewer studies")
    parser.add_argument("--viewers", type=int, default=16, help="concurrent viewers (default 16)")
    parser.add_argument("--no-orthanc", action="store_true", help="measure Exchange only")
    parser.add_argument("--no-netns", action="store_true", help="stay in this network namespace")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(raw)
    seconds = args.seconds if args.seconds is not None else (10.0 if args.quick else 60.0)
    if seconds <= 0 or args.viewers < 2:
        parser.error("--seconds must be positive and --viewers at least 2")

    orthanc_reason: str | None = "--no-orthanc" if args.no_orthanc else None
    if orthanc_reason is None and shutil.which("Orthanc") is None:
        orthanc_reason = ORTHANC_MISSING
    if orthanc_reason is None and not os.environ.get(NETNS_MARKER):
        if args.no_netns:
            orthanc_reason = "--no-netns: Orthanc binds every interface"
        else:
            why = _reexec_in_private_netns([str(Path(__file__).resolve()), *raw])
            orthanc_reason = f"{why}; Orthanc is started only in a private network namespace"

    per_site, slices, size = (2, 8, 256) if args.quick else (4, 16, 256)
    root = Path(tempfile.mkdtemp(prefix="exchange-load-"))
    try:
        print(
            f"Exchange load benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"{len(os.sched_getaffinity(0))} cores, {platform.machine()}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}"
            + (", private network namespace" if os.environ.get(NETNS_MARKER) else "")
        )
        studies = make_studies(per_site, slices, size)
        print(
            f"data: {len(studies)} studies ({per_site} a site) of {slices} {size}x{size} CT "
            f"slices; {args.viewers} viewers, {seconds:.0f} s each for Exchange and Orthanc; "
            "a viewer opens a study as: " + ", ".join(KINDS)
        )
        ours = measure_exchange(root, studies, args.viewers, seconds)
        report("exchange (hub + broker + 2 nodes)", ours)
        theirs: Tally | None = None
        if orthanc_reason is None:
            try:
                theirs = measure_orthanc(root, studies, args.viewers, seconds)
            except Unavailable as exc:
                orthanc_reason = str(exc)
        if theirs is not None:
            report(f"orthanc ({orthanc_version()})", theirs)
            ratio = ours.per_second / theirs.per_second if theirs.per_second else float("nan")
            print(f"\nthroughput exchange / orthanc: {ratio:.2f}")
        else:
            print(f"\northanc: not measured: {orthanc_reason}")
        errors = len(ours.errors) + (len(theirs.errors) if theirs else 0)
        reliability.report(
            "load",
            inputs=ours.requests,
            load_errors=len(ours.errors),
            throughput=round(ours.per_second, 1),
            p50_ms=round(percentile([v for x in ours.latencies.values() for v in x], 50), 1),
            p99_ms=round(percentile([v for x in ours.latencies.values() for v in x], 99), 1),
            orthanc_throughput=round(theirs.per_second, 1) if theirs else None,
            orthanc_errors=len(theirs.errors) if theirs else None,
            orthanc_note=orthanc_reason,
            viewers=args.viewers,
            seconds=seconds,
        )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
