"""The review queue's JSON admin API (mounted on the admin listener, before its bearer check).

    GET  /admin/approvals?status=&client=&type=&interaction=   the index (no PHI)
    GET  /admin/approvals/{id}                                  one item, decoded (PHI)
    POST /admin/approvals/{id}/approve                          {} -> {"status", "approvals", "required"}
    POST /admin/approvals/{id}/reject   {"reason": "..."}       -> {"status"}

Authentication: `Authorization: Basic base64(<reviewer id>:<password>)` of a configured reviewer
for everything. `Authorization: Bearer <admin.token>` may only list (operators, dashboards): an
admin token never approves, or one operator could act as any number of reviewers.

Answers: 200; 400 bad request / missing reason; 401 no or wrong credentials; 403 the requesting
client's own write or a reviewer without the role; 404 unknown id; 409 already decided / already
approved by this reviewer; 410 expired; 429 locked out after failed logins; 503 state store.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sidecar.approvals.auth import Locked, ReviewerAuth
from sidecar.approvals.render import view
from sidecar.approvals.service import ApprovalService, Hooks, ReviewError
from sidecar.approvals.store import STATUSES, valid_id
from sidecar.state.base import StateUnavailable

PREFIX = "/admin/approvals"


class ApprovalsAPI:
    def __init__(self, service: ApprovalService, auth: ReviewerAuth, hooks: Hooks) -> None:
        self.service = service
        self.auth = auth
        self.hooks = hooks

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """AdminServer style: (status, JSON-able payload)."""
        try:
            return await self._handle(method, target, headers, body)
        except ReviewError as e:
            await self.hooks.apply(e)  # e.g. the item expired on this call: its record still counts
            return e.status, {"error": e.reason}
        except Locked:
            return 429, {"error": "too many failed logins for this reviewer: try again later"}
        except StateUnavailable:
            return 503, {"error": "state store unavailable"}

    async def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if not self.handles(path):
            return 404, {"error": "not found"}
        rest = path[len(PREFIX):].strip("/").split("/") if path != PREFIX else []
        who = await self.auth.basic(headers)
        if path == PREFIX and method == "GET":
            if who is None and not self.auth.operator(headers):
                return 401, {"error": "reviewer credentials required (Authorization: Basic)"}
            q = dict(parse_qsl(parts.query))
            status = q.get("status") or None
            if status is not None and status not in STATUSES:
                return 400, {"error": f"status must be one of {', '.join(STATUSES)}"}
            items = await self.service.list_items(status=status, client=q.get("client") or None,
                                            resource_type=q.get("type") or None,
                                            interaction=q.get("interaction") or None)
            return 200, {"items": items}
        if who is None:
            return 401, {"error": "reviewer credentials required (Authorization: Basic)"}
        if not rest or not valid_id(rest[0]):
            return 404, {"error": "no such held write"}
        item_id = rest[0]
        if len(rest) == 1 and method == "GET":
            item = await self.service.get(item_id)
            if item is None:
                return 404, {"error": "no such held write"}
            return 200, view(item)
        if len(rest) == 2 and method == "POST" and rest[1] == "approve":
            res = await self.service.approve(item_id, who)
            await self.hooks.apply(res)
            item = await self.service.get(item_id) or res.item
            return 200, {"id": item.id, "status": item.status, "approvals": len(item.approvals),
                         "required": item.required, "outcome": item.outcome}
        if len(rest) == 2 and method == "POST" and rest[1] == "reject":
            try:
                req = json.loads(body or b"{}")
            except ValueError:
                return 400, {"error": "the body must be JSON: {\"reason\": \"...\"}"}
            reason = req.get("reason") if isinstance(req, dict) else None
            res = await self.service.reject(item_id, who, reason)
            await self.hooks.apply(res)
            return 200, {"id": res.item.id, "status": res.item.status}
        return 405 if len(rest) <= 2 else 404, {"error": "method not allowed" if len(rest) <= 2 else "not found"}
