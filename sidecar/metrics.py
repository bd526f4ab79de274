"""Prometheus metrics for the admin listener's /metrics.

Every label value comes from a fixed vocabulary: interaction names, FHIR R4
resource types, configured client ids, decisions, HTTP status codes, audit
kinds, alert kinds. Anything else is folded into "other" (and a missing value
into "none"), so neither an attacker nor a bug can mint series (unbounded
cardinality) or put an id or free text into the metrics (which leave the
PHI boundary). The class owns its own CollectorRegistry: no global state, so
tests and a config reload can build a fresh one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar.alerts import ALERT_KINDS
from sidecar.audit.record import KINDS as AUDIT_KINDS
from sidecar.classify import LETTERS
from sidecar.fhir.types import R4_RESOURCE_TYPES

__all__ = ["DECISIONS", "INTERACTIONS", "Metrics", "NONE", "OTHER"]

NONE, OTHER = "none", "other"
INTERACTIONS = frozenset(LETTERS) | {"operation", "batch", "transaction"}
DECISIONS = frozenset({"allow", "deny", "error", "review", "replay"})
_REVISION = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Seconds. The decision path is in-process (sub-ms to tens of ms with policy);
# the audit commit is one fsync; upstream calls are network round trips.
_DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_COMMIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _pick(value: object, vocabulary: frozenset[str]) -> str:
    if value is None or value == "":
        return NONE
    return value if isinstance(value, str) and value in vocabulary else OTHER


class Metrics:
    def __init__(self, clients: Iterable[str] = (), *, namespace: str = "fhir_sidecar") -> None:
        self._children: dict[tuple, Any] = {}
        self._kind_children: dict[str, Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self._clients = frozenset(clients)
        ns, r = namespace, self.registry
        self._requests = Counter(
            "requests", "Requests answered, by interaction, type, client, decision and status",
            ["interaction", "resource_type", "client", "decision", "status"], namespace=ns, registry=r)
        self._decision = Histogram("decision_seconds", "Time from request to decision (incl. audit)",
                                   namespace=ns, registry=r, buckets=_DECISION_BUCKETS)
        self._commit = Histogram("audit_commit_seconds", "Audit write + fsync per group commit",
                                 namespace=ns, registry=r, buckets=_COMMIT_BUCKETS)
        self._upstream = Histogram("upstream_seconds", "Upstream (EHR) response time",
                                   namespace=ns, registry=r, buckets=_UPSTREAM_BUCKETS)
        self._kill = Gauge("kill_switch_engaged", "1 while the global kill switch is engaged",
                           namespace=ns, registry=r)
        self._policy = Info("policy_revision", "Revision of the loaded policy bundle",
                            namespace=ns, registry=r)
        self._audit_records = Counter("audit_records", "Durable audit records, by kind", ["kind"],
                                      namespace=ns, registry=r)
        self._audit_bytes = Counter("audit_bytes", "Bytes written to the audit file",
                                    namespace=ns, registry=r)
        self._audit_failures = Counter("audit_fsync_failures", "Audit write/fsync failures (sticky)",
                                       namespace=ns, registry=r)
        self._would_deny = Counter("would_deny", "Shadow-mode policy denials not enforced",
                                   ["client"], namespace=ns, registry=r)
        self._alerts = Counter("alerts", "Anomaly alerts raised, by kind", ["kind"],
                               namespace=ns, registry=r)
        # Export the known series at zero, so a dashboard sees them before the first event.
        for kind in sorted(AUDIT_KINDS):
            self._audit_records.labels(kind=kind)
        for kind in sorted(ALERT_KINDS):
            self._alerts.labels(kind=kind)
        self._kill.set(0)

    # ------------------------------------------------------------ label folding

    def client_label(self, client_id: str | None) -> str:
        return _pick(client_id, self._clients)

    @staticmethod
    def status_label(status: int | None) -> str:
        if status is None:
            return NONE
        return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER

    # ------------------------------------------------------------------ events

    def record_request(self, *, interaction: str | None, resource_type: str | None,
                       client: str | None, decision: str | None, status: int | None) -> None:
        """One per answered request (reads, writes, refusals alike)."""
        key = (interaction, resource_type, client, decision, status)
        child = self._children.get(key)
        if child is None:  # label lookups are the cost of a counter: resolve each combination once
            child = self._requests.labels(
                interaction=_pick(interaction, INTERACTIONS),
                resource_type=_pick(resource_type, R4_RESOURCE_TYPES),
                client=self.client_label(client),
                decision=_pick(decision, DECISIONS),
                status=self.status_label(status),
            )
            if len(self._children) < 10_000:
                self._children[key] = child
        child.inc()

    def observe_decision(self, seconds: float) -> None:
        self._decision.observe(max(seconds, 0.0))

    def observe_upstream(self, seconds: float) -> None:
        self._upstream.observe(max(seconds, 0.0))

    def set_kill_switch(self, engaged: bool) -> None:
        self._kill.set(1 if engaged else 0)

    def set_policy_revision(self, revision: str | None) -> None:
        value = revision if isinstance(revision, str) and _REVISION.fullmatch(revision) else OTHER
        self._policy.info({"revision": NONE if revision is None else value})

    def would_deny(self, client: str | None) -> None:
        self._would_deny.labels(client=self.client_label(client)).inc()

    def alert(self, kind: str) -> None:
        self._alerts.labels(kind=_pick(kind, ALERT_KINDS)).inc()

    # ------------------------------------------- AuditWriter on_commit / on_failure

    def audit_commit(self, kinds: Mapping[str, int], nbytes: int, seconds: float) -> None:
        for kind, n in kinds.items():
            child = self._kind_children.get(kind)
            if child is None:  # one label lookup per kind, not per batch
                child = self._audit_records.labels(kind=_pick(kind, AUDIT_KINDS))
                if kind in AUDIT_KINDS:
                    self._kind_children[kind] = child
            child.inc(n)
        self._audit_bytes.inc(max(nbytes, 0))
        self._commit.observe(max(seconds, 0.0))

    def audit_failure(self) -> None:
        self._audit_failures.inc()

    # --------------------------------------------------------------- exposition

    content_type: str = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """Prometheus text exposition of this registry only."""
        return generate_latest(self.registry)
