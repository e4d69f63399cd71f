"""kill -9 of the node or of the hub at random points while the node's outbox publishes.

After the restart the outbox delivers everything the node acknowledged, each study
appears once at the hub with all its instances, and ``exchange node reconcile
--dry-run`` finds nothing to repair: the hub's index equals the node's store.
"""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from exchange.federation import LocalFederation
from tests import reliability
from tests.dicomdata import generated
from tests.faults.harness import PUBLISHING, Site, Tally, eventually, seed, study_uid

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SPEC = PUBLISHING
CLEAN = "would publish 0, would retract 0, would retry 0"


@pytest.fixture(scope="module")
def site(faults_federation: LocalFederation) -> Site:
    return Site(faults_federation, SPEC)


def _publisher(
    site: Site, studies: list[list[bytes]], acknowledged: dict[str, int], tally: Tally
) -> None:
    """Store one study a request, each new study a new publication, until the node dies."""
    with httpx.Client(timeout=60) as client:
        for study in studies:
            try:
                answer = site.stow(client, study)
            except httpx.HTTPError:
                return
            if answer.status_code >= 500:
                tally.problem("server_errors", f"STOW-RS answered {answer.status_code}")
            if answer.status_code == 200:
                acknowledged[study_uid(study[0])] = len(study)


def _published(site: Site, expected: dict[str, int], confirmed: set[str]) -> bool:
    """The hub has every acknowledged study once, with its instances, and the outbox is empty.

    Studies seen whole before are not asked for again (the final reconcile covers them).
    """
    if site.outbox()["pending"]:
        return False
    for uid, count in expected.items():
        if uid in confirmed:
            continue
        found = site.hub_studies(uid)
        if len(found) != 1 or found[0].get("numberOfInstances") != count:
            return False
        confirmed.add(uid)
    return True


def test_kill_9_of_node_or_hub_while_publishing_delivers_everything(site: Site) -> None:
    rng = random.Random(seed("faults:publishing"))
    iterations = reliability.iterations(2, 50)
    tally = Tally()
    expected: dict[str, int] = {}
    confirmed: set[str] = set()
    try:
        for iteration in range(iterations):
            victim = "hub" if iteration % 2 else SPEC.node_id
            studies = [
                generated(
                    patient_id=f"FP-{iteration % 3}", accession=f"FP-{iteration}-{n}", slices=2
                )
                for n in range(6)
            ]
            acknowledged: dict[str, int] = {}
            sender = threading.Thread(target=_publisher, args=(site, studies, acknowledged, tally))
            sender.start()
            threading.Event().wait(rng.uniform(0.05, 1.0))
            site.federation.kill(victim)
            sender.join(60)  # with the hub down, the node goes on storing (and queueing)
            started = time.monotonic()
            site.restart(tally, victim)
            restarted = time.monotonic()
            tally.inputs += 1
            print(f"iteration {iteration}: killed {victim}, {len(acknowledged)} of 6 acknowledged")
            expected.update(acknowledged)
            try:
                eventually(
                    lambda: _published(site, expected, confirmed),
                    "the outbox delivered",
                    timeout=60,
                )
            except AssertionError:
                missing = [u for u, n in expected.items() if len(site.hub_studies(u)) != 1]
                for uid in missing:
                    tally.problem("lost", f"study {uid} was acknowledged but is not at the hub")
                if not missing:
                    tally.problem("lost", f"the outbox did not drain: {site.outbox()}")
            print(
                f"  restart {restarted - started:.1f} s, "
                f"delivered in {time.monotonic() - restarted:.1f} s"
            )
        # Once at the end (a CLI run costs seconds): the hub's index equals the node's store.
        dry = site.federation.exchange(SPEC.node_id, "node", "reconcile", "--dry-run")
        if CLEAN not in dry:
            tally.problem("lost", f"reconcile found differences: {dry.strip()}")
    finally:
        reliability.report("faults:publishing", **tally.figures(), kind="kill -9 node or hub")
    assert tally.problems == [], tally.problems
