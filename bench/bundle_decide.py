#!/usr/bin/env python3
"""Large transaction bundles: how the pipeline's decision scales with the entry count (issue "Speed", item 4).

    .venv/bin/python bench/bundle_decide.py [--sizes 10,100,1000,2000] [--runs 5] [--cpu N] [--json FILE]

Acceptance: a 1,000-entry transaction of Observations is decided (validated + scoped + policy) in
<= 600 ms; 2,000 entries in <= 2.2x that (cost linear in the entries).

No network. The real runtime is built from a config exactly as `fhir-sidecar run` builds it
(`sidecar.runtime.build_runtime`: api-key and bearer identities with a JWKS file, the embedded Rego
engine on a *copy* of the shipped `policies/` whose `data.json` gains the two bench clients, an audit
sink and a SQLite state store in a temp dir), and every bundle goes through `Pipeline.decide` -- the
path a request takes: parse_request (strict JSON) -> classify (each entry) -> identify -> kill switch /
rate limit / idempotency -> scopes -> fhir.resources validation -> prior state -> qualified scopes and
patient compartment -> build_input + embedded policy -> durable `intent` audit record (fsync).
Creates need no prior state; the prior-state reader is replaced by one that fails the run if it is
ever called (the upstream URL is a closed port on 127.0.0.1 and is never contacted).

Two clients, each a line:
  system  api-key client, scopes `system/Observation.c` (no compartment walk)
  patient bearer client (ES256 JWT from a key generated per run, `patient: example` claim), scopes
          `patient/Observation.c`: every entry gets the compartment walk over its references, with
          `urn:uuid` fullUrls resolved across the transaction.

The bundles: N vital-signs Observations (heart rate, respiratory rate, temperature, SpO2, weight,
height, BMI, blood pressure with components; every 8th entry a vital-signs panel whose `hasMember`
references the previous seven entries by their `urn:uuid` fullUrl), each with a narrative, an
identifier, `subject: Patient/example`, a performer and an encounter. Synthetic data only.

Each (client, size) is decided once as a warm-up (must be allowed), then `--runs` times. Every run
records wall time (`perf_counter_ns`) and process CPU time (`process_time_ns`, all threads: includes
the audit writer's fsync thread) of the whole `decide()`, and the same two for each stage (thin timing
wrappers around the pipeline's own stage functions; they add microseconds):
parse, classify, identify, scopes (`check_scopes`), validate (`check_valid`), context (qualified
scopes + patient compartment, `check_context`), policy_input (`build_input`), policy_eval (the engine,
`verdict`) and audit (`intent`). `other` is the rest (kill switch, rate limit, idempotency, ...). `(gc)` is the
time the garbage collector ran during the decision (already inside the stage columns).

Output: a table per client (median and max of the runs, ms/entry, stage medians), the 2000/1000
ratio and PASS/MISS lines. The last stdout line is `BUNDLE_JSON {...}`; `--json FILE` writes it too.
Also printed: the body size of each bundle against `fhir.max_body_bytes` (the bench runs with the
default limit when every bundle fits, and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sidecar import guards
from sidecar import pipeline as pipeline_mod
from sidecar.config import Fhir, parse_config
from sidecar.pipeline import Pipeline
from sidecar.request import RawRequest
from sidecar.runtime import build_runtime

TARGET_1000_MS = 600.0
TARGET_RATIO = 2.2
BASE_PATH = "/fhir/R4"
UPSTREAM = "http://127.0.0.1:9/fhir/R4"  # discard port: never contacted (creates read no prior state)
ISS = "https://auth.bench.invalid"
API_KEY = "bench-bundle-api-key-0001"
AUDIT_ENV = "FHIR_SIDECAR_BENCH_BUNDLE_AUDIT_KEY"
PATIENT = "example"
STAGES = ("parse", "classify", "identify", "scopes", "validate", "prior", "context",
          "policy_input", "policy_eval", "audit")

# (LOINC code, display, unit, UCUM code, low, high, decimals)
VITALS = [
    ("8867-4", "Heart rate", "beats/minute", "/min", 52, 110, 0),
    ("9279-1", "Respiratory rate", "breaths/minute", "/min", 10, 24, 0),
    ("8310-5", "Body temperature", "C", "Cel", 36.0, 38.5, 1),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", "%", 90, 100, 0),
    ("29463-7", "Body weight", "kg", "kg", 45.0, 120.0, 1),
    ("8302-2", "Body height", "cm", "cm", 150.0, 195.0, 1),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "kg/m2", 18.0, 35.0, 1),
]
VITAL_CATEGORY = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                               "code": "vital-signs", "display": "Vital Signs"}], "text": "Vital Signs"}]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": code}


def _narrative(text: str) -> dict[str, Any]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{text}</p></div>'}


def observation(i: int, rng: random.Random, members: list[str]) -> dict[str, Any]:
    """A realistic vital-signs Observation (synthetic values)."""
    minute = i % 60
    when = f"2026-11-25T{8 + (i // 60) % 12:02d}:{minute:02d}:00Z"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{_uuid(rng)}"}],
        "status": "final",
        "category": VITAL_CATEGORY,
        "subject": {"reference": f"Patient/{PATIENT}"},
        "encounter": {"reference": "Encounter/example"},
        "effectiveDateTime": when,
        "issued": when[:-1] + ".000Z",
        "performer": [{"reference": "Practitioner/example"}],
    }
    if members:
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "85353-1",
                                   "display": "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel"}],
                       "text": "Vital signs panel"}
        obs["hasMember"] = [{"reference": m} for m in members]
        obs["text"] = _narrative("Vital signs panel")
        return obs
    k = i % (len(VITALS) + 1)
    if k == len(VITALS):
        sys_, dia = rng.randint(100, 160), rng.randint(60, 100)
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "85354-9",
                                   "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure"}
        obs["component"] = [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
             "valueQuantity": _quantity(sys_, "mmHg", "mm[Hg]")},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
             "valueQuantity": _quantity(dia, "mmHg", "mm[Hg]")},
        ]
        obs["text"] = _narrative(f"Blood pressure {sys_}/{dia} mmHg")
        return obs
    code, display, unit, ucum, lo, hi, dec = VITALS[k]
    value = round(rng.uniform(lo, hi), dec) if dec else rng.randint(int(lo), int(hi))
    obs["code"] = {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display}
    obs["valueQuantity"] = _quantity(value, unit, ucum)
    obs["text"] = _narrative(f"{display}: {value} {unit}")
    return obs


def transaction(n: int, seed: int = 4) -> dict[str, Any]:
    """N POST entries with urn:uuid fullUrls; every 8th is a panel over the previous seven."""
    rng = random.Random(seed)
    entries: list[dict[str, Any]] = []
    for i in range(n):
        full = f"urn:uuid:{_uuid(rng)}"
        members = [e["fullUrl"] for e in entries[-7:]] if i % 8 == 7 else []
        entries.append({"fullUrl": full, "resource": observation(i, rng, members),
                        "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# ---- the runtime --------------------------------------------------------------------------------

class NoPriorState:
    """Creates never read the stored version: being called is a bench bug (and would be network)."""

    async def read(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("prior state read for a create")

    async def close(self) -> None:
        return None


def write_policy_copy(tmp: Path) -> Path:
    """A copy of policies/ whose data.json knows the two bench clients (policies/ is only read)."""
    dst = tmp / "policies"
    shutil.copytree(REPO / "policies", dst)
    data_path = dst / "data.json"
    data = json.loads(data_path.read_text())
    clients = data["fhir_sidecar"]["clients"]
    clients["bench-system"] = {"write_types": ["Observation"]}
    clients["bench-patient"] = {"write_types": ["Observation"]}
    data_path.write_text(json.dumps(data, indent=2))
    return dst


def config_dict(tmp: Path, policy_dir: Path, jwks_path: Path, max_body: int | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": {"url": UPSTREAM, "timeout_s": 10},
        "listen": {"host": "127.0.0.1", "port": 0, "mode": "reverse"},
        "admin": {"host": "127.0.0.1", "port": 0},
        "identity": {"jwks": f"file:{jwks_path}", "issuer": ISS, "audience": UPSTREAM},
        "clients": [
            {"id": "bench-system", "auth": "api-key", "api_key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
             "scopes": ["system/Observation.c"]},
            {"id": "bench-patient", "auth": "bearer", "scopes": ["patient/Observation.c"]},
        ],
        "policy": {"engine": "embedded", "dir": str(policy_dir), "path": "fhir/writeback"},
        "killswitch": {"file": str(tmp / "killswitch"), "scope": "all"},
        "audit": {"path": str(tmp / "audit.jsonl"), "key": f"env:{AUDIT_ENV}"},
        "state": {"store": f"sqlite:{tmp / 'state.db'}"},
    }
    if max_body is not None:
        cfg["fhir"] = {"max_body_bytes": max_body}
    return cfg


def bearer_token(key: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": UPSTREAM, "iat": now, "exp": now + 3600, "client_id": "bench-patient",
              "scope": "patient/Observation.c launch/patient openid", "patient": PATIENT}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench-1"})


def raw_request(body: bytes, credential: tuple[str, str]) -> RawRequest:
    return RawRequest(method="POST", target=BASE_PATH.encode(),
                      headers=(("host", "127.0.0.1:8080"), ("content-type", "application/fhir+json"), credential),
                      body=body, host="127.0.0.1:8080", client_addr="127.0.0.1")


# ---- stage timing --------------------------------------------------------------------------------

class StageClock:
    """Wall and CPU ns per stage for the decide() in progress (wrappers around the real stage functions),
    and the time the garbage collector took (a `gc.callbacks` hook: pauses inside any stage)."""

    def __init__(self) -> None:
        self.wall: dict[str, int] = {}
        self.cpu: dict[str, int] = {}
        self.gc_ns = 0
        self.gc_runs = [0, 0, 0]
        self.gc_stage: dict[str, int] = {}
        self.current = "other"
        self._gc_t0 = 0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter_ns()
        else:
            took = time.perf_counter_ns() - self._gc_t0
            self.gc_ns += took
            self.gc_stage[self.current] = self.gc_stage.get(self.current, 0) + took
            self.gc_runs[info["generation"]] += 1

    def reset(self) -> None:
        self.wall = dict.fromkeys(STAGES, 0)
        self.cpu = dict.fromkeys(STAGES, 0)
        self.gc_ns = 0
        self.gc_runs = [0, 0, 0]
        self.gc_stage = {}

    def _add(self, name: str, w0: int, c0: int) -> None:
        self.wall[name] += time.perf_counter_ns() - w0
        self.cpu[name] += time.process_time_ns() - c0

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            self.current = name
            c0, w0 = time.process_time_ns(), time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                self._add(name, w0, c0)
                self.current = "other"
        return timed

    def wrap_async(self, name: str, fn: Any) -> Any:
        async def timed(*a: Any, **k: Any) -> Any:
            self.current = name
            c0, w0 = time.process_time_ns(), time.perf_counter_ns()
            try:
                return await fn(*a, **k)
            finally:
                self._add(name, w0, c0)
                self.current = "other"
        return timed


@contextlib.contextmanager
def instrumented(pipe: Pipeline, clock: StageClock):
    """Patch timing wrappers in (this process only; no file is changed) and take them out again."""
    import sidecar.policy.input as policy_input
    import sidecar.policy.verdict as policy_verdict

    saved = [(guards, "check_scopes"), (guards, "check_valid"), (pipeline_mod, "check_context"),
             (policy_input, "build_input"), (policy_verdict, "verdict")]
    originals = [(m, n, getattr(m, n)) for m, n in saved]
    guards.check_scopes = clock.wrap("scopes", guards.check_scopes)
    guards.check_valid = clock.wrap("validate", guards.check_valid)
    pipeline_mod.check_context = clock.wrap("context", pipeline_mod.check_context)
    policy_input.build_input = clock.wrap("policy_input", policy_input.build_input)
    policy_verdict.verdict = clock.wrap_async("policy_eval", policy_verdict.verdict)
    pipe.parse = clock.wrap("parse", pipe.parse)  # type: ignore[method-assign]
    pipe.classify = clock.wrap("classify", pipe.classify)  # type: ignore[method-assign]
    pipe.identify = clock.wrap_async("identify", pipe.identify)  # type: ignore[method-assign]
    pipe.prior_state = clock.wrap_async("prior", pipe.prior_state)  # type: ignore[method-assign]
    pipe.audit = clock.wrap_async("audit", pipe.audit)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, n, f in originals:
            setattr(m, n, f)
        for n in ("parse", "classify", "identify", "prior_state", "audit"):
            pipe.__dict__.pop(n, None)


# ---- the run --------------------------------------------------------------------------------------

def pin_cpu(cpu: int | None) -> str:
    if cpu is None:
        return "not pinned"
    try:
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError) as e:
        return f"not pinned ({type(e).__name__})"


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


async def bench(sizes: list[int], runs: int, clients: list[str], max_body: int | None) -> dict[str, Any]:
    os.environ.setdefault(AUDIT_ENV, "bench-bundle-audit-key-" + uuid.uuid4().hex)
    bodies = {n: json.dumps(transaction(n), separators=(",", ":")).encode() for n in sizes}
    default_limit = Fhir().max_body_bytes
    biggest = max(len(b) for b in bodies.values())
    limit_note = (f"default fhir.max_body_bytes = {default_limit} bytes ({default_limit / 1048576:.1f} MiB); "
                  f"largest bundle {biggest} bytes ({biggest / max(sizes):.0f} bytes/entry): ")
    if max_body is None and biggest > default_limit:
        max_body = biggest  # the bench config raises the limit, and says so
        limit_note += f"does NOT fit; the bench config sets fhir.max_body_bytes = {max_body}"
    elif max_body is None:
        limit_note += "fits (the bench runs with the default limit)"
    else:
        limit_note += f"the bench config sets fhir.max_body_bytes = {max_body}"
    print(limit_note, flush=True)

    out: dict[str, Any] = {"sizes": sizes, "runs": runs, "body_bytes": {str(n): len(b) for n, b in bodies.items()},
                           "max_body_bytes_default": default_limit, "max_body_bytes_used": max_body or default_limit,
                           "limit_note": limit_note, "clients": {}}
    with tempfile.TemporaryDirectory(prefix="bundle-bench-") as td:
        tmp = Path(td)
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "bench-1", "use": "sig", "alg": "ES256"}
        jwks_path = tmp / "jwks.json"
        jwks_path.write_text(json.dumps({"keys": [jwk]}))
        cfg = parse_config(config_dict(tmp, write_policy_copy(tmp), jwks_path, max_body))
        rt = await build_runtime(cfg, tmp)
        real_prior = rt.prior
        rt = replace(rt, prior=NoPriorState())
        pipe = Pipeline(rt)
        clock = StageClock()
        creds = {"system": ("x-api-key", API_KEY), "patient": ("authorization", f"Bearer {bearer_token(key)}")}
        try:
            with instrumented(pipe, clock):
                for client in clients:
                    rows: dict[str, Any] = {}
                    for n in sizes:
                        raw = raw_request(bodies[n], creds[client])
                        walls: list[float] = []
                        cpus: list[float] = []
                        stage_w: dict[str, list[float]] = {s: [] for s in STAGES + ("other",)}
                        stage_c: dict[str, list[float]] = {s: [] for s in STAGES + ("other",)}
                        gc_ms: list[float] = []
                        gc_full: list[int] = []
                        gc_stage: dict[str, list[float]] = {}
                        for r in range(runs + 1):  # the first is a warm-up
                            gc.collect()  # every run starts from the same heap (not counted: before reset)
                            clock.reset()
                            c0, w0 = time.process_time_ns(), time.perf_counter_ns()
                            d = await pipe.decide(raw, f"bench-{client}-{n}-{r:03d}", "")
                            w1, c1 = time.perf_counter_ns(), time.process_time_ns()
                            if d.refusal is not None:
                                raise SystemExit(f"{client} n={n}: refused {d.refusal.status}: {d.refusal.reason}")
                            if len(d.classification.entries) != n:  # type: ignore[union-attr]
                                raise SystemExit(f"{client} n={n}: classified {len(d.classification.entries)} entries")  # type: ignore[union-attr]
                            if r == 0:
                                continue
                            walls.append((w1 - w0) / 1e6)
                            cpus.append((c1 - c0) / 1e6)
                            for s in STAGES:
                                stage_w[s].append(clock.wall[s] / 1e6)
                                stage_c[s].append(clock.cpu[s] / 1e6)
                            stage_w["other"].append((w1 - w0 - sum(clock.wall.values())) / 1e6)
                            stage_c["other"].append((c1 - c0 - sum(clock.cpu.values())) / 1e6)
                            gc_ms.append(clock.gc_ns / 1e6)
                            gc_full.append(clock.gc_runs[2])
                            for s_, ns in clock.gc_stage.items():
                                gc_stage.setdefault(s_, []).append(ns / 1e6)
                        wall, cpu = summarize(walls), summarize(cpus)
                        rows[str(n)] = {
                            "entries": n, "body_bytes": len(bodies[n]),
                            "wall_ms": wall, "cpu_ms": cpu,
                            "wall_ms_per_entry": wall["median"] / n, "cpu_ms_per_entry": cpu["median"] / n,
                            "stages_wall_ms": {s: statistics.median(v) for s, v in stage_w.items()},
                            "stages_cpu_ms": {s: statistics.median(v) for s, v in stage_c.items()},
                            "gc_ms": statistics.median(gc_ms), "gc_full_collections": statistics.median(gc_full),
                            "gc_ms_by_stage": {s_: statistics.median(v + [0.0] * (runs - len(v)))
                                               for s_, v in sorted(gc_stage.items())},
                            "raw_wall_ms": walls, "raw_cpu_ms": cpus,
                        }
                        print(f"  {client:8s} n={n:5d}  wall median {wall['median']:8.1f} ms  max {wall['max']:8.1f}  "
                              f"cpu median {cpu['median']:8.1f} ms", flush=True)
                    out["clients"][client] = {"rows": rows, **verdicts(rows)}
        finally:
            await rt.audit.close()
            await rt.svc.close()
            if real_prior is not None:
                await real_prior.close()
    return out


def verdicts(rows: dict[str, Any]) -> dict[str, Any]:
    v: dict[str, Any] = {}
    if "1000" in rows:
        m = rows["1000"]["wall_ms"]["median"]
        v["target_1000"] = {"wall_median_ms": m, "cpu_median_ms": rows["1000"]["cpu_ms"]["median"],
                            "limit_ms": TARGET_1000_MS, "pass": m <= TARGET_1000_MS}
    if "1000" in rows and "2000" in rows:
        rw = rows["2000"]["wall_ms"]["median"] / rows["1000"]["wall_ms"]["median"]
        rc = rows["2000"]["cpu_ms"]["median"] / rows["1000"]["cpu_ms"]["median"]
        v["ratio_2000_1000"] = {"wall": rw, "cpu": rc, "limit": TARGET_RATIO, "pass": rw <= TARGET_RATIO}
    return v


def report(res: dict[str, Any]) -> None:
    cols = ("parse", "classify", "scopes", "validate", "context", "policy_input", "policy_eval", "audit", "other")
    for client, c in res["clients"].items():
        print(f"\nclient: {client}  (runs per size: {res['runs']}; ms; stage columns are medians of wall time)")
        head = (f"{'entries':>7} {'KB':>6} {'wall med':>9} {'wall max':>9} {'cpu med':>8} {'cpu max':>8} "
                f"{'ms/entry':>8} " + " ".join(f"{s[:11]:>11}" for s in cols) + f" {'(gc)':>7}")
        print(head)
        print("-" * len(head))
        for n, r in c["rows"].items():
            sw = r["stages_wall_ms"]
            print(f"{n:>7} {r['body_bytes'] / 1024:6.0f} {r['wall_ms']['median']:9.1f} {r['wall_ms']['max']:9.1f} "
                  f"{r['cpu_ms']['median']:8.1f} {r['cpu_ms']['max']:8.1f} {r['wall_ms_per_entry']:8.3f} "
                  + " ".join(f"{sw[s]:11.1f}" for s in cols) + f" {r['gc_ms']:7.1f}")
        t = c.get("target_1000")
        if t:
            print(f"  {'PASS' if t['pass'] else 'MISS'}: 1000 entries decided in {t['wall_median_ms']:.1f} ms wall "
                  f"(cpu {t['cpu_median_ms']:.1f} ms), target <= {TARGET_1000_MS:.0f} ms")
        rt = c.get("ratio_2000_1000")
        if rt:
            print(f"  {'PASS' if rt['pass'] else 'MISS'}: 2000/1000 = {rt['wall']:.2f} wall ({rt['cpu']:.2f} cpu), "
                  f"target <= {TARGET_RATIO}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000,2000", help="comma-separated entry counts")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per size and client (after one warm-up)")
    ap.add_argument("--clients", default="system,patient", help="system, patient or both")
    ap.add_argument("--max-body-bytes", type=int, default=None, help="fhir.max_body_bytes (default: the config default)")
    ap.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    ap.add_argument("--json", type=Path, default=None, help="also write the BUNDLE_JSON document here")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not set(clients) <= {"system", "patient"} or not sizes or args.runs < 1:
        ap.error("bad --clients/--sizes/--runs")
    pinned = pin_cpu(args.cpu)
    import logging

    logging.disable(logging.WARNING)  # the per-request log lines are not what is measured here
    print(f"bundle decide bench: sizes {sizes}, {args.runs} runs, clients {clients}; {pinned}; "
          f"nproc {os.cpu_count()}, {platform.python_implementation()} {platform.python_version()}", flush=True)
    res = asyncio.run(bench(sizes, args.runs, clients, args.max_body_bytes))
    res.update(machine={"nproc": os.cpu_count(), "python": platform.python_version(), "pinned": pinned},
               when=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    report(res)
    ok = all(v.get("pass", True) for c in res["clients"].values()
             for v in (c.get("target_1000", {}), c.get("ratio_2000_1000", {})))
    slim = json.loads(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(slim, indent=2))
    print("BUNDLE_JSON " + json.dumps(slim, separators=(",", ":")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
