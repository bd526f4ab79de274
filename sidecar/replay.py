"""`fhir-sidecar replay FLOWS --config FILE [--strict]`: re-decide recorded requests offline.

Every recorded request walks the pipeline's deciding stages again under the NEW config, with
nothing live: parse -> classify -> identity -> scopes -> validation -> prior state -> patient
context -> policy, where

- identity is the recorded *verified* identity mapped onto today's client entry: a client that
  no longer exists (or now authenticates another way) cannot be decided; a bearer client keeps its
  recorded token scopes ∩ today's ceiling, patient and fhirUser; api-key / mtls / single clients get
  today's ceiling (their credential carries no scopes). Tenant, enforce, operations and conditional
  writes are today's. Credentials are not re-verified: a live 401 is carried over as it was;
- `current` is the recorded stored version (its ETag from `meta.versionId` unless recorded);
- `context.time` is the recorded time; the policy is today's (`sidecar.runtime.load_policy`).

Runtime state is not re-decided (kill switch, rate limits, idempotency, breaker, an unavailable
store or engine, the EHR's answers): a live refusal that came from there is counted as "not
compared" instead of reported as a change.

A change is a different decision (allow / deny / review / error), or a different status for a
deny (403 -> 400); the same decision for another reason (a policy deny that is now a scope deny)
is listed apart, as a reason change, and does not fail `--strict`. The report holds no PHI:
method, interaction, type, client, correlation id, time, decisions and the sidecar's
fixed-phrase reasons.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sidecar import guards
from sidecar.classify import classify
from sidecar.config import Config
from sidecar.context_guard import check_context
from sidecar.errors import Refusal
from sidecar.identity import ANONYMOUS, Principal, principal_for
from sidecar.parse import parse_request
from sidecar.pipeline import PRIOR_STATE, PolicyEngine
from sidecar.policy.input import build_input
from sidecar.policy.verdict import verdict
from sidecar.prior import Prior, apply_json_patch, check_if_match
from sidecar.recording import RecordedRequest, read_recording
from sidecar.scopes import ScopeSet

DECISIONS = ("allow", "deny", "review", "error", "undecidable")


class Undecidable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: str                 # allow | deny | review | error | undecidable (| replay, live only)
    reasons: tuple[str, ...] = ()
    status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reasons": list(self.reasons), "status": self.status}


@dataclass(frozen=True, slots=True)
class Replayed:
    """One request in the report: clear fields only."""

    index: int
    time: str
    method: str
    interaction: str | None
    resource_type: str | None
    client_id: str | None
    correlation_id: str | None
    old: Outcome
    new: Outcome

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["old"], d["new"] = self.old.to_dict(), self.new.to_dict()
        return d


@dataclass
class ReplayReport:
    path: str
    policy_revision: str | None
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECISIONS, 0))       # new decisions
    live_counts: dict[str, int] = field(default_factory=dict)                                   # recorded decisions
    changes: list[Replayed] = field(default_factory=list)            # the decision changed
    reason_changes: list[Replayed] = field(default_factory=list)     # same decision, other reasons
    undecidable: list[Replayed] = field(default_factory=list)
    not_compared: list[Replayed] = field(default_factory=list)   # live refusal came from runtime state
    warnings: list[str] = field(default_factory=list)

    @property
    def strict_failed(self) -> bool:
        """`--strict`: any changed decision or anything that cannot be decided fails (exit 1)."""
        return bool(self.changes) or self.counts.get("undecidable", 0) > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recording": self.path, "policy_revision": self.policy_revision, "total": self.total,
            "counts": dict(self.counts), "live_counts": dict(self.live_counts),
            "changed": len(self.changes), "strict_failed": self.strict_failed,
            "changes": [c.to_dict() for c in self.changes],
            "reason_changes": [c.to_dict() for c in self.reason_changes],
            "undecidable": [c.to_dict() for c in self.undecidable],
            "not_compared": [c.to_dict() for c in self.not_compared],
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ------------------------------------------------------------------------------ deciding

def principal_today(rec: RecordedRequest, cfg: Config, public: bool) -> Principal:
    ident = rec.identity
    if ident is None or ident.client_id is None:
        if public:
            return ANONYMOUS
        live = rec.live
        if live.get("status") == 401:  # credentials are not recorded: the identity refusal stands
            raise Refusal(401, (live.get("reasons") or ["no credentials"])[0], "login")
        raise Undecidable("no verified identity was recorded (the live request was refused before identify)")
    client = cfg.client(ident.client_id)
    if client is None:
        raise Undecidable(f"client {ident.client_id} is not in the config")
    if client.auth != ident.auth:
        raise Undecidable(f"client {ident.client_id} now authenticates with {client.auth} (recorded: {ident.auth})")
    base = principal_for(client)
    if ident.auth != "bearer":
        return base
    scopes = ScopeSet.from_strings(list(ident.scopes)).intersect(base.scopes)
    return replace(base, scopes=scopes, contexts=tuple(ident.contexts) or ("system",), user=ident.user,
                   patient=ident.patient)


def _prior(rec: RecordedRequest, req: Any, cls: Any) -> Prior | None:
    t = req.target
    if cls.interaction not in PRIOR_STATE or not t.resource_type or not t.id:
        return None
    if rec.prior_read is not True:
        # live, the request was refused before prior state (or the stored version was not recorded):
        # deciding without `current` would be a guess
        raise Undecidable("the stored version (current) was not recorded for this request")
    current = rec.current
    etag = rec.etag
    if etag is None and isinstance(current, dict):
        vid = (current.get("meta") or {}).get("versionId")
        etag = f'W/"{vid}"' if isinstance(vid, str) and vid else None
    prior = Prior(current, etag)
    check_if_match(req.headers.get("if-match"), prior)
    if cls.interaction == "patch":
        if current is None:
            raise Refusal(404, "the resource to patch does not exist", "not-found")
        if not isinstance(req.body, list):
            raise Refusal(403, "FHIRPath Patch is not supported: use JSON Patch", "not-supported")
        result = apply_json_patch(current, req.body)
        guards.validate_result(result)
        prior = Prior(current, etag, result)
    return prior


async def _policy(cfg: Config, policy: PolicyEngine, rec: RecordedRequest, req: Any, cls: Any, who: Principal,
                  prior: Prior | None) -> None:
    """The pipeline's `_policy`, with the recorded time and `current`; a review is not held."""
    doc = build_input(req, cls, who, shadow=cfg.policy.shadow, approvals=[], now=rec.time,
                      current=prior.current if prior else None, result=prior.result if prior else None)
    allow, text, decision = await verdict(policy, doc)
    if allow:
        return
    if who.enforce and not cfg.policy.shadow:
        if decision.get("review") is True:
            raise Refusal(403, f"held for review: {text}", decision="review")
        raise Refusal(403, f"policy: {text}")


