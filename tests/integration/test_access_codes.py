"""Issue 8, patient access codes, with real processes: a hub (development IdP) and a site
node that publishes two patients' studies.

Acceptance 3: a redeemed code opens a session that finds and retrieves the coded
studies only; expired and revoked codes are refused; 50 parallel wrong guesses
against one code (limit 5) count exactly 5 failures and lock the code, even
against the right one, until the lock lapses. Acceptance 4: neither the hub's
database nor its log ever holds a code or its secret in clear.

The hub trusts ``X-Forwarded-For`` from loopback (uvicorn's default for a local
reverse proxy), so each test speaks from its own client address.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from requests import HTTPError

from exchange.audit.events import AUDIT_SYSTEM
from exchange.federation import LocalFederation, NodeSpec
from exchange.hub.accesscodes import ALPHABET, AccessCodes, CodeKey, Limits, grouped, parse
from tests.e2e.test_brokered_federation import Hub, import_study, subject_of
from tests.pg import postgres_server, unavailable_reason

pytestmark = pytest.mark.integration

SITE = NodeSpec(node_id="site-a", organization="org-a", tenant="tenant-a")
LOCK_SECONDS = 2
ADDRESS_LIMIT = 6
CODES = "/exchange/access-codes"
SHAPE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){4}$")

#: Every code the hub handed out in this module (acceptance 4 looks for them all).
ISSUED: list[str] = []


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root: Path = tmp_path_factory.mktemp("access-codes")
    env = {
        "EXCHANGE_ACCESS_CODE_MAX_FAILURES": "5",
        "EXCHANGE_ACCESS_CODE_LOCKOUT_SECONDS": str(LOCK_SECONDS),
        "EXCHANGE_ACCESS_CODE_ADDRESS_FAILURES": str(ADDRESS_LIMIT),
        "EXCHANGE_ACCESS_CODE_ADDRESS_WINDOW_SECONDS": "600",
    }
    with LocalFederation(root=root, nodes=[SITE], hub_env=env) as fed:
        yield fed


class World:
    """Patient P with two studies at site A, patient Q with one."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        imported = {
            key: import_study(hub.federation, "site-a", mrn, slices=2)
            for key, mrn in [("p1", "AC-P-1"), ("p2", "AC-P-1"), ("q1", "AC-Q-1")]
        }
        self.uid = {key: uid for key, (uid, _) in imported.items()}
        self.datasets: dict[str, list[pydicom.Dataset]] = {k: d for k, (_, d) in imported.items()}
        self.study = {key: hub.wait_indexed(uid) for key, uid in self.uid.items()}
        self.id = {key: str(study["id"]) for key, study in self.study.items()}
        self.p = subject_of(self.study["p1"])
        self.q = subject_of(self.study["q1"])
        assert subject_of(self.study["p2"]) == self.p != self.q
        self.staff = hub.clinician("org-a")


@pytest.fixture(scope="module")
def world(federation: LocalFederation) -> Iterator[World]:
    hub = Hub(federation)
    yield World(hub)
    hub.http.close()


def _verified(minutes_ago: int = 10) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()


def issue(
    world: World,
    keys: list[str],
    *,
    patient: str | None = None,
    token: str | None = None,
    **extra: Any,
) -> httpx.Response:
    body: dict[str, Any] = {
        "patient": f"Patient/{patient or world.p}",
        "studies": [f"ImagingStudy/{world.id[k]}" for k in keys],
        "verification": {"method": "photo-id", "verified_at": _verified(), "note": "ID card"},
        **extra,
    }
    answer = world.hub.http.post(
        CODES, json=body, headers={"Authorization": f"Bearer {token or world.staff}"}
    )
    if answer.status_code == 201:
        ISSUED.append(answer.json()["code"])
    return answer


def issued(world: World, keys: list[str], **extra: Any) -> dict[str, Any]:
    answer = issue(world, keys, **extra)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def redeem(world: World, code: str, address: str) -> httpx.Response:
    return world.hub.http.post(
        f"{CODES}/redeem", json={"code": code}, headers={"X-Forwarded-For": address}
    )


def session(world: World, code: str, address: str) -> str:
    answer = redeem(world, code, address)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def wrong(code: str) -> str:
    code_id, secret = parse(code)
    return grouped(code_id + "".join(ALPHABET[(ALPHABET.index(c) + 7) % 32] for c in secret))


def events(world: World, action: str) -> list[dict[str, Any]]:
    found = world.hub.search(
        f"AuditEvent?subtype={AUDIT_SYSTEM}|{action}&_count=500", world.hub.operator
    )
    return [e["resource"] for e in found.get("entry", [])]


# -- issuing ----------------------------------------------------------------------------------


