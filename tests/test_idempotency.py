"""Idempotency-Key receipts on both backends: replay, 422, 409, unknown -> resolve, client
isolation, lease expiry with a refused stale `complete`, and a 50-way race over two stores."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.errors import Refusal
from sidecar.idempotency import (Conflict, Idempotency, Mismatch, Receipt, Replay, Reserved, disposition,
                                 fingerprint, parse_key, request_fingerprint)
from sidecar.request import FhirRequest, Target
from sidecar.state import StateUnavailable
from tests.redis_server import redis_server, store_factory  # noqa: F401  (fixtures)

KEY = "order-2026-11-25:0001"
BODY = b'{"resourceType":"Observation","status":"final"}'
FP = fingerprint("POST", "/Observation", {"content-type": "application/fhir+json"}, BODY)


def receipt(status: int = 201, body: bytes = b'{"resourceType":"Observation","id":"9"}') -> Receipt:
    return Receipt.of(status, [("Location", "http://sc/fhir/R4/Observation/9/_history/1"), ("ETag", 'W/"1"'),
                               ("Last-Modified", "Wed, 25 Nov 2026 13:00:00 GMT"),
                               ("Content-Type", "application/fhir+json"), ("Set-Cookie", "x=y")],
                      body, "corr-00000001")


async def test_replay_same_key_same_body(store_factory) -> None:
    a, b = Idempotency(store_factory()), Idempotency(store_factory())
    r = await a.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    assert await a.complete("app", KEY, r.token, receipt())
    again = await b.lookup_or_reserve("app", KEY, FP)            # another replica sees the receipt
    assert isinstance(again, Replay)
    rc = again.receipt
    assert rc.status == 201 and rc.body == b'{"resourceType":"Observation","id":"9"}'
    assert rc.correlation_id == "corr-00000001"
    names = [k for k, _ in rc.response_headers()]
    assert names == ["Location", "ETag", "Last-Modified", "Content-Type", "Idempotent-Replayed"]  # no Set-Cookie
    assert not await a.complete("app", KEY, r.token, receipt(500))  # done: no second completion


async def test_same_key_different_request_is_422(store_factory) -> None:
    idem = Idempotency(store_factory())
    r = await idem.lookup_or_reserve("app", KEY, FP)
    other = fingerprint("POST", "/Observation", {}, BODY.replace(b"final", b"amended"))
    m = await idem.lookup_or_reserve("app", KEY, other)
    assert isinstance(m, Mismatch) and m.refusal().status == 422   # while in flight
    assert isinstance(r, Reserved)
    await idem.complete("app", KEY, r.token, receipt())
    assert isinstance(await idem.lookup_or_reserve("app", KEY, other), Mismatch)  # and after


async def test_in_flight_is_409(store_factory) -> None:
    a, b = Idempotency(store_factory()), Idempotency(store_factory())
    r = await a.lookup_or_reserve("app", KEY, FP)
    c = await b.lookup_or_reserve("app", KEY, FP)
    assert c == Conflict("in flight") and c.refusal().status == 409
    assert isinstance(r, Reserved)
    assert await a.mark_sent("app", KEY, r.token, in_flight_s=30)
    assert await b.lookup_or_reserve("app", KEY, FP) == Conflict("in flight")


async def test_unknown_then_resolve_committed(store_factory) -> None:
    a, ops = Idempotency(store_factory()), Idempotency(store_factory())
    r = await a.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    assert await ops.resolve("app", KEY, committed=True) == "in flight"   # never while in flight
    await a.mark_sent("app", KEY, r.token, 30)
    assert await a.mark_unknown("app", KEY, r.token)
    c = await a.lookup_or_reserve("app", KEY, FP)
    assert c == Conflict("outcome unknown") and "unknown" in c.refusal().reason
    assert not await a.complete("app", KEY, r.token, receipt())          # a late answer cannot sneak in
    assert (await ops.state("app", KEY))["state"] == "outcome unknown"
    assert await ops.resolve("app", KEY, committed=True, location="Observation/9") == "resolved"
    rep = await a.lookup_or_reserve("app", KEY, FP)
    assert isinstance(rep, Replay)
    assert rep.receipt.status == 200 and rep.receipt.reconciled
    assert ("Location", "Observation/9") in rep.receipt.headers
    assert json.loads(rep.receipt.body or b"")["issue"][0]["code"] == "informational"
    assert await ops.resolve("app", KEY, committed=False) == "complete"  # done stays done
    assert isinstance(await a.lookup_or_reserve("app", KEY, "f" * 64), Mismatch)


async def test_unknown_then_resolve_failed(store_factory) -> None:
    idem = Idempotency(store_factory())
    r = await idem.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    await idem.mark_unknown("app", KEY, r.token)
    assert await idem.resolve("app", KEY, committed=False) == "resolved"
    assert await idem.resolve("app", KEY, committed=False) == "absent"
    assert isinstance(await idem.lookup_or_reserve("app", KEY, FP), Reserved)  # may be sent again


async def test_crash_after_send_is_outcome_unknown(store_factory) -> None:
    # A sidecar that died after mark_sent: past the in-flight deadline the key answers
    # "outcome unknown" (never free), and an operator can resolve it.
    idem = Idempotency(store_factory(), lease_s=0.2)
    r = await idem.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    await idem.mark_sent("app", KEY, r.token, in_flight_s=0.2)
    await asyncio.sleep(0.35)
    assert await idem.lookup_or_reserve("app", KEY, FP) == Conflict("outcome unknown")
    assert await idem.resolve("app", KEY, committed=False) == "resolved"


async def test_clients_are_isolated(store_factory) -> None:
    idem = Idempotency(store_factory())
    r = await idem.lookup_or_reserve("app-a", KEY, FP)
    assert isinstance(r, Reserved)
    await idem.complete("app-a", KEY, r.token, receipt())
    other = await idem.lookup_or_reserve("app-b", KEY, FP)       # same key, same body, other client
    assert isinstance(other, Reserved)
    assert isinstance(await idem.lookup_or_reserve("app:b", KEY, FP), Reserved)  # ':' cannot alias
    assert not await idem.complete("app-a", KEY, other.token, receipt(500))     # not a's token
    assert not await idem.release("app-a", KEY, other.token)
    rep = await idem.lookup_or_reserve("app-a", KEY, FP)
    assert isinstance(rep, Replay) and rep.receipt.status == 201
    assert await idem.release("app-b", KEY, other.token)
    assert await idem.state("app-b", KEY) is None


async def test_lease_expiry_then_stale_complete_is_refused(store_factory) -> None:
    a, b = Idempotency(store_factory()), Idempotency(store_factory())
    old = await a.lookup_or_reserve("app", KEY, FP, lease_s=0.2)
    assert isinstance(old, Reserved)
    await asyncio.sleep(0.35)
    new = await b.lookup_or_reserve("app", KEY, FP)
    assert isinstance(new, Reserved) and new.token != old.token
    assert not await a.complete("app", KEY, old.token, receipt(500))    # CAS: no longer ours
    assert not await a.mark_unknown("app", KEY, old.token)
    assert not await a.release("app", KEY, old.token)
    assert await b.complete("app", KEY, new.token, receipt(201))
    rep = await a.lookup_or_reserve("app", KEY, FP)
    assert isinstance(rep, Replay) and rep.receipt.status == 201


async def test_race_50_reservations_over_two_stores(store_factory) -> None:
    a, b = Idempotency(store_factory()), Idempotency(store_factory())
    results = await asyncio.gather(*[(a if i % 2 else b).lookup_or_reserve("app", KEY, FP) for i in range(50)])
    assert sum(isinstance(r, Reserved) for r in results) == 1
    assert all(r == Conflict("in flight") for r in results if not isinstance(r, Reserved))


async def test_key_less_dedupe(store_factory) -> None:
    idem = Idempotency(store_factory(), dedupe_window_s=0.3)
    r = await idem.dedupe_or_reserve("lab", FP)
    assert isinstance(r, Reserved)
    assert await idem.dedupe_or_reserve("lab", FP) == Conflict("in flight")
    assert await idem.complete("lab", r.key, r.token, receipt())
    assert isinstance(await idem.dedupe_or_reserve("lab", FP), Replay)
    assert isinstance(await idem.dedupe_or_reserve("other", FP), Reserved)
    assert isinstance(await idem.lookup_or_reserve("lab", KEY, FP), Reserved)  # separate namespace
    await asyncio.sleep(0.45)
    assert isinstance(await idem.dedupe_or_reserve("lab", FP), Reserved)  # window over
    with pytest.raises(ValueError):
        await Idempotency(idem.store).dedupe_or_reserve("lab", FP)


async def test_large_body_not_kept(store_factory) -> None:
    idem = Idempotency(store_factory(), body_cap=16)
    r = await idem.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    big = b"x" * 100
    kept = idem.make_receipt(201, [("Location", "L"), ("Content-Type", "t")], big, "c")
    await idem.complete("app", KEY, r.token, kept)
    rep = await idem.lookup_or_reserve("app", KEY, FP)
    assert isinstance(rep, Replay)
    assert rep.receipt.body is None and rep.receipt.headers == (("Location", "L"),)
    assert len(rep.receipt.body_sha256) == 64


async def test_bad_key_is_400(store_factory) -> None:
    idem = Idempotency(store_factory())
    with pytest.raises(Refusal) as ei:
        await idem.lookup_or_reserve("app", "short", FP)
    assert ei.value.status == 400


def test_parse_key() -> None:
    assert parse_key([]) is None
    assert parse_key([KEY]) == KEY
    assert parse_key(['"abc-1234"']) == "abc-1234"             # structured-field string form
    for bad in (["short"], ["a" * 129], ["has space1"], ["semi;colon1"], ["~dedupe-key"], [KEY, KEY]):
        with pytest.raises(Refusal) as ei:
            parse_key(bad)
        assert ei.value.status == 400


def test_fingerprint_covers_url_conditionals_body() -> None:
    d1 = fingerprint("DELETE", "/Observation/1", {}, b"")
    assert d1 != fingerprint("DELETE", "/Observation/2", {}, b"")   # two DELETEs, two writes
    assert d1 == fingerprint("delete", "/Observation/1", {"accept": "x"}, b"")
    assert d1 != fingerprint("DELETE", "/Observation/1", {"if-match": 'W/"1"'}, b"")
    assert fingerprint("PUT", "/O/1", {"If-Match": ""}, b"") != fingerprint("PUT", "/O/1", {}, b"")
    assert fingerprint("POST", "/O", [("if-none-exist", "identifier=a|1")], b"") != \
        fingerprint("POST", "/O", [("if-none-exist", "identifier=a|2")], b"")
    assert fingerprint("POST", "/O?a=1", {}, b"") != fingerprint("POST", "/O?a=2", {}, b"")
    assert fingerprint("POST", "/O", {}, b"ab") != fingerprint("POST", "/Oa", {}, b"b")


def test_request_fingerprint() -> None:
    def req(q: tuple = (), body: bytes = BODY) -> FhirRequest:
        return FhirRequest("PUT", "PUT", Target("type", "Observation", query=q, path="/Observation"),
                           {"if-match": 'W/"2"'}, "application/fhir+json", None, body)
    assert request_fingerprint(req()) == request_fingerprint(req())
    assert request_fingerprint(req((("identifier", "x|1"),))) != request_fingerprint(req((("identifier", "x|2"),)))
    assert request_fingerprint(req(body=b"{}")) != request_fingerprint(req())


def test_disposition() -> None:
    assert disposition(201) == disposition(200) == disposition(412) == disposition(500) == "complete"
    assert disposition(None) == disposition(502) == disposition(504) == disposition(503) == "unknown"
    assert disposition(429) == disposition(429, True) == disposition(503, retry_after=True) == "release"
    assert disposition(501) == disposition(404) == disposition(409) == "complete"


async def test_sealed_bodies(store_factory) -> None:
    key = bytes(range(32))
    store = store_factory()
    idem = Idempotency(store, body_key=key)
    r = await idem.lookup_or_reserve("app", KEY, FP)
    assert isinstance(r, Reserved)
    secret = b'{"resourceType":"Patient","name":[{"family":"Doe"}]}'
    assert await idem.complete("app", KEY, r.token, idem.make_receipt(201, [("Location", "L")], secret, "c"))
    raw = await store.get("idem:app:" + KEY)
    assert raw is not None and b"Doe" not in raw and b"RG9l" not in raw   # no PHI in clear at rest
    rep = await Idempotency(store_factory(), body_key=key).lookup_or_reserve("app", KEY, FP)
    assert isinstance(rep, Replay) and rep.receipt.body == secret and not rep.receipt.sealed
    with pytest.raises(StateUnavailable):                      # no / wrong key: fail closed
        await Idempotency(store).lookup_or_reserve("app", KEY, FP)
    with pytest.raises(StateUnavailable):
        await Idempotency(store, body_key=bytes(32)).lookup_or_reserve("app", KEY, FP)
    # A sealed body moved under another client's key does not open (AAD = record key).
    assert await store.cas("idem:other:" + KEY, None, raw, 60)
    with pytest.raises(StateUnavailable):
        await idem.lookup_or_reserve("other", KEY, FP)
