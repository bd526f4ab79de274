"""Idempotency-Key: a retried write is answered from its stored receipt, never forwarded twice.

Records live in the shared state store under `idem:<client>:<key>` (the client id is
percent-encoded, so one client never sees another's receipt), one small JSON value each:

    R  reserved   lease `lease_s`: the request is in the guards; if the sidecar dies here, the
                  lease runs out and a retry may go (nothing was sent)
    S  sent       `mark_sent` just before forwarding: in flight until `until`, then "outcome
                  unknown" (a sidecar that died after sending must not let a retry through)
    U  unknown    `mark_unknown` after an upstream timeout: 409 until an operator resolves it
    D  done       the receipt, kept `ttl_s` (key-less dedupe: `dedupe_window_s`)

Every transition is a compare-and-set against the exact value read (Redis: a Lua script;
SQLite: a transaction), so a holder whose lease ran out and whose key was taken over cannot
overwrite the new holder (its `complete` returns False).

The receipt (what a replay answers): the status, the response headers Location,
Content-Location, ETag, Last-Modified, Content-Type, and the body bytes as the app received
them (URLs already rewritten) up to `body_cap` (64 KiB); a larger body is not kept (its sha256
is) and the replay answers status + headers with an empty body, as `Prefer: return=minimal`
would. With `body_key` (32 bytes, e.g. HKDF of the pseudonym key) stored bodies are sealed
with AES-GCM bound to the record's key: receipts hold PHI, the store is not the place for it
in clear. The original correlation id is kept for the audit `replay` record. A key resolved
`--committed` by an operator replays 200 with an informational OperationOutcome ("committed;
the original response is not available") and the Location the operator gave, if any.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Literal, Mapping, Sequence
from urllib.parse import quote, urlencode

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import Refusal, bad_request, operation_outcome
from sidecar.request import FhirRequest
from sidecar.state.base import StateStore, StateUnavailable

KEY_RE = re.compile(r"[A-Za-z0-9._:-]{8,128}")
CONDITIONAL_HEADERS = ("if-match", "if-none-match", "if-none-exist")
RECEIPT_HEADERS = frozenset({"location", "content-location", "etag", "last-modified", "content-type"})
REPLAYED_HEADER = ("Idempotent-Replayed", "true")
_DEDUPE = "~"  # prefix of key-less dedupe keys: outside KEY_RE, so never a client's key


def parse_key(values: Sequence[str]) -> str | None:
    """The Idempotency-Key header's values -> the key, None when absent, 400 when malformed.
    The IETF draft's structured-field form ("key" in quotes) is accepted too."""
    if not values:
        return None
    if len(values) > 1:
        raise bad_request("more than one Idempotency-Key header")
    v = values[0].strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        v = v[1:-1]
    if not KEY_RE.fullmatch(v):
        raise bad_request("Idempotency-Key must match ^[A-Za-z0-9._:-]{8,128}$")
    return v


