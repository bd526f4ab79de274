"""Reviewer authentication: configured identities, hashed passwords, lock-out, web sessions.

- `ReviewerDirectory`: reviewers from `approvals.reviewers` with their (resolved) password hashes.
- `ReviewerAuth.basic(headers)`: `Authorization: Basic base64(reviewer-id:password)` for the JSON
  API and the CLI. The admin token alone never decides anything: it would let one operator act
  as any reviewer and defeat four-eyes (`operator(headers)` is for read-only listing).
- Lock-out: `login_failures` failed attempts for one reviewer id within `lockout_s` lock that
  id for `lockout_s` (state store: shared by replicas).
- Sessions (web): a random 256-bit token in a cookie; the store keeps only its SHA-256 under
  `appr:sess:<hash>` with the reviewer id and the session's CSRF token, for `session_ttl_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from sidecar.approvals.config import ApprovalsConfig, Reviewer
from sidecar.approvals.passwords import DUMMY_HASH, verify_scrypt, verify_sha256
from sidecar.approvals.service import ReviewerIdentity
from sidecar.state.base import StateStore

_REFS = ("env:", "file:", "vault:")


class Locked(Exception):
    """Too many failed logins for this reviewer id: try again later (429)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    identity: ReviewerIdentity
    password_hash: str | None      # scrypt$...
    password_sha256: str | None    # hex
    oidc_sub: str | None


class ReviewerDirectory:
    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._by_id = {e.identity.id: e for e in entries}
        self._by_sub = {e.oidc_sub: e for e in self._by_id.values() if e.oidc_sub}

    @classmethod
    def from_config(cls, cfg: ApprovalsConfig, resolve: Callable[[str], str] | None = None) -> ReviewerDirectory:
        """`resolve(ref) -> value` for password values given as secret references (start-up)."""
        def value(v: str | None) -> str | None:
            if v is None or not v.startswith(_REFS):
                return v
            if resolve is None:
                raise ValueError("a reviewer password reference needs a resolver")
            return resolve(v).strip()

        return cls(_entry(r, value(r.password_hash), value(r.password_sha256)) for r in cfg.reviewers)

    def get(self, reviewer_id: str) -> ReviewerIdentity | None:
        e = self._by_id.get(reviewer_id)
        return None if e is None else e.identity

    def by_oidc_sub(self, sub: str) -> ReviewerIdentity | None:
        e = self._by_sub.get(sub)
        return None if e is None else e.identity

    def ids(self) -> list[str]:
        return sorted(self._by_id)

    def verify(self, reviewer_id: str, password: str) -> ReviewerIdentity | None:
        """Blocking (scrypt): call through `asyncio.to_thread`. Same cost for unknown ids."""
        e = self._by_id.get(reviewer_id)
        if e is None or (e.password_hash is None and e.password_sha256 is None):
            verify_scrypt(password, DUMMY_HASH)
            return None
        ok = verify_scrypt(password, e.password_hash) if e.password_hash else verify_sha256(password, e.password_sha256 or "")
        return e.identity if ok else None


def _entry(r: Reviewer, password_hash: str | None, password_sha256: str | None) -> _Entry:
    if password_sha256 is not None and not (len(password_sha256) == 64 and
                                            all(c in "0123456789abcdefABCDEF" for c in password_sha256)):
        raise ValueError(f"reviewer {r.id}: password_sha256 does not hold 64 hex characters")
    return _Entry(ReviewerIdentity(r.id, frozenset(r.roles), r.name), password_hash, password_sha256, r.oidc_sub)


@dataclass(frozen=True, slots=True)
class Session:
    reviewer: ReviewerIdentity
    csrf: str
    expires: float


class ReviewerAuth:
    def __init__(self, directory: ReviewerDirectory, store: StateStore, cfg: ApprovalsConfig, *,
                 admin_token: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.store = store
        self.cfg = cfg
        self.admin_token = admin_token
        self._clock = clock

    # -- passwords with lock-out -------------------------------------------------------------------

    @staticmethod
    def _id_key(kind: str, reviewer_id: str) -> str:
        return f"appr:{kind}:{quote(reviewer_id[:128], safe='')}"

    async def login(self, reviewer_id: str, password: str) -> ReviewerIdentity | None:
        """The reviewer, None for wrong credentials; raises Locked while the id is locked out."""
        if not reviewer_id or not password or len(password) > 1024 or len(reviewer_id) > 128:
            return None
        if await self.store.get(self._id_key("lock", reviewer_id)) is not None:
            raise Locked()
        who = await asyncio.to_thread(self.directory.verify, reviewer_id, password)
        if who is not None:
            return who
        n, window = self.cfg.login_failures, self.cfg.lockout_s
        ok, _ = await self.store.take(self._id_key("fail", reviewer_id), rate=n / window, burst=n)
        if not ok:
            await self.store.cas(self._id_key("lock", reviewer_id), None, b"1", window)
            raise Locked()
        return None

    async def basic(self, headers: Mapping[str, str]) -> ReviewerIdentity | None:
        got = headers.get("authorization", "")
        if got[:6].lower() != "basic ":
            return None
        try:
            user, _, password = base64.b64decode(got[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return await self.login(user, password)

    def operator(self, headers: Mapping[str, str]) -> bool:
        """`Authorization: Bearer <admin.token>`: read-only listing (no PHI) for operators."""
        got = headers.get("authorization", "")
        if not self.admin_token or not got.startswith("Bearer "):
            return False
        return hmac.compare_digest(got[7:].encode(), self.admin_token.encode())

    # -- web sessions ------------------------------------------------------------------------------

    @staticmethod
    def _session_key(token: str) -> str:
        return "appr:sess:" + hashlib.sha256(token.encode()).hexdigest()

    async def new_session(self, who: ReviewerIdentity) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        exp = self._clock() + self.cfg.session_ttl_s
        s = Session(who, secrets.token_urlsafe(32), exp)
        val = json.dumps({"r": who.id, "c": s.csrf, "x": exp}).encode()
        if not await self.store.cas(self._session_key(token), None, val, self.cfg.session_ttl_s):
            raise RuntimeError("session token collision")
        return token, s

    async def session(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        raw = await self.store.get(self._session_key(token))
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            rid, csrf, exp = str(d["r"]), str(d["c"]), float(d["x"])
        except (ValueError, KeyError, TypeError):
            return None
        who = self.directory.get(rid)  # removed from the config (reload): the session is gone
        if who is None or exp <= self._clock():
            return None
        return Session(who, csrf, exp)

    async def end_session(self, token: str | None) -> None:
        if not token or len(token) > 128:
            return
        key = self._session_key(token)
        raw = await self.store.get(key)
        if raw is not None:
            await self.store.cas(key, raw, None, None)
