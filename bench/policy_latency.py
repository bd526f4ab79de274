#!/usr/bin/env python3
"""Embedded policy decision latency (issue #3): no network, one process, one core.

    .venv/bin/python bench/policy_latency.py [--rounds 2000] [--warmup 200] [--cpu N] [--json FILE]
                                             [--bundle-sizes 100,1000] [--bundle-rounds 20] [--policy-dir DIR]

Loads the shipped starter policy exactly as the sidecar does
(`EmbeddedPolicy.load(Path("policies"), "fhir/writeback")`; `policies/` is only read) and times
`EmbeddedPolicy.evaluate(input)` -- what `decide()` runs for every write: the Python -> rego-cpp
input conversion, the bundle query and reading the decision back -- for a set of representative
writes. Each input is built the way the pipeline builds it: a `RawRequest` goes through
`parse_request` and `classify`, the client is a `Principal`, and `build_input` makes the document
(`context.time` fixed at a Wednesday 13:00 UTC, inside the starter policy's working hours, so
every run decides the same). Every class must get its expected decision before it is timed.

Rounds are interleaved: every round evaluates every class once. Per call: wall time
(`time.perf_counter_ns`) and process CPU time (`time.process_time_ns`, read outside the wall
interval). The process is pinned to one CPU (`os.sched_setaffinity`) when it can be. The garbage
collector stays on, as in the sidecar. Also timed, separately: `build_input` alone and the input
conversion (`to_rego_input` + free) alone, so a slow decision can be attributed.

If tests/test_policy_cases.py is importable (pytest installed) its decision table (allows and
denies, every rule) is timed too, as one more line; so is the engine's floor (a one-rule policy
that reads `input.request.write`, on the plain create's input). Neither is part of "overall".

Large transactions (`--bundle-sizes`, default 100 and 1,000 Observations by demo-writer, built like
the 10-entry class) get a line each, also outside "overall", with the cost per entry and, beside
it, the engine floor on the same input (the one-rule policy: input conversion, handing the input
to rego-cpp, and the query's fixed cost), so the policy's own share per entry shows.

The last stdout line is `POLICY_JSON {...}` (bench/run.py reads it); `--json FILE` writes it too.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from sidecar.classify import classify
from sidecar.identity import Principal
from sidecar.parse import parse_request
from sidecar.policy.embedded import EmbeddedPolicy, rego_free_input, to_rego_input
from sidecar.policy.input import build_input
from sidecar.request import RawRequest
from sidecar.scopes import ScopeSet

TARGET_P99_MS = 0.3
FLOOR_REGO = """package fhir.writeback
import rego.v1
decision := {"allow": input.request.write == true, "reasons": [], "review": false}
"""
BASE_PATH = "/fhir/R4"
UPSTREAM = "http://127.0.0.1:9/fhir/R4"  # never contacted: parse/classify only use it to read full URLs
NOW = datetime(2026, 11, 25, 13, 0, 0, tzinfo=UTC)  # a Wednesday 13:00 UTC: inside the working hours of data.json
TENANT = "https://fhir-sidecar.dev/CodeSystem/tenant"

OBS = {"resourceType": "Observation", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
       "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-11-25T12:30:00Z",
       "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}


def tagged(resource: dict[str, Any], tenant: str) -> dict[str, Any]:
    r = copy.deepcopy(resource)
    r.setdefault("meta", {})["tag"] = [{"system": TENANT, "code": tenant}]
    return r


def principal(cid: str, tenant: str | None, scopes: list[str]) -> Principal:
    return Principal(client_id=cid, auth="api-key", scopes=ScopeSet.from_strings(scopes), tenant=tenant)


def parsed_input(method: str, target: str, body: Any, who: Principal, *, headers: dict[str, str] | None = None,
                 current: dict[str, Any] | None = None) -> dict[str, Any]:
    """RawRequest -> parse_request -> classify -> build_input, as the pipeline does for a write."""
    hdrs = [("content-type", "application/fhir+json"), ("x-api-key", "not-checked-here")]
    hdrs += [(k.lower(), v) for k, v in (headers or {}).items()]
    raw = RawRequest(method=method, target=f"{BASE_PATH}{target}".encode(), headers=tuple(hdrs),
                     body=json.dumps(body).encode() if body is not None else b"", host="127.0.0.1:8080")
    req = parse_request(raw, base_path=BASE_PATH, max_body_bytes=10 * 1024 * 1024, upstream_base=UPSTREAM)
    cls = classify(req, upstream_base=UPSTREAM)
    return build_input(req, cls, who, shadow=False, now=NOW, current=current)


def bundle_input(n: int) -> dict[str, Any]:
    """A transaction of n Observation creates by demo-writer (the 10-entry class, larger)."""
    writer = principal("demo-writer", "demo-clinic", ["system/Observation.cruds"])
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": OBS,
                         "request": {"method": "POST", "url": "Observation"}} for i in range(n)]}
    return parsed_input("POST", "", bundle, writer)


def classes() -> list[tuple[str, Callable[[], dict[str, Any]], bool]]:
    """(name, input builder, expected allow). The builders are timed too (build_input cost)."""
    writer = principal("demo-writer", "demo-clinic", ["system/Observation.cruds"])
    scribe = principal("scribe-app", "t1", ["user/Observation.cru", "user/DocumentReference.cru"])
    lab = principal("legacy-lab-feed", "lab", ["system/Observation.cu", "system/Provenance.c"])
    obs9 = {**OBS, "id": "9"}
    docref = tagged({"resourceType": "DocumentReference", "status": "current", "docStatus": "preliminary",
                     "subject": {"reference": "Patient/p1"}, "date": "2026-11-25T12:00:00Z",
                     "description": "Visit note (draft)",
                     "content": [{"attachment": {"contentType": "text/plain", "data": "RHJhZnQgbm90ZQ=="}}]}, "t1")
    provenance = json.dumps({"resourceType": "Provenance", "target": [{"reference": "Observation/9/_history/2"}],
                             "agent": [{"who": {"reference": "Device/legacy-lab-feed"}}],
                             "recorded": "2026-11-25T13:00:00Z"})
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": OBS,
                         "request": {"method": "POST", "url": "Observation"}} for i in range(10)]}
    return [
        ("create (demo-writer)",
         lambda: parsed_input("POST", "/Observation", OBS, writer), True),
        ("update with current (demo-writer)",
         lambda: parsed_input("PUT", "/Observation/9", obs9, writer, current={**obs9, "status": "preliminary"}), True),
        ("tenant-bound create (scribe-app, DocumentReference)",
         lambda: parsed_input("POST", "/DocumentReference", docref, scribe), True),
        ("provenance, automated (legacy-lab-feed update)",
         lambda: parsed_input("PUT", "/Observation/9", tagged({**obs9, "status": "amended"}, "lab"), lab,
                              headers={"X-Provenance": provenance}, current=tagged(obs9, "lab")), True),
        ("transaction bundle, 10 entries (demo-writer)",
         lambda: parsed_input("POST", "", bundle, writer), True),
    ]


def pct(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in ms."""
    if not sorted_ns:
        return float("nan")
    k = max(0, min(len(sorted_ns) - 1, math.ceil(p / 100 * len(sorted_ns)) - 1))  # nearest rank
    return sorted_ns[k] / 1e6


