"""The attack corpus (`tests/attacks/*.yaml`, one case per file) against one live sidecar.

Each case is sent as raw bytes over a socket through `fhir-sidecar run` (reverse mode) in front
of the sandbox EHR. The sandbox runs the `method-override` profile: it would honour
`X-HTTP-Method-Override` / `X-Method-Override` / `_method`, so an override the sidecar let slip
through would show in its log. The sandbox's request log is the witness of what reached the
upstream. Adding a case needs no code: see `tests/attacks/README.md` for the format.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.sandbox import SandboxServer
from tests.harness import OPS_KEY, READER_KEY, SHADOW_KEY, WRITER_KEY, SidecarProcess, make_config

pytestmark = pytest.mark.e2e

CASES_DIR = Path(__file__).resolve().parent / "attacks"
BASE = "/fhir/R4"
ISS = "https://auth.example.org"
KEYS = {"writer": WRITER_KEY, "reader": READER_KEY, "ops": OPS_KEY, "shadow": SHADOW_KEY}
CASE_KEYS = {"name", "description", "class", "client", "request", "raw", "expect", "must_not_reach_upstream",
             "allow_prior_read", "pipeline", "known_bug", "references"}
REQUEST_KEYS = {"method", "target", "http_version", "headers", "body", "body_json", "body_b64", "content_length", "host"}
EXPECT_KEYS = {"status", "outcome", "forwarded_headers_absent", "upstream_actions", "upstream_query", "body_not_contains"}
CLASSES = {"method-override", "encoding", "json", "bundle", "conditional", "operation", "patch", "token", "tenant",
           "forward-mode", "smuggling", "absolute-form", "upgrade", "header-injection", "case", "unicode",
           "null-byte", "huge", "content-type", "format", "include", "scope", "path", "host"}
SEED = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]},
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]},
    {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "hr"},
     "subject": {"reference": "Patient/p1"}},
    {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "hr"},
     "subject": {"reference": "Patient/p2"}},
]


def load_cases() -> list[dict[str, Any]]:
    cases = []
    for path in sorted(CASES_DIR.glob("*.y*ml")) + sorted(CASES_DIR.glob("*.json")):
        case = (yaml.safe_load if path.suffix != ".json" else json.loads)(path.read_text("utf-8"))
        case["_file"] = path.name
        cases.append(case)
    return cases


CASES = load_cases()


def test_corpus_is_well_formed() -> None:
    assert len(CASES) >= 80
    names = [c.get("name") for c in CASES]
    assert len(set(names)) == len(names), "case names must be unique"
    for c in CASES:
        where = c["_file"]
        assert set(c) - {"_file"} <= CASE_KEYS, (where, set(c) - CASE_KEYS - {"_file"})
        assert c["name"] == Path(where).stem, f"{where}: name must equal the file name"
        assert isinstance(c.get("description"), str) and c["description"].strip(), where
        assert c.get("class") in CLASSES, (where, c.get("class"))
        assert ("request" in c) != ("raw" in c), f"{where}: exactly one of request / raw"
        if "request" in c:
            assert set(c["request"]) <= REQUEST_KEYS, (where, set(c["request"]) - REQUEST_KEYS)
            assert sum(k in c["request"] for k in ("body", "body_json", "body_b64")) <= 1, where
        exp = c.get("expect")
        assert isinstance(exp, dict) and "status" in exp and set(exp) <= EXPECT_KEYS, where
        assert isinstance(c.get("must_not_reach_upstream"), bool), f"{where}: must_not_reach_upstream is required"
    classes = {c["class"] for c in CASES}
    assert {"method-override", "smuggling", "json", "bundle", "token", "unicode", "include"} <= classes


# -- environment -----------------------------------------------------------------------------

class Env:
    def __init__(self, sidecar: SidecarProcess, sandbox: SandboxServer, key: rsa.RSAPrivateKey) -> None:
        self.sidecar, self.sandbox, self.key = sidecar, sandbox, key

    def token(self, spec: dict[str, Any] | None = None) -> str:
        spec = dict(spec or {})
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISS, "aud": self.sandbox.base_url, "exp": now + 300, "iat": now,
                                  "client_id": "smart-app", "scope": "patient/Observation.cruds patient/Patient.rs",
                                  "patient": "p1"}
        for k, v in (spec.pop("claims", None) or {}).items():
            if v is None:
                claims.pop(k, None)
            elif isinstance(v, str) and re.fullmatch(r"now[+-]\d+", v):
                claims[k] = now + int(v[3:])
            else:
                claims[k] = v
        header = {"kid": "k1", **(spec.pop("header", None) or {})}
        sign = spec.pop("sign", "rs256")
        assert not spec, f"unknown bearer keys {sorted(spec)}"
        if sign == "rs256":
            return jwt.encode(claims, self.key, algorithm="RS256", headers=header)
        if sign == "none":
            seg = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
            return f"{seg({**header, 'alg': 'none', 'typ': 'JWT'})}.{seg(claims)}."
        if sign == "hs256-public-key":  # algorithm confusion: the RSA public key as an HMAC secret
            pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
            import hashlib
            import hmac
            seg = lambda d: base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=").decode()
            signing = f"{seg({**header, 'alg': 'HS256', 'typ': 'JWT'})}.{seg(claims)}"
            sig = base64.urlsafe_b64encode(hmac.new(pem, signing.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
            return f"{signing}.{sig}"
        if sign == "other-key":
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return jwt.encode(claims, other, algorithm="RS256", headers=header)
        raise AssertionError(f"unknown sign {sign!r}")

    def subst(self, text: str) -> str:
        up = self.sandbox.base_url
        return (text.replace("{base}", BASE).replace("{upstream_base}", up)
                    .replace("{upstream_authority}", up.split("/")[2])
                    .replace("{sidecar_authority}", f"127.0.0.1:{self.sidecar.port}")
                    .replace("{writer_key}", WRITER_KEY).replace("{reader_key}", READER_KEY)
                    .replace("{ops_key}", OPS_KEY)
                    .replace("{token}", self.token()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    sandbox = SandboxServer("127.0.0.1", 0, profile={"extends": "method-override", "seed": SEED, "name": "attacks"})
    sandbox.start()
    base_cfg = make_config(tmp, sandbox.base_url)
    clients = base_cfg["clients"] + [
        {"id": "smart-app", "auth": "bearer", "scopes": ["patient/Observation.cruds", "patient/Patient.rs"]}]
    cfg = make_config(tmp, sandbox.base_url, clients=clients,
                      identity={"jwks": f"file:{tmp / 'jwks.json'}", "issuer": ISS, "audience": sandbox.base_url})
    sc = SidecarProcess(cfg, tmp).start()
    yield Env(sc, sandbox, key)
    sc.stop()
    sandbox.stop()


# -- building and sending ----------------------------------------------------------------

def _text(value: Any) -> str:
    """A string, {repeat: s, times: n}, or a list of those, concatenated."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"repeat", "times"}:
        return str(value["repeat"]) * int(value["times"])
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    if isinstance(value, (int, float)):
        return str(value)
    raise AssertionError(f"not text: {value!r}")


