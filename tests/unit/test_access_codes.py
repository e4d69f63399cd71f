"""Patient access codes without a hub: the code's form, its hash, expiry, revocation and
the lock-out arithmetic (an injected clock), and the limits under parallel attempts."""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from exchange.config import load_settings
from exchange.database import make_engine
from exchange.errors import ConfigurationError
from exchange.hub.accesscodes import (
    ALPHABET,
    CODE_LENGTH,
    SECRET_BITS,
    AccessCodes,
    CodeKey,
    Limits,
    MalformedCode,
    grouped,
    new_code,
    normalise,
    normalise_id,
    parse,
)

SHAPE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){4}$")
DAY_MS = 86_400_000


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _codes(path: Path, clock: Clock, **limits: int) -> AccessCodes:
    key = CodeKey.load_or_create(path / "keys" / "access-code.key")
    engine = make_engine(f"sqlite:///{path / 'hub.db'}")
    return AccessCodes(engine, key, Limits(**limits), clock=clock)  # type: ignore[arg-type]


@pytest.fixture
def codes(tmp_path: Path, clock: Clock) -> Iterator[AccessCodes]:
    service = _codes(tmp_path, clock, max_failures=3, lockout_ms=60_000, lockout_max_ms=200_000)
    yield service
    service._engine.dispose()


def _issue(codes: AccessCodes, days: float = 7, patient: str = "p1") -> tuple[str, str]:
    now = codes.now_ms()
    text, info = codes.issue(
        patient=patient,
        studies=["s1", "s2"],
        organization="org-a",
        issued_by="dr-a",
        method="photo-id",
        verified_ms=now - 60_000,
        expires_ms=now + round(days * DAY_MS),
        note="passport seen",
    )
    return text, info.id


def _wrong(text: str) -> str:
    """The same code id with another secret."""
    code_id, secret = parse(text)
    other = "".join(ALPHABET[(ALPHABET.index(c) + 1) % 32] for c in secret)
    return grouped(code_id + other)


# -- the code's form ------------------------------------------------------------------------


def test_codes_are_typable_groups_with_enough_secret_entropy():
    assert SECRET_BITS >= 60
    drawn = [grouped("".join(new_code())) for _ in range(2000)]
    assert all(SHAPE.match(code) for code in drawn)
    assert len(set(drawn)) == len(drawn)
    # Every symbol turns up about equally often (uniform draw, 5 bits each).
    counts = Counter(c for code in drawn for c in code.replace("-", ""))
    expected = 2000 * CODE_LENGTH / 32
    assert set(counts) == set(ALPHABET)
    assert all(0.8 * expected < n < 1.2 * expected for n in counts.values())


def test_typing_is_forgiving_as_crockford_defines_it():
    code = "K7QD-3M9X-TV2A-P8RC-W4HN"
    assert normalise(code) == "K7QD3M9XTV2AP8RCW4HN"
    assert normalise(" k7qd 3m9x\ttv2a-p8rc--w4hn ") == "K7QD3M9XTV2AP8RCW4HN"
    # O reads as 0; I and L as 1
    assert normalise("OOOO-IIII-LLLL-oooo-iiii") == "00001111111100001111"
    assert parse(code) == ("K7QD3M9X", "TV2AP8RCW4HN")
    assert normalise_id("k7qd 3m9x") == "K7QD3M9X"
    for bad in [
        "",
        "K7QD-3M9X",
        code + "-A",
        "U7QD-3M9X-TV2A-P8RC-W4HN",
        "K7QD-3M9X-TV2A-P8RC-W4H*",
    ]:
        with pytest.raises(MalformedCode):
            normalise(bad)


# -- the key and the hash -------------------------------------------------------------------


