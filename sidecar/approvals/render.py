"""Turn a held write into something a person can read: element rows and a diff (no HTML here).

`rows(resource)` flattens a FHIR resource into (depth, label, value, path) rows for an indented
table; `diff(current, proposed)` compares leaf elements by path (added / removed / changed /
unchanged). `view(item)` is the JSON detail shared by the admin API and the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar.approvals.store import Item

MAX_ROWS = 2_000
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json-patch+json")


@dataclass(frozen=True, slots=True)
class Row:
    depth: int
    label: str
    value: str | None      # None: a container (object / list) heading
    path: str


@dataclass(frozen=True, slots=True)
class Change:
    path: str
    kind: str              # added | removed | changed | unchanged
    old: str | None
    new: str | None


def scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    return str(v)


def parse_body(item: Item) -> Any:
    """The request body as JSON (None when empty or not JSON). Content-encoding is undone."""
    if not item.body:
        return None
    body = item.body
    enc = dict(item.headers).get("content-encoding")
    if enc and enc != "identity":
        try:
            from sidecar.fhir.jsonbody import decode_content

            body = decode_content(body, enc, 16 * 1024 * 1024)
        except Exception:
            return None
    if (item.content_type or "").split(";")[0].strip().lower() not in _JSON_TYPES:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def rows(obj: Any, *, limit: int = MAX_ROWS) -> tuple[list[Row], bool]:
    """Indented element rows; (rows, truncated)."""
    out: list[Row] = []

    def walk(v: Any, depth: int, label: str, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(v, dict):
            if label:
                out.append(Row(depth, label, None, path))
            for k, sub in v.items():
                walk(sub, depth + (1 if label else 0), str(k), f"{path}.{k}" if path else str(k))
        elif isinstance(v, list):
            if label:
                out.append(Row(depth, label, None, path))
            for i, sub in enumerate(v):
                walk(sub, depth + 1, f"[{i}]", f"{path}[{i}]")
        else:
            out.append(Row(depth, label or "(value)", scalar(v), path))

    walk(obj, 0, "", "")
    return out, len(out) >= limit


def leaves(obj: Any, path: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{path}.{k}" if path else str(k)))
        if not obj and path:
            out[path] = "{}"
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{path}[{i}]"))
        if not obj and path:
            out[path] = "[]"
    else:
        out[path or "(value)"] = scalar(obj)
    return out


def diff(current: Any, proposed: Any, *, limit: int = MAX_ROWS) -> list[Change]:
    a, b = leaves(current) if current is not None else {}, leaves(proposed) if proposed is not None else {}
    out: list[Change] = []
    seen: set[str] = set()
    for p in list(b) + [p for p in a if p not in b]:
        if p in seen:
            continue
        seen.add(p)
        if p in a and p in b:
            out.append(Change(p, "unchanged" if a[p] == b[p] else "changed", a[p], b[p]))
        elif p in b:
            out.append(Change(p, "added", None, b[p]))
        else:
            out.append(Change(p, "removed", a[p], None))
        if len(out) >= limit:
            break
    return out


def proposed_resource(item: Item, body: Any) -> Any:
    """What the write would store: the PATCH result when known, else the body (None for delete)."""
    if item.proposed is not None:
        return item.proposed
    if item.method == "DELETE":
        return None
    return body


def view(item: Item, *, now: float | None = None) -> dict[str, Any]:
    """The JSON detail of one item (reviewers only: it holds PHI)."""
    body = parse_body(item)
    prop = proposed_resource(item, body)
    d: dict[str, Any] = {
        "id": item.id, "status": item.status, "client": item.client_id, "type": item.resource_type,
        "interaction": item.interaction, "method": item.method, "path": item.path,
        "correlation_id": item.correlation_id, "created": item.created, "expires": item.expires,
        "required": item.required, "roles": list(item.roles), "reasons": list(item.reasons),
        "approvals": [{"reviewer": r, "at": t} for r, t in item.approvals],
        "rejection": item.rejection, "decided_at": item.decided_at,
        "outcome": item.outcome, "policy_revision": item.policy_revision,
        "request": {"headers": dict(item.headers), "content_type": item.content_type, "body_bytes": len(item.body)},
        "body": body, "proposed": prop, "current": item.current,
    }
    if item.current is not None:
        d["diff"] = [{"path": c.path, "change": c.kind, "old": c.old, "new": c.new}
                     for c in diff(item.current, prop) if c.kind != "unchanged"]
    return d
