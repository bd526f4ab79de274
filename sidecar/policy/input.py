"""The Rego input document (DESIGN: "Rego policy contract"). Everything a policy may see."""

from __future__ import annotations

from datetime import datetime, timezone
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


def build_input(req: FhirRequest, cls: Classification, who: Principal, *, shadow: bool,
                approvals: list[str] | None = None, now: datetime | None = None,
                current: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """`resource` is what will be stored: the body, or for a PATCH the patched `current`."""
    t = req.target
    doc: dict[str, Any] = {
        "client": {
            "id": who.client_id, "tenant": who.tenant, "scopes": list(who.scopes.as_strings()),
            "patient": who.patient, "user": who.user, "auth": who.auth,
        },
        "request": _request(req.method, t.path, cls.interaction, t.resource_type, t.id, cls.operation,
                            cls.interaction.endswith("-conditional"), t.query, req.headers, cls.is_write),
        "context": {
            "time": (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "shadow": shadow, "approvals": approvals or [],
        },
    }
    if result is not None:
        doc["resource"] = result
    elif isinstance(req.body, dict):
        doc["resource"] = req.body
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
