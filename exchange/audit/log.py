"""The append-only, hash-chained audit trail.

AuditEvents are ordinary resources in the hub's FHIR repository (so the search
pipeline serves ``AuditEvent?patient=…``), written only here. Each one carries,
in the extension ``CHAIN_EXTENSION``, its sequence number and the SHA-256 of the
previous record's canonical JSON (sorted keys, no spaces, UTF-8; 64 zeros for
the first). The resource insert and the chain bookkeeping share one transaction:

- ``audit_head`` (one row): the last sequence number and its hash. Every write
  starts with ``UPDATE audit_head SET seq = seq + n … RETURNING``, which takes the
  database's write lock (SQLite) or the row lock (PostgreSQL) before anything
  else, so writers in any number of threads and processes form one line.
- ``audit_chain``: seq -> resource id, hash, recorded time.
- ``audit_checkpoint``: the head signed (JWS, RS256, the hub's key) every
  ``checkpoint_every`` records, so even a rewrite of the whole chain by someone
  with the database but not the key is caught.

``verify`` walks the chain against the *current* stored bodies and names the
first record that was altered, deleted or moved. The log cannot stop someone with
database access from truncating the newest records after the last checkpoint and
resetting the head; checkpoints bound that window.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, cast

import jwt
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    String,
    Table,
    Text,
    and_,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from exchange import metrics
from exchange.errors import AuditUnavailable, Unavailable
from exchange.fhir import searchparams as sp
from exchange.fhir.repository import HIST, RES, SqlRepository
from exchange.migrations import ensure_schema
from exchange.security.keys import SigningKey

log = logging.getLogger(__name__)

RESOURCE_TYPE = "AuditEvent"
CHAIN_EXTENSION = "https://exchange.example.org/fhir/StructureDefinition/audit-chain"
CHECKPOINT_TYPE = "exchange-audit-checkpoint+jwt"
GENESIS = "0" * 64
UNAVAILABLE = "the audit trail could not be written, so access is refused"


class AuditHeadRow(SQLModel, table=True):
    __tablename__ = "audit_head"

    id: int = Field(primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


class AuditChainRow(SQLModel, table=True):
    __tablename__ = "audit_chain"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    resource_id: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    recorded_ms: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))


class AuditCheckpointRow(SQLModel, table=True):
    __tablename__ = "audit_checkpoint"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))
    jws: str = Field(sa_column=Column(Text, nullable=False))
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


HEAD = _table(AuditHeadRow)
CHAIN = _table(AuditChainRow)
CHECKPOINT = _table(AuditCheckpointRow)
TABLES = [HEAD, CHAIN, CHECKPOINT]

#: The first statement of every write: takes the write lock, reserves ``count`` numbers.
_ADVANCE = (
    update(HEAD)
    .where(HEAD.c.id == 1)
    .values(seq=HEAD.c.seq + bindparam("count"))
    .returning(HEAD.c.seq, HEAD.c.hash)
)
_SET_HASH = update(HEAD).where(HEAD.c.id == 1).values(hash=bindparam("head_hash"))


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: ``problem`` names the first broken record in plain words."""

    ok: bool
    records: int
    checkpoints: int
    first_broken_seq: int | None = None
    first_broken_id: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    jws: str
    created: datetime


