"""The review service: hold a write, let configured reviewers decide it, release it exactly once.

    held = await svc.hold(hold_request_from(raw, req, cls, who, prior, decision))   # policy said review
    res = await svc.approve(item_id, reviewer)        # ReviewResult: audit dicts, maybe a Release
    res = await svc.reject(item_id, reviewer, reason)
    await svc.record_outcome(rel.item_id, status, location, token=rel.token)       # after forwarding
    code, body = await svc.status_response(item_id, client_id)                    # app polling
    sweep = await svc.sweep()                         # expiry, overdue alerts, release retries, gauges

Rules enforced here (not in the interfaces, so the API, the page and the CLI cannot differ):
- a reviewer is a configured identity; the requesting client (and the fhirUser who sent the
  write) can never decide it (403); deciding needs one of the item's roles (403);
- `required` approvals from distinct reviewers (1, or 2 with four-eyes) release the write; one
  rejection (reason required, stored sealed, never audited) ends it;
- every transition is a compare-and-set on the sealed item: two concurrent approvals give one
  release; an expired item is never approved nor released (410);
- audit: `review` records (held / approved / rejected / expired) as field dicts the caller
  appends; no free text in them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from sidecar.alerts import Alert
from sidecar.approvals.config import ApprovalsConfig
from sidecar.approvals.store import (
    FINAL,
    HoldStore,
    Item,
    Sealer,
    StateUnavailable,
    new_item_id,
    valid_id,
    with_release,
)
from sidecar.audit.record import audit_user, derive_key, pseudonym
from sidecar.errors import Refusal, operation_outcome
from sidecar.state.base import StateStore

if TYPE_CHECKING:
    from sidecar.approvals.metrics import ApprovalMetrics

STATUS_PREFIX = "/.fhir-sidecar/requests/"
OVERDUE_KIND = "review_overdue"
OVERDUE_DETAIL = "held write waiting for review longer than configured"
MAX_REASON_CHARS = 1000
POLL_RETRY_AFTER_S = 10


def status_path(item_id: str) -> str:
    return STATUS_PREFIX + item_id


def item_id_from_status_path(path: str) -> str | None:
    """`/.fhir-sidecar/requests/<id>` -> id (None for anything else)."""
    if not path.startswith(STATUS_PREFIX):
        return None
    rest = path[len(STATUS_PREFIX):]
    return rest if valid_id(rest) else None


class ReviewError(Exception):
    """A refused review action: `status` is the HTTP status for the API/page. `audit` holds
    records the caller must still append (e.g. the item expired on this very call)."""

    def __init__(self, status: int, reason: str, audit: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.audit = list(audit)


@dataclass(frozen=True, slots=True)
class ReviewerIdentity:
    """An authenticated reviewer (from `auth.ReviewerDirectory`)."""

    id: str
    roles: frozenset[str]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    client_id: str
    correlation_id: str
    method: str
    target: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    interaction: str
    resource_type: str | None = None
    resource_id: str | None = None
    content_type: str | None = None
    fingerprint: str = ""
    principal: Mapping[str, Any] = field(default_factory=dict)
    current: Any = None
    proposed: Any = None
    reasons: tuple[str, ...] = ()
    four_eyes: bool = False
    policy_revision: str | None = None


def _strip_respond_async(value: str) -> str | None:
    kept = [p.strip() for p in value.split(",") if p.strip() and p.strip().lower() != "respond-async"]
    return ", ".join(kept) or None


def hold_request_from(raw: Any, req: Any, cls: Any, who: Any, prior: Any = None,
                      decision: Mapping[str, Any] | None = None, *, policy_revision: str | None = None) -> HoldRequest:
    """Build a HoldRequest from the pipeline's objects (RawRequest, FhirRequest, Classification,
    Principal, Prior, the policy decision). Stored: the allowlisted headers and the body bytes as
    they would be forwarded; `Prefer: respond-async` is the app's request to *us*, not kept."""
    from sidecar.idempotency import request_fingerprint

    headers: list[tuple[str, str]] = []
    for k, v in sorted(req.headers.items()):
        if k == "prefer":
            v = _strip_respond_async(v)
            if v is None:
                continue
        headers.append((k, v))
    target = raw.target.decode("latin-1") if isinstance(raw.target, bytes) else str(raw.target)
    t = req.target
    decision = decision or {}
    reasons = tuple(str(r)[:300] for r in (decision.get("reasons") or [])[:10])
    principal = {"auth": who.auth, "scopes": list(who.scopes.as_strings()), "tenant": who.tenant,
                 "patient": who.patient, "user": who.user, "contexts": list(who.contexts)}
    return HoldRequest(
        client_id=who.client_id or "", correlation_id=req.correlation_id, method=req.method, target=target,
        path=t.path, headers=tuple(headers), body=req.raw_body, interaction=cls.interaction,
        resource_type=t.resource_type if t.resource_type not in (None, "*") else None, resource_id=t.id,
        content_type=req.content_type, fingerprint=request_fingerprint(req), principal=principal,
        current=getattr(prior, "current", None), proposed=getattr(prior, "result", None), reasons=reasons,
        four_eyes=decision.get("four_eyes") is True, policy_revision=policy_revision)


