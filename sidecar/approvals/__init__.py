"""Human approval for high-impact writes (issue #8): hold, review, release exactly once.

    store.py     HoldStore: held writes sealed with AES-GCM in the state store, a PHI-free index
    service.py   ApprovalService: hold / approve / reject / release / outcome / status / sweep
    auth.py      reviewers (hashed passwords, lock-out) and web sessions
    api.py       JSON admin API  /admin/approvals...
    web.py       reviewer page   /review/...
    cli.py       fhir-sidecar approvals list|show|approve|reject|hash-password
    metrics.py   pending gauge, time-to-decision histogram
    config.py    ApprovalsConfig (the `approvals:` section)

`build_approvals(...)` assembles them for the running sidecar (see README.md in this folder).
Only config.py is imported eagerly by `sidecar.config`; the rest loads on use.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from sidecar.approvals.api import ApprovalsAPI
    from sidecar.approvals.service import ApprovalService, Hooks
    from sidecar.approvals.web import ReviewWeb


class Approvals:
    """Everything the sidecar holds for the review queue, built once per process."""

    def __init__(self, service: ApprovalService, api: ApprovalsAPI, web: ReviewWeb, hooks: Hooks) -> None:
        self.service, self.api, self.web, self.hooks = service, api, web, hooks

    async def admin(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any] | None:
        """Route one admin-listener request: an AdminServer-style answer, or None when the path
        is not ours (the caller goes on with its own routes)."""
        from urllib.parse import urlsplit

        path = urlsplit(target).path
        if self.web.handles(path):
            return self.web.as_admin_payload(await self.web.handle(method, target, headers, body))
        if self.api.handles(path):
            return await self.api.handle(method, target, headers, body)
        return None


def build_approvals(store: Any, cfg: Any, *, secret: bytes, hooks: Hooks, admin_token: str | None = None,
                    resolve: Any = None, pseudonym_key: bytes | None = None, registry: Any = None) -> Approvals:
    """`store`: the StateStore; `cfg`: ApprovalsConfig; `secret`: the stable audit secret (the
    pseudonym secret: survives audit key rotation); `resolve(ref) -> str` for reviewer password
    references; `registry`: the Prometheus registry (`svc.metrics.registry`)."""
    from sidecar.approvals.api import ApprovalsAPI
    from sidecar.approvals.auth import ReviewerAuth, ReviewerDirectory
    from sidecar.approvals.metrics import ApprovalMetrics
    from sidecar.approvals.service import ApprovalService
    from sidecar.approvals.web import ReviewWeb

    metrics = ApprovalMetrics(registry) if registry is not None else None
    service = ApprovalService.from_secret(store, cfg, secret, pseudonym_key=pseudonym_key, metrics=metrics)
    auth = ReviewerAuth(ReviewerDirectory.from_config(cfg, resolve), store, cfg, admin_token=admin_token)
    return Approvals(service, ApprovalsAPI(service, auth, hooks), ReviewWeb(service, auth, hooks), hooks)


async def run_sweeper(approvals: Approvals, stop: asyncio.Event, *, on_alert: Callable[[Any], Any] | None = None,
                      interval_s: float = 30.0) -> None:
    """Background task: every `interval_s`, `service.sweep()`; its `expired` records go to
    `hooks.audit`, its alerts (`sidecar.alerts.Alert`, kind `review_overdue`) to `on_alert`, its
    releases to retry to `hooks.release`. Never raises (a failed round is logged, the next runs)."""
    import inspect

    from sidecar.logs import get_logger

    log = get_logger("sidecar.approvals")
    while not stop.is_set():
        try:
            out = await approvals.service.sweep()
            for rec in out.audit:
                res = approvals.hooks.audit(rec)
                if inspect.isawaitable(res):
                    await res
            for alert in out.alerts:
                if on_alert is not None:
                    res = on_alert(alert)
                    if inspect.isawaitable(res):
                        await res
            for rel in out.retry:
                if approvals.hooks.release is not None:
                    res = approvals.hooks.release(rel)
                    if inspect.isawaitable(res):
                        await res
        except Exception as e:
            log.error("approvals sweep failed", error_type=type(e).__name__)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
