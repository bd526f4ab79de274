"""Upstream credential injection: KV bearer/basic through a real OpenBao, OAuth2 client_credentials
(SMART private_key_jwt RS384/ES384 and client_secret_basic) against a local token endpoint that
verifies the assertion, single-flight, refresh, Vault/endpoint outages. Last test: secret scan."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote_plus

import hvac
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.config import UpstreamCredentials
from sidecar.credentials import (
    ClientCredentialsGrant,
    CredentialUnavailable,
    StaticCredential,
    build_credential,
    ref_reader,
)
from sidecar.vault import VaultClient
from tests.openbao import OpenBao, SecretScan, openbao_fixture  # noqa: F401 (the `openbao` fixture)

SCAN = SecretScan()
CLIENT_ID = "ehr-backend-client"


@pytest.fixture(scope="module", autouse=True)
def _scan() -> Iterator[None]:
    SCAN.start()
    yield
    SCAN.stop()


class FakeClock:
    def __init__(self) -> None:
        self.t = 50_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def root_client(ob: OpenBao) -> hvac.Client:
    session = requests.Session()
    session.trust_env = False
    SCAN.secret(ob.root_token)
    return hvac.Client(url=ob.url, token=ob.root_token, session=session)


def put(root: hvac.Client, path: str, **data: str) -> None:
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=data)


def vault_reader(ob: OpenBao, clock: FakeClock | None = None) -> tuple[VaultClient, Any]:
    vc = VaultClient(ob.url, auth="token", token=ob.root_token, timeout_s=1, **({"clock": clock} if clock else {}))
    return vc, ref_reader(vault=vc)


def dict_reader(values: dict[str, str]) -> Any:
    def read(ref: str) -> str:
        return values[ref]

    return read


def rsa_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return SCAN.pem(pem), key.public_key()


def ec_pem() -> tuple[str, Any]:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return SCAN.pem(pem), key.public_key()


class TokenEndpoint:
    """A tiny OAuth2 token endpoint on 127.0.0.1 that verifies what a SMART server verifies."""

    def __init__(self) -> None:
        self.public_key: Any = None
        self.expected_kid: str | None = None
        self.client_secret: str | None = None
        self.expires_in: Any = 300
        self.token_type = "Bearer"
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.calls = 0
        self.errors: list[str] = []
        self.issued: list[str] = []
        self.jtis: set[str] = set()
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, body = endpoint.handle(self.headers, raw.decode())
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oauth/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reject(self, why: str) -> tuple[int, dict[str, Any]]:
        self.errors.append(why)
        return 400, {"error": "invalid_client", "error_description": why}

    def handle(self, headers: Any, raw: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_status:
            return self.fail_status, {"error": "temporarily_unavailable"}
        form = {k: v[0] for k, v in parse_qs(raw).items()}
        for sent in (form.get("client_assertion"), headers.get("Authorization")):
            if sent:
                SCAN.secret(sent.removeprefix("Basic "))
        if form.get("grant_type") != "client_credentials":
            return self._reject("grant_type")
        if self.public_key is not None:
            if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return self._reject("client_assertion_type")
            assertion = form.get("client_assertion", "")
            try:
                header = jwt.get_unverified_header(assertion)
                claims = jwt.decode(
                    assertion, self.public_key, algorithms=["RS384", "ES384"], audience=self.url,
                    issuer=CLIENT_ID, options={"require": ["exp", "iat", "jti", "sub", "iss", "aud"]},
                )
            except jwt.PyJWTError as e:
                return self._reject(f"assertion: {type(e).__name__}")
            if claims["sub"] != CLIENT_ID:
                return self._reject("sub")
            if claims["exp"] - time.time() > 300 or claims["exp"] - claims["iat"] > 300:
                return self._reject("exp more than 5 minutes ahead")
            if header.get("typ") != "JWT" or (self.expected_kid and header.get("kid") != self.expected_kid):
                return self._reject("header")
            if not header.get("kid"):
                return self._reject("no kid")
            with self._lock:
                if claims["jti"] in self.jtis or len(claims["jti"]) < 16:
                    return self._reject("jti replay")
                self.jtis.add(claims["jti"])
        elif self.client_secret is not None:
            expected = "Basic " + base64.b64encode(
                f"{quote_plus(CLIENT_ID)}:{quote_plus(self.client_secret)}".encode()).decode()
            if headers.get("Authorization") != expected:
                return self._reject("client_secret_basic")
        if form.get("scope") != "system/Observation.c system/Observation.r":
            return self._reject("scope")
        token = SCAN.secret(f"at-{self.calls}-{secrets.token_urlsafe(24)}")
        self.issued.append(token)
        body: dict[str, Any] = {"access_token": token, "token_type": self.token_type, "scope": form["scope"]}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return 200, body


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    ep = TokenEndpoint()
    yield ep
    ep.close()


SCOPE = "system/Observation.c system/Observation.r"


async def expect_unavailable(coro: Any) -> CredentialUnavailable:
    with pytest.raises(CredentialUnavailable) as ei:
        await coro
    SCAN.exc(ei.value)
    return ei.value


# ---- KV bearer / basic ---------------------------------------------------------------------------

async def test_kv_bearer_shorthand_and_basic_object(openbao: OpenBao) -> None:
    root = root_client(openbao)
    token = SCAN.secret("lab-" + secrets.token_urlsafe(24))
    password = SCAN.secret("p@ss:" + secrets.token_urlsafe(16))
    put(root, "ehr/lab-feed", token=token)
    put(root, "ehr/lab-basic", password=password)
    _vc, reader = vault_reader(openbao)

    bearer = build_credential("vault:secret/data/ehr/lab-feed#token", reader)
    assert isinstance(bearer, StaticCredential)
    await bearer.prime()
    assert await bearer.authorization() == f"Bearer {token}"

    model = UpstreamCredentials(type="basic", username="lab-feed", password="vault:secret/data/ehr/lab-basic#password")
    basic = build_credential(model, reader)
    header = await basic.authorization()
    assert header == "Basic " + base64.b64encode(f"lab-feed:{password}".encode()).decode()
    SCAN.secret(header.split()[1])
    SCAN.text(repr(bearer), repr(basic), str(bearer))

    as_dict = build_credential({"type": "bearer", "token": "vault:secret/data/ehr/lab-feed#token"}, reader)
    assert await as_dict.authorization() == f"Bearer {token}"


async def test_vault_stopped_mid_run_serves_cache_until_max_age_then_503(openbao: OpenBao) -> None:
    root = root_client(openbao)
    token = SCAN.secret("feed-" + secrets.token_urlsafe(24))
    put(root, "ehr/lab-feed", token=token)
    clock = FakeClock()
    _vc, reader = vault_reader(openbao, clock)
    cred = build_credential("vault:secret/data/ehr/lab-feed#token", reader, clock=clock)
    assert await cred.authorization() == f"Bearer {token}"

    # Rotation while Vault is up: picked up after refresh_after_s (300 s).
    rotated = SCAN.secret("feed-" + secrets.token_urlsafe(24))
    put(root, "ehr/lab-feed", token=rotated)
    clock.advance(299)
    assert await cred.authorization() == f"Bearer {token}"
    clock.advance(2)
    assert await cred.authorization() == f"Bearer {rotated}"

    openbao.stop()
    clock.advance(301)  # due for a re-read; Vault is down → cached value, still within max age
    assert await cred.authorization() == f"Bearer {rotated}"
    clock.advance(598)  # 899 s after the last good read
    assert await cred.authorization() == f"Bearer {rotated}"
    clock.advance(2)  # 901 s: too old → 503
    e = await expect_unavailable(cred.authorization())
    assert "vault:secret/data/ehr/lab-feed#token" in str(e) and "unreachable" in str(e)
    assert rotated not in str(e)


async def test_vault_down_at_start_refuses(openbao: OpenBao) -> None:
    _vc, reader = vault_reader(openbao)
    openbao.stop()
    cred = build_credential("vault:secret/data/ehr/lab-feed#token", reader)
    e = await expect_unavailable(cred.prime())
    assert "unreachable" in str(e)


async def test_static_value_checks_and_backoff() -> None:
    calls: list[str] = []
    values = {"env:TOK": "abc\r\nX-Injected: 1", "env:PW": "ok"}

    def reader(ref: str) -> str:
        calls.append(ref)
        if ref == "env:MISSING":
            raise KeyError(ref)
        return values[ref]

    bad = build_credential("env:TOK", reader)
    e = await expect_unavailable(bad.authorization())
    assert "not a usable bearer token" in str(e) and "Injected" not in str(e)

    clock = FakeClock()
    missing = build_credential("env:MISSING", reader, clock=clock)
    await expect_unavailable(missing.authorization())
    await expect_unavailable(missing.authorization())  # within retry_s: no second read
    assert calls.count("env:MISSING") == 1
    clock.advance(6)
    await expect_unavailable(missing.authorization())
    assert calls.count("env:MISSING") == 2

    with pytest.raises(ValueError, match="username"):
        build_credential({"type": "basic", "username": "a:b", "password": "env:PW"}, reader)
    with pytest.raises(ValueError, match="never an inline value"):
        build_credential("plain-secret-value", reader)
    with pytest.raises(ValueError, match="type must be"):
        build_credential({"type": "digest"}, reader)


async def test_static_single_flight_and_invalidate() -> None:
    calls = 0

    def reader(ref: str) -> str:
        nonlocal calls
        calls += 1
        time.sleep(0.1)
        return SCAN.secret(f"tok-{calls}-" + "x" * 12)

    clock = FakeClock()
    cred = build_credential({"type": "bearer", "token": "env:T"}, reader, clock=clock)
    got = await asyncio.gather(*(cred.authorization() for _ in range(50)))
    assert calls == 1 and len(set(got)) == 1
    cred.invalidate()  # too soon after the read (< 10 s): ignored
    assert await cred.authorization() == got[0] and calls == 1
    clock.advance(11)
    cred.invalidate()  # the upstream said 401: re-read on next use
    assert await cred.authorization() != got[0] and calls == 2


# ---- client_credentials: private_key_jwt -----------------------------------------------------------

async def test_private_key_jwt_rs384_from_vault_single_flight(openbao: OpenBao, endpoint: TokenEndpoint) -> None:
    pem, public = rsa_pem()
    endpoint.public_key = public
    endpoint.delay_s = 0.3
    put(root_client(openbao), "ehr/smart", private_key=pem)
    _vc, reader = vault_reader(openbao)
    spec = {"type": "client_credentials", "token_url": endpoint.url, "client_id": CLIENT_ID,
            "private_key": "vault:secret/data/ehr/smart#private_key", "scope": SCOPE}
    cred = build_credential(spec, reader)
    assert isinstance(cred, ClientCredentialsGrant) and cred.method == "private_key_jwt"
    await cred.prime()
    got = await asyncio.gather(*(cred.authorization() for _ in range(50)))
    assert endpoint.errors == []
    assert endpoint.calls == 1
    assert set(got) == {f"Bearer {endpoint.issued[0]}"}
    SCAN.text(repr(cred), str(cred))
    await cred.aclose()


async def test_private_key_jwt_es384_kid_and_model(endpoint: TokenEndpoint) -> None:
    pem, public = ec_pem()
    endpoint.public_key = public
    endpoint.expected_kid = "sidecar-2026"
    model = UpstreamCredentials(type="client_credentials", token_url=endpoint.url, client_id=CLIENT_ID,
                                private_key="env:SMART_KEY")
    # scope / kid are not (yet) in the config model: passed as options here.
    cred = build_credential(model, dict_reader({"env:SMART_KEY": pem}), scope=SCOPE, kid="sidecar-2026")
    assert (await cred.authorization()) == f"Bearer {endpoint.issued[0]}"
    assert endpoint.errors == []
    await cred.aclose()


async def test_refresh_before_expiry(endpoint: TokenEndpoint) -> None:
    pem, public = rsa_pem()
    endpoint.public_key = public
    clock = FakeClock()
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"file:key.pem": pem}),
                                  private_key_ref="file:key.pem", scope=SCOPE, clock=clock)
    first = await cred.authorization()
    clock.advance(269)  # expires_in 300, margin min(60 s, 10 %) = 30 s → refresh at 270 s
    assert await cred.authorization() == first and endpoint.calls == 1
    clock.advance(2)
    second = await cred.authorization()
    assert second != first and endpoint.calls == 2
    assert second == f"Bearer {endpoint.issued[1]}"
    # A long-lived token refreshes 60 s before its expiry.
    endpoint.expires_in = 3600
    clock.advance(271)
    third = await cred.authorization()
    assert endpoint.calls == 3
    clock.advance(3539)
    assert await cred.authorization() == third
    clock.advance(2)
    assert await cred.authorization() != third and endpoint.calls == 4
    assert endpoint.errors == []
    await cred.aclose()


async def test_invalidate_after_upstream_401(endpoint: TokenEndpoint) -> None:
    secret = SCAN.secret("cs-" + secrets.token_urlsafe(16))
    endpoint.client_secret = secret
    clock = FakeClock()
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:S": secret}),
                                  client_secret_ref="env:S", scope=SCOPE, clock=clock)
    first = await cred.authorization()
    cred.invalidate()  # within 10 s of issue: ignored (no token-request storm from repeated 401s)
    assert await cred.authorization() == first and endpoint.calls == 1
    clock.advance(11)
    cred.invalidate()
    assert await cred.authorization() != first and endpoint.calls == 2
    await cred.aclose()


async def test_refresh_failure_uses_cached_token_then_503(endpoint: TokenEndpoint) -> None:
    pem, public = rsa_pem()
    endpoint.public_key = public
    clock = FakeClock()
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                  private_key_ref="env:K", scope=SCOPE, clock=clock)
    first = await cred.authorization()
    endpoint.fail_status = 503
    clock.advance(271)
    assert await cred.authorization() == first  # refresh failed: cached token, still unexpired
    assert endpoint.calls == 2
    clock.advance(2)
    assert await cred.authorization() == first and endpoint.calls == 2  # backing off (retry_s 5 s)
    clock.advance(4)
    assert await cred.authorization() == first and endpoint.calls == 3
    clock.advance(19)  # 296 s: past usable (300 − min(5 s, 5 %)) → 503
    e = await expect_unavailable(cred.authorization())
    assert "token endpoint answered 503 (temporarily_unavailable)" in str(e)
    assert endpoint.issued[0] not in str(e)
    calls = endpoint.calls
    e = await expect_unavailable(cred.authorization())  # within the back-off: no request
    assert endpoint.calls == calls
    endpoint.fail_status = None
    clock.advance(6)
    assert await cred.authorization() == f"Bearer {endpoint.issued[-1]}"
    await cred.aclose()


async def test_vault_down_later_client_credentials(openbao: OpenBao, endpoint: TokenEndpoint) -> None:
    pem, public = rsa_pem()
    endpoint.public_key = public
    put(root_client(openbao), "ehr/smart", private_key=pem)
    clock = FakeClock()
    _vc, reader = vault_reader(openbao, clock)
    cred = build_credential({"type": "client_credentials", "token_url": endpoint.url, "client_id": CLIENT_ID,
                             "private_key": "vault:secret/data/ehr/smart#private_key"}, reader,
                            clock=clock, scope=SCOPE)
    await cred.authorization()
    openbao.stop()
    clock.advance(271)  # token refresh: the key (read 271 s ago) is still fresh → new token
    second = await cred.authorization()
    assert endpoint.calls == 2
    clock.advance(271)  # 542 s: key re-read fails (Vault down), cached key within max age → signs
    third = await cred.authorization()
    assert third != second and endpoint.calls == 3
    clock.advance(360)  # 902 s: key too old, token (from 542 s) expired → 503
    e = await expect_unavailable(cred.authorization())
    assert "unreachable" in str(e)
    assert endpoint.errors == []
    await cred.aclose()


async def test_wrong_key_is_rejected_without_leaking(endpoint: TokenEndpoint) -> None:
    pem, _ = rsa_pem()
    _, other_public = rsa_pem()
    endpoint.public_key = other_public
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                  private_key_ref="env:K", scope=SCOPE)
    e = await expect_unavailable(cred.authorization())
    assert "token endpoint answered 400 (invalid_client)" in str(e)
    await cred.aclose()


async def test_unusable_keys_and_responses(endpoint: TokenEndpoint) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    SCAN.pem(weak)
    SCAN.pem(p256)
    garbage = SCAN.secret("-----BEGIN PRIVATE KEY-----\nnotakeyatall" + secrets.token_hex(8) + "\n-----END PRIVATE KEY-----")
    for pem, text in [(weak, "at least 2048 bits"), (p256, "EC P-384"), (garbage, "not a usable unencrypted PEM")]:
        cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                      private_key_ref="env:K", scope=SCOPE)
        e = await expect_unavailable(cred.prime())
        assert text in str(e)
    assert endpoint.calls == 0

    pem, public = ec_pem()
    endpoint.public_key = public
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                  private_key_ref="env:K", scope=SCOPE, algorithm="RS384")
    e = await expect_unavailable(cred.prime())
    assert "does not fit algorithm RS384" in str(e)

    endpoint.token_type = "mac"
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                  private_key_ref="env:K", scope=SCOPE)
    e = await expect_unavailable(cred.authorization())
    assert "token_type is not Bearer" in str(e)
    endpoint.token_type = "bearer"
    endpoint.expires_in = "soon"
    clock = FakeClock()
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:K": pem}),
                                  private_key_ref="env:K", scope=SCOPE, clock=clock)
    e = await expect_unavailable(cred.authorization())
    assert "invalid expires_in" in str(e)
    endpoint.expires_in = None  # absent → 300 s default
    clock.advance(10)
    assert (await cred.authorization()).startswith("Bearer at-")
    await cred.aclose()

    with pytest.raises(ValueError, match="https"):
        ClientCredentialsGrant("http://auth.example.org/token", CLIENT_ID, reader=dict_reader({}), private_key_ref="env:K")
    with pytest.raises(ValueError, match="exactly one"):
        ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({}))
    with pytest.raises(ValueError, match="token_url and client_id"):
        build_credential({"type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "env:S"}, dict_reader({}))


async def test_token_endpoint_unreachable() -> None:
    from tests.openbao import free_port

    cred = ClientCredentialsGrant(f"http://127.0.0.1:{free_port()}/token", CLIENT_ID,
                                  reader=dict_reader({"env:S": SCAN.secret("s-" + secrets.token_hex(12))}),
                                  client_secret_ref="env:S", timeout_s=2)
    e = await expect_unavailable(cred.authorization())
    assert "token endpoint unreachable" in str(e)
    await cred.aclose()


# ---- client_credentials: client secret -------------------------------------------------------------

async def test_client_secret_basic_from_vault(openbao: OpenBao, endpoint: TokenEndpoint) -> None:
    secret = SCAN.secret("cs+/:%&" + secrets.token_urlsafe(20))
    endpoint.client_secret = secret
    endpoint.delay_s = 0.2
    put(root_client(openbao), "ehr/oauth", client_secret=secret)
    _vc, reader = vault_reader(openbao)
    model = UpstreamCredentials(type="client_credentials", token_url=endpoint.url, client_id=CLIENT_ID,
                                client_secret="vault:secret/data/ehr/oauth#client_secret")
    cred = build_credential(model, reader, scope=SCOPE)
    assert cred.method == "client_secret_basic"  # type: ignore[attr-defined]
    got = await asyncio.gather(*(cred.authorization() for _ in range(50)))
    assert endpoint.errors == [] and endpoint.calls == 1
    assert set(got) == {f"Bearer {endpoint.issued[0]}"}
    SCAN.text(repr(cred))

    endpoint.client_secret = "rotated-elsewhere-" + secrets.token_hex(8)
    SCAN.secret(endpoint.client_secret)
    cred2 = build_credential(model, reader, scope=SCOPE)
    e = await expect_unavailable(cred2.authorization())
    assert "answered 400 (invalid_client)" in str(e)
    await cred.aclose()
    await cred2.aclose()


async def test_cancelled_caller_does_not_cancel_shared_refresh(endpoint: TokenEndpoint) -> None:
    secret = SCAN.secret("cs-" + secrets.token_urlsafe(16))
    endpoint.client_secret = secret
    endpoint.delay_s = 0.3
    cred = ClientCredentialsGrant(endpoint.url, CLIENT_ID, reader=dict_reader({"env:S": secret}),
                                  client_secret_ref="env:S", scope=SCOPE)
    first = asyncio.create_task(cred.authorization())
    await asyncio.sleep(0.05)
    second = asyncio.create_task(cred.authorization())
    await asyncio.sleep(0.05)
    first.cancel()
    assert (await second).startswith("Bearer at-1-")
    assert endpoint.calls == 1
    await cred.aclose()


def test_zz_no_secret_in_logs_errors_or_reprs() -> None:
    assert any("upstream token obtained" in t for t in SCAN.texts)  # the log capture worked
    assert any("upstream token request failed" in t for t in SCAN.texts)
    assert any("secret re-read failed; using the cached value" in t for t in SCAN.texts)
    SCAN.assert_clean()
