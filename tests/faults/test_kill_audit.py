"""kill -9 of the hub at random points while concurrent audited requests run.

"No audit, no access": every request the hub answered 200 had its AuditEvent written
first, so after the restart each such request (one token ``sub`` a request) has its
AuditEvent, and ``exchange audit verify`` finds the chain intact.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading

import httpx
import pytest

from exchange.federation import LocalFederation
from tests import reliability
from tests.faults.harness import PUBLISHING, Site, Tally, seed

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SPEC = PUBLISHING
CLIENTS = 4


@pytest.fixture(scope="module")
def site(faults_federation: LocalFederation) -> Site:
    return Site(faults_federation, SPEC)


def _searcher(site: Site, prefix: str, answered: list[str], tally: Tally) -> None:
    """Audited searches, each by its own user, until the hub dies."""
    with httpx.Client(timeout=30) as client:
        for n in range(10_000):
            sub = f"{prefix}-{n}"
            token = site.idp.issue(sub=sub, role="clinician", org=SPEC.organization)
            try:
                answer = client.get(
                    f"{site.hub}/fhir/ImagingStudy",
                    params={"patient": f"Patient/{sub}"},
                    headers={"Authorization": f"Bearer {token}"},
                )
            except httpx.HTTPError:
                return
            if answer.status_code >= 500:
                tally.problem("server_errors", f"search answered {answer.status_code}")
            elif answer.status_code == 200:
                answered.append(sub)


def _audited_users(site: Site) -> set[str]:
    """Every user named as an agent of an AuditEvent in the hub's database."""
    path = site.federation.hub.data_dir / "exchange.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        bodies = conn.execute(
            "SELECT body FROM fhir_resource WHERE rtype = 'AuditEvent'"
        ).fetchall()
    users = set()
    for (body,) in bodies:
        for agent in json.loads(body).get("agent", []):
            value = agent.get("who", {}).get("identifier", {}).get("value")
            if value:
                users.add(value)
    return users


def _verify(site: Site, tally: Tally) -> None:
    try:
        out = site.federation.exchange("hub", "audit", "verify")
    except RuntimeError as exc:
        tally.problem("audit_gaps", str(exc)[-300:])
    else:
        if not out.startswith("audit chain intact: "):
            tally.problem("audit_gaps", out.strip())


def test_kill_9_of_the_hub_during_audited_requests_leaves_no_gap(site: Site) -> None:
    rng = random.Random(seed("faults:audit"))
    iterations = reliability.iterations(2, 50)
    tally = Tally()
    requests = 0
    try:
        for iteration in range(iterations):
            answered: list[str] = []
            clients = [
                threading.Thread(
                    target=_searcher, args=(site, f"fa{iteration}c{c}", answered, tally)
                )
                for c in range(CLIENTS)
            ]
            for client in clients:
                client.start()
            threading.Event().wait(rng.uniform(0.1, 1.5))
            site.federation.kill("hub")
            for client in clients:
                client.join(60)
            site.restart(tally, "hub")
            tally.inputs += 1
            requests += len(answered)
            print(f"iteration {iteration}: {len(answered)} audited requests answered")
            users = _audited_users(site)
            for sub in answered:
                if sub not in users:
                    tally.problem("audit_gaps", f"request by {sub} was answered without its audit")
            if reliability.full() or iteration == iterations - 1:  # a CLI run costs seconds
                _verify(site, tally)
    finally:
        reliability.report("faults:audit", **tally.figures(), requests=requests, kind="kill -9 hub")
    assert tally.problems == [], tally.problems
