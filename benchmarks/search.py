"""FHIR search latency of the hub's index, each query beside hand-written SQL for the same answer.

Run:  .venv/bin/python benchmarks/search.py [--quick] [--studies 1000000 --patients 100000]

It bulk-loads synthetic data (``exchange.fhir.synthetic``, what ``exchange hub
load-synthetic`` runs: 100k studies over 10k patients by default) into SQLite and
into a throwaway PostgreSQL server (``tests.pg``), then times three searches, each
``--runs`` times with varied parameters:

* ``patient=<id>``: one patient's studies;
* ``started=ge<day>&started=lt<day+1 month>&modality=<code>``: a month of one modality;
* ``patient=<id>&_include=ImagingStudy:endpoint``: a patient's studies and their Endpoints.

"ours" is what the hub's route does in process: ``search.parse`` → ``search.execute``
(candidates, access hook, page bodies, includes) → ``bundle.searchset`` (a Bundle dict).
The access hook is the identity, as ``hub.access.filter_visible`` is today. "hand SQL" is
one hand-written statement on the same tables giving the same answer (total, the first
page of 20 bodies in the same order, the included bodies), fetched whole. Both run
alternately on the same parameters and the same database, each on a connection from the
pool; every answer of ours is checked against the hand-written one. ``--http`` also times
the same searches over HTTP against a real hub process (``LocalFederation``) on the same
database, with an operator token.

The target: patient search p99 <= 20 ms (ours, in process) at 1M studies. This is a
measurement, not a test: it exits 0 and prints TARGET MET or TARGET MISSED.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, TextClause, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.pg

from exchange.database import make_engine
from exchange.fhir import bundle, search, synthetic
from exchange.fhir import searchparams as sp
from exchange.fhir.repository import RES, SqlRepository

BASE = "http://hub.example/fhir"
TARGET_MS = 20.0
TARGET_STUDIES = 1_000_000
PAGE = search.DEFAULT_COUNT
DCM = "http://dicom.nema.org/resources/ontology/DCM"

# -- hand-written SQL -------------------------------------------------------------------------
# Portable between SQLite and PostgreSQL. ``hits`` are the matching keys from the index
# tables (a deleted resource has no index rows), counted for the total; bodies are read
# for the page only.

PATIENT_SQL = text(
    f"""
    WITH hits AS (
      SELECT x.res_pk AS pk FROM fhir_idx_ref x
      WHERE x.rtype = 'ImagingStudy' AND x.param = 'patient'
        AND x.target_type = 'Patient' AND x.target_id = :patient
    )
    SELECT r.pk, r.id, r.body, (SELECT count(*) FROM hits) AS total
    FROM fhir_resource r WHERE r.pk IN (SELECT pk FROM hits)
    ORDER BY r.pk LIMIT {PAGE}
    """
)
DATE_MODALITY_SQL = text(
    f"""
    WITH hits AS (
      SELECT d.res_pk AS pk FROM fhir_idx_date d
      JOIN fhir_idx_token t ON t.res_pk = d.res_pk
        AND t.rtype = 'ImagingStudy' AND t.param = 'modality'
        AND t.system = :system AND t.code = :code
      WHERE d.rtype = 'ImagingStudy' AND d.param = 'started'
        AND d.start_ms >= :low AND d.start_ms < :high
    )
    SELECT r.pk, r.id, r.body, (SELECT count(*) FROM hits) AS total
    FROM fhir_resource r WHERE r.pk IN (SELECT pk FROM hits)
    ORDER BY r.pk LIMIT {PAGE}
    """
)
INCLUDE_SQL = text(
    f"""
    WITH hits AS (
      SELECT x.res_pk AS pk FROM fhir_idx_ref x
      WHERE x.rtype = 'ImagingStudy' AND x.param = 'patient'
        AND x.target_type = 'Patient' AND x.target_id = :patient
    ),
    page AS (
      SELECT r.pk, r.id, r.body FROM fhir_resource r WHERE r.pk IN (SELECT pk FROM hits)
      ORDER BY r.pk LIMIT {PAGE}
    )
    SELECT 'match' AS mode, pk, id, body, (SELECT count(*) FROM hits) AS total FROM page
    UNION ALL
    SELECT DISTINCT 'include', e.pk, e.id, e.body, CAST(NULL AS BIGINT)
    FROM page JOIN fhir_idx_ref y ON y.res_pk = page.pk AND y.param = 'endpoint'
    JOIN fhir_resource e ON e.rtype = y.target_type AND e.id = y.target_id
    WHERE NOT e.deleted
    """
)


@dataclass(frozen=True)
class Answer:
    """What a search answered: enough to check two ways of asking agree."""

    total: int
    page: tuple[str, ...]
    included: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Case:
    """One search: FHIR parameters, and the hand-written SQL with its parameters."""

    params: list[tuple[str, str]]
    sql: TextClause
    binds: dict[str, Any]


@dataclass(frozen=True)
class QueryType:
    name: str
    cases: Callable[[random.Random], Case]
    patient: bool = False


def query_types(spec: synthetic.Spec) -> list[QueryType]:
    def patient(rng: random.Random) -> str:
        return synthetic.patient_id(spec, rng.randint(1, spec.patients))

    def by_patient(rng: random.Random) -> Case:
        pid = patient(rng)
        return Case([("patient", pid)], PATIENT_SQL, {"patient": pid})

    def by_date_modality(rng: random.Random) -> Case:
        year, month = rng.randint(2021, 2025), rng.randint(1, 12)
        low = f"{year}-{month:02d}-01"
        high = f"{year + month // 12}-{month % 12 + 1:02d}-01"
        code = rng.choice(synthetic.MODALITIES)
        params = [("started", f"ge{low}"), ("started", f"lt{high}"), ("modality", f"{DCM}|{code}")]
        binds = {
            "system": DCM,
            "code": code,
            "low": sp.parse_date(low)[0],
            "high": sp.parse_date(high)[0],
        }
        return Case(params, DATE_MODALITY_SQL, binds)

    def with_include(rng: random.Random) -> Case:
        pid = patient(rng)
        params = [("patient", pid), ("_include", "ImagingStudy:endpoint")]
        return Case(params, INCLUDE_SQL, {"patient": pid})

    return [
        QueryType("patient=<id>", by_patient, patient=True),
        QueryType("started (1 month) + modality", by_date_modality),
        QueryType("patient + _include=endpoint", with_include),
    ]


# -- the two ways of asking ------------------------------------------------------------------


def ours(repo: SqlRepository, case: Case) -> tuple[dict[str, Any], Answer]:
    """What the hub's search route does, minus authentication and HTTP."""
    query = search.parse("ImagingStudy", case.params, local_base=BASE)
    result = search.execute(repo, query, visible=lambda batch: list(batch), may_read_type=_any)
    found = bundle.searchset(result, BASE)
    return found, Answer(
        result.total or 0,
        tuple(s.id for s in result.matches),
        frozenset(f"{s.resource_type}/{s.id}" for s in result.included),
    )


