"""Verified patient access codes (DESIGN.md §2 flow 4, issue 8).

Staff of the site that holds a patient's studies record that they verified the
patient's identity (who, how, when) and hand the patient a code for chosen
studies. Redeemed at the hub, the code opens a short patient session (a JWT
signed with the hub's key, ``iss`` = ``{hub}/patient-access``) whose ``studies``
claim the access policy honours: the patient sees and downloads those studies,
and nothing else.

**The code** reads ``K7QD-3M9X-TV2A-P8RC-W4HN``: Crockford base32, five groups of
four. The first two groups are the code's public id (looked up, listed, revoked,
and the one wrong guesses are counted against); the last three are the secret
(60 random bits). Typing is forgiving as Crockford defines it: case, spaces and
dashes do not matter, ``O`` reads as ``0``, ``I`` and ``L`` as ``1``.

**Stored only as a hash**: HMAC-SHA256 of id and secret, keyed with 32 random
bytes kept beside the hub's signing key (``keys/access-code.key``, mode 0600),
never in the database. HMAC rather than a slow hash (scrypt): the secret is 60
random bits, not a password, so stretching adds little; redeeming needs no
login and must stay cheap under a flood of guesses; and a copy of the database
alone (a backup, a replica) cannot test a single guess without the key file.

**Guessing is bounded exactly**, however many threads, processes or hub replicas
answer, because each limit is tested and counted by one SQL statement:

- per code: ``UPDATE … SET failures = …, locked_until_ms = … WHERE id = :id AND
  locked_until_ms <= :now``. The failure that reaches the limit sets the lock in
  the same statement, so later ones match no row and are refused as locked. A
  lock lasts ``lockout`` and doubles with each further lock-out (capped); while
  locked, even the right code is refused. A redemption resets the count.
- per client address: a fixed window of failed attempts. An attempt reserves its
  place (an upsert that counts only while under the limit) *before* the code is
  looked at and gives it back if it did not fail, so parallel attempts cannot
  overshoot either. Attempts refused because the code is locked test nothing
  and are given back too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    String,
    Table,
    Text,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Field, SQLModel

from exchange.audit.events import AuditAction, What
from exchange.config import Settings
from exchange.errors import (
    BadRequest,
    ConfigurationError,
    ExchangeError,
    Forbidden,
    Gone,
    NotFound,
    TooManyRequests,
    Unavailable,
    Unprocessable,
)
from exchange.hub import access, auditing
from exchange.migrations import ensure_schema
from exchange.policy.decisions import Decision
from exchange.security.keys import SigningKey
from exchange.security.tokens import Principal, principal_from_claims

if TYPE_CHECKING:
    from exchange.hub.services import HubServices

log = logging.getLogger(__name__)

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
GROUP = 4
ID_LENGTH = 8
SECRET_LENGTH = 12
CODE_LENGTH = ID_LENGTH + SECRET_LENGTH
SECRET_BITS = SECRET_LENGTH * 5
KEY_BYTES = 32
_READS_AS = str.maketrans({"O": "0", "I": "1", "L": "1"})
_IGNORED = re.compile(r"[\s\-]+")
_HMAC_LABEL = b"exchange-access-code/1"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: What a patient session may do: find and read its studies, read its disclosures.
SESSION_SCOPE = "patient/ImagingStudy.rs patient/AuditEvent.rs"
SESSION_TYPE = "at+jwt"
#: Roles of the holding organisation's staff who may issue codes for its studies.
ISSUER_ROLES = ("clinician", "system")
#: Clock difference tolerated in a stated verification time.
SKEW = timedelta(minutes=5)
MAX_STUDIES = 50

State = Literal["active", "expired", "revoked", "locked"]
Outcome = Literal[
    "redeemed", "malformed", "address-limited", "unknown", "wrong", "locked", "expired", "revoked"
]


# -- the code itself ----------------------------------------------------------------------


class MalformedCode(ValueError):
    """Not something a code could be (wrong length or characters)."""


def _plain(text: str, length: int) -> str:
    plain = _IGNORED.sub("", text).upper().translate(_READS_AS)
    if len(plain) != length or any(c not in ALPHABET for c in plain):
        raise MalformedCode(text)
    return plain


def normalise(text: str) -> str:
    """A typed code as its 20 canonical characters; ``MalformedCode`` if it cannot be one."""
    return _plain(text, CODE_LENGTH)


def normalise_id(text: str) -> str:
    """A code id (``K7QD-3M9X``, any case or spacing) as its 8 canonical characters."""
    return _plain(text, ID_LENGTH)


def grouped(plain: str) -> str:
    """``K7QD3M9X…`` -> ``K7QD-3M9X-…``: how codes and ids are shown."""
    return "-".join(plain[i : i + GROUP] for i in range(0, len(plain), GROUP))


def parse(text: str) -> tuple[str, str]:
    """(id, secret) of a typed code."""
    plain = normalise(text)
    return plain[:ID_LENGTH], plain[ID_LENGTH:]


def new_code() -> tuple[str, str]:
    """A fresh (id, secret), uniformly random over the alphabet (5 bits a character)."""
    draw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    return draw[:ID_LENGTH], draw[ID_LENGTH:]


class CodeKey:
    """The per-hub HMAC key codes are hashed with (kept in a file, never in the database)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ValueError(f"an access-code key has {KEY_BYTES} bytes")
        self._secret = secret

    @classmethod
    def load_or_create(cls, path: Path) -> CodeKey:
        """The key at ``path``, created (0600) if absent. Hub processes starting together
        agree on one: a new key is published with ``link``, which fails if one exists."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(secrets.token_bytes(KEY_BYTES))
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o600)
                # Another process may have published its key first: then that one is used.
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        secret = path.read_bytes()
        if len(secret) != KEY_BYTES:
            raise ConfigurationError(f"access-code key file {path} is damaged")
        return cls(secret)

    def _mac(self, code_id: str, secret: str) -> hmac.HMAC:
        mac = hmac.HMAC(self._secret, hashes.SHA256())
        mac.update(b"\x00".join([_HMAC_LABEL, code_id.encode(), secret.encode()]))
        return mac

    def digest(self, code_id: str, secret: str) -> str:
        return self._mac(code_id, secret).finalize().hex()

    def matches(self, code_id: str, secret: str, stored: str) -> bool:
        """Constant-time comparison with a stored digest."""
        try:
            self._mac(code_id, secret).verify(bytes.fromhex(stored))
        except (InvalidSignature, ValueError):
            return False
        return True


def key_path(data_dir: Path) -> Path:
    """Where the hub keeps the access-code key (beside its grant-signing key)."""
    return data_dir / "keys" / "access-code.key"


def patient_access_issuer(settings: Settings) -> str:
    """The ``iss`` of patient sessions; the hub's token validator trusts it."""
    return f"{settings.base_url()}/patient-access"


