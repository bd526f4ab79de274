"""Fail closed, mechanically: an exception in any stage, a failed audit sink, the kill switch.

These run the real sidecar in a thread of the test process so a stage can be made to raise.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from sidecar.addon import SidecarAddon
from sidecar.pipeline import Pipeline
from tests.harness import READER_KEY, WRITER_KEY, SidecarThread, make_config, request

pytestmark = pytest.mark.e2e
BASE = "/fhir/R4"
OBS = json.dumps({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}).encode()
WH = {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json"}


@pytest.fixture
def start_sidecar(sandbox, tmp_path):
    started: list[SidecarThread] = []

    def start(fsync=None, **over):
        sc = SidecarThread(make_config(tmp_path, sandbox.base_url, **over), tmp_path, fsync=fsync).start()
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.stop()


@pytest.mark.parametrize("stage", ["parse", "classify", "identify", "guard", "audit"])
def test_exception_in_any_stage_answers_503_and_forwards_nothing(start_sidecar, sandbox, monkeypatch, stage):
    sc = start_sidecar()

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Pipeline, stage, boom)
    for method, target, body in (("POST", f"{BASE}/Observation", OBS), ("GET", f"{BASE}/Observation/1", None)):
        status, headers, data = request(sc.port, method, target, body, WH)
        assert status == 503, data
        assert json.loads(data)["issue"][0]["code"] == "transient"
        assert headers["x-correlation-id"]
    assert sandbox.request_log() == []


def test_exception_preparing_the_upstream_request_forwards_nothing(start_sidecar, sandbox, monkeypatch):
    sc = start_sidecar()
    monkeypatch.setattr(SidecarAddon, "_prepare_upstream", lambda *a: (_ for _ in ()).throw(ValueError("x")))
    status, _, _ = request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)
    assert status == 503
    assert sandbox.request_log() == []


def test_audit_fsync_error_refuses_writes_and_stays_failed(start_sidecar, sandbox):
    fail = threading.Event()

    def fsync(fd):
        if fail.is_set():
            raise OSError(28, "No space left on device")

    sc = start_sidecar(fsync=fsync)
    status, _, _ = request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)
    assert status == 201
    sandbox.clear_log()
    fail.set()
    status, _, data = request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)
    assert status == 503 and b"audit" in data
    fail.clear()  # the disk "recovers": the sink must stay failed until restart
    status, _, _ = request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)
    assert status == 503
    status, _, _ = request(sc.port, "GET", f"{BASE}/Observation?_count=1", None, {"X-API-Key": READER_KEY})
    assert status == 503  # reads_fail_open is false
    assert request(sc.admin_port, "GET", "/readyz")[0] == 503
    assert sandbox.request_log() == []


def test_write_waits_for_the_intent_fsync(start_sidecar, sandbox):
    gate = threading.Event()
    blocking = threading.Event()

    def fsync(fd):
        if blocking.is_set():
            gate.wait(10)

    sc = start_sidecar(fsync=fsync)
    blocking.set()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)))
    t.start()
    time.sleep(0.5)
    assert sandbox.request_log() == []  # the intent is not durable yet: nothing has left
    gate.set()
    t.join(10)
    assert result["r"][0] == 201
    assert len(sandbox.request_log()) == 1


def test_kill_switch_under_load(start_sidecar, sandbox):
    sc = start_sidecar()
    stop = threading.Event()
    results: list[tuple[float, int]] = []

    def load():
        while not stop.is_set():
            status = request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)[0]
            results.append((time.monotonic(), status))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    sc.killswitch_file.write_text("on\n")
    engaged = time.monotonic()
    time.sleep(1.2)
    upstream_at_1s = len(sandbox.request_log())
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(sandbox.request_log()) == upstream_at_1s  # nothing more reached the EHR after 1 s
    after = [s for ts, s in results if ts > engaged + 1.0]
    before = [s for ts, s in results if ts < engaged]
    assert before and all(s == 201 for s in before)
    assert after and all(s == 503 for s in after)
    status, headers, data = request(sc.port, "GET", f"{BASE}/metadata")
    assert status == 503 and headers["retry-after"] == "7" and b"kill switch" in data
    time.sleep(0.6)  # the background poll records the change even without traffic
    admin = [r for r in sc.audit_records() if r["kind"] == "admin"]
    assert any("kill switch engaged" in r.get("reasons", []) for r in admin)


def test_kill_switch_scope_writes_and_per_client(start_sidecar, sandbox):
    sc = start_sidecar(killswitch={"scope": "writes"})
    sc.killswitch_file.write_text("on")
    time.sleep(0.3)
    assert request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)[0] == 503
    assert request(sc.port, "GET", f"{BASE}/Observation?_count=1", None, {"X-API-Key": READER_KEY})[0] == 200
    sc.killswitch_file.write_text("off")
    time.sleep(0.3)
    assert request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)[0] == 201
    # per-client switch through the admin API
    token = {"Authorization": "Bearer test-admin-token"}
    status, _, _ = request(sc.admin_port, "POST", "/admin/killswitch",
                           json.dumps({"engaged": True, "client": "demo-writer", "reason": "drill"}).encode(), token)
    assert status == 200
    time.sleep(0.3)
    assert request(sc.port, "POST", f"{BASE}/Observation", OBS, WH)[0] == 503
    assert request(sc.admin_port, "POST", "/admin/killswitch", b'{"engaged": true}')[0] == 401
