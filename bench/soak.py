#!/usr/bin/env python3
"""Soak test (issue "Speed", item 5): the sidecar at a steady share of its measured capacity.

    .venv/bin/python bench/soak.py [--minutes 10] [--read-share 0.8] [--json FILE] [--keep-tmp]

Starts, on 127.0.0.1 and free ports, the project's sandbox EHR (a child process of this script that
streams the sandbox's own request log, the witness, to a file) and `python -m sidecar run` with full
enforcement (api-key client, embedded Rego policy, audit on disk with fsync, SQLite state). Measures
the capacity of the whole chain with a closed loop at full speed, then drives it open-loop at
`--load` (default 70%) of that for `--minutes`, with a mix of reads, creates and updates, sampling
the sidecar's RSS, open fds, achieved rate, errors and latency every `--sample-seconds`. At the end:
RSS growth after warm-up, fd growth, `fhir-sidecar audit verify`, and the witness check (every write
the sandbox received has an `intent` audit record with its correlation id, written before).
Last stdout line: `SOAK_JSON {...}`. Exit 0 if every PASS/MISS line is PASS, 1 otherwise, 2 on a
setup error. Every process started here is stopped by its PID, and the temp dir removed (unless
--keep-tmp), also on Ctrl-C/SIGTERM. See bench/README.md ("Soak").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # also when loaded as a module (tests/test_soak_script.py)
from procs import Proc, Processes  # noqa: E402  # bench/procs.py

REPO = BENCH.parent
BASE = "/fhir/R4"
CLIENT_ID = "soak"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
RSS_LIMIT = 0.10     # RSS may grow less than 10% after warm-up
FD_SLACK = 5         # fds at the end may exceed the count after warm-up by this much
SHED_AFTER_S = 1.0   # a request not started within this of its scheduled time is dropped (counted as shed)
SEED_READ = 8        # Observations created (through the sidecar) before the load, read by the mix
SEED_UPDATE = 8      # ... and the ones the mix updates (each has at most one update in flight)
VITALS = [  # synthetic vital signs: (LOINC code, display, unit, UCUM code, low, high)
    ("8867-4", "Heart rate", "beats/minute", "/min", 50, 110),
    ("9279-1", "Respiratory rate", "breaths/minute", "/min", 10, 24),
    ("8310-5", "Body temperature", "Cel", "Cel", 36.0, 38.5),
    ("59408-5", "Oxygen saturation", "%", "%", 90, 100),
]


class SoakError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open fds by kind: socket, pipe, anon_inode (eventfd/epoll), file, other."""
    out: dict[str, int] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else (
            "file" if target.startswith("/") else "other")
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float | None:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def thread_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def pct(sorted_xs: list[float], p: float) -> float | None:
    if not sorted_xs:
        return None
    k = min(len(sorted_xs) - 1, max(0, round(p / 100 * (len(sorted_xs) - 1))))
    return sorted_xs[k]


def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# -- the sandbox EHR, in a child process that streams its witness log ---------------------------------

def sandbox_child(port: int, witness: Path, audit_file: Path) -> int:
    """`soak.py --sandbox-child PORT FILE`: the project's SandboxServer (default profile), whose request
    log is drained every 0.5 s into FILE (one compact JSON line per request, in `seq` order).

    The log's HTTP endpoint (GET /_sandbox/log) deep-copies the whole in-memory log (capped at
    100,000 entries) under the sandbox's lock, which would stall the upstream and lose the oldest
    entries of a long soak; draining it in-process, atomically under the same lock, loses nothing.
    An entry leaves the log once answered (its status set), or after 30 s without an answer.

    When a write has arrived (headers and body read, before the sandbox logs or executes it), the
    child also notes the inode and size of the sidecar's active audit file: the intent record of that
    write must already be in the file, within that size (or in a file rotated before it).
    """
    sys.path.insert(0, str(REPO))
    from sidecar.sandbox import SandboxServer

    server = SandboxServer("127.0.0.1", port)
    admit = server._admit

    def admit_noting_audit(method, path, query, headers, body, req, **kw):
        audit = None
        if method in WRITE_METHODS:
            for _ in range(100):  # absent only between a rotation's rename and the new file's creation
                try:
                    st = os.stat(audit_file)
                    audit = (st.st_ino, st.st_size)
                    break
                except FileNotFoundError:
                    time.sleep(0.001)
        entry, decision = admit(method, path, query, headers, body, req, **kw)
        entry["audit_at_arrival"] = audit
        return entry, decision

    server._admit = admit_noting_audit  # the handler calls sandbox._admit(...)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    out = open(witness, "w")

    def drain(final: bool) -> None:
        batch = []
        with server._lock:  # the lock _admit/_finish hold: no entry is appended or finished meanwhile
            q = server._log
            now = time.time()
            while q and (final or q[0]["status"] is not None or now - q[0]["ts"] > 30):
                batch.append(q.popleft())
        for e in batch:
            out.write(json.dumps({"seq": e["seq"], "ts": e["ts"], "method": e["effective_method"],
                                  "raw_method": e["method"], "path": e["path"], "cid": e["correlation_id"],
                                  "action": e["action"], "status": e["status"],
                                  "audit_at_arrival": e.get("audit_at_arrival")}, separators=(",", ":")) + "\n")
        out.flush()

    print(server.base_url, flush=True)
    try:
        while not stop.wait(0.5):
            drain(False)
    finally:
        server.stop()
        drain(True)
        out.close()
    return 0