# -- tables -------------------------------------------------------------------------------


class AccessCodeRow(SQLModel, table=True):
    __tablename__ = "access_code"

    id: str = Field(sa_column=Column(String(16), primary_key=True))
    secret_hash: str = Field(sa_column=Column(String(64), nullable=False))
    patient: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    #: JSON array of ImagingStudy ids.
    studies: str = Field(sa_column=Column(Text, nullable=False))
    organization: str | None = Field(default=None, sa_column=Column(String(64)))
    issued_by: str = Field(sa_column=Column(String(255), nullable=False))
    issued_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    method: str = Field(sa_column=Column(String(64), nullable=False))
    verified_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    note: str | None = Field(default=None, sa_column=Column(Text))
    expires_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    revoked_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    revoked_by: str | None = Field(default=None, sa_column=Column(String(255)))
    replaced_by: str | None = Field(default=None, sa_column=Column(String(16)))
    failures: int = Field(sa_column=Column(Integer, nullable=False))
    locked_until_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    #: The next lock-out's length (doubles with each one; back to the base on success).
    backoff_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    lockouts: int = Field(sa_column=Column(Integer, nullable=False))
    redemptions: int = Field(sa_column=Column(Integer, nullable=False))
    last_redeemed_ms: int | None = Field(default=None, sa_column=Column(BigInteger))


class AccessCodeAddressRow(SQLModel, table=True):
    __tablename__ = "access_code_address"

    address: str = Field(sa_column=Column(String(64), primary_key=True))
    window_start_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    failures: int = Field(sa_column=Column(Integer, nullable=False))


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


CODES = _table(AccessCodeRow)
ADDRESSES = _table(AccessCodeAddressRow)
TABLES = [CODES, ADDRESSES]


