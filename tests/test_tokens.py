"""Access-token verification: JWTs against a JWKS served on 127.0.0.1, opaque tokens by introspection.

Keys are generated per test session (never committed). A tiny threaded http.server plays the
authorization server (JWKS + RFC 7662 introspection) and counts every request it gets.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sidecar.config import ConfigError
from sidecar.tokens import IntrospectionSettings, InvalidToken, TokenClaims, TokenVerifier

T0 = 1_900_000_000.0
ISS = "https://auth.example.org/realms/ehr"
AUD = "https://ehr.example.org/fhir/R4"
CANARY = "CANARYtok7f3a9c"
INTRO_ID, INTRO_SECRET = "sidecar", "s3cret:with/odd&chars"
DROP = object()  # a claim value meaning "leave this claim out"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class AuthServer:
    """JWKS at /jwks.json and introspection at /introspect, on 127.0.0.1 in a thread; counts hits per path."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.active: dict[str, Any] = {}  # token -> introspection response (a dict, or raw bytes)
        self.hits: Counter[str] = Counter()
        self.status = 200
        self.delay = 0.0
        self.forms: list[dict[str, list[str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                if self.path != "/jwks.json" or server.status != 200:
                    return self._send(404 if server.status == 200 else server.status, {})
                self._send(200, server.jwks)

            def do_POST(self) -> None:
                server.hits[self.path] += 1
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
                server.forms.append(form)
                time.sleep(server.delay)
                if server.status != 200:
                    return self._send(server.status, {})
                if self.path == "/redirect":  # a redirect must not be followed (it would re-send the token)
                    self.send_response(307)
                    self.send_header("Location", server.url("/introspect"))
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                expected = "Basic " + base64.b64encode(b"sidecar:s3cret%3Awith%2Fodd%26chars").decode()
                if self.path != "/introspect" or self.headers.get("Authorization") != expected:
                    return self._send(401, {"error": "invalid_client"})
                self._send(200, server.active.get(form.get("token", [""])[0], {"active": False}))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- keys and tokens -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "ec2": ec.generate_private_key(ec.SECP256R1()),
            "evil": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


def jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    pub = key.public_key()
    algo = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    d = algo.to_jwk(pub, as_dict=True)
    d.update({"kid": kid, "use": "sig"})
    if alg:
        d["alg"] = alg
    return d


def the_jwks(keys: dict[str, Any]) -> dict[str, Any]:
    # rsa1 pins RS256; rsa-any is the same key without `alg`; ec1 has no `alg` (P-256 → ES256 only)
    return {"keys": [jwk(keys["rsa"], "rsa1", "RS256"), jwk(keys["rsa"], "rsa-any"), jwk(keys["ec"], "ec1"),
                     {"kty": "oct", "k": b64(b"s" * 32), "kid": "hmac1"}, {"kty": "RSA", "use": "enc", "kid": "enc1"}]}


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISS, "aud": AUD, "exp": T0 + 600, "iat": T0 - 10, "client_id": "scribe",
                         "scope": "patient/Observation.rs launch/patient", "patient": "123",
                         "fhirUser": "Practitioner/7", "sub": "user-1"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not DROP}


def sign(key: Any, kid: str | None = "rsa1", alg: str = "RS256", headers: dict[str, Any] | None = None,
         **over: Any) -> str:
    h = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**over), key, algorithm=alg, headers={**h, **(headers or {})})


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_token(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes,
              signer: Callable[[bytes], bytes] | None) -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    return f"{signing_input.decode()}.{b64(signer(signing_input)) if signer else ''}"


def rs256(key: Any) -> Callable[[bytes], bytes]:
    return lambda msg: RSAAlgorithm(RSAAlgorithm.SHA256).sign(msg, key)


def hs256_with_public_pem(keys: dict[str, Any], fmt: serialization.PublicFormat) -> str:
    # the classic key-confusion attack: the RSA public key (which anyone has) used as an HMAC secret
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM, fmt)
    return raw_token({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}, claims(),
                     lambda m: hmac.new(pem, m, hashlib.sha256).digest())


