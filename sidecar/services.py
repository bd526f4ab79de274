"""Long-lived services built once per process: state store, receipts, limits, breaker,
Vault, upstream credentials, metrics, alerts. A reload keeps them (their keys need a restart).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.alerts import AlertEngine, WebhookSender
from sidecar.approvals import build_approvals, run_sweeper
from sidecar.approvals.service import Hooks
from sidecar.audit.record import derive_key
from sidecar.breaker import Backoff, Breaker
from sidecar.config import Config, ConfigError
from sidecar.credentials import UpstreamCredential, build_credential, ref_reader
from sidecar.idempotency import Idempotency
from sidecar.logs import get_logger
from sidecar.metrics import Metrics
from sidecar.ratelimit import ClientLimits, Limit, RateLimiter
from sidecar.secretrefs import resolve
from sidecar.state import StateStore, StateUnavailable, open_store
from sidecar.state.cache import CachedReads
from sidecar.state.flags import SharedKillFlags
from sidecar.vault import VaultClient, VaultError, run_renewal

log = get_logger("sidecar.services")
# Config sections held by these services: changing them needs a restart, a reload says so.
SERVICE_KEYS = ("state", "vault", "idempotency", "rate_limit", "breaker", "backoff", "alerts", "approvals")


def _limits(cfg: Any) -> ClientLimits:
    if cfg is None:
        return ClientLimits()
    conv = lambda lim: Limit(lim.rate, lim.burst) if lim is not None else None  # noqa: E731
    return ClientLimits(conv(cfg.reads), conv(cfg.writes))


@dataclass
class Services:
    store: StateStore
    idempotency: Idempotency
    ratelimit: RateLimiter
    breaker: Breaker
    backoff: Backoff
    metrics: Metrics
    alerts: AlertEngine
    shared_flags: SharedKillFlags | None = None
    webhook: WebhookSender | None = None
    vault: VaultClient | None = None
    credentials: dict[str, UpstreamCredential] = field(default_factory=dict)
    approvals: Any = None                       # sidecar.approvals.Approvals (the review queue)
    release_credential: UpstreamCredential | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def close(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for c in self.credentials.values():
            await c.aclose()
        if self.webhook is not None:
            await self.webhook.close(2.0)
        if self.vault is not None:
            self.vault.close()
        await self.store.close()


def vault_client(cfg: Config, base_dir: Path) -> VaultClient | None:
    """Vault down at start → refuse to start, clearly (a ConfigError names the cause)."""
    if cfg.vault is None:
        return None
    try:
        vc = VaultClient.from_config(cfg.vault, base_dir=base_dir)
        vc.login()
    except VaultError as e:
        raise ConfigError(f"vault: {e}") from None
    return vc


async def build_services(cfg: Config, base_dir: Path, *, pseudonym_secret: bytes,
                         vault: VaultClient | None, admin_token: str | None = None) -> Services:
    store_spec = cfg.state.store
    if store_spec.startswith("sqlite:") and not store_spec.startswith("sqlite:/"):
        store_spec = f"sqlite:{base_dir / store_spec[len('sqlite:'):]}"
    password = resolve(cfg.state.password, base_dir=base_dir, vault=vault.read if vault else None).reveal() \
        if cfg.state.password else None
    store = open_store(store_spec, password)
    try:
        await store.ping()
    except StateUnavailable as e:
        raise ConfigError(f"state store unavailable: {e}") from None
    idem = cfg.idempotency
    hot = CachedReads(store, prefixes=("breaker:", "backoff:"))  # consulted on every request
    svc = Services(
        store=store,
        idempotency=Idempotency(store, ttl_s=idem.ttl_s, lease_s=idem.lease_s or cfg.upstream.timeout_s + 90,
                                unknown_ttl_s=idem.unknown_ttl_s, dedupe_window_s=idem.dedupe_window_s,
                                body_cap=idem.body_cap, body_key=derive_key(pseudonym_secret, "idempotency-receipts")),
        ratelimit=RateLimiter(store, _limits(cfg.rate_limit),
                              {c.id: _limits(c.rate_limit) for c in cfg.clients if c.rate_limit is not None}),
        breaker=Breaker(hot, threshold=cfg.breaker.threshold, cooldown_s=cfg.breaker.cooldown_s,
                        probe_timeout_s=max(cfg.breaker.probe_timeout_s, cfg.upstream.timeout_s)),
        backoff=Backoff(hot, max_hold_s=cfg.backoff.max_hold_s),
        metrics=Metrics([c.id for c in cfg.clients]),
        alerts=AlertEngine(cfg.alerts, clients=[c.id for c in cfg.clients]),
        vault=vault,
    )
    if not store_spec.startswith("sqlite:"):
        # replicas share the kill switch through the store; refreshed in the background
        svc.shared_flags = SharedKillFlags(store, [c.id for c in cfg.clients])
        await svc.shared_flags.refresh()
        svc._tasks.append(asyncio.create_task(_refresh_flags(svc.shared_flags, svc._stop)))
    if cfg.alerts.webhook is not None:
        wh = cfg.alerts.webhook
        url = resolve(wh.url, base_dir=base_dir).reveal() if wh.url.startswith(("env:", "file:", "vault:")) else wh.url
        token = resolve(wh.token, base_dir=base_dir).reveal() if wh.token else None
        svc.webhook = WebhookSender.from_config(wh, url=url, token=token)
        await svc.webhook.start()
    reader = ref_reader(base_dir=base_dir, vault=vault)
    for c in cfg.clients:
        if c.upstream_credentials is not None:
            cred = build_credential(c.upstream_credentials, reader)
            try:
                await cred.prime()
            except Exception as e:
                raise ConfigError(f"client {c.id}: upstream credentials unavailable ({type(e).__name__}: {e})") from None
            svc.credentials[c.id] = cred
    if vault is not None:
        svc._tasks.append(asyncio.create_task(run_renewal(vault, svc._stop)))
    svc.approvals = build_approvals(
        store, cfg.approvals, secret=pseudonym_secret, hooks=Hooks(audit=lambda f: None), admin_token=admin_token,
        resolve=lambda ref: resolve(ref, base_dir=base_dir, vault=vault.read if vault else None).reveal(),
        pseudonym_key=derive_key(pseudonym_secret, "pseudonym"), registry=svc.metrics.registry)
    if cfg.approvals.release_credentials:
        svc.release_credential = build_credential(cfg.approvals.release_credentials, reader)
        try:
            await svc.release_credential.prime()
        except Exception as e:
            raise ConfigError(f"approvals.release_credentials unavailable ({type(e).__name__})") from None
    return svc


def start_sweeper(svc: Services, on_alert: Any) -> None:
    """Expire holds, re-offer releases, raise `review_overdue` alerts (hooks must be bound first)."""
    svc._tasks.append(asyncio.create_task(run_sweeper(svc.approvals, svc._stop, on_alert=on_alert)))


async def _refresh_flags(flags: SharedKillFlags, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await flags.refresh()
        except Exception as e:  # a stale view counts as engaged: failing here blocks, never opens
            log.error("shared kill switch refresh failed", error_type=type(e).__name__)
        await asyncio.sleep(0.3)