@dataclass(frozen=True, slots=True)
class Held:
    item_id: str
    status_path: str
    expires: float
    repeat: bool                 # an identical write was already pending: the same hold
    audit: dict[str, Any]        # kind review, decision held

    def refusal(self, respond_async: bool) -> Refusal:
        """DESIGN's answers: 202 + Content-Location with `Prefer: respond-async`, else 403
        naming the review id and status URL (never a false success)."""
        loc = (("Content-Location", self.status_path),)
        if respond_async:
            return Refusal(202, f"held for review {self.item_id}: poll {self.status_path} for the outcome",
                           "informational", loc, decision="review")
        return Refusal(403, f"held for review {self.item_id} (status {self.status_path}); "
                            "nothing is written unless a reviewer approves", "forbidden", loc, decision="review")


@dataclass(frozen=True, slots=True)
class Release:
    """Exactly what to forward once approved. The pipeline re-checks kill switch, scopes and
    policy (with `context.approvals` = `approvals`) and forwards under `release_credentials`."""

    item_id: str
    token: str                   # pass back to record_outcome / release_refused
    client_id: str
    correlation_id: str
    method: str
    target: str                  # origin-form path + query as received (base path included)
    headers: tuple[tuple[str, str], ...]
    body: bytes
    interaction: str
    resource_type: str | None
    principal: Mapping[str, Any]
    approvals: tuple[str, ...]   # reviewer ids -> context.approvals
    idempotency_key: str         # derived from the item id: a second release cannot write twice

    def raw_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers for a RawRequest: the stored ones + correlation id + the idempotency key."""
        return self.headers + (("x-correlation-id", self.correlation_id), ("idempotency-key", self.idempotency_key))


def release_principal(rel: Release, client: Any) -> Any:
    """The Principal a release runs as: the requesting client as configured *now* (`client` is
    its `config.Client`; a removed client means: refuse), with the scopes, patient and user it had
    when the write was held, intersected with today's ceiling (a scope revoked since is gone)."""
    from sidecar.identity import principal_for
    from sidecar.scopes import ScopeSet

    base = principal_for(client)
    held = ScopeSet.from_strings(list(rel.principal.get("scopes") or []))
    return replace(base, scopes=held.intersect(base.scopes),
                   contexts=tuple(rel.principal.get("contexts") or base.contexts),
                   patient=rel.principal.get("patient"), user=rel.principal.get("user"))


@dataclass(frozen=True, slots=True)
class ReviewResult:
    item: Item
    audit: list[dict[str, Any]]
    release: Release | None = None
    decision_seconds: float | None = None   # created -> final decision (metrics: time to decision)

    @property
    def status(self) -> str:
        return self.item.status


@dataclass
class SweepResult:
    audit: list[dict[str, Any]] = field(default_factory=list)     # expired records
    alerts: list[Alert] = field(default_factory=list)            # review_overdue
    retry: list[Release] = field(default_factory=list)           # approved, not released within the lease
    pending: int = 0
    oldest_pending_s: float = 0.0


def idempotency_key_for(item_id: str) -> str:
    return f"approval.{item_id}"