def evil_cert_der(keys: dict[str, Any]) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(keys["evil"].public_key())
            .serial_number(1).not_valid_before(dt.datetime(2020, 1, 1))
            .not_valid_after(dt.datetime(2040, 1, 1)).sign(keys["evil"], hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_module() -> Iterator[AuthServer]:
    s = AuthServer()
    yield s
    s.close()


@pytest.fixture
def server(server_module: AuthServer, keys: dict[str, Any]) -> AuthServer:
    s = server_module
    s.jwks, s.active, s.status, s.delay, s.forms = the_jwks(keys), {}, 200, 0.0, []
    s.hits.clear()
    return s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def mk(server: AuthServer, clock: Clock) -> AsyncIterator[Callable[..., Awaitable[TokenVerifier]]]:
    made: list[TokenVerifier] = []

    async def make(**kw: Any) -> TokenVerifier:
        args: dict[str, Any] = {"jwks": server.url("/jwks.json"), "issuer": ISS, "audience": AUD, "clock": clock}
        v = TokenVerifier(**{**args, **kw})
        await v.start()
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


@pytest.fixture
async def verifier(mk: Callable[..., Awaitable[TokenVerifier]]) -> TokenVerifier:
    return await mk()


def introspection(server: AuthServer, secret: str = INTRO_SECRET, url: str | None = None) -> IntrospectionSettings:
    return IntrospectionSettings(url or server.url("/introspect"), INTRO_ID, secret)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- JWT: valid ------------------------------------------------------------------------------------------

VALID: list[tuple[str, Callable[[dict[str, Any]], str], dict[str, Any]]] = [
    ("RS256", lambda k: sign(k["rsa"]), {}),
    ("ES256", lambda k: sign(k["ec"], kid="ec1", alg="ES256"), {}),
    ("PS256 on a key without alg", lambda k: sign(k["rsa"], kid="rsa-any", alg="PS256"), {}),
    ("RS512 on a key without alg", lambda k: sign(k["rsa"], kid="rsa-any", alg="RS512"), {}),
    ("azp instead of client_id", lambda k: sign(k["rsa"], client_id=DROP, azp="scribe"), {}),
    ("client_id wins over azp", lambda k: sign(k["rsa"], azp="other"), {}),
    ("scope as a JSON list", lambda k: sign(k["rsa"], scope=["patient/Observation.rs", "launch/patient"]), {}),
    ("scope with extra spaces", lambda k: sign(k["rsa"], scope=" patient/Observation.rs  launch/patient "), {}),
    ("aud as a list", lambda k: sign(k["rsa"], aud=["https://other.example", AUD]), {}),
    ("expired within leeway", lambda k: sign(k["rsa"], exp=T0 - 29), {"expires_at": T0 - 29}),
    ("nbf within leeway", lambda k: sign(k["rsa"], nbf=T0 + 29), {}),
    ("absolute fhirUser, no patient, no sub",
     lambda k: sign(k["rsa"], fhirUser="https://ehr.example.org/fhir/R4/Practitioner/7", patient=DROP, sub=DROP),
     {"fhir_user": "https://ehr.example.org/fhir/R4/Practitioner/7", "patient": None, "subject": None}),
    ("no scope claim", lambda k: sign(k["rsa"], scope=DROP), {"scopes": ()}),
]


@pytest.mark.parametrize(("name", "build", "diff"), VALID, ids=[v[0] for v in VALID])
async def test_valid_jwt(verifier: TokenVerifier, keys, name, build, diff) -> None:
    token = build(keys)
    got = await verifier.verify(token)
    expected = TokenClaims(client_id="scribe", scopes=("patient/Observation.rs", "launch/patient"), patient="123",
                           fhir_user="Practitioner/7", expires_at=T0 + 600, subject="user-1",
                           token_id=hashlib.sha256(token.encode()).hexdigest())
    assert got == dataclasses.replace(expected, **diff)


# ---- JWT: invalid ----------------------------------------------------------------------------------------

INVALID: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
    ("expired", lambda k: sign(k["rsa"], exp=T0 - 31), "token expired"),
    ("expired at leeway edge", lambda k: sign(k["rsa"], exp=T0 - 30), "token expired"),
    ("not yet valid (nbf)", lambda k: sign(k["rsa"], nbf=T0 + 31), "token not yet valid"),
    ("issued in the future", lambda k: sign(k["rsa"], iat=T0 + 60), "token issued in the future"),
    ("wrong iss", lambda k: sign(k["rsa"], iss="https://evil.example.org"), "wrong token issuer"),
    ("iss with a trailing slash", lambda k: sign(k["rsa"], iss=ISS + "/"), "wrong token issuer"),
    ("no iss", lambda k: sign(k["rsa"], iss=DROP), "wrong token issuer"),
    ("wrong aud", lambda k: sign(k["rsa"], aud="https://other.example/fhir"), "wrong token audience"),
    ("aud list without us", lambda k: sign(k["rsa"], aud=["https://a.example", "https://b.example"]),
     "wrong token audience"),
    ("no aud", lambda k: sign(k["rsa"], aud=DROP), "wrong token audience"),
    ("no exp", lambda k: sign(k["rsa"], exp=DROP), "token has no expiry"),
    ("exp as a string", lambda k: sign(k["rsa"], exp=str(T0 + 600)), "malformed token claim"),
    ("exp as a boolean", lambda k: sign(k["rsa"], exp=True), "malformed token claim"),
    ("no client_id and no azp", lambda k: sign(k["rsa"], client_id=DROP), "token names no client"),
    ("client_id not a string", lambda k: sign(k["rsa"], client_id=7), "malformed token claim"),
    ("patient not a string", lambda k: sign(k["rsa"], patient=123), "malformed token claim"),
    ("scope list with a non-string", lambda k: sign(k["rsa"], scope=["patient/*.rs", 1]), "malformed token claim"),
    ("alg none", lambda k: raw_token({"alg": "none", "kid": "rsa1"}, claims(), None), "token algorithm not allowed"),
    ("alg none with a signature", lambda k: raw_token({"alg": "none"}, claims(), lambda m: b"x"),
     "token algorithm not allowed"),
    ("alg None spelled oddly", lambda k: raw_token({"alg": "nOnE"}, claims(), lambda m: b"x"),
     "token algorithm not allowed"),
    ("HS256 keyed with the public key PEM (SPKI)",
     lambda k: hs256_with_public_pem(k, serialization.PublicFormat.SubjectPublicKeyInfo),
     "token algorithm not allowed"),
    ("HS256 keyed with the public key PEM (PKCS1)",
     lambda k: hs256_with_public_pem(k, serialization.PublicFormat.PKCS1), "token algorithm not allowed"),
    ("HS256 against the JWKS's oct key", lambda k: jwt.encode(claims(), b"s" * 32, "HS256", headers={"kid": "hmac1"}),
     "token algorithm not allowed"),
    ("no alg", lambda k: raw_token({"kid": "rsa1"}, claims(), rs256(k["rsa"])), "token algorithm not allowed"),
    ("signed by another key under our kid", lambda k: sign(k["evil"]), "bad token signature"),
    ("payload swapped after signing",
     lambda k: ".".join([sign(k["rsa"]).split(".")[0], sign(k["rsa"], client_id="admin").split(".")[1],
                         sign(k["rsa"]).split(".")[2]]), "bad token signature"),
    ("ES256 header on an RSA key", lambda k: raw_token({"alg": "ES256", "kid": "rsa-any"}, claims(), rs256(k["rsa"])),
     "token key not usable for its algorithm"),
    ("PS256 on a key pinned to RS256", lambda k: sign(k["rsa"], alg="PS256"), "token key not usable for its algorithm"),
    ("RS256 on an EC key", lambda k: sign(k["rsa"], kid="ec1"), "token key not usable for its algorithm"),
    ("encryption key", lambda k: sign(k["rsa"], kid="enc1"), "unknown token key"),
    ("no kid with several keys", lambda k: sign(k["rsa"], kid=None), "token names no key"),
    ("kid not a string", lambda k: raw_token({"alg": "RS256", "kid": 7}, claims(), rs256(k["rsa"])), "malformed token"),
    ("crit header", lambda k: sign(k["rsa"], headers={"crit": ["exp"]}), "unsupported token header"),
    ("b64 header", lambda k: raw_token({"alg": "RS256", "kid": "rsa1", "b64": False, "crit": ["b64"]}, claims(),
                                       rs256(k["rsa"])), "unsupported token header"),
    ("duplicate aud member",
     lambda k: raw_token({"alg": "RS256", "kid": "rsa1"},
                         json.dumps(claims())[:-1].encode() + b', "aud": "https://other.example"}', rs256(k["rsa"])),
     "malformed token"),
    ("duplicate alg member", lambda k: raw_token(b'{"alg": "none", "alg": "RS256", "kid": "rsa1"}', claims(),
                                                 rs256(k["rsa"])), "malformed token"),
    ("NaN exp", lambda k: raw_token({"alg": "RS256", "kid": "rsa1"},
                                    json.dumps(claims())[:-1].encode() + b', "nbf": NaN}', rs256(k["rsa"])),
     "malformed token"),
    ("payload not an object", lambda k: raw_token({"alg": "RS256", "kid": "rsa1"}, b"[1]", rs256(k["rsa"])),
     "malformed token"),
    ("header not JSON", lambda k: "bm90IGpzb24." + sign(k["rsa"]).split(".", 1)[1], "malformed token"),
    ("empty signature", lambda k: sign(k["rsa"]).rsplit(".", 1)[0] + ".", "malformed token"),
    ("not base64url", lambda k: "a+b.c/d.e==", "malformed token"),
    ("whitespace in the token", lambda k: sign(k["rsa"])[:20] + " " + sign(k["rsa"])[20:], "malformed token"),
    ("oversized token", lambda k: sign(k["rsa"], pad="x" * 20_000), "malformed token"),
    ("empty token", lambda k: "", "malformed token"),
]