class _Broken(Exception):
    def __init__(self, problem: str, seq: int | None, rid: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.seq, self.rid = problem, seq, rid


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def _chained(event: dict[str, Any], seq: int, previous: str) -> dict[str, Any]:
    body = {k: v for k, v in event.items() if k not in ("id", "meta")}
    link = {
        "url": CHAIN_EXTENSION,
        "extension": [
            {"url": "seq", "valueInteger": seq},
            {"url": "previous", "valueString": previous},
        ],
    }
    others = [e for e in body.get("extension") or [] if e.get("url") != CHAIN_EXTENSION]
    body["extension"] = [*copy.deepcopy(others), link]
    return body


def chain_link(body: dict[str, Any]) -> tuple[int | None, str | None]:
    """(seq, previous hash) from a stored record's chain extension; Nones if absent."""
    for ext in body.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == CHAIN_EXTENSION:
            parts = {e.get("url"): e for e in ext.get("extension") or [] if isinstance(e, dict)}
            seq = parts.get("seq", {}).get("valueInteger")
            previous = parts.get("previous", {}).get("valueString")
            return (
                seq if isinstance(seq, int) else None,
                previous if isinstance(previous, str) else None,
            )
    return None, None


def _recorded_ms(body: dict[str, Any], fallback: datetime) -> int:
    recorded = body.get("recorded")
    if isinstance(recorded, str):
        try:
            return sp.parse_date(recorded)[0]
        except ValueError:
            pass
    return sp.to_ms(fallback)


def _utc_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return sp.to_ms(moment)


class AuditLog:
    """Append-only AuditEvents with a hash chain and signed checkpoints."""

    def __init__(
        self,
        engine: Engine,
        repository: SqlRepository,
        signer: SigningKey | None = None,
        checkpoint_every: int = 1000,
        issuer: str = "exchange-hub",
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self._engine = engine
        self._repository = repository
        self._signer = signer
        self._every = checkpoint_every
        self._issuer = issuer
        ensure_schema(engine, "hub")
        self._ensure_head()

    def _ensure_head(self) -> None:
        try:
            with self._engine.begin() as conn:
                if conn.execute(select(HEAD.c.id).where(HEAD.c.id == 1)).first() is None:
                    conn.execute(insert(HEAD).values(id=1, seq=0, hash=GENESIS))
        except IntegrityError:
            pass  # another process created it first

    # -- writing -----------------------------------------------------------------
    def record(self, event: dict[str, Any]) -> str:
        """Append one AuditEvent; durable when this returns its id (else ``AuditUnavailable``)."""
        return self.record_many([event])[0]

    def record_many(self, events: Sequence[dict[str, Any]]) -> list[str]:
        """Append several AuditEvents in one transaction, in the order given."""
        if not events:
            return []
        count = len(events)
        try:
            with self._repository.transaction() as conn:
                last, previous = conn.execute(_ADVANCE, {"count": count}).one()
                first = seq = last - count + 1
                ids: list[str] = []
                rows: list[dict[str, Any]] = []
                for event in events:
                    stored = self._repository.insert_new(
                        conn, RESOURCE_TYPE, _chained(event, seq, previous)
                    )
                    previous = digest(stored.body)
                    rows.append(
                        {
                            "seq": seq,
                            "resource_id": stored.id,
                            "hash": previous,
                            "recorded_ms": _recorded_ms(stored.body, stored.last_updated),
                        }
                    )
                    ids.append(stored.id)
                    seq += 1
                conn.execute(insert(CHAIN), rows)
                conn.execute(_SET_HASH, {"head_hash": previous})
        except (SQLAlchemyError, OSError) as exc:
            log.error("audit write failed", extra={"error": type(exc).__name__})
            raise AuditUnavailable(UNAVAILABLE) from None
        metrics.AUDIT_RECORDS.inc(count)
        metrics.AUDIT_CHAIN_LENGTH.set(last)
        if self._signer is not None and last // self._every > (first - 1) // self._every:
            try:
                self.checkpoint()
            except Exception as exc:  # the records are durable; a checkpoint can come later
                log.warning("audit checkpoint failed", extra={"error": type(exc).__name__})
        return ids

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head (None without a key or before the first record)."""
        if self._signer is None:
            return None
        key = self._signer
        with self._engine.connect() as conn:
            seq, head = conn.execute(select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)).one()
        if seq == 0:
            return None
        try:
            with self._engine.begin() as conn:
                existing = self._signed(conn, seq)
                if existing is not None:
                    return existing
                created = datetime.now(UTC)
                claims = {
                    "iss": self._issuer,
                    "seq": seq,
                    "hash": head,
                    "iat": int(created.timestamp()),
                }
                token = jwt.encode(
                    claims,
                    key.private,
                    algorithm="RS256",
                    headers={"kid": key.kid, "typ": CHECKPOINT_TYPE},
                )
                conn.execute(
                    insert(CHECKPOINT).values(
                        seq=seq, hash=head, jws=token, created_ms=sp.to_ms(created)
                    )
                )
        except IntegrityError:  # another writer signed this head at the same moment
            with self._engine.connect() as conn:
                return self._signed(conn, seq)
        return Checkpoint(seq, head, token, created)

    @staticmethod
    def _signed(conn: Connection, seq: int) -> Checkpoint | None:
        row = conn.execute(
            select(CHECKPOINT.c.hash, CHECKPOINT.c.jws, CHECKPOINT.c.created_ms).where(
                CHECKPOINT.c.seq == seq
            )
        ).first()
        return None if row is None else Checkpoint(seq, row[0], row[1], sp.from_ms(row[2]))

    # -- reading -----------------------------------------------------------------
    def length(self) -> int:
        """Records in the chain (its head's sequence number; metrics)."""
        with self._engine.connect() as conn:
            seq = conn.execute(select(HEAD.c.seq).where(HEAD.c.id == 1)).scalar()
        return int(seq or 0)

    def check(self) -> None:
        """Readiness: raise if the chain head cannot be read."""
        with self._engine.connect() as conn:
            row = conn.execute(select(HEAD.c.seq).where(HEAD.c.id == 1)).first()
        if row is None:
            raise Unavailable("the audit trail has no chain head")

    def export(self, out: TextIO, since: datetime | None = None) -> int:
        """Write the records (``recorded`` at or after ``since``) as NDJSON in chain order."""
        statement = (
            select(RES.c.body)
            .select_from(
                CHAIN.join(RES, and_(RES.c.rtype == RESOURCE_TYPE, RES.c.id == CHAIN.c.resource_id))
            )
            .order_by(CHAIN.c.seq)
        )
        if since is not None:
            statement = statement.where(CHAIN.c.recorded_ms >= _utc_ms(since))
        count = 0
        with self._engine.connect() as conn:
            for part in conn.execution_options(yield_per=1000).execute(statement).partitions():
                for (body,) in part:
                    out.write(body)
                    out.write("\n")
                count += len(part)
        return count

    def verify(self) -> Verification:
        """Walk the whole chain; name the first record altered, deleted or out of order."""
        # Checkpoints first: each was signed at or below the head of its time, and the
        # head only grows, so one beyond the head read next means records were cut off.
        checkpoints = self._checkpoints()
        with self._engine.connect() as conn:
            head = conn.execute(select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)).first()
        if head is None:
            return Verification(False, 0, 0, None, None, "the audit trail has no chain head")
        head_seq, head_hash = head
        walker = _Walk(checkpoints, self._signer)
        try:
            for row in self._rows(head_seq):
                walker.step(row)
            walker.finish(head_seq, head_hash)
            self._no_strays()
        except _Broken as broken:
            return Verification(
                False, walker.records, walker.verified, broken.seq, broken.rid, broken.problem
            )
        return Verification(True, walker.records, walker.verified)

    def _checkpoints(self) -> dict[int, tuple[str, str]]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(CHECKPOINT.c.seq, CHECKPOINT.c.hash, CHECKPOINT.c.jws)).all()
        return {seq: (signed_hash, token) for seq, signed_hash, token in rows}

    def _rows(self, head_seq: int) -> Iterator[_Row]:
        h1, h2 = HIST.alias("h1"), HIST.alias("h2")

        def history(h: Any, version: int) -> Any:
            return and_(
                h.c.rtype == RESOURCE_TYPE, h.c.id == CHAIN.c.resource_id, h.c.version == version
            )

        statement = (
            select(
                CHAIN.c.seq,
                CHAIN.c.resource_id,
                CHAIN.c.hash,
                RES.c.version,
                RES.c.deleted,
                RES.c.body,
                h1.c.body,
                h2.c.version,
            )
            .select_from(
                CHAIN.outerjoin(
                    RES, and_(RES.c.rtype == RESOURCE_TYPE, RES.c.id == CHAIN.c.resource_id)
                )
                .outerjoin(h1, history(h1, 1))
                .outerjoin(h2, history(h2, 2))
            )
            .where(CHAIN.c.seq <= head_seq)
            .order_by(CHAIN.c.seq)
        )
        with self._engine.connect() as conn:
            for part in conn.execution_options(yield_per=1000).execute(statement).partitions():
                for row in part:
                    yield _Row(*row)

    def _no_strays(self) -> None:
        """Every AuditEvent in the repository must be a chain record."""
        with self._engine.connect() as conn:
            stray = conn.execute(
                select(RES.c.id)
                .where(
                    RES.c.rtype == RESOURCE_TYPE,
                    ~select(CHAIN.c.seq).where(CHAIN.c.resource_id == RES.c.id).exists(),
                )
                .limit(1)
            ).scalar()
        if stray is not None:
            raise _Broken(
                f"AuditEvent/{stray} is not part of the chain (written outside the audit log)",
                None,
                stray,
            )


@dataclass(frozen=True)
class _Row:
    seq: int
    rid: str
    chain_hash: str
    version: int | None
    deleted: bool | None
    body: str | None
    first_body: str | None
    second_version: int | None


class _Walk:
    """The chain checks, one record at a time in sequence order."""

    def __init__(self, checkpoints: dict[int, tuple[str, str]], signer: SigningKey | None) -> None:
        self.records = 0
        self.verified = 0
        self._checkpoints = checkpoints
        self._signer = signer
        self._seq = 0
        self._hash = GENESIS
        self._id: str | None = None

    def step(self, row: _Row) -> None:
        seq, rid = row.seq, row.rid
        name = f"record {seq} (AuditEvent/{rid})"
        expected = self._seq + 1
        if seq != expected:
            raise _Broken(f"record {expected} is missing (deleted)", expected)
        body_text = row.body
        if body_text is None or row.deleted:
            raise _Broken(f"{name} is missing (deleted)", seq, rid)
        if row.version != 1 or row.second_version is not None:
            raise _Broken(f"{name} was altered: it has more than one version", seq, rid)
        if row.first_body != body_text:
            raise _Broken(f"{name} was altered: its history differs from its content", seq, rid)
        try:
            body = json.loads(body_text)
        except ValueError:
            raise _Broken(f"{name} was altered: it is not valid JSON", seq, rid) from None
        recomputed = digest(body)
        if recomputed != row.chain_hash:
            raise _Broken(
                f"{name} was altered: its content no longer matches the hash recorded for it",
                seq,
                rid,
            )
        link_seq, previous = chain_link(body)
        if link_seq is None or previous is None:
            raise _Broken(f"{name} was altered: it carries no chain link", seq, rid)
        if link_seq != seq:
            raise _Broken(
                f"records out of order at {seq}: AuditEvent/{rid} is record {link_seq}", seq, rid
            )
        if previous != self._hash:
            if seq == 1:
                raise _Broken(f"{name} was altered: it does not start the chain", seq, rid)
            raise _Broken(
                f"record {seq - 1} (AuditEvent/{self._id}) or the link to it was altered: "
                f"record {seq} carries a different hash for it",
                seq - 1,
                self._id,
            )
        self._check_checkpoint(seq, rid, recomputed)
        self._seq, self._hash, self._id = seq, recomputed, rid
        self.records += 1

    def _check_checkpoint(self, seq: int, rid: str, recomputed: str) -> None:
        signed = self._checkpoints.get(seq)
        if signed is None:
            return
        stored_hash, token = signed
        if self._signer is None:
            raise _Broken(
                f"the checkpoint at record {seq} cannot be checked without the hub's signing key",
                seq,
                rid,
            )
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self._signer.private.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False},
            )
        except jwt.PyJWTError:
            raise _Broken(
                f"the checkpoint at record {seq} has an invalid signature", seq, rid
            ) from None
        if header.get("typ") != CHECKPOINT_TYPE or claims.get("seq") != seq:
            raise _Broken(f"the checkpoint at record {seq} was altered", seq, rid)
        if claims.get("hash") != recomputed or stored_hash != recomputed:
            raise _Broken(
                f"record {seq} (AuditEvent/{rid}) does not match the checkpoint signed for it: "
                "the chain was rewritten",
                seq,
                rid,
            )
        self.verified += 1

    def finish(self, head_seq: int, head_hash: str) -> None:
        if head_seq > self._seq:
            raise _Broken(f"record {self._seq + 1} is missing (deleted)", self._seq + 1)
        if head_hash != self._hash:
            raise _Broken(
                f"record {self._seq} (AuditEvent/{self._id}) was altered: "
                "it no longer matches the chain head",
                self._seq,
                self._id,
            )
        beyond = [seq for seq in self._checkpoints if seq > self._seq]
        if beyond:
            raise _Broken(
                f"record {self._seq + 1} is missing (deleted): a signed checkpoint vouches for "
                f"{max(beyond)} records",
                self._seq + 1,
            )