class ApprovalService:
    def __init__(self, store: StateStore, cfg: ApprovalsConfig, *, keys: Mapping[str, bytes], active_key: str,
                 pseudonym_key: bytes | None = None, metrics: ApprovalMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.holds = HoldStore(store, Sealer(keys, active_key), keep_s=cfg.keep_s, max_pending=cfg.max_pending,
                               clock=clock)
        self.pseudonym_key = pseudonym_key
        self.metrics = metrics
        self._clock = clock
        self._alerted: set[str] = set()

    @classmethod
    def from_secret(cls, store: StateStore, cfg: ApprovalsConfig, secret: bytes, **kw: Any) -> ApprovalService:
        """One key: `derive_key(secret, "approvals")` under key id `a1`."""
        return cls(store, cfg, keys={"a1": derive_key(secret, "approvals")}, active_key="a1", **kw)

    # -- audit fields -----------------------------------------------------------------------------

    def audit_fields(self, item: Item, decision: str, reviewer: str | None = None,
                     reasons: list[str] | None = None) -> dict[str, Any]:
        f: dict[str, Any] = {"kind": "review", "review_id": item.id, "decision": decision,
                             "client_id": item.client_id or None, "correlation_id": item.correlation_id or None,
                             "method": item.method, "interaction": item.interaction,
                             "resource_type": item.resource_type, "reviewer": reviewer,
                             "tenant": item.principal.get("tenant"), "policy_revision": item.policy_revision}
        key = self.pseudonym_key
        if key is not None:
            if item.resource_id and item.resource_type:
                f["resource_id"] = pseudonym(key, "resource", f"{item.resource_type}/{item.resource_id}")
            if item.principal.get("patient"):
                f["patient"] = pseudonym(key, "patient", str(item.principal["patient"]))
            f["user"] = audit_user(key, item.principal.get("user"))
        if reasons:
            f["reasons"] = reasons
        return {k: v for k, v in f.items() if v is not None}

    # -- hold -------------------------------------------------------------------------------------

    async def hold(self, hr: HoldRequest) -> Held:
        now = self._clock()
        rule = self.cfg.rule_for(hr.resource_type, hr.interaction, hr.client_id)
        item = Item(
            id=new_item_id(), status="pending", created=now, expires=now + self.cfg.ttl_s,
            client_id=hr.client_id, correlation_id=hr.correlation_id, method=hr.method.upper(), target=hr.target,
            path=hr.path, headers=tuple(hr.headers), body=bytes(hr.body), interaction=hr.interaction,
            resource_type=hr.resource_type, resource_id=hr.resource_id, content_type=hr.content_type,
            fingerprint=hr.fingerprint, principal=dict(hr.principal), current=hr.current, proposed=hr.proposed,
            reasons=tuple(hr.reasons), policy_revision=hr.policy_revision,
            required=2 if (rule.four_eyes or hr.four_eyes) else 1, roles=tuple(rule.roles))
        if hr.fingerprint and hr.client_id:
            existing = await self.holds.claim_fingerprint(hr.client_id, hr.fingerprint, item.id, self.cfg.ttl_s)
            if existing is not None:
                old = await self.holds.load(existing)
                if old is not None:
                    return Held(old.id, status_path(old.id), old.expires, True,
                                self.audit_fields(old, "held", reasons=["repeat of a pending held write"]))
        try:
            await self.holds.create(item)
        except BaseException:
            if hr.fingerprint and hr.client_id:
                try:
                    await self.holds.drop_fingerprint(hr.client_id, hr.fingerprint, item.id)
                except StateUnavailable:
                    pass
            raise
        if self.metrics is not None:
            self.metrics.held()
        reasons = list(item.reasons) + ([f"needs {item.required} approvals"] if item.required > 1 else [])
        return Held(item.id, status_path(item.id), item.expires, False, self.audit_fields(item, "held", reasons=reasons))

    # -- read -------------------------------------------------------------------------------------

    async def get(self, item_id: str) -> Item | None:
        """The item as stored, with a pending item past its expiry shown as expired."""
        item = await self.holds.load(item_id)
        if item is not None and item.status == "pending" and self._clock() >= item.expires:
            item = replace(item, status="expired")
        return item

    async def list_items(self, *, status: str | None = None, client: str | None = None, resource_type: str | None = None,
                   interaction: str | None = None) -> list[dict[str, Any]]:
        rows = await self.holds.index(client=client, resource_type=resource_type, interaction=interaction)
        now = self._clock()
        for r in rows:
            if r["status"] == "pending" and now >= r["expires"]:
                r["status"] = "expired"
        return [r for r in rows if status is None or r["status"] == status]

    # -- decide -----------------------------------------------------------------------------------

    def _may_decide(self, cur: Item, who: ReviewerIdentity) -> None:
        user = cur.principal.get("user")
        if who.id == cur.client_id or (user and who.id == user):
            raise ReviewError(403, "the requesting client or user cannot review its own write")
        if not set(cur.roles) & set(who.roles):
            raise ReviewError(403, "this reviewer lacks a role that may decide this item")

    def _expire(self, cur: Item, now: float) -> Item:
        return replace(cur, status="expired", decided_at=now)

    async def _expired_error(self, before: Item, after: Item) -> ReviewError:
        await self._after_final(after)
        return ReviewError(410, "the held write expired", [self.audit_fields(after, "expired")])

    async def approve(self, item_id: str, who: ReviewerIdentity) -> ReviewResult:
        token = secrets.token_urlsafe(18)
        now_box: list[float] = []

        def change(cur: Item) -> Item:
            now = self._clock()
            now_box[:] = [now]
            self._may_decide(cur, who)
            if cur.final:
                raise ReviewError(409, f"the held write is already {cur.status}")
            if cur.status == "pending" and now >= cur.expires:
                return self._expire(cur, now)
            if cur.status != "pending":
                raise ReviewError(409, f"the held write is already {cur.status}")
            if who.id in cur.approvers:
                raise ReviewError(409, "this reviewer has already approved this write")
            new = replace(cur, approvals=cur.approvals + ((who.id, now),))
            if len(new.approvals) >= cur.required:
                new = with_release(replace(new, status="approved", decided_at=now), token, now)
            return new

        got = await self.holds.update(item_id, change)
        if got is None:
            raise ReviewError(404, "no such held write")
        before, after = got
        if after.status == "expired":
            raise await self._expired_error(before, after)
        n, m = len(after.approvals), after.required
        audit = [self.audit_fields(after, "approved", who.id, [f"approval {n} of {m}"] if m > 1 else None)]
        if after.status != "approved":
            return ReviewResult(after, audit)
        waited = max(0.0, (after.decided_at or now_box[0]) - after.created)
        if self.metrics is not None:
            self.metrics.decided("approved", waited)
        return ReviewResult(after, audit, self._release_of(after), waited)

    async def reject(self, item_id: str, who: ReviewerIdentity, reason: Any) -> ReviewResult:
        reason = clean_reason(reason)

        def change(cur: Item) -> Item:
            now = self._clock()
            self._may_decide(cur, who)
            if cur.final:
                raise ReviewError(409, f"the held write is already {cur.status}")
            if cur.status == "pending" and now >= cur.expires:
                return self._expire(cur, now)
            if cur.status != "pending":
                raise ReviewError(409, f"the held write is already {cur.status}")
            return replace(cur, status="rejected", decided_at=now,
                           rejection={"reviewer": who.id, "at": now, "reason": reason})

        got = await self.holds.update(item_id, change)
        if got is None:
            raise ReviewError(404, "no such held write")
        before, after = got
        if after.status == "expired":
            raise await self._expired_error(before, after)
        await self._after_final(after)
        waited = max(0.0, (after.decided_at or 0.0) - after.created)
        if self.metrics is not None:
            self.metrics.decided("rejected", waited)
        return ReviewResult(after, [self.audit_fields(after, "rejected", who.id)], None, waited)

    async def _after_final(self, item: Item) -> None:
        if item.fingerprint and item.client_id:
            try:
                await self.holds.drop_fingerprint(item.client_id, item.fingerprint, item.id)
            except StateUnavailable:
                pass  # the fingerprint lapses with ttl_s; a stale one is taken over by the next hold
        self._alerted.discard(item.id)

    # -- release ----------------------------------------------------------------------------------

    def _release_of(self, item: Item) -> Release:
        assert item.release is not None
        return Release(item_id=item.id, token=str(item.release["token"]), client_id=item.client_id,
                       correlation_id=item.correlation_id, method=item.method, target=item.target,
                       headers=item.headers, body=item.body, interaction=item.interaction,
                       resource_type=item.resource_type, principal=dict(item.principal),
                       approvals=item.approvers, idempotency_key=idempotency_key_for(item.id))

    async def claim_release(self, item_id: str, *, force: bool = False) -> tuple[Release | None, list[dict[str, Any]]]:
        """Re-claim an approved write whose release did not finish within `release_lease_s`
        (`force`: now). Returns (Release or None, audit records: `expired` if it ran out). The
        idempotency key makes a re-release safe: a write already sent is never sent again."""
        token = secrets.token_urlsafe(18)

        def change(cur: Item) -> Item | None:
            now = self._clock()
            if cur.status != "approved":
                return None
            claimed = float((cur.release or {}).get("claimed_at", 0.0))
            if not force and now - claimed < self.cfg.release_lease_s:
                return None  # a release is (or may still be) in flight
            if now >= cur.expires:
                return self._expire(cur, now)  # never released late
            return with_release(cur, token, now)

        got = await self.holds.update(item_id, change)
        if got is None:
            return None, []
        before, after = got
        if after.status == "expired" and before.status != "expired":
            await self._after_final(after)
            return None, [self.audit_fields(after, "expired")]
        if after.status == "approved" and after.release and after.release.get("token") == token:
            return self._release_of(after), []
        return None, []

    async def record_outcome(self, item_id: str, status: int | None, location: str | None = None, *,
                             token: str | None = None) -> Item | None:
        """The upstream answered a released write (`status`; None: no answer, outcome unknown).
        `location`: the Location header as the app would see it (already rewritten to the
        sidecar's base). 2xx -> released, anything else -> failed. Ignored (returns None) when the
        item is not approved any more or `token` is not the current release's."""
        def change(cur: Item) -> Item | None:
            mine = token is not None and (cur.release or {}).get("token") == token
            # an approved write expired by a lapsed lease may still have been written: the answer wins
            if not (cur.status == "approved" and (token is None or mine)) and not (cur.status == "expired" and mine):
                return None
            ok = status is not None and 200 <= status < 300
            return replace(cur, status="released" if ok else "failed",
                           outcome={"status": status, "location": location if ok else None,
                                    "at": self._clock(), "refused": False})

        got = await self.holds.update(item_id, change)
        if got is None or got[0] == got[1]:
            return None
        await self._after_final(got[1])
        return got[1]

    async def release_refused(self, item_id: str, status: int, *, token: str | None = None,
                              retry: bool = False) -> Item | None:
        """The sidecar refused the release itself (kill switch, scopes, policy, state...). `retry`
        (transient: 429/503): stays approved and `sweep` offers it again until it expires;
        otherwise it fails with that status (shown to the polling app)."""
        def change(cur: Item) -> Item | None:
            if cur.status != "approved" or (token is not None and (cur.release or {}).get("token") != token):
                return None
            if retry:
                return replace(cur, release={**(cur.release or {}), "claimed_at": 0.0})
            return replace(cur, status="failed", outcome={"status": status, "location": None,
                                                          "at": self._clock(), "refused": True})

        got = await self.holds.update(item_id, change)
        if got is None or got[0] == got[1]:
            return None
        if got[1].final:
            await self._after_final(got[1])
        return got[1]

    # -- async status for the app -----------------------------------------------------------------

    async def status_response(self, item_id: str, client_id: str | None) -> tuple[int, dict[str, Any]]:
        """`GET /.fhir-sidecar/requests/{id}` (FHIR asynchronous request pattern).

        - unknown id, or not the requesting client: 404 OperationOutcome (no oracle);
        - pending or approved (release in progress): 202 + informational OperationOutcome
          (send `Retry-After: POLL_RETRY_AFTER_S`);
        - final: 200 + a `batch-response` Bundle with one entry whose `response.status` is the
          held write's own result: released -> the upstream's status + `location`; failed -> the
          upstream's status (or the sidecar's refusal, or 504 when the outcome is unknown);
          rejected / expired -> "403 Forbidden" with an `outcome` OperationOutcome
          (forbidden / expired). The rejection reason is not shown to the app."""
        item = await self.get(item_id) if valid_id(item_id or "") else None
        if item is None or not client_id or item.client_id != client_id:
            return 404, operation_outcome("not-found", "no such held request")
        if item.status in ("pending", "approved"):
            what = ("approved; being released" if item.status == "approved"
                    else f"held for review ({len(item.approvals)} of {item.required} approvals)")
            return 202, operation_outcome("informational", f"{what}; poll again later", "information")
        resp: dict[str, Any]
        oc = item.outcome or {}
        if item.status == "released":
            resp = {"status": status_line(int(oc.get("status") or 200))}
            if oc.get("location"):
                resp["location"] = oc["location"]
        elif item.status == "failed":
            code = oc.get("status")
            if code is None:
                resp = {"status": status_line(504), "outcome": operation_outcome(
                    "timeout", "the EHR did not answer: the outcome of the write is unknown")}
            elif oc.get("refused"):
                resp = {"status": status_line(int(code)), "outcome": operation_outcome(
                    "forbidden" if code == 403 else "transient", "the sidecar refused the approved write when releasing it")}
            else:
                resp = {"status": status_line(int(code)), "outcome": operation_outcome(
                    "processing", "the EHR refused the approved write")}
        elif item.status == "rejected":
            resp = {"status": status_line(403), "outcome": operation_outcome(
                "forbidden", f"the held write was rejected by review {item.id}")}
        else:
            resp = {"status": status_line(403), "outcome": operation_outcome(
                "expired", f"the held write expired without a review decision ({item.id})")}
        return 200, {"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": resp}]}

    # -- housekeeping -----------------------------------------------------------------------------

    async def sweep(self) -> SweepResult:
        """Run every ~30 s on one replica (or all: every step is a CAS). Expires undecided items
        (audit `expired`), re-offers approved writes whose release did not finish, raises one
        `review_overdue` alert per item waiting longer than `alert_after_s`, repairs index rows
        that lag behind their item, and updates the metrics gauges."""
        out = SweepResult()
        now = self._clock()
        for row in await self.holds.index():
            if row["status"] in FINAL:
                continue
            item = await self.holds.load(row["id"])
            if item is None:
                await self.holds.drop_index({row["id"]})
                continue
            if item.index_entry() != row:
                await self.holds.put_index(item)
            if item.final:
                continue
            if item.status == "pending" and now >= item.expires:
                got = await self.holds.update(item.id, lambda c: self._expire(c, self._clock())
                                              if c.status == "pending" and self._clock() >= c.expires else None)
                if got is not None and got[1].status == "expired" and got[0].status != "expired":
                    await self._after_final(got[1])
                    out.audit.append(self.audit_fields(got[1], "expired"))
                    if self.metrics is not None:
                        self.metrics.decided("expired", max(0.0, now - item.created))
                continue
            if item.status == "approved":
                rel, audit = await self.claim_release(item.id)
                out.audit.extend(audit)
                if rel is not None:
                    out.retry.append(rel)
                continue
            out.pending += 1
            waited = now - item.created
            out.oldest_pending_s = max(out.oldest_pending_s, waited)
            limit = self.cfg.alert_after_s
            if limit is not None and waited > limit and item.id not in self._alerted:
                self._alerted.add(item.id)
                out.alerts.append(Alert(OVERDUE_KIND, item.client_id, OVERDUE_DETAIL, now, item.correlation_id or None))
        if self.metrics is not None:
            self.metrics.set_pending(out.pending, out.oldest_pending_s)
        return out