@pytest.mark.parametrize(("name", "build", "reason"), INVALID, ids=[i[0] for i in INVALID])
async def test_invalid_jwt(verifier: TokenVerifier, keys, name, build, reason) -> None:
    with pytest.raises(InvalidToken) as ei:
        await verifier.verify(build(keys))
    assert ei.value.reason == reason


async def test_algorithm_allowlist_is_applied(mk, keys) -> None:
    v = await mk(algorithms=("ES256",))
    assert (await v.verify(sign(keys["ec"], kid="ec1", alg="ES256"))).client_id == "scribe"
    with pytest.raises(InvalidToken, match="^token algorithm not allowed$"):
        await v.verify(sign(keys["rsa"]))


async def test_missing_kid_with_a_single_key(mk, server, keys) -> None:
    server.jwks = {"keys": [jwk(keys["ec"], "only")]}
    v = await mk()
    assert (await v.verify(sign(keys["ec"], kid=None, alg="ES256"))).client_id == "scribe"


# ---- JWKS refresh ----------------------------------------------------------------------------------------


async def test_unknown_kid_refreshes_once_then_invalid(verifier, server, clock, keys) -> None:
    assert server.hits["/jwks.json"] == 1  # start()
    clock.now += 60
    with pytest.raises(InvalidToken, match="^unknown token key$"):
        await verifier.verify(sign(keys["ec2"], kid="nope-1", alg="ES256"))
    assert server.hits["/jwks.json"] == 2
    clock.now += 5  # inside the 30 s window: a second unknown kid does not fetch again
    with pytest.raises(InvalidToken, match="^unknown token key$"):
        await verifier.verify(sign(keys["ec2"], kid="nope-2", alg="ES256"))
    assert server.hits["/jwks.json"] == 2
    clock.now += 30
    with pytest.raises(InvalidToken):
        await verifier.verify(sign(keys["ec2"], kid="nope-3", alg="ES256"))
    assert server.hits["/jwks.json"] == 3