def stats(wall: list[int], cpu: list[int]) -> dict[str, Any]:
    w = sorted(wall)
    return {"n": len(w), "p50_ms": pct(w, 50), "p90_ms": pct(w, 90), "p99_ms": pct(w, 99), "max_ms": w[-1] / 1e6,
            "mean_ms": statistics.fmean(w) / 1e6, "cpu_mean_us": statistics.fmean(cpu) / 1e3 if cpu else None,
            "cpu_p50_us": statistics.median(cpu) / 1e3 if cpu else None}


def time_calls(fns: list[Callable[[], Any]], rounds: int) -> tuple[list[list[int]], list[list[int]]]:
    """Round-robin: every round calls every fn once. Per call: wall ns and process CPU ns."""
    wall: list[list[int]] = [[] for _ in fns]
    cpu: list[list[int]] = [[] for _ in fns]
    pc, pt = time.perf_counter_ns, time.process_time_ns
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            c0 = pt()
            t0 = pc()
            fn()
            t1 = pc()
            c1 = pt()
            wall[i].append(t1 - t0)
            cpu[i].append(c1 - c0)
    return wall, cpu


def pin(cpu_arg: int | None) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no os.sched_setaffinity)"
    allowed = sorted(os.sched_getaffinity(0))
    cpu = cpu_arg if cpu_arg is not None else allowed[-1]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        return f"not pinned ({e})"
    return f"pinned to CPU {cpu} of {allowed}"