def fingerprint(method: str, target: str, headers: Mapping[str, str] | Iterable[tuple[str, str]],
                body: bytes) -> str:
    """sha256 over method, path+query, the conditional headers and the body bytes.
    Fields are length-prefixed so no two different requests share an encoding."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    h = hashlib.sha256(b"fhir-sidecar idempotency v1\0")

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)

    put(method.upper().encode())
    put(target.encode())
    for name in CONDITIONAL_HEADERS:
        values = [v for k, v in items if k.lower() == name]
        put(str(len(values)).encode())  # absent != present-but-empty
        for v in values:
            put(v.encode())
    put(body)
    return h.hexdigest()


def request_fingerprint(req: FhirRequest) -> str:
    """The fingerprint of a parsed request: effective method, base-relative path + query,
    the (allowlisted) conditional headers, the body bytes as forwarded."""
    t = req.target
    target = t.path + ("?" + urlencode(t.query) if t.query else "")
    return fingerprint(req.method, target, req.headers, req.raw_body)


@dataclass(frozen=True, slots=True)
class Receipt:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = b""          # None: over the cap, not kept
    body_sha256: str = ""
    correlation_id: str = ""
    reconciled: bool = False          # an operator resolved an unknown outcome as committed
    created: float = 0.0
    sealed: bool = False              # body is nonce + AES-GCM ciphertext (at rest only)

    @classmethod
    def of(cls, status: int, headers: Iterable[tuple[str, str]], body: bytes, correlation_id: str,
           *, cap: int = 65536, now: float | None = None) -> "Receipt":
        kept = tuple((k, v) for k, v in headers if k.lower() in RECEIPT_HEADERS)
        if len(body) > cap:
            kept = tuple((k, v) for k, v in kept if k.lower() != "content-type")
        return cls(status, kept, body if len(body) <= cap else None, hashlib.sha256(body).hexdigest(),
                   correlation_id, False, time.time() if now is None else now)

    def response_headers(self) -> tuple[tuple[str, str], ...]:
        return self.headers + (REPLAYED_HEADER,)

    def to_json(self) -> dict:
        return {"status": self.status, "headers": [list(h) for h in self.headers],
                "body": None if self.body is None else base64.b64encode(self.body).decode(),
                "sha256": self.body_sha256, "cid": self.correlation_id, "reconciled": self.reconciled,
                "at": self.created, "sealed": self.sealed}

    @classmethod
    def from_json(cls, d: dict) -> "Receipt":
        body = None if d["body"] is None else base64.b64decode(d["body"])
        return cls(int(d["status"]), tuple((str(k), str(v)) for k, v in d["headers"]), body,
                   str(d["sha256"]), str(d["cid"]), bool(d["reconciled"]), float(d["at"]), bool(d.get("sealed")))


@dataclass(frozen=True, slots=True)
class Reserved:
    key: str       # pass back to mark_sent / complete / mark_unknown / release
    token: str


@dataclass(frozen=True, slots=True)
class Replay:
    receipt: Receipt


@dataclass(frozen=True, slots=True)
class Conflict:
    reason: Literal["in flight", "outcome unknown"]
    status: int = 409

    def refusal(self) -> Refusal:
        if self.reason == "in flight":
            return Refusal(409, "a request with this Idempotency-Key is still in flight", "conflict")
        return Refusal(409, "the outcome of the earlier request with this Idempotency-Key is unknown: "
                            "the key stays reserved until it is reconciled", "conflict")


@dataclass(frozen=True, slots=True)
class Mismatch:
    status: int = 422

    def refusal(self) -> Refusal:
        return Refusal(422, "this Idempotency-Key was used for a different request", "processing")


Lookup = Reserved | Replay | Conflict | Mismatch
Disposition = Literal["complete", "release", "unknown"]
Resolution = Literal["resolved", "absent", "in flight", "complete"]


def disposition(status: int | None, retry_after: bool = False) -> Disposition:
    """What to do with a reservation once the upstream answered (`None`: timed out or the
    connection broke after the request was sent). Before any byte was sent: always `release`.
    - 429, or 503 with Retry-After: the upstream refused to process it -> release (retry later)
    - 502, 503 without Retry-After, 504, no answer: an intermediary or a dying server may have
      lost the answer of a committed write -> unknown (409 until reconciled)
    - everything else (2xx, 3xx, 4xx, 500, 501, ...): a definite answer -> complete; it is
      replayed, so an app that wants another try after a 500 sends a new key, deliberately"""
    if status is None or status in (502, 504) or (status == 503 and not retry_after):
        return "unknown"
    if status in (429, 503):
        return "release"
    return "complete"


@dataclass(frozen=True, slots=True)
class _Record:
    state: Literal["R", "S", "U", "D"]
    fp: str
    token: str = ""
    until: float = 0.0
    receipt: Receipt | None = field(default=None)

    def encode(self) -> bytes:
        d: dict = {"s": self.state, "fp": self.fp, "t": self.token, "u": self.until}
        if self.receipt is not None:
            d["r"] = self.receipt.to_json()
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "_Record":
        try:
            d = json.loads(raw)
            r = Receipt.from_json(d["r"]) if "r" in d else None
            if d["s"] not in ("R", "S", "U", "D"):
                raise ValueError(d["s"])
            return cls(d["s"], str(d["fp"]), str(d["t"]), float(d["u"]), r)
        except (ValueError, KeyError, TypeError) as e:
            # Cannot tell what happened to that write: fail closed, never treat it as free.
            raise StateUnavailable("unreadable idempotency record") from e


class Idempotency:
    def __init__(self, store: StateStore, *, ttl_s: float = 86_400, lease_s: float = 120.0,
                 unknown_ttl_s: float = 30 * 86_400, dedupe_window_s: float = 0, body_cap: int = 65536,
                 body_key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s  # must outlast the guards, incl. the prior-state read upstream
        # An unknown outcome must not lapse before a receipt would have: a retry then duplicates.
        self.unknown_ttl_s = max(unknown_ttl_s, ttl_s)
        self.dedupe_window_s = dedupe_window_s
        self.body_cap = body_cap
        self._aead = AESGCM(body_key) if body_key is not None else None
        self._clock = clock

    def make_receipt(self, status: int, headers: Iterable[tuple[str, str]], body: bytes,
                     correlation_id: str) -> Receipt:
        """The receipt of a response as the app received it (URLs rewritten), body capped."""
        return Receipt.of(status, headers, body, correlation_id, cap=self.body_cap, now=self._clock())

    def _seal(self, skey: str, r: Receipt) -> Receipt:
        if self._aead is None or r.body is None:
            return r
        nonce = os.urandom(12)
        return replace(r, body=nonce + self._aead.encrypt(nonce, r.body, skey.encode()), sealed=True)

    def _open(self, skey: str, r: Receipt) -> Receipt:
        if not r.sealed or r.body is None:
            return r
        if self._aead is None:
            raise StateUnavailable("receipt body is sealed and no receipt key is configured")
        try:
            body = self._aead.decrypt(r.body[:12], r.body[12:], skey.encode())
        except InvalidTag:
            raise StateUnavailable("receipt body fails authentication (wrong key, or moved)") from None
        return replace(r, body=body, sealed=False)

    @staticmethod
    def _skey(client_id: str, key: str) -> str:
        return f"idem:{quote(client_id, safe='')}:{key}"

    async def lookup_or_reserve(self, client_id: str, key: str, fingerprint: str,
                                lease_s: float | None = None) -> Lookup:
        if not KEY_RE.fullmatch(key):
            raise bad_request("Idempotency-Key must match ^[A-Za-z0-9._:-]{8,128}$")
        return await self._reserve(client_id, key, fingerprint, lease_s)

    async def _reserve(self, client_id: str, key: str, fingerprint: str, lease_s: float | None) -> Lookup:
        skey = self._skey(client_id, key)
        token = secrets.token_urlsafe(18)
        mine = _Record("R", fingerprint, token).encode()
        for _ in range(4):
            if await self.store.cas(skey, None, mine, lease_s or self.lease_s):
                return Reserved(key, token)
            raw = await self.store.get(skey)
            if raw is None:
                continue  # released or expired between our two calls: try again
            cur = _Record.decode(raw)
            if cur.token == token:
                return Reserved(key, token)  # our own SET NX, retried after a lost reply
            if cur.fp != fingerprint:
                return Mismatch()
            if cur.state == "D" and cur.receipt is not None:
                return Replay(self._open(skey, cur.receipt))
            if cur.state == "R" or (cur.state == "S" and self._clock() < cur.until):
                return Conflict("in flight")
            return Conflict("outcome unknown")
        raise StateUnavailable("idempotency record keeps changing")

    async def dedupe_or_reserve(self, client_id: str, fingerprint: str, lease_s: float | None = None) -> Lookup:
        """Key-less dedupe for clients that opted in: the fingerprint is the key, the receipt
        lives `dedupe_window_s`. An identical write inside the window is replayed, not sent."""
        if self.dedupe_window_s <= 0:
            raise ValueError("dedupe_window_s is 0: key-less dedupe is off")
        return await self._reserve(client_id, _DEDUPE + fingerprint, fingerprint, lease_s)

    async def _transition(self, client_id: str, key: str, token: str | None, new: _Record | None,
                          ttl_s: float | None) -> bool:
        skey = self._skey(client_id, key)
        raw = await self.store.get(skey)
        if raw is None:
            return False
        cur = _Record.decode(raw)
        if token is not None and (cur.token != token or cur.state not in ("R", "S")):
            return False  # not ours any more (lease ran out and someone else holds it, or done)
        if new is not None:
            new = _Record(new.state, cur.fp, new.token, new.until, new.receipt)
        enc = None if new is None else new.encode()
        if await self.store.cas(skey, raw, enc, ttl_s):
            return True
        # A retried CAS whose first reply was lost finds its own result in place.
        return await self.store.get(skey) == enc

    async def mark_sent(self, client_id: str, key: str, token: str, in_flight_s: float) -> bool:
        """Just before forwarding: from now on the key outlives a crash (S, then unknown)."""
        rec = _Record("S", "", token, self._clock() + in_flight_s)
        return await self._transition(client_id, key, token, rec, self.unknown_ttl_s)

    async def complete(self, client_id: str, key: str, token: str, receipt: Receipt) -> bool:
        ttl = self.dedupe_window_s if key.startswith(_DEDUPE) else self.ttl_s
        sealed = self._seal(self._skey(client_id, key), receipt)
        return await self._transition(client_id, key, token, _Record("D", "", receipt=sealed), ttl)

    async def mark_unknown(self, client_id: str, key: str, token: str) -> bool:
        """Upstream timed out after the write was sent: 409 "outcome unknown" until resolved."""
        return await self._transition(client_id, key, token, _Record("U", ""), self.unknown_ttl_s)

    async def release(self, client_id: str, key: str, token: str) -> bool:
        """Nothing was sent (a later guard refused, audit failed, connect failed) or the
        upstream refused to process (429 / 503 + Retry-After): the key is free again."""
        return await self._transition(client_id, key, token, None, None)

    async def resolve(self, client_id: str, key: str, committed: bool, *, location: str | None = None) -> Resolution:
        """Operator reconciliation (`fhir-sidecar receipts resolve`): only an unknown outcome
        (U, or S past its in-flight deadline) is resolved. `committed=False` frees the key;
        `committed=True` stores a reconciled receipt (see the module docstring)."""
        skey = self._skey(client_id, key)
        ttl = self.dedupe_window_s if key.startswith(_DEDUPE) else self.ttl_s
        for _ in range(4):
            raw = await self.store.get(skey)
            if raw is None:
                return "absent"
            cur = _Record.decode(raw)
            if cur.state == "D":
                return "complete"
            if cur.state == "R" or (cur.state == "S" and self._clock() < cur.until):
                return "in flight"
            receipt = self._seal(skey, self._reconciled(location))
            new = _Record("D", cur.fp, receipt=receipt).encode() if committed else None
            if await self.store.cas(skey, raw, new, ttl):
                return "resolved"
        raise StateUnavailable("idempotency record keeps changing")

    def _reconciled(self, location: str | None) -> Receipt:
        body = json.dumps(operation_outcome(
            "informational", "the write was committed (outcome reconciled by an operator); "
            "the original response is not available", "information"), separators=(",", ":")).encode()
        headers = (("Content-Type", "application/fhir+json"),) + ((("Location", location),) if location else ())
        return Receipt(200, headers, body, hashlib.sha256(body).hexdigest(), "", True, self._clock())

    async def state(self, client_id: str, key: str) -> dict | None:
        """For `receipts show`: the record's state without the body."""
        raw = await self.store.get(self._skey(client_id, key))
        if raw is None:
            return None
        cur = _Record.decode(raw)
        names = {"R": "reserved", "S": "in flight", "U": "outcome unknown", "D": "complete"}
        state = "outcome unknown" if cur.state == "S" and self._clock() >= cur.until else names[cur.state]
        out: dict = {"state": state, "fingerprint": cur.fp}
        if cur.receipt is not None:
            r = cur.receipt
            out.update(status=r.status, correlation_id=r.correlation_id, body_sha256=r.body_sha256,
                       reconciled=r.reconciled)
        return out