def _any(_resource_type: str) -> bool:
    return True


def hand(engine: Engine, case: Case) -> tuple[list[Any], Answer]:
    with engine.connect() as conn:
        rows = conn.execute(case.sql, case.binds).all()
    matches = sorted((r for r in rows if getattr(r, "mode", "match") == "match"), key=_pk)
    included = frozenset(f"Endpoint/{r.id}" for r in rows if getattr(r, "mode", "") == "include")
    total = matches[0].total if matches else 0
    return rows, Answer(total, tuple(r.id for r in matches), included)


def _pk(row: Any) -> int:
    return int(row.pk)


def bundle_answer(found: dict[str, Any]) -> Answer:
    entries = found.get("entry", [])
    return Answer(
        int(found.get("total", 0)),
        tuple(e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"),
        frozenset(
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in entries
            if e["search"]["mode"] == "include"
        ),
    )


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Row:
    database: str
    query: str
    ours: list[float] = field(default_factory=list)
    hand: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)  # Server-Timing of HTTP answers


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = call()
    return (time.perf_counter() - started) * 1000, out


def measure(
    database: str,
    engine: Engine,
    repo: SqlRepository,
    kind: QueryType,
    runs: int,
    warmup: int,
    seed: int,
) -> Row:
    """Ours and hand SQL alternately (which goes first alternates too), same parameters."""
    rng = random.Random(f"{seed}:{kind.name}")
    row = Row(database, kind.name)
    for index in range(warmup + runs):
        case = kind.cases(rng)
        first_ours = index % 2 == 0
        if first_ours:
            ours_ms, (_, mine) = _timed(partial(ours, repo, case))
        hand_ms, (_, theirs) = _timed(partial(hand, engine, case))
        if not first_ours:
            ours_ms, (_, mine) = _timed(partial(ours, repo, case))
        if mine != theirs:
            raise AssertionError(f"{database} {case.params}: ours {mine} != hand SQL {theirs}")
        if index >= warmup:
            row.ours.append(ours_ms)
            row.hand.append(hand_ms)
    return row


