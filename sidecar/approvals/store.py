"""The hold store: held writes, sealed with AES-GCM, in the shared state store (SQLite or Redis).

Keys (all under the state store's own prefix):

    appr:item:<id>          one held write, sealed (below); TTL: until expiry + `keep_s`, then
                            `keep_s` after its decision (the app can poll the outcome that long)
    appr:index              the listing index: JSON, clear text, **no PHI**: id, client, resource
                            type, interaction, method, status, times, approval counts
    appr:fp:<client>:<fp>   the pending hold of an identical request (client + request
                            fingerprint): an app that re-sends a held write gets the same hold

Sealing: `{"v":1,"k":<key id>,"n":<nonce>,"c":<AES-256-GCM ciphertext>}`; the key is
`derive_key(secret, "approvals")` (HKDF-SHA256); the associated data binds the key id and the
item id, so a sealed item copied under another id, or opened with another key, fails to open.
Everything about the request (path and query, headers, body, current version, correlation id,
principal, rejection reason, upstream Location) is inside the ciphertext.

Every change is a compare-and-set against the exact sealed bytes read (`StateStore.cas`), so two
replicas (or two clicks) deciding one item concurrently cannot both succeed. The item is the
truth; the index follows it (updated right after, repaired by `sweep`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import Refusal, unavailable
from sidecar.state.base import StateStore, StateUnavailable

STATUSES = ("pending", "approved", "rejected", "expired", "released", "failed")
FINAL = frozenset({"rejected", "expired", "released", "failed"})
ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")
INDEX_KEY = "appr:index"
MAX_DECIDED_IN_INDEX = 2_000
_AAD_PREFIX = b"fhir-sidecar/approvals/v1\0"
_CAS_DEADLINE_S = 5.0   # a contended compare-and-set keeps trying (with jitter) this long, then 503


async def _contended(attempt: int, started: float, what: str) -> None:
    """Back off before the next compare-and-set try; give up (fail closed) after the deadline."""
    if time.monotonic() - started > _CAS_DEADLINE_S:
        raise StateUnavailable(f"{what} keeps changing")
    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))


class SealError(StateUnavailable):
    """A sealed item does not open (wrong key, moved to another id, tampered): fail closed."""


class QueueFull(StateUnavailable):
    """More pending holds than `max_pending`: the write is refused (503), never forwarded."""

    def refusal(self) -> Refusal:
        return unavailable("the review queue is full", retry_after_s=60)


def new_item_id() -> str:
    """128 random bits, URL-safe (22 characters), never starting with `-`: reviewers type it as
    an argument (`approvals approve ID`), where a leading dash would read as an option."""
    while True:
        item_id = secrets.token_urlsafe(16)
        if not item_id.startswith("-"):
            return item_id


def valid_id(item_id: str) -> bool:
    return isinstance(item_id, str) and ID_RE.fullmatch(item_id) is not None


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    status: str
    created: float
    expires: float
    client_id: str
    correlation_id: str
    method: str
    target: str                          # origin-form path + query as the app sent it (base path included)
    path: str                            # base-relative path (display)
    headers: tuple[tuple[str, str], ...]  # allowlisted request headers, replayed on release
    body: bytes
    interaction: str
    resource_type: str | None = None
    resource_id: str | None = None
    content_type: str | None = None
    fingerprint: str = ""
    principal: dict[str, Any] = field(default_factory=dict)   # auth, scopes, tenant, patient, user
    current: Any = None                  # the stored version (update/patch/delete), for the diff
    proposed: Any = None                 # what will be stored when it differs from the body (PATCH result)
    reasons: tuple[str, ...] = ()        # the policy's reasons for the hold (fixed phrases)
    policy_revision: str | None = None
    required: int = 1
    roles: tuple[str, ...] = ("reviewer",)
    approvals: tuple[tuple[str, float], ...] = ()   # (reviewer id, time)
    rejection: dict[str, Any] | None = None         # {reviewer, at, reason}
    decided_at: float | None = None
    release: dict[str, Any] | None = None           # {token, claimed_at, attempts}
    outcome: dict[str, Any] | None = None           # {status, location, at, refused}

    @property
    def approvers(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.approvals)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["body"] = base64.b64encode(self.body).decode("ascii")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Item:
        d = dict(d)
        d["body"] = base64.b64decode(d["body"])
        d["headers"] = tuple((str(k), str(v)) for k, v in d["headers"])
        d["reasons"] = tuple(d.get("reasons") or ())
        d["roles"] = tuple(d.get("roles") or ())
        d["approvals"] = tuple((str(r), float(t)) for r, t in d.get("approvals") or ())
        return cls(**d)

    def index_entry(self) -> dict[str, Any]:
        """The clear-text index row: no PHI (no path, id, body, headers, correlation id)."""
        return {"id": self.id, "client": self.client_id, "type": self.resource_type, "interaction": self.interaction,
                "method": self.method, "status": self.status, "created": self.created, "expires": self.expires,
                "required": self.required, "approvals": len(self.approvals), "decided_at": self.decided_at}


class Sealer:
    """AES-256-GCM with a key ring: seal under the active key, open under the one named."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise ValueError("the active approvals key must be in the key ring")
        for kid, k in keys.items():
            if len(k) != 32 or not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", kid):
                raise ValueError("approvals keys are 32 bytes under ids [A-Za-z0-9._-]{1,32}")
        self._aead = {kid: AESGCM(k) for kid, k in keys.items()}
        self.active = active

    @staticmethod
    def _aad(kid: str, item_id: str) -> bytes:
        return _AAD_PREFIX + kid.encode() + b"\0" + item_id.encode()

    def seal(self, item_id: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        ct = self._aead[self.active].encrypt(nonce, plaintext, self._aad(self.active, item_id))
        return json.dumps({"v": 1, "k": self.active, "n": base64.b64encode(nonce).decode(),
                           "c": base64.b64encode(ct).decode()}, separators=(",", ":")).encode()

    def open(self, item_id: str, sealed: bytes) -> bytes:
        try:
            env = json.loads(sealed)
            kid, nonce, ct = env["k"], base64.b64decode(env["n"]), base64.b64decode(env["c"])
            if env.get("v") != 1:
                raise ValueError("version")
        except (ValueError, KeyError, TypeError):
            raise SealError("unreadable sealed approval item") from None
        aead = self._aead.get(kid) if isinstance(kid, str) else None
        if aead is None:
            raise SealError("sealed approval item under an unknown key id")
        try:
            return aead.decrypt(nonce, ct, self._aad(kid, item_id))
        except InvalidTag:
            raise SealError("sealed approval item fails authentication (wrong key, wrong id, or tampered)") from None


class HoldStore:
    def __init__(self, store: StateStore, sealer: Sealer, *, keep_s: float = 7 * 86_400,
                 max_pending: int = 1_000, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.sealer = sealer
        self.keep_s = keep_s
        self.max_pending = max_pending
        self._clock = clock

    # -- items ----------------------------------------------------------------------------------

    @staticmethod
    def item_key(item_id: str) -> str:
        return f"appr:item:{item_id}"

    @staticmethod
    def fp_key(client_id: str, fingerprint: str) -> str:
        return f"appr:fp:{quote(client_id, safe='')}:{fingerprint}"

    def _ttl(self, item: Item) -> float:
        now = self._clock()
        if item.final:
            return max(1.0, (item.decided_at or now) + self.keep_s - now)
        return max(1.0, item.expires + self.keep_s - now)

    def _encode(self, item: Item) -> bytes:
        return self.sealer.seal(item.id, json.dumps(item.to_json(), separators=(",", ":")).encode())

    def _decode(self, item_id: str, raw: bytes) -> Item:
        plain = self.sealer.open(item_id, raw)
        try:
            item = Item.from_json(json.loads(plain))
        except (ValueError, KeyError, TypeError) as e:
            raise SealError("unreadable approval item") from e
        if item.id != item_id:
            raise SealError("approval item id mismatch")
        return item

    async def create(self, item: Item) -> Item:
        """Store a new pending item and list it. QueueFull when `max_pending` are waiting."""
        pending = sum(1 for e in await self.index() if e["status"] in ("pending", "approved"))
        if pending >= self.max_pending:
            raise QueueFull("the review queue is full")
        if not await self.store.cas(self.item_key(item.id), None, self._encode(item), self._ttl(item)):
            raise StateUnavailable("approval item id collision")
        await self.put_index(item)
        return item

    async def read(self, item_id: str) -> tuple[Item, bytes] | None:
        if not valid_id(item_id):
            return None
        raw = await self.store.get(self.item_key(item_id))
        if raw is None:
            return None
        return self._decode(item_id, raw), raw

    async def load(self, item_id: str) -> Item | None:
        got = await self.read(item_id)
        return None if got is None else got[0]

    async def update(self, item_id: str, change: Callable[[Item], Item | None]) -> tuple[Item, Item] | None:
        """Compare-and-set loop: `change(current)` returns the new item (None: leave it). It may
        raise to refuse; it is re-run on a concurrent change. Returns (before, after), or None
        when the item does not exist. The index is updated after a successful swap."""
        started, attempt = time.monotonic(), 0
        while True:
            got = await self.read(item_id)
            if got is None:
                return None
            cur, raw = got
            new = change(cur)
            if new is None or new == cur:
                return cur, cur
            if await self.store.cas(self.item_key(item_id), raw, self._encode(new), self._ttl(new)):
                await self.put_index(new)
                return cur, new
            attempt += 1
            await _contended(attempt, started, "approval item")

    # -- dedupe of identical pending holds ---------------------------------------------------------

    async def claim_fingerprint(self, client_id: str, fingerprint: str, item_id: str, ttl_s: float) -> str | None:
        """Record `item_id` as the pending hold of this request; the existing hold's id if any."""
        key = self.fp_key(client_id, fingerprint)
        for _ in range(4):
            if await self.store.cas(key, None, item_id.encode(), ttl_s):
                return None
            cur = await self.store.get(key)
            if cur is None:
                continue
            other = cur.decode("ascii", "replace")
            item = await self.load(other) if valid_id(other) else None
            if item is not None and item.status == "pending" and item.expires > self._clock():
                return other
            if await self.store.cas(key, cur, item_id.encode(), ttl_s):  # stale: take it over
                return None
        raise StateUnavailable("approval fingerprint keeps changing")

    async def drop_fingerprint(self, client_id: str, fingerprint: str, item_id: str) -> None:
        key = self.fp_key(client_id, fingerprint)
        cur = await self.store.get(key)
        if cur == item_id.encode():
            await self.store.cas(key, cur, None, None)

    # -- index ----------------------------------------------------------------------------------------

    async def _read_index(self) -> tuple[list[dict[str, Any]], bytes | None]:
        raw = await self.store.get(INDEX_KEY)
        if raw is None:
            return [], None
        try:
            entries = json.loads(raw)
            if not isinstance(entries, list):
                raise ValueError("index")
        except ValueError as e:
            raise StateUnavailable("unreadable approvals index") from e
        return entries, raw

    def _prune(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        now = self._clock()
        keep = []
        for e in entries:
            if e["status"] in FINAL:
                if (e.get("decided_at") or e["created"]) + self.keep_s < now:
                    continue
            elif e["expires"] + self.keep_s < now:
                continue
            keep.append(e)
        decided = [e for e in keep if e["status"] in FINAL]
        if len(decided) > MAX_DECIDED_IN_INDEX:
            drop = {e["id"] for e in sorted(decided, key=lambda e: e.get("decided_at") or 0)[:-MAX_DECIDED_IN_INDEX]}
            keep = [e for e in keep if e["id"] not in drop]
        return keep

    async def _swap_index(self, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        started, attempt = time.monotonic(), 0
        while True:
            entries, raw = await self._read_index()
            new = self._prune(edit([dict(e) for e in entries]))
            enc = json.dumps(new, separators=(",", ":")).encode()
            if enc == raw:
                return
            ttl = max(self.keep_s * 2, 86_400.0)
            if await self.store.cas(INDEX_KEY, raw, enc, ttl):
                return
            attempt += 1
            await _contended(attempt, started, "approvals index")

    async def put_index(self, item: Item) -> None:
        row = item.index_entry()

        def edit(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            out = [e for e in entries if e["id"] != item.id]
            out.append(row)
            return out

        await self._swap_index(edit)

    async def drop_index(self, item_ids: set[str]) -> None:
        await self._swap_index(lambda entries: [e for e in entries if e["id"] not in item_ids])

    async def index(self, *, status: str | None = None, client: str | None = None,
                    resource_type: str | None = None, interaction: str | None = None) -> list[dict[str, Any]]:
        entries, _ = await self._read_index()
        entries = self._prune(entries)
        out = [e for e in entries
               if (status is None or e["status"] == status) and (client is None or e["client"] == client)
               and (resource_type is None or e["type"] == resource_type)
               and (interaction is None or e["interaction"] == interaction)]
        return sorted(out, key=lambda e: e["created"])


def with_release(item: Item, token: str, now: float) -> Item:
    rel = dict(item.release or {})
    return replace(item, release={"token": token, "claimed_at": now, "attempts": int(rel.get("attempts", 0)) + 1})
