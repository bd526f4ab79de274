"""The CLI: check, config schema, killswitch, audit verify, run (SIGTERM drains in-flight requests)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from sidecar.sandbox import SandboxServer
from tests.harness import AUDIT_KEY, WRITER_KEY, SidecarProcess, make_config, request, unavailable

OBS = json.dumps({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}).encode()
WH = {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def cfg_file(tmp_path):
    cfg = make_config(tmp_path, "http://127.0.0.1:9/fhir/R4")
    p = tmp_path / "sidecar.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_check_ok_and_resolve(cfg_file):
    r = cli("check", "--config", str(cfg_file), "--resolve")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "policy" in r.stdout


def test_check_reports_bad_config_clearly(cfg_file):
    data = yaml.safe_load(cfg_file.read_text())
    data["audit"]["key"] = "inline-secret-value"
    data["surprise"] = 1
    cfg_file.write_text(yaml.safe_dump(data))
    r = cli("check", "--config", str(cfg_file))
    assert r.returncode == 2
    assert "surprise" in r.stderr and "audit.key" in r.stderr
    assert "inline-secret-value" not in r.stderr


def test_check_refuses_unresolvable_secret(cfg_file, monkeypatch):
    data = yaml.safe_load(cfg_file.read_text())
    data["audit"]["key"] = "env:FHIR_SIDECAR_TEST_UNSET"
    cfg_file.write_text(yaml.safe_dump(data))
    r = cli("check", "--config", str(cfg_file), "--resolve")
    assert r.returncode == 2 and "FHIR_SIDECAR_TEST_UNSET" in r.stderr


def test_config_schema_is_generated_from_the_models():
    r = cli("config", "schema")
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False
    assert {"upstream", "clients", "audit"} <= set(schema["required"])


def test_killswitch_cli_sets_the_flag_file(cfg_file):
    assert json.loads(cli("killswitch", "status", "--config", str(cfg_file)).stdout)["engaged"] is False
    out = json.loads(cli("killswitch", "on", "--config", str(cfg_file), "--reason", "drill").stdout)
    assert out["engaged"] is True
    out = json.loads(cli("killswitch", "on", "--config", str(cfg_file), "--client", "demo-writer").stdout)
    assert out["clients"] == ["demo-writer"]
    out = json.loads(cli("killswitch", "off", "--config", str(cfg_file)).stdout)
    assert out["engaged"] is False and out["clients"] == ["demo-writer"]


def test_run_drains_in_flight_on_sigterm_and_audit_verifies(tmp_path):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    try:
        cfg = make_config(tmp_path, sandbox.base_url)
        sc = SidecarProcess(cfg, tmp_path).start()
        sandbox.set_faults(delay_ms=1000)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)))
        t.start()
        time.sleep(0.3)
        sc.signal(signal.SIGTERM)
        t.join(15)
        assert result["r"][0] == 201  # the in-flight write finished
        assert sc.proc.wait(15) == 0
        with pytest.raises(OSError):
            request(sc.port, "GET", "/fhir/R4/metadata", timeout=2)
        r = cli("audit", "verify", "--config", str(sc.cfg_path))
        assert r.returncode == 0, r.stdout + r.stderr
        # a flipped byte is found
        audit = tmp_path / "audit.jsonl"
        raw = bytearray(audit.read_bytes())
        i = raw.index(b'"interaction":"create"')
        raw[i + 16] = ord("X")
        audit.write_bytes(bytes(raw))
        assert cli("audit", "verify", "--config", str(sc.cfg_path)).returncode == 1
        out = sc.stdout_path.read_text()
        assert AUDIT_KEY not in out and WRITER_KEY not in out
    finally:
        sandbox.stop()


def test_policy_eval_prints_input_and_decision(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    req = root / "examples" / "requests" / "create-observation.json"
    r = cli("policy", "eval", "--config", str(root / "examples" / "demo.yaml"), "--request", str(req))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["input"]["request"]["interaction"] == "create" and out["decision"]["allow"] is True
    spec = json.loads(req.read_text())
    spec["target"] = "/fhir/R4/MedicationRequest"
    spec["body"] = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                    "subject": {"reference": "Patient/1"}, "medicationCodeableConcept": {"text": "x"}}
    other = tmp_path / "r.json"
    other.write_text(json.dumps(spec))
    r = cli("policy", "eval", "--config", str(root / "examples" / "demo.yaml"), "--request", str(other))
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["decision"]["allow"] is False  # no scope on MedicationRequest


def test_certs_init_creates_a_ca_with_a_private_key_file_0600(tmp_path):
    r = cli("certs", "init", "--dir", str(tmp_path / "ca"))
    assert r.returncode == 0, r.stderr
    key = tmp_path / "ca" / "mitmproxy-ca.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "NODE_EXTRA_CA_CERTS" in r.stdout and "SSL_CERT_FILE" in r.stdout
    assert "mitmproxy-ca.pem" in (tmp_path / "ca" / ".gitignore").read_text()
    again = cli("certs", "init", "--dir", str(tmp_path / "ca"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_audit_show_filters(tmp_path):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    try:
        sc = SidecarProcess(make_config(tmp_path, sandbox.base_url, policy={"engine": "off"}), tmp_path).start()
        request(sc.port, "POST", "/fhir/R4/Observation", OBS, {**WH, "X-Correlation-ID": "show-me-00001"})
        request(sc.port, "POST", "/fhir/R4/MedicationRequest", b"{}", WH)
        sc.stop()
        r = cli("audit", "show", "--config", str(sc.cfg_path), "--correlation-id", "show-me-00001")
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 2 and "intent" in lines[0] and "outcome" in lines[1]
        r = cli("audit", "show", "--config", str(sc.cfg_path), "--kind", "deny", "--json")
        denies = [json.loads(x) for x in r.stdout.splitlines()]
        assert denies and all(d["kind"] == "deny" for d in denies)
    finally:
        sandbox.stop()


def test_policy_test_passes_and_fails_when_a_rule_is_broken(tmp_path):
    import shutil

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    r = cli("policy", "test", str(root / "policies"))
    assert r.returncode == 0 and "PASS:" in r.stdout
    broken = tmp_path / "policies"
    shutil.copytree(root / "policies", broken)
    data = json.loads((broken / "data.json").read_text())
    data["fhir_sidecar"]["clients"]["demo-reader"]["write_types"] = ["Observation"]  # a reader that may write
    (broken / "data.json").write_text(json.dumps(data))
    r = cli("policy", "test", str(broken))
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_engine_opa_end_to_end_against_an_opa_data_api(tmp_path):
    from tests.opa_server import OpaDataServer, go_engine_unavailable

    why = go_engine_unavailable()
    if why:
        unavailable(why)
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    opa = OpaDataServer(root / "policies").start()
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    try:
        cfg = make_config(tmp_path, sandbox.base_url,
                          policy={"engine": "opa", "opa_url": opa.url, "dir": str(root / "policies"), "path": "fhir/writeback"})
        sc = SidecarProcess(cfg, tmp_path).start()
        try:
            assert request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)[0] == 201
            status, _, data = request(sc.port, "POST", "/fhir/R4/Observation", OBS,
                                      {**WH, "X-API-Key": "reader-key-1"})
            assert status == 403
        finally:
            sc.stop()
        opa.stop()
        sc = SidecarProcess(cfg, tmp_path)
        sc.stdout_path = tmp_path / "second.stdout"
        sc.start()
        try:  # the policy engine is down: a write is a 503, never an allow
            assert request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)[0] == 503
            assert len([e for e in sandbox.request_log() if e["action"] == "create"]) == 1
        finally:
            sc.stop()
    finally:
        opa.stop()
        sandbox.stop()


def test_record_through_the_running_sidecar_then_replay_under_a_new_config(tmp_path):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    try:
        cfg = make_config(tmp_path, sandbox.base_url, policy={"engine": "off"},
                          recording={"path": str(tmp_path / "flows.bin")})
        sc = SidecarProcess(cfg, tmp_path).start()
        canary = b"Zebulon Quixbyrne"
        obs = json.loads(OBS)
        obs["note"] = [{"text": canary.decode()}]
        assert request(sc.port, "POST", "/fhir/R4/Observation", json.dumps(obs).encode(), WH)[0] == 201
        assert request(sc.port, "POST", "/fhir/R4/Condition", json.dumps(
            {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "code": {"text": "x"}}).encode(), WH)[0] == 201
        assert request(sc.port, "GET", "/fhir/R4/Observation?_count=1", None, {"X-API-Key": "reader-key-1"})[0] == 200
        sc.stop()
        flows = (tmp_path / "flows.bin").read_bytes()
        assert canary not in flows and WRITER_KEY.encode() not in flows and b"reader-key-1" not in flows
        same = cli("replay", str(tmp_path / "flows.bin"), "--config", str(sc.cfg_path), "--strict")
        assert same.returncode == 0, same.stdout + same.stderr
        narrowed = yaml.safe_load(sc.cfg_path.read_text())
        narrowed["clients"][0]["scopes"] = ["system/Observation.cruds", "system/Patient.rs"]  # Condition revoked
        (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(narrowed))
        changed = cli("replay", str(tmp_path / "flows.bin"), "--config", str(tmp_path / "narrow.yaml"), "--strict",
                      "--json")
        assert changed.returncode == 1
        report = json.loads(changed.stdout)
        assert len(report["changes"]) == 1 and report["changes"][0]["resource_type"] == "Condition"
    finally:
        sandbox.stop()
