"""`fhir-sidecar run --workers N`: pure parts (config per worker, metrics merge, audit sets,
shared alert windows) and the whole thing end to end against the sandbox EHR, whose request
log is the witness of what reached the EHR."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.alerts import AlertEngine, AlertEvent, AlertsConfig
from sidecar.audit.files import active_path, all_chain_files, worker_paths
from sidecar.audit.verify import verify_files
from sidecar.config import ConfigError, load_config
from sidecar.state import open_store
from sidecar.workers import WorkerSlot, check_workers, for_worker, reserve_port, worker_file
from sidecar.workers_admin import merge_metrics
from tests.harness import AUDIT_KEY, WRITER_KEY, SidecarProcess, make_config, request

BASE = "/fhir/R4"
OBS = {"resourceType": "Observation", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}
ADMIN = {"Authorization": "Bearer test-admin-token"}


def body(**extra) -> bytes:
    return json.dumps({**OBS, **extra}).encode()


def wh(**extra: str) -> dict[str, str]:
    return {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json", **extra}


# -- pure parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("path,index,want", [
    ("/var/lib/fhir-sidecar/audit.jsonl", 0, "/var/lib/fhir-sidecar/audit.w0.jsonl"),
    ("audit.jsonl", 3, "audit.w3.jsonl"),
    ("/x/flows", 1, "/x/flows.w1"),
])
def test_worker_file(path, index, want):
    assert worker_file(path, index) == want


def test_for_worker_gives_each_worker_its_own_chain_file_and_a_private_admin(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps(make_config(tmp_path, "http://127.0.0.1:1/fhir/R4",
                                        admin={"host": "0.0.0.0", "port": 9090})))
    cfg = load_config(f)
    w = for_worker(cfg, WorkerSlot(1, 2), 18080)
    assert w.audit.chain == "main.w1" and w.audit.path.endswith("audit.w1.jsonl")
    assert (w.listen.port, w.admin.host, w.admin.port) == (18080, "127.0.0.1", 0)
    assert w.clients == cfg.clients and w.audit.key == cfg.audit.key
    assert cfg.audit.chain == "main"  # the loaded config is untouched


def test_worker_count_and_store_are_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps(make_config(tmp_path, "http://127.0.0.1:1/fhir/R4")))
    cfg = load_config(f)
    for bad in (0, -1, 65):
        with pytest.raises(ConfigError):
            check_workers(cfg, bad)
    check_workers(cfg, 2)
    with pytest.raises(ConfigError):
        WorkerSlot.parse("2/2", None)


def test_reserved_port_is_refused_to_others_but_joinable_with_reuse_port():
    import socket

    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()
        joined = socket.socket()
        joined.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        joined.bind(("127.0.0.1", port))  # what a worker does
        joined.close()
    finally:
        held.close()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))  # a port someone holds without SO_REUSEPORT
    try:
        with pytest.raises(ConfigError):
            reserve_port("127.0.0.1", other.getsockname()[1])
    finally:
        other.close()


EXPO = """# HELP fhir_sidecar_requests_total Requests
# TYPE fhir_sidecar_requests_total counter
fhir_sidecar_requests_total{{client="a",status="200"}} {n}.0
# HELP fhir_sidecar_kill_switch_engaged engaged
# TYPE fhir_sidecar_kill_switch_engaged gauge
fhir_sidecar_kill_switch_engaged {k}.0
# HELP fhir_sidecar_upstream_seconds upstream
# TYPE fhir_sidecar_upstream_seconds histogram
fhir_sidecar_upstream_seconds_bucket{{le="0.1"}} {n}.0
fhir_sidecar_upstream_seconds_bucket{{le="+Inf"}} {n}.0
fhir_sidecar_upstream_seconds_count {n}.0
fhir_sidecar_upstream_seconds_sum 0.5
# HELP fhir_sidecar_policy_revision policy
# TYPE fhir_sidecar_policy_revision gauge
fhir_sidecar_policy_revision_info{{revision="abc"}} 1.0
"""


def test_merge_metrics_sums_counters_and_histograms_and_maxes_gauges():
    merged = merge_metrics([EXPO.format(n=3, k=0), EXPO.format(n=4, k=1)])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert samples[("fhir_sidecar_requests_total", (("client", "a"), ("status", "200")))] == 7
    assert samples[("fhir_sidecar_upstream_seconds_bucket", (("le", "+Inf"),))] == 7
    assert samples[("fhir_sidecar_upstream_seconds_sum", ())] == 1.0
    assert samples[("fhir_sidecar_kill_switch_engaged", ())] == 1
    assert samples[("fhir_sidecar_policy_revision_info", (("revision", "abc"),))] == 1
    assert "# TYPE fhir_sidecar_requests_total counter" in merged


def test_audit_sets_of_workers_are_found_and_verified_each_with_its_own_tail(tmp_path):
    from sidecar.audit.record import build_record

    def chain(path: Path, name: str, n: int, torn: bool = False) -> None:
        prev = "0" * 64
        with open(path, "wb") as f:
            for seq in range(1, n + 1):
                rec = build_record({"kind": "admin", "decision": "admin", "reasons": ["x"]}, chain=name, seq=seq,
                                   ts="2026-11-25T10:00:00.000Z", prev=prev, key_id="k1", key=_hmac_key())
                prev = rec["hash"]
                f.write(json.dumps(rec).encode() + b"\n")
            if torn:
                f.write(b'{"v":1,"chain"')
    base = tmp_path / "audit.jsonl"
    chain(tmp_path / "audit.w0.jsonl", "main.w0", 3, torn=True)
    chain(tmp_path / "audit.w1.jsonl", "main.w1", 2)
    assert worker_paths(base) == [str(tmp_path / "audit.w0.jsonl"), str(tmp_path / "audit.w1.jsonl")]
    files = all_chain_files(base)
    assert [Path(f).name for f in files] == ["audit.w0.jsonl", "audit.w1.jsonl"]
    assert active_path(str(tmp_path / "audit.w0.jsonl.20261125T100000Z.000001")) == str(tmp_path / "audit.w0.jsonl")
    result = verify_files(files, {"k1": AUDIT_KEY.encode()})
    # worker 0's torn tail is at the end of ITS newest file: a crash (2), not tampering (1)
    assert result.code == 2, result


def _hmac_key() -> bytes:
    from sidecar.audit.record import HMAC_PURPOSE, derive_key

    return derive_key(AUDIT_KEY.encode(), HMAC_PURPOSE)


def test_shared_alert_windows_count_across_engines_and_fire_once(tmp_path):
    async def scenario() -> list:
        store = open_store(f"sqlite:{tmp_path / 'state.db'}")
        fired: list = []

        async def emit(a) -> None:
            fired.append(a)

        cfg = AlertsConfig(max_writes=3, window_s=60)
        engines = [AlertEngine(cfg, clients=["c1"]) for _ in range(2)]
        runners = [asyncio.create_task(e.share(store, emit).run()) for e in engines]
        now = time.time()
        for i in range(6):  # 3 writes on each "worker": 6 > 3 in the window, but one alert
            out = engines[i % 2].observe(AlertEvent(ts=now + i * 0.01, client_id="c1", source_ip="127.0.0.1",
                                                    is_write=True, decision="allow", correlation_id=f"cid-{i:04d}"))
            assert out == []  # decided in the background, never on the request path
        for e in engines:
            await e._shared.drained()
        await asyncio.sleep(0.2)
        for r in runners:
            r.cancel()
        await store.close()
        return fired

    fired = asyncio.run(scenario())
    assert [a.kind for a in fired] == ["write_volume"]
    assert fired[0].count == 4 and fired[0].client_id == "c1"


def test_local_alert_engine_is_unchanged_without_sharing():
    eng = AlertEngine(AlertsConfig(max_writes=1, window_s=60), clients=["c1"])
    ev = [AlertEvent(ts=1000.0 + i, client_id="c1", source_ip=None, is_write=True, decision="allow") for i in range(2)]
    assert eng.observe(ev[0]) == [] and [a.kind for a in eng.observe(ev[1])] == ["write_volume"]


# -- end to end --------------------------------------------------------------------------------

@pytest.fixture
def workers(sandbox, tmp_path):
    procs: list[SidecarProcess] = []

    def start(n: int = 2, **over) -> SidecarProcess:
        over.setdefault("policy", {"engine": "off"})
        sc = SidecarProcess(make_config(tmp_path, sandbox.base_url, **over), tmp_path, ("--workers", str(n))).start()
        procs.append(sc)
        return sc

    yield start
    for p in procs:
        p.stop()


def health(sc: SidecarProcess) -> dict:
    return json.loads(request(sc.admin_port, "GET", "/healthz")[2])


def complete_lines(f: Path) -> list[bytes]:
    """The file's complete lines: a worker may be writing the last one right now."""
    return f.read_bytes().split(b"\n")[:-1]


