"""The Rego input document (DESIGN: "Rego policy contract"). Everything a policy may see.

Two extensions of the contract (documented in policies/README.md), both the sidecar's reading of
something already in the input, because the embedded engine is slow at it (the starter policy
reads the original itself when they are missing, as on any input not built here):
- `context.clock`: `context.time` as `{"weekday": 0 (Sunday) .. 6, "minute": minute of the UTC day}`.
- `context.x_provenance`: the `X-Provenance` header parsed as JSON: `{"valid": true, "value": <the
  JSON value>}`, or `{"valid": false}` (not JSON). Left out when there is no such header, and when
  the value holds something the policy input cannot carry exactly (integers beyond 64 bits,
  non-finite numbers, NUL, lone surrogates, very deep nesting).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from sidecar.identity import Principal
from sidecar.request import Classification, FhirRequest


def _request(method: str, path: str, interaction: str, rtype: str | None, rid: str | None,
             operation: str | None, conditional: bool, query: Any, headers: dict[str, str],
             write: bool) -> dict[str, Any]:
    return {
        "method": method, "path": path, "interaction": interaction, "resource_type": rtype,
        "id": rid, "operation": operation, "conditional": conditional,
        "query": _query(query), "headers": headers, "write": write,
    }


def _query(pairs: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        out.setdefault(k, []).append(v)
    return out


_MAX_HEADER_JSON_DEPTH = 64


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python accepts them, JSON does not


def header_json(text: str) -> dict[str, Any] | None:
    """`context.x_provenance` for this header value (None: leave it out, let the policy parse)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return None
    except ValueError:
        return {"valid": False}
    return {"valid": True, "value": value} if _exact(value, 0) else None


def _exact(v: Any, depth: int) -> bool:
    """Can the policy input hold this parsed JSON value exactly (as the policy would parse it)?"""
    if depth > _MAX_HEADER_JSON_DEPTH:
        return False
    t = type(v)
    if t is str:
        return _plain_text(v)
    if t is dict:
        return all(_plain_text(k) and _exact(x, depth + 1) for k, x in v.items())
    if t is list:
        return all(_exact(x, depth + 1) for x in v)
    if t is int:
        return -(2**63) <= v < 2**63
    if t is float:
        return math.isfinite(v)
    return v is None or t is bool


def _plain_text(s: str) -> bool:
    if "\x00" in s:
        return False
    try:
        s.encode("utf-8")  # lone surrogates cannot be encoded
    except UnicodeEncodeError:
        return False
    return True


def context_clock(now: datetime) -> dict[str, int]:
    """`context.clock`: the weekday (0 = Sunday) and minute of the day of `context.time`."""
    return {"weekday": now.isoweekday() % 7, "minute": now.hour * 60 + now.minute}


def _bundle_shell(bundle: dict[str, Any]) -> dict[str, Any]:
    """A batch/transaction's `resource`: the Bundle with each `entry[i].resource` left out,
    because it is `entries[i].resource`. The engine converts every node of the input; the
    copy doubled the cost of a large Bundle (see the README's changelog)."""
    entry = bundle.get("entry")
    if not isinstance(entry, list):
        return bundle
    return {**bundle, "entry": [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                                for e in entry]}


def build_input(req: FhirRequest, cls: Classification, who: Principal, *, shadow: bool,
                approvals: list[str] | None = None, now: datetime | None = None,
                current: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """`resource` is what will be stored: the body, or for a PATCH the patched `current`."""
    t = req.target
    now = now or datetime.now(UTC)
    doc: dict[str, Any] = {
        "client": {
            "id": who.client_id, "tenant": who.tenant, "scopes": list(who.scopes.as_strings()),
            "patient": who.patient, "user": who.user, "auth": who.auth,
        },
        "request": _request(req.method, t.path, cls.interaction, t.resource_type, t.id, cls.operation,
                            cls.interaction.endswith("-conditional"), t.query, req.headers, cls.is_write),
        "context": {
            "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "clock": context_clock(now),
            "shadow": shadow, "approvals": approvals or [],
        },
    }
    provenance = req.headers.get("x-provenance")
    if isinstance(provenance, str):
        parsed = header_json(provenance)
        if parsed is not None:
            doc["context"]["x_provenance"] = parsed
    if result is not None:
        doc["resource"] = result
    elif isinstance(req.body, dict):
        doc["resource"] = _bundle_shell(req.body) if cls.entries else req.body
    if current is not None:
        doc["current"] = current
    if cls.entries:
        doc["entries"] = [
            {"request": _request(e.method, e.target.path, e.interaction, e.target.resource_type, e.target.id,
                                 e.operation, e.interaction.endswith("-conditional"), e.target.query, {}, e.is_write),
             "resource": e.resource}
            for e in cls.entries
        ]
    return doc