def test_only_the_holding_sites_staff_issue_codes_for_their_patients_studies(world: World):
    made = issue(world, ["p1", "p2"])
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    body = made.json()
    assert SHAPE.match(body["code"])
    assert body["id"] == body["code"][:9]
    assert body["patient"] == f"Patient/{world.p}"
    assert body["studies"] == [f"ImagingStudy/{world.id['p1']}", f"ImagingStudy/{world.id['p2']}"]
    expires = datetime.fromisoformat(body["expires"])
    assert timedelta(days=6.9) < expires - datetime.now(UTC) <= timedelta(days=7)

    other_site = issue(world, ["p1"], token=world.hub.clinician("org-b"))
    assert other_site.status_code == 403
    assert "holds" in other_site.json()["error"]["message"]
    operator = issue(world, ["p1"], token=world.hub.operator)
    assert operator.status_code == 403
    not_theirs = issue(world, ["p1", "q1"])
    assert not_theirs.status_code == 422
    assert f"is not a study of Patient/{world.p}" in not_theirs.json()["error"]["message"]

    def refused(**change: Any) -> str:
        answer = issue(world, ["p1"], **change)
        assert answer.status_code == 400, answer.text
        return str(answer.json()["error"]["message"])

    future = {"method": "photo-id", "verified_at": _verified(-60)}
    assert "future" in refused(verification=future)
    assert "photo-id" in refused(verification={"method": "hunch", "verified_at": _verified()})
    assert "timezone" in refused(
        verification={"method": "video", "verified_at": "2026-01-01T10:00"}
    )
    assert "verification" in refused(verification={"method": "video"})
    assert "at most 30" in refused(expires_in_days=31)
    assert "ImagingStudy reference" in refused(studies=["Patient/x"])
    unknown = issue(world, ["p1"], patient="no-such-patient")
    assert unknown.status_code == 404

    refusals = [e for e in events(world, "access-code-issue") if e["outcome"] == "4"]
    assert len(refusals) >= 2  # the other site's clinician and the operator


# -- acceptance 3: the session covers the coded studies and nothing else --------------------


def test_a_redeemed_code_finds_and_retrieves_only_its_studies(world: World):
    hub = world.hub
    code = issued(world, ["p1"])["code"]
    answer = redeem(world, code.lower().replace("-", " "), "10.8.0.1")  # as a patient types it
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["patient"] == f"Patient/{world.p}"
    assert body["studies"] == [f"ImagingStudy/{world.id['p1']}"]
    token = body["access_token"]

    found = hub.search(f"ImagingStudy?patient={world.p}", token)
    assert found["total"] == 1
    assert [e["resource"]["id"] for e in found["entry"]] == [world.id["p1"]]
    assert hub.search("ImagingStudy", token)["total"] == 1
    assert hub.fhir("GET", f"ImagingStudy/{world.id['p1']}", token).status_code == 200
    uncovered = hub.fhir("GET", f"ImagingStudy/{world.id['p2']}", token)
    assert uncovered.status_code == 403
    assert "does not cover this study" in uncovered.text
    other = hub.fhir("GET", f"ImagingStudy/{world.id['q1']}", token)
    assert other.status_code == 403
    assert "only see their own studies" in other.text

    client = hub.dicomweb(token)
    metadata = client.retrieve_study_metadata(world.uid["p1"])
    assert len(metadata) == 2
    instances = client.retrieve_study(world.uid["p1"])  # export: the patient's right of access
    originals = {str(d.SOPInstanceUID): d for d in world.datasets["p1"]}
    assert sorted(str(i.SOPInstanceUID) for i in instances) == sorted(originals)
    for instance in instances:
        assert instance.PixelData == originals[str(instance.SOPInstanceUID)].PixelData
    for key in ("p2", "q1"):
        with pytest.raises(HTTPError) as refused:
            client.retrieve_study_metadata(world.uid[key])
        assert refused.value.response.status_code == 403

    disclosures = hub.search(f"AuditEvent?patient={world.p}&_count=200", token)
    seen = [e["resource"] for e in disclosures.get("entry", [])]
    kinds = {c["code"] for e in seen for c in e["subtype"] if c["system"] == AUDIT_SYSTEM}
    assert {"view", "export", "access-code-issue", "access-code-redeem"} <= kinds
    leaked = [e for e in seen if f"Patient/{world.q}" in str(e)]
    assert not leaked, json.dumps(leaked[:2])
    denied = hub.fhir("GET", f"AuditEvent?patient={world.q}", token)
    assert denied.status_code == 200
    assert denied.json()["total"] == 0
    assert hub.fhir("GET", "Consent", token).status_code == 403  # the session's scopes


# -- acceptance 3: expired and revoked codes --------------------------------------------------