def measure_http(
    database: str,
    url: str,
    engine: Engine,
    kinds: list[QueryType],
    runs: int,
    warmup: int,
    seed: int,
) -> list[Row]:
    """The same searches against a hub process on ``url``; hand SQL as in process."""
    import httpx

    from exchange.federation import LocalFederation
    from exchange.security.devidp import DevIdentityProvider, key_path
    from exchange.security.keys import load_or_create

    rows = []
    root = Path(tempfile.mkdtemp(prefix="exchange-bench-search-"))
    with LocalFederation(root, [], hub_env={"EXCHANGE_DATABASE_URL": url}) as federation:
        hub = federation.hub
        idp = DevIdentityProvider(
            f"{hub.url}/idp", load_or_create(key_path(hub.data_dir)), "exchange"
        )
        token = idp.issue(sub="bench", role="operator", org="hie", ttl=3600)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        with httpx.Client(base_url=f"{hub.url}/fhir", headers=headers, timeout=60) as client:
            for kind in kinds:
                rng = random.Random(f"{seed}:{kind.name}")
                row = Row(database, f"{kind.name} (HTTP)")
                for index in range(warmup + runs):
                    case = kind.cases(rng)
                    first_http = index % 2 == 0
                    if first_http:
                        http_ms, answer = _timed(
                            partial(client.get, "/ImagingStudy", params=case.params)
                        )
                    hand_ms, (_, theirs) = _timed(partial(hand, engine, case))
                    if not first_http:
                        http_ms, answer = _timed(
                            partial(client.get, "/ImagingStudy", params=case.params)
                        )
                    if answer.status_code != 200:
                        raise AssertionError(f"HTTP {answer.status_code}: {answer.text[:300]}")
                    mine = bundle_answer(answer.json())
                    if mine != theirs:
                        raise AssertionError(f"HTTP {case.params}: {mine} != hand SQL {theirs}")
                    if index >= warmup:
                        row.ours.append(http_ms)
                        row.hand.append(hand_ms)
                        timing = answer.headers.get("server-timing", "")
                        if "dur=" in timing:
                            row.server.append(float(timing.split("dur=")[1].split(",")[0]))
                rows.append(row)
                print(f"{database}: {row.query}: {_ms(row.ours)} ms", flush=True)
    return rows


# -- databases -----------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_url(workdir: Path | None) -> Iterator[str]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{workdir / 'hub.db'}"
        return
    with tempfile.TemporaryDirectory(prefix="exchange-bench-search-") as folder:
        yield f"sqlite:///{folder}/hub.db"


def loaded(engine: Engine, spec: synthetic.Spec) -> bool:
    """Whether the last study of ``spec`` is already there (a kept database)."""
    SqlRepository(engine)
    last = synthetic.study_id(spec, spec.studies)
    with engine.connect() as conn:
        found = conn.execute(
            select(RES.c.pk).where(RES.c.rtype == "ImagingStudy", RES.c.id == last)
        ).first()
    return found is not None


def run_database(
    database: str, url: str, spec: synthetic.Spec, args: argparse.Namespace
) -> list[Row]:
    engine = make_engine(url)
    others = _others_cpu()
    try:
        if loaded(engine, spec):
            print(f"{database}: the data set is already loaded (kept database)", flush=True)
        else:
            print(
                f"{database}: loading {spec.studies:,} studies over {spec.patients:,} patients "
                f"({spec.sites} sites, seed {spec.seed})…",
                flush=True,
            )
            shown = [0.0]

            def progress(step: synthetic.Progress) -> None:
                if step.seconds - shown[0] >= 30:
                    shown[0] = step.seconds
                    print(
                        f"{database}: {step.done:,}/{step.total:,} in {step.seconds:.0f} s",
                        flush=True,
                    )

            summary = synthetic.load(engine, spec, local_base=BASE, progress=progress)
            print(f"{database}: {summary.describe()}", flush=True)
        repo = SqlRepository(engine, local_base=BASE)
        rows = []
        for kind in query_types(spec):
            gc.collect()  # not the load's garbage: a full collection here takes ~50 ms
            started = time.monotonic()
            row = measure(database, engine, repo, kind, args.runs, args.warmup, args.seed)
            rows.append(row)
            print(
                f"{database}: {kind.name}: {len(row.ours)} runs in "
                f"{time.monotonic() - started:.0f} s: ours {_ms(row.ours)} ms, "
                f"hand SQL {_ms(row.hand)} ms",
                flush=True,
            )
        if args.http:
            try:
                rows += measure_http(
                    database,
                    url,
                    engine,
                    query_types(spec),
                    args.runs,
                    args.warmup,
                    args.seed,
                )
            except (RuntimeError, OSError) as exc:
                print(f"{database}: not measured over HTTP: {exc}", flush=True)
        server = " (its server among them)" if database == "PostgreSQL" else ""
        print(f"{database}: other processes took {others():.0%} of the CPU{server}", flush=True)
        return rows
    finally:
        engine.dispose()


