"""Pipeline.finish step by step (with fakes), `needs_answer`, and the request model's header index."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.pipeline import Decision, Pipeline
from sidecar.request import RawRequest


def test_header_values_index() -> None:
    raw = RawRequest("GET", b"/", (("accept", "a"), ("x-b", "1"), ("accept", "b")), b"")
    assert raw.header_values("accept") == ["a", "b"] and raw.header_values("nope") == []
    got = raw.header_values("accept")
    got.append("mutated")  # a copy: the index is not the caller's to change
    assert raw.header_values("accept") == ["a", "b"]
    twin = RawRequest("GET", b"/", (("accept", "a"), ("x-b", "1"), ("accept", "b")), b"")
    assert raw == twin and hash(raw) == hash(twin) and "_index" not in repr(raw)
    changed = dataclasses.replace(raw, headers=(("accept", "z"),))
    assert changed.header_values("accept") == ["z"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.method = "POST"  # type: ignore[misc]


class _Rec:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str) -> Any:
        async def step(*a: Any, **kw: Any) -> Any:
            self.calls.append((name, a, kw))
            return True
        return step


def _pipeline() -> tuple[Pipeline, SimpleNamespace, list[dict]]:
    records: list[dict] = []
    cred = SimpleNamespace(invalidated=0)
    cred.invalidate = lambda: setattr(cred, "invalidated", cred.invalidated + 1)
    svc = SimpleNamespace(breaker=_Rec(), backoff=_Rec(), idempotency=_Rec(), credentials={"app": cred},
                          metrics=SimpleNamespace(record_request=lambda **kw: None, observe_upstream=lambda s: None),
                          alerts=SimpleNamespace(observe=lambda e: []), webhook=None)
    svc.idempotency.make_receipt = lambda *a: "receipt"
    p = Pipeline.__new__(Pipeline)
    p.svc = svc
    p.rt = SimpleNamespace(policy=None, pseudonym_key=b"k" * 32)

    async def record(fields: dict) -> None:
        records.append(fields)
    p._record = record  # type: ignore[method-assign]
    return p, svc, records


def _decision(write: bool, reservation: Any = None) -> Decision:
    req = SimpleNamespace(correlation_id="c" * 16, traceparent="", method="POST" if write else "GET",
                          target=SimpleNamespace(resource_type="Observation", id=None))
    cls = SimpleNamespace(is_write=write, interaction="create" if write else "read")
    who = SimpleNamespace(client_id="app", tenant=None)
    return Decision("c" * 16, "", 0.0, None, req, cls, who, reservation=reservation)


RAW = RawRequest("GET", b"/", (), b"", client_addr="127.0.0.1")


async def test_finish_a_read() -> None:
    p, svc, records = _pipeline()
    d = _decision(False)
    assert not Pipeline.needs_answer(d, 200)
    await p.finish(d, 200, RAW)
    assert [c[0] for c in svc.breaker.calls] == ["record"] and not svc.backoff.calls and not svc.idempotency.calls
    (rec,) = records
    assert rec["kind"] == "read" and rec["upstream_status"] == 200 and "outcome" not in rec


async def test_finish_a_write_with_a_receipt_and_back_off() -> None:
    p, svc, records = _pipeline()
    held = SimpleNamespace(key="k", token="t")
    d = _decision(True, reservation=held)
    assert Pipeline.needs_answer(d, 201) and Pipeline.needs_answer(_decision(True), 503)
    await p.finish(d, 503, RAW, headers=(("Retry-After", "7"),), body=b"x")
    assert [c[0] for c in svc.backoff.calls] == ["record"] and svc.backoff.calls[0][1] == (503, "7")
    assert [c[0] for c in svc.idempotency.calls] == ["release"]  # 503 + Retry-After: refused, key free again
    (rec,) = records
    assert rec["kind"] == "outcome" and rec["outcome"] == "failed"


async def test_finish_a_write_receipt_is_complete_on_201() -> None:
    p, svc, records = _pipeline()
    held = SimpleNamespace(key="k", token="t")
    await p.finish(_decision(True, reservation=held), 201, RAW, headers=(("Location", "x"),), body=b"{}")
    assert [c[0] for c in svc.idempotency.calls] == ["complete"] and not svc.backoff.calls


async def test_finish_steps_that_fail_are_logged_not_raised() -> None:
    p, svc, records = _pipeline()

    async def boom(*a: Any, **kw: Any) -> None:
        raise RuntimeError("state store down")
    svc.breaker = SimpleNamespace(record=boom)
    await p.finish(_decision(True), 201, RAW)
    assert records and records[0]["outcome"] == "committed"


async def test_finish_after_a_client_left_and_on_401() -> None:
    p, svc, records = _pipeline()
    await p.finish(_decision(False), None, RAW, outcome="unknown", upstream_failed=False)
    assert not svc.breaker.calls  # a client that went away says nothing about the EHR
    await p.finish(_decision(False), 401, RAW)
    assert svc.credentials["app"].invalidated == 1
