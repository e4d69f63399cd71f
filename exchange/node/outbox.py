"""The node's durable outbox: which studies the hub must (re)learn or forget.

A row is written in the same transaction that changes a study's instances
(``StoreBatch`` for new instances, ``InstanceStore.delete_study`` for a
deletion), so a study is never indexed without its publication pending, and a
crash between the two is impossible. There is at most one row per (tenant,
study): a change to a study that is already waiting coalesces into its row and
bumps ``revision``; a delivery removes the row only if the revision it sent is
still the current one, so a change that raced with a send is sent again.

Rows hold no UID or patient data in clear (see ``catalog``): the study is its
blind index, and its UID is sealed under the tenant's metadata key.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, func, or_
from sqlalchemy import delete as sa_delete
from sqlalchemy import select as sa_select
from sqlalchemy import update as sa_update
from sqlalchemy.dialects import postgresql, sqlite

from exchange.migrations import ensure_schema
from exchange.node.catalog import OutboxRow, TenantSeal

PUBLISH = "publish"
RETRACT = "retract"
PENDING = "pending"
FAILED = "failed"
#: A changed study waits this long for more changes (a STOW-RS arrives in groups).
DEBOUNCE_SECONDS = 0.3
#: How long one worker may hold a row it is sending before another may take it over
#: (a resend is harmless, so this only saves work; a crashed worker's rows wait this long).
CLAIM_SECONDS = 60.0
#: First retry delay and its growth: 0.5, 1, 2, 4 ... seconds, up to the configured cap.
BACKOFF_BASE_SECONDS = 0.5
MAX_ERROR_CHARS = 2000

TABLE: Table = OutboxRow.__table__  # type: ignore[attr-defined]


def backoff(
    failures: int,
    *,
    base: float = BACKOFF_BASE_SECONDS,
    cap: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before the next try after ``failures`` consecutive failures (>= 1).

    Exponential from ``base``, capped at ``cap``, with "equal jitter" (half fixed,
    half random) so that nodes that lost the hub together do not return together.
    """
    ceiling = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 32))
    return ceiling * (0.5 + 0.5 * rand())


def _uid_aad(study_key: str) -> str:
    return f"outbox:{study_key}"


def seal_uid(seal: TenantSeal, study_key: str, uid: str) -> bytes:
    return seal.seal({"uid": uid}, _uid_aad(study_key))


def unseal_uid(seal: TenantSeal, study_key: str, sealed: bytes) -> str:
    return str(seal.unseal(sealed, _uid_aad(study_key))["uid"])


def _upsert(connection: Connection, values: list[dict[str, Any]]) -> None:
    """Insert rows; an existing row of the same study takes the new action and a new revision."""
    dialect = connection.dialect.name
    if dialect == "sqlite":
        statement: Any = sqlite.insert(TABLE)
    elif dialect == "postgresql":
        statement = postgresql.insert(TABLE)
    else:  # pragma: no cover - make_engine accepts only these two
        raise RuntimeError(f"the outbox does not support {dialect}")
    new = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[TABLE.c.tenant, TABLE.c.study_key],
        set_={
            "action": new.action,
            "revision": TABLE.c.revision + 1,
            "state": PENDING,
            "attempts": 0,
            "due_at": new.due_at,
            "sealed_uid": new.sealed_uid,
            "last_error": None,
            "updated_at": new.updated_at,
        },
    )
    connection.execute(statement, values)


def stage(
    connection: Connection,
    tenant: str,
    studies: Mapping[str, bytes],
    action: str,
    *,
    delay: float = DEBOUNCE_SECONDS,
    now: float | None = None,
) -> None:
    """Record inside the caller's transaction that ``studies`` (study key -> sealed UID)
    must be published or retracted."""
    if not studies:
        return
    moment = time.time() if now is None else now
    stamp = datetime.now(UTC)
    _upsert(
        connection,
        [
            {
                "tenant": tenant,
                "study_key": key,
                "action": action,
                "revision": 1,
                "state": PENDING,
                "attempts": 0,
                "due_at": moment + delay,
                "claimed_until": None,
                "sealed_uid": sealed,
                "last_error": None,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for key, sealed in sorted(studies.items())
        ],
    )


@dataclass(frozen=True)
class Entry:
    """One outbox row as read (its ``revision`` is what a delivery completes)."""

    id: int
    tenant: str
    study_key: str
    action: str
    revision: int
    state: str
    attempts: int
    due_at: float
    sealed_uid: bytes
    last_error: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: Any) -> Entry:
        return cls(
            id=row.id,
            tenant=row.tenant,
            study_key=row.study_key,
            action=row.action,
            revision=row.revision,
            state=row.state,
            attempts=row.attempts,
            due_at=row.due_at,
            sealed_uid=row.sealed_uid,
            last_error=row.last_error,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class Depth:
    """How much is waiting (for operators: ``/admin/outbox``, ``node reconcile``)."""

    pending: int
    failed: int
    retracting: int
    oldest_seconds: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "failed": self.failed,
            "retracting": self.retracting,
            "oldest_seconds": None if self.oldest_seconds is None else round(self.oldest_seconds),
        }


