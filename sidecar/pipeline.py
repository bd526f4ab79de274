"""The pipeline: parse -> classify -> identify -> guard -> audit, once per request.

It knows nothing of mitmproxy: the adapter hands it a `RawRequest` and gets a `Decision`.
A stage refuses by raising `Refusal`; any other exception escapes to the adapter, which
answers 503 and forwards nothing (fail closed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar import guards
from sidecar.audit.record import pseudonym
from sidecar.audit.writer import AuditUnavailable, AuditWriter
from sidecar.classify import classify
from sidecar.config import Config
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

    @property
    def forward(self) -> bool:
        return self.refusal is None


class Pipeline:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
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

    async def guard(self, req: FhirRequest, cls: Classification, who: Principal) -> tuple[Prior | None, bool]:
        refusal = self.rt.killswitch.check(who.client_id, cls.is_write)
        if refusal is not None:
            raise refusal
        guards.check_scopes(cls, who)
        guards.check_valid(req, cls)
        prior = await self.prior_state(req, cls, who)
        confine = check_context(req, cls, who, prior, self._upstream_base)
        if self.rt.policy is not None and cls.is_write:
            await self._policy(req, cls, who, prior)
        return prior, confine

    async def prior_state(self, req: FhirRequest, cls: Classification, who: Principal) -> Prior | None:
        """update/patch/delete of one resource: read `current`, check If-Match, patch it."""
        t = req.target
        if cls.interaction not in PRIOR_STATE or self.rt.prior is None or not t.resource_type or not t.id:
            return None
        prior = await self.rt.prior.read(t.resource_type, t.id, correlation_id=req.correlation_id,
                                         authorization=req.credentials.get("authorization") if who.auth == "bearer" else None)
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

    async def audit(self, req: FhirRequest, cls: Classification, who: Principal, raw: RawRequest) -> int | None:
        """Writes: a durable `intent` before anything leaves. Reads: the sink must be healthy."""
        a = self.rt.audit
        if cls.is_write:
            try:
                # the one case where the sidecar changes a body: the audit record says so
                note = ["body URLs rewritten from the sidecar base to the upstream base"] if req.body_rewritten else None
                rec = await a.append(self._fields("intent", req, cls, who, raw, decision="allow", reasons=note),
                                     durable=True)
            except AuditUnavailable:
                raise unavailable("audit sink unavailable") from None
            return int(rec["seq"])
        if not a.healthy and not self.rt.cfg.audit.reads_fail_open:
            raise unavailable("audit sink unavailable")
        return None

    # -- the walk ------------------------------------------------------------------------------

    async def decide(self, raw: RawRequest, correlation: str, trace: str) -> Decision:
        started = time.monotonic()
        req: FhirRequest | None = None
        cls: Classification | None = None
        who: Principal | None = None
        try:
            req = self.parse(raw, correlation, trace)
            cls = self.classify(req)
            who = await self.identify(req, cls)
            prior, confine = await self.guard(req, cls, who)
            seq = await self.audit(req, cls, who, raw)
        except Refusal as refusal:
            await self._record_refusal(refusal, raw, req, cls, who, correlation)
            return Decision(correlation, trace, started, refusal, req, cls, who)
        return Decision(correlation, trace, started, None, req, cls, who, seq, prior, confine)

    async def record_outcome(self, d: Decision, status: int | None, raw: RawRequest, outcome: str | None = None) -> None:
        """After the upstream answered (or failed): `outcome` for writes, `read` for reads."""
        if d.request is None or d.classification is None or d.principal is None:
            return
        latency = round((time.monotonic() - d.started) * 1000, 2)
        if outcome is None:
            outcome = "committed" if status is not None and 200 <= status < 300 else "failed"
        kind = "outcome" if d.classification.is_write else "read"
        fields = self._fields(kind, d.request, d.classification, d.principal, raw, decision="allow")
        fields.update(upstream_status=status, latency_ms=latency)
        if kind == "outcome":
            fields["outcome"] = outcome
        try:
            await self.rt.audit.append(fields, durable=False)
        except AuditUnavailable:
            pass  # the sink is failed and says so (not ready, writes 503); the response is already out

    # -- helpers -------------------------------------------------------------------------------

    async def _policy(self, req: FhirRequest, cls: Classification, who: Principal, prior: Prior | None) -> None:
        from sidecar.policy.input import build_input  # the policy package is optional at import

        policy = self.rt.policy
        assert policy is not None
        doc = build_input(req, cls, who, shadow=self.rt.cfg.policy.shadow,
                          current=prior.current if prior else None, result=prior.result if prior else None)
        try:
            decision = await policy.decide(doc)
        except Exception:
            raise unavailable("policy engine unavailable") from None
        allow = decision.get("allow")
        reasons = decision.get("reasons") or []
        if not isinstance(allow, bool) or not isinstance(reasons, list):
            raise unavailable("policy decision undefined")
        if allow:
            return
        text = "; ".join(str(r) for r in reasons[:5])[:500] or "denied by policy"
        if who.enforce and not self.rt.cfg.policy.shadow:
            raise Refusal(403, f"policy: {text}")
        # shadow: the decision is reported, not enforced (identity, scopes, hardening still are)
        log.warning("policy would deny", would_deny=True, correlation_id=req.correlation_id,
                    client_id=who.client_id, interaction=cls.interaction, reasons=[text])

    def _fields(self, kind: str, req: FhirRequest | None, cls: Classification | None, who: Principal | None,
                raw: RawRequest, *, decision: str, reasons: list[str] | None = None) -> dict[str, Any]:
        f: dict[str, Any] = {"kind": kind, "decision": decision, "method": raw.method.upper()[:10]}
        if req is not None:
            f["correlation_id"] = req.correlation_id
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

    async def _record_refusal(self, refusal: Refusal, raw: RawRequest, req: FhirRequest | None,
                              cls: Classification | None, who: Principal | None, correlation: str) -> None:
        fields = self._fields("deny", req, cls, who, raw, decision=refusal.decision, reasons=[refusal.reason])
        fields.setdefault("correlation_id", correlation)
        fields["upstream_status"] = None
        try:
            await self.rt.audit.append(fields, durable=False)
        except AuditUnavailable:
            pass  # refusing needs no record to be safe: nothing leaves