async def test_no_refresh_right_after_start(verifier, server, keys) -> None:
    with pytest.raises(InvalidToken, match="^unknown token key$"):
        await verifier.verify(sign(keys["ec2"], kid="nope", alg="ES256"))
    assert server.hits["/jwks.json"] == 1


async def test_rotated_key_is_found_by_one_shared_refresh(verifier, server, clock, keys) -> None:
    server.jwks["keys"].append(jwk(keys["ec2"], "ec-new"))
    clock.now += 60
    token = sign(keys["ec2"], kid="ec-new", alg="ES256")
    results = await asyncio.gather(*(verifier.verify(token) for _ in range(10)))
    assert {r.client_id for r in results} == {"scribe"}
    assert server.hits["/jwks.json"] == 2  # ten concurrent misses, one fetch
    assert (await verifier.verify(sign(keys["rsa"]))).client_id == "scribe"  # old keys still there


async def test_concurrent_unknown_kids_share_one_fetch(verifier, server, clock, keys) -> None:
    clock.now += 60
    tokens = [sign(keys["ec2"], kid=f"nope-{i}", alg="ES256") for i in range(8)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) for r in results)
    assert server.hits["/jwks.json"] == 2


async def test_failed_refresh_keeps_the_old_keys(verifier, server, clock, keys) -> None:
    server.status = 500
    clock.now += 60
    with pytest.raises(InvalidToken, match="^unknown token key$"):
        await verifier.verify(sign(keys["ec2"], kid="nope", alg="ES256"))
    assert server.hits["/jwks.json"] == 2
    assert (await verifier.verify(sign(keys["rsa"]))).client_id == "scribe"


