"""The hold store: sealed at rest (no PHI in the state store), bound to key and id, expiry,
a PHI-free index, unguessable ids. Runs on SQLite and on a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.approvals.store import (
    INDEX_KEY,
    HoldStore,
    QueueFull,
    Sealer,
    SealError,
    new_item_id,
    valid_id,
)
from sidecar.audit.record import derive_key
from sidecar.state import SqliteStore
from tests.redis_server import redis_server, store_factory  # noqa: F401  (fixtures)
from tests.test_approvals_support import (
    ALICE,
    CANARY,
    SECRET,
    Clock,
    make_cfg,
    make_service,
    med_hold,
    obs_update_hold,
)

INDEX_FIELDS = {"id", "client", "type", "interaction", "method", "status", "created", "expires", "required",
                "approvals", "decided_at"}


async def _all_values(store, ids: list[str]) -> list[bytes]:
    keys = [INDEX_KEY] + [HoldStore.item_key(i) for i in ids]
    return [v for v in [await store.get(k) for k in keys] if v is not None]


async def test_no_canary_phi_at_rest(store_factory, tmp_path: Path) -> None:
    store = store_factory()
    svc = make_service(store)
    a = await svc.hold(med_hold())
    b = await svc.hold(obs_update_hold(correlation_id=f"corr-{CANARY}"))
    await svc.reject(b.item_id, ALICE, f"wrong patient {CANARY}")
    values = await _all_values(store, [a.item_id, b.item_id])
    assert len(values) == 3
    for v in values:
        assert CANARY.encode() not in v
        assert b"Patient/123" not in v and b"Amlodipine" not in v and b"rechecked" not in v
    if store_factory.backend == "sqlite":  # the whole file (and its WAL): nothing in clear anywhere
        await store.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
        assert raw and CANARY.encode() not in raw and b"Amlodipine" not in raw
        store = store_factory()
        svc = make_service(store)
    # ...and it all decrypts for the service
    item = await svc.get(b.item_id)
    assert item is not None and item.rejection["reason"] == f"wrong patient {CANARY}"
    assert CANARY in (await svc.get(a.item_id)).target


async def test_index_holds_no_phi(store_factory) -> None:
    store = store_factory()
    svc = make_service(store)
    await svc.hold(med_hold())
    await svc.hold(obs_update_hold())
    raw = await store.get(INDEX_KEY)
    rows = json.loads(raw)
    assert len(rows) == 2 and all(set(r) == INDEX_FIELDS for r in rows)
    assert b"Patient" not in raw and b"corr-" not in raw and b"/Observation/9" not in raw


async def test_wrong_key_or_other_id_does_not_open(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        svc = make_service(store)
        a = await svc.hold(med_hold())
        b = await svc.hold(obs_update_hold())
        sealed = await store.get(HoldStore.item_key(a.item_id))
        # another key (another secret, or the pseudonym subkey of the same secret): refused
        for key in (derive_key(b"another-secret-of-at-least-32-chars!!", "approvals"), derive_key(SECRET, "pseudonym")):
            other = HoldStore(store, Sealer({"a1": key}, "a1"))
            with pytest.raises(SealError):
                await other.load(a.item_id)
        # the same sealed bytes under another item's id: the associated data does not match
        raw_b = await store.get(HoldStore.item_key(b.item_id))
        assert await store.cas(HoldStore.item_key(b.item_id), raw_b, sealed, 60)
        with pytest.raises(SealError):
            await svc.get(b.item_id)
        # a flipped bit in the ciphertext
        env = json.loads(sealed)
        c = bytearray(env["c"].encode())
        c[10] = ord("A") if c[10] != ord("A") else ord("B")
        env["c"] = c.decode()
        assert await store.cas(HoldStore.item_key(a.item_id), sealed, json.dumps(env).encode(), 60)
        with pytest.raises(SealError):
            await svc.get(a.item_id)
        # a fresh key ring with an old key still opens old items (rotation)
        c2 = await svc.hold(med_hold(fingerprint=""))
        rotated = HoldStore(store, Sealer({"a1": derive_key(SECRET, "approvals"), "a2": b"\1" * 32}, "a2"))
        assert (await rotated.load(c2.item_id)).id == c2.item_id
    finally:
        await store.close()


def test_item_ids_are_unguessable() -> None:
    ids = {new_item_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(valid_id(i) and len(i) == 22 for i in ids)  # 16 random bytes each
    assert not valid_id("../etc") and not valid_id("a" * 21) and not valid_id("")


async def test_expiry_item_cannot_be_approved_or_released(store_factory) -> None:
    clock = Clock()
    store = store_factory()
    svc = make_service(store, clock=clock)
    held = await svc.hold(med_hold())
    clock.advance(3600 + 1)
    from sidecar.approvals.service import ReviewError

    with pytest.raises(ReviewError) as e:
        await svc.approve(held.item_id, ALICE)
    assert e.value.status == 410
    assert [r["decision"] for r in e.value.audit] == ["expired"]
    item = await svc.get(held.item_id)
    assert item.status == "expired"
    assert await svc.claim_release(held.item_id, force=True) == (None, [])
    assert await svc.record_outcome(held.item_id, 201, "x") is None
    code, bundle = await svc.status_response(held.item_id, "refill-bot")
    assert code == 200 and bundle["entry"][0]["response"]["status"] == "403 Forbidden"
    assert bundle["entry"][0]["response"]["outcome"]["issue"][0]["code"] == "expired"


async def test_approved_but_never_released_expires_after_the_lease(store_factory) -> None:
    clock = Clock()
    svc = make_service(store_factory(), clock=clock)
    held = await svc.hold(med_hold())
    clock.advance(3590)
    res = await svc.approve(held.item_id, ALICE)
    assert res.release is not None  # the sidecar "crashes" before forwarding it
    clock.advance(30)
    assert (await svc.claim_release(held.item_id))[0] is None   # lease still running: maybe in flight
    clock.advance(60)
    rel, audit = await svc.claim_release(held.item_id)
    assert rel is None and [a["decision"] for a in audit] == ["expired"]   # never released late
    # an answer of the first release still lands (it may have been written): the truth wins
    item = await svc.record_outcome(held.item_id, 201, "/fhir/R4/MedicationRequest/5", token=res.release.token)
    assert item is not None and item.status == "released"


async def test_expired_by_sweep_with_audit_and_ttl(tmp_path: Path) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "s.db", clock=clock)
    try:
        svc = make_service(store, clock=clock)
        held = await svc.hold(med_hold())
        clock.advance(3601)
        out = await svc.sweep()
        assert [a["decision"] for a in out.audit] == ["expired"] and out.pending == 0
        assert (await svc.list_items())[0]["status"] == "expired"
        assert (await svc.sweep()).audit == []   # once
        clock.advance(86400 + 1)                 # keep_s after the decision: gone from store and index
        assert await svc.get(held.item_id) is None
        assert await svc.list_items() == []
    finally:
        await store.close()


async def test_queue_full_refuses_new_holds(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        svc = make_service(store, make_cfg(max_pending=2))
        await svc.hold(med_hold(fingerprint="a" * 64))
        await svc.hold(med_hold(fingerprint="b" * 64))
        with pytest.raises(QueueFull):
            await svc.hold(med_hold(fingerprint="c" * 64))
        # the refused hold left no fingerprint behind: the same write can be held once there is room
        assert await store.get(HoldStore.fp_key("refill-bot", "c" * 64)) is None
    finally:
        await store.close()


async def test_many_concurrent_holds_all_land_in_the_index(store_factory) -> None:
    import asyncio

    a, b = make_service(store_factory()), make_service(store_factory())  # two replicas
    held = await asyncio.gather(*((a if i % 2 else b).hold(med_hold(fingerprint=f"{i:064d}")) for i in range(40)))
    assert len({h.item_id for h in held}) == 40
    assert {r["id"] for r in await a.list_items()} == {h.item_id for h in held}


def test_review_ids_never_start_with_a_dash():
    from sidecar.approvals.store import ID_RE, new_item_id

    ids = [new_item_id() for _ in range(5000)]  # 1 in 64 token_urlsafe values starts with "-"
    assert all(ID_RE.fullmatch(i) and not i.startswith("-") for i in ids)