def test_the_key_file_is_private_stable_and_checked(tmp_path: Path):
    path = tmp_path / "keys" / "access-code.key"
    first = CodeKey.load_or_create(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32
    again = CodeKey.load_or_create(path)
    assert again.digest("AAAAAAAA", "B" * 12) == first.digest("AAAAAAAA", "B" * 12)
    other = CodeKey.load_or_create(tmp_path / "other.key")
    assert other.digest("AAAAAAAA", "B" * 12) != first.digest("AAAAAAAA", "B" * 12)
    assert first.matches("AAAAAAAA", "B" * 12, first.digest("AAAAAAAA", "B" * 12))
    assert not first.matches("AAAAAAAA", "C" * 12, first.digest("AAAAAAAA", "B" * 12))
    assert not first.matches("AAAAAAAA", "B" * 12, "not hex")
    path.write_bytes(b"short")
    with pytest.raises(ConfigurationError, match="damaged"):
        CodeKey.load_or_create(path)


def _text_values(database: Path) -> Iterator[tuple[str, str, str]]:
    """(table, column, value) for every text value of every table."""
    with sqlite3.connect(database) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    if isinstance(value, str):
                        yield table, column, value


def secrets_of(text: str) -> list[str]:
    """The forms a code or its secret could be stored in, in clear."""
    code_id, secret = parse(text)
    return [text, normalise(text), secret, grouped(code_id + secret)[10:]]


def test_the_database_never_holds_a_code_or_its_secret(codes: AccessCodes, tmp_path: Path):
    issued = [_issue(codes)[0] for _ in range(5)]
    assert codes.redeem(issued[0], "10.0.0.1").outcome == "redeemed"
    assert codes.redeem(_wrong(issued[1]), "10.0.0.1").outcome == "wrong"
    values = list(_text_values(tmp_path / "hub.db"))
    assert any(table == "access_code" for table, _, _ in values)
    for text in issued:
        for form in secrets_of(text):
            leaks = [(t, c) for t, c, v in values if form.lower() in v.lower()]
            assert not leaks, f"{form} found in {leaks}"
    key = (tmp_path / "keys" / "access-code.key").read_bytes()
    assert not any(key.hex() in v for _, _, v in values)


# -- redeeming, expiry, revocation ----------------------------------------------------------


def test_a_code_redeems_until_it_expires(codes: AccessCodes, clock: Clock):
    text, code_id = _issue(codes, days=1)
    typed = text.lower().replace("-", " ")
    redeemed = codes.redeem(typed, "10.0.0.2")
    assert redeemed.outcome == "redeemed"
    assert redeemed.code is not None
    assert redeemed.code.studies == ("s1", "s2")
    assert redeemed.code.patient == "p1"
    assert codes.redeem(text, "10.0.0.2").code.redemptions == 2  # type: ignore[union-attr]
    clock.advance(86_400)
    assert codes.redeem(text, "10.0.0.2").outcome == "expired"
    assert codes.redeem(_wrong(text), "10.0.0.2").outcome == "wrong"  # says nothing more
    info = codes.get(code_id)
    assert info is not None
    assert info.state(codes.now_ms()) == "expired"


def test_unknown_and_malformed_codes(codes: AccessCodes):
    assert codes.redeem("0000-0000-0000-0000-0000", "10.0.0.3").outcome == "unknown"
    assert codes.redeem("not a code", "10.0.0.3").outcome == "malformed"


def test_revoked_codes_are_refused_and_reissue_replaces(codes: AccessCodes):
    text, code_id = _issue(codes)
    revoked, now_revoked = codes.revoke(code_id, "dr-a")
    assert now_revoked
    assert revoked.state(codes.now_ms()) == "revoked"
    assert codes.revoke(code_id, "someone")[1] is False  # idempotent, first revoker kept
    assert codes.get(code_id).revoked_by == "dr-a"  # type: ignore[union-attr]
    assert codes.redeem(text, "10.0.0.4").outcome == "revoked"

    old_text, old_id = _issue(codes)
    now = codes.now_ms()
    new_text, new = codes.issue(
        patient="p1",
        studies=["s1"],
        organization="org-a",
        issued_by="dr-b",
        method="in-person",
        verified_ms=now,
        expires_ms=now + DAY_MS,
        replaces=old_id,
    )
    old = codes.get(old_id)
    assert old is not None
    assert old.replaced_by == new.id
    assert old.revoked_by == "dr-b"
    assert codes.redeem(old_text, "10.0.0.4").outcome == "revoked"
    assert codes.redeem(new_text, "10.0.0.4").outcome == "redeemed"
    listed = [c.id for c in codes.for_patients(["p1"], "org-a")]
    assert new.id in listed
    assert old_id in listed
    assert codes.for_patients(["p1"], "org-b") == []


# -- lock-out arithmetic --------------------------------------------------------------------


def test_lockouts_double_up_to_the_cap_and_reset_on_success(codes: AccessCodes, clock: Clock):
    text, code_id = _issue(codes)
    wrong = _wrong(text)
    address = iter(f"10.1.0.{i}" for i in range(1, 250))  # keep the address limit out of it

    def attempt(code: str):  # type: ignore[no-untyped-def]
        return codes.redeem(code, next(address))

    first = [attempt(wrong) for _ in range(3)]
    assert [a.outcome for a in first] == ["wrong"] * 3
    assert [a.locked_for for a in first] == [None, None, 60]
    assert [a.code.failures for a in first] == [1, 2, 3]  # type: ignore[union-attr]
    locked = attempt(text)  # even the right code
    assert (locked.outcome, locked.retry_after) == ("locked", 60)
    clock.advance(30)
    assert attempt(wrong).retry_after == 30  # refused as locked: not counted
    assert codes.get(code_id).failures == 3  # type: ignore[union-attr]
    clock.advance(30)
    # Lapsed: a fresh round of three, then twice as long; then capped at 200 s.
    assert [attempt(wrong).locked_for for _ in range(3)] == [None, None, 120]
    clock.advance(120)
    assert [attempt(wrong).locked_for for _ in range(3)] == [None, None, 200]
    clock.advance(200)
    assert [attempt(wrong).locked_for for _ in range(3)] == [None, None, 200]
    info = codes.get(code_id)
    assert info is not None
    assert info.lockouts == 4
    assert info.state(codes.now_ms()) == "locked"
    clock.advance(200)
    assert attempt(text).outcome == "redeemed"  # success resets the count and the back-off
    assert [attempt(wrong).locked_for for _ in range(3)] == [None, None, 60]


def test_the_address_limit_counts_failures_only(tmp_path: Path, clock: Clock):
    codes = _codes(tmp_path, clock, address_failures=3, address_window_ms=100_000)
    text, _ = _issue(codes)
    unknown = "0000-0000-0000-0000-0000"
    assert codes.redeem(text, "10.2.0.1").outcome == "redeemed"  # successes are not counted
    assert [codes.redeem(unknown, "10.2.0.1").outcome for _ in range(3)] == ["unknown"] * 3
    limited = codes.redeem(text, "10.2.0.1")  # then even the right code waits
    assert (limited.outcome, limited.retry_after) == ("address-limited", 100)
    assert codes.redeem(text, "10.2.0.2").outcome == "redeemed"  # another address is not
    clock.advance(60)
    assert codes.redeem(unknown, "10.2.0.1").retry_after == 40
    clock.advance(40)
    assert codes.redeem(text, "10.2.0.1").outcome == "redeemed"  # a new window


# -- exact under parallel attempts ----------------------------------------------------------


def test_parallel_wrong_guesses_are_counted_exactly_in_threads(tmp_path: Path):
    codes = _codes(tmp_path, Clock(), max_failures=5, address_failures=1000)
    text, code_id = _issue(codes)
    wrong = _wrong(text)
    start = threading.Barrier(50)

    def guess(i: int) -> str:
        start.wait()
        return codes.redeem(wrong, f"10.3.0.{i}").outcome

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = Counter(pool.map(guess, range(50)))
    assert outcomes == {"wrong": 5, "locked": 45}
    assert codes.get(code_id).failures == 5  # type: ignore[union-attr]
    assert codes.redeem(text, "10.3.1.1").outcome == "locked"


def test_parallel_attempts_from_one_address_stop_exactly_at_its_limit(tmp_path: Path):
    codes = _codes(tmp_path, Clock(), address_failures=7)
    start = threading.Barrier(40)

    def guess(_: int) -> str:
        start.wait()
        return codes.redeem("0000-0000-0000-0000-0000", "10.4.0.1").outcome

    with ThreadPoolExecutor(max_workers=40) as pool:
        outcomes = Counter(pool.map(guess, range(40)))
    assert outcomes == {"unknown": 7, "address-limited": 33}


def _guess_in_process(root: str, wrong: str, first: int, count: int, queue) -> None:  # type: ignore[no-untyped-def]
    codes = _codes(Path(root), Clock(), max_failures=5, address_failures=1000)
    queue.put([codes.redeem(wrong, f"10.5.{first}.{i}").outcome for i in range(count)])


def test_parallel_wrong_guesses_are_counted_exactly_across_processes(tmp_path: Path):
    codes = _codes(tmp_path, Clock(), max_failures=5, address_failures=1000)
    text, code_id = _issue(codes)
    codes._engine.dispose()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=_guess_in_process, args=(str(tmp_path), _wrong(text), n, 10, queue))
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = Counter(o for _ in workers for o in queue.get(timeout=60))
    for worker in workers:
        worker.join(timeout=30)
    assert outcomes == {"wrong": 5, "locked": 35}
    assert codes.get(code_id).failures == 5  # type: ignore[union-attr]


def test_settings_bound_the_code_lifetimes():
    with pytest.raises(ConfigurationError, match="access_code_default_days"):
        load_settings(access_code_default_days=40, access_code_max_days=30)
    with pytest.raises(ConfigurationError, match="access_code_lockout_max_seconds"):
        load_settings(access_code_lockout_seconds=120, access_code_lockout_max_seconds=60)
    settings = load_settings()
    assert Limits.from_settings(settings) == Limits()


def test_a_failing_database_refuses_rather_than_erring(codes: AccessCodes):
    from sqlalchemy import text

    from exchange.errors import Unavailable

    text_, code_id = _issue(codes)
    with codes._engine.begin() as conn:
        conn.execute(text("DROP TABLE access_code"))
    with pytest.raises(Unavailable, match="try again later"):
        codes.redeem(text_, "10.6.0.1")
    with pytest.raises(Unavailable):
        codes.get(code_id)