async def test_jku_x5u_jwk_x5c_headers_are_never_used(verifier, server, clock, keys) -> None:
    attacker = AuthServer()
    try:
        attacker.jwks = {"keys": [jwk(keys["evil"], "evil")]}
        evil_jwk = jwk(keys["evil"], "evil")
        headers = {"jku": attacker.url("/jwks.json"), "x5u": attacker.url("/cert.pem"), "jwk": evil_jwk,
                   "x5c": [base64.b64encode(evil_cert_der(keys)).decode()]}
        clock.now += 60
        with pytest.raises(InvalidToken, match="^unknown token key$"):
            await verifier.verify(sign(keys["evil"], kid="evil", headers=headers))
        with pytest.raises(InvalidToken, match="^bad token signature$"):  # our kid, the attacker's embedded key
            await verifier.verify(sign(keys["evil"], kid="rsa1", headers=headers))
        with pytest.raises(InvalidToken, match="^token names no key$"):
            await verifier.verify(sign(keys["evil"], kid=None, headers=headers))
        assert sum(attacker.hits.values()) == 0
        assert server.hits["/jwks.json"] == 2  # only our own JWKS, refreshed once for the unknown kid
    finally:
        attacker.close()


# ---- introspection ---------------------------------------------------------------------------------------


def active(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"active": True, "client_id": "billing", "scope": "system/Claim.cr", "exp": T0 + 3600,
                         "iss": ISS, "aud": AUD, "sub": "svc-1", "token_type": "Bearer"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not DROP}


async def test_introspection_active_is_cached(mk, server, clock) -> None:
    v = await mk(introspection=introspection(server))
    server.active["opaque-1"] = active()
    got = await v.verify("opaque-1")
    assert got == TokenClaims(client_id="billing", scopes=("system/Claim.cr",), patient=None, fhir_user=None,
                              expires_at=T0 + 3600, subject="svc-1",
                              token_id=hashlib.sha256(b"opaque-1").hexdigest())
    assert server.forms[0]["token"] == ["opaque-1"]
    assert await v.verify("opaque-1") == got
    clock.now += 299
    assert await v.verify("opaque-1") == got
    assert server.hits["/introspect"] == 1
    clock.now += 2  # past now + 300
    assert await v.verify("opaque-1") == got
    assert server.hits["/introspect"] == 2


async def test_introspection_cache_ends_at_exp(mk, server, clock) -> None:
    v = await mk(jwks=None, introspection=introspection(server), leeway_s=0)
    server.active["opaque-2"] = active(exp=T0 + 60)
    await v.verify("opaque-2")
    clock.now += 59
    await v.verify("opaque-2")
    assert server.hits["/introspect"] == 1
    clock.now += 2
    with pytest.raises(InvalidToken, match="^token expired$"):
        await v.verify("opaque-2")
    assert server.hits["/introspect"] == 2


async def test_introspection_inactive_is_cached_briefly(mk, server, clock) -> None:
    v = await mk(introspection=introspection(server))
    for _ in range(3):
        with pytest.raises(InvalidToken, match="^token is not active$"):
            await v.verify("revoked-token")
    assert server.hits["/introspect"] == 1
    clock.now += 11
    server.active["revoked-token"] = active()  # negative results expire: the AS is asked again
    assert (await v.verify("revoked-token")).client_id == "billing"
    assert server.hits["/introspect"] == 2


INTROSPECTION_BAD: list[tuple[str, Any, str]] = [
    ("active false", {"active": False, "client_id": "billing"}, "token is not active"),
    ("active as a string", active(active="true"), "token is not active"),
    ("no client_id", active(client_id=DROP), "token names no client"),
    ("wrong aud", active(aud="https://other.example"), "wrong token audience"),
    ("wrong iss", active(iss="https://evil.example"), "wrong token issuer"),
    ("exp passed", active(exp=T0 - 100), "token expired"),
    ("nbf in the future", active(nbf=T0 + 100), "token not yet valid"),
    ("not an object", [True], "token introspection failed"),
]


