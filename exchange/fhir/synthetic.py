"""Generated, profile-valid index data, bulk-loaded fast: for benchmarks and demos.

``exchange hub load-synthetic --studies N --patients M [--seed S] [--sites K]``
writes K sites (an Organization and its DICOMweb Endpoint each), M Patients and
N ImagingStudies spread over them, straight into the hub's tables.

Nothing in it is, or looks like, a real person: patients are
``Synthetic^NNNN`` and every resource carries the HL7 ``HTEST`` (test health
data) tag. Each patient has an MRN at one or two sites
(``urn:exchange:<site>:mrn``) and an HIE identifier; each study has 1-4 series
of a few instances, UIDs under ``1.2.826.0.1.3680043.10.1386.9.<seed>.``, a
start within 2021-2025 and its site's Endpoint. The same seed gives the same
resources (generated in fixed blocks from seeded generators), whatever the
batch size; ids and UIDs carry the seed, so data sets of different seeds can
share a database.

Writing goes through :func:`write_batch`: one transaction per batch, with the
current, history and index rows built by the repository's own code
(``_stamp``, ``searchparams.extract_index``/``access_facts`` and
``SqlRepository._insert_index``), so bulk-loaded resources are searched exactly
like ones written through the API. Resources already stored (same type and id)
are skipped, which makes a second run with the same seed complete an
interrupted load. Write hooks (ownership, MPI links) are not run: this is test
data, written by an operator. On SQLite (WAL) the hub may keep running: readers
never wait, and its writers wait at most one batch's transaction.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table, false, func, insert, select, text
from sqlalchemy.sql.dml import Insert

from exchange.dicom.imagingstudy import ACCESSION_TYPE, DCM, DICOM_UID, PROFILE, RFC3986
from exchange.dicom.samples import PREFIX
from exchange.errors import Unprocessable
from exchange.fhir import profiles, resources
from exchange.fhir import searchparams as sp
from exchange.fhir.repository import DATE, HIST, REF, RES, STR, TOK, SqlRepository, _stamp

#: Study UIDs are ``<UID_ROOT><seed>.<n>``, series ``.<s>`` and instances ``.<i>`` below.
UID_ROOT = f"{PREFIX}9."
HIE_SYSTEM = "urn:oid:2.16.840.1.113883.3.7777.1"
#: HL7 v3 ActReason HTEST, "test health data": the conventional mark of synthetic records.
TEST_DATA_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}
MRN_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
WADO_RS = {"system": profiles.WADO_RS[0], "code": profiles.WADO_RS[1]}

#: Resources generated from one seeded generator; fixed, so output does not depend on batching.
BLOCK = 1000
#: Resources written in one transaction.
DEFAULT_BATCH = 5000
#: How many of each type the loader validates (``resources.validate``) before writing.
VALIDATE_FIRST = 3
MAX_SEED = 999_999_999
MAX_COUNT = 99_999_999  # keeps every UID within DICOM's 64 characters

_FIRST_DAY = datetime(2021, 1, 1, tzinfo=UTC)
_DAYS = 5 * 365
_OFFSETS = ("Z", "+01:00", "+02:00", "-05:00", "+09:00")
_SOP = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "KO": "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
}


@dataclass(frozen=True)
class _Kind:
    """A kind of study: its main modality, descriptions, and what may follow the images."""

    modality: str
    weight: int
    descriptions: tuple[str, ...]
    extra: tuple[str, ...] = ()  # modalities of possible trailing series (dose report, KOS)


_KINDS = (
    _Kind("CT", 25, ("CT chest", "CT abdomen", "CT head", "CT chest abdomen pelvis"), ("SR",)),
    _Kind("MR", 15, ("MR brain", "MR knee", "MR lumbar spine", "MR pelvis"), ("KO",)),
    _Kind("CR", 20, ("CR chest", "CR hand", "CR knee")),
    _Kind("DX", 10, ("DX chest", "DX pelvis", "DX spine")),
    _Kind("US", 15, ("US abdomen", "US thyroid", "US obstetric")),
    _Kind("MG", 7, ("MG screening", "MG diagnostic")),
    _Kind("NM", 3, ("NM bone scan", "NM thyroid")),
    _Kind("PT", 2, ("PET-CT whole body",), ("CT",)),
    _Kind("XA", 3, ("XA coronary angiography",), ("SR",)),
)
_KIND_WEIGHTS = tuple(k.weight for k in _KINDS)
#: The modalities studies are generated with, most common first.
MODALITIES = tuple(k.modality for k in sorted(_KINDS, key=lambda k: -k.weight))


@dataclass(frozen=True)
class Spec:
    """What to generate. Raises ``ValueError`` on impossible sizes."""

    studies: int
    patients: int
    seed: int = 1
    sites: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.studies <= MAX_COUNT:
            raise ValueError(f"--studies must be between 0 and {MAX_COUNT}")
        if not 1 <= self.patients <= MAX_COUNT:
            raise ValueError(f"--patients must be between 1 and {MAX_COUNT}")
        if not 1 <= self.sites <= 99:
            raise ValueError("--sites must be between 1 and 99")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be between 0 and {MAX_SEED}")

    @property
    def total(self) -> int:
        return 2 * self.sites + self.patients + self.studies


# -- ids -----------------------------------------------------------------------------------------


def site_id(k: int) -> str:
    """Site ``k`` (0-based): the id of its Organization and of its Endpoint."""
    return f"syn-site-{k + 1:02d}"


def patient_id(spec: Spec, n: int) -> str:
    """Patient ``n`` (1-based)."""
    return f"syn{spec.seed}-p{n}"


def study_id(spec: Spec, n: int) -> str:
    """ImagingStudy ``n`` (1-based)."""
    return f"syn{spec.seed}-s{n}"


def study_uid(spec: Spec, n: int) -> str:
    return f"{UID_ROOT}{spec.seed}.{n}"


def mrn_system(k: int) -> str:
    return f"urn:exchange:{site_id(k)}:mrn"


def patient_sites(spec: Spec, n: int) -> tuple[int, ...]:
    """The sites (0-based) where patient ``n`` has a record: a home site, one in five also
    another. A hash, not a generator draw, so studies find it without the patients."""
    h = zlib.crc32(f"{spec.seed}:{n}".encode())
    home = h % spec.sites
    if spec.sites > 1 and (h >> 20) % 5 == 0:
        return home, (home + 1 + (h >> 8) % (spec.sites - 1)) % spec.sites
    return (home,)


def _rng(spec: Spec, kind: str, block: int) -> random.Random:
    return random.Random(f"exchange-synthetic:{spec.seed}:{kind}:{block}")  # noqa: S311 - test data


def _meta(**extra: Any) -> dict[str, Any]:
    return {**extra, "tag": [dict(TEST_DATA_TAG)]}


# -- resources -----------------------------------------------------------------------------------


def site_resources(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """An Organization and its DICOMweb Endpoint per site (the same for every seed)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for k in range(spec.sites):
        sid = site_id(k)
        name = f"Synthetic Site {k + 1:02d}"
        organization = {
            "resourceType": "Organization",
            "id": sid,
            "meta": _meta(),
            "identifier": [{"system": "urn:exchange:organization", "value": sid}],
            "active": True,
            "name": name,
        }
        endpoint = {
            "resourceType": "Endpoint",
            "id": sid,
            "meta": _meta(),
            "identifier": [{"system": "urn:exchange:endpoint", "value": sid}],
            "status": "active",
            "connectionType": dict(WADO_RS),
            "name": f"{name} DICOMweb",
            "managingOrganization": {"reference": f"Organization/{sid}"},
            "payloadType": [{"text": "DICOM"}],
            "address": f"https://{sid}.example.org/dicomweb",
        }
        out += [("Organization", organization), ("Endpoint", endpoint)]
    return out


