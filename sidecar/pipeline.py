"""The pipeline: parse -> classify -> identify -> guard -> audit, once per request.

It knows nothing of mitmproxy: the adapter hands it a `RawRequest` and gets a `Decision`.
A stage refuses by raising `Refusal`; any other exception escapes to the adapter, which
answers 503 and forwards nothing (fail closed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar import guards
from sidecar.audit.record import pseudonym
from sidecar.audit.writer import AuditUnavailable, AuditWriter
from sidecar.classify import classify
from sidecar.config import Config
from sidecar.credentials import CredentialUnavailable
from sidecar.alerts import AlertEvent
from sidecar.idempotency import Receipt, Replay, Reserved, disposition, parse_key, request_fingerprint
from sidecar.state import StateUnavailable
from sidecar.context_guard import check_context
from sidecar.errors import Refusal, unavailable
from sidecar.identity import Identities, Principal
from sidecar.killswitch import KillSwitch
from sidecar.logs import get_logger
from sidecar.parse import parse_request
from sidecar.prior import Prior, PriorStateReader, apply_json_patch, check_if_match
from sidecar.request import Classification, FhirRequest, RawRequest


log = get_logger("sidecar.pipeline")
# Interactions that read the stored version first (conditional forms address no single id).
PRIOR_STATE = frozenset({"update", "patch", "delete"})


class PolicyEngine(Protocol):
    revision: str

    async def decide(self, input_doc: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything built from one config load. Swapped whole on reload, never mutated."""

    cfg: Config
    identities: Identities
    killswitch: KillSwitch
    audit: AuditWriter
    pseudonym_key: bytes
    policy: PolicyEngine | None = None
    prior: PriorStateReader | None = None
    svc: Any = None   # sidecar.services.Services (receipts, limits, breaker, credentials, metrics, alerts)


@dataclass(frozen=True, slots=True)
class Decision:
    correlation_id: str
    traceparent: str
    started: float
    refusal: Refusal | None = None
    request: FhirRequest | None = None
    classification: Classification | None = None
    principal: Principal | None = None
    intent_seq: int | None = None
    prior: Prior | None = None
    confine_patient: bool = False   # a patient-context read: the response body is checked too
    reservation: Reserved | None = None   # the Idempotency-Key this write holds
    replay: Receipt | None = None         # a completed write repeated: answered from its receipt
    authorization: str | None = None      # injected upstream credential (never logged)
    probe: bool = False                   # this request is the breaker's half-open probe

    @property
    def forward(self) -> bool:
        return self.refusal is None and self.replay is None


