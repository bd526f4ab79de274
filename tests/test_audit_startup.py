"""Start-up: unanswered intents become `outcome: unknown`; key rotation; writer hooks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import pytest

from sidecar.audit import AuditWriter, chain_files, pseudonym, verify_files
from sidecar.audit.record import audit_user, pseudonymize

SECRETS = {"k1": b"1" * 32, "k2": b"2" * 32}
PKEY = b"p" * 32


def records(path: str | Path) -> list[dict[str, Any]]:
    """Parsed records, skipping torn fragments."""
    out = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            pass
    return out


async def make(path: Path, key_id: str = "k1", secrets: dict[str, bytes] | None = None,
               **kw: Any) -> AuditWriter:
    w = AuditWriter(path, secrets or {"k1": SECRETS["k1"]}, key_id, **kw)
    await w.start()
    return w


def intent(cid: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "intent", "correlation_id": cid, "client_id": "scribe-app", "method": "PUT",
            "interaction": "update", "resource_type": "Observation", "decision": "allow",
            "resource_id": pseudonym(PKEY, "resource", "Observation/9"),
            "patient": pseudonym(PKEY, "patient", "123"), "tenant": "clinic-a", **extra}


def outcome(cid: str, status: int = 200) -> dict[str, Any]:
    return {"kind": "outcome", "correlation_id": cid, "outcome": "committed",
            "upstream_status": status, "client_id": "scribe-app"}


def unknowns(path: Path) -> list[dict[str, Any]]:
    return [r for r in records(path) if r["kind"] == "outcome" and r.get("outcome") == "unknown"]


async def test_intent_without_outcome_gets_unknown_outcome_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append(intent("c-answered"))
    await w.append(outcome("c-answered"))
    crashed = await w.append(intent("c-crashed", idempotency_key="idem-1"))
    await w.append({"kind": "read", "correlation_id": "c-read"})
    await w.close()

    w = await make(path)
    assert w.stats.unknown_outcomes == 1
    await w.close()
    [u] = unknowns(path)
    assert u["seq"] > crashed["seq"]
    for k in ("correlation_id", "client_id", "interaction", "resource_type", "method", "tenant",
              "resource_id", "patient", "idempotency_key"):
        assert u[k] == crashed[k], k
    assert u["reasons"] == ["no outcome recorded before restart"]
    assert "decision" not in u and "upstream_status" not in u
    assert verify_files([str(path)], SECRETS).code == 0

    w = await make(path)                     # a second restart does not repeat it
    assert w.stats.unknown_outcomes == 0
    await w.close()
    assert len(unknowns(path)) == 1


async def test_reused_correlation_id_pairs_with_the_nearest_intent(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append(intent("same-id"))
    await w.append(outcome("same-id"))
    second = await w.append(intent("same-id", method="POST"))
    await w.close()
    w = await make(path)
    await w.close()
    [u] = unknowns(path)
    assert u["method"] == "POST" and second["method"] == "POST"


async def test_unknown_outcomes_in_chain_order_and_durable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    for i in range(5):
        await w.append(intent(f"c{i}"))
    await w.append(outcome("c2"))
    await w.close()
    w = await make(path)
    # start() returned: the unknown outcomes are already on disk
    assert [u["correlation_id"] for u in unknowns(path)] == ["c0", "c1", "c3", "c4"]
    await w.close()


async def test_scan_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append(intent("old"))
    for _ in range(10):
        await w.append({"kind": "read"})
    await w.append(intent("recent"))
    await w.close()
    w = await make(path, unknown_scan_records=5)
    await w.close()
    assert [u["correlation_id"] for u in unknowns(path)] == ["recent"]
    w = await make(path, unknown_scan_records=0)     # disabled
    await w.close()
    assert len(unknowns(path)) == 1


async def test_intent_in_the_rotated_file_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path, max_bytes=200)
    await w.append(intent("before-rotation"))        # > 200 bytes: the file rotates after it
    await w.close()
    assert len(chain_files(path)) == 2
    w = await make(path)
    await w.close()
    assert [u["correlation_id"] for u in unknowns(path)] == ["before-rotation"]
    assert verify_files(chain_files(path), SECRETS).code == 0


async def test_other_chains_intents_are_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path, chain="b")
    await w.append(intent("chain-b"))
    await w.close()
    w = await make(path, chain="a")
    await w.close()
    assert unknowns(path) == []


async def test_torn_tail_and_unknown_outcome_together(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path)
    await w.append(intent("c-torn"))
    await w.close()
    with open(path, "ab") as f:
        f.write(b'{"v":1,"chain":"main","seq":3,"kind":"outcome"')    # died mid-line
    w = await make(path)
    await w.close()
    kinds = [(r["kind"], r.get("outcome")) for r in records(path)]
    assert kinds[2:] == [("admin", None), ("outcome", "unknown"), ("checkpoint", None)]
    assert verify_files([str(path)], SECRETS).code == 0


async def test_key_rotation_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = await make(path, "k1")
    await w.append({"kind": "read"})
    await w.close()
    old_tip = records(path)[-1]

    w = await make(path, "k2", SECRETS)                 # audit.keys {k1, k2}, audit.active k2
    rec = await w.append({"kind": "read"})
    await w.close()
    recs = records(path)
    admin = recs[-3]
    assert admin["kind"] == "admin" and admin["key_id"] == "k2"
    assert admin["prev"] == old_tip["hash"] and admin["seq"] == old_tip["seq"] + 1
    assert admin["reasons"] == ["key-rotation", "previous key_id k1"]
    assert rec["key_id"] == "k2" and rec["prev"] == admin["hash"]

    assert verify_files([str(path)], SECRETS).code == 0
    only_new = verify_files([str(path)], {"k2": SECRETS["k2"]})
    assert (only_new.code, only_new.first_bad_seq) == (1, 1)
    only_old = verify_files([str(path)], {"k1": SECRETS["k1"]})
    assert (only_old.code, only_old.first_bad_seq) == (1, admin["seq"])

    w = await make(path, "k2", SECRETS)                 # same key again: nothing to note
    await w.close()
    assert sum(1 for r in records(path) if r["kind"] == "admin") == 1


async def test_old_key_must_stay_configured(tmp_path: Path) -> None:
    from sidecar.audit import AuditUnavailable
    path = tmp_path / "audit.jsonl"
    w = await make(path, "k1")
    await w.append({"kind": "read"})
    await w.close()
    w = AuditWriter(path, {"k2": SECRETS["k2"]}, "k2")  # k1 dropped from audit.keys too early
    with pytest.raises(AuditUnavailable, match="not configured"):
        await w.start()


async def test_commit_hook_and_stats(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    commits: list[tuple[Mapping[str, int], int, float]] = []
    w = await make(path, on_commit=lambda k, b, s: commits.append((k, b, s)))
    await w.append(intent("c1"))
    await w.append({"kind": "read"}, durable=False)
    await w.append(outcome("c1"))
    await w.close()
    kinds: dict[str, int] = {}
    for k, _, s in commits:
        assert s >= 0
        for name, n in k.items():
            kinds[name] = kinds.get(name, 0) + n
    assert kinds == {"intent": 1, "read": 1, "outcome": 1, "checkpoint": 1}
    assert sum(b for _, b, _ in commits) == os.path.getsize(path) == w.stats.bytes
    assert dict(w.stats.records) == kinds and w.stats.commits == len(commits)


async def test_a_failing_hook_does_not_break_the_writer(tmp_path: Path) -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("observer bug")

    w = await make(tmp_path / "audit.jsonl", on_commit=boom, on_checkpoint=boom)
    await w.append({"kind": "read"})
    assert w.healthy
    await w.close()


def test_pseudonym_helpers() -> None:
    assert pseudonymize is pseudonym
    p = pseudonymize(PKEY, "patient", "123")
    assert p.startswith("p:") and p == pseudonym(PKEY, "patient", "123")
    assert p != pseudonym(PKEY, "resource", "123")
    assert audit_user(PKEY, "Practitioner/7") == "Practitioner/7"
    assert audit_user(PKEY, "https://ehr.example.org/fhir/R4/PractitionerRole/a.1") == "PractitionerRole/a.1"
    assert audit_user(PKEY, "Patient/123") == pseudonym(PKEY, "user", "Patient/123")
    assert audit_user(PKEY, "RelatedPerson/5").startswith("p:")
    assert audit_user(PKEY, "Practitioner/7/../Patient/1").startswith("p:")
    assert audit_user(PKEY, None) is None
