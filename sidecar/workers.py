"""`fhir-sidecar run --workers N`: N proxy processes on one port, under one supervisor.

One mitmproxy process uses one core. Each worker is a whole sidecar (its own embedded mitmproxy,
pipeline and audit chain); nothing on the request path crosses processes. The workers share:
  - the listening port, through SO_REUSEPORT (the kernel spreads new connections over them;
    mitmproxy 11 binds without it, so `enable_reuse_port` patches its listener);
  - receipts, rate limits, breaker, back-off and alert windows, through the state store
    (SQLite WAL or Redis); the kill switch through its flag file (and the store with Redis).
Each worker appends to its own chain (`<chain>.w<i>`) in its own file (`audit.w<i>.jsonl`), so
no two writers ever share a chain; `audit verify` takes them all.

The supervisor holds no request: it reserves the port (bound, never listening, so a restarting
worker cannot lose it to another program), starts worker 0 and waits until it is ready (it
creates the CA, the audit directory and the store schema), then the others; restarts a worker
that dies (with back-off); forwards SIGHUP; on SIGTERM lets every worker drain, then exits. Its
admin listener answers for all workers: `/healthz`, `/readyz` (ready when every worker is),
`/metrics` (counters and histograms summed, gauges the maximum), `/admin/reload` (every worker);
the rest of the admin API goes to one live worker (the state behind it is shared).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import Config, ConfigError
from sidecar.logs import SAFE_KEYS

SAFE_KEYS.update({"workers", "admin_port", "exit_code", "delay_s"})  # numbers about processes, never PHI

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_AFTER_S = 30.0          # a worker that ran this long restarts at the shortest back-off again
START_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 40.0           # the workers' own drain timeout (30 s) plus margin, then SIGKILL
MAX_WORKERS = 64


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    count: int
    admin_fd: int | None = None   # the admin listener socket the supervisor made for this worker

    @classmethod
    def parse(cls, spec: str, admin_fd: int | None) -> WorkerSlot:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ConfigError(f"--worker wants I/N, got {spec!r}") from None
        if not 0 <= i < n:
            raise ConfigError(f"--worker {spec}: index out of range")
        return cls(i, n, admin_fd)


def worker_file(path: str, index: int) -> str:
    """`audit.jsonl` -> `audit.w1.jsonl`: one file per worker, next to the configured one."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


def for_worker(cfg: Config, slot: WorkerSlot, listen_port: int) -> Config:
    """The config one worker runs: its own audit chain and file (and recording file), the
    reserved listening port, and an admin listener only the supervisor talks to."""
    a = cfg.audit
    update: dict[str, Any] = {
        "audit": a.model_copy(update={"path": worker_file(a.path, slot.index), "chain": f"{a.chain}.w{slot.index}"}),
        "listen": cfg.listen.model_copy(update={"port": listen_port}),
        "admin": cfg.admin.model_copy(update={"host": "127.0.0.1", "port": 0}),
    }
    if cfg.recording is not None:
        update["recording"] = cfg.recording.model_copy(update={"path": worker_file(cfg.recording.path, slot.index)})
    return cfg.model_copy(update=update)


def enable_reuse_port() -> None:
    """Make mitmproxy's TCP listeners bind with SO_REUSEPORT (workers share one port)."""
    from mitmproxy.proxy import mode_servers

    cls = getattr(mode_servers, "AsyncioServerInstance", None)
    if cls is None or not hasattr(cls, "listen"):
        raise ConfigError("--workers: this mitmproxy version has no patchable listener")

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp":
            raise ConfigError("--workers supports TCP listeners only")
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]

    cls.listen = listen