def _patient(spec: Spec, n: int, rng: random.Random) -> dict[str, Any]:
    identifiers: list[dict[str, Any]] = [
        {"type": MRN_TYPE, "system": mrn_system(k), "value": f"S{spec.seed}-{k + 1}-{n}"}
        for k in patient_sites(spec, n)
    ]
    identifiers.append({"system": HIE_SYSTEM, "value": f"SYN{spec.seed}-{n:06d}"})
    born = _FIRST_DAY - timedelta(days=rng.randrange(365, 90 * 365))
    gender = rng.choices(("female", "male", "other", "unknown"), (49, 49, 1, 1))[0]
    return {
        "resourceType": "Patient",
        "id": patient_id(spec, n),
        "meta": _meta(),
        "identifier": identifiers,
        "active": True,
        "name": [{"use": "official", "family": "Synthetic", "given": [f"{n:04d}"]}],
        "gender": gender,
        "birthDate": born.date().isoformat(),
        "managingOrganization": {"reference": f"Organization/{site_id(patient_sites(spec, n)[0])}"},
    }


def _series(uid: str, number: int, modality: str, count: int, description: str) -> dict[str, Any]:
    series_uid = f"{uid}.{number}"
    sop_class = {"system": RFC3986, "code": f"urn:oid:{_SOP[modality]}"}
    return {
        "uid": series_uid,
        "number": number,
        "modality": {"system": DCM, "code": modality},
        "description": description,
        "numberOfInstances": count,
        "instance": [
            {"uid": f"{series_uid}.{i}", "number": i, "sopClass": sop_class}
            for i in range(1, count + 1)
        ],
    }


