"""SMART apps end to end: real RS256 tokens, scopes ∩ ceiling, patient context on writes, searches, reads."""

from __future__ import annotations

import json
from pathlib import Path
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.sandbox import SandboxServer
from tests.harness import SidecarProcess, make_config, request

pytestmark = pytest.mark.e2e
ISS, AUD = "https://auth.example.org", None  # AUD is the sidecar's upstream base, set per run
VITALS = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}
LAB = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}


def obs(patient: str, oid: str | None = None, category: dict = VITALS) -> dict:
    o = {"resourceType": "Observation", "status": "final", "category": [category],
         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
         "subject": {"reference": f"Patient/{patient}"}}
    if oid:
        o["id"] = oid
    return o


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def env(key, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smart")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    cfg = make_config(tmp, sandbox.base_url,
                      identity={"jwks": f"file:{tmp / 'jwks.json'}", "issuer": ISS, "audience": sandbox.base_url},
                      clients=[{"id": "smart-app", "auth": "bearer",
                                "scopes": ["patient/Observation.cruds", "patient/Patient.rs", "system/Observation.cruds"]}],
                      policy={"engine": "off"})
    sc = SidecarProcess(cfg, tmp).start()
    yield sc, sandbox
    sc.stop()
    sandbox.stop()


def token(key, aud: str, scope: str, patient: str | None = "p1", **over) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": aud, "exp": now + 300, "iat": now, "client_id": "smart-app", "scope": scope}
    if patient:
        claims["patient"] = patient
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def call(env, method, path, tok, body=None, **headers):
    sc, _ = env
    h = {"Authorization": f"Bearer {tok}", **headers}
    if body is not None:
        h.setdefault("Content-Type", "application/fhir+json")
    return request(sc.port, method, f"/fhir/R4{path}", json.dumps(body).encode() if body is not None else None, h)


def test_patient_context_writes_reads_and_searches(env, key):
    sc, sandbox = env
    aud = sandbox.base_url
    mine = token(key, aud, "patient/Observation.cruds launch/patient openid")
    system = token(key, aud, "system/Observation.cruds", patient=None)
    sandbox.clear_log()
    assert call(env, "PUT", "/Observation/o-p1", mine, obs("p1", "o-p1"))[0] == 201
    assert sandbox.request_log()[-1]["headers"]["authorization"] == f"Bearer {mine}"  # its own token goes upstream
    assert call(env, "PUT", "/Observation/o-p2", system, obs("p2", "o-p2"))[0] == 201
    n = len(sandbox.request_log())
    # another patient's resource: create, move into mine, move out of mine, delete
    assert call(env, "POST", "/Observation", mine, obs("p2"))[0] == 403
    assert call(env, "PUT", "/Observation/o-p2", mine, obs("p1", "o-p2"))[0] == 403
    patch = [{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]
    assert call(env, "PATCH", "/Observation/o-p1", mine, patch, **{"Content-Type": "application/json-patch+json"})[0] == 403
    assert call(env, "DELETE", "/Observation/o-p2", mine)[0] == 403
    writes = [e for e in sandbox.request_log()[n:] if e["method"] != "GET"]
    assert writes == []  # only prior-state reads reached the EHR
    # searches must be confined to the patient's compartment
    assert call(env, "GET", "/Observation?patient=p1", mine)[0] == 200
    assert call(env, "GET", "/Patient/p1/Observation", mine)[0] in (200, 404)  # allowed: reaches the EHR
    assert sandbox.request_log()[-1]["path"] == "/fhir/R4/Patient/p1/Observation"
    assert call(env, "GET", "/Observation", mine)[0] == 403
    assert call(env, "GET", "/Observation?patient=p2", mine)[0] == 403
    # reads: the answer must belong to the patient
    assert call(env, "GET", "/Observation/o-p1", mine)[0] == 200
    status, headers, data = call(env, "GET", "/Observation/o-p2", mine)
    assert status == 403 and b"p2" not in data
    # its audit record: a read the sidecar refused after the EHR answered 200
    cid = headers["x-correlation-id"]
    deadline = time.time() + 5
    rec = None
    while rec is None and time.time() < deadline:
        complete = Path(sc.cfg_path.parent / "audit.jsonl").read_bytes().split(b"\n")[:-1]  # not a line being written
        lines = [json.loads(l) for l in complete]
        rec = next((r for r in lines if r.get("correlation_id") == cid and r["kind"] == "read"), None)
        time.sleep(0.05)
    assert rec is not None
    assert rec["decision"] == "deny" and rec["upstream_status"] == 200
    assert rec["reasons"] == ["patient context: the resource belongs to another patient"]


def test_token_never_widens_the_ceiling_and_qualifiers_hold(env, key):
    sc, sandbox = env
    aud = sandbox.base_url
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"text": "x"}}
    wide = token(key, aud, "patient/Condition.c patient/Observation.c")
    assert call(env, "POST", "/Condition", wide, cond)[0] == 403
    vitals_only = token(key, aud, "patient/Observation.c?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs")
    assert call(env, "POST", "/Observation", vitals_only, obs("p1"))[0] == 201
    assert call(env, "POST", "/Observation", vitals_only, obs("p1", category=LAB))[0] == 403


@pytest.mark.parametrize("case", ["expired", "not-yet-valid", "wrong-iss", "wrong-aud", "alg-none", "unknown-client",
                                  "unknown-kid", "garbage"])
def test_bad_tokens_are_401_and_never_forwarded(env, key, case):
    sc, sandbox = env
    aud = sandbox.base_url
    now = int(time.time())
    scope = "patient/Observation.cruds"
    tok = {
        "expired": lambda: token(key, aud, scope, exp=now - 600),
        "not-yet-valid": lambda: token(key, aud, scope, nbf=now + 600),
        "wrong-iss": lambda: token(key, aud, scope, iss="https://evil.example"),
        "wrong-aud": lambda: token(key, "https://other.example/fhir", scope),
        "alg-none": lambda: jwt.encode({"iss": ISS, "aud": aud, "exp": now + 60, "client_id": "smart-app", "scope": scope},
                                       None, algorithm="none"),
        "unknown-client": lambda: token(key, aud, scope, client_id="someone-else"),
        "unknown-kid": lambda: jwt.encode({"iss": ISS, "aud": aud, "exp": now + 60, "client_id": "smart-app", "scope": scope},
                                          key, algorithm="RS256", headers={"kid": "k9"}),
        "garbage": lambda: "not-a-token",
    }[case]()
    sandbox.clear_log()
    status, headers, _ = call(env, "POST", "/Observation", tok, obs("p1"))
    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert sandbox.request_log() == []