def test_expired_and_revoked_codes_are_refused(world: World):
    short = issued(world, ["p1"], expires_in_days=1.5 / 86400)["code"]
    time.sleep(2)
    expired = redeem(world, short, "10.8.1.1")
    assert expired.status_code == 403
    assert "expired" in expired.json()["error"]["message"]

    staff = {"Authorization": f"Bearer {world.staff}"}
    made = issued(world, ["p1"])
    revoked = world.hub.http.post(f"{CODES}/{made['id']}/revoke", headers=staff)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "revoked"
    refused = redeem(world, made["code"], "10.8.1.1")
    assert refused.status_code == 403
    assert "withdrawn" in refused.json()["error"]["message"]
    other_site = {"Authorization": f"Bearer {world.hub.clinician('org-b')}"}
    assert (
        world.hub.http.post(f"{CODES}/{made['id']}/revoke", headers=other_site).status_code == 403
    )
    assert world.hub.http.post(f"{CODES}/ZZZZ-ZZZZ/revoke", headers=staff).status_code == 404

    # Re-issue: the new code replaces (and revokes) the old one.
    old = issued(world, ["p1"])
    new = issued(world, ["p1", "p2"], replaces=old["id"])
    assert redeem(world, old["code"], "10.8.1.2").status_code == 403
    assert redeem(world, new["code"], "10.8.1.2").json()["studies"] == new["studies"]

    # The patient withdraws their own code with the session it opened.
    patient = {"Authorization": f"Bearer {session(world, new['code'], '10.8.1.3')}"}
    assert world.hub.http.post(f"{CODES}/{new['id']}/revoke", headers=patient).status_code == 200
    assert redeem(world, new["code"], "10.8.1.3").status_code == 403
    assert events(world, "access-code-revoke")


# -- acceptance 3: 50 parallel wrong guesses, limit 5 ----------------------------------------


def test_fifty_parallel_wrong_guesses_lock_the_code_after_exactly_five(world: World):
    made = issued(world, ["p1"])
    code, guess = made["code"], wrong(made["code"])
    start = threading.Barrier(50)

    def attempt(i: int) -> httpx.Response:
        start.wait()
        return redeem_alone(world, guess, f"10.7.0.{i}")  # 50 addresses: only the code limits

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(attempt, range(1, 51)))
    print(f"50 parallel wrong guesses answered in {time.monotonic() - started:.2f} s")
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {401: 5, 429: 45}, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert 1 <= int(answer.headers["retry-after"]) <= LOCK_SECONDS
            assert "locked" in answer.json()["error"]["message"]

    locked = redeem(world, code, "10.7.1.1")  # the right code, while locked
    assert locked.status_code == 429
    listed = world.hub.http.get(
        CODES,
        params={"patient": world.p},
        headers={"Authorization": f"Bearer {world.hub.operator}"},
    ).json()["codes"]
    mine = next(c for c in listed if c["id"] == made["id"])
    assert (mine["state"], mine["failures"], mine["lockouts"]) == ("locked", 5, 1)

    time.sleep(int(locked.headers["retry-after"]) + 0.2)
    assert redeem(world, code, "10.7.1.1").status_code == 200

    about = [e for e in events(world, "access-code-redeem") if made["id"] in e["outcomeDesc"]]
    assert Counter(e["outcome"] for e in about) == {"4": 51, "0": 1}
    lockouts = [e for e in events(world, "access-code-lockout") if made["id"] in e["outcomeDesc"]]
    assert len(lockouts) == 1


def redeem_alone(world: World, code: str, address: str) -> httpx.Response:
    """One attempt on its own connection (parallel callers)."""
    return httpx.post(
        f"{world.hub.url}{CODES}/redeem",
        json={"code": code},
        headers={"X-Forwarded-For": address},
        timeout=30,
    )


def test_one_address_is_limited_across_codes(world: World):
    code = issued(world, ["p1"])["code"]
    unknown = "0000-0000-0000-0000-0000"
    started = time.perf_counter()
    answers = [redeem(world, unknown, "10.6.0.1").status_code for _ in range(ADDRESS_LIMIT)]
    each = (time.perf_counter() - started) / ADDRESS_LIMIT * 1000
    print(f"a refused redemption (audited) takes {each:.1f} ms")
    assert answers == [401] * ADDRESS_LIMIT
    limited = redeem(world, code, "10.6.0.1")  # even the right code, from that address
    assert limited.status_code == 429
    assert 590 <= int(limited.headers["retry-after"]) <= 600
    assert "your address" in limited.json()["error"]["message"]
    assert redeem(world, code, "10.6.0.2").status_code == 200
    malformed = redeem(world, "hello", "10.6.0.3")
    assert malformed.status_code == 400


# -- operators: list and revoke (API and command line) ----------------------------------------


