"""End to end, reverse mode: real HTTP through `fhir-sidecar run` to the sandbox EHR.

The sandbox's request log is the witness: what it did not log never reached the upstream.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import time
from pathlib import Path

import pytest

from sidecar.audit.verify import verify_files
from tests.harness import (AUDIT_KEY, OPS_KEY, READER_KEY, SHADOW_KEY, WRITER_KEY, SidecarProcess, make_config, raw_exchange,
                           request)
from sidecar.sandbox import SandboxServer

pytestmark = pytest.mark.e2e
BASE = "/fhir/R4"
OBS = {"resourceType": "Observation", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
       "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 72, "unit": "/min"}}
JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def sandbox():
    s = SandboxServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sidecar(sandbox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    proc = SidecarProcess(make_config(tmp, sandbox.base_url), tmp).start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def clean(sandbox):
    sandbox.clear_log()
    yield


def wh(key: str = WRITER_KEY, **extra: str) -> dict[str, str]:
    return {"X-API-Key": key, "Content-Type": JSON, **extra}


def test_allowed_create_arrives_byte_identical(sidecar, sandbox):
    body = b'{ "resourceType":"Observation",\n  "status":"final", "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]} }'
    status, headers, data = request(sidecar.port, "POST", f"{BASE}/Observation", body,
                                    wh(**{"X-Correlation-ID": "corr-create-0001"}))
    assert status == 201, data
    assert headers["x-correlation-id"] == "corr-create-0001"
    # Location points at the sidecar, never at the EHR
    assert headers["location"].startswith(f"http://127.0.0.1:{sidecar.port}{BASE}/Observation/")
    log = sandbox.request_log()
    assert len(log) == 1
    assert base64.b64decode(log[0]["body_b64"]) == body
    assert log[0]["correlation_id"] == "corr-create-0001"
    assert log[0]["action"] == "create"
    assert log[0]["headers"]["traceparent"].startswith("00-")
    assert "x-api-key" not in log[0]["headers"]


def test_intent_is_audited_before_forward_and_chain_verifies(sidecar, sandbox, tmp_path):
    status, _, _ = request(sidecar.port, "POST", f"{BASE}/Observation", json.dumps(OBS).encode(),
                           wh(**{"X-Correlation-ID": "corr-audit-00002"}))
    assert status == 201
    time.sleep(0.3)  # the outcome record is written without holding the response
    audit = Path(sidecar.cfg_path.parent / "audit.jsonl")
    recs = [json.loads(x) for x in audit.read_text().splitlines() if x.startswith("{")]
    mine = [r for r in recs if r.get("correlation_id") == "corr-audit-00002"]
    assert [r["kind"] for r in mine] == ["intent", "outcome"]
    assert mine[0]["seq"] < mine[1]["seq"]
    assert mine[1]["outcome"] == "committed" and mine[1]["upstream_status"] == 201
    assert mine[0]["client_id"] == "demo-writer" and mine[0]["interaction"] == "create"
    result = verify_files([str(audit)], {"k1": AUDIT_KEY.encode()})
    assert result.code == 0, result.message


def test_read_and_search_links_point_at_the_sidecar(sidecar, sandbox):
    for _ in range(3):
        request(sidecar.port, "POST", f"{BASE}/Observation", json.dumps(OBS).encode(), wh())
    status, headers, data = request(sidecar.port, "GET", f"{BASE}/Observation?_count=2", None,
                                    {"X-API-Key": READER_KEY})
    assert status == 200
    bundle = json.loads(data)
    ours = f"http://127.0.0.1:{sidecar.port}{BASE}"
    urls = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"]]
    assert urls and all(u.startswith(ours) for u in urls)
    assert sandbox.base_url.encode() not in data
    assert headers["x-correlation-id"]


def test_transaction_is_allowed_and_entries_rewritten(sidecar, sandbox):
    ours = f"http://127.0.0.1:{sidecar.port}{BASE}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": OBS,
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {**OBS, "id": "o2"}, "request": {"method": "PUT", "url": f"{ours}/Observation/o2"}},
    ]}
    status, _, data = request(sidecar.port, "POST", BASE, json.dumps(bundle).encode(), wh())
    assert status == 200, data
    resp = json.loads(data)
    assert resp["type"] == "transaction-response"
    assert all(e["response"]["location"].startswith(ours) for e in resp["entry"])
    log = sandbox.request_log()
    assert len(log) == 1 and log[0]["action"] == "transaction"
    sent = base64.b64decode(log[0]["body_b64"])
    assert ours.encode() not in sent and f"{sandbox.base_url}/Observation/o2".encode() in sent
    intent = [r for r in _audit(sidecar) if r["kind"] == "intent" and r.get("correlation_id") == log[0]["correlation_id"]]
    assert intent and "rewritten" in intent[0]["reasons"][0]


def _audit(sidecar):
    audit = sidecar.cfg_path.parent / "audit.jsonl"
    return [json.loads(x) for x in audit.read_text().splitlines() if x.startswith("{")]


# (method, target, headers, body, expected status) — every one must be refused and never reach the EHR
HARDENING = [
    ("override-delete-on-get", "GET", f"{BASE}/Observation/1", {"X-HTTP-Method-Override": "DELETE"}, None, 403),
    ("override-conflict", "POST", f"{BASE}/Observation/1",
     {"X-HTTP-Method-Override": "DELETE", "X-Method-Override": "PUT"}, b"", 403),
    ("_method-query", "POST", f"{BASE}/Observation?_method=DELETE", {}, json.dumps(OBS).encode(), 403),
    ("lowercase-type", "GET", f"{BASE}/observation/1", {}, None, 403),
    ("unknown-type", "GET", f"{BASE}/Foo/1", {}, None, 403),
    ("encoded-slash", "GET", f"{BASE}/Observation%2F1", {}, None, 403),
    ("dot-dot", "GET", f"{BASE}/Observation/../Patient/1", {}, None, 403),
    ("encoded-dots", "GET", f"{BASE}/Observation/%2e%2e/Patient", {}, None, 403),
    ("double-slash", "GET", f"{BASE}//Observation/1", {}, None, 403),
    ("matrix-param", "GET", f"{BASE}/Observation;x=1/1", {}, None, 403),
    ("double-encoding", "GET", f"{BASE}/Observation/%25321", {}, None, 403),
    ("outside-base", "GET", "/admin/Observation/1", {}, None, 403),
    ("access-token-query", "GET", f"{BASE}/Observation/1?access_token=abc", {}, None, 403),
    ("cascade-delete", "DELETE", f"{BASE}/Observation/1?_cascade=delete", {}, None, 403),
    ("hard-delete", "DELETE", f"{BASE}/Observation/1?hardDelete=true", {}, None, 403),
    ("expunge", "POST", f"{BASE}/Observation/1/$expunge", {}, b"{}", 403),
    ("merge-op", "POST", f"{BASE}/Patient/$merge", {}, b'{"resourceType":"Parameters"}', 403),
    ("delete-op", "DELETE", f"{BASE}/Observation/1/$meta", {}, None, 403),
    ("unsupported-ctype", "POST", f"{BASE}/Observation", {"Content-Type": "application/xml"}, b"<x/>", 415),
    ("latin1-charset", "POST", f"{BASE}/Observation", {"Content-Type": "application/fhir+json; charset=latin-1"},
     json.dumps(OBS).encode(), 415),
    ("duplicate-keys", "POST", f"{BASE}/Observation", {}, b'{"resourceType":"Observation","status":"final","status":"x"}', 400),
    ("nested-duplicate", "POST", f"{BASE}/Observation", {},
     b'{"resourceType":"Observation","status":"final","code":{"text":"a","text":"b"}}', 400),
    ("nan", "POST", f"{BASE}/Observation", {}, b'{"resourceType":"Observation","status":"final","valueQuantity":{"value":NaN}}', 400),
    ("bom", "POST", f"{BASE}/Observation", {}, b'\xef\xbb\xbf' + json.dumps(OBS).encode(), 400),
    ("array-top", "POST", f"{BASE}/Observation", {}, b'[]', 400),
    ("type-mismatch", "POST", f"{BASE}/Observation", {}, json.dumps({**OBS, "resourceType": "Patient"}).encode(), 400),
    ("id-mismatch", "PUT", f"{BASE}/Observation/1", {}, json.dumps({**OBS, "id": "2"}).encode(), 400),
    ("invalid-fhir", "POST", f"{BASE}/Observation", {}, b'{"resourceType":"Observation","status":"final"}', 400),
    ("too-big", "POST", f"{BASE}/Observation", {}, b'{"resourceType":"Observation","x":"' + b"a" * 70000 + b'"}', 413),
    ("gzip-bomb", "POST", f"{BASE}/Observation", {"Content-Encoding": "gzip"},
     gzip.compress(b'{"resourceType":"Observation","x":"' + b"a" * 2_000_000 + b'"}'), 413),
    ("brotli", "POST", f"{BASE}/Observation", {"Content-Encoding": "br"}, b"\x00\x01", 415),
    ("upgrade", "GET", f"{BASE}/Observation/1", {"Upgrade": "websocket", "Connection": "Upgrade"}, None, 403),
    ("scope-denied", "POST", f"{BASE}/MedicationRequest", {},
     b'{"resourceType":"MedicationRequest","status":"active","intent":"order","subject":{"reference":"Patient/1"},'
     b'"medicationCodeableConcept":{"text":"x"}}', 403),
    ("reader-cannot-write", "POST", f"{BASE}/Observation", {"X-API-Key": READER_KEY}, json.dumps(OBS).encode(), 403),
    ("conditional-not-enabled", "PUT", f"{BASE}/Observation?identifier=x", {}, json.dumps(OBS).encode(), 403),
    ("bundle-other-host", "POST", BASE, {}, json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": OBS, "request": {"method": "POST", "url": "http://evil.example/fhir/Observation"}}]}).encode(), 403),
    ("bundle-document", "POST", BASE, {}, json.dumps({"resourceType": "Bundle", "type": "document"}).encode(), 403),
    ("no-credentials", "GET", f"{BASE}/Observation/1", {"X-API-Key": ""}, None, 401),
    ("bad-key", "GET", f"{BASE}/Observation/1", {"X-API-Key": "nope"}, None, 401),
    ("two-credentials", "GET", f"{BASE}/Observation/1", {"Authorization": "Bearer x.y.z"}, None, 401),
]


@pytest.mark.parametrize("name,method,target,extra,body,expected", HARDENING, ids=[h[0] for h in HARDENING])
def test_hardening_refused_and_never_upstream(sidecar, sandbox, name, method, target, extra, body, expected):
    headers = {"X-API-Key": WRITER_KEY}
    if body is not None:
        headers["Content-Type"] = JSON
    headers.update(extra)
    if headers.get("X-API-Key") == "":
        del headers["X-API-Key"]
    status, resp_headers, data = request(sidecar.port, method, target, body, headers)
    assert status == expected, data
    outcome = json.loads(data)
    assert outcome["resourceType"] == "OperationOutcome"
    assert resp_headers["x-correlation-id"] in outcome["issue"][0]["diagnostics"]
    if expected == 401:
        assert resp_headers["www-authenticate"].startswith('Bearer realm="fhir-sidecar"')
    assert sandbox.request_log() == []


@pytest.mark.parametrize("raw", [
    b"GET /fhir/R4/Observation/1 HTTP/1.1\r\nHost: x\r\nX-API-Key: writer-key-1\r\nIf-Match: W/\"1\"\r\nIf-Match: W/\"2\"\r\n\r\n",
    b"GET /fhir/R4/Observation/\xc3\xa9 HTTP/1.1\r\nHost: x\r\nX-API-Key: writer-key-1\r\n\r\n",
    b"GET /fhir/R4/Observation\\1 HTTP/1.1\r\nHost: x\r\nX-API-Key: writer-key-1\r\n\r\n",
    b"GET http://evil.example/fhir/R4/Observation/1 HTTP/1.1\r\nHost: evil.example\r\nX-API-Key: writer-key-1\r\n\r\n",
    b"GET /fhir/R4/Observation/1 HTTP/1.1\r\nHost: x\r\nX-API-Key: writer-key-1\r\nX-API-Key: reader-key-1\r\n\r\n",
], ids=["duplicate-if-match", "non-ascii", "backslash", "absolute-form-other-host", "duplicate-api-key"])
def test_raw_hardening(sidecar, sandbox, raw):
    status, _, _ = raw_exchange(sidecar.port, raw)
    assert status in (400, 403)
    assert sandbox.request_log() == []


def test_method_override_is_classified_and_forwarded_as_that_method(sidecar, sandbox):
    status, _, _ = request(sidecar.port, "PUT", f"{BASE}/Observation/ov1", json.dumps({**OBS, "id": "ov1"}).encode(), wh())
    assert status in (200, 201)
    sandbox.clear_log()
    # the reader may not delete: an override to DELETE is judged as a delete
    status, _, _ = request(sidecar.port, "POST", f"{BASE}/Observation/ov1", b"",
                           {"X-API-Key": READER_KEY, "X-HTTP-Method-Override": "DELETE"})
    assert status == 403 and sandbox.request_log() == []
    status, _, _ = request(sidecar.port, "POST", f"{BASE}/Observation/ov1", b"",
                           {"X-API-Key": WRITER_KEY, "X-HTTP-Method-Override": "DELETE"})
    assert status in (200, 204)
    log = sandbox.request_log()
    assert [(e["method"], e["action"]) for e in log] == [("GET", "read"), ("DELETE", "delete")]  # prior state, then the write
    assert "x-http-method-override" not in log[1]["headers"]
    assert log[1]["headers"]["if-match"] == log[0].get("etag", 'W/"1"')


def test_header_hygiene(sidecar, sandbox):
    status, _, _ = request(sidecar.port, "GET", f"{BASE}/Observation?_count=1", None, {
        "X-API-Key": READER_KEY, "X-Forwarded-For": "10.9.9.9", "Forwarded": "for=10.9.9.9",
        "X-Original-URL": "/admin", "X-Tenant-ID": "other", "Cookie": "a=b", "Accept": JSON})
    assert status == 200
    h = sandbox.request_log()[0]["headers"]
    assert h["x-forwarded-for"] == "127.0.0.1"
    for dropped in ("forwarded", "x-original-url", "x-tenant-id", "cookie", "x-api-key"):
        assert dropped not in h
    assert h["accept"] == JSON


def test_public_metadata_without_credentials(sidecar, sandbox):
    status, _, data = request(sidecar.port, "GET", f"{BASE}/metadata")
    assert status == 200 and json.loads(data)["resourceType"] == "CapabilityStatement"


def test_write_operation_needs_listing(sidecar, sandbox):
    params = b'{"resourceType":"Parameters"}'
    status, _, _ = request(sidecar.port, "POST", f"{BASE}/Observation/1/$meta-add", params, wh())
    assert status == 403  # demo-writer does not list $meta-add
    status, _, data = request(sidecar.port, "POST", f"{BASE}/Observation/1/$meta-add", params, wh(OPS_KEY))
    assert status == 403 and b"policy" in data  # listed for scribe-app, but the policy does not allow it
    assert sandbox.request_log() == []


def test_sighup_reload_keeps_old_config_when_new_is_bad(sidecar, sandbox):
    good = sidecar.cfg_path.read_text()
    sidecar.cfg_path.write_text(good + "\nnot_a_key: 1\n")
    sidecar.signal(signal.SIGHUP)
    time.sleep(0.5)
    status, _, _ = request(sidecar.port, "GET", f"{BASE}/Observation?_count=1", None, {"X-API-Key": READER_KEY})
    assert status == 200
    out = (sidecar.cfg_path.parent / "sidecar.stdout").read_text()
    assert "reload refused" in out
    sidecar.cfg_path.write_text(good)


CANARY_NAME = "Zebulon Quixbyrne"
CANARY_SSN = "987-65-4329"
CANARY_NOTE = "canary-note-7741"


def test_canary_phi_never_reaches_the_logs_or_audit(sidecar, sandbox):
    patient = {"resourceType": "Patient", "id": "canary1", "name": [{"text": CANARY_NAME, "family": "Quixbyrne"}],
               "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": CANARY_SSN}],
               "text": {"status": "generated", "div": f"<div xmlns=\"http://www.w3.org/1999/xhtml\">{CANARY_NOTE}</div>"}}
    body = json.dumps(patient).encode()
    # allowed (demo-writer may not write Patient: scope deny), invalid, upstream error, query values
    request(sidecar.port, "PUT", f"{BASE}/Patient/canary1", body, wh())
    request(sidecar.port, "POST", f"{BASE}/Observation", json.dumps({**OBS, "note": [{"text": CANARY_NOTE}]}).encode(), wh())
    request(sidecar.port, "POST", f"{BASE}/Observation", b'{"resourceType":"Observation","bogus":"' + CANARY_NAME.encode() + b'"}', wh())
    request(sidecar.port, "GET", f"{BASE}/Patient?name={CANARY_NAME.replace(' ', '+')}&identifier={CANARY_SSN}", None,
            {"X-API-Key": READER_KEY})
    request(sidecar.port, "GET", f"{BASE}/Patient/{CANARY_SSN}", None, {"X-API-Key": READER_KEY})
    request(sidecar.port, "GET", f"{BASE}/Observation/1", None, {"X-API-Key": CANARY_NAME})
    sandbox.set_faults(status=500)
    request(sidecar.port, "POST", f"{BASE}/Observation", json.dumps({**OBS, "note": [{"text": CANARY_NOTE}]}).encode(), wh())
    sandbox.set_faults()
    time.sleep(0.3)
    folder = sidecar.cfg_path.parent
    for f in folder.rglob("*"):
        if f.is_file() and f.name != "sidecar.yaml":
            text = f.read_text(errors="replace")
            for canary in (CANARY_NAME, "Quixbyrne", "Zebulon", CANARY_SSN, CANARY_NOTE, WRITER_KEY, READER_KEY):
                assert canary not in text, f"{canary!r} found in {f.name}"


def test_shadow_client_forwards_and_logs_would_deny_but_scopes_still_enforced(sidecar, sandbox):
    status, _, _ = request(sidecar.port, "POST", f"{BASE}/Observation", json.dumps(OBS).encode(), wh(SHADOW_KEY))
    assert status == 201
    time.sleep(0.2)
    out = (sidecar.cfg_path.parent / "sidecar.stdout").read_text()
    assert any('"would_deny": true' in line and "shadow-app" in line for line in out.splitlines())
    # shadow never relaxes scopes: shadow-app has no 'u'
    status, _, _ = request(sidecar.port, "PUT", f"{BASE}/Observation/x1", json.dumps({**OBS, "id": "x1"}).encode(),
                           wh(SHADOW_KEY))
    assert status == 403
    assert [e["action"] for e in sandbox.request_log()] == ["create"]


def test_prior_state_update_forwards_if_match_of_the_version_read(sidecar, sandbox):
    put = lambda body, **h: request(sidecar.port, "PUT", f"{BASE}/Observation/ps1", json.dumps(body).encode(), wh(**h))
    assert put({**OBS, "id": "ps1"})[0] == 201  # creates (demo-writer has c)
    assert put({**OBS, "id": "ps1", "status": "amended"})[0] == 200
    sandbox.clear_log()
    # a stale If-Match is answered 412 here: a stale update never becomes a lost update
    status, _, data = put({**OBS, "id": "ps1", "status": "corrected"}, **{"If-Match": 'W/"1"'})
    assert status == 412, data
    assert [e["action"] for e in sandbox.request_log()] == ["read"]
    sandbox.clear_log()
    status, _, _ = put({**OBS, "id": "ps1", "status": "corrected"}, **{"If-Match": 'W/"2"'})
    assert status == 200
    log = sandbox.request_log()
    assert [e["action"] for e in log] == ["read", "update"]
    assert log[1]["headers"]["if-match"] == 'W/"2"'


def test_json_patch_is_applied_to_current_and_the_result_validated(sidecar, sandbox):
    assert request(sidecar.port, "PUT", f"{BASE}/Observation/pt1", json.dumps({**OBS, "id": "pt1"}).encode(), wh())[0] == 201
    patch = lambda ops: request(sidecar.port, "PATCH", f"{BASE}/Observation/pt1", json.dumps(ops).encode(),
                                wh(**{"Content-Type": "application/json-patch+json"}))
    sandbox.clear_log()
    assert patch([{"op": "replace", "path": "/status", "value": "amended"}])[0] == 200
    assert [e["action"] for e in sandbox.request_log()] == ["read", "patch"]
    sandbox.clear_log()
    # the result would be invalid FHIR: refused before anything is written
    assert patch([{"op": "remove", "path": "/code"}])[0] == 400
    assert patch([{"op": "replace", "path": "/id", "value": "other"}])[0] == 422
    assert patch([{"op": "replace", "path": "/nope/x", "value": 1}])[0] == 422
    assert [e["action"] for e in sandbox.request_log()] == ["read", "read", "read"]
    fhirpath = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Observation.subject"}]}]}
    status, _, _ = request(sidecar.port, "PATCH", f"{BASE}/Observation/pt1", json.dumps(fhirpath).encode(), wh())
    assert status == 403