def served_by(tmp_path: Path) -> dict[str, int]:
    """Records per worker chain (the audit files are the evidence of who served what)."""
    out: dict[str, int] = {}
    for f in sorted(tmp_path.glob("audit.w*.jsonl")):
        for line in complete_lines(f):
            rec = json.loads(line)
            if rec.get("kind") in ("read", "intent", "deny", "replay"):
                out[rec["chain"]] = out.get(rec["chain"], 0) + 1
    return out


def audit_verify(sc: SidecarProcess) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "audit", "verify", "--config", str(sc.cfg_path)],
                          capture_output=True, text=True, env={**os.environ, "FHIR_SIDECAR_AUDIT_KEY": AUDIT_KEY})


def test_two_workers_share_the_port_and_each_write_has_its_intent(workers, sandbox, tmp_path):
    sc = workers(2)
    h = health(sc)
    assert [w["alive"] for w in h["workers"]] == [True, True]
    assert request(sc.admin_port, "GET", "/readyz")[0] == 200
    sandbox.clear_log()
    statuses = [request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] for _ in range(30)]
    statuses += [request(sc.port, "GET", f"{BASE}/Observation?_count=1", headers=wh())[0] for _ in range(10)]
    assert statuses == [201] * 30 + [200] * 10
    deadline = time.time() + 5  # read records are committed in groups, after the answer
    while sum((by_chain := served_by(tmp_path)).values()) < 40 and time.time() < deadline:
        time.sleep(0.1)
    assert set(by_chain) == {"main.w0", "main.w1"}, by_chain  # 40 fresh connections: both workers served
    assert sum(by_chain.values()) == 40
    intents = {json.loads(l)["correlation_id"] for f in tmp_path.glob("audit.w*.jsonl")
               for l in complete_lines(f) if json.loads(l)["kind"] == "intent"}
    writes = [e for e in sandbox.request_log() if e["action"] == "create"]
    assert len(writes) == 30 and all(e["correlation_id"] in intents for e in writes)
    v = audit_verify(sc)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "2 chain(s) intact" in v.stdout
    m = request(sc.admin_port, "GET", "/metrics")[2].decode()
    total = sum(s.value for fam in text_string_to_metric_families(m) for s in fam.samples
                if s.name == "fhir_sidecar_requests_total")
    assert total == 40
    assert "fhir_sidecar_workers_up 2" in m