# -- processes: bench/procs.py ---------------------------------------------------------------------

def wait_until(check, what: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SoakError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n{proc.tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SoakError(f"timed out waiting for {what}\n{proc.tail()}")


def venv_python() -> str:
    cand = REPO / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


def start_sandbox(procs: Processes, tmp: Path, audit_file: Path) -> tuple[str, Proc, Path]:
    port = free_port()
    witness = tmp / "sandbox-witness.jsonl"
    p = procs.start("sandbox", [venv_python(), str(Path(__file__).resolve()), "--sandbox-child", str(port),
                                str(witness), str(audit_file)], tmp, cwd=REPO)
    base = f"http://127.0.0.1:{port}{BASE}"
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/_sandbox/health", timeout=2)[0] == 200,
               "the sandbox EHR", p)
    log(f"sandbox EHR on {base} (pid {p.pid}), witness log {witness.name}")
    return base, p, witness


def make_policy_dir(tmp: Path) -> Path:
    """A copy of policies/ whose data.json gains the client `soak`, which may write Observations."""
    pdir = tmp / "policies"
    shutil.copytree(REPO / "policies", pdir)
    data_file = pdir / "data.json"
    data = json.loads(data_file.read_text())
    data.setdefault("fhir_sidecar", {}).setdefault("clients", {})[CLIENT_ID] = {"write_types": ["Observation"]}
    data_file.write_text(json.dumps(data, indent=1))
    return pdir


@dataclass
class Sidecar:
    port: int
    admin: int
    proc: Proc
    cfg: Path
    audit_dir: Path
    env: dict[str, str]


def start_sidecar(procs: Processes, tmp: Path, upstream: str, api_key: str, args: argparse.Namespace) -> Sidecar:
    import yaml  # in the repo's .venv (a dependency of the sidecar)

    port, admin = free_port(), free_port()
    audit_dir = tmp / "audit"  # created by run()
    audit: dict = {"path": str(audit_dir / "audit.jsonl"), "key": "env:FHIR_SIDECAR_AUDIT_KEY"}
    if args.audit_max_mb > 0:
        audit["max_bytes"] = int(args.audit_max_mb * 1024 * 1024)
    cfg = {
        "upstream": {"url": upstream, "timeout_s": 10},
        "listen": {"host": "127.0.0.1", "port": port, "mode": "reverse"},
        "admin": {"host": "127.0.0.1", "port": admin},
        "clients": [{"id": CLIENT_ID, "auth": "api-key", "api_key_sha256": hashlib.sha256(api_key.encode()).hexdigest(),
                     "scopes": ["system/Observation.cruds"]}],
        "policy": {"engine": "embedded", "dir": str(make_policy_dir(tmp)), "path": "fhir/writeback"},
        "killswitch": {"file": str(tmp / "killswitch")},
        "audit": audit,
        "state": {"store": f"sqlite:{tmp / 'state.db'}"},
    }
    cfg_path = tmp / "sidecar.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, FHIR_SIDECAR_AUDIT_KEY=secrets.token_urlsafe(48))
    p = procs.start("sidecar", [venv_python(), "-m", "sidecar", "run", "--config", str(cfg_path),
                                "--log-level", args.log_level], tmp, env=env, cwd=REPO)
    wait_until(lambda: http("GET", f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200, "sidecar /readyz", p)
    log(f"sidecar on 127.0.0.1:{port}, admin {admin} (pid {p.pid}); audit {audit_dir}"
        + (f", rotated past {args.audit_max_mb:g} MB" if args.audit_max_mb > 0 else ""))
    return Sidecar(port, admin, p, cfg_path, audit_dir, env)


# -- requests -------------------------------------------------------------------------------------

def observation(rng: random.Random, oid: str | None = None) -> bytes:
    code, display, unit, ucum, lo, hi = rng.choice(VITALS)
    value = round(rng.uniform(lo, hi), 1) if isinstance(lo, float) else rng.randint(lo, hi)
    res: dict = {"resourceType": "Observation"}
    if oid:
        res["id"] = oid
    res.update({
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": f"Patient/soak-{rng.randint(1, 50)}"},  # synthetic
        "effectiveDateTime": datetime.now().astimezone().isoformat(timespec="seconds"),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": ucum},
    })
    return json.dumps(res, separators=(",", ":")).encode()


class Conn:
    """One keep-alive HTTP/1.1 connection to the sidecar (h11), reconnected after any error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h = None
        self.connects = 0

    async def _connect(self) -> None:
        import h11
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.h = h11.Connection(h11.CLIENT)
        self.connects += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = self.h = None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | None, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
        import h11
        if self.h is None:
            await self._connect()
        try:
            return await asyncio.wait_for(self._exchange(h11, method, target, headers, body), timeout)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, h11, method, target, headers, body):
        h = self.h
        hdrs = [("Host", f"127.0.0.1:{self.port}"), *headers]
        if body is not None:
            hdrs.append(("Content-Length", str(len(body))))
        data = h.send(h11.Request(method=method, target=target, headers=hdrs))
        if body is not None:
            data += h.send(h11.Data(data=body))
        data += h.send(h11.EndOfMessage())
        self.writer.write(data)
        status, resp_headers, chunks = 0, {}, []
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                got = await self.reader.read(65536)
                if not got:
                    raise ConnectionError("connection closed by the sidecar")
                h.receive_data(got)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
                resp_headers = {k.decode().lower(): v.decode(errors="replace") for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("connection closed by the sidecar")
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        else:
            self.close()
        return status, resp_headers, b"".join(chunks)


@dataclass
class Window:
    """What happened between two samples."""
    started: float
    counts: dict[str, int] = field(default_factory=lambda: {"read": 0, "create": 0, "update": 0})
    ok: int = 0
    errors: int = 0
    late: int = 0           # requests started > 50 ms after their scheduled time (the generator fell behind)
    shed: int = 0           # requests not sent at all: already SHED_AFTER_S late when a connection was free
    lat: list[float] = field(default_factory=list)


class Load:
    """The request mix and everything the generator saw."""

    def __init__(self, port: int, api_key: str, args: argparse.Namespace, read_ids: list[str],
                 update_ids: list[str]) -> None:
        self.port, self.api_key, self.args = port, api_key, args
        self.read_ids = read_ids
        self.free_updates: list[str] = list(update_ids)
        self.rng = random.Random(args.seed)
        self.n = 0
        self.window = Window(time.monotonic())
        self.all_lat: list[float] = []     # service latency of every soak request (s)
        self.sched_lat: list[float] = []   # latency from the scheduled start (includes generator queueing)
        self.writes_2xx: dict[str, tuple[str, int]] = {}  # correlation id -> (kind, status) of 2xx writes
        self.writes_sent = 0
        self.error_samples: list[str] = []
        self.errors_by_status: dict[str, int] = {}
        self.record_all = False
        self.phase = "cap"
        self.scheduled = 0

    def pick(self) -> str:
        r = self.rng.random()
        if r < self.args.read_share:
            return "read"
        if r < self.args.read_share + self.args.update_share and self.free_updates:
            return "update"
        return "create"

    async def one(self, conn: Conn, kind: str, scheduled: float | None = None) -> bool:
        self.n += 1
        cid = f"soak-{self.phase}-{self.n:09d}"
        headers = [("X-API-Key", self.api_key), ("X-Correlation-ID", cid)]
        oid = None
        if kind == "read":
            method, target, body = "GET", f"{BASE}/Observation/{self.rng.choice(self.read_ids)}", None
        elif kind == "update":
            oid = self.free_updates.pop()
            method, target, body = "PUT", f"{BASE}/Observation/{oid}", observation(self.rng, oid)
        else:
            method, target, body = "POST", f"{BASE}/Observation", observation(self.rng)
        if body is not None:
            headers.append(("Content-Type", "application/fhir+json"))
            self.writes_sent += 1
        t0 = time.monotonic()
        if scheduled is not None and t0 - scheduled > 0.05:
            self.window.late += 1
        try:
            status, _, data = await conn.request(method, target, headers, body)
            err = None if 200 <= status < 300 else f"{status} {data[:300].decode(errors='replace')}"
            key = str(status)
        except Exception as e:  # any failure (connection, timeout, framing) is an error here
            status, err, key = 0, f"{type(e).__name__}: {e}", type(e).__name__
        finally:
            if oid is not None:
                self.free_updates.append(oid)
        t1 = time.monotonic()
        w = self.window
        w.counts[kind] += 1
        w.lat.append(t1 - t0)
        if self.record_all:
            self.all_lat.append(t1 - t0)
            if scheduled is not None:
                self.sched_lat.append(t1 - scheduled)
        if err is None:
            w.ok += 1
            if body is not None:
                self.writes_2xx[cid] = (kind, status)
            return True
        w.errors += 1
        self.errors_by_status[key] = self.errors_by_status.get(key, 0) + 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{method} {kind} {cid}: {err}")
        return False

    def take_window(self) -> Window:
        w, self.window = self.window, Window(time.monotonic())
        return w


async def capacity_phase(load: Load, connections: int, warmup: float, seconds: float) -> dict:
    """Closed loop at full speed: `connections` workers, each sending back to back."""
    conns = [Conn(load.port) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    ok_measured = [0]
    err_measured = [0]
    lat: list[float] = []

    async def worker(c: Conn) -> None:
        while loop.time() < t_end:
            t0 = loop.time()
            good = await load.one(c, load.pick())
            if t0 >= t_measure:
                lat.append(loop.time() - t0)
                if good:
                    ok_measured[0] += 1
                else:
                    err_measured[0] += 1

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    load.take_window()
    lat.sort()
    rps = ok_measured[0] / seconds
    return {"connections": connections, "warmup_s": warmup, "seconds": seconds, "ok": ok_measured[0],
            "errors": err_measured[0], "rps": round(rps, 1),
            "p50_ms": round(1000 * pct(lat, 50), 2) if lat else None,
            "p99_ms": round(1000 * pct(lat, 99), 2) if lat else None, "loadavg": loadavg()}


async def soak_phase(load: Load, sc: Sidecar, sandbox_pid: int, rate: float, seconds: float,
                     sample_s: float, max_conns: int) -> list[dict]:
    """Open loop: request i is due at t0 + i/rate; `max_conns` keep-alive connections take them in turn."""
    queue: asyncio.Queue = asyncio.Queue()
    conns = [Conn(load.port) for _ in range(max_conns)]
    samples: list[dict] = []
    load.phase, load.record_all = "soak", True

    async def worker(c: Conn) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            if time.monotonic() - item > SHED_AFTER_S:  # keep the offered load steady: no catch-up bursts
                load.window.shed += 1
                continue
            await load.one(c, load.pick(), item)

    workers = [asyncio.create_task(worker(c)) for c in conns]
    try:
        return await _soak_loop(load, sc, sandbox_pid, rate, seconds, sample_s, queue, conns, workers, samples)
    finally:
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for c in conns:
            c.close()


async def _soak_loop(load: Load, sc: Sidecar, sandbox_pid: int, rate: float, seconds: float, sample_s: float,
                     queue: asyncio.Queue, conns: list[Conn], workers: list[asyncio.Task],
                     samples: list[dict]) -> list[dict]:
    loop = asyncio.get_running_loop()
    load.take_window()
    pids = {"sidecar": sc.proc.pid, "sandbox": sandbox_pid, "generator": "self"}
    cpu_prev = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = loop.time()
    t0_mono = time.monotonic()
    next_sample = t0 + sample_s
    i = 0
    while True:
        now = loop.time()
        if now >= next_sample or now - t0 >= seconds:
            w = load.take_window()
            elapsed = time.monotonic() - w.started
            lat = sorted(w.lat)
            done = sum(w.counts.values())
            cpu_now = {k: cpu_seconds(p) for k, p in pids.items()}
            cpu = {f"cpu_{k}_pct": round(100 * (cpu_now[k] - cpu_prev[k]) / elapsed, 1)
                   if cpu_now[k] is not None and cpu_prev[k] is not None and elapsed > 0 else None for k in pids}
            cpu_prev = cpu_now
            s = {"t_s": round(now - t0, 1), "rss_kb": rss_kb(sc.proc.pid), "fds": fd_count(sc.proc.pid),
                 "threads": thread_count(sc.proc.pid), "sandbox_rss_kb": rss_kb(sandbox_pid),
                 "rps": round(done / elapsed, 1) if elapsed > 0 else 0.0, "ok": w.ok, "errors": w.errors,
                 "late": w.late, "shed": w.shed, "backlog": queue.qsize(), **cpu,
                 **{f"n_{k}": v for k, v in w.counts.items()},
                 "p50_ms": round(1000 * pct(lat, 50), 2) if lat else None,
                 "p99_ms": round(1000 * pct(lat, 99), 2) if lat else None,
                 "connections": sum(1 for c in conns if c.h is not None), "fd_kinds": fd_kinds(sc.proc.pid),
                 "loadavg": loadavg()}
            samples.append(s)
            log(f"t={s['t_s']:6.1f}s rss {s['rss_kb'] / 1024:7.1f} MB fds {s['fds']:4d} {s['rps']:7.1f} req/s "
                f"errors {s['errors']:3d} p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms late {s['late']} "
                f"shed {s['shed']} cpu% sidecar/sandbox/generator {s['cpu_sidecar_pct']}/{s['cpu_sandbox_pct']}/"
                f"{s['cpu_generator_pct']} load {s['loadavg']}")
            next_sample += sample_s
            if now - t0 >= seconds:
                break
        due = min(int((now - t0) * rate) + 1, int(seconds * rate))
        while i < due:
            queue.put_nowait(t0_mono + i / rate)
            i += 1
        await asyncio.sleep(0.002)
    load.record_all = False
    # stop taking new work; let the requests in flight finish (their answers are not sampled any more)
    while not queue.empty():
        queue.get_nowait()
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait(workers, timeout=30)
    load.scheduled = i
    return samples


INTERRUPTED: list[int] = []


def on_signal(signum, frame):
    INTERRUPTED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (a background job)
        signal.signal(sig, on_signal)


def run_async(coro_fn, *args):
    """asyncio.run(coro_fn(*args)), where SIGINT/SIGTERM cancel the phase cleanly (inside the event loop,
    not by raising in the middle of a callback) and then surface as KeyboardInterrupt."""
    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def stop(signum: int) -> None:
            INTERRUPTED.append(signum)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        return await coro_fn(*args)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if INTERRUPTED:
            raise KeyboardInterrupt(f"signal {INTERRUPTED[-1]}") from None
        raise
    finally:
        install_signal_handlers()  # closing the loop reset them


# -- checks after the run -------------------------------------------------------------------------

def ts_epoch(ts: str) -> float:
    # audit ts: RFC 3339 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z
    return datetime.strptime(ts.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def chain_order(audit_dir: Path) -> list[Path]:
    """The audit files in chain order: rotated ones (`audit.jsonl.<stamp>.<n>`) by n, then the active one."""
    def key(f: Path) -> tuple[int, int]:
        if f.name == "audit.jsonl":
            return (1, 0)
        tail = f.name.rsplit(".", 1)[-1]
        return (0, int(tail)) if tail.isdigit() else (2, 0)
    return sorted(audit_dir.glob("audit.jsonl*"), key=key)


def scan_audit(audit_dir: Path) -> tuple[int, dict[str, int], dict[str, dict], dict[str, dict], dict[int, int]]:
    """Streamed over every file of the chain: (records, count by kind, first intent by correlation id
    {ts, seq, ino, end}, first outcome by correlation id {seq, outcome}, file inode -> chain position).
    `end` is the byte offset just past the intent's line in its file (rotation renames: same inode)."""
    n, kinds, intents, outcomes, order = 0, {}, {}, {}, {}
    for pos, f in enumerate(chain_order(audit_dir)):
        ino = f.stat().st_ino
        order[ino] = pos
        offset = 0
        with open(f, "rb") as fh:
            for raw in fh:
                offset += len(raw)
                line = raw.strip()
                if not line.startswith(b"{"):
                    continue
                r = json.loads(line)
                n += 1
                kind = r["kind"]
                kinds[kind] = kinds.get(kind, 0) + 1
                cid = r.get("correlation_id")
                if kind == "intent" and cid and cid not in intents:
                    intents[cid] = {"ts": r["ts"], "seq": r["seq"], "ino": ino, "end": offset}
                elif kind == "outcome" and cid and cid not in outcomes:
                    outcomes[cid] = {"seq": r["seq"], "outcome": r.get("outcome")}
    return n, dict(sorted(kinds.items())), intents, outcomes, order


def in_file_before(intent: dict, at_arrival: list | None, order: dict[int, int]) -> bool:
    """Whether the intent's bytes were in the audit files when the write arrived at the sandbox: within
    the size of the then-active file, or in a file that had been rotated away before it."""
    if not at_arrival:
        return False
    ino, size = at_arrival
    if intent["ino"] == ino:
        return intent["end"] <= size
    return ino in order and order[intent["ino"]] < order[ino]


def witness_check(witness: Path, audit_dir: Path, writes_2xx: dict[str, tuple[str, int]]) -> dict:
    entries = []
    with open(witness) as fh:
        for line in fh:
            if line.strip():
                entries.append(json.loads(line))
    seqs = [e["seq"] for e in entries]
    complete = seqs == list(range(1, len(seqs) + 1))
    n_records, kinds, intents, outcomes, order = scan_audit(audit_dir)
    writes = [e for e in entries if e["method"] in WRITE_METHODS or e["raw_method"] in WRITE_METHODS]
    missing, late, not_in_file, no_cid = [], [], [], []
    for e in writes:
        if not e["cid"]:
            no_cid.append(e)
            continue
        it = intents.get(e["cid"])
        if it is None:
            missing.append(e)
            continue
        if ts_epoch(it["ts"]) > e["ts"]:
            late.append({"cid": e["cid"], "intent_ts": it["ts"], "arrived": e["ts"]})
        if not in_file_before(it, e.get("audit_at_arrival"), order):
            not_in_file.append({"cid": e["cid"], "intent": it, "audit_at_arrival": e.get("audit_at_arrival")})
    seen = {e["cid"] for e in writes}
    acked_not_seen = [cid for cid in writes_2xx if cid not in seen]
    outcome_of = {}
    for cid in intents:
        o = outcomes.get(cid)
        key = "none" if o is None else o.get("outcome", "?")
        outcome_of[key] = outcome_of.get(key, 0) + 1
    intent_before_outcome = sum(1 for cid, o in outcomes.items() if cid in intents and intents[cid]["seq"] < o["seq"])
    upstream_statuses: dict[str, int] = {}
    for e in writes:
        upstream_statuses[str(e["status"])] = upstream_statuses.get(str(e["status"]), 0) + 1
    ok = complete and not missing and not late and not not_in_file and not no_cid
    return {
        "pass": ok, "witness_entries": len(entries), "witness_complete": complete,
        "upstream_reads": len(entries) - len(writes), "upstream_writes": len(writes),
        "upstream_write_statuses": upstream_statuses,
        "upstream_writes_without_correlation_id": len(no_cid),
        "intent_missing": len(missing), "intent_after_arrival": len(late),
        "intent_not_in_file_at_arrival": len(not_in_file),
        "missing_sample": [m["cid"] for m in missing[:10]], "late_sample": late[:10],
        "not_in_file_sample": not_in_file[:10],
        "audit_records": n_records, "audit_kinds": kinds, "audit_files": len(order),
        "intents": len(intents), "intents_without_upstream_write": len(set(intents) - seen),
        "outcomes_of_intents": outcome_of, "intent_before_outcome": intent_before_outcome,
        "client_2xx_writes": len(writes_2xx), "client_2xx_writes_not_at_upstream": len(acked_not_seen),
    }


def audit_verify(sc: Sidecar, tmp: Path) -> dict:
    """`fhir-sidecar audit verify` on the chain, with the checkpoints the sidecar printed to stdout."""
    out = {}
    for label, extra in (("chain", []), ("with_checkpoints", ["--checkpoints", str(sc.proc.logfile)])):
        r = subprocess.run([venv_python(), "-m", "sidecar", "audit", "verify", "--config", str(sc.cfg), *extra],
                           check=False, capture_output=True, text=True, env=sc.env, cwd=REPO, timeout=600)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        out[label] = {"exit": r.returncode, "result": last, "stderr": r.stderr.strip()[-500:]}
    out["pass"] = all(v["exit"] == 0 for v in out.values())
    return out


# -- the run --------------------------------------------------------------------------------------

def seed(port: int, api_key: str, rng: random.Random, n: int) -> list[str]:
    ids = []
    for i in range(n):
        st, h, body = http("POST", f"http://127.0.0.1:{port}{BASE}/Observation",
                           {"X-API-Key": api_key, "Content-Type": "application/fhir+json",
                            "X-Correlation-ID": f"soak-seed-{i:04d}"}, observation(rng))
        if st != 201:
            raise SoakError(f"seeding: POST Observation answered {st}: {body[:1000].decode(errors='replace')}")
        loc = h.get("location", "")
        parts = loc.split("/Observation/", 1)
        if len(parts) != 2:
            raise SoakError(f"seeding: no Observation Location in the answer: {loc!r}")
        ids.append(parts[1].split("/")[0])
    st, _, body = http("GET", f"http://127.0.0.1:{port}{BASE}/Observation/{ids[0]}", {"X-API-Key": api_key})
    if st != 200:
        raise SoakError(f"seeding: read back answered {st}: {body[:1000].decode(errors='replace')}")
    st, _, body = http("PUT", f"http://127.0.0.1:{port}{BASE}/Observation/{ids[-1]}",
                       {"X-API-Key": api_key, "Content-Type": "application/fhir+json",
                        "X-Correlation-ID": "soak-seed-update"}, observation(rng, ids[-1]))
    if st not in (200, 201):
        raise SoakError(f"seeding: update answered {st}: {body[:1000].decode(errors='replace')}")
    return ids


def summarize(samples: list[dict], duration: float, warmup: float, last_window: float,
              idle_before: dict, idle_after: dict) -> dict:
    """RSS: the first sample after the warm-up vs the max of the last window (< RSS_LIMIT growth).

    fds: under load the count moves with the number of upstream keep-alive connections the sidecar
    holds (its pool follows the concurrency of the moment), so single samples are noisy; the check
    compares the median of the window right after the warm-up with the median of the last window,
    and the idle count 6 s after the load (upstream pool expired) with the idle count before it.
    Both may grow by at most FD_SLACK. The single samples (first after warm-up, last) are reported too.
    """
    after = [s for s in samples if s["t_s"] >= warmup]
    warm = after[0] if after else samples[-1]
    tail = [s for s in samples if s["t_s"] >= duration - last_window - 0.5] or samples[-1:]
    head = [s for s in after if s["t_s"] < warm["t_s"] + last_window - 0.5] or [warm]
    rss_warm, rss_max_tail = warm["rss_kb"], max(s["rss_kb"] for s in tail)
    growth = (rss_max_tail - rss_warm) / rss_warm
    fds_head, fds_tail = statistics.median(s["fds"] for s in head), statistics.median(s["fds"] for s in tail)
    idle_growth = idle_after["fds"] - idle_before["fds"]
    return {
        "warmup_s": warmup, "last_window_s": last_window, "warm_sample_t_s": warm["t_s"],
        "rss_kb_start": samples[0]["rss_kb"], "rss_kb_warm": rss_warm, "rss_kb_tail_max": rss_max_tail,
        "rss_kb_end": samples[-1]["rss_kb"], "rss_kb_max": max(s["rss_kb"] for s in samples),
        "rss_growth_pct": round(100 * growth, 2), "rss_pass": growth < RSS_LIMIT,
        "fds_warm": warm["fds"], "fds_end": samples[-1]["fds"], "fds_max": max(s["fds"] for s in samples),
        "fds_min_after_warmup": min(s["fds"] for s in after) if after else None,
        "fds_warm_median": fds_head, "fds_tail_median": fds_tail,
        "fds_idle_before": idle_before["fds"], "fds_idle_after": idle_after["fds"],
        "fds_pass": fds_tail - fds_head <= FD_SLACK and idle_growth <= FD_SLACK,
    }


def print_table(samples: list[dict]) -> None:
    print(f"{'t s':>7} {'RSS MB':>8} {'fds':>5} {'thr':>4} {'req/s':>8} {'errors':>6} {'p50 ms':>7} {'p99 ms':>8} "
          f"{'late':>5} {'shed':>5} {'cpu% sc/ehr/gen':>16} {'EHR MB':>7}  load avg")
    print("-" * 112)
    for s in samples:
        cpu = "/".join(f"{s[f'cpu_{k}_pct'] or 0:.0f}" for k in ("sidecar", "sandbox", "generator"))
        print(f"{s['t_s']:7.1f} {s['rss_kb'] / 1024:8.1f} {s['fds']:5d} {s['threads']:4d} {s['rps']:8.1f} "
              f"{s['errors']:6d} {s['p50_ms'] or 0:7.2f} {s['p99_ms'] or 0:8.2f} {s['late']:5d} {s['shed']:5d} "
              f"{cpu:>16} {(s['sandbox_rss_kb'] or 0) / 1024:7.1f}  {s['loadavg']}")


def run(args: argparse.Namespace, tmp: Path, procs: Processes) -> tuple[dict, bool]:
    duration = args.minutes * 60
    sample_s = args.sample_seconds or min(10.0, max(1.0, duration / 12))
    warmup = args.warmup_seconds if args.warmup_seconds is not None else min(60.0, duration / 4)
    last_window = min(60.0, duration / 4)
    api_key = secrets.token_urlsafe(24)
    results: dict = {"started": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
                     "machine": {"nproc": os.cpu_count(), "loadavg_start": loadavg(), "kernel": os.uname().release,
                                 "python": sys.version.split()[0]},
                     "config": {"minutes": args.minutes, "read_share": args.read_share,
                                "update_share": args.update_share, "load": args.load,
                                "capacity_seconds": args.capacity_seconds, "capacity_connections": args.connections,
                                "max_connections": args.max_connections, "sample_s": sample_s,
                                "log_level": args.log_level, "audit_max_mb": args.audit_max_mb}}
    (tmp / "audit").mkdir(mode=0o700)
    base, sandbox, witness = start_sandbox(procs, tmp, tmp / "audit" / "audit.jsonl")
    sc = start_sidecar(procs, tmp, base, api_key, args)
    rng = random.Random(args.seed)
    ids = seed(sc.port, api_key, rng, SEED_READ + SEED_UPDATE)
    log(f"seeded {len(ids)} Observations through the sidecar; mix: {args.read_share:.0%} reads, "
        f"{args.update_share:.0%} updates, {1 - args.read_share - args.update_share:.0%} creates")
    load = Load(sc.port, api_key, args, ids[:SEED_READ], ids[SEED_READ:])
    idle_before = {"rss_kb": rss_kb(sc.proc.pid), "fds": fd_count(sc.proc.pid), "fd_kinds": fd_kinds(sc.proc.pid)}

    if args.rate:
        cap = {"rps": None, "note": "--rate given: capacity not measured"}
        rate = args.rate
    else:
        log(f"capacity: closed loop, {args.connections} connections, 3 s warm-up + {args.capacity_seconds:g} s")
        cap = run_async(capacity_phase, load, args.connections, 3.0, args.capacity_seconds)
        log(f"capacity: {cap['rps']} req/s (2xx), {cap['errors']} errors, p50 {cap['p50_ms']} ms, "
            f"p99 {cap['p99_ms']} ms, load {cap['loadavg']}")
        if not cap["rps"]:
            raise SoakError(f"capacity measured as 0 req/s; errors: {load.error_samples}")
        rate = args.load * cap["rps"]
    results["capacity"] = cap
    time.sleep(2)
    log(f"soak: {rate:.1f} req/s open loop for {duration:g} s, samples every {sample_s:g} s, "
        f"warm-up {warmup:g} s, up to {args.max_connections} connections")
    cap_errors = dict(load.errors_by_status)
    load.errors_by_status, load.error_samples = {}, []
    t_soak = time.monotonic()
    samples = run_async(soak_phase, load, sc, sandbox.pid, rate, duration, sample_s, args.max_connections)
    soak_wall = time.monotonic() - t_soak
    time.sleep(6)  # past the upstream pool's 4 s keep-alive expiry: idle upstream connections are closed
    idle_after = {"rss_kb": rss_kb(sc.proc.pid), "fds": fd_count(sc.proc.pid), "fd_kinds": fd_kinds(sc.proc.pid)}

    lat, slat = sorted(load.all_lat), sorted(load.sched_lat)
    total = sum(s["n_read"] + s["n_create"] + s["n_update"] for s in samples)
    errors = sum(s["errors"] for s in samples)
    summ = summarize(samples, duration, warmup, last_window, idle_before, idle_after)
    achieved = total / soak_wall if soak_wall else 0.0
    results["soak"] = {
        "target_rps": round(rate, 1), "achieved_rps": round(achieved, 1),
        "achieved_fraction_of_target": round(achieved / rate, 3) if rate else None,
        "duration_s": duration, "requests": total, "scheduled": load.scheduled,
        "by_kind": {k: sum(s[f"n_{k}"] for s in samples) for k in ("read", "create", "update")},
        "errors": errors, "errors_by_status": load.errors_by_status, "error_samples": load.error_samples,
        "capacity_phase_errors_by_status": cap_errors,
        "late_starts": sum(s["late"] for s in samples), "shed": sum(s["shed"] for s in samples),
        "cpu_pct_mean": {k: round(sum(s[f"cpu_{k}_pct"] or 0 for s in samples) / len(samples), 1)
                         for k in ("sidecar", "sandbox", "generator")},
        "p50_ms": round(1000 * pct(lat, 50), 2) if lat else None,
        "p99_ms": round(1000 * pct(lat, 99), 2) if lat else None,
        "max_ms": round(1000 * lat[-1], 2) if lat else None,
        "from_schedule_p99_ms": round(1000 * pct(slat, 99), 2) if slat else None,
        "idle_before": idle_before, "idle_after": idle_after, **summ,
    }
    results["samples"] = samples

    log("stopping the sidecar (SIGTERM: drains, closes the audit chain with a checkpoint)")
    rc = procs.stop(sc.proc, timeout=60)
    results["sidecar_exit"] = rc
    procs.stop(sandbox, timeout=30)
    results["audit_verify"] = audit_verify(sc, tmp)
    results["witness"] = witness_check(witness, sc.audit_dir, load.writes_2xx)
    results["loadavg_end"] = loadavg()

    s, w, av = results["soak"], results["witness"], results["audit_verify"]
    print()
    print(f"soak: sidecar {args.load:.0%} of capacity, {args.read_share:.0%} reads / "
          f"{1 - args.read_share - args.update_share:.0%} creates / {args.update_share:.0%} updates, "
          f"{args.minutes:g} min; load average at start {results['machine']['loadavg_start']}, "
          f"at end {results['loadavg_end']} ({os.cpu_count()} CPUs)")
    print(f"capacity (whole chain: generator -> sidecar -> sandbox EHR, closed loop, c={args.connections}): "
          + (f"{cap['rps']} req/s, p50 {cap['p50_ms']} ms, p99 {cap['p99_ms']} ms" if cap.get("rps") else cap["note"]))
    print(f"rate: target {s['target_rps']} req/s, achieved {s['achieved_rps']} req/s "
          f"({100 * (s['achieved_fraction_of_target'] or 0):.1f}%), {s['requests']} requests "
          f"({s['by_kind']['read']} reads, {s['by_kind']['create']} creates, {s['by_kind']['update']} updates), "
          f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms; {s['late_starts']} started > 50 ms "
          f"late, {s['shed']} shed (> {SHED_AFTER_S:g} s late, not sent)")
    c = s["cpu_pct_mean"]
    print(f"mean CPU (% of one core): sidecar {c['sidecar']}, sandbox EHR {c['sandbox']}, "
          f"load generator {c['generator']}")
    print()
    print_table(samples)
    print()
    print(f"idle before the load: RSS {idle_before['rss_kb'] / 1024:.1f} MB, {idle_before['fds']} fds "
          f"{idle_before['fd_kinds']}; idle 6 s after: RSS {idle_after['rss_kb'] / 1024:.1f} MB, {idle_after['fds']} "
          f"fds {idle_after['fd_kinds']}; sidecar exit {rc}")
    print(f"witness: {w['witness_entries']} requests at the sandbox ({w['upstream_writes']} writes, "
          f"{w['upstream_reads']} reads), log complete: {w['witness_complete']}; audit: {w['audit_records']} records "
          f"in {w['audit_files']} file(s) {w['audit_kinds']}; intents {w['intents']}, outcomes "
          f"{w['outcomes_of_intents']}; client got 2xx for {w['client_2xx_writes']} writes, "
          f"{w['client_2xx_writes_not_at_upstream']} of them not at the sandbox")
    lines = [
        (s["rss_pass"], f"RSS growth after warm-up {s['rss_growth_pct']:+.2f}% (at {s['warm_sample_t_s']:g} s "
                        f"{s['rss_kb_warm'] / 1024:.1f} MB, max of the last {s['last_window_s']:g} s "
                        f"{s['rss_kb_tail_max'] / 1024:.1f} MB) vs limit < {100 * RSS_LIMIT:g}%"),
        (s["fds_pass"], f"open fds under load: median {s['fds_warm_median']:g} in the {s['last_window_s']:g} s after "
                        f"warm-up, {s['fds_tail_median']:g} in the last {s['last_window_s']:g} s (single samples: "
                        f"{s['fds_warm']} after warm-up, {s['fds_end']} at the end, range "
                        f"{s['fds_min_after_warmup']}-{s['fds_max']}); idle {s['fds_idle_before']} before the load, "
                        f"{s['fds_idle_after']} after; allowed +{FD_SLACK}"),
        (av["pass"], f"fhir-sidecar audit verify: exit {av['chain']['exit']} (chain), "
                     f"{av['with_checkpoints']['exit']} (with --checkpoints): {av['chain']['result']}"),
        (w["pass"], f"witness: {w['upstream_writes']} writes reached the sandbox, {w['intent_missing']} without an "
                    f"intent, {w['intent_after_arrival']} with an intent timestamped after arrival, "
                    f"{w['intent_not_in_file_at_arrival']} whose intent was not yet in the audit file on arrival, "
                    f"{w['upstream_writes_without_correlation_id']} without a correlation id"
                    + ("" if w["witness_complete"] else " (the witness log has gaps!)")),
        (errors == 0, f"errors during the soak: {errors} non-2xx/failed of {s['requests']} {s['errors_by_status']}"),
    ]
    for ok, text in lines:
        print(f"{'PASS' if ok else 'MISS'}: {text}")
    all_pass = all(ok for ok, _ in lines)
    results["pass"] = all_pass
    results["criteria"] = {"rss": s["rss_pass"], "fds": s["fds_pass"], "audit_verify": av["pass"],
                           "witness": w["pass"], "no_errors": errors == 0}
    return results, all_pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sandbox-child"]:
        return sandbox_child(int(argv[1]), Path(argv[2]), Path(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    ap.add_argument("--read-share", type=float, default=0.8, help="share of reads (GET Observation/id)")
    ap.add_argument("--update-share", type=float, default=0.05,
                    help="share of updates (PUT Observation/id); the rest are creates (POST Observation)")
    ap.add_argument("--load", type=float, default=0.7, help="soak rate as a fraction of the measured capacity")
    ap.add_argument("--rate", type=float, help="soak at this rate (req/s) instead; skips the capacity phase")
    ap.add_argument("--capacity-seconds", type=float, default=20.0, help="capacity measurement (after 3 s warm-up)")
    ap.add_argument("--connections", type=int, default=8, help="connections of the closed-loop capacity phase")
    ap.add_argument("--max-connections", type=int, default=32, help="keep-alive connections of the open-loop soak")
    ap.add_argument("--sample-seconds", type=float, help="sampling interval (default 10 s; less for short runs)")
    ap.add_argument("--warmup-seconds", type=float, help="RSS/fd baseline: first sample after this "
                    "(default 60 s, at most a quarter of the soak)")
    ap.add_argument("--audit-max-mb", type=float, default=32.0, help="rotate the audit file past this size "
                    "(rotation is part of what is soaked); 0 = never")
    ap.add_argument("--log-level", default="info", help="the sidecar's log level (info = as deployed)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the request mix")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--tmpdir", help="where to create the temp dir (its filesystem holds the audit log)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, config, audit, witness)")
    args = ap.parse_args(argv)
    if not (0 <= args.read_share <= 1 and 0 <= args.update_share <= 1 - args.read_share):
        ap.error("--read-share and --update-share must be in [0, 1] and add up to at most 1")
    if args.minutes <= 0 or args.capacity_seconds <= 0 or not 0 < args.load <= 1:
        ap.error("--minutes and --capacity-seconds must be > 0, --load in (0, 1]")

    tmp = Path(tempfile.mkdtemp(prefix="fhir-sidecar-soak-", dir=args.tmpdir))
    procs = Processes(log)

    install_signal_handlers()
    code = 2
    results = None
    try:
        results, ok = run(args, tmp, procs)
        code = 0 if ok else 1
    except SoakError as e:
        log(f"error: {e}")
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        code = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the clean-up even on a second Ctrl-C
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all(timeout=15)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if results is not None:
        results["tmp"] = str(tmp) if args.keep_tmp else None
        line = json.dumps(results, separators=(",", ":"))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
            log(f"results: {args.json}")
        print(f"SOAK_JSON {line}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
