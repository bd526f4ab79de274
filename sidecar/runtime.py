"""Build a `Runtime` from a validated config: resolve secrets, open the audit sink, load policy.

Everything that can fail does so here, at start-up (or on reload, where the old runtime is kept).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from sidecar.audit.record import derive_key
from sidecar.audit.checkpoints import print_checkpoint
from sidecar.audit.writer import AuditWriter
from sidecar.config import Config, ConfigError, unsupported_features
from sidecar.fhir.validate import model_class
from sidecar.identity import Identities
from sidecar.killswitch import KillState, KillSwitch
from sidecar.logs import get_logger
from sidecar.pipeline import PolicyEngine, Runtime
from sidecar.prior import PriorStateReader
from sidecar.services import Services, build_services, vault_client
from sidecar.secretrefs import SecretError, resolve
from sidecar.tokens import IntrospectionSettings, TokenVerifier

log = get_logger("sidecar.runtime")
MIN_AUDIT_KEY_CHARS = 32
# Imported at start-up so the first write does not pay ~100 ms of model imports.
WARM_TYPES = ("Bundle", "Observation", "Patient", "Condition", "DocumentReference", "Parameters", "MedicationRequest")


def resolve_secrets(cfg: Config, base_dir: Path, *, audit: bool = True, vault: Any = None) -> dict[str, Any]:
    """All secret references the config holds, resolved. Raises ConfigError listing failures."""
    problems: list[str] = []
    out: dict[str, Any] = {"audit": {}, "api_keys": {}}

    def get(ref: str) -> str | None:
        try:
            return resolve(ref, base_dir=base_dir, vault=vault.read if vault is not None else None).reveal()
        except SecretError as e:
            problems.append(str(e))
            return None

    refs, _active = cfg.audit.key_refs() if audit else ({}, "")
    for kid, ref in refs.items():
        v = get(ref)
        if v is not None and len(v) < MIN_AUDIT_KEY_CHARS:
            problems.append(f"audit key {kid}: must be at least {MIN_AUDIT_KEY_CHARS} characters")
        elif v is not None:
            out["audit"][kid] = v.encode()
    if audit and cfg.audit.pseudonym_key:
        pk = get(cfg.audit.pseudonym_key)
        out["pseudonym"] = pk.encode() if pk else None
    if cfg.identity.introspection is not None:
        out["introspection"] = get(cfg.identity.introspection.client_secret)
    for c in cfg.clients:
        if c.auth == "api-key" and c.api_key_sha256:
            h = c.api_key_sha256
            if h.startswith(("env:", "file:", "vault:")):
                h = get(h) or ""
                if h and not (len(h) == 64 and all(ch in "0123456789abcdefABCDEF" for ch in h)):
                    problems.append(f"client {c.id}: api_key_sha256 reference does not hold 64 hex characters")
            out["api_keys"][c.id] = h.lower()
    if problems:
        raise ConfigError("cannot resolve secrets:\n" + "\n".join(f"  {p}" for p in problems))
    return out


def check_startable(cfg: Config) -> None:
    missing = unsupported_features(cfg)
    if missing:
        raise ConfigError("this config needs features this build does not have:\n" + "\n".join(f"  {m}" for m in missing))


def load_policy(cfg: Config, base_dir: Path) -> PolicyEngine | None:
    if cfg.policy.engine == "off":
        return None
    pdir = Path(cfg.policy.dir)
    if not pdir.is_absolute():
        pdir = base_dir / pdir
    if cfg.policy.engine == "opa":
        from sidecar.policy.opa import OpaPolicy

        if not cfg.policy.opa_url:
            raise ConfigError("policy.engine opa needs policy.opa_url")
        return OpaPolicy(cfg.policy.opa_url, cfg.policy.path, timeout_ms=cfg.policy.timeout_ms,
                         directory=pdir if pdir.is_dir() else None)
    from sidecar.policy.embedded import EmbeddedPolicy

    return EmbeddedPolicy.load(pdir, cfg.policy.path)


async def build_runtime(cfg: Config, base_dir: Path, *, audit: AuditWriter | None = None,
                        fsync: Any = None, services: Services | None = None) -> Runtime:
    check_startable(cfg)
    for t in WARM_TYPES:
        model_class(t)
    vault = services.vault if services is not None else vault_client(cfg, base_dir)
    secrets = resolve_secrets(cfg, base_dir, vault=vault)
    policy = load_policy(cfg, base_dir)
    refs, active = cfg.audit.key_refs()
    pseudo_secret = secrets.get("pseudonym") or secrets["audit"][next(iter(refs))]
    if services is None:
        admin_token = resolve(cfg.admin.token, base_dir=base_dir).reveal() if cfg.admin.token else None
        services = await build_services(cfg, base_dir, pseudonym_secret=pseudo_secret, vault=vault,
                                        admin_token=admin_token)
    metrics = services.metrics
    if audit is None:
        path = Path(cfg.audit.path)
        if not path.is_absolute():
            path = base_dir / path
        kwargs = {"fsync": fsync} if fsync is not None else {}
        a = cfg.audit
        audit = AuditWriter(path, secrets["audit"], active, a.chain, checkpoint_every=a.checkpoint_every,
                            on_checkpoint=print_checkpoint, max_bytes=a.max_bytes, max_age_s=a.max_age_s,
                            unknown_scan_records=a.unknown_scan_records, on_commit=metrics.audit_commit,
                            on_failure=metrics.audit_failure, **kwargs)
        await audit.start()
    ks_path = Path(cfg.killswitch.file)
    if not ks_path.is_absolute():
        ks_path = base_dir / ks_path
    ks_path.parent.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()

    def on_change(old: KillState, new: KillState) -> None:
        # the switch is set through its flag file; the running sidecar records every change
        log.warning("kill switch changed", kill_switch=new.engaged, count=len(new.clients))
        metrics.set_kill_switch(new.engaged)
        reasons = [f"kill switch {'engaged' if new.engaged else 'released'}"]
        reasons += [f"client kill switch engaged: {c}" for c in sorted(new.clients - old.clients)]
        reasons += [f"client kill switch released: {c}" for c in sorted(old.clients - new.clients)]
        loop.create_task(_admin_record(audit, reasons))

    ks = KillSwitch(ks_path, cfg.killswitch.scope, cfg.killswitch.retry_after_s, on_change=on_change,
                    shared=services.shared_flags)
    metrics.set_kill_switch(ks.state.engaged)
    metrics.set_policy_revision(policy.revision if policy else None)
    prior = PriorStateReader(cfg.upstream.base_url, verify=upstream_verify(cfg, base_dir),
                             timeout_s=cfg.upstream.timeout_s, pins=frozenset(p.lower() for p in cfg.upstream.spki_sha256))
    tokens = await start_token_verifier(cfg, base_dir, secrets)
    return Runtime(
        prior=prior,
        cfg=cfg,
        identities=Identities(cfg, secrets["api_keys"], tokens),
        killswitch=ks,
        audit=audit,
        pseudonym_key=derive_key(pseudo_secret, "pseudonym"),
        policy=policy,
        svc=services,
    )


def upstream_verify(cfg: Config, base_dir: Path) -> Any:
    """The EHR's trust anchors for the sidecar's own HTTP clients (same as mitmproxy's)."""
    if not cfg.upstream.ca_bundle:
        return True
    ca = Path(cfg.upstream.ca_bundle)
    return ssl.create_default_context(cafile=str(ca if ca.is_absolute() else base_dir / ca))


async def start_token_verifier(cfg: Config, base_dir: Path, secrets: dict[str, Any]) -> TokenVerifier | None:
    if not any(c.auth == "bearer" for c in cfg.clients):
        return None
    idn = cfg.identity
    intro = None
    if idn.introspection is not None:
        intro = IntrospectionSettings(idn.introspection.url, idn.introspection.client_id, secrets["introspection"])
    verifier = TokenVerifier(jwks=idn.jwks, issuer=idn.issuer, audience=idn.audience, introspection=intro,
                             base_dir=base_dir)
    await verifier.start()
    return verifier


async def _admin_record(audit: AuditWriter, reasons: list[str]) -> None:
    try:
        await audit.append({"kind": "admin", "decision": "admin", "reasons": reasons}, durable=True)
    except Exception as e:  # the sink's own failure state already makes writes refuse
        log.error("admin audit record failed", error_type=type(e).__name__)