async def decide_recorded(rec: RecordedRequest, cfg: Config, policy: PolicyEngine | None) -> Outcome:
    up = cfg.upstream
    raw = rec.raw
    try:
        bases = (f"{raw.scheme}://{raw.host}{up.base_path}",) if raw.mode == "reverse" and raw.host else ()
        req = parse_request(raw, base_path=up.base_path, max_body_bytes=cfg.fhir.max_body_bytes,
                            sidecar_bases=bases, upstream_base=up.base_url, correlation=rec.correlation_id or "")
        cls = classify(req, upstream_base=up.base_url)
        who = principal_today(rec, cfg, cls.public)
        guards.check_scopes(cls, who)
        guards.check_valid(req, cls)
        prior = _prior(rec, req, cls)
        check_context(req, cls, who, prior, up.base_url)
        if policy is not None and cls.is_write:
            await _policy(cfg, policy, rec, req, cls, who, prior)
    except Undecidable as u:
        return Outcome("undecidable", (u.reason,))
    except Refusal as r:
        return Outcome(r.decision, (r.reason,), r.status)
    except Exception as e:  # a stage that crashes is a 503 live: the same here
        return Outcome("error", (f"internal error ({type(e).__name__})",), 503)
    return Outcome("allow")


def _changed(old: Outcome, new: Outcome) -> bool:
    if old.decision != new.decision:
        return True
    return old.decision == "deny" and old.status != new.status  # allow: the status is the EHR's


def _reasons_changed(old: Outcome, new: Outcome) -> bool:
    # allow has none; a review's live reason names the hold (its id), not the policy's reasons
    return old.decision in ("deny", "error") and old.reasons != new.reasons


