"""Decide one request offline: `fhir-sidecar policy eval` (and, later, replay).

Walks the same parse → classify → identify → scopes → validation steps as the live pipeline,
with `current` taken from the request file instead of the EHR, then asks the policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidecar import guards
from sidecar.classify import classify
from sidecar.config import Config
from sidecar.errors import Refusal
from sidecar.identity import Identities
from sidecar.parse import parse_request
from sidecar.pipeline import PolicyEngine
from sidecar.policy.input import build_input
from sidecar.prior import apply_json_patch
from sidecar.request import RawRequest


def load_request_file(path: Path) -> tuple[RawRequest, dict[str, Any] | None]:
    """A JSON file: {"method", "target", "headers": {..}, "body": <JSON> | "body_text": "...", "current": {..}?}."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    body = spec.get("body")
    raw_body = spec.get("body_text", "").encode() if body is None else json.dumps(body).encode()
    headers = tuple((k.lower(), str(v)) for k, v in (spec.get("headers") or {}).items())
    raw = RawRequest(method=spec["method"], target=spec["target"].encode(), headers=headers, body=raw_body)
    return raw, spec.get("current")


async def evaluate_offline(cfg: Config, identities: Identities, policy: PolicyEngine | None, raw: RawRequest,
                           current: dict[str, Any] | None) -> dict[str, Any]:
    up = cfg.upstream
    try:
        req = parse_request(raw, base_path=up.base_path, max_body_bytes=cfg.fhir.max_body_bytes,
                            upstream_base=up.base_url)
        cls = classify(req, upstream_base=up.base_url)
        who = await identities.identify(req.credentials, public=cls.public)
        guards.check_scopes(cls, who)
        guards.check_valid(req, cls)
        result = apply_json_patch(current, req.body) if (current and isinstance(req.body, list)) else None
    except Refusal as r:
        return {"input": None, "decision": {"allow": False, "reasons": [r.reason]}, "status": r.status,
                "stage": "before policy"}
    doc = build_input(req, cls, who, shadow=cfg.policy.shadow, current=current, result=result)
    if policy is None or not cls.is_write:
        return {"input": doc, "decision": {"allow": True, "reasons": []}, "status": None,
                "stage": "no policy for this request"}
    decision = await policy.decide(doc)
    return {"input": doc, "decision": decision, "status": None if decision.get("allow") else 403, "stage": "policy"}