def decision_table() -> list[tuple[str, dict[str, Any], dict[str, Any]]] | None:
    try:
        from tests.test_policy_cases import CASES  # needs pytest
    except Exception:  # noqa: BLE001 -- optional: pytest may be missing
        return None
    return list(CASES)


def run(rounds: int, warmup: int, cpu_arg: int | None, table_rounds: int,
        bundle_sizes: list[int] | None = None, bundle_rounds: int = 20, policy_dir: Path | None = None) -> dict[str, Any]:
    pinned = pin(cpu_arg)
    t_load = time.perf_counter()
    policy = EmbeddedPolicy.load(policy_dir or REPO / "policies", "fhir/writeback")
    load_s = time.perf_counter() - t_load
    specs = classes()
    docs = []
    for name, build, want in specs:
        doc = build()
        decision = policy.evaluate(doc)
        if decision.get("allow") is not want:
            raise SystemExit(f"policy_latency: {name}: expected allow={want}, got {decision}")
        docs.append((name, doc, decision))

    def evaluator(d: dict[str, Any]) -> Callable[[], Any]:
        return lambda: policy.evaluate(d)

    def converter(d: dict[str, Any]) -> Callable[[], Any]:
        return lambda: rego_free_input(to_rego_input(d))

    evals = [evaluator(d) for _, d, _ in docs]
    time_calls(evals, warmup)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    wall, cpu = time_calls(evals, rounds)
    cpu_total, wall_total = time.process_time() - cpu0, time.perf_counter() - wall0
    conv_wall, _ = time_calls([converter(d) for _, d, _ in docs], max(1, rounds // 4))
    build_wall, _ = time_calls([b for _, b, _ in specs], max(1, rounds // 4))

    out_classes = []
    for i, (name, doc, decision) in enumerate(docs):
        s = stats(wall[i], cpu[i])
        s.update(name=name, decision=decision, input_bytes=len(json.dumps(doc)),
                 to_rego_input_p50_ms=pct(sorted(conv_wall[i]), 50), build_input_p50_ms=pct(sorted(build_wall[i]), 50))
        out_classes.append(s)
    overall = stats([x for w in wall for x in w], [x for c in cpu for x in c])
    result: dict[str, Any] = {
        "what": "EmbeddedPolicy.evaluate (input conversion + query + decision read), starter policy in policies/",
        "policy_revision": policy.revision, "policy_load_s": round(load_s, 3), "rounds": rounds, "warmup": warmup,
        "pinning": pinned, "gc": gc.isenabled(), "python": platform.python_version(),
        "cpu_over_wall": cpu_total / wall_total if wall_total else None,
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "classes": out_classes, "overall": overall, "target_p99_ms": TARGET_P99_MS,
        "pass": overall["p99_ms"] <= TARGET_P99_MS,
    }
    # The engine's fixed cost: a one-rule policy that reads the input, on the plain create's input.
    floor = EmbeddedPolicy({"floor.rego": FLOOR_REGO}, {}, "fhir/writeback", "floor")
    fw, fc = time_calls([lambda: floor.evaluate(docs[0][1])], rounds)
    result["engine_floor"] = dict(stats(fw[0], fc[0]), name="engine floor: 1-rule policy, the create's input")
    bundles = []
    for n in bundle_sizes or []:
        doc = bundle_input(n)
        if policy.evaluate(doc).get("allow") is not True:
            raise SystemExit(f"policy_latency: a {n}-entry bundle by demo-writer is not allowed")
        k = max(3, bundle_rounds if n >= 1000 else bundle_rounds * 5)
        evaluator(doc)()  # warm-up
        bw, bc = time_calls([evaluator(doc), lambda d=doc: floor.evaluate(d)], k)
        cw, _ = time_calls([converter(doc)], max(3, k // 2))
        line = dict(stats(bw[0], bc[0]), name=f"transaction bundle, {n} entries (demo-writer)", entries=n,
                    input_bytes=len(json.dumps(doc)), to_rego_input_p50_ms=pct(sorted(cw[0]), 50),
                    engine_floor_p50_ms=pct(sorted(bw[1]), 50), engine_floor_cpu_mean_us=statistics.fmean(bc[1]) / 1e3)
        line["per_entry_ms"] = line["p50_ms"] / n
        line["policy_per_entry_ms"] = (line["p50_ms"] - line["engine_floor_p50_ms"]) / n
        bundles.append(line)
    result["bundles"] = bundles
    table = decision_table() if table_rounds > 0 else None
    if table:
        tw, tc = time_calls([evaluator(d) for _, d, _ in table], table_rounds)
        result["decision_table"] = dict(stats([x for w in tw for x in w], [x for c in tc for x in c]),
                                        name=f"decision table (tests/test_policy_cases.py, {len(table)} inputs)",
                                        slowest=sorted(((pct(sorted(w), 99), n) for w, (n, _, _) in zip(tw, table)),
                                                       reverse=True)[:3])
    return result


def print_report(r: dict[str, Any], file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)
    p(f"policy decision latency (embedded, starter policy rev {r['policy_revision']}; {r['rounds']} rounds "
      f"+ {r['warmup']} warm-up, interleaved; {r['pinning']}; gc on; process CPU/wall {r['cpu_over_wall']:.2f}; "
      f"load average {r['loadavg']})")
    head = (f"{'input class':<62}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}{'CPU µs':>8}"
            f"{'conv ms':>9}{'build ms':>9}")
    p(head)
    p("-" * len(head))
    rows = list(r["classes"]) + [dict(r["overall"], name="overall (the classes above, pooled)")]
    rows += [r[k] for k in ("decision_table", "engine_floor") if r.get(k)]
    for c in rows:
        conv = f"{c['to_rego_input_p50_ms']:.3f}" if "to_rego_input_p50_ms" in c else "-"
        build = f"{c['build_input_p50_ms']:.3f}" if "build_input_p50_ms" in c else "-"
        p(f"{c['name'][:61]:<62}{c['p50_ms']:>8.3f}{c['p90_ms']:>8.3f}{c['p99_ms']:>8.3f}{c['max_ms']:>8.2f}"
          f"{c['cpu_mean_us']:>8.0f}{conv:>9}{build:>9}")
    p("(p50..max: wall time of one EmbeddedPolicy.evaluate; CPU µs: its mean process CPU time; conv: the "
      "to_rego_input part alone, p50; build: parse+classify+build_input, p50, not part of the decision)")
    if r.get("bundles"):
        p("large transactions (not in overall; floor: the 1-rule policy on the same input):")
        for b in r["bundles"]:
            p(f"  {b['name'][:59]:<60}{b['p50_ms']:>8.2f}{b['p90_ms']:>8.2f}{b['p99_ms']:>8.2f}{b['max_ms']:>8.1f}"
              f"{b['cpu_mean_us'] / 1e3:>7.1f}ms conv {b['to_rego_input_p50_ms']:.1f} ms, floor {b['engine_floor_p50_ms']:.1f} ms; "
              f"{b['per_entry_ms']:.3f} ms/entry, of which policy {b['policy_per_entry_ms']:.3f} ms/entry")
    o = r["overall"]
    over = [c["name"] for c in r["classes"] if c["p99_ms"] > r["target_p99_ms"]]
    p(f"{'PASS' if r['pass'] else 'MISS'}: policy decision p99 {o['p99_ms']:.3f} ms (p50 {o['p50_ms']:.3f} ms) "
      f"vs target <= {r['target_p99_ms']} ms (issue #3)"
      + (f"; {len(over)} of {len(r['classes'])} classes have p99 over it" if over else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000, help="interleaved rounds (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured rounds first (default 200)")
    ap.add_argument("--table-rounds", type=int, default=100,
                    help="rounds over the tests' decision table (0: skip; default 100)")
    ap.add_argument("--bundle-sizes", default="100,1000",
                    help="entry counts of the large-transaction lines (comma-separated; empty: none; default 100,1000)")
    ap.add_argument("--bundle-rounds", type=int, default=20,
                    help="rounds for a 1,000+-entry transaction (5x that below 1,000; default 20)")
    ap.add_argument("--cpu", type=int, help="the CPU to pin to (default: the last one allowed)")
    ap.add_argument("--policy-dir", type=Path, help="another policy directory to time (default: policies/)")
    ap.add_argument("--json", help="also write the result to this file")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.bundle_sizes.split(",") if x.strip()]
    r = run(a.rounds, a.warmup, a.cpu, a.table_rounds, sizes, a.bundle_rounds, a.policy_dir)
    print_report(r)
    line = json.dumps(r)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    print("POLICY_JSON " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