async def replay_async(path: str | Path, cfg: Config, *, key: bytes, base_dir: Path,
                       policy: PolicyEngine | None = None) -> ReplayReport:
    if policy is None:
        from sidecar.runtime import load_policy

        policy = load_policy(cfg, Path(base_dir))
    report = ReplayReport(path=str(path), policy_revision=getattr(policy, "revision", None))
    live_counts: Counter[str] = Counter()
    torn: list[int] = []
    for rec in read_recording(path, key, on_torn_tail=torn.append):
        live = rec.live
        old = Outcome(str(live.get("decision") or "error"), tuple(str(r) for r in live.get("reasons") or ()),
                      live.get("status"))
        new = await decide_recorded(rec, cfg, policy)
        report.total += 1
        live_counts[old.decision] += 1
        report.counts[new.decision] = report.counts.get(new.decision, 0) + 1
        item = Replayed(rec.index, rec.time.strftime("%Y-%m-%dT%H:%M:%SZ"), rec.method, rec.interaction,
                        rec.resource_type, rec.client_id, rec.correlation_id, old, new)
        if new.decision == "undecidable":
            report.undecidable.append(item)
        elif live.get("runtime"):
            report.not_compared.append(item)
        elif _changed(old, new):
            report.changes.append(item)
        elif _reasons_changed(old, new):
            report.reason_changes.append(item)
    if torn:
        report.warnings.append(f"the recording ends in an unreadable tail after {torn[0]} flows (ignored)")
    report.live_counts = dict(live_counts)
    return report


def replay(path: str | Path, cfg: Config, *, key: bytes, base_dir: Path,
           policy: PolicyEngine | None = None) -> ReplayReport:
    """Re-decide every recorded request under `cfg`. Raises RecordingError (unreadable file, wrong key)
    and ConfigError (the policy does not load)."""
    return asyncio.run(replay_async(path, cfg, key=key, base_dir=base_dir, policy=policy))


# ------------------------------------------------------------------------------ the report

def _cell(v: Any) -> str:
    return "-" if v in (None, "") else str(v)


def _outcome_text(o: Outcome) -> str:
    return o.decision + (f" {o.status}" if o.status is not None and o.decision != "allow" else "")


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*r).rstrip() for r in rows]
    return out


def _items(title: str, items: list[Replayed]) -> list[str]:
    if not items:
        return []
    lines = ["", f"{title} ({len(items)})", ""]
    rows = [[str(c.index), c.time, c.method, _cell(c.interaction), _cell(c.resource_type), _cell(c.client_id),
             _cell(c.correlation_id), _outcome_text(c.old), _outcome_text(c.new)] for c in items]
    lines += _table(rows, ["#", "time", "method", "interaction", "type", "client", "correlation id", "was", "now"])
    lines.append("")
    for c in items:
        lines.append(f"  #{c.index}  was: {'; '.join(c.old.reasons) or '(no reasons)'}")
        lines.append(f"  {' ' * len(str(c.index))}   now: {'; '.join(c.new.reasons) or '(no reasons)'}")
    return lines


def format_report(report: ReplayReport) -> str:
    lines = [f"replay of {report.path}: {report.total} requests, policy revision {_cell(report.policy_revision)}", ""]
    names = list(DECISIONS) + sorted(set(report.live_counts) - set(DECISIONS))
    rows = [[n, str(report.live_counts.get(n, 0)), str(report.counts.get(n, 0))] for n in names]
    lines += _table(rows, ["decision", "recorded", "replayed"])
    lines.append("")
    lines.append(f"changed: {len(report.changes)}   same decision, other reasons: {len(report.reason_changes)}   "
                 f"undecidable: {len(report.undecidable)}   not compared (runtime refusals): {len(report.not_compared)}")
    lines += _items("changed decisions", report.changes)
    lines += _items("same decision, other reasons", report.reason_changes)
    lines += _items("undecidable", report.undecidable)
    lines += _items("not compared: the live refusal came from runtime state", report.not_compared)
    for w in report.warnings:
        lines.append(f"warning: {w}")
    lines.append("")
    lines.append("strict: " + ("FAIL (changes or undecidable requests)" if report.strict_failed else "ok"))
    return "\n".join(lines) + "\n"


__all__ = ["Outcome", "ReplayReport", "Replayed", "decide_recorded", "format_report", "principal_today",
           "replay", "replay_async"]
