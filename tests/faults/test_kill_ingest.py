"""kill -9 at random points of node ingest: bulk STOW-RS (the node killed) and
``exchange import`` (the importing process killed).

After each kill: every instance the node acknowledged is served byte for byte, nothing
is visible that is not whole (QIDO lists exactly what WADO serves), and sending again
completes the rest with nothing rejected.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from exchange.federation import LocalFederation
from tests import reliability
from tests.dicomdata import generated
from tests.faults.harness import INGEST, Site, Tally, seed, sop_uid, study_uid

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SPEC = INGEST
#: Instances a STOW-RS request (bulk), per sending client.
BATCH = 5
CLIENTS = 2


@pytest.fixture(scope="module")
def site(faults_federation: LocalFederation) -> Site:
    return Site(faults_federation, SPEC)


def _sender(site: Site, items: list[bytes], acknowledged: list[str], tally: Tally) -> None:
    """Bulk STOW-RS until done or the node dies; keep only what the node acknowledged."""
    with httpx.Client(timeout=60) as client:
        for start in range(0, len(items), BATCH):
            try:
                answer = site.stow(client, items[start : start + BATCH])
            except httpx.HTTPError:
                return  # the node died under us: nothing unacknowledged is promised
            if answer.status_code >= 500:
                tally.problem("server_errors", f"STOW-RS answered {answer.status_code}")
            if answer.status_code in (200, 202):
                stored = answer.json().get("00081199", {}).get("Value", [])
                acknowledged.extend(item["00081155"]["Value"][0] for item in stored)


def test_kill_9_during_bulk_stow_loses_nothing_acknowledged(site: Site) -> None:
    rng = random.Random(seed("faults:ingest-stow"))
    iterations = reliability.iterations(2, 50)
    tally = Tally()
    try:
        for iteration in range(iterations):
            studies = [
                generated(patient_id=f"FI-{iteration}", accession=f"FI-{iteration}-{c}", slices=20)
                for c in range(CLIENTS)
            ]
            originals = {sop_uid(d): d for study in studies for d in study}
            acknowledged: list[str] = []
            senders = [
                threading.Thread(target=_sender, args=(site, study, acknowledged, tally))
                for study in studies
            ]
            for sender in senders:
                sender.start()
            # 0-0.4 s: with 0-0.8 s, 36 of 50 kills came after the last acknowledgement.
            threading.Event().wait(rng.uniform(0.0, 0.4))
            site.federation.kill(SPEC.node_id)
            for sender in senders:
                sender.join(60)
            site.restart(tally, SPEC.node_id)
            tally.inputs += 1
            print(
                f"iteration {iteration}: {len(set(acknowledged))} of {len(originals)} acknowledged"
            )
            uids = [study_uid(study[0]) for study in studies]
            site.check_intact(tally, originals, uids, acknowledged)

            # Sending everything again completes the rest: nothing is refused as a conflict.
            with httpx.Client(timeout=60) as client:
                for study in studies:
                    answer = site.stow(client, study)
                    if answer.status_code != 200:
                        tally.problem("lost", f"re-sending answered {answer.status_code}")
            served = site.check_intact(tally, originals, uids, originals)
            assert len(served) == len(originals)
    finally:
        reliability.report("faults:ingest", **tally.figures(), kind="kill -9 node during STOW-RS")
    assert tally.problems == [], tally.problems


def test_kill_9_during_exchange_import_shows_nothing_half_written(
    site: Site, tmp_path: Path
) -> None:
    rng = random.Random(seed("faults:ingest-import"))
    iterations = reliability.iterations(2, 50)
    tally = Tally()
    env = site.federation.node(SPEC.node_id).env
    try:
        for iteration in range(iterations):
            folder = tmp_path / f"import{iteration}"
            folder.mkdir()
            data = generated(patient_id=f"FM-{iteration}", accession=f"FM-{iteration}", slices=60)
            originals = {}
            for index, item in enumerate(data):
                (folder / f"{index:03}.dcm").write_bytes(item)
                originals[sop_uid(item)] = item
            uid = study_uid(data[0])
            command = [sys.executable, "-m", "exchange", "import", str(folder)]
            process = subprocess.Popen(
                [*command, "--tenant", SPEC.tenant, "--quiet"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                process.wait(rng.uniform(0.2, 1.8))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            _out, err = process.communicate(60)
            if process.returncode not in (0, -signal.SIGKILL):
                tally.problem("crashes", f"import exited {process.returncode}: {err[-300:]!r}")
            tally.inputs += 1
            print(f"iteration {iteration}: import exited {process.returncode}")
            # Nothing is acknowledged by a killed import; what is visible must be whole.
            site.check_intact(tally, originals, [uid], [])
            summary = site.federation.import_into(SPEC.node_id, folder)
            if f"{len(data)} files:" not in summary or "0 rejected" not in summary:
                tally.problem("lost", f"re-import: {summary.strip()}")
            served = site.check_intact(tally, originals, [uid], originals)
            assert len(served) == len(originals)
    finally:
        reliability.report("faults:ingest", **tally.figures(), kind="kill -9 exchange import")
    assert tally.problems == [], tally.problems