class Outbox:
    """The outbox table: what a worker (or ``node reconcile``) reads and settles."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        ensure_schema(engine, "node")

    # -- writing outside a store transaction -----------------------------------
    def enqueue(
        self, tenant: str, studies: Mapping[str, bytes], action: str, *, delay: float = 0.0
    ) -> None:
        with self._engine.begin() as connection:
            stage(connection, tenant, studies, action, delay=delay, now=self._clock())

    def retry_failed(self, tenant: str | None = None) -> int:
        """Make failed rows pending again, due now; how many there were."""
        condition = TABLE.c.state == FAILED
        if tenant is not None:
            condition = and_(condition, TABLE.c.tenant == tenant)
        with self._engine.begin() as connection:
            result = connection.execute(
                sa_update(TABLE)
                .where(condition)
                .values(state=PENDING, attempts=0, due_at=self._clock(), claimed_until=None)
            )
        return int(result.rowcount)

    # -- the worker's side -------------------------------------------------------
    def due(self, limit: int = 50) -> list[Entry]:
        """Pending rows whose time has come and that no worker holds, oldest first."""
        now = self._clock()
        statement = (
            sa_select(TABLE)
            .where(
                TABLE.c.state == PENDING,
                TABLE.c.due_at <= now,
                or_(TABLE.c.claimed_until.is_(None), TABLE.c.claimed_until < now),
            )
            .order_by(TABLE.c.due_at, TABLE.c.id)
            .limit(limit)
        )
        with self._engine.connect() as connection:
            return [Entry.of(row) for row in connection.execute(statement)]

    def next_due(self) -> float | None:
        """When the earliest pending row becomes due (epoch seconds), or None if none waits."""
        with self._engine.connect() as connection:
            found = connection.execute(
                sa_select(func.min(TABLE.c.due_at)).where(TABLE.c.state == PENDING)
            ).scalar()
        return None if found is None else float(found)

    def claim(self, entry: Entry, seconds: float = CLAIM_SECONDS) -> bool:
        """Take ``entry`` for sending; False if it changed or another worker holds it."""
        now = self._clock()
        with self._engine.begin() as connection:
            result = connection.execute(
                sa_update(TABLE)
                .where(
                    TABLE.c.id == entry.id,
                    TABLE.c.revision == entry.revision,
                    TABLE.c.state == PENDING,
                    or_(TABLE.c.claimed_until.is_(None), TABLE.c.claimed_until < now),
                )
                .values(claimed_until=now + seconds)
            )
        return int(result.rowcount) == 1

    def complete(self, entry: Entry) -> bool:
        """The hub has ``entry``'s revision: remove the row, unless it changed meanwhile
        (then it stays, due, to be sent again). True if removed."""
        with self._engine.begin() as connection:
            removed = connection.execute(
                sa_delete(TABLE).where(TABLE.c.id == entry.id, TABLE.c.revision == entry.revision)
            ).rowcount
            if not removed:
                self._release(connection, entry)
        return bool(removed)

    def retry_later(self, entry: Entry, delay: float, error: str) -> None:
        """A failure that retrying may fix: keep the row, try again after ``delay``."""
        with self._engine.begin() as connection:
            updated = connection.execute(
                sa_update(TABLE)
                .where(TABLE.c.id == entry.id, TABLE.c.revision == entry.revision)
                .values(
                    attempts=TABLE.c.attempts + 1,
                    due_at=self._clock() + delay,
                    claimed_until=None,
                    last_error=error[:MAX_ERROR_CHARS],
                )
            ).rowcount
            if not updated:
                self._release(connection, entry)

    def fail(self, entry: Entry, error: str) -> bool:
        """The hub refused ``entry`` for a reason retrying cannot fix: park it as failed
        (``node reconcile`` retries it). False if it changed meanwhile (it stays pending)."""
        with self._engine.begin() as connection:
            updated = connection.execute(
                sa_update(TABLE)
                .where(TABLE.c.id == entry.id, TABLE.c.revision == entry.revision)
                .values(
                    state=FAILED,
                    attempts=TABLE.c.attempts + 1,
                    claimed_until=None,
                    last_error=error[:MAX_ERROR_CHARS],
                )
            ).rowcount
            if not updated:
                self._release(connection, entry)
        return bool(updated)

    def release_claims(self) -> int:
        """Free every claim: called when the node's worker starts, since a claim left by a
        process that was killed mid-delivery would otherwise hold its row back for up to
        ``CLAIM_SECONDS``. Sending a row twice is harmless (a conditional update)."""
        with self._engine.begin() as connection:
            result = connection.execute(
                sa_update(TABLE)
                .where(TABLE.c.claimed_until.is_not(None))
                .values(claimed_until=None)
            )
        return int(result.rowcount)

    @staticmethod
    def _release(connection: Connection, entry: Entry) -> None:
        connection.execute(
            sa_update(TABLE).where(TABLE.c.id == entry.id).values(claimed_until=None)
        )

    # -- looking ---------------------------------------------------------------
    def entries(self, tenant: str | None = None, state: str | None = None) -> list[Entry]:
        statement = sa_select(TABLE).order_by(TABLE.c.id)
        if tenant is not None:
            statement = statement.where(TABLE.c.tenant == tenant)
        if state is not None:
            statement = statement.where(TABLE.c.state == state)
        with self._engine.connect() as connection:
            return [Entry.of(row) for row in connection.execute(statement)]

    def depth(self, tenant: str | None = None) -> Depth:
        statement = sa_select(
            TABLE.c.state, TABLE.c.action, func.count(), func.min(TABLE.c.created_at)
        ).group_by(TABLE.c.state, TABLE.c.action)
        if tenant is not None:
            statement = statement.where(TABLE.c.tenant == tenant)
        pending = failed = retracting = 0
        oldest: datetime | None = None
        with self._engine.connect() as connection:
            for state, action, count, first in connection.execute(statement):
                if state == FAILED:
                    failed += count
                else:
                    pending += count
                    retracting += count if action == RETRACT else 0
                if first is not None:
                    first = first if first.tzinfo else first.replace(tzinfo=UTC)
                    oldest = first if oldest is None else min(oldest, first)
        age = None if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        return Depth(pending, failed, retracting, age)