@pytest.mark.parametrize(("name", "response", "reason"), INTROSPECTION_BAD, ids=[b[0] for b in INTROSPECTION_BAD])
async def test_introspection_refusals(mk, server, name, response, reason) -> None:
    v = await mk(introspection=introspection(server))
    server.active["tok"] = response if isinstance(response, dict) else json.dumps(response).encode()
    with pytest.raises(InvalidToken) as ei:
        await v.verify("tok")
    assert ei.value.reason == reason


async def test_introspection_without_exp_or_aud(mk, server, clock) -> None:
    v = await mk(introspection=introspection(server))
    server.active["tok"] = active(exp=DROP, aud=DROP, iss=DROP)
    got = await v.verify("tok")
    assert got.expires_at == T0 + 300


@pytest.mark.parametrize("failure", ["down", "500", "bad client secret", "wrong path", "redirect"])
async def test_introspection_failure_fails_closed(mk, server, failure) -> None:
    settings = introspection(server)
    if failure == "down":
        settings = introspection(server, url=f"http://127.0.0.1:{closed_port()}/introspect")
    elif failure == "bad client secret":
        settings = introspection(server, secret="wrong")
    else:
        settings = introspection(server, url=server.url("/elsewhere" if failure == "wrong path" else "/redirect"))
    v = await mk(introspection=settings)
    server.active["tok"] = active()
    server.status = 500 if failure == "500" else 200
    for _ in range(2):  # failures are not cached: each request asks again, and each is refused
        with pytest.raises(InvalidToken, match="^token introspection failed$"):
            await v.verify("tok")
    if failure != "down":
        assert sum(server.hits.values()) - server.hits["/jwks.json"] == 2
    if failure == "redirect":
        assert server.hits["/introspect"] == 0


async def test_concurrent_introspections_share_one_call(mk, server) -> None:
    v = await mk(introspection=introspection(server))
    server.active["tok"] = active()
    server.delay = 0.2
    results = await asyncio.gather(*(v.verify("tok") for _ in range(6)))
    assert {r.client_id for r in results} == {"billing"}
    assert server.hits["/introspect"] == 1


async def test_jwt_shaped_token_without_jwks_is_introspected(mk, server, keys) -> None:
    v = await mk(jwks=None, introspection=introspection(server))
    token = sign(keys["evil"])  # we cannot check it locally; the AS is authoritative
    server.active[token] = active()
    assert (await v.verify(token)).client_id == "billing"
    assert server.hits["/introspect"] == 1


async def test_bad_jwt_never_falls_back_to_introspection(mk, server, keys) -> None:
    v = await mk(introspection=introspection(server))
    token = sign(keys["evil"])
    server.active[token] = active()
    with pytest.raises(InvalidToken, match="^bad token signature$"):
        await v.verify(token)
    assert server.hits["/introspect"] == 0


async def test_opaque_token_without_introspection(verifier) -> None:
    with pytest.raises(InvalidToken, match="^token cannot be verified$"):
        await verifier.verify("some-opaque-token")


# ---- secrets never leak ----------------------------------------------------------------------------------