class Pipeline:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.svc = rt.svc
        self._dedupe_clients = frozenset(c.id for c in rt.cfg.clients if c.dedupe)
        self._in_flight_s = rt.cfg.upstream.timeout_s + 30
        up = rt.cfg.upstream
        self._base_path = up.base_path
        self._upstream_base = up.base_url
        self._max_body = rt.cfg.fhir.max_body_bytes

    # -- stages (methods so a test can make any one of them raise) ---------------------------

    def parse(self, raw: RawRequest, correlation: str, trace: str) -> FhirRequest:
        bases: tuple[str, ...] = ()
        if raw.mode == "reverse" and raw.host:
            bases = (f"{raw.scheme}://{raw.host}{self._base_path}",)
        return parse_request(
            raw, base_path=self._base_path, max_body_bytes=self._max_body,
            sidecar_bases=bases, upstream_base=self._upstream_base,
            correlation=correlation, trace=trace,
        )

    def classify(self, req: FhirRequest) -> Classification:
        return classify(req, upstream_base=self._upstream_base)

    async def identify(self, req: FhirRequest, cls: Classification) -> Principal:
        return await self.rt.identities.identify(req.credentials, public=cls.public)

    async def guard(self, req: FhirRequest, cls: Classification, who: Principal, *, raw: RawRequest | None = None,
                    release: Any = None, seen: list | None = None) -> tuple[Prior | None, bool]:
        guards.check_scopes(cls, who)
        guards.check_valid(req, cls)
        prior = await self.prior_state(req, cls, who)
        if seen is not None:
            seen.append(prior)
        confine = check_context(req, cls, who, prior, self._upstream_base)
        if self.rt.policy is not None and cls.is_write:
            await self._policy(req, cls, who, prior, raw=raw, release=release)
        return prior, confine

    async def prior_state(self, req: FhirRequest, cls: Classification, who: Principal) -> Prior | None:
        """update/patch/delete of one resource: read `current`, check If-Match, patch it."""
        t = req.target
        if cls.interaction not in PRIOR_STATE or self.rt.prior is None or not t.resource_type or not t.id:
            return None
        auth = req.credentials.get("authorization") if who.auth == "bearer" else None
        cred = self.svc.credentials.get(who.client_id or "")
        if cred is not None:
            try:
                auth = await cred.authorization()
            except CredentialUnavailable:
                raise unavailable("secret store unavailable: no upstream credential") from None
        prior = await self.rt.prior.read(t.resource_type, t.id, correlation_id=req.correlation_id, authorization=auth)
        check_if_match(req.headers.get("if-match"), prior)
        if cls.interaction == "patch":
            if prior.current is None:
                raise Refusal(404, "the resource to patch does not exist", "not-found")
            if not isinstance(req.body, list):
                raise Refusal(403, "FHIRPath Patch is not supported: use JSON Patch", "not-supported")
            result = apply_json_patch(prior.current, req.body)
            guards.validate_result(result)
            prior = Prior(prior.current, prior.etag, result)
        return prior

    async def audit(self, req: FhirRequest, cls: Classification, who: Principal, raw: RawRequest, *,
                    release: Any = None) -> int | None:
        """Writes: a durable `intent` before anything leaves. Reads: the sink must be healthy."""
        a = self.rt.audit
        if cls.is_write:
            try:
                # the one case where the sidecar changes a body: the audit record says so
                note = ["body URLs rewritten from the sidecar base to the upstream base"] if req.body_rewritten else None
                fields = self._fields("intent", req, cls, who, raw, decision="allow", reasons=note)
                if release is not None:  # the release names the hold and who approved it
                    fields.update(review_id=release.item_id, reviewer=",".join(release.approvals)[:1000])
                rec = await a.append(fields, durable=True)
            except AuditUnavailable:
                raise unavailable("audit sink unavailable") from None
            return int(rec["seq"])
        if not a.healthy and not self.rt.cfg.audit.reads_fail_open:
            raise unavailable("audit sink unavailable")
        return None

    # -- the walk ------------------------------------------------------------------------------

    async def decide(self, raw: RawRequest, correlation: str, trace: str, *, release: Any = None) -> Decision:
        """`release`: an approved held write (sidecar.approvals.service.Release) being forwarded:
        it runs as the original client (no credential to identify), under the release credential,
        with the reviewers in `context.approvals`; it is never held a second time."""
        started = time.monotonic()
        req: FhirRequest | None = None
        cls: Classification | None = None
        who: Principal | None = None
        held: Reserved | None = None
        seen: list[Prior | None] = []  # the stored version a refusal was decided on (recording, replay)
        try:
            try:
                req = self.parse(raw, correlation, trace)
                cls = self.classify(req)
                who = release.principal_now if release is not None else await self.identify(req, cls)
                await self.admit(cls, who)
                held, replay = await self.reserve(raw, req, cls, who)
                if replay is not None:
                    await self._record(self._fields("replay", req, cls, who, raw, decision="replay",
                                                    reasons=["idempotent replay of a completed write"]))
                    return Decision(correlation, trace, started, None, req, cls, who, replay=replay)
                prior, confine = await self.guard(req, cls, who, raw=raw, release=release, seen=seen)
                auth, probe = await self.upstream_gate(cls, who, release=release)
                seq = await self.audit(req, cls, who, raw, release=release)
                if held is not None:
                    await self.svc.idempotency.mark_sent(who.client_id or "", held.key, held.token, self._in_flight_s)
            except StateUnavailable as e:
                raise e.refusal() from None
        except Refusal as refusal:
            if held is not None and who is not None:
                await self._release(who.client_id or "", held)
            await self._record_refusal(refusal, raw, req, cls, who, correlation)
            self.svc.metrics.observe_decision(time.monotonic() - started)
            denied = Decision(correlation, trace, started, refusal, req, cls, who, prior=seen[0] if seen else None)
            self.observe(denied, refusal.status, raw)
            return denied
        self.svc.metrics.observe_decision(time.monotonic() - started)
        return Decision(correlation, trace, started, None, req, cls, who, seq, prior, confine, held,
                        authorization=auth, probe=probe)

    async def admit(self, cls: Classification, who: Principal) -> None:
        """Kill switch, then the client's rate limit (DESIGN's guard order)."""
        refusal = self.rt.killswitch.check(who.client_id, cls.is_write)
        if refusal is not None:
            raise refusal
        if who.client_id is not None:
            await self.svc.ratelimit.check(who.client_id, cls.is_write, cost=len(cls.entries) or 1)

    async def reserve(self, raw: RawRequest, req: FhirRequest, cls: Classification,
                      who: Principal) -> tuple[Reserved | None, Receipt | None]:
        """Idempotency lookup before scopes and prior state: a repeat never writes twice."""
        if not cls.is_write or who.client_id is None:
            return None, None
        idem = self.svc.idempotency
        key = parse_key(raw.header_values("idempotency-key"))
        if key is not None:
            found = await idem.lookup_or_reserve(who.client_id, key, request_fingerprint(req))
        elif who.client_id in self._dedupe_clients and idem.dedupe_window_s > 0:
            found = await idem.dedupe_or_reserve(who.client_id, request_fingerprint(req))
        else:
            return None, None  # nothing to look up: no fingerprint to compute
        if isinstance(found, Reserved):
            return found, None
        if isinstance(found, Replay):
            return None, found.receipt
        raise found.refusal()

    async def upstream_gate(self, cls: Classification, who: Principal, *, release: Any = None) -> tuple[str | None, bool]:
        """The EHR credential to inject, then back-off and breaker: never hammer a struggling EHR."""
        auth = None
        # a held write is released under approvals.release_credentials: the app's token has expired
        cred = self.svc.release_credential if release is not None else self.svc.credentials.get(who.client_id or "")
        if cred is not None:
            try:
                auth = await cred.authorization()
            except CredentialUnavailable:
                raise unavailable("secret store unavailable: no upstream credential") from None
        await self.svc.backoff.check(cls.is_write)
        probe = await self.svc.breaker.admit()
        return auth, probe

    @staticmethod
    def needs_answer(d: Decision, status: int | None) -> bool:
        """Whether `finish` reads the answer's headers and body: for the receipt of an Idempotency-Key,
        or a Retry-After on 429/503. Otherwise the adapter need not copy them out."""
        return d.reservation is not None or status in (429, 503)

    async def finish(self, d: Decision, status: int | None, raw: RawRequest, *,
                     headers: tuple[tuple[str, str], ...] = (), body: bytes = b"", outcome: str | None = None,
                     sent: bool = True, upstream_failed: bool = True) -> None:
        """After the upstream answered (status) or failed (None): breaker, back-off, receipt,
        audit `outcome`/`read`, metrics and alerts. The response is already decided; nothing here
        may turn a write that happened into a false failure."""
        if d.request is None or d.classification is None or d.principal is None:
            return
        cls, who = d.classification, d.principal
        retry_after = next((v for k, v in headers if k.lower() == "retry-after"), None) if headers else None
        svc = self.svc
        # each step on its own: state store trouble after the fact is logged, the answer stands
        if status is not None or upstream_failed:  # a client that went away says nothing about the EHR
            await self._after(svc.breaker.record(status, probe=d.probe), d)
        if status in (429, 503):
            await self._after(svc.backoff.record(status, retry_after), d)
        if d.reservation is not None:
            await self._after(self._settle_receipt(d, status, headers, body, retry_after is not None, sent), d)
        if status == 401:
            cred = svc.credentials.get(who.client_id or "")
            if cred is not None:
                cred.invalidate()
        if outcome is None:
            outcome = "committed" if status is not None and 200 <= status < 300 else "failed"
        kind = "outcome" if cls.is_write else "read"
        # a read refused after the EHR answered (patient context): the record says so
        refused = d.refusal
        fields = self._fields(kind, d.request, cls, who, raw, decision=refused.decision if refused else "allow",
                              reasons=[refused.reason] if refused else None)
        fields["upstream_status"] = status
        fields["latency_ms"] = round((time.monotonic() - d.started) * 1000, 2)
        if kind == "outcome":
            fields["outcome"] = outcome
        await self._record(fields)
        self.observe(d, status if status is not None else 502, raw, upstream_failed=status is None or status >= 500)

    @staticmethod
    async def _after(step: Any, d: Decision) -> None:
        try:
            await step
        except Exception as e:  # state store trouble after the fact: logged, the answer stands
            log.error("after-response step failed", error_type=type(e).__name__, correlation_id=d.correlation_id)

    async def _settle_receipt(self, d: Decision, status: int | None, headers: tuple[tuple[str, str], ...],
                              body: bytes, retry_after: bool, sent: bool = True) -> None:
        held, who = d.reservation, d.principal
        if held is None or who is None:
            return
        idem, cid = self.svc.idempotency, who.client_id or ""
        what = disposition(status, retry_after) if sent else "release"  # nothing left: the key is free
        if what == "complete" and status is not None:
            ok = await idem.complete(cid, held.key, held.token, idem.make_receipt(status, headers, body, d.correlation_id))
        elif what == "release":
            ok = await idem.release(cid, held.key, held.token)
        else:
            ok = await idem.mark_unknown(cid, held.key, held.token)
        if not ok:  # the lease ran out and someone else holds the key now: say so loudly
            log.error("idempotency reservation lost before the receipt was stored", correlation_id=d.correlation_id,
                      client_id=who.client_id)

    def observe(self, d: Decision, status: int, raw: RawRequest, *, upstream_failed: bool = False) -> None:
        """Metrics and anomaly alerts for one finished request (never raises)."""
        try:
            cls, who = d.classification, d.principal
            decision = "allow" if d.refusal is None else d.refusal.decision
            if d.replay is not None:
                decision = "replay"
            self.svc.metrics.record_request(
                interaction=cls.interaction if cls else None,
                resource_type=d.request.target.resource_type if d.request else None,
                client=who.client_id if who else None, decision=decision, status=status)
            if d.forward:
                self.svc.metrics.observe_upstream(time.monotonic() - d.started)
            alerts = self.svc.alerts.observe(AlertEvent(
                ts=time.time(), client_id=who.client_id if who else None, source_ip=raw.client_addr or None,
                is_write=bool(cls and cls.is_write), decision=decision,
                upstream_status=status if d.forward else None, upstream_failed=upstream_failed and d.forward,
                correlation_id=d.correlation_id))
            for a in alerts:
                log.warning("alert", **a.log_fields())
                self.svc.metrics.alert(a.kind)
                if self.svc.webhook is not None:
                    self.svc.webhook.submit(a)
                asyncio.get_running_loop().create_task(self._record(a.audit_fields()))
        except Exception as e:
            log.error("metrics/alerts failed", error_type=type(e).__name__)

    # -- helpers -------------------------------------------------------------------------------

    async def _policy(self, req: FhirRequest, cls: Classification, who: Principal, prior: Prior | None, *,
                      raw: RawRequest | None = None, release: Any = None) -> None:
        from sidecar.policy.input import build_input  # the policy package is optional at import
        from sidecar.policy.verdict import verdict

        policy = self.rt.policy
        assert policy is not None
        approvals = list(release.approvals) if release is not None else []
        doc = build_input(req, cls, who, shadow=self.rt.cfg.policy.shadow, approvals=approvals,
                          current=prior.current if prior else None, result=prior.result if prior else None)
        allow, text, decision = await verdict(policy, doc)
        if allow:
            return
        if who.enforce and not self.rt.cfg.policy.shadow:
            if decision.get("review") is True and raw is not None and release is None:
                await self._hold(raw, req, cls, who, prior, decision)  # raises: 202 or 403 naming the hold
            raise Refusal(403, f"policy: {text}")
        # shadow: the decision is reported, not enforced (identity, scopes, hardening still are)
        self.svc.metrics.would_deny(who.client_id)
        log.warning("policy would deny", would_deny=True, correlation_id=req.correlation_id,
                    client_id=who.client_id, interaction=cls.interaction, reasons=[text])

    def _fields(self, kind: str, req: FhirRequest | None, cls: Classification | None, who: Principal | None,
                raw: RawRequest, *, decision: str, reasons: list[str] | None = None) -> dict[str, Any]:
        f: dict[str, Any] = {"kind": kind, "decision": decision, "method": raw.method.upper()[:10]}
        if req is not None:
            f["correlation_id"] = req.correlation_id
            if req.traceparent:
                f["traceparent"] = req.traceparent
            f["method"] = req.method
            t = req.target
            if t.resource_type and t.resource_type != "*":
                f["resource_type"] = t.resource_type
            if t.id:
                f["resource_id"] = pseudonym(self.rt.pseudonym_key, "resource", f"{t.resource_type}/{t.id}")
        if cls is not None:
            f["interaction"] = cls.interaction
        if who is not None and who.client_id is not None:
            f["client_id"] = who.client_id
            if who.tenant:
                f["tenant"] = who.tenant
        if raw.client_addr:
            f["source"] = raw.client_addr
        if reasons:
            f["reasons"] = [r[:500] for r in reasons[:20]]
        if self.rt.policy is not None:
            f["policy_revision"] = self.rt.policy.revision
        return f

    async def _hold(self, raw: RawRequest, req: FhirRequest, cls: Classification, who: Principal,
                    prior: Prior | None, decision: dict[str, Any]) -> None:
        """A write the policy sends to review: stored encrypted, nothing forwarded, the app told so."""
        from sidecar.approvals.service import hold_request_from

        service = self.svc.approvals.service
        assert self.rt.policy is not None
        held = await service.hold(hold_request_from(raw, req, cls, who, prior, decision,
                                                    policy_revision=self.rt.policy.revision))
        try:
            await self.rt.audit.append(held.audit, durable=True)
        except AuditUnavailable:
            raise unavailable("audit sink unavailable") from None
        raise held.refusal(respond_async="respond-async" in req.headers.get("prefer", "").lower())

    async def poll(self, raw: RawRequest, correlation: str, item_id: str) -> tuple[int, dict[str, Any]]:
        """`GET /.fhir-sidecar/requests/{id}`: only the requesting client learns how its held write ended."""
        creds = {k: v for k, v in raw.headers if k in ("x-api-key", "authorization")}
        if raw.peer_client:
            creds["mtls"] = raw.peer_client
        who = await self.rt.identities.identify(creds, public=False)
        return await self.svc.approvals.service.status_response(item_id, who.client_id)

    async def _record(self, fields: dict[str, Any]) -> None:
        try:
            await self.rt.audit.append(fields, durable=False)
        except AuditUnavailable:
            pass  # the sink is failed and says so (not ready, writes 503)

    async def _release(self, client_id: str, held: Reserved) -> None:
        try:
            await self.svc.idempotency.release(client_id, held.key, held.token)
        except Exception as e:  # the lease expires on its own; nothing was forwarded
            log.error("idempotency release failed", error_type=type(e).__name__)

    async def _record_refusal(self, refusal: Refusal, raw: RawRequest, req: FhirRequest | None,
                              cls: Classification | None, who: Principal | None, correlation: str) -> None:
        if refusal.decision == "review":
            return  # the hold wrote its own `review` record
        fields = self._fields("deny", req, cls, who, raw, decision=refusal.decision, reasons=[refusal.reason])
        fields.setdefault("correlation_id", correlation)
        fields["upstream_status"] = None
        try:
            await self.rt.audit.append(fields, durable=False)
        except AuditUnavailable:
            pass  # refusing needs no record to be safe: nothing leaves
