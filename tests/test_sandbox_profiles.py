"""EHR behaviour profiles of the sandbox (`sidecar/sandbox/profiles.py`), alone and behind the
real sidecar where the sidecar's behaviour depends on them.

The sandbox's request log stays the witness: `method` is what arrived on the wire,
`effective_method`/`override` what a profile that honours method overrides made of it.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from sidecar.sandbox import PROFILES, SandboxServer, resolve_profile
from tests.harness import READER_KEY, WRITER_KEY, SidecarProcess, make_config, request

BASE = "/fhir/R4"
JSON = "application/fhir+json"


def obs(oid: str | None = None, patient: str = "p1", **extra: Any) -> dict[str, Any]:
    o: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                         "subject": {"reference": f"Patient/{patient}"}, **extra}
    if oid:
        o["id"] = oid
    return o


def direct(sandbox: SandboxServer, method: str, path: str, body: Any = None,
           headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """Straight to the sandbox (no sidecar)."""
    conn = http.client.HTTPConnection("127.0.0.1", sandbox.port, timeout=10)
    try:
        h = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.setdefault("Content-Type", JSON)
        conn.request(method, BASE + path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else None
    finally:
        conn.close()


# -- the profiles as data ------------------------------------------------------------------

def test_every_profile_resolves_and_describes_itself() -> None:
    assert {"default", "oracle", "strong-etag", "chart-locked", "encounter-closed", "patient-merged",
            "rate-limited", "slow", "timeout", "flaky", "method-override"} <= set(PROFILES)
    for name, spec in PROFILES.items():
        p = resolve_profile(name)
        assert p.name == name and spec["description"]
        info = p.as_dict()
        assert json.loads(json.dumps(info)) == info  # the control plane can serve it


@pytest.mark.parametrize("spec", [
    {"conflict_status": 200}, {"etag": "medium"}, {"bogus": 1}, {"extends": "nope"},
    {"rate_limit": {"requests": -1}}, {"bursts": {"every": 2, "length": 3}},
    {"method_override": ["x-foo"]}, {"merged_patients": {"a": "a"}}, {"faults": {"hang": "yes"}},
    {"seed": [{"id": "x"}]}, {"concurrent_writer": 1},
])
def test_bad_profiles_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        resolve_profile(spec)


def test_profiles_compose_by_name_and_extends() -> None:
    p = resolve_profile("oracle,chart-locked")
    assert p.conflict_status == 409 and p.locked_patients == {"locked-1"}
    q = resolve_profile({"extends": "oracle", "concurrent_writer": True, "name": "oracle-race"})
    assert q.name == "oracle-race" and q.conflict_status == 409 and q.concurrent_writer


def test_cli_lists_profiles_and_refuses_unknown_ones() -> None:
    out = subprocess.run([sys.executable, "-m", "sidecar.sandbox", "--list-profiles"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "oracle" in out.stdout and "method-override" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "sidecar.sandbox", "--profile", "nope"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown profile" in bad.stderr


def test_cli_serves_the_profile() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.sandbox", "--profile", "oracle", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        port = int(base.split(":")[2].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/_sandbox/profile")
        info = json.loads(conn.getresponse().read())
        conn.close()
        assert info["name"] == "oracle" and info["conflict_status"] == 409
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- each profile, straight at the sandbox ---------------------------------------------------

@pytest.fixture
def sb():
    s = SandboxServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def test_default_conflict_is_412_with_weak_etags(sb: SandboxServer) -> None:
    status, h, _ = direct(sb, "PUT", "/Observation/c1", obs("c1"))
    assert status == 201 and h["etag"] == 'W/"1"'
    assert direct(sb, "PUT", "/Observation/c1", obs("c1"), {"If-Match": 'W/"9"'})[0] == 412


def test_oracle_conflict_is_409(sb: SandboxServer) -> None:
    sb.set_profile("oracle")
    assert direct(sb, "PUT", "/Observation/c1", obs("c1"))[0] == 201
    status, _, body = direct(sb, "PUT", "/Observation/c1", obs("c1"), {"If-Match": 'W/"9"'})
    assert status == 409 and body["issue"][0]["code"] == "conflict"
    assert direct(sb, "PATCH", "/Observation/c1", b'[{"op":"replace","path":"/status","value":"amended"}]',
                  {"Content-Type": "application/json-patch+json", "If-Match": 'W/"7"'})[0] == 409
    assert direct(sb, "DELETE", "/Observation/c1", None, {"If-Match": 'W/"7"'})[0] == 409
    assert direct(sb, "PUT", "/Observation/c1", obs("c1"), {"If-Match": 'W/"1"'})[0] == 200


def test_strong_etags_compare_strongly_and_require_if_match(sb: SandboxServer) -> None:
    sb.set_profile("strong-etag")
    status, h, _ = direct(sb, "PUT", "/Observation/s1", obs("s1"))  # creating needs no If-Match
    assert status == 201 and h["etag"] == '"1"'
    assert direct(sb, "PUT", "/Observation/s1", obs("s1"))[0] == 428
    assert direct(sb, "PUT", "/Observation/s1", obs("s1"), {"If-Match": 'W/"1"'})[0] == 412
    status, h, _ = direct(sb, "PUT", "/Observation/s1", obs("s1"), {"If-Match": '"1"'})
    assert status == 200 and h["etag"] == '"2"'
    _, _, hist = direct(sb, "GET", "/Observation/s1/_history")
    assert [e["response"]["etag"] for e in hist["entry"]] == ['"2"', '"1"']


def test_chart_locked(sb: SandboxServer) -> None:
    sb.set_profile("chart-locked")
    assert direct(sb, "GET", "/Patient/locked-1")[0] == 200  # reads work
    status, _, body = direct(sb, "PUT", "/Observation/locked-obs-1", obs("locked-obs-1", "open-1"))
    assert status == 423 and body["issue"][0]["code"] == "lock-error"  # the stored version is locked
    assert direct(sb, "POST", "/Observation", obs(None, "locked-1"))[0] == 423
    assert direct(sb, "DELETE", "/Patient/locked-1")[0] == 423
    assert direct(sb, "POST", "/Observation", obs(None, "open-1"))[0] == 201
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs(None, "open-1"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs(None, "locked-1"), "request": {"method": "POST", "url": "Observation"}}]}
    status, _, body = direct(sb, "POST", "", tx)
    assert status == 423 and "rolled back" in body["issue"][0]["diagnostics"]
    sb.set_profile({"extends": "chart-locked", "locked_status": 409})
    assert direct(sb, "POST", "/Observation", obs(None, "locked-1"))[0] == 409


def test_encounter_closed(sb: SandboxServer) -> None:
    sb.set_profile("encounter-closed")
    closed = obs(None, encounter={"reference": "Encounter/enc-closed"})
    assert direct(sb, "POST", "/Observation", closed)[0] == 422
    assert direct(sb, "POST", "/Observation", obs(None, encounter={"reference": "Encounter/enc-open"}))[0] == 201
    _, _, enc = direct(sb, "GET", "/Encounter/enc-closed")
    assert enc["status"] == "finished"
    assert direct(sb, "PUT", "/Encounter/enc-closed", enc)[0] == 422


def test_patient_merged(sb: SandboxServer) -> None:
    sb.set_profile("patient-merged")
    status, _, old = direct(sb, "GET", "/Patient/old-1")
    assert status == 200 and old["active"] is False
    assert old["link"] == [{"other": {"reference": "Patient/new-1"}, "type": "replaced-by"}]
    assert direct(sb, "PUT", "/Patient/old-1", old)[0] == 422
    assert direct(sb, "POST", "/Observation", obs(None, "old-1"))[0] == 422
    assert direct(sb, "POST", "/Observation", obs(None, "new-1"))[0] == 201


def test_rate_limited_answers_429_with_retry_after_and_executes_nothing(sb: SandboxServer) -> None:
    sb.set_profile({"extends": "rate-limited", "rate_limit": {"requests": 3, "window_s": 0.5, "retry_after": 1}})
    statuses = [direct(sb, "POST", "/Observation", obs())[0] for _ in range(5)]
    assert statuses == [201, 201, 201, 429, 429]
    status, h, body = direct(sb, "GET", "/Observation")
    assert status == 429 and h["retry-after"] == "1" and body["issue"][0]["code"] == "throttled"
    log = sb.request_log()
    assert [e["action"] for e in log[3:]] == ["fault:rate_limit"] * 3 and log[3]["classified"] == "create"
    time.sleep(0.55)
    _, _, found = direct(sb, "GET", "/Observation")
    assert found["total"] == 3  # the refused creates were never executed


def test_flaky_bursts_of_5xx(sb: SandboxServer) -> None:
    sb.set_profile({"extends": "flaky", "bursts": {"every": 4, "length": 2, "status": 502}})
    statuses = [direct(sb, "GET", "/metadata")[0] for _ in range(8)]
    assert statuses == [200, 200, 502, 502, 200, 200, 502, 502]


def test_slow_executes_then_answers_late(sb: SandboxServer) -> None:
    sb.set_profile("slow")
    started = time.monotonic()
    assert direct(sb, "GET", "/metadata")[0] == 200
    assert time.monotonic() - started >= 0.28


def test_changing_faults_releases_held_requests(sb: SandboxServer) -> None:
    sb.set_faults(hang=True)
    conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=5)
    conn.request("GET", BASE + "/metadata")
    time.sleep(0.2)
    started = time.monotonic()
    sb.set_faults()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        conn.getresponse()  # closed unanswered, promptly
    conn.close()
    assert time.monotonic() - started < 2


def test_timeout_profile_hangs_writes_only(sb: SandboxServer) -> None:
    sb.set_profile("timeout")
    assert direct(sb, "GET", "/metadata")[0] == 200
    with pytest.raises(TimeoutError):
        conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=0.5)
        try:
            conn.request("POST", BASE + "/Observation", body=json.dumps(obs()).encode(), headers={"Content-Type": JSON})
            conn.getresponse()
        finally:
            conn.close()
    assert sb.request_log()[-1]["action"] == "fault:hang"


def test_method_override_profile_honours_overrides_on_post_only(sb: SandboxServer) -> None:
    sb.set_profile("method-override")
    for oid in ("m1", "m2", "m3"):
        assert direct(sb, "PUT", f"/Observation/{oid}", obs(oid))[0] == 201
    sb.clear_log()
    assert direct(sb, "POST", "/Observation/m1", b"", {"X-HTTP-Method-Override": "DELETE"})[0] == 200
    assert direct(sb, "POST", "/Observation/m2?_method=DELETE", b"")[0] == 200
    assert direct(sb, "POST", "/Observation/m3", b"_method=delete",
                  {"Content-Type": "application/x-www-form-urlencoded"})[0] == 200
    assert direct(sb, "GET", "/Observation/m1", None, {"X-HTTP-Method-Override": "DELETE"})[0] == 410  # GET: not honoured
    log = sb.request_log()
    assert [(e["method"], e["effective_method"], e["override"], e["action"]) for e in log] == [
        ("POST", "DELETE", "x-http-method-override", "delete"),
        ("POST", "DELETE", "_method", "delete"),
        ("POST", "DELETE", "_method", "delete"),
        ("GET", "GET", None, "read"),
    ]
    sb.set_profile("default")  # the plain sandbox honours nothing
    assert direct(sb, "PUT", "/Observation/m4", obs("m4"))[0] == 201
    assert direct(sb, "POST", "/Observation/m4", b"", {"X-HTTP-Method-Override": "DELETE"})[0] != 200


def test_control_plane_switches_profiles(sb: SandboxServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sb.port, timeout=10)
    conn.request("POST", "/_sandbox/profile", body=json.dumps({"profile": "patient-merged"}))
    resp = conn.getresponse()
    info = json.loads(resp.read())
    assert resp.status == 200 and info["name"] == "patient-merged" and "Patient/old-1" in info["seed"]
    conn.request("POST", "/_sandbox/profile", body=json.dumps({"profile": "nope"}))
    resp = conn.getresponse()
    assert resp.status == 400 and "unknown profile" in json.loads(resp.read())["error"]
    conn.close()
    assert direct(sb, "GET", "/Patient/old-1")[0] == 200


def test_reset_restores_seed_and_initial_faults(sb: SandboxServer) -> None:
    sb.set_profile({"extends": "chart-locked", "faults": {"delay_ms": 1}})
    assert direct(sb, "DELETE", "/Observation/locked-obs-1")[0] == 423
    sb.set_faults()
    assert sb.faults()["delay_ms"] == 0
    sb.reset()
    assert sb.faults()["delay_ms"] == 1 and direct(sb, "GET", "/Observation/locked-obs-1")[0] == 200


# -- through the real sidecar ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    tmp = tmp_path_factory.mktemp("profiles")
    sc = SidecarProcess(make_config(tmp, sandbox.base_url, upstream={"url": sandbox.base_url, "timeout_s": 2}),
                        tmp).start()
    yield sc, sandbox
    sc.stop()
    sandbox.stop()


def via(sc: SidecarProcess, method: str, path: str, body: Any = None, key: str = WRITER_KEY,
        timeout: float = 10.0, **headers: str) -> tuple[int, dict[str, str], bytes]:
    h = {"X-API-Key": key, **headers}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.setdefault("Content-Type", JSON)
    return request(sc.port, method, BASE + path, data, h, timeout=timeout)



@pytest.mark.e2e
def test_sidecar_classifies_method_overrides_before_an_honouring_ehr(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile("method-override")
    assert direct(sandbox, "PUT", "/Observation/ov1", obs("ov1"))[0] == 201
    assert direct(sandbox, "PUT", "/Observation/ov2", obs("ov2"))[0] == 201
    sandbox.clear_log()
    # the reader (no `d`): refused as the DELETE it asks for; nothing reaches the EHR
    for headers in ({"X-HTTP-Method-Override": "DELETE"}, {"X-Method-Override": "DELETE"},
                    {"X-HTTP-Method-Override": "delete"}):
        status, _, data = via(sc, "POST", "/Observation/ov1", b"", READER_KEY, **headers)
        assert status == 403, data
        assert json.loads(data)["resourceType"] == "OperationOutcome"
    for target in ("/Observation/ov1?_method=DELETE",):
        assert via(sc, "POST", target, b"", READER_KEY)[0] == 403
        assert via(sc, "POST", target, b"", WRITER_KEY)[0] == 403  # `_method` is refused outright
    assert via(sc, "POST", "/Observation/ov1", b"_method=DELETE", WRITER_KEY,
               **{"Content-Type": "application/x-www-form-urlencoded"})[0] in (403, 415)
    assert sandbox.request_log() == []
    # the writer (has `d`): a real DELETE leaves, the override header does not
    status, _, data = via(sc, "POST", "/Observation/ov1", b"", WRITER_KEY, **{"X-HTTP-Method-Override": "DELETE"})
    assert status == 200, data
    log = sandbox.request_log()
    assert [(e["method"], e["action"]) for e in log] == [("GET", "read"), ("DELETE", "delete")]
    assert log[1]["override"] is None and log[1]["effective_method"] == "DELETE"
    assert not {"x-http-method-override", "x-method-override"} & set(log[1]["headers"])
    assert direct(sandbox, "GET", "/Observation/ov1")[0] == 410
    # an override to PUT on a POST with a body: forwarded as that PUT
    sandbox.clear_log()
    status, _, data = via(sc, "POST", "/Observation/ov2", obs("ov2", status="amended"), WRITER_KEY,
                          **{"X-Method-Override": "PUT"})
    assert status == 200, data
    assert [(e["method"], e["action"], e["override"]) for e in sandbox.request_log()] == [
        ("GET", "read", None), ("PUT", "update", None)]


@pytest.mark.e2e
def test_sidecar_passes_oracle_409_through_when_the_chart_changed_under_it(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile({"extends": "oracle", "concurrent_writer": True})
    assert direct(sandbox, "PUT", "/Observation/r1", obs("r1"))[0] == 201
    sandbox.clear_log()
    # the sidecar reads v1, another user saves v2, the sidecar's If-Match W/"1" conflicts
    status, _, data = via(sc, "PUT", "/Observation/r1", obs("r1", status="amended"))
    assert status == 409, data
    log = sandbox.request_log()
    assert [(e["action"], e["status"]) for e in log] == [("read", 200), ("update", 409)]
    assert log[1]["headers"]["if-match"] == 'W/"1"'
    assert json.loads(data)["resourceType"] == "OperationOutcome"


@pytest.mark.e2e
def test_sidecar_with_strong_etags(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile("strong-etag")
    assert direct(sandbox, "PUT", "/Observation/st1", obs("st1"))[0] == 201
    sandbox.clear_log()
    # without If-Match from the app the sidecar still sends the version it read: no 428
    assert via(sc, "PUT", "/Observation/st1", obs("st1", status="amended"))[0] == 200
    assert sandbox.request_log()[-1]["headers"]["if-match"] == '"1"'
    # the app's weak W/"2" names the same version: the sidecar forwards the strong tag it read
    status, _, data = via(sc, "PUT", "/Observation/st1", obs("st1", status="corrected"), **{"If-Match": 'W/"2"'})
    assert status == 200, data
    assert sandbox.request_log()[-1]["headers"]["if-match"] == '"2"'
    assert via(sc, "PUT", "/Observation/st1", obs("st1"), **{"If-Match": '"1"'})[0] == 412  # stale: refused by the sidecar
    assert sandbox.request_log()[-1]["action"] == "read"


@pytest.mark.e2e
@pytest.mark.parametrize("profile,body,status", [
    ("chart-locked", obs(None, "locked-1"), 423),
    ("encounter-closed", obs(None, encounter={"reference": "Encounter/enc-closed"}), 422),
    ("patient-merged", obs(None, "old-1"), 422),
])
def test_sidecar_passes_ehr_business_refusals_through(pair, profile, body, status) -> None:
    sc, sandbox = pair
    sandbox.set_profile(profile)
    got, headers, data = via(sc, "POST", "/Observation", body)
    assert got == status, data
    assert json.loads(data)["resourceType"] == "OperationOutcome" and headers["x-correlation-id"]
    assert [(e["action"], e["status"]) for e in sandbox.request_log()] == [("create", status)]


@pytest.mark.e2e
def test_sidecar_update_of_a_locked_chart(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile("chart-locked")
    status, _, data = via(sc, "PUT", "/Observation/locked-obs-1", obs("locked-obs-1", "locked-1", status="amended"))
    assert status == 423, data
    assert [e["action"] for e in sandbox.request_log()] == ["read", "update"]


@pytest.mark.e2e
def test_sidecar_times_out_on_a_hanging_ehr_write_with_504(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile("timeout")
    started = time.monotonic()
    status, _, data = via(sc, "POST", "/Observation", obs())
    assert status == 504, data
    assert time.monotonic() - started < 10
    assert [e["action"] for e in sandbox.request_log()] == ["fault:hang"]
    sandbox.set_profile("slow")
    assert via(sc, "POST", "/Observation", obs())[0] == 201  # 300 ms is within the sidecar's timeout


@pytest.mark.e2e
def test_sidecar_times_out_on_a_hanging_ehr_read(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile({"faults": {"hang": True, "methods": ["GET"]}, "name": "hang-reads"})
    started = time.monotonic()
    try:
        status, _, _ = via(sc, "GET", "/Observation", key=READER_KEY, timeout=6.0)
    except TimeoutError:
        status = None
    finally:
        sandbox.set_profile("default")  # releases the held request
    assert status == 504 and time.monotonic() - started < 5  # upstream.timeout_s is 2 here


@pytest.mark.e2e
def test_sidecar_holds_writes_while_the_ehr_rate_limit_lasts(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile({"extends": "rate-limited", "rate_limit": {"requests": 2, "window_s": 5, "retry_after": 2}})
    statuses = [via(sc, "POST", "/Observation", obs())[0] for _ in range(3)]
    assert statuses == [201, 201, 429]
    n = len(sandbox.request_log())
    status, headers, data = via(sc, "POST", "/Observation", obs())
    assert status == 429 and headers.get("retry-after"), data  # answered by the sidecar: it backs off
    assert json.loads(data)["issue"][0]["code"] == "throttled"
    assert len(sandbox.request_log()) == n
    assert via(sc, "GET", "/Observation", key=READER_KEY)[0] == 429  # reads are not held: the EHR answers
    assert len(sandbox.request_log()) == n + 1
    time.sleep(2.2)  # Retry-After passed
    sandbox.set_profile("default")
    assert via(sc, "POST", "/Observation", obs())[0] == 201


@pytest.mark.e2e
def test_sidecar_prior_state_read_answered_429_is_not_a_permanent_refusal(pair) -> None:
    """A write whose prior-state read the EHR throttles must not look forbidden (403)."""
    sc, sandbox = pair
    sandbox.set_profile("default")
    assert direct(sandbox, "PUT", "/Observation/rl1", obs("rl1"))[0] == 201
    sandbox.set_profile({"extends": "rate-limited", "rate_limit": {"requests": 0, "window_s": 1, "retry_after": 1}})
    status, _, data = via(sc, "PUT", "/Observation/rl1", obs("rl1", status="amended"))
    assert [e["action"] for e in sandbox.request_log()] == ["fault:rate_limit"]
    time.sleep(1.1)
    sandbox.set_profile("default")
    assert status in (429, 503), (status, data)


@pytest.mark.e2e
def test_sidecar_backs_off_after_a_5xx_burst_with_retry_after(pair) -> None:
    sc, sandbox = pair
    sandbox.set_profile({"extends": "flaky", "bursts": {"every": 3, "length": 1, "status": 503, "retry_after": 1}})
    assert [via(sc, "POST", "/Observation", obs())[0] for _ in range(3)] == [201, 201, 503]  # the EHR's burst
    n = len(sandbox.request_log())
    status, headers, _ = via(sc, "POST", "/Observation", obs())
    assert status == 503 and "retry-after" in headers and len(sandbox.request_log()) == n  # the sidecar held it
    time.sleep(1.1)
    assert via(sc, "POST", "/Observation", obs())[0] == 201
    sandbox.set_profile("default")