def _leak_scenarios(server: AuthServer, keys: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    down = introspection(server, url=f"http://127.0.0.1:{closed_port()}/introspect")
    return [
        ("opaque, no introspection", {}, CANARY),
        ("opaque, inactive", {"introspection": introspection(server)}, CANARY + "-inactive"),
        ("opaque, introspection down", {"introspection": down}, CANARY + "-down"),
        ("opaque, garbage response", {"introspection": introspection(server)}, CANARY + "-garbage"),
        ("jwt, wrong aud", {}, sign(keys["rsa"], aud=CANARY, sub=CANARY, patient=CANARY)),
        ("jwt, bad claim", {}, sign(keys["rsa"], exp=CANARY, client_id=CANARY)),
        ("jwt, unknown kid", {}, sign(keys["rsa"], kid=CANARY)),
        ("jwt, bad signature", {}, sign(keys["evil"], sub=CANARY)),
        ("jwt, garbage segments", {}, f"{CANARY}.{CANARY}.{CANARY}"),
        ("jwt, header not JSON", {}, b64(CANARY.encode()) + "." + b64(CANARY.encode()) + ".c2ln"),
        ("jwt, introspected", {"jwks": None, "introspection": introspection(server)}, sign(keys["rsa"], sub=CANARY)),
    ]


async def test_token_and_claims_never_in_exceptions_or_logs(mk, server, keys, clock, caplog, capsys) -> None:
    server.active[CANARY + "-garbage"] = f'{{"active": true, "client_id": "{CANARY}", "exp": "{CANARY}"}}'.encode()
    clock.now += 60  # the unknown kid triggers a refresh (and its log line)
    caplog.set_level("DEBUG")
    for name, kw, token in _leak_scenarios(server, keys):
        v = await mk(**kw)
        with pytest.raises(InvalidToken) as ei:
            await v.verify(token)
        e = ei.value
        text = "".join(traceback.format_exception(e)) + repr(e) + str(e) + e.reason + repr(e.args)
        assert CANARY not in text and token not in text, name
        assert e.__cause__ is None and e.__context__ is None, name
    out, err = capsys.readouterr()
    assert CANARY not in caplog.text + out + err
    assert INTRO_SECRET not in repr(introspection(server))


# ---- configuration and start-up --------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"algorithms": ("RS256", "HS256")}, {"algorithms": ("none",)}, {"algorithms": ()},
    {"jwks": "http://auth.example.org/jwks.json"}, {"jwks": "http://localhost:8080/jwks.json"},
    {"jwks": "https://user:pw@auth.example.org/jwks"}, {"jwks": "ftp://auth.example.org/jwks"},
    {"issuer": None}, {"audience": None}, {"jwks": None, "introspection": None},
    {"introspection": IntrospectionSettings("http://auth.example.org/introspect", "a", "b")},
    {"leeway_s": -1},
], ids=lambda kw: ",".join(kw))
def test_bad_settings_are_config_errors(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"jwks": "https://auth.example.org/jwks.json", "issuer": ISS, "audience": AUD}
    with pytest.raises(ConfigError):
        TokenVerifier(**{**args, **kw})


async def test_jwks_file_relative_to_base_dir(tmp_path: Path, keys, clock) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(keys["ec"], "ec1")]}))
    v = TokenVerifier(jwks="jwks.json", issuer=ISS, audience=AUD, base_dir=tmp_path, clock=clock)
    await v.start()
    try:
        assert (await v.verify(sign(keys["ec"], kid="ec1", alg="ES256"))).client_id == "scribe"
        # a key added to the file is picked up by the rate-limited refresh
        (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(keys["ec"], "ec1"), jwk(keys["rsa"], "rsa1")]}))
        clock.now += 60
        assert (await v.verify(sign(keys["rsa"]))).client_id == "scribe"
    finally:
        await v.close()


def _jwks_file(tmp_path: Path, doc: Any) -> str:
    p = tmp_path / "jwks.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


@pytest.mark.parametrize("case", ["missing file", "not JSON", "no keys", "private key", "only symmetric",
                                  "short RSA key", "unsupported curve", "http 404"])
async def test_unusable_jwks_fails_start(tmp_path: Path, keys, server, case: str) -> None:
    priv = RSAAlgorithm.to_jwk(keys["rsa"], as_dict=True)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024) if case == "short RSA key" else None
    source = {
        "missing file": str(tmp_path / "nope.json"),
        "not JSON": _jwks_file(tmp_path, "{"),
        "no keys": _jwks_file(tmp_path, {"keys": []}),
        "private key": _jwks_file(tmp_path, {"keys": [priv]}),
        "only symmetric": _jwks_file(tmp_path, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
        "short RSA key": _jwks_file(tmp_path, {"keys": [jwk(small, "small")] if small else []}),
        "unsupported curve": _jwks_file(tmp_path, {"keys": [{"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA"}]}),
        "http 404": server.url("/missing.json"),
    }[case]
    v = TokenVerifier(jwks=source, issuer=ISS, audience=AUD)
    with pytest.raises(ConfigError) as ei:
        await v.start()
    assert priv["d"] not in str(ei.value)
    await v.close()


async def test_verify_before_start_is_invalid(keys) -> None:
    v = TokenVerifier(jwks="https://auth.example.org/jwks.json", issuer=ISS, audience=AUD)
    with pytest.raises(InvalidToken, match="^token verifier not started$"):
        await v.verify(sign(keys["rsa"]))
