"""Recording (sidecar.recording): what reaches the flow file, and what does not.

Synthetic requests go through `Recorder.record` (the adapter's call); the file is then scanned
byte for byte for canary PHI and credentials, read back with the key, and with the wrong one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mitmproxy import io as mio
from pydantic import ValidationError

from sidecar import recording
from sidecar.config import parse_config
from sidecar.errors import Refusal, deny, unavailable
from sidecar.identity import Principal, principal_for
from sidecar.pipeline import Decision
from sidecar.prior import Prior
from sidecar.recording import (
    Recorder,
    RecordingConfig,
    RecordingError,
    RecordingKeyError,
    key_id,
    read_recording,
    record_decision,
    recording_key,
    recording_key_from_secret,
    summarize_decision,
)
from sidecar.request import RawRequest
from sidecar.scopes import ScopeSet

AUDIT_SECRET = "recording-test-audit-key-0123456789abcdef"
API_KEY = "live-api-key-7f3c9e1d2b"
BEARER = "eyJhbGciOiJSUzI1NiJ9.eyJjbGllbnRfaWQiOiJzbWFydCJ9.c2lnbmF0dXJlLWNhbmFyeQ"
COOKIE = "session=cookie-canary-55aa"
CANARY_NAME = "Zebulon Quixote-Canary"
MRN = "MRN-48151623"
PATIENT_ID = "pat-canary-0042"
FHIR_USER = "Patient/user-canary-0042"
WHEN = datetime(2026, 3, 4, 23, 30, 5, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("REC_TEST_AUDIT_KEY", AUDIT_SECRET)


def cfg(**rec):
    data = {
        "upstream": {"url": "http://127.0.0.1:9/fhir/R4"},
        "clients": [{"id": "writer", "auth": "api-key", "api_key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                     "scopes": ["system/Observation.cruds", "system/Patient.rs"]}],
        "audit": {"key": "env:REC_TEST_AUDIT_KEY"},
        "policy": {"engine": "off"},
    }
    c = parse_config(data)
    return c


def key() -> bytes:
    return recording_key_from_secret(AUDIT_SECRET.encode())


def writer() -> Principal:
    return principal_for(cfg().clients[0])


def patient_app() -> Principal:
    return Principal("smart", "bearer", ScopeSet.from_strings(["patient/Observation.rs"]), ("system", "patient"),
                     tenant="t1", user=FHIR_USER, patient=PATIENT_ID)


def obs_body() -> bytes:
    return json.dumps({"resourceType": "Observation", "status": "final",
                       "code": {"text": "heart rate"}, "subject": {"reference": f"Patient/{PATIENT_ID}",
                                                                  "display": CANARY_NAME},
                       "identifier": [{"value": MRN}]}).encode()


def summary(decision="allow", interaction="create", rtype="Observation", write=True, reasons=(), status=201):
    return {"decision": decision, "interaction": interaction, "resource_type": rtype, "write": write,
            "reasons": list(reasons), "status": status, "correlation_id": "corr-0001-abcd", "runtime": False}


def requests() -> list[dict]:
    create = RawRequest("POST", b"/fhir/R4/Observation", (
        ("x-api-key", API_KEY), ("content-type", "application/fhir+json"), ("cookie", COOKIE),
        ("x-provenance", json.dumps({"agent": CANARY_NAME}))), obs_body(), host="127.0.0.1:8080")
    search = RawRequest("GET", f"/fhir/R4/Patient?identifier={MRN}&name={CANARY_NAME.replace(' ', '%20')}".encode(),
                        (("authorization", f"Bearer {BEARER}"), ("proxy-authorization", f"Basic {API_KEY}")), b"")
    token_in_url = RawRequest("GET", f"/fhir/R4/Observation?access_token={BEARER}&patient={PATIENT_ID}".encode(),
                              (), b"")
    current = {"resourceType": "Observation", "id": "9", "status": "preliminary", "meta": {"versionId": "3"},
               "note": [{"text": f"seen by {CANARY_NAME}"}]}
    update = RawRequest("PUT", b"/fhir/R4/Observation/9", (("x-api-key", API_KEY),
                        ("content-type", "application/fhir+json"), ("if-match", 'W/"3"')), obs_body())
    return [
        dict(raw=create, decision_summary=summary(), principal=writer(), current=None, when=WHEN, status=201),
        dict(raw=search, decision_summary=summary("deny", "search-type", "Patient", False,
                                                  ["scope does not grant 's' on Patient for search-type"], 403),
             principal=patient_app(), current=None, when=WHEN, status=403),
        dict(raw=token_in_url, decision_summary=summary("deny", None, None, None, ["access_token in query refused"], 403),
             principal=None, current=None, when=WHEN, status=403),
        dict(raw=update, decision_summary=summary("allow", "update", "Observation", True), principal=writer(),
             current=current, when=WHEN, status=200, prior_read=True, etag='W/"3"'),
    ]


async def record_all(path: Path, items: list[dict], **rc) -> Recorder:
    r = Recorder(RecordingConfig(path=str(path), **rc), key(), path.parent)
    for it in items:
        r.record(**it)
    await r.close()
    return r


async def test_the_file_holds_no_phi_and_no_credential(tmp_path):
    path = tmp_path / "rec.flows"
    r = await record_all(path, requests())
    assert r.stats == {"recorded": 4, "filtered": 0, "dropped": 0, "errors": 0}
    data = path.read_bytes()
    assert len(data) > 1000
    for secret in (CANARY_NAME, CANARY_NAME.replace(" ", "%20"), MRN, PATIENT_ID, FHIR_USER, API_KEY, BEARER,
                   COOKIE, "cookie-canary", "heart rate", "seen by", "/Observation/9", AUDIT_SECRET):
        assert secret.encode() not in data, secret
    assert key() not in data


async def test_clear_fields_are_readable_without_the_key(tmp_path):
    path = tmp_path / "rec.flows"
    await record_all(path, requests())
    with open(path, "rb") as f:
        flows = list(mio.FlowReader(f).stream())
    assert len(flows) == 4
    first = flows[0]
    assert first.request.method == "POST" and first.request.pretty_url == "http://recording.invalid/Observation"
    assert list(first.request.headers.keys()) == ["content-type"]
    assert first.response.status_code == 201 and first.response.content == b""
    meta = first.metadata[recording.META]
    assert {k: meta[k] for k in ("method", "interaction", "resource_type", "client_id", "decision", "status", "write")} == {
        "method": "POST", "interaction": "create", "resource_type": "Observation", "client_id": "writer",
        "decision": "allow", "status": 201, "write": True}
    assert meta["time"] == "2026-03-04T23:30:05Z" and first.request.timestamp_start == WHEN.timestamp()
    assert flows[2].metadata[recording.META]["client_id"] is None   # no verified identity


async def test_read_back_with_the_key(tmp_path):
    path = tmp_path / "rec.flows"
    await record_all(path, requests())
    recs = list(read_recording(path, key()))
    assert [r.index for r in recs] == [0, 1, 2, 3]
    create, search, token_in_url, update = recs
    assert create.raw.body == obs_body() and create.raw.method == "POST" and create.raw.target == b"/fhir/R4/Observation"
    assert dict(create.raw.headers)["x-api-key"] == "[stripped]" and dict(create.raw.headers)["cookie"] == "[stripped]"
    assert dict(create.raw.headers)["x-provenance"] == json.dumps({"agent": CANARY_NAME})   # sealed, not stripped
    assert create.raw.host == "127.0.0.1:8080"
    assert create.time == WHEN and create.write and create.interaction == "create"
    assert create.identity.client_id == "writer" and create.identity.auth == "api-key"
    assert create.identity.scopes == ("system/Observation.cruds", "system/Patient.rs")
    assert create.live == {"decision": "allow", "reasons": [], "status": 201, "runtime": False}
    assert search.raw.target.startswith(b"/fhir/R4/Patient?identifier=" + MRN.encode())
    assert dict(search.raw.headers) == {"authorization": "[stripped]", "proxy-authorization": "[stripped]"}
    assert search.identity.patient == PATIENT_ID and search.identity.user == FHIR_USER
    assert search.identity.contexts == ("system", "patient") and search.identity.tenant == "t1"
    assert search.live["reasons"] == ["scope does not grant 's' on Patient for search-type"]
    assert token_in_url.raw.target == f"/fhir/R4/Observation?access_token=[stripped]&patient={PATIENT_ID}".encode()
    assert token_in_url.identity is None
    assert update.current["status"] == "preliminary" and update.prior_read is True and update.etag == 'W/"3"'


async def test_wrong_key_fails_clearly(tmp_path):
    path = tmp_path / "rec.flows"
    await record_all(path, requests()[:1])
    other = recording_key_from_secret(b"another-secret-that-is-long-enough-0123")
    with pytest.raises(RecordingKeyError) as e:
        list(read_recording(path, other))
    msg = str(e.value)
    assert "wrong key" in msg and key_id(key()) in msg and key_id(other) in msg
    with pytest.raises(RecordingError, match="32 bytes"):
        list(read_recording(path, b"short"))


async def test_tampering_is_detected(tmp_path):
    path = tmp_path / "rec.flows"
    await record_all(path, requests()[:2])
    with open(path, "rb") as f:
        flows = list(mio.FlowReader(f).stream())
    flows[0].metadata[recording.META]["decision"] = "deny"       # a clear field edited
    out = tmp_path / "edited.flows"
    with open(out, "wb") as f:
        w = mio.FlowWriter(f)
        for fl in flows:
            w.add(fl)
    with pytest.raises(RecordingError, match="flow 0 does not authenticate"):
        list(read_recording(out, key()))
    data = bytearray(path.read_bytes())
    i = data.index(b"FSR1") + 40
    data[i] ^= 1                                                  # a ciphertext byte flipped
    bad = tmp_path / "flipped.flows"
    bad.write_bytes(bytes(data))
    with pytest.raises(RecordingError):
        list(read_recording(bad, key()))


def test_a_plain_mitmproxy_capture_is_not_a_recording(tmp_path):
    from mitmproxy.test import tflow

    path = tmp_path / "plain.flows"
    with open(path, "wb") as f:
        mio.FlowWriter(f).add(tflow.tflow(resp=True))
    with pytest.raises(RecordingError, match="not a fhir-sidecar recording"):
        list(read_recording(path, key()))


async def test_torn_tail_raises_or_stops(tmp_path):
    path = tmp_path / "rec.flows"
    await record_all(path, requests()[:2])
    with open(path, "ab") as f:
        f.write(b"1234:{partial")
    with pytest.raises(RecordingError, match="unreadable after 2 flows"):
        list(read_recording(path, key()))
    seen: list[int] = []
    assert len(list(read_recording(path, key(), on_torn_tail=seen.append))) == 2 and seen == [2]


async def test_append_only_across_restarts_and_private_file(tmp_path):
    path = tmp_path / "sub" / "rec.flows"
    await record_all(path, requests()[:1])
    await record_all(path, requests()[1:3])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [r.index for r in read_recording(path, key())] == [0, 1, 2]


async def test_filters_clients_and_writes_only(tmp_path):
    r = await record_all(tmp_path / "a.flows", requests(), clients=["writer"])
    assert r.stats["recorded"] == 2 and r.stats["filtered"] == 2
    assert {x.identity.client_id for x in read_recording(tmp_path / "a.flows", key())} == {"writer"}
    r = await record_all(tmp_path / "b.flows", requests(), writes_only=True)
    # the create and the update; the search says write=False; the third is a GET without a classification
    assert [x.method for x in read_recording(tmp_path / "b.flows", key())] == ["POST", "PUT"]


async def test_record_never_raises_and_counts(tmp_path, monkeypatch):
    path = tmp_path / "rec.flows"
    r = Recorder(RecordingConfig(path=str(path)), key(), tmp_path)
    r.record(raw=None, decision_summary={}, principal=None, current=None, when=WHEN, status=None)  # type: ignore[arg-type]
    assert r.stats["errors"] == 1
    bad = dict(requests()[0], current={"x": object()})   # cannot be serialised: fails on the writer thread
    r.record(**bad)
    await r.close()
    assert r.stats["errors"] == 2 and r.stats["recorded"] == 0
    r.record(**requests()[0])                                      # after close: dropped
    assert r.stats["dropped"] == 1
    await r.close()                                                # twice is fine


async def test_bounded_queue_drops_instead_of_growing(tmp_path, monkeypatch):
    gate = threading.Event()
    real = recording.make_record

    def slow(*a, **kw):
        gate.wait(5)
        return real(*a, **kw)

    monkeypatch.setattr(recording, "make_record", slow)
    r = Recorder(RecordingConfig(path=str(tmp_path / "rec.flows"), max_pending=2), key(), tmp_path)
    t = time.perf_counter()
    for _ in range(10):
        r.record(**requests()[0])
    assert time.perf_counter() - t < 0.5          # the caller never waits for the writer
    assert r.stats["dropped"] >= 7
    gate.set()
    await r.close()
    assert r.stats["recorded"] + r.stats["dropped"] == 10
    assert len(list(read_recording(tmp_path / "rec.flows", key()))) == r.stats["recorded"]


async def test_max_bytes_stops_recording(tmp_path):
    r = Recorder(RecordingConfig(path=str(tmp_path / "rec.flows"), max_bytes=100), key(), tmp_path)
    r.record(**requests()[0])
    for _ in range(100):
        if r.stats["recorded"]:
            break
        await asyncio.sleep(0.05)
    r.record(**requests()[0])
    await r.close()
    assert r.stats["recorded"] == 1 and r.stats["dropped"] == 1


def test_keys():
    c = cfg()
    k = recording_key(c, Path("."))
    assert k == recording_key_from_secret(AUDIT_SECRET.encode()) and len(k) == 32 and k != AUDIT_SECRET.encode()[:32]
    os.environ["REC_TEST_OWN_KEY"] = "an-explicit-recording-secret-0123456789"
    try:
        assert recording_key(c, Path("."), key_ref="env:REC_TEST_OWN_KEY") == recording_key_from_secret(
            b"an-explicit-recording-secret-0123456789")
        os.environ["REC_TEST_OWN_KEY"] = "short"
        with pytest.raises(RecordingError, match="at least 32"):
            recording_key(c, Path("."), key_ref="env:REC_TEST_OWN_KEY")
    finally:
        del os.environ["REC_TEST_OWN_KEY"]
    with pytest.raises(RecordingError, match="not set"):
        recording_key(c, Path("."), key_ref="env:REC_TEST_MISSING")


def test_config_model():
    rc = RecordingConfig.model_validate({"path": "rec.flows", "key": "env:X", "clients": ["a"], "writes_only": True,
                                         "strip_headers": ["X-EHR-Token"]})
    assert rc.strip_headers == ["x-ehr-token"]
    with pytest.raises(ValidationError):
        RecordingConfig.model_validate({"path": "x", "typo": 1})
    with pytest.raises(ValidationError):
        RecordingConfig.model_validate({"path": "x", "key": "inline-secret"})
    recording.check_recording_clients(rc, ["a", "b"])
    with pytest.raises(ValueError, match="unknown clients: a"):
        recording.check_recording_clients(rc, ["b"])


async def test_extra_strip_headers(tmp_path):
    raw = RawRequest("POST", b"/fhir/R4/Observation", (("x-ehr-token", "tok-canary-123"),
                     ("content-type", "application/fhir+json")), obs_body())
    path = tmp_path / "rec.flows"
    await record_all(path, [dict(requests()[0], raw=raw)], strip_headers=["X-EHR-Token"])
    assert dict(next(read_recording(path, key())).raw.headers)["x-ehr-token"] == "[stripped]"


def test_summarize_decision():
    who = writer()
    ok = Decision("corr-1234abcd", "", 0.0, principal=who)
    assert summarize_decision(ok, 201) == {"decision": "allow", "reasons": [], "status": 201, "runtime": False,
                                           "write": None, "interaction": None, "resource_type": None,
                                           "correlation_id": "corr-1234abcd"}
    s = summarize_decision(Decision("c", "", 0.0, deny("scope does not grant 'c' on Observation for create")), 403)
    assert s["decision"] == "deny" and s["status"] == 403 and not s["runtime"]
    for refusal in (unavailable("kill switch engaged", 30), Refusal(429, "rate limit exceeded for this client's writes"),
                    Refusal(409, "a request with this Idempotency-Key is still in flight", "conflict"),
                    deny("this listener requires TLS"), Refusal(502, "EHR returned another resource", "transient")):
        assert summarize_decision(Decision("c", "", 0.0, refusal), refusal.status)["runtime"], refusal
    assert summarize_decision(Decision("c", "", 0.0, Refusal(403, "held for review x", decision="review")), 403)["decision"] == "review"


async def test_record_decision_helper(tmp_path):
    r = Recorder(RecordingConfig(path=str(tmp_path / "rec.flows")), key(), tmp_path)
    d = Decision("corr-1234abcd", "", 0.0, principal=writer(), prior=Prior({"resourceType": "Observation", "id": "9"}, 'W/"1"'))
    record_decision(r, requests()[3]["raw"], d, 200, WHEN)
    record_decision(r, None, d, 200, WHEN)          # nothing to record: ignored
    record_decision(None, requests()[3]["raw"], d, 200, WHEN)
    await r.close()
    (rec,) = list(read_recording(tmp_path / "rec.flows", key()))
    assert rec.current == {"resourceType": "Observation", "id": "9"} and rec.prior_read and rec.etag == 'W/"1"'
    assert rec.correlation_id == "corr-1234abcd" and rec.live["status"] == 200


async def test_only_real_type_names_are_kept_in_clear(tmp_path):
    path = tmp_path / "rec.flows"
    raw = RawRequest("GET", b"/fhir/R4/ZebulonQuixote", (), b"")
    await record_all(path, [dict(requests()[0], raw=raw, decision_summary=summary(
        "deny", None, "ZebulonQuixote", False, ["unknown resource type"], 403))])
    assert b"ZebulonQuixote" not in path.read_bytes()
    assert next(read_recording(path, key())).resource_type is None
