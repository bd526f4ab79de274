"""Run the sidecar: a lean embedded mitmproxy, our addon, the admin listener, signals.

Only the addons a proxy needs are loaded (not mitmdump's 35 defaults, never `dumper`/`save`,
which write bodies and tokens). Options that would break our guarantees stay off: raw TCP and
websocket passthrough, `allow_hosts`/`ignore_hosts` (excluded hosts are tunnelled raw),
`body_size_limit`, `stream_large_bodies`, insecure upstream TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from sidecar import killswitch
from sidecar.addon import SidecarAddon, upstream_headers
from sidecar.admin import AdminServer, bearer_ok
from sidecar.config import Config, ConfigError, load_config
from sidecar.logs import get_logger
from sidecar.mitm_tuning import lean_hook_dispatch, skip_message_typecheck
from sidecar.mtls import ClientCertVerifier
from sidecar.pipeline import Pipeline
from sidecar.recording import Recorder, RecordingError, recording_key
from sidecar.request import RawRequest
from sidecar.runtime import build_runtime, resolve_secrets, upstream_verify
from sidecar.secretrefs import resolve
from sidecar.services import SERVICE_KEYS, start_sweeper
from sidecar.state.flags import set_killswitch
from sidecar.upstream import NotSent, OutcomeUnknown
from sidecar.upstream_fast import FastUpstreamClient

log = get_logger("sidecar.proxy")
DRAIN_TIMEOUT_S = 30.0
# Changing these needs a restart: a reload that touches them is refused (and said).
RESTART_KEYS = ("upstream", "listen", "admin", "audit") + SERVICE_KEYS


def apply_options(opts: options.Options, cfg: Config, tls_pem: str | None = None) -> None:
    """Set after the addons are added: their options do not exist before."""
    up, lis = cfg.upstream, cfg.listen
    mode = {"forward": "regular", "transparent": "transparent"}.get(lis.mode, f"reverse:{up.scheme}://{up.host}:{up.port}")
    opts.update(
        mode=[mode],
        listen_host=lis.host,
        listen_port=lis.port,
        rawtcp=False,
        websocket=False,
        http3=False,
        ssl_insecure=False,
        keep_host_header=True,       # the adapter sets Host itself; it needs the app's Host to rewrite URLs
        connection_strategy="lazy",  # never connect anywhere before our hooks have decided
        upstream_cert=False,
    )
    if up.ca_bundle:
        opts.update(ssl_verify_upstream_trusted_ca=up.ca_bundle)
    if lis.confdir:
        opts.update(confdir=lis.confdir)
    if tls_pem is not None:
        opts.update(certs=[f"*={tls_pem}"])  # the certificate served to apps (listen.tls)
    if any(c.auth == "mtls" for c in cfg.clients):
        opts.update(request_client_cert=True)  # mitmproxy asks; the addon verifies the chain


class Sidecar:
    def __init__(self, cfg: Config, config_file: Path | None, *, base_dir: Path,
                 install_signals: bool = True, fsync: Any = None, worker: Any = None,
                 worker_listen_port: int | None = None) -> None:
        self.worker = worker  # a WorkerSlot when started by `run --workers N`'s supervisor
        self._worker_port = worker_listen_port
        self.cfg = self._adapt(cfg)
        self._install_signals = install_signals
        self._fsync = fsync  # injectable so tests can block or fail the audit's fsync
        self.config_file = config_file
        self.base_dir = base_dir
        self.pipeline: Pipeline | None = None
        self.master: Master | None = None
        self.addon: SidecarAddon | None = None
        self.admin: AdminServer | None = None
        self.admin_token: str | None = None
        self.ready = False

    def _adapt(self, cfg: Config) -> Config:
        """A worker runs the config with its own audit chain/file and the supervisor's port."""
        if self.worker is None:
            return cfg
        from sidecar.workers import for_worker

        return for_worker(cfg, self.worker, self._worker_port if self._worker_port is not None else cfg.listen.port)

    async def run(self) -> int:
        if self.worker is not None:
            from sidecar.workers import enable_reuse_port

            enable_reuse_port()
        rt = await build_runtime(self.cfg, self.base_dir, fsync=self._fsync)
        self.pipeline = Pipeline(rt)
        if self.cfg.admin.token:
            self.admin_token = resolve(self.cfg.admin.token, base_dir=self.base_dir).reveal()
        up = self.cfg.upstream
        pins = frozenset(p.lower() for p in up.spki_sha256)
        self.writer = FastUpstreamClient(verify=upstream_verify(self.cfg, self.base_dir), timeout_s=up.timeout_s,
                                         pins=pins)
        mtls = None
        if any(c.auth == "mtls" for c in self.cfg.clients):
            ca = resolve(self.cfg.identity.client_ca or "", base_dir=self.base_dir).reveal() \
                if (self.cfg.identity.client_ca or "").startswith(("env:", "file:", "vault:")) \
                else (self.base_dir / (self.cfg.identity.client_ca or "")).read_text()
            mtls = ClientCertVerifier(ca.encode())
        self.addon = SidecarAddon(
            lambda: self._current(), mode=self.cfg.listen.mode, upstream_host=up.host, upstream_port=up.port,
            upstream_scheme=up.scheme, upstream_base=up.base_url, base_path=up.base_path, writer=self.writer,
            require_tls=self.cfg.listen.tls is not None, mtls=mtls,
        )
        self.master = Master(options.Options())
        skip_message_typecheck()
        lean_hook_dispatch(self.master.addons)
        self.master.addons.add(
            core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
            errorcheck.ErrorCheck(), self.addon,
        )
        apply_options(self.master.options, self.cfg, self._listener_pem())
        self.admin = AdminServer(self.cfg.admin.host, self.cfg.admin.port, self._admin,
                                 sock_fd=self.worker.admin_fd if self.worker is not None else None)
        await self.admin.start()
        if self._install_signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.drain()))
            loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(self.drain()))
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        if self.cfg.recording is not None:
            try:
                self.addon.recorder = Recorder(self.cfg.recording, recording_key(self.cfg, self.base_dir, vault=rt.svc.vault),
                                               self.base_dir)
            except (OSError, RecordingError) as e:
                raise ConfigError(f"recording: {e}") from None
        hooks = rt.svc.approvals.hooks
        hooks.audit = lambda f: self._current().rt.audit.append(f, durable=True)
        hooks.release = self._release
        if self.worker is None or self.worker.index == 0:  # one sweeper per store, not one per worker
            start_sweeper(rt.svc, self._on_review_alert)
        if self.worker is not None:  # alert windows across workers: in the state store
            shared = rt.svc.alerts.share(rt.svc.store, self._on_review_alert)
            rt.svc._tasks.append(asyncio.create_task(shared.run(), name="shared-alert-windows"))
        poll = asyncio.create_task(self._poll_killswitch())
        await rt.audit.append({"kind": "admin", "decision": "admin", "reasons": ["config loaded"],
                               "policy_revision": rt.policy.revision if rt.policy else None}, durable=True)
        run = asyncio.create_task(self.master.run())
        await self._wait_listening(run)
        self.ready = True
        log.info("sidecar ready", worker=self.worker.index if self.worker is not None else None,
                 mode=self.cfg.listen.mode, listen=f"{self.cfg.listen.host}:{self.listen_port()}", upstream_host=up.host, version=_version(), policy_revision=rt.policy.revision if rt.policy else None)
        try:
            await run
        finally:
            poll.cancel()
            await self.admin.stop()
            if self.addon.recorder is not None:
                await self.addon.recorder.close()
            await self._current().rt.audit.close()
            await self._current().rt.svc.close()
            await self.writer.close()
            if getattr(self, "_tls_dir", None) is not None:
                shutil.rmtree(self._tls_dir, ignore_errors=True)
        return 0

    def _listener_pem(self) -> str | None:
        """listen.tls: key + certificate in one private file, as mitmproxy's `certs` option wants."""
        tls = self.cfg.listen.tls
        if tls is None:
            return None
        cert = resolve(tls.cert, base_dir=self.base_dir).reveal()
        key = resolve(tls.key, base_dir=self.base_dir).reveal()
        folder = Path(tempfile.mkdtemp(prefix="fhir-sidecar-tls-"))  # 0700
        path = folder / "listener.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.strip() + "\n" + cert.strip() + "\n")
        self._tls_dir = folder
        return str(path)

    def _current(self) -> Pipeline:
        assert self.pipeline is not None
        return self.pipeline

    def listen_port(self) -> int:
        ps = self.master.addons.get("proxyserver") if self.master else None
        addrs = ps.listen_addrs() if ps else []
        return addrs[0][1] if addrs else self.cfg.listen.port

    async def _wait_listening(self, run: asyncio.Task) -> None:
        for _ in range(200):
            if run.done():
                await run  # start-up failed: surface it
                raise ConfigError("proxy stopped during start-up")
            ps = self.master.addons.get("proxyserver") if self.master else None
            if ps and ps.listen_addrs():
                return
            await asyncio.sleep(0.05)
        raise ConfigError("proxy listener did not come up")

    async def _poll_killswitch(self) -> None:
        while True:
            try:
                _ = self._current().rt.killswitch.state  # records changes even without traffic
            except Exception as e:
                log.error("kill switch poll failed", error_type=type(e).__name__)
            await asyncio.sleep(0.5)

    async def _on_review_alert(self, alert: Any) -> None:
        svc = self._current().rt.svc
        svc.metrics.alert(alert.kind)
        log.warning("alert", **alert.log_fields())
        if svc.webhook is not None:
            svc.webhook.submit(alert)
        await _safe_append(self._current().rt, alert.audit_fields())

    async def _release(self, rel: Any) -> None:
        """Forward an approved held write exactly once: kill switch, scopes and policy are checked
        again (with the reviewers in context.approvals), the stored bytes go out under the release
        credential with the original correlation id and an idempotency key derived from the hold."""
        from types import SimpleNamespace

        from sidecar.approvals.service import release_principal

        pipe = self._current()
        svc, up = pipe.rt.svc, self.cfg.upstream
        approvals = svc.approvals.service
        client = self.cfg.client(rel.client_id)
        if client is None:
            await approvals.release_refused(rel.item_id, 403, token=rel.token)
            return
        raw = RawRequest(rel.method, rel.target.encode("latin-1"), rel.raw_headers(), rel.body, mode="release")
        ctx = SimpleNamespace(item_id=rel.item_id, approvals=rel.approvals,
                              principal_now=release_principal(rel, client))
        d = await pipe.decide(raw, rel.correlation_id, "", release=ctx)
        if d.refusal is not None:
            await approvals.release_refused(rel.item_id, d.refusal.status, token=rel.token,
                                            retry=d.refusal.status in (429, 503))
            return
        if d.replay is not None:  # released before (a double click): the stored outcome stands
            loc = next((v for k, v in d.replay.headers if k.lower() == "location"), None)
            await approvals.record_outcome(rel.item_id, d.replay.status, _relative(loc, up.base_url), token=rel.token)
            return
        req = d.request
        assert req is not None
        fields = [(k.decode(), v.decode("latin-1")) for k, v in upstream_headers(d, (up.host, up.port, up.scheme), None)
                  if k not in (b"host", b"content-length")]
        try:
            ans = await self.writer.send(req.method, f"{up.scheme}://{up.host}:{up.port}{rel.target}", fields, req.raw_body)
        except NotSent:
            await pipe.finish(d, None, raw, outcome="failed", sent=False)
            await approvals.release_refused(rel.item_id, 502, token=rel.token, retry=True)
            return
        except OutcomeUnknown:
            await pipe.finish(d, None, raw, outcome="unknown")
            await approvals.record_outcome(rel.item_id, None, None, token=rel.token)
            return
        await pipe.finish(d, ans.status, raw, headers=ans.headers, body=ans.body)
        loc = next((v for k, v in ans.headers if k.lower() == "location"), None)
        await approvals.record_outcome(rel.item_id, ans.status, _relative(loc, up.base_url), token=rel.token)

    async def drain(self) -> None:
        """SIGTERM: stop listening, let in-flight requests finish, then exit."""
        if self.addon is None or self.master is None or self.addon.draining:
            return
        log.info("draining", count=self.addon.inflight)
        self.addon.draining = True
        self.ready = False
        self.master.options.update(server=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while self.addon.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.master.shutdown()

    async def reload(self) -> bool:
        """SIGHUP: a new config and policy, or the old ones kept (and said)."""
        rt = self._current().rt
        try:
            if self.config_file is None:
                raise ConfigError("no config file to reload")
            new = self._adapt(load_config(self.config_file))
            changed = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.cfg, k)]
            if changed:
                raise ConfigError(f"changing {', '.join(changed)} needs a restart")
            resolve_secrets(new, self.base_dir, vault=rt.svc.vault)
            new_rt = await build_runtime(new, self.base_dir, audit=rt.audit, services=rt.svc)
        except Exception as e:
            log.error("reload refused; the running config is kept", error_type=type(e).__name__, reasons=[str(e)[:300]])
            await _safe_admin(rt, ["reload refused"])
            return False
        self.cfg = new
        self.pipeline = Pipeline(new_rt)
        log.info("config reloaded", policy_revision=new_rt.policy.revision if new_rt.policy else None)
        await _safe_admin(new_rt, ["config reloaded"])
        return True

    # -- admin API -----------------------------------------------------------------------------

    async def _admin(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        path = urlsplit(target).path
        rt = self._current().rt
        if path == "/healthz" and method == "GET":
            return 200, {"status": "ok"}
        if path == "/readyz" and method == "GET":
            problems = []
            if not self.ready:
                problems.append("not started or draining")
            if not rt.audit.healthy:
                problems.append("audit sink failed")
            return (503 if problems else 200), {"ready": not problems, "problems": problems}
        if path == "/metrics" and method == "GET":
            return 200, (rt.svc.metrics.render(), rt.svc.metrics.content_type)
        got = await rt.svc.approvals.admin(method, target, headers, body)  # /review/ page, /admin/approvals
        if got is not None:
            return got
        if not path.startswith("/admin/"):
            return 404, {"error": "not found"}
        if not bearer_ok(headers, self.admin_token):
            return 401, {"error": "admin token required" if self.admin_token else "admin.token is not configured"}
        if path == "/admin/killswitch":
            if method == "GET":
                st = rt.killswitch.state
                return 200, {"engaged": st.engaged, "clients": sorted(st.clients), "scope": rt.killswitch.scope}
            if method == "POST":
                try:
                    req = json.loads(body or b"{}")
                    on, client, reason = bool(req["engaged"]), req.get("client"), str(req.get("reason", ""))[:500]
                    killswitch.write_flag(rt.killswitch.flag_file, on, client, reason)
                except (ValueError, KeyError, TypeError) as e:
                    return 400, {"error": f"bad request: {type(e).__name__}"}
                if rt.svc.shared_flags is not None:  # replicas: every one of them sees it
                    await set_killswitch(rt.svc.store, on, client, reason)
                    await rt.svc.shared_flags.refresh()
                st = rt.killswitch.refresh()
                return 200, {"engaged": st.engaged, "clients": sorted(st.clients)}
        if path == "/admin/receipts" and method == "GET":
            q = dict(parse_qsl(urlsplit(target).query))
            state = await rt.svc.idempotency.state(q.get("client", ""), q.get("key", ""))
            return (200, state) if state is not None else (404, {"error": "no such receipt"})
        if path == "/admin/receipts/resolve" and method == "POST":
            try:
                req = json.loads(body or b"{}")
                client, key, committed = str(req["client"]), str(req["key"]), bool(req["committed"])
            except (ValueError, KeyError, TypeError) as e:
                return 400, {"error": f"bad request: {type(e).__name__}"}
            result = await rt.svc.idempotency.resolve(client, key, committed, location=req.get("location"))
            await _safe_admin(rt, [f"receipt resolved as {'committed' if committed else 'failed'}: {result}"],
                              client_id=client, idempotency_key=key)
            return (200 if result == "resolved" else 409), {"result": result}
        if path == "/admin/reload" and method == "POST":
            ok = await self.reload()
            return (200 if ok else 409), {"reloaded": ok}
        return 404, {"error": "not found"}


async def _safe_admin(rt: Any, reasons: list[str], **fields: Any) -> None:
    try:
        await rt.audit.append({"kind": "admin", "decision": "admin", "reasons": reasons, **fields}, durable=True)
    except Exception as e:
        log.error("admin audit record failed", error_type=type(e).__name__)


def _version() -> str:
    from sidecar import __version__

    return __version__


def _relative(location: str | None, upstream_base: str) -> str | None:
    """A Location relative to the FHIR base: apps never learn the EHR's address."""
    if location and location.startswith(upstream_base + "/"):
        return location[len(upstream_base) + 1:]
    return location if location and "://" not in location else None


async def _safe_append(rt: Any, fields: dict) -> None:
    try:
        await rt.audit.append(fields, durable=False)
    except Exception as e:
        log.error("audit record failed", error_type=type(e).__name__)