def test_operators_list_and_revoke_codes_without_ever_seeing_them(world: World):
    made = issued(world, ["p2"])

    def listing(token: str) -> httpx.Response:
        return world.hub.http.get(
            CODES,
            params={"patient": f"Patient/{world.p}"},
            headers={"Authorization": f"Bearer {token}"},
        )

    codes = listing(world.hub.operator).json()["codes"]
    mine = next(c for c in codes if c["id"] == made["id"])
    assert mine["state"] == "active"
    assert mine["verification"]["method"] == "photo-id"
    assert mine["verification"]["verified_by"] == "dr-org-a"
    assert mine["studies"] == [f"ImagingStudy/{world.id['p2']}"]
    assert "code" not in mine
    assert not any(c in str(codes) for c in ISSUED)
    assert listing(world.hub.clinician("org-b")).json()["codes"] == []  # not their codes
    assert listing(world.hub.clinician("org-a")).json()["codes"]
    stranger = world.hub.token("p-other", "patient", None, patient=world.q)
    assert listing(stranger).status_code == 403

    hub = world.hub.federation
    printed = hub.exchange("hub", "access-code", "list", "--patient", world.p)
    assert made["id"] in printed
    assert not any(c in printed for c in ISSUED)
    revoked = hub.exchange("hub", "access-code", "revoke", made["id"].lower(), "--by", "olu")
    assert revoked.strip() == f"access code {made['id']} revoked"
    assert redeem(world, made["code"], "10.5.0.1").status_code == 403
    missing = subprocess.run(
        [sys.executable, "-m", "exchange", "access-code", "revoke", "ZZZZ-ZZZZ"],
        env=hub.hub.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "exchange: error: no access code ZZZZ-ZZZZ"
    by_cli = [e for e in events(world, "access-code-revoke") if made["id"] in e["outcomeDesc"]]
    assert by_cli
    assert by_cli[0]["agent"][0]["who"]["identifier"]["value"] == "cli:olu"


# -- acceptance 4: never in clear, in the database or the log ---------------------------------


def test_the_hub_never_stores_or_logs_a_code_in_clear(world: World, federation: LocalFederation):
    assert len(ISSUED) >= 8
    forms = [
        f
        for code in ISSUED
        for f in (code, code.replace("-", ""), code[10:], code[10:].replace("-", ""))
    ]
    from sqlalchemy import MetaData

    from exchange.database import make_engine

    searched = 0
    # Every table of the hub's database, whichever it is (SQLite, or PostgreSQL in CI).
    engine = make_engine(federation.database_url("hub"))
    tables = MetaData()
    tables.reflect(engine)
    assert "access_code" in tables.tables
    with engine.connect() as conn:
        for table in tables.sorted_tables:
            columns = [c.name for c in table.columns]
            for row in conn.execute(table.select()):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    if not isinstance(value, str):
                        continue
                    searched += 1
                    upper = value.upper()
                    leaked = [f for f in forms if f in upper]
                    assert not leaked, f"{table.name}.{column} holds a code in clear"
    engine.dispose()
    assert searched > 100
    log = federation.hub.log_path.read_text(errors="replace").upper()
    assert not [f for f in forms if f in log]
    assert "intact" in federation.exchange("hub", "audit", "verify")


# -- the counter statement on PostgreSQL -----------------------------------------------------


@pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")
def test_parallel_wrong_guesses_are_counted_exactly_on_postgresql(tmp_path: Path):
    from exchange.database import make_engine

    with postgres_server() as url:
        engine = make_engine(url)
        try:
            limits = Limits(max_failures=5, address_failures=1000)
            codes = AccessCodes(engine, CodeKey.load_or_create(tmp_path / "key"), limits)
            now = codes.now_ms()
            text, info = codes.issue(
                patient="p",
                studies=["s"],
                organization="org-a",
                issued_by="dr",
                method="photo-id",
                verified_ms=now,
                expires_ms=now + 3_600_000,
            )
            guess = wrong(text)
            start = threading.Barrier(50)

            def attempt(i: int) -> str:
                start.wait()
                return codes.redeem(guess, f"10.4.0.{i}").outcome

            with ThreadPoolExecutor(max_workers=50) as pool:
                outcomes = Counter(pool.map(attempt, range(50)))
            assert outcomes == {"wrong": 5, "locked": 45}
            assert codes.get(info.id).failures == 5  # type: ignore[union-attr]

            key = CodeKey.load_or_create(tmp_path / "key")
            tight = AccessCodes(engine, key, Limits(address_failures=7))
            one = threading.Barrier(30)

            def from_one_address(_: int) -> str:
                one.wait()
                return tight.redeem("0000-0000-0000-0000-0000", "10.4.1.1").outcome

            with ThreadPoolExecutor(max_workers=30) as pool:
                limited = Counter(pool.map(from_one_address, range(30)))
            assert limited == {"unknown": 7, "address-limited": 23}
        finally:
            engine.dispose()
