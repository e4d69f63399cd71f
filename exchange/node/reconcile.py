"""``exchange node reconcile``: make the hub's index agree with what the node holds.

Per organisation (its tenants share one Endpoint at the hub) it lists the
node's studies (from the catalog) and the hub's studies held through that
Endpoint (``ImagingStudy?endpoint=…``, paged), then puts the differences in
the outbox: studies missing at the hub or with other series/instance counts
are published, studies the hub lists but the node no longer holds are
retracted, and rows the hub refused earlier are retried. The outbox is the one
path to the hub, so this is safe beside a running node (same database): its
worker delivers, or ``wait`` delivers here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from exchange.config import Settings
from exchange.dicom.imagingstudy import DICOM_UID
from exchange.errors import ConfigurationError, UpstreamError
from exchange.node import outbox
from exchange.node.catalog import InstanceRow
from exchange.node.outbox import FAILED, PENDING, Outbox
from exchange.node.publisher import (
    NODE_SYSTEM,
    HubClient,
    Publisher,
    Refused,
    Transient,
    endpoint_identifier,
    search_escape,
)
from exchange.node.store import InstanceStore

PAGE = 500
#: ``wait``: give up delivering after this long and say what is left.
WAIT_SECONDS = 300.0


@dataclass
class TenantReport:
    tenant: str
    organization: str
    here: int = 0
    at_hub: int = 0
    in_sync: int = 0
    published: int = 0
    retracted: int = 0
    failed: int = 0


@dataclass
class Report:
    dry_run: bool
    tenants: list[TenantReport] = field(default_factory=list)
    pending: int = 0
    failed_left: int = 0
    waited: bool = False

    def total(self, name: str) -> int:
        return sum(int(getattr(t, name)) for t in self.tenants)

    def lines(self) -> list[str]:
        verb = (
            ("would publish", "would retract", "would retry")
            if self.dry_run
            else (
                "published",
                "retracted",
                "failed (retried)",
            )
        )
        out = []
        for t in self.tenants:
            out.append(
                f"tenant {t.tenant} (organization {t.organization}): {_studies(t.here)} here, "
                f"{t.at_hub} at the hub; in sync {t.in_sync}, {verb[0]} {t.published}, "
                f"{verb[1]} {t.retracted}, {verb[2]} {t.failed}"
            )
        out.append(
            f"total: in sync {self.total('in_sync')}, {verb[0]} {self.total('published')}, "
            f"{verb[1]} {self.total('retracted')}, {verb[2]} {self.total('failed')}"
        )
        state = "left after delivering" if self.waited else "now"
        out.append(f"outbox {state}: {self.pending} pending, {self.failed_left} failed")
        if self.dry_run:
            out.append("dry run: nothing was changed")
        elif not self.waited and self.pending:
            out.append("the running node delivers them (or run again with --wait)")
        return out


def _studies(count: int) -> str:
    return f"{count} study" if count == 1 else f"{count} studies"


@dataclass(frozen=True)
class _Local:
    tenant: str
    key: str
    series: int
    instances: int


def _local_studies(engine: Engine, store: InstanceStore, tenant: str) -> dict[str, _Local]:
    """UID -> the tenant's study (its UID unsealed from one instance's attributes)."""
    statement = (
        select(
            InstanceRow.study_key,
            func.count(),
            func.count(func.distinct(InstanceRow.series_key)),
            func.min(InstanceRow.id),
        )
        .where(InstanceRow.tenant == tenant)
        .group_by(col(InstanceRow.study_key))
    )
    found: dict[str, _Local] = {}
    with Session(engine) as session:
        groups = list(session.exec(statement))
        for start in range(0, len(groups), PAGE):
            chunk = groups[start : start + PAGE]
            ids = [g[3] for g in chunk]
            rows = {
                r.id: r
                for r in session.exec(select(InstanceRow).where(col(InstanceRow.id).in_(ids)))
            }
            for key, instances, series, first in chunk:
                uid = store.view(rows[first]).study_uid
                found[uid] = _Local(tenant, key, int(series), int(instances))
    return found


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: InstanceStore,
        box: Outbox,
        hub: HubClient,
        publisher: Publisher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._store = store
        self._outbox = box
        self._hub = hub
        self._publisher = publisher
        self._clock = clock

    def _endpoint(self, tenant: str, organization: str) -> str | None:
        """The hub's id of the organisation's Endpoint, looked up (never written)."""
        value = endpoint_identifier(self._settings, organization)
        found = list(
            self._hub.pages(
                tenant, "Endpoint", {"identifier": f"{NODE_SYSTEM}|{search_escape(value)}"}
            )
        )
        return str(found[0]["id"]) if found else None

    def _hub_studies(self, tenant: str, endpoint: str) -> dict[str, tuple[int, int]]:
        """UID -> (series, instances) of the hub's studies held through ``endpoint``."""
        studies: dict[str, tuple[int, int]] = {}
        for study in self._hub.pages(
            tenant,
            "ImagingStudy",
            {
                "endpoint": f"Endpoint/{endpoint}",
                "_count": str(PAGE),
                "_elements": "identifier,numberOfSeries,numberOfInstances",
            },
        ):
            for identifier in study.get("identifier") or []:
                value = str(identifier.get("value", ""))
                if identifier.get("system") == DICOM_UID and value.startswith("urn:oid:"):
                    counts = (
                        int(study.get("numberOfSeries", -1)),
                        int(study.get("numberOfInstances", -1)),
                    )
                    studies[value.removeprefix("urn:oid:")] = counts
        return studies

    def run(self, *, dry_run: bool = False, wait: bool = False) -> Report:
        """Compare and queue the repairs; with ``wait``, deliver them before returning.

        Raises ``UpstreamError`` (one line) when the hub cannot be asked.
        """
        report = Report(dry_run=dry_run)
        by_org: dict[str, list[str]] = {}
        for tenant, config in self._settings.tenants.items():
            if self._hub.can_publish(tenant):
                by_org.setdefault(config.organization, []).append(tenant)
        if not by_org:
            raise ConfigurationError("no tenant of this node has a hub credential")
        try:
            for organization, tenants in by_org.items():
                report.tenants += self._organization(organization, tenants, dry_run)
        except Transient as exc:
            raise UpstreamError(f"the hub could not be reached: {exc}") from None
        except Refused as exc:
            raise UpstreamError(f"the hub refused the comparison: {exc}") from None
        if wait and not dry_run:
            self._deliver(list(self._settings.tenants))
            report.waited = True
        for t in report.tenants:
            depth = self._outbox.depth(t.tenant)
            report.pending += depth.pending
            report.failed_left += depth.failed
        return report

    def _organization(
        self, organization: str, tenants: list[str], dry_run: bool
    ) -> list[TenantReport]:
        reports = {t: TenantReport(t, organization) for t in tenants}
        local: dict[str, _Local] = {}
        for tenant in tenants:
            studies = _local_studies(self._engine, self._store, tenant)
            reports[tenant].here = len(studies)
            local.update(studies)  # a UID held by two tenants of one organisation: one entry
        first = tenants[0]
        endpoint = self._endpoint(first, organization)
        remote = self._hub_studies(first, endpoint) if endpoint else {}
        reports[first].at_hub = len(remote)
        publish: dict[str, dict[str, bytes]] = {}
        for uid, study in local.items():
            if remote.get(uid) == (study.series, study.instances):
                reports[study.tenant].in_sync += 1
                continue
            reports[study.tenant].published += 1
            seal = self._store.seal(study.tenant)
            publish.setdefault(study.tenant, {})[study.key] = outbox.seal_uid(seal, study.key, uid)
        retract: dict[str, bytes] = {}
        seal = self._store.seal(first)
        for uid in remote.keys() - local.keys():
            key = seal.blind("study", uid)
            retract[key] = outbox.seal_uid(seal, key, uid)
        reports[first].retracted = len(retract)
        for tenant in tenants:
            reports[tenant].failed = len(self._outbox.entries(tenant, FAILED))
        if not dry_run:
            for tenant in tenants:
                self._outbox.retry_failed(tenant)
                self._outbox.enqueue(tenant, publish.get(tenant, {}), outbox.PUBLISH)
            self._outbox.enqueue(first, retract, outbox.RETRACT)
        return list(reports.values())

    def _deliver(self, tenants: list[str]) -> None:
        """Deliver until nothing of ``tenants`` is pending (the node's worker may help)."""
        deadline = self._clock() + WAIT_SECONDS
        while self._clock() < deadline:
            if not any(e.state == PENDING for t in tenants for e in self._outbox.entries(t)):
                return
            wait = self._publisher.deliver_due()
            time.sleep(min(max(wait, 0.05), 1.0))
