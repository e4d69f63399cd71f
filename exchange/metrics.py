"""Prometheus metrics of one process (hub or node), served at ``/metrics``.

Labels name routes by their template, actions, outcomes and sites, never a
patient, a UID or a query: the label sets stay small and carry no PHI. Every
module below ``hub``/``node`` may count here (it imports only prometheus_client).
Gauges that need a database read (audit chain length, outbox depth) are
refreshed when ``/metrics`` is read, not on the request path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The process's metrics; a registry of our own keeps library defaults out of tests.
REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "exchange_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "exchange_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RETRIEVAL_BYTES = Counter(
    "exchange_retrieval_bytes",
    "Bytes of successful DICOMweb answers sent (broker: relayed; node: served).",
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "exchange_rate_limited",
    "Requests refused with 429 by the rate limiter, by which bucket was empty.",
    ["bucket"],
    registry=REGISTRY,
)
BROKER_STREAMS = Gauge(
    "exchange_broker_streams",
    "Broker calls to nodes open now (answers being relayed included).",
    registry=REGISTRY,
)
BROKER_STREAMS_REFUSED = Counter(
    "exchange_broker_streams_refused",
    "Broker requests refused because a concurrency limit was reached.",
    ["limit"],
    registry=REGISTRY,
)
BROKER_BYTES = Counter(
    "exchange_broker_bytes",
    "Bytes of node answers relayed by the broker, by site (node id).",
    ["node"],
    registry=REGISTRY,
)
POLICY_DECISIONS = Counter(
    "exchange_policy_decisions",
    "Policy decisions, by action and outcome (allow or deny).",
    ["action", "outcome"],
    registry=REGISTRY,
)
AUDIT_RECORDS = Counter(
    "exchange_audit_records",
    "AuditEvents durably written to the hash chain.",
    registry=REGISTRY,
)
AUDIT_CHAIN_LENGTH = Gauge(
    "exchange_audit_chain_length",
    "Records in the audit hash chain (its head's sequence number).",
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "exchange_outbox_depth",
    "Node outbox rows by state (pending: to be sent; failed: parked).",
    ["state"],
    registry=REGISTRY,
)
OUTBOX_DELIVERIES = Counter(
    "exchange_outbox_deliveries",
    "Outbox deliveries to the hub by result (done, retry, failed).",
    ["result"],
    registry=REGISTRY,
)


def count_decisions(action: str, allowed: int, denied: int) -> None:
    """Count a batch of policy decisions about ``action``."""
    if allowed:
        POLICY_DECISIONS.labels(action, "allow").inc(allowed)
    if denied:
        POLICY_DECISIONS.labels(action, "deny").inc(denied)
