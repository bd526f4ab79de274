"""Issue 5 end to end: idempotent writes, rate limits, a struggling EHR, replicas on Redis, Vault.

The sandbox's request log is the witness of what reached the EHR.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import hvac
import pytest

from tests.harness import READER_KEY, WRITER_KEY, SidecarProcess, make_config, request, sha
from tests.openbao import openbao_fixture  # noqa: F401  (the `openbao` fixture)
from tests.redis_server import fresh_redis, redis_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e
BASE = "/fhir/R4"
OBS = {"resourceType": "Observation", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}


def body(**extra) -> bytes:
    return json.dumps({**OBS, **extra}).encode()


def wh(key: str = WRITER_KEY, **extra: str) -> dict[str, str]:
    return {"X-API-Key": key, "Content-Type": "application/fhir+json", **extra}


@pytest.fixture
def run(sandbox, tmp_path):
    procs: list[SidecarProcess] = []

    def start(name: str = "a", **over) -> SidecarProcess:
        over.setdefault("policy", {"engine": "off"})  # the Rego library is tested on its own; here: resilience
        d = tmp_path / name
        d.mkdir()
        sc = SidecarProcess(make_config(d, sandbox.base_url, **over), d).start()
        procs.append(sc)
        return sc

    yield start
    for p in procs:
        p.stop()


def creates(sandbox) -> int:
    return sum(1 for e in sandbox.request_log() if e["action"] == "create")


def test_idempotent_replay_mismatch_and_client_isolation(run, sandbox):
    sc = run()
    k = {"Idempotency-Key": "order-2026-0001"}
    s1, h1, b1 = request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))
    assert s1 == 201
    s2, h2, b2 = request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))
    assert s2 == 201 and h2["idempotent-replayed"] == "true"
    assert h2["location"] == h1["location"] and b2 == b1
    assert creates(sandbox) == 1  # the repeat was answered from the receipt, not forwarded
    s3, _, _ = request(sc.port, "POST", f"{BASE}/Observation", body(status="amended"), wh(**k))
    assert s3 == 422
    # another client's key space is its own: same key, its own write
    s4, h4, _ = request(sc.port, "POST", f"{BASE}/Observation", body(), wh("ops-key-1", **k))
    assert s4 == 201 and "idempotent-replayed" not in h4
    assert creates(sandbox) == 2


def test_in_flight_409_then_timeout_504_unknown_until_resolved(run, sandbox):
    sc = run(upstream={"url": sandbox.base_url, "timeout_s": 1})
    sandbox.set_faults(delay_ms=1500, methods=["POST"])
    k = {"Idempotency-Key": "slow-write-0001"}
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))))
    t.start()
    time.sleep(0.3)
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))[0] == 409  # in flight
    t.join(10)
    status, _, data = first["r"]
    assert status == 504 and b"outcome is unknown" in data
    sandbox.set_faults()
    # the outcome is unknown: the key stays reserved and answers 409, nothing more reaches the EHR
    n = creates(sandbox)
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))[0] == 409
    assert creates(sandbox) == n
    time.sleep(0.3)
    audit = [json.loads(x) for x in (sc.cfg_path.parent / "audit.jsonl").read_text().splitlines() if x.startswith("{")]
    assert any(r["kind"] == "outcome" and r.get("outcome") == "unknown" for r in audit)
    # reconciled by an operator through the admin API (audited): the write did not happen
    r = subprocess.run([sys.executable, "-m", "sidecar", "receipts", "resolve", "slow-write-0001", "--client",
                        "demo-writer", "--failed", "--config", str(sc.cfg_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))[0] == 201  # the key is free again
    time.sleep(0.3)
    audit = [json.loads(x) for x in (sc.cfg_path.parent / "audit.jsonl").read_text().splitlines() if x.startswith("{")]
    assert any(r["kind"] == "admin" and r.get("idempotency_key") == "slow-write-0001" for r in audit)


def test_rate_limit_429(run, sandbox):
    sc = run(rate_limit={"writes": {"rate": 0.2, "burst": 2}})
    statuses = [request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] for _ in range(3)]
    assert statuses[:2] == [201, 201] and statuses[2] == 429
    s, h, _ = request(sc.port, "POST", f"{BASE}/Observation", body(), wh())
    assert s == 429 and int(h["retry-after"]) >= 1
    assert request(sc.port, "GET", f"{BASE}/Observation?_count=1", None, {"X-API-Key": READER_KEY})[0] == 200
    assert creates(sandbox) == 2


def test_upstream_429_retry_after_holds_further_writes(run, sandbox):
    sc = run()
    sandbox.set_faults(status=429, retry_after=3, methods=["POST"])
    s1, h1, _ = request(sc.port, "POST", f"{BASE}/Observation", body(), wh())
    assert s1 == 429
    sandbox.set_faults()
    n = len(sandbox.request_log())
    s2, h2, _ = request(sc.port, "POST", f"{BASE}/Observation", body(), wh())
    assert s2 == 429 and int(h2["retry-after"]) >= 1  # answered by the sidecar: the EHR asked for quiet
    assert len(sandbox.request_log()) == n
    time.sleep(3.2)
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 201


def test_breaker_opens_after_5xx_and_half_opens(run, sandbox):
    sc = run(breaker={"threshold": 3, "cooldown_s": 1, "probe_timeout_s": 10})
    sandbox.set_faults(burst_5xx=3)
    assert [request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] for _ in range(3)] == [503, 503, 503]
    n = len(sandbox.request_log())
    s, _, data = request(sc.port, "POST", f"{BASE}/Observation", body(), wh())
    assert s == 503 and len(sandbox.request_log()) == n  # open: the EHR is not hammered
    time.sleep(1.2)
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 201  # the half-open probe
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 201  # closed again


def test_two_replicas_on_redis_share_receipts_and_the_kill_switch(run, sandbox, redis_server):
    os.environ["FHS_TEST_REDIS_PASSWORD"] = redis_server.password
    state = {"store": redis_server.url, "password": "env:FHS_TEST_REDIS_PASSWORD"}
    a, b = run("a", state=state), run("b", state=state)
    k = {"Idempotency-Key": "replicated-key-0001"}
    results: list[int] = []
    threads = [threading.Thread(target=lambda sc=sc: results.append(
        request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**k))[0])) for sc in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert creates(sandbox) == 1  # exactly one write reached the EHR
    assert results.count(201) >= 1 and set(results) <= {201, 409}
    # the kill switch set through one replica's admin API is seen by the other within 1 s
    token = {"Authorization": "Bearer test-admin-token"}
    assert request(a.admin_port, "POST", "/admin/killswitch", json.dumps({"engaged": True}).encode(), token)[0] == 200
    time.sleep(1.0)
    assert request(b.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 503
    assert request(a.admin_port, "POST", "/admin/killswitch", json.dumps({"engaged": False}).encode(), token)[0] == 200
    time.sleep(1.0)
    assert request(b.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 201


def test_vault_credentials_injected_app_key_never_upstream(run, sandbox, openbao):
    url, root = openbao
    client = hvac.Client(url=url, token=root)
    secret = "ehr-token-" + os.urandom(8).hex()
    client.secrets.kv.v2.create_or_update_secret(path="ehr/lab-feed", secret={"token": secret})
    os.environ["FHS_TEST_VAULT_TOKEN"] = root
    lab_key = "lab-feed-key-1"
    sc = run(vault={"url": url, "auth": "token", "token": "env:FHS_TEST_VAULT_TOKEN"},
             clients=[{"id": "legacy-lab-feed", "auth": "api-key", "api_key_sha256": sha(lab_key),
                       "scopes": ["system/Observation.c"],
                       "upstream_credentials": "vault:secret/data/ehr/lab-feed#token"}])
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh(lab_key))[0] == 201
    seen = sandbox.request_log()[-1]["headers"]
    assert seen["authorization"] == f"Bearer {secret}"
    assert "x-api-key" not in seen
    out = (sc.cfg_path.parent / "sidecar.stdout").read_text()
    audit = (sc.cfg_path.parent / "audit.jsonl").read_text()
    for text in (out, audit):
        assert secret not in text and root not in text and lab_key not in text


def test_app_disconnecting_mid_write_is_recorded_and_not_an_ehr_failure(run, sandbox):
    import socket

    sc = run(breaker={"threshold": 2, "cooldown_s": 60, "probe_timeout_s": 60})
    sandbox.set_faults(delay_ms=800, methods=["POST"])
    for i in range(3):
        raw = (f"POST {BASE}/Observation HTTP/1.1\r\nHost: x\r\nX-API-Key: {WRITER_KEY}\r\n"
               f"Content-Type: application/fhir+json\r\nX-Correlation-ID: gone-away-{i:04d}\r\n"
               f"Content-Length: {len(body())}\r\n\r\n").encode() + body()
        with socket.create_connection(("127.0.0.1", sc.port)) as s:
            s.sendall(raw)
            time.sleep(0.2)  # the app gives up while the EHR is still working
    time.sleep(1.5)
    sandbox.set_faults()
    assert creates(sandbox) == 3  # the writes happened
    audit = [json.loads(x) for x in (sc.cfg_path.parent / "audit.jsonl").read_text().splitlines() if x.startswith("{")]
    outcomes = {r["correlation_id"]: r.get("outcome") for r in audit if r["kind"] == "outcome"}
    assert [outcomes.get(f"gone-away-{i:04d}") for i in range(3)] == ["committed"] * 3
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh())[0] == 201  # breaker still closed


def test_unreachable_redis_blocks_writes(run, sandbox, fresh_redis):
    os.environ["FHS_TEST_REDIS_PASSWORD2"] = fresh_redis.password
    sc = run(state={"store": fresh_redis.url, "password": "env:FHS_TEST_REDIS_PASSWORD2"})
    assert request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**{"Idempotency-Key": "before-stop-01"}))[0] == 201
    fresh_redis.stop()
    time.sleep(1.5)  # the shared kill-switch view goes stale: engaged
    n = creates(sandbox)
    status, _, data = request(sc.port, "POST", f"{BASE}/Observation", body(), wh(**{"Idempotency-Key": "after-stop-01"}))
    assert status == 503, data
    assert creates(sandbox) == n


def test_vault_down_at_start_refuses_to_start(tmp_path, sandbox):
    from tests.harness import free_port

    cfg = make_config(tmp_path, sandbox.base_url, vault={"url": f"http://127.0.0.1:{free_port()}", "auth": "token",
                                                         "token": "env:FHS_TEST_VAULT_TOKEN_X"})
    os.environ["FHS_TEST_VAULT_TOKEN_X"] = "s.not-a-real-token"
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "vault" in r.stderr.lower()
    assert "s.not-a-real-token" not in r.stderr + r.stdout