# -- the service ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The HIE's settings for codes (``EXCHANGE_ACCESS_CODE_*``), in the units used here."""

    max_failures: int = 5
    lockout_ms: int = 60_000
    lockout_max_ms: int = 86_400_000
    address_failures: int = 20
    address_window_ms: int = 900_000
    default_days: float = 7.0
    max_days: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_failures=settings.access_code_max_failures,
            lockout_ms=round(settings.access_code_lockout_seconds * 1000),
            lockout_max_ms=round(settings.access_code_lockout_max_seconds * 1000),
            address_failures=settings.access_code_address_failures,
            address_window_ms=round(settings.access_code_address_window_seconds * 1000),
            default_days=settings.access_code_default_days,
            max_days=settings.access_code_max_days,
        )


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(ms: int) -> int:
    """A wait in whole seconds, rounded up (what ``Retry-After`` says)."""
    return max(1, -(-ms // 1000))


@dataclass(frozen=True)
class CodeInfo:
    """A code as operators see it: everything but the code (only its id)."""

    id: str
    patient: str
    studies: tuple[str, ...]
    organization: str | None
    issued_by: str
    issued_ms: int
    method: str
    verified_ms: int
    note: str | None
    expires_ms: int
    revoked_ms: int | None
    revoked_by: str | None
    replaced_by: str | None
    failures: int
    locked_until_ms: int
    lockouts: int
    redemptions: int
    last_redeemed_ms: int | None

    @property
    def display_id(self) -> str:
        return grouped(self.id)

    def state(self, now_ms: int) -> State:
        if self.revoked_ms is not None:
            return "revoked"
        if self.expires_ms <= now_ms:
            return "expired"
        if self.locked_until_ms > now_ms:
            return "locked"
        return "active"

    def as_json(self, now_ms: int) -> dict[str, Any]:
        found: dict[str, Any] = {
            "id": self.display_id,
            "state": self.state(now_ms),
            "patient": f"Patient/{self.patient}",
            "studies": [f"ImagingStudy/{s}" for s in self.studies],
            "organization": self.organization,
            "issued_by": self.issued_by,
            "issued": _iso(self.issued_ms),
            "verification": {
                "method": self.method,
                "verified_at": _iso(self.verified_ms),
                "verified_by": self.issued_by,
                **({"note": self.note} if self.note else {}),
            },
            "expires": _iso(self.expires_ms),
            "failures": self.failures,
            "lockouts": self.lockouts,
            "redemptions": self.redemptions,
        }
        optional = {
            "locked_until": _iso(self.locked_until_ms) if self.locked_until_ms > now_ms else None,
            "last_redeemed": _iso(self.last_redeemed_ms),
            "revoked": _iso(self.revoked_ms),
            "revoked_by": self.revoked_by,
            "replaced_by": grouped(self.replaced_by) if self.replaced_by else None,
        }
        found.update({k: v for k, v in optional.items() if v is not None})
        return found


@dataclass(frozen=True)
class Attempt:
    """What one redemption came to. ``retry_after``: seconds to wait (locked, limited);
    ``locked_for``: this failure locked the code for that many seconds."""

    outcome: Outcome
    code: CodeInfo | None = None
    retry_after: int | None = None
    locked_for: int | None = None


_COLUMNS = [c for c in CODES.c if c.name not in ("secret_hash", "backoff_ms")]


def _info(found: Mapping[Any, Any]) -> CodeInfo:
    values = dict(found)
    values.pop("secret_hash", None)
    values.pop("backoff_ms", None)
    values["studies"] = tuple(json.loads(values["studies"]))
    return CodeInfo(**values)


P = ParamSpec("P")
R = TypeVar("R")


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """A database failure is a 503 (fail closed), never a 500 or a silent pass."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as exc:
            log.error("access-code store failed", extra={"error": type(exc).__name__})
            raise Unavailable(
                "access codes cannot be checked or changed now; try again later"
            ) from None

    return guarded


class AccessCodes:
    """Codes in the hub's database: issue, look up, revoke, redeem (with the limits)."""

    def __init__(
        self,
        engine: Engine,
        key: CodeKey,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._key = key
        self.limits = limits or Limits()
        self._clock = clock
        ensure_schema(engine, "hub")

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- issue, read, revoke -----------------------------------------------------------
    @_guarded
    def issue(
        self,
        *,
        patient: str,
        studies: Sequence[str],
        organization: str | None,
        issued_by: str,
        method: str,
        verified_ms: int,
        expires_ms: int,
        note: str | None = None,
        replaces: str | None = None,
    ) -> tuple[str, CodeInfo]:
        """A new code (its text, shown once, and its record). ``replaces``: a code revoked
        in the same transaction (re-issue)."""
        now = self.now_ms()
        for _ in range(8):  # an id collision (40 bits) is rare; draw again
            code_id, secret = new_code()
            row = {
                "id": code_id,
                "secret_hash": self._key.digest(code_id, secret),
                "patient": patient,
                "studies": json.dumps(list(studies)),
                "organization": organization,
                "issued_by": issued_by,
                "issued_ms": now,
                "method": method,
                "verified_ms": verified_ms,
                "note": note,
                "expires_ms": expires_ms,
                "revoked_ms": None,
                "revoked_by": None,
                "replaced_by": None,
                "failures": 0,
                "locked_until_ms": 0,
                "backoff_ms": self.limits.lockout_ms,
                "lockouts": 0,
                "redemptions": 0,
                "last_redeemed_ms": None,
            }
            try:
                with self._engine.begin() as conn:
                    if replaces is not None:
                        conn.execute(
                            update(CODES)
                            .where(CODES.c.id == replaces)
                            .values(
                                revoked_ms=func.coalesce(CODES.c.revoked_ms, now),
                                revoked_by=func.coalesce(CODES.c.revoked_by, issued_by),
                                replaced_by=code_id,
                            )
                        )
                    conn.execute(insert(CODES).values(**row))
            except IntegrityError:
                continue
            return grouped(code_id + secret), _info(row)
        raise Unavailable("no free access code id was found; try again")

    @_guarded
    def get(self, code_id: str) -> CodeInfo | None:
        found = self._load(code_id)
        return found[0] if found else None

    def _load(self, code_id: str) -> tuple[CodeInfo, str] | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(CODES).where(CODES.c.id == code_id)).first()
        return None if row is None else (_info(row._mapping), str(row.secret_hash))

    @_guarded
    def for_patients(
        self, patients: Sequence[str], organization: str | None = None
    ) -> list[CodeInfo]:
        """Codes issued for any of ``patients`` (by ``organization`` only, if given), newest
        first."""
        statement = select(*_COLUMNS).where(CODES.c.patient.in_(list(patients)))
        if organization is not None:
            statement = statement.where(CODES.c.organization == organization)
        with self._engine.connect() as conn:
            rows = conn.execute(statement.order_by(CODES.c.issued_ms.desc(), CODES.c.id)).all()
        return [_info(row._mapping) for row in rows]

    @_guarded
    def revoke(self, code_id: str, by: str) -> tuple[CodeInfo, bool]:
        """Revoke (idempotent): the record, and whether this call revoked it."""
        now = self.now_ms()
        with self._engine.begin() as conn:
            done = conn.execute(
                update(CODES)
                .where(CODES.c.id == code_id, CODES.c.revoked_ms.is_(None))
                .values(revoked_ms=now, revoked_by=by)
            ).rowcount
        found = self.get(code_id)
        if found is None:
            raise NotFound("no such access code")
        return found, done == 1

    # -- redeem ------------------------------------------------------------------------
    @_guarded
    def redeem(self, text: str, address: str | None) -> Attempt:
        """Check a typed code under both limits; never raises for a wrong code."""
        try:
            code_id, secret = parse(text)
        except MalformedCode:
            return Attempt("malformed")
        now = self.now_ms()
        where = (address or "unknown")[:64]
        window = self._reserve(where, now)
        if window is None:
            return Attempt("address-limited", retry_after=self._address_wait(where, now))
        attempt = self._attempt(code_id, secret)
        if attempt.outcome in ("redeemed", "locked"):
            self._give_back(where, window)
        return attempt

    def _attempt(self, code_id: str, secret: str) -> Attempt:
        # The clock is read at each step: under a flood, waits for the database's write
        # lock would otherwise make a lock-out end early and Retry-After overstate it.
        found = self._load(code_id)
        now = self.now_ms()
        if found is None:
            self._key.digest(code_id, secret)  # the same work as for a known id
            return Attempt("unknown")
        code, stored = found
        if code.locked_until_ms > now:
            return Attempt("locked", code, retry_after=_seconds(code.locked_until_ms - now))
        if not self._key.matches(code_id, secret, stored):
            return self._failed(code)
        if code.revoked_ms is not None:
            return Attempt("revoked", code)
        if code.expires_ms <= now:
            return Attempt("expired", code)
        now = self.now_ms()
        with self._engine.begin() as conn:
            done = conn.execute(
                update(CODES)
                .where(
                    CODES.c.id == code_id,
                    CODES.c.locked_until_ms <= now,
                    CODES.c.revoked_ms.is_(None),
                    CODES.c.expires_ms > now,
                )
                .values(
                    failures=0,
                    backoff_ms=self.limits.lockout_ms,
                    redemptions=CODES.c.redemptions + 1,
                    last_redeemed_ms=now,
                )
            ).rowcount
        if done != 1:  # locked, revoked or expired since it was read
            return self._changed(code_id)
        return Attempt(
            "redeemed",
            replace(code, failures=0, redemptions=code.redemptions + 1, last_redeemed_ms=now),
        )

    def _changed(self, code_id: str) -> Attempt:
        code = self.get(code_id)
        now = self.now_ms()
        if code is None:
            return Attempt("unknown")
        if code.locked_until_ms > now:
            return Attempt("locked", code, retry_after=_seconds(code.locked_until_ms - now))
        return Attempt("revoked" if code.revoked_ms is not None else "expired", code)

    def _failed(self, code: CodeInfo) -> Attempt:
        """Count one wrong guess; the one that reaches the limit locks the code, in the
        same statement. Matches no row when the code is locked (then: refused as locked)."""
        limit = self.limits.max_failures
        now = self.now_ms()
        doubled = CODES.c.backoff_ms * 2
        counted = case((CODES.c.failures >= limit, 1), else_=CODES.c.failures + 1)
        locks = counted >= limit
        statement = (
            update(CODES)
            .where(CODES.c.id == code.id, CODES.c.locked_until_ms <= now)
            .values(
                failures=counted,
                locked_until_ms=case((locks, now + CODES.c.backoff_ms), else_=0),
                backoff_ms=case(
                    (
                        locks,
                        case(
                            (doubled > self.limits.lockout_max_ms, self.limits.lockout_max_ms),
                            else_=doubled,
                        ),
                    ),
                    else_=CODES.c.backoff_ms,
                ),
                lockouts=case((locks, CODES.c.lockouts + 1), else_=CODES.c.lockouts),
            )
            .returning(CODES.c.failures, CODES.c.locked_until_ms, CODES.c.lockouts)
        )
        with self._engine.begin() as conn:
            row = conn.execute(statement).first()
        if row is None:
            return self._changed(code.id)
        failures, locked_until, lockouts = int(row[0]), int(row[1]), int(row[2])
        counted_code = replace(
            code, failures=failures, locked_until_ms=locked_until, lockouts=lockouts
        )
        if locked_until > now:
            return Attempt("wrong", counted_code, locked_for=_seconds(locked_until - now))
        return Attempt("wrong", counted_code)

    def _reserve(self, address: str, now: int) -> int | None:
        """Count an attempt against ``address`` unless its window is full: the window's
        start, or None (refused). One statement, so the limit is exact."""
        stale = ADDRESSES.c.window_start_ms <= now - self.limits.address_window_ms
        make = sqlite_insert if self._engine.dialect.name == "sqlite" else pg_insert
        statement = (
            make(ADDRESSES)
            .values(address=address, window_start_ms=now, failures=1)
            .on_conflict_do_update(
                index_elements=[ADDRESSES.c.address],
                set_={
                    "failures": case((stale, 1), else_=ADDRESSES.c.failures + 1),
                    "window_start_ms": case((stale, now), else_=ADDRESSES.c.window_start_ms),
                },
                where=or_(stale, ADDRESSES.c.failures < self.limits.address_failures),
            )
            .returning(ADDRESSES.c.window_start_ms)
        )
        with self._engine.begin() as conn:
            row = conn.execute(statement).first()
        return None if row is None else int(row[0])

    def _give_back(self, address: str, window: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(ADDRESSES)
                .where(
                    ADDRESSES.c.address == address,
                    ADDRESSES.c.window_start_ms == window,
                    ADDRESSES.c.failures > 0,
                )
                .values(failures=ADDRESSES.c.failures - 1)
            )

    def _address_wait(self, address: str, now: int) -> int:
        with self._engine.connect() as conn:
            start = conn.execute(
                select(ADDRESSES.c.window_start_ms).where(ADDRESSES.c.address == address)
            ).scalar()
        if start is None:
            return 1
        return _seconds(int(start) + self.limits.address_window_ms - now)


# -- the hub's side: who may issue, list and revoke; the patient session; the audit ---------


@dataclass(frozen=True)
class Session:
    """A redeemed code's patient session (the answer to ``redeem``)."""

    token: str
    expires_in: int
    code: CodeInfo

    def as_json(self) -> dict[str, Any]:
        return {
            "access_token": self.token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": SESSION_SCOPE,
            "patient": f"Patient/{self.code.patient}",
            "studies": [f"ImagingStudy/{s}" for s in self.code.studies],
        }


def session_claims(settings: Settings, code: CodeInfo, issued: int) -> dict[str, Any]:
    return {
        "iss": patient_access_issuer(settings),
        "aud": settings.audience,
        "sub": f"patient-code:{code.display_id}",
        "iat": issued,
        "nbf": issued,
        "exp": issued + settings.patient_session_seconds,
        "jti": secrets.token_urlsafe(16),
        "role": "patient",
        "patient": code.patient,
        "studies": list(code.studies),
        "scope": SESSION_SCOPE,
        "fhirUser": f"Patient/{code.patient}",
    }


def sign_session(key: SigningKey, claims: dict[str, Any]) -> str:
    return jwt.encode(
        claims, key.private, algorithm="RS256", headers={"kid": key.kid, "typ": SESSION_TYPE}
    )


def reference_id(value: str, kind: str, what: str) -> str:
    """``Kind/<id>`` (or a bare id) -> id; 400 otherwise."""
    rid = value.removeprefix(f"{kind}/")
    if not _ID.match(rid):
        raise BadRequest(f"{what} must be a {kind} reference like '{kind}/<id>' (got {value!r})")
    return rid


def _code_what(code: CodeInfo | None) -> What:
    if code is None:
        return What()
    return What(patients=(code.patient,), study=code.studies[0] if code.studies else None)


def _record(
    services: HubServices,
    action: AuditAction,
    principal: Principal | None,
    address: str | None,
    what: What,
    *,
    allowed: bool,
    reason: str,
    decision: Decision | None = None,
) -> None:
    auditing.record(
        services,
        action=action,
        principal=principal,
        address=address,
        what=what,
        decision=decision,
        allowed=allowed,
        reason=reason,
    )


def _refuse(
    services: HubServices,
    action: AuditAction,
    principal: Principal | None,
    address: str | None,
    what: What,
    refusal: ExchangeError,
    decision: Decision | None = None,
) -> ExchangeError:
    """Audit a refusal (before it is answered) and hand it back to be raised."""
    _record(
        services,
        action,
        principal,
        address,
        what,
        allowed=False,
        reason=refusal.message,
        decision=decision,
    )
    return refusal


def _linked(services: HubServices, patient: str) -> tuple[str, ...]:
    return services.facts.linked(services, patient) or (patient,)


def _read(services: HubServices, kind: str, rid: str) -> Any:
    try:
        return services.resources.read(kind, rid)
    except (NotFound, Gone):
        raise NotFound(f"{kind}/{rid} is not in the index") from None


@dataclass(frozen=True)
class Issued:
    code: str
    info: CodeInfo

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.info.display_id,
            "code": self.code,
            "expires": _iso(self.info.expires_ms),
            "patient": f"Patient/{self.info.patient}",
            "studies": [f"ImagingStudy/{s}" for s in self.info.studies],
        }


def issue_for(
    services: HubServices,
    principal: Principal,
    *,
    patient: str,
    studies: Sequence[str],
    method: str,
    verified_at: datetime,
    note: str | None,
    expires_in_days: float | None,
    replaces: str | None,
    address: str | None,
) -> Issued:
    """Issue a code for ``studies`` of ``patient`` as ``principal`` (the verifying staff).

    Bad input is a 400; a patient or study unknown to the index 404; staff of another
    organisation, or a study the policy does not let the caller export, 403 (audited)."""
    settings, codes = services.settings, services.access_codes
    action: AuditAction = "access-code-issue"
    pid = reference_id(patient, "Patient", "patient")
    wanted = list(
        dict.fromkeys(reference_id(s, "ImagingStudy", "each of studies") for s in studies)
    )
    if not 1 <= len(wanted) <= MAX_STUDIES:
        raise BadRequest(f"studies must name 1 to {MAX_STUDIES} ImagingStudy references")
    if method not in settings.access_code_verification_methods:
        known = ", ".join(settings.access_code_verification_methods)
        raise BadRequest(f"verification.method {method!r} is not one of: {known}")
    now = datetime.fromtimestamp(codes.now_ms() / 1000, UTC)
    if verified_at.tzinfo is None:
        raise BadRequest("verification.verified_at needs a time zone (for example ...Z)")
    if verified_at > now + SKEW:
        raise BadRequest("verification.verified_at is in the future")
    oldest = now - timedelta(days=settings.access_code_verification_max_age_days)
    if verified_at < oldest:
        raise BadRequest(
            "verification.verified_at is too long ago: verify the patient's identity again"
        )
    days = codes.limits.default_days if expires_in_days is None else expires_in_days
    if not 0 < days <= codes.limits.max_days:
        raise BadRequest(
            f"expires_in_days must be more than 0 and at most {codes.limits.max_days:g}"
        )
    old: CodeInfo | None = None
    if replaces is not None:
        try:
            old = codes.get(normalise_id(replaces))
        except MalformedCode:
            old = None
        if old is None:
            raise NotFound("the access code to replace does not exist")

    what = What(patients=(pid,), study=wanted[0])
    if principal.role not in ISSUER_ROLES or not principal.organization:
        raise _refuse(
            services,
            action,
            principal,
            address,
            what,
            Forbidden(
                "only staff of the organisation that holds the studies can issue access codes"
            ),
        )
    _read(services, "Patient", pid)
    decision: Decision | None = None
    for sid in wanted:
        study = _read(services, "ImagingStudy", sid)
        what = What(patients=(pid,), study=sid)
        holder = access.holder(services, study)
        if holder is None or holder.organization != principal.organization:
            raise _refuse(
                services,
                action,
                principal,
                address,
                what,
                Forbidden(
                    f"only staff of the organisation that holds ImagingStudy/{sid} "
                    "can issue an access code for it"
                ),
            )
        verdict = access.decide_study(services, principal, "export", study)
        if not verdict.allow:
            raise _refuse(
                services, action, principal, address, what, Forbidden(verdict.reason()), verdict
            )
        decision = decision or verdict
        if pid not in access.study_patients(services, study):
            raise Unprocessable(f"ImagingStudy/{sid} is not a study of Patient/{pid}")
    if old is not None:
        if old.organization != principal.organization:
            raise _refuse(
                services,
                action,
                principal,
                address,
                what,
                Forbidden("only the organisation that issued an access code can replace it"),
            )
        if pid not in _linked(services, old.patient):
            raise Unprocessable("the access code to replace was issued for another patient")

    expires = codes.now_ms() + round(days * 86_400_000)
    text, info = codes.issue(
        patient=pid,
        studies=wanted,
        organization=principal.organization,
        issued_by=principal.sub,
        method=method,
        verified_ms=int(verified_at.timestamp() * 1000),
        expires_ms=expires,
        note=note.strip() if note and note.strip() else None,
        replaces=old.id if old else None,
    )
    covered = ", ".join(f"ImagingStudy/{s}" for s in wanted)
    replaced = f"; it replaces code {old.display_id}, now revoked" if old else ""
    reason = (
        f"access code {info.display_id} issued for {covered} after identity verification "
        f"({method}, {_iso(info.verified_ms)}); expires {_iso(info.expires_ms)}{replaced}"
    )
    try:
        _record(
            services,
            action,
            principal,
            address,
            What(patients=(pid,), study=wanted[0]),
            allowed=True,
            reason=reason,
            decision=decision,
        )
    except ExchangeError:
        # No audit, no code: the code was never shown, so take it out of use.
        codes.revoke(info.id, "hub: the issue could not be audited")
        raise
    return Issued(text, info)


def _may_manage(services: HubServices, principal: Principal, code: CodeInfo) -> bool:
    """The issuing organisation's staff, the patient, HIE operators."""
    if principal.role == "operator":
        return True
    if principal.role in ISSUER_ROLES:
        return principal.organization is not None and principal.organization == code.organization
    if principal.role == "patient" and principal.patient:
        return principal.patient in _linked(services, code.patient)
    return False


def revoke_for(
    services: HubServices, principal: Principal, code_id: str, address: str | None
) -> CodeInfo:
    codes = services.access_codes
    try:
        plain = normalise_id(code_id)
    except MalformedCode:
        raise NotFound("no such access code") from None
    code = codes.get(plain)
    if code is None:
        raise NotFound("no such access code")
    action: AuditAction = "access-code-revoke"
    if not _may_manage(services, principal, code):
        raise _refuse(
            services,
            action,
            principal,
            address,
            _code_what(code),
            Forbidden(
                "only the organisation that issued this access code, the patient or an HIE "
                "operator can revoke it"
            ),
        )
    revoked, now_revoked = codes.revoke(plain, principal.sub)
    said = "revoked" if now_revoked else "was already revoked"
    _record(
        services,
        action,
        principal,
        address,
        _code_what(revoked),
        allowed=True,
        reason=f"access code {revoked.display_id} {said}",
    )
    return revoked


def list_for(
    services: HubServices, principal: Principal, patient: str, address: str | None
) -> list[CodeInfo]:
    """Codes for a patient: all for HIE operators and the patient, the own organisation's
    for its staff; anyone else 403 (audited)."""
    pid = reference_id(patient, "Patient", "patient")
    linked = _linked(services, pid)
    what = What(patients=(pid,), query=f"access-codes?patient={pid}")
    organization: str | None = None
    if principal.role in ISSUER_ROLES and principal.organization:
        organization = principal.organization
    elif not (
        principal.role == "operator"
        or (principal.role == "patient" and principal.patient in linked)
    ):
        raise _refuse(
            services,
            "search",
            principal,
            address,
            what,
            Forbidden(
                "only HIE operators, the patient and the issuing organisation's staff can "
                "list a patient's access codes"
            ),
        )
    found = services.access_codes.for_patients(linked, organization)
    _record(
        services,
        "search",
        principal,
        address,
        what,
        allowed=True,
        reason=f"{len(found)} access codes listed",
    )
    return found


def redeem_for(services: HubServices, text: str, address: str | None) -> Session:
    """Redeem a typed code: a patient session, or the refusal (every attempt audited)."""
    attempt = services.access_codes.redeem(text, address)
    code = attempt.code
    action: AuditAction = "access-code-redeem"
    if attempt.outcome == "redeemed":
        assert code is not None
        claims = session_claims(services.settings, code, int(time.time()))
        token = sign_session(services.grant_key, claims)
        _record(
            services,
            action,
            principal_from_claims(claims),
            address,
            _code_what(code),
            allowed=True,
            reason=f"access code {code.display_id} redeemed: a patient session opened "
            f"for {len(code.studies)} studies",
        )
        return Session(token, services.settings.patient_session_seconds, code)

    refusal = _refusal(attempt)
    if attempt.locked_for is not None and code is not None:
        _record(
            services,
            "access-code-lockout",
            None,
            address,
            _code_what(code),
            allowed=False,
            reason=f"access code {code.display_id} locked for {attempt.locked_for} s after "
            f"{code.failures} wrong attempts (lock-out {code.lockouts})",
        )
    said = refusal.message
    if code is not None:
        said = f"access code {code.display_id}: {said}"
    if attempt.outcome == "wrong" and code is not None:
        said += f" ({code.failures} of {services.access_codes.limits.max_failures} wrong attempts)"
    _record(services, action, None, address, _code_what(code), allowed=False, reason=said)
    raise refusal


class InvalidCode(ExchangeError):
    """A wrong or unknown code: 401, challenging for a code (not a bearer token)."""

    status = 401
    code = "login"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'AccessCode realm="exchange"'})


INVALID = "the access code is not valid; check it and try again"


def _refusal(attempt: Attempt) -> ExchangeError:
    wait = attempt.retry_after or 1
    match attempt.outcome:
        case "malformed":
            return BadRequest(
                "that is not an access code: it has 20 letters and digits, in groups of four "
                "like K7QD-3M9X-TV2A-P8RC-W4HN"
            )
        case "address-limited":
            return TooManyRequests(
                f"too many failed attempts from your address; try again in {wait} seconds",
                headers={"Retry-After": str(wait)},
            )
        case "locked":
            return TooManyRequests(
                "this access code is locked after too many wrong attempts; "
                f"try again in {wait} seconds",
                headers={"Retry-After": str(wait)},
            )
        case "expired":
            return Forbidden(
                "this access code has expired; ask the site that gave it to you for a new one"
            )
        case "revoked":
            return Forbidden(
                "this access code has been withdrawn; ask the site that gave it to you for a "
                "new one"
            )
        case "wrong" if attempt.locked_for is not None:
            return InvalidCode(
                f"{INVALID}; after too many wrong attempts it is locked for "
                f"{attempt.locked_for} seconds"
            )
        case _:
            return InvalidCode(INVALID)