def _study(spec: Spec, n: int, rng: random.Random) -> dict[str, Any]:
    subject = n if n <= spec.patients else rng.randrange(1, spec.patients + 1)
    site = rng.choice(patient_sites(spec, subject))
    kind = rng.choices(_KINDS, _KIND_WEIGHTS)[0]
    description = rng.choice(kind.descriptions)
    uid = study_uid(spec, n)
    images = rng.randint(1, 4)
    extra = kind.extra[0] if kind.extra and images < 4 and rng.random() < 0.5 else None
    series = [
        _series(uid, s, kind.modality, rng.randint(1, 5), f"{description} {s}")
        for s in range(1, images + 1)
    ]
    if extra is not None:
        series.append(_series(uid, images + 1, extra, 1, f"{description} {extra}"))
    modalities = list(dict.fromkeys(s["modality"]["code"] for s in series))
    day = _FIRST_DAY + timedelta(
        days=rng.randrange(_DAYS), seconds=rng.randrange(7 * 3600, 20 * 3600)
    )
    sid = site_id(site)
    return {
        "resourceType": "ImagingStudy",
        "id": study_id(spec, n),
        "meta": _meta(profile=[PROFILE]),
        "identifier": [
            {"system": DICOM_UID, "value": f"urn:oid:{uid}"},
            {
                "type": ACCESSION_TYPE,
                "system": f"urn:exchange:{sid}:accession",
                "value": f"A{spec.seed}-{n}",
            },
        ],
        "status": "available",
        "modality": [{"system": DCM, "code": m} for m in modalities],
        "subject": {"reference": f"Patient/{patient_id(spec, subject)}"},
        "started": day.strftime("%Y-%m-%dT%H:%M:%S") + _OFFSETS[site % len(_OFFSETS)],
        "endpoint": [{"reference": f"Endpoint/{sid}"}],
        "numberOfSeries": len(series),
        "numberOfInstances": sum(s["numberOfInstances"] for s in series),
        "description": description,
        "series": series,
    }