def test_receipts_and_rate_limits_hold_across_workers(workers, sandbox, tmp_path):
    sc = workers(2, rate_limit={"writes": {"rate": 0.01, "burst": 20}})
    sandbox.clear_log()
    k = {"Idempotency-Key": "cross-worker-key-0001"}
    answers = [request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k)) for _ in range(16)]
    assert [a[0] for a in answers] == [201] * 16
    assert [a[1].get("idempotent-replayed") for a in answers[1:]] == ["true"] * 15
    assert sum(1 for e in sandbox.request_log() if e["action"] == "create") == 1
    assert len(served_by(tmp_path)) == 2  # the replays came through both workers
    # one bucket of 20 for the client, whatever worker a connection lands on: the 16 above
    # (admitted before the receipt is looked up) leave 4; per-process buckets would pass all 12
    statuses = [request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] for _ in range(12)]
    assert statuses == [201] * 4 + [429] * 8
    assert sum(1 for e in sandbox.request_log() if e["action"] == "create") == 5


def test_kill_switch_through_the_supervisor_stops_every_worker(workers, sandbox):
    sc = workers(2)
    st, _, data = request(sc.admin_port, "POST", "/admin/killswitch", json.dumps({"engaged": True}).encode(),
                          {**ADMIN, "Content-Type": "application/json"})
    assert st == 200 and json.loads(data)["engaged"] is True
    assert request(sc.admin_port, "POST", "/admin/killswitch", b'{"engaged": true}')[0] == 401
    time.sleep(1.0)
    sandbox.clear_log()
    statuses = [request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] for _ in range(20)]
    assert statuses == [503] * 20
    assert sandbox.request_log() == []


def test_a_dead_worker_is_restarted_and_sigterm_stops_all(workers, sandbox):
    sc = workers(2)
    before = health(sc)["workers"]
    os.kill(before[1]["pid"], signal.SIGKILL)  # a worker this test's supervisor started
    deadline = time.time() + 20
    while time.time() < deadline:
        now = health(sc)["workers"]
        if now[1]["restarts"] == 1 and now[1]["alive"] and request(sc.admin_port, "GET", "/readyz")[0] == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker was not restarted: {health(sc)}")
    assert now[1]["pid"] != before[1]["pid"] and now[0]["pid"] == before[0]["pid"]
    assert [request(sc.port, "GET", f"{BASE}/Observation?_count=1", headers=wh())[0] for _ in range(10)] == [200] * 10
    assert "fhir_sidecar_worker_restarts_total 1" in request(sc.admin_port, "GET", "/metrics")[2].decode()
    pids = [w["pid"] for w in now]
    assert sc.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_reload_goes_to_every_worker(workers):
    sc = workers(2)
    st, _, data = request(sc.admin_port, "POST", "/admin/reload", b"", ADMIN)
    assert st == 200 and json.loads(data) == {"reloaded": True, "workers": [200, 200]}
    assert request(sc.admin_port, "POST", "/admin/reload", b"")[0] == 401