def clean_reason(reason: Any) -> str:
    if not isinstance(reason, str):
        raise ReviewError(400, "a rejection needs a reason")
    text = "".join(ch for ch in reason.replace("\r\n", "\n") if ch == "\n" or ch.isprintable()).strip()
    if not text:
        raise ReviewError(400, "a rejection needs a reason")
    if len(text) > MAX_REASON_CHARS:
        raise ReviewError(400, f"the reason is longer than {MAX_REASON_CHARS} characters")
    return text


def status_line(code: Any) -> str:
    """`201` -> "201 Created" (FHIR's entry.response.status form)."""
    try:
        return f"{int(code)} {HTTPStatus(int(code)).phrase}"
    except (ValueError, TypeError):
        return str(code)


@dataclass
class Hooks:
    """How the interfaces hand results to the running sidecar.

    `audit(fields)`: append one audit record (the lead: `rt.audit.append(fields, durable=True)`).
    `release(rel)`: forward an approved write through the pipeline (see the package README);
    awaited, so the reviewer sees the outcome; if it raises, the item stays approved and `sweep`
    re-offers it after `release_lease_s`."""

    audit: Callable[[dict[str, Any]], Any]
    release: Callable[[Release], Any] | None = None

    async def apply(self, result: ReviewResult | ReviewError) -> None:
        import inspect

        from sidecar.logs import get_logger

        for rec in result.audit:
            out = self.audit(rec)
            if inspect.isawaitable(out):
                await out
        rel = getattr(result, "release", None)
        if rel is not None and self.release is not None:
            try:
                out = self.release(rel)
                if inspect.isawaitable(out):
                    await out
            except Exception as e:  # the sweep retries it; never lose the decision over it
                get_logger("sidecar.approvals").error("release failed; it will be retried",
                                                      error_type=type(e).__name__, correlation_id=rel.correlation_id)