def die_with_supervisor() -> None:
    """Linux: a worker gets SIGTERM (and drains) if its supervisor dies, never serves orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) host:port with SO_REUSEPORT: the port is ours, and only sockets that
    also set SO_REUSEPORT under this user can join it. Port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(f"listen {host}:{port}: {e.strerror}") from None
    return s


def check_workers(cfg: Config, count: int) -> None:
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1..{MAX_WORKERS}")
    if count > 1 and not cfg.state.store.startswith(("sqlite:", "redis:", "rediss:")):
        raise ConfigError("--workers N > 1 needs a shared state store (sqlite: or redis:)")


@dataclass
class _Worker:
    slot: WorkerSlot
    admin_sock: socket.socket
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    failures: int = 0     # consecutive short lives, for the back-off

    @property
    def admin_port(self) -> int:
        return self.admin_sock.getsockname()[1]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    def __init__(self, cfg: Config, config_file: Path, count: int, *, log_level: str = "info",
                 install_signals: bool = True) -> None:
        check_workers(cfg, count)
        self.cfg = cfg
        self.config_file = config_file
        self.count = count
        self.log_level = log_level
        self._install_signals = install_signals
        self._stopping = False
        self._workers: list[_Worker] = []
        self._reserved: socket.socket | None = None
        self.listen_port = 0
        self.admin: Any = None
        self._admin_token: str | None = None

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        from sidecar.admin import AdminServer
        from sidecar.logs import get_logger
        from sidecar.secretrefs import resolve

        log = get_logger("sidecar.workers")
        base = self.config_file.parent.resolve()
        if self.cfg.admin.token:
            self._admin_token = resolve(self.cfg.admin.token, base_dir=base).reveal()
        self._reserved = reserve_port(self.cfg.listen.host, self.cfg.listen.port)
        self.listen_port = self._reserved.getsockname()[1]
        for i in range(self.count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            self._workers.append(_Worker(WorkerSlot(i, self.count, s.fileno()), s))
        if self._install_signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        try:
            # Worker 0 first: it creates the CA, the audit directory and the store schema.
            await self._spawn(self._workers[0])
            await self._wait_ready([self._workers[0]])
            for w in self._workers[1:]:
                await self._spawn(w)
            await self._wait_ready(self._workers[1:])
            self.admin = AdminServer(self.cfg.admin.host, self.cfg.admin.port, self._admin)
            await self.admin.start()
            log.info("workers ready", workers=self.count, listen=f"{self.cfg.listen.host}:{self.listen_port}",
                     admin_port=self.admin.port)
            await asyncio.gather(*(self._watch(w, log) for w in self._workers))
        finally:
            self._stopping = True
            await self._terminate_all()
            if self.admin is not None:
                await self.admin.stop()
            for w in self._workers:
                w.admin_sock.close()
            self._reserved.close()
        return 0

    def stop(self) -> None:
        """SIGTERM: every worker drains its in-flight requests, then the supervisor exits."""
        if not self._stopping:
            self._stopping = True
            self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.alive:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def _spawn(self, w: _Worker) -> None:
        argv = [sys.executable, "-m", "sidecar", "run", "--config", str(self.config_file),
                "--log-level", self.log_level, "--worker", f"{w.slot.index}/{self.count}",
                "--listen-port", str(self.listen_port), "--admin-fd", str(w.admin_sock.fileno())]
        w.proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(w.admin_sock.fileno(),))
        w.started = time.monotonic()

    async def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(workers)
        while pending:
            for w in list(pending):
                if not w.alive:
                    raise ConfigError(f"worker {w.slot.index} exited during start-up (exit {w.proc.returncode})")
                status, _, _ = await self._ask(w, "GET", "/readyz", {}, b"")
                if status == 200:
                    pending.remove(w)
            if pending:
                if time.monotonic() > deadline:
                    raise ConfigError(f"worker {pending[0].slot.index} did not become ready")
                await asyncio.sleep(0.1)

    async def _watch(self, w: _Worker, log: Any) -> None:
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - w.started
            w.failures = 0 if lived > STABLE_AFTER_S else w.failures + 1
            delay = RESTART_BACKOFF_S[min(w.failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("worker exited; restarting", worker=w.slot.index, exit_code=code, delay_s=delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            w.restarts += 1
            await self._spawn(w)

    async def _terminate_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        procs = [w.proc for w in self._workers if w.alive]
        if not procs:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=DRAIN_GRACE_S)
        if pending:
            for w in self._workers:
                if w.alive:
                    w.proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))

    # -- admin ---------------------------------------------------------------------------------

    async def _ask(self, w: _Worker, method: str, target: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request to a worker's admin listener; (0, [], b"") when it does not answer."""
        from sidecar.workers_admin import admin_request

        try:
            return await admin_request(w.admin_port, method, target, headers, body)
        except (TimeoutError, OSError, ValueError):
            return 0, [], b""

    async def _admin(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        from sidecar.workers_admin import handle_admin

        return await handle_admin(self, method, target, headers, body)