def build(env: Env, case: dict[str, Any]) -> bytes:
    if "raw" in case:
        return env.subst(_text(case["raw"])).encode("latin-1")
    r = case["request"]
    client = case.get("client", "writer")
    headers: list[tuple[str, str]] = [("Host", env.subst(r.get("host", "{sidecar_authority}")))]
    if isinstance(client, str) and client in KEYS:
        headers.append(("X-API-Key", KEYS[client]))
    elif isinstance(client, dict) and "bearer" in client:
        headers.append(("Authorization", f"Bearer {env.token(client['bearer'])}"))
    else:
        assert client in ("none", None), f"unknown client {client!r}"
    for item in r.get("headers", []):
        if isinstance(item, str):  # "Name: value"
            name, sep, value = item.partition(":")
            assert sep, f"header {item!r} needs a colon"
            headers.append((name, env.subst(value.strip())))
        else:  # [name, value]: value may be {repeat, times} or a list of parts
            headers.append((item[0], env.subst(_text(item[1]))))
    if "body_json" in r:
        body = env.subst(json.dumps(r["body_json"], separators=(",", ":"))).encode()
    elif "body_b64" in r:
        body = base64.b64decode(r["body_b64"])
    elif "body" in r:
        body = env.subst(_text(r["body"])).encode("utf-8", "surrogatepass")
    else:
        body = b""
    names = {n.lower() for n, _ in headers}
    if (body or r.get("method") in ("POST", "PUT", "PATCH")) and r.get("content_length", "auto") == "auto" \
            and not names & {"content-length", "transfer-encoding"}:
        headers.append(("Content-Length", str(len(body))))
    target = env.subst(_text(r["target"]))
    head = f"{r['method']} {target} {r.get('http_version', 'HTTP/1.1')}\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def exchange(port: int, raw: bytes, pipeline: bool) -> tuple[int | None, dict[str, str], bytes, int]:
    """(status or None if closed without an answer, headers, body, further responses seen)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = http.client.HTTPResponse(s)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
            return None, {}, b"", 0
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        more = 0
        if pipeline:  # a smuggled second request would be answered on the same connection
            s.settimeout(0.5)
            rest = b""
            try:
                while chunk := s.recv(65536):
                    rest += chunk
            except (TimeoutError, socket.timeout, ConnectionResetError):
                pass
            more = len(re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ", rest))
        return resp.status, headers, body, more


def _ids() -> list[str]:
    return [c["name"] for c in CASES]


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=[pytest.mark.xfail(strict=True, reason=f"known sidecar bug: {c['known_bug']}")]
                 if c.get("known_bug") else []) for c in CASES], ids=_ids())
def test_attack(env: Env, case: dict[str, Any]) -> None:
    env.sandbox.reset()  # the seed (Patient p1, p2; Observation o1, o2) again, an empty log
    raw = build(env, case)
    status, headers, body, more = exchange(env.sidecar.port, raw, bool(case.get("pipeline")))
    exp = case["expect"]
    wanted = exp["status"] if isinstance(exp["status"], list) else [exp["status"]]
    wanted = [None if w == "closed" else w for w in wanted]
    time.sleep(0.02)  # a request forwarded after the answer (smuggled) is logged by now
    log = env.sandbox.request_log()
    seen = [(e["method"], e["path"], e["query"], e["action"], e["status"]) for e in log]
    assert status in wanted, f"status {status}, expected {wanted}; body {body[:300]!r}; upstream saw {seen}"
    if status is not None and status >= 400 and exp.get("outcome", True):
        doc = json.loads(body)
        assert doc["resourceType"] == "OperationOutcome", body[:300]
        assert headers.get("x-correlation-id"), "every answer carries X-Correlation-ID"
        assert headers["x-correlation-id"] in doc["issue"][0]["diagnostics"]
    if case["must_not_reach_upstream"]:
        if case.get("allow_prior_read"):
            assert all(e["method"] == "GET" and e["action"] in ("read", "error") for e in log), seen
        else:
            assert log == [], f"reached the upstream: {seen}"
    if "upstream_query" in exp:
        assert [e["query"] for e in log if e["method"] != "GET" or len(log) == 1][-1:] == [exp["upstream_query"]], seen
    if "upstream_actions" in exp:
        assert [e["action"] for e in log] == exp["upstream_actions"], seen
    for name in exp.get("forwarded_headers_absent", []):
        assert all(name.lower() not in e["headers"] for e in log), (name, [e["headers"] for e in log])
    for needle in exp.get("body_not_contains", []):
        assert env.subst(needle).encode() not in body
    if case.get("pipeline"):
        assert more == 0 or log == [], f"{more} further answers on the connection; upstream saw {seen}"
    assert all(e.get("override") is None for e in log), f"an override reached the EHR: {seen}"
