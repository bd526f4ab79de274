#!/usr/bin/env python3
"""`fhir-sidecar run --workers 2` against one worker (issue "Speed", item 3).

    .venv/bin/python bench/workers.py [--rounds 3] [--duration 8] [--connections 8] [--json FILE]

Same nginx upstream, same wrk load, same sidecar config as bench/run.py (full enforcement: api-key
identity, scopes, validation, the shipped Rego policy, audit intent/outcome with fsync), rows
interleaved per round: stock mitmdump passthrough, the sidecar with 1 worker, with 2 workers;
reads (GET) and creates (POST). Two placements:
  - shared:  every process may run on every core (what a deployment does);
  - pinned:  wrk and nginx on CPU 0, the proxy (all its workers) on CPU 1. On this 2-core machine
             two workers then share one core: it shows the cost of the split, not a gain.
CPU per request is the whole process tree (supervisor + workers), read from /proc.
Last stdout line: `WORKERS_JSON {...}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as base  # bench/run.py: nginx, wrk, process handling  # noqa: E402


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += base.cpu_seconds(p)
        except OSError:
            pass
    return total


def start_sidecar(procs: base.Processes, tmp: Path, name: str, nginx: int, api_key: str, policy_dir: Path,
                  audit_key: str, workers: int, cpus: set[int] | None) -> base.Target:
    state = tmp / name
    state.mkdir()
    port, admin = base.free_port(), base.free_port()
    cfg = state / "sidecar.yaml"
    cfg.write_text(base.SIDECAR_CONF.format(
        nginx=nginx, port=port, admin=admin, state=state, audit_dir=state,
        policy=f'{{engine: embedded, dir: "{policy_dir}", path: fhir/writeback}}',
        key_sha=hashlib.sha256(api_key.encode()).hexdigest(), extra="", max_body=5 * 1024 * 1024))
    env = dict(os.environ, FHIR_SIDECAR_AUDIT_KEY=audit_key)
    mine = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by the supervisor and every worker it starts
    try:
        p = procs.start(name, [base.venv_bin("fhir-sidecar"), "run", "--config", str(cfg), "--workers", str(workers),
                               "--log-level", "info"], tmp, env=env)
    finally:
        os.sched_setaffinity(0, mine)
    base.wait_until(lambda: base.http("GET", f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200,
                    f"{name} /readyz", p, timeout=90)
    return base.Target(name, name, "GET", port, p.pid, None, admin)


def measure(t: base.Target, method: str, api_key: str, conns: int, duration: float) -> dict:
    t.method = method
    c0 = tree_cpu(t.pid)
    r = base.run_wrk(t, api_key, conns, 2, duration)
    c1 = tree_cpu(t.pid)
    r["cpu_s"] = round(c1 - c0, 3)
    r["cpu_s_per_req"] = (c1 - c0) / r["requests"] if r["requests"] else None
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--placements", default="shared,pinned")
    ap.add_argument("--json")
    args = ap.parse_args()
    base.ensure_tools(install=True)
    ncpu = len(os.sched_getaffinity(0))
    placements = [p for p in args.placements.split(",") if p]
    if "pinned" in placements and ncpu < 2:
        placements.remove("pinned")
    api_key = secrets.token_urlsafe(24)
    audit_key = secrets.token_urlsafe(48)
    tmp = Path(tempfile.mkdtemp(prefix="fhir-sidecar-workers-bench-"))
    tmp.chmod(0o711)  # nginx workers (an unprivileged user when started as root) must reach www/
    procs = base.Processes()
    results: dict = {"machine": base.machine_info(tmp), "connections": args.connections, "placements": {}}
    everything = os.sched_getaffinity(0)
    try:
        policy_dir = base.make_policy_dir(tmp)
        for placement in placements:
            cpus_load, cpus_proxy = ({0}, {1}) if placement == "pinned" else (None, None)
            ptmp = tmp / placement
            ptmp.mkdir()
            if cpus_load:
                os.sched_setaffinity(0, cpus_load)  # nginx (started now) and wrk (every run) inherit it
            nginx = base.start_nginx(procs, ptmp)
            os.sched_setaffinity(0, everything)
            mitm_port, mitm = base.start_mitmdump(procs, ptmp, nginx)
            if cpus_proxy:
                os.sched_setaffinity(mitm.pid, cpus_proxy)
            rows = {
                "stock mitmdump": base.Target("stock", "mitmdump", "GET", mitm_port, mitm.pid),
                "sidecar, 1 worker": start_sidecar(procs, ptmp, "w1", nginx, api_key, policy_dir, audit_key, 1,
                                                   cpus_proxy),
                "sidecar, --workers 2": start_sidecar(procs, ptmp, "w2", nginx, api_key, policy_dir, audit_key, 2,
                                                      cpus_proxy),
            }
            if cpus_load:
                os.sched_setaffinity(0, cpus_load)
            raw: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in rows} for m in ("GET", "POST")}
            for method in ("GET", "POST"):
                for label, t in rows.items():
                    t.method = method
                    base.sanity_check(t, api_key)
                    measure(t, method, api_key, args.connections, args.warmup)
                for rnd in range(args.rounds):
                    for label, t in rows.items():
                        r = measure(t, method, api_key, args.connections, args.duration)
                        raw[method][label].append(r)
                        base.log(f"{placement} {method} round {rnd + 1}: {label}: {r['rps']:.0f} req/s, "
                                 f"{1e6 * (r['cpu_s_per_req'] or 0):.0f} CPU us/req"
                                 + (f", {r['errors']['status']} non-2xx" if r["errors"]["status"] else ""))
            os.sched_setaffinity(0, everything)
            results["placements"][placement] = summarize(raw)
            print_table(placement, results["placements"][placement], args.connections)
    finally:
        os.sched_setaffinity(0, everything)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    results["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = json.dumps(results)
    if args.json:
        Path(args.json).write_text(line)
    print("WORKERS_JSON " + line)
    return 0


def summarize(raw: dict) -> dict:
    out: dict = {}
    for method, rows in raw.items():
        stock = statistics.median(r["rps"] for r in rows["stock mitmdump"])
        one = statistics.median(r["rps"] for r in rows["sidecar, 1 worker"])
        out[method] = {}
        for label, rs in rows.items():
            rps = statistics.median(r["rps"] for r in rs)
            cpu = [r["cpu_s_per_req"] for r in rs if r["cpu_s_per_req"]]
            out[method][label] = {
                "rps_median": round(rps, 1), "rps_all": [round(r["rps"], 1) for r in rs],
                "p50_ms": round(statistics.median(r["latency_us"]["p50"] for r in rs) / 1000, 2),
                "p99_ms": round(statistics.median(r["latency_us"]["p99"] for r in rs) / 1000, 2),
                "cpu_us_per_req": round(1e6 * statistics.median(cpu), 1) if cpu else None,
                "vs_stock": round(rps / stock, 2) if stock else None,
                "vs_one_worker": round(rps / one, 2) if one else None,
                "non_2xx": sum(r["errors"]["status"] for r in rs),
            }
    return out


def print_table(placement: str, summary: dict, conns: int) -> None:
    print(f"\n## placement: {placement}, c={conns}")
    print(f"| row | method | req/s | vs stock | vs 1 worker | p50 ms | p99 ms | CPU us/req (all processes) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rows in summary.items():
        for label, r in rows.items():
            print(f"| {label} | {method} | {r['rps_median']:.0f} | {r['vs_stock']:.2f} | {r['vs_one_worker']:.2f} | "
                  f"{r['p50_ms']} | {r['p99_ms']} | {r['cpu_us_per_req']} |")


if __name__ == "__main__":
    sys.exit(main())
