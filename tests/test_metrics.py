"""Metrics: expected series, own registry, label values only from the vocabularies."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sidecar.alerts import ALERT_KINDS
from sidecar.audit import AuditWriter
from sidecar.audit.record import KINDS as AUDIT_KINDS
from sidecar.classify import LETTERS
from sidecar.fhir.types import R4_RESOURCE_TYPES
from sidecar.metrics import DECISIONS, INTERACTIONS, Metrics

CLIENTS = ("scribe-app", "legacy-lab-feed")


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m).get((name, tuple(sorted(labels.items()))), 0.0)


def test_expected_series_are_exposed() -> None:
    m = Metrics(CLIENTS)
    m.record_request(interaction="update", resource_type="Observation", client="scribe-app",
                     decision="allow", status=200)
    m.observe_decision(0.003)
    m.observe_upstream(0.2)
    m.set_kill_switch(True)
    m.set_policy_revision("sha256:abc123")
    m.audit_commit({"intent": 2, "read": 1}, 900, 0.002)
    m.audit_failure()
    m.would_deny("scribe-app")
    m.alert("denial_burst")
    text = m.render().decode()
    names = {fam.name for fam in text_string_to_metric_families(text)}
    for n in ("requests", "decision_seconds", "audit_commit_seconds", "upstream_seconds",
              "kill_switch_engaged", "policy_revision_info", "audit_records", "audit_bytes",
              "audit_fsync_failures", "would_deny", "alerts"):
        assert f"fhir_sidecar_{n}" in names, n
    assert value(m, "fhir_sidecar_requests_total", interaction="update", resource_type="Observation",
                 client="scribe-app", decision="allow", status="200") == 1
    assert value(m, "fhir_sidecar_decision_seconds_count") == 1
    assert value(m, "fhir_sidecar_upstream_seconds_count") == 1
    assert value(m, "fhir_sidecar_audit_commit_seconds_count") == 1
    assert value(m, "fhir_sidecar_kill_switch_engaged") == 1
    assert value(m, "fhir_sidecar_policy_revision_info", revision="sha256:abc123") == 1
    assert value(m, "fhir_sidecar_audit_records_total", kind="intent") == 2
    assert value(m, "fhir_sidecar_audit_records_total", kind="outcome") == 0   # pre-created at 0
    assert value(m, "fhir_sidecar_audit_bytes_total") == 900
    assert value(m, "fhir_sidecar_audit_fsync_failures_total") == 1
    assert value(m, "fhir_sidecar_would_deny_total", client="scribe-app") == 1
    assert value(m, "fhir_sidecar_alerts_total", kind="denial_burst") == 1
    m.set_kill_switch(False)
    assert value(m, "fhir_sidecar_kill_switch_engaged") == 0
    assert m.content_type.startswith("text/plain")


def test_own_registry_not_the_global_one() -> None:
    a, b = Metrics(CLIENTS), Metrics(CLIENTS)      # two instances: no duplicate-series error
    a.alert("off_hours")
    assert value(b, "fhir_sidecar_alerts_total", kind="off_hours") == 0
    assert REGISTRY.get_sample_value("fhir_sidecar_alerts_total", {"kind": "off_hours"}) is None


def test_labels_never_leave_the_vocabularies() -> None:
    m = Metrics(CLIENTS)
    hostile = ["Patient/123", "John Smith", "../../etc", "a" * 300, "scribe-app\n", "", None,
               "eyJhbGciOi.x.y", "observation", "Resource", "DomainResource"]
    for h in hostile:
        m.record_request(interaction=h, resource_type=h, client=h, decision=h, status=200)
        m.would_deny(h)
        m.alert(h or "x")
        m.audit_commit({h or "x": 1}, 1, 0.0)
    for status in (None, 0, 99, 600, 10_000, 404):
        m.record_request(interaction="read", resource_type="Patient", client="scribe-app",
                         decision="deny", status=status)
    m.set_policy_revision("rev with spaces\nand a newline")
    allowed = {
        "interaction": INTERACTIONS | {"none", "other"},
        "resource_type": R4_RESOURCE_TYPES | {"none", "other"},
        "client": set(CLIENTS) | {"none", "other"},
        "decision": DECISIONS | {"none", "other"},
        "status": {str(s) for s in range(100, 600)} | {"none", "other"},
        "kind": AUDIT_KINDS | ALERT_KINDS | {"none", "other"},
        "revision": {"other", "none"},
        "le": None,                                  # histogram buckets: numbers
    }
    seen_statuses = set()
    for (name, labels), _ in samples(m).items():
        for k, v in labels:
            assert k in allowed, (name, k)
            if allowed[k] is not None:
                assert v in allowed[k], (name, k, v)
            if k == "status":
                seen_statuses.add(v)
    assert seen_statuses == {"200", "404", "none", "other"}
    assert value(m, "fhir_sidecar_requests_total", interaction="other", resource_type="other",
                 client="other", decision="other", status="200") == 9
    assert value(m, "fhir_sidecar_policy_revision_info", revision="other") == 1


def test_interaction_vocabulary_covers_the_classifier() -> None:
    assert set(LETTERS) <= INTERACTIONS
    assert {"operation", "batch", "transaction"} <= INTERACTIONS


async def test_audit_writer_hooks_feed_metrics(tmp_path: Path) -> None:
    m = Metrics(CLIENTS)
    w = AuditWriter(tmp_path / "audit.jsonl", {"k1": b"1" * 32}, "k1",
                    on_commit=m.audit_commit, on_failure=m.audit_failure)
    await w.start()
    await w.append({"kind": "intent"})
    await w.append({"kind": "outcome", "outcome": "committed"})
    await w.close()
    assert value(m, "fhir_sidecar_audit_records_total", kind="intent") == 1
    assert value(m, "fhir_sidecar_audit_records_total", kind="checkpoint") == 1
    assert value(m, "fhir_sidecar_audit_bytes_total") == (tmp_path / "audit.jsonl").stat().st_size
    assert value(m, "fhir_sidecar_audit_commit_seconds_count") == w.stats.commits


def test_audit_commit_counts_add_up_per_kind() -> None:
    m = Metrics(CLIENTS)
    for _ in range(3):
        m.audit_commit({"read": 2, "intent": 1, "Patient/123": 1}, 100, 0.001)
    assert value(m, "fhir_sidecar_audit_records_total", kind="read") == 6
    assert value(m, "fhir_sidecar_audit_records_total", kind="intent") == 3
    assert value(m, "fhir_sidecar_audit_records_total", kind="other") == 3
    assert value(m, "fhir_sidecar_audit_bytes_total") == 300
    assert value(m, "fhir_sidecar_audit_commit_seconds_count") == 3
    assert "Patient/123" not in m._kind_children  # only the vocabulary is remembered
