"""Review-queue metrics on the sidecar's registry (`Metrics.registry`): no ids, no free text.

    fhir_sidecar_approvals_pending                   gauge: held writes waiting for a decision
    fhir_sidecar_approvals_oldest_pending_seconds    gauge: age of the oldest one
    fhir_sidecar_approvals_held_total                counter: writes held for review
    fhir_sidecar_approvals_decisions_total{decision} counter: approved | rejected | expired
    fhir_sidecar_approvals_decision_seconds{decision} histogram: time from hold to decision
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DECISIONS = ("approved", "rejected", "expired")
_BUCKETS = (30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200)


class ApprovalMetrics:
    def __init__(self, registry: CollectorRegistry, *, namespace: str = "fhir_sidecar") -> None:
        ns, r = namespace, registry
        self._pending = Gauge("approvals_pending", "Held writes waiting for a review decision", namespace=ns, registry=r)
        self._oldest = Gauge("approvals_oldest_pending_seconds", "Age of the oldest pending held write",
                             namespace=ns, registry=r)
        self._held = Counter("approvals_held", "Writes held for review", namespace=ns, registry=r)
        self._decisions = Counter("approvals_decisions", "Review decisions", ["decision"], namespace=ns, registry=r)
        self._seconds = Histogram("approvals_decision_seconds", "Time from hold to review decision", ["decision"],
                                  namespace=ns, registry=r, buckets=_BUCKETS)
        for d in DECISIONS:
            self._decisions.labels(decision=d)
            self._seconds.labels(decision=d)

    def held(self) -> None:
        self._held.inc()

    def decided(self, decision: str, seconds: float) -> None:
        if decision in DECISIONS:
            self._decisions.labels(decision=decision).inc()
            self._seconds.labels(decision=decision).observe(max(0.0, seconds))

    def set_pending(self, count: int, oldest_s: float) -> None:
        self._pending.set(count)
        self._oldest.set(max(0.0, oldest_s))