def _blocks(
    spec: Spec, kind: str, count: int, make: Callable[[Spec, int, random.Random], dict[str, Any]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    rtype = "Patient" if kind == "patient" else "ImagingStudy"
    for block in range((count + BLOCK - 1) // BLOCK):
        rng = _rng(spec, kind, block)
        for n in range(block * BLOCK + 1, min(count, (block + 1) * BLOCK) + 1):
            yield rtype, make(spec, n, rng)


def generate(spec: Spec) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every resource of ``spec`` as ``(type, body with id)``: sites, patients, studies."""
    yield from site_resources(spec)
    yield from _blocks(spec, "patient", spec.patients, _patient)
    yield from _blocks(spec, "study", spec.studies, _study)


# -- writing -------------------------------------------------------------------------------------


class _IndexRows:
    """Stands in for the ``Connection`` that ``SqlRepository._insert_index`` inserts with,
    so the rows it builds for many resources go out as one executemany per table."""

    def __init__(self) -> None:
        self.rows: dict[Table, list[dict[str, Any]]] = {TOK: [], STR: [], DATE: [], REF: []}

    def execute(self, statement: Insert, values: list[dict[str, Any]]) -> None:
        self.rows[statement.table].extend(values)  # type: ignore[index]


@dataclass
class Written:
    """What :func:`write_batch` did."""

    resources: int = 0
    skipped: int = 0
    rows: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def add(self, other: Written) -> None:
        self.resources += other.resources
        self.skipped += other.skipped
        self.rows += other.rows
        for rtype, count in other.by_type.items():
            self.by_type[rtype] = self.by_type.get(rtype, 0) + count


def _existing(
    conn: Connection, items: Sequence[tuple[str, dict[str, Any]]]
) -> set[tuple[str, str]]:
    ids: dict[str, list[str]] = {}
    for rtype, body in items:
        ids.setdefault(rtype, []).append(str(body["id"]))
    found: set[tuple[str, str]] = set()
    for rtype, wanted in ids.items():
        rows = conn.execute(select(RES.c.id).where(RES.c.rtype == rtype, RES.c.id.in_(wanted)))
        found.update((rtype, rid) for rid in rows.scalars())
    return found


def write_batch(
    conn: Connection, items: Sequence[tuple[str, dict[str, Any]]], local_base: str | None = None
) -> Written:
    """Store version 1 of each ``(type, body with id)`` in one transaction on ``conn``, as
    ``SqlRepository.update`` would create it (method PUT); ids already stored are skipped.

    The tables must exist (``SqlRepository(engine)`` creates them). Bodies are not
    validated here.
    """
    written = Written()
    with conn.begin():
        present = _existing(conn, items)
        now_ms = sp.now_ms()
        when = sp.from_ms(now_ms)
        todo: list[tuple[str, str, sp.IndexEntries]] = []
        current: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        for rtype, body in items:
            rid = str(body["id"])
            if (rtype, rid) in present:
                written.skipped += 1
                continue
            present.add((rtype, rid))
            stamped = _stamp(rtype, body, rid, 1, when)
            entries = sp.extract_index(rtype, stamped, local_base)
            facts = json.dumps(sp.access_facts(rtype, entries), separators=(",", ":"))
            body_text = json.dumps(stamped, separators=(",", ":"))
            todo.append((rtype, rid, entries))
            row = {"rtype": rtype, "id": rid, "version": 1, "updated_ms": now_ms, "deleted": False}
            current.append({**row, "body": body_text, "facts": facts})
            history.append({**row, "method": "PUT", "body": body_text})
            written.by_type[rtype] = written.by_type.get(rtype, 0) + 1
        if not todo:
            return written
        returned = conn.execute(insert(RES).returning(RES.c.rtype, RES.c.id, RES.c.pk), current)
        pks = {(rtype, rid): pk for rtype, rid, pk in returned}
        conn.execute(insert(HIST), history)
        index = _IndexRows()
        for rtype, rid, entries in todo:
            SqlRepository._insert_index(index, pks[rtype, rid], rtype, entries)  # type: ignore[arg-type]
        written.resources = len(todo)
        written.rows = 2 * len(todo)
        for table, rows in index.rows.items():
            if rows:
                conn.execute(insert(table), rows)
                written.rows += len(rows)
    return written


# -- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    seconds: float


@dataclass
class Summary:
    spec: Spec
    written: Written
    seconds: float

    @property
    def resources_per_second(self) -> float:
        return self.written.resources / self.seconds if self.seconds else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.written.rows / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        by_type = ", ".join(
            f"{self.written.by_type.get(t, 0):,} {t}"
            for t in ("Organization", "Endpoint", "Patient", "ImagingStudy")
        )
        skipped = f", {self.written.skipped:,} already stored" if self.written.skipped else ""
        return (
            f"loaded {self.written.resources:,} resources ({by_type}{skipped}) "
            f"in {self.seconds:.1f} s: {self.written.rows:,} rows, "
            f"{self.resources_per_second:,.0f} resources/s, {self.rows_per_second:,.0f} rows/s"
        )


def sample(spec: Spec, per_type: int = VALIDATE_FIRST) -> list[tuple[str, dict[str, Any]]]:
    """The sites and the first ``per_type`` patients and studies, exactly as generated."""
    return [
        *site_resources(spec),
        *_blocks(spec, "patient", min(spec.patients, per_type), _patient),
        *_blocks(spec, "study", min(spec.studies, per_type), _study),
    ]


def check(items: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Validate ``items`` as the hub does on write (R4B, our profiles, a WADO-RS
    Endpoint); ``Unprocessable`` for the first invalid one."""
    for rtype, body in items:
        resources.validate(rtype, body)
        if rtype == "Endpoint" and (issues := profiles.endpoint_is_wado_rs(body)):
            raise Unprocessable(f"invalid Endpoint/{body['id']}", issues=issues)


def load(
    engine: Engine,
    spec: Spec,
    *,
    local_base: str | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[Progress], None] | None = None,
) -> Summary:
    """Generate ``spec`` and write it in transactions of ``batch`` resources.

    A sample of each type is validated first (``Unprocessable``, nothing written, if
    one is not valid); the rest are made by the same code. PostgreSQL's statistics are
    refreshed at the end, so its planner knows the new sizes at once.
    """
    started = time.perf_counter()
    SqlRepository(engine, local_base)  # creates the tables if this is a new database
    check(sample(spec))
    written = Written()
    done = 0
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA cache_size=-262144")  # 256 MiB: index upkeep
            conn.commit()
        pending: list[tuple[str, dict[str, Any]]] = []
        for item in generate(spec):
            pending.append(item)
            if len(pending) >= batch:
                written.add(write_batch(conn, pending, local_base))
                done += len(pending)
                pending = []
                if progress is not None:
                    progress(Progress(done, spec.total, time.perf_counter() - started))
        if pending:
            written.add(write_batch(conn, pending, local_base))
            done += len(pending)
        if engine.dialect.name == "postgresql":
            with conn.begin():
                tables = ", ".join(t.name for t in (RES, HIST, TOK, STR, DATE, REF))
                conn.execute(text(f"ANALYZE {tables}"))
    seconds = time.perf_counter() - started
    if progress is not None:
        progress(Progress(done, spec.total, seconds))
    return Summary(spec, written, seconds)


def counts(engine: Engine) -> dict[str, int]:
    """Stored (not deleted) resources per type."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(RES.c.rtype, func.count()).where(RES.c.deleted == false()).group_by(RES.c.rtype)
        ).all()
    return {rtype: count for rtype, count in rows}