def test_workers_refuse_a_port_in_use(sandbox, tmp_path):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        cfg = make_config(tmp_path, sandbox.base_url, policy={"engine": "off"})
        cfg["listen"]["port"] = holder.getsockname()[1]
        p = tmp_path / "c.yaml"
        p.write_text(json.dumps(cfg))
        out = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(p), "--workers", "2"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Address already in use" in (out.stdout + out.stderr)
    finally:
        holder.close()



def test_forward_mode_workers_share_one_ca_and_refuse_other_hosts(tmp_path):
    """HTTPS_PROXY mode under --workers: every worker intercepts with the same CA (the confdir
    worker 0 fills first), writes reach the EHR with their intents, other hosts are refused."""
    import httpx

    from sidecar.sandbox import SandboxServer
    from tests.harness import free_port
    from tests.tlsutil import make_pki

    pki = make_pki(tmp_path / "pki")
    ehr = SandboxServer("127.0.0.1", 0, tls_cert=str(pki["cert"]), tls_key=str(pki["key"]))
    ehr.start()
    cfg = make_config(tmp_path, ehr.base_url, policy={"engine": "off"},
                      upstream={"url": ehr.base_url, "ca_bundle": str(pki["ca"])},
                      listen={"mode": "forward", "confdir": str(tmp_path / "mitm")})
    sc = SidecarProcess(cfg, tmp_path, ("--workers", "2")).start()
    try:
        sidecar_ca = str(tmp_path / "mitm" / "mitmproxy-ca-cert.pem")
        statuses = []
        for _ in range(16):  # a new client each time: a new CONNECT, spread over the workers
            with httpx.Client(proxy=f"http://127.0.0.1:{sc.port}", verify=sidecar_ca, timeout=10) as client:
                statuses.append(client.post(f"{ehr.base_url}/Observation", content=body(), headers=wh()).status_code)
        assert statuses == [201] * 16
        deadline = time.time() + 5
        while sum((by_chain := served_by(tmp_path)).values()) < 16 and time.time() < deadline:
            time.sleep(0.1)
        assert set(by_chain) == {"main.w0", "main.w1"}, by_chain  # both workers intercepted with one CA
        intents = {json.loads(l)["correlation_id"] for f in tmp_path.glob("audit.w*.jsonl")
                   for l in complete_lines(f) if json.loads(l)["kind"] == "intent"}
        writes = [e for e in ehr.request_log() if e["action"] == "create"]
        assert len(writes) == 16 and all(e["correlation_id"] in intents for e in writes)
        other = free_port()
        for _ in range(6):  # CONNECT elsewhere: refused by whichever worker takes it, never tunnelled
            with socket.create_connection(("127.0.0.1", sc.port), timeout=10) as s:
                s.sendall(f"CONNECT 127.0.0.1:{other} HTTP/1.1\r\nHost: 127.0.0.1:{other}\r\n\r\n".encode())
                assert s.recv(4096).startswith(b"HTTP/1.1 403")
        assert len(ehr.request_log()) == 16
    finally:
        sc.stop()
        ehr.stop()


async def test_admin_relay_reads_the_answer_as_sent_and_bounded(monkeypatch):
    """The supervisor relays a worker's answer with its headers: the body stays as sent (a gzip
    body is not decoded under its Content-Encoding), and an answer past the limit is refused."""
    import gzip

    from sidecar import workers_admin

    payload = gzip.compress(b'{"ok": true}' * 100)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, data = await workers_admin.admin_request(port, "GET", "/x", {"accept-encoding": "gzip"}, b"")
        assert status == 200 and data == payload
        assert ("content-encoding", "gzip") in [(k.lower(), v) for k, v in headers]
        monkeypatch.setattr(workers_admin, "MAX_ANSWER", len(payload) - 1)
        with pytest.raises(ValueError, match="too large"):
            await workers_admin.admin_request(port, "GET", "/x", {}, b"")
    finally:
        server.close()
        await server.wait_closed()