# -- report --------------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f}"


def _ratio(row: Row) -> str:
    p50 = percentile(row.ours, 50) / percentile(row.hand, 50)
    p99 = percentile(row.ours, 99) / percentile(row.hand, 99)
    return f"{p50:.1f}x / {p99:.1f}x"


def report(rows: list[Row], spec: synthetic.Spec) -> None:
    header = ("database", "query", "ours p50 / p99 ms", "hand SQL p50 / p99 ms", "ratio p50 / p99")
    lines = [header] + [(r.database, r.query, _ms(r.ours), _ms(r.hand), _ratio(r)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for number, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")
        if number == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    served = [r for r in rows if r.server]
    if served:
        print()
        for r in served:
            timing = _ms(r.server)
            print(f"{r.database} {r.query}: hub's Server-Timing (search.execute) {timing} ms")
    print()
    scale = (
        ""
        if spec.studies >= TARGET_STUDIES
        else (f" (the target is set at {TARGET_STUDIES:,} studies; this run has {spec.studies:,})")
    )
    for r in rows:
        if r.query == "patient=<id>":
            p99 = percentile(r.ours, 99)
            verdict = "TARGET MET" if p99 <= TARGET_MS else "TARGET MISSED"
            print(
                f"{r.database}: patient search p99 {p99:.2f} ms (ours, in process), "
                f"target <= {TARGET_MS:.0f} ms: {verdict}{scale}"
            )


def _others_cpu() -> Callable[[], float]:
    """The share of the machine's CPU that other processes took from now until called."""

    def busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def own() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    start_wall, start_busy, start_own = time.monotonic(), busy(), own()

    def share() -> float:
        others = (busy() - start_busy) - (own() - start_own)
        return max(0.0, others) / ((time.monotonic() - start_wall) * (os.cpu_count() or 1))

    return share


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (SQLite, seconds)")
    parser.add_argument("--studies", type=int, help="default 100000 (1000 with --quick)")
    parser.add_argument("--patients", type=int, help="default 10000 (100 with --quick)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, help="timed searches per query (default 400)")
    parser.add_argument("--warmup", type=int, help="untimed searches first (default 50)")
    parser.add_argument(
        "--db",
        choices=("sqlite", "postgresql", "both"),
        help="databases to measure (default both; sqlite with --quick)",
    )
    parser.add_argument("--http", action="store_true", help="also over HTTP against a hub")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the SQLite database here, and reuse it if it already holds the data set",
    )
    args = parser.parse_args(argv)
    args.studies = args.studies or (1000 if args.quick else 100_000)
    args.patients = args.patients or (100 if args.quick else 10_000)
    args.runs = args.runs or (40 if args.quick else 400)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 50)
    args.db = args.db or ("sqlite" if args.quick else "both")
    spec = synthetic.Spec(args.studies, args.patients, seed=args.seed, sites=args.sites)
    others = _others_cpu()
    print(
        f"search benchmark: {spec.studies:,} studies, {spec.patients:,} patients, "
        f"{args.runs} runs per query after {args.warmup} warm-up; {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        flush=True,
    )
    rows: list[Row] = []
    if args.db in ("sqlite", "both"):
        with sqlite_url(args.workdir) as url:
            rows += run_database("SQLite", url, spec, args)
    if args.db in ("postgresql", "both"):
        from tests.pg import postgres_server, unavailable_reason

        reason = unavailable_reason()
        with contextlib.ExitStack() as stack:
            url = None
            if reason is None:
                try:
                    url = stack.enter_context(postgres_server())
                except Exception as exc:  # a server that cannot start: say why, keep SQLite's
                    reason = f"the server did not start: {type(exc).__name__}: {exc}"
            if url is None:
                print(f"PostgreSQL: not measured: {reason}", flush=True)
            else:
                rows += run_database("PostgreSQL", url, spec, args)
    report(rows, spec)
    print(
        f"\nother processes took {others():.0%} of the machine's CPU during the run"
        + (" (the PostgreSQL server among them)" if args.db != "sqlite" else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
