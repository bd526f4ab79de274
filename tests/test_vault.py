"""VaultClient against a real OpenBao dev server: token / AppRole / Kubernetes auth, KV reads,
renewal, re-login, expiry, Vault down. The last test scans everything captured for secrets."""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import hvac
import hvac.exceptions
import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.secretrefs import SecretError, resolve
from sidecar.vault import VaultClient, VaultError, run_renewal
from tests.openbao import OpenBao, SecretScan, free_port, openbao_fixture  # noqa: F401 (the `openbao` fixture)

SCAN = SecretScan()

POLICY = 'path "secret/data/ehr/*" { capabilities = ["read"] }\npath "kv1/*" { capabilities = ["read"] }\n'


@pytest.fixture(scope="module", autouse=True)
def _scan() -> Iterator[None]:
    SCAN.start()
    yield
    SCAN.stop()


class FakeClock:
    def __init__(self) -> None:
        self.t = 10_000.0

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
    for v in data.values():
        SCAN.secret(v)
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=data)


def setup_approle(root: hvac.Client, ttl: str = "60s", max_ttl: str = "600s") -> tuple[str, str]:
    root.sys.create_or_update_policy("ehr-read", POLICY)
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        "sidecar", token_policies=["ehr-read"], token_ttl=ttl, token_max_ttl=max_ttl,
    )
    role_id = root.auth.approle.read_role_id("sidecar")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("sidecar")["data"]["secret_id"]
    return role_id, SCAN.secret(secret_id)


def expect_vault_error(fn, *args) -> VaultError:  # type: ignore[no-untyped-def]
    with pytest.raises(VaultError) as ei:
        fn(*args)
    SCAN.exc(ei.value)
    return ei.value


def accessor(vc: VaultClient) -> str:
    if vc._token:
        SCAN.secret(vc._token)  # tokens issued by AppRole / Kubernetes logins count as secrets too
    return vc._hvac.auth.token.lookup_self()["data"]["accessor"]


def test_token_login_and_kv2_read_with_cache_and_rotation(openbao: OpenBao) -> None:
    url, root_token = openbao
    root = root_client(openbao)
    value = "lab-" + secrets.token_hex(16)
    put(root, "ehr/lab-feed", token=value, other="x-" + secrets.token_hex(8))
    clock = FakeClock()
    vc = VaultClient(url, auth="token", token=root_token, clock=clock, cache_ttl_s=60)
    vc.login()
    assert vc.read("secret/data/ehr/lab-feed", "token") == value
    SCAN.text(repr(vc), str(vc), vc.status())
    assert root_token not in repr(vc) and root_token not in str(vc.status())

    # Rotation: served from the cache until cache_ttl_s, then re-read.
    rotated = "lab-" + secrets.token_hex(16)
    put(root, "ehr/lab-feed", token=rotated)
    clock.advance(59)
    assert vc.read("secret/data/ehr/lab-feed", "token") == value
    clock.advance(2)
    assert vc.read("secret/data/ehr/lab-feed", "token") == rotated

    # Through the secret-reference resolver, as the config uses it.
    sec = resolve("vault:secret/data/ehr/lab-feed#token", vault=vc.read)
    assert sec.reveal() == rotated
    SCAN.text(repr(sec), str(sec))

    e = expect_vault_error(vc.read, "secret/data/ehr/lab-feed", "missing")
    assert "no field 'missing'" in str(e)
    e = expect_vault_error(vc.read, "secret/data/ehr/nothing-here", "token")
    assert "no secret at secret/data/ehr/nothing-here" in str(e)
    e = expect_vault_error(vc.read, "secret/data/../../sys/health", "x")
    assert "invalid secret path" in str(e)
    with pytest.raises(SecretError) as ei:
        resolve("vault:secret/data/ehr/nothing-here#token", vault=vc.read)
    SCAN.exc(ei.value)
    vc.close()


def test_kv2_deleted_version_and_non_string_field(openbao: OpenBao) -> None:
    root = root_client(openbao)
    put(root, "ehr/gone", token="gone-" + secrets.token_hex(8))
    root.secrets.kv.v2.create_or_update_secret(path="ehr/num", secret={"n": 5})
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="token", token=openbao.root_token, clock=clock)
    assert vc.read("secret/data/ehr/gone", "token").startswith("gone-")
    root.secrets.kv.v2.delete_latest_version_of_secret(path="ehr/gone")
    clock.advance(61)
    e = expect_vault_error(vc.read, "secret/data/ehr/gone", "token")
    assert "secret/data/ehr/gone" in str(e)
    e = expect_vault_error(vc.read, "secret/data/ehr/num", "n")
    assert "is not a string" in str(e)


def test_kv1_read(openbao: OpenBao) -> None:
    root = root_client(openbao)
    root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    pw = SCAN.secret("pw-" + secrets.token_hex(12))
    root.secrets.kv.v1.create_or_update_secret(path="app", secret={"password": pw, "data": "not-v2"}, mount_point="kv1")
    vc = VaultClient(openbao.url, auth="token", token=openbao.root_token)
    assert vc.read("kv1/app", "password") == pw
    assert vc.read("kv1/app", "data") == "not-v2"


def test_vault_down_at_start_refuses_clearly() -> None:
    port = free_port()
    token = SCAN.secret("tok-" + secrets.token_hex(16))
    vc = VaultClient(f"http://127.0.0.1:{port}", auth="token", token=token, timeout_s=1)
    e = expect_vault_error(vc.login)
    assert str(e) == f"vault: login (token) at http://127.0.0.1:{port} failed: unreachable"
    sid = SCAN.secret("sid-" + secrets.token_hex(16))
    vc2 = VaultClient(f"http://127.0.0.1:{port}", auth="approle", role_id="r", secret_id=sid, timeout_s=1)
    e = expect_vault_error(vc2.login)
    assert "login (approle)" in str(e) and "unreachable" in str(e)
    e = expect_vault_error(vc2.read, "secret/data/ehr/x", "token")
    assert "unreachable" in str(e)
    SCAN.text(repr(vc), repr(vc2))


def test_wrong_token_is_refused(openbao: OpenBao) -> None:
    bogus = SCAN.secret("hvs." + secrets.token_urlsafe(24))
    vc = VaultClient(openbao.url, auth="token", token=bogus)
    e = expect_vault_error(vc.login)
    assert "permission denied (403)" in str(e)


def test_config_shape_errors_without_network() -> None:
    for kwargs, text in [
        ({"url": "http://vault.example.org:8200", "auth": "token", "token": "t"}, "only allowed on loopback"),
        ({"url": "https://u:p@vault.example.org", "auth": "token", "token": "t"}, "must not carry"),
        ({"url": "https://vault.example.org", "auth": "approle", "role_id": "r"}, "needs role_id and secret_id"),
        ({"url": "https://vault.example.org", "auth": "kubernetes"}, "needs role"),
        ({"url": "https://vault.example.org", "auth": "ldap"}, "must be one of"),
    ]:
        url = kwargs.pop("url")
        with pytest.raises(VaultError, match=text):
            VaultClient(url, **kwargs)  # type: ignore[arg-type]


def test_from_config_resolves_env_and_refuses_vault_refs(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
    root = root_client(openbao)
    put(root, "ehr/cfg", token="cfg-" + secrets.token_hex(8))
    monkeypatch.setenv("TEST_VAULT_TOKEN", openbao.root_token)
    vc = VaultClient.from_config({"url": openbao.url, "auth": "token", "token": "env:TEST_VAULT_TOKEN"})
    assert vc.read("secret/data/ehr/cfg", "token").startswith("cfg-")
    with pytest.raises(VaultError, match="cannot itself be a vault: reference"):
        VaultClient.from_config({"url": openbao.url, "auth": "token", "token": "vault:secret/data/x#t"})
    e = None
    try:
        VaultClient.from_config({"url": openbao.url, "auth": "token", "token": "env:TEST_VAULT_UNSET_X"})
    except VaultError as err:
        e = SCAN.exc(err)
    assert e is not None and "TEST_VAULT_UNSET_X is not set" in str(e)


def test_approle_login_renewal_and_relogin(openbao: OpenBao) -> None:
    root = root_client(openbao)
    role_id, secret_id = setup_approle(root, ttl="60s", max_ttl="600s")
    value = "ap-" + secrets.token_hex(12)
    put(root, "ehr/lab-feed", token=value)
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="approle", role_id=role_id, secret_id=secret_id, clock=clock)
    vc.login()
    assert vc.read("secret/data/ehr/lab-feed", "token") == value
    first = accessor(vc)
    st = vc.status()
    assert st["logged_in"] and st["renewable"] and 55 <= st["expires_in_s"] <= 60
    assert 35 <= vc.seconds_until_renewal() <= 40  # 2/3 of 60 s

    clock.advance(30)
    vc.renew_if_needed()  # too early: nothing happens
    assert vc.status()["expires_in_s"] <= 30

    clock.advance(11)  # 41 s: past 2/3 → renew-self, same token
    vc.renew_if_needed()
    assert accessor(vc) == first
    assert vc.status()["expires_in_s"] >= 55

    # Renewal fails (token revoked) → re-login with the AppRole → a new token that works.
    root.auth.token.revoke_accessor(first)
    clock.advance(41)
    vc.renew_if_needed()
    second = accessor(vc)
    assert second != first
    clock.advance(61)  # also past the read cache
    assert vc.read("secret/data/ehr/lab-feed", "token") == value

    # A revoked token met by a read (no renewal in between) → one re-login, then the read succeeds.
    root.auth.token.revoke_accessor(second)
    clock.advance(61)
    assert vc.read("secret/data/ehr/lab-feed", "token") == value
    assert accessor(vc) not in (first, second)

    # Secret id revoked too: renewal and re-login fail → VaultError without the secret id.
    root.auth.token.revoke_accessor(accessor(vc))
    root.auth.approle.destroy_secret_id("sidecar", secret_id)
    clock.advance(41)
    e = expect_vault_error(vc.renew_if_needed)
    assert "login (approle)" in str(e)
    SCAN.text(repr(vc), vc.status())


def test_approle_relogin_when_token_expired_on_read(openbao: OpenBao) -> None:
    root = root_client(openbao)
    role_id, secret_id = setup_approle(root, ttl="60s")
    put(root, "ehr/a", token="a-" + secrets.token_hex(8))
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="approle", role_id=role_id, secret_id=secret_id, clock=clock)
    vc.read("secret/data/ehr/a", "token")  # logs in on first use
    first = accessor(vc)
    clock.advance(120)  # past the token's expiry by our clock: re-login before reading
    assert vc.read("secret/data/ehr/a", "token").startswith("a-")
    assert accessor(vc) != first


def test_approle_relogin_near_max_ttl(openbao: OpenBao) -> None:
    # Real time: the server caps renewals at the max TTL, so a fake clock cannot get there.
    root = root_client(openbao)
    role_id, secret_id = setup_approle(root, ttl="3s", max_ttl="3s")
    vc = VaultClient(openbao.url, auth="approle", role_id=role_id, secret_id=secret_id)
    vc.login()
    first = accessor(vc)
    time.sleep(max(0.0, vc.seconds_until_renewal()) + 0.05)
    vc.renew_if_needed()  # renewal capped by the max TTL (≤ 1 s left) → re-login
    assert accessor(vc) != first
    assert vc.status()["expires_in_s"] > 2


def test_token_auth_not_renewable_expires(openbao: OpenBao) -> None:
    root = root_client(openbao)
    root.sys.create_or_update_policy("ehr-read", POLICY)
    put(root, "ehr/t", token="t-" + secrets.token_hex(8))
    tok = root.auth.token.create(policies=["ehr-read"], ttl="60s", renewable=False)["auth"]["client_token"]
    SCAN.secret(tok)
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="token", token=tok, clock=clock)
    vc.login()
    assert vc.status()["renewable"] is False
    clock.advance(45)
    vc.renew_if_needed()  # cannot renew, still valid: no error
    assert vc.read("secret/data/ehr/t", "token").startswith("t-")
    clock.advance(16)
    e = expect_vault_error(vc.renew_if_needed)
    assert "expired and cannot be renewed (not renewable)" in str(e)
    clock.advance(61)
    e = expect_vault_error(vc.read, "secret/data/ehr/t", "token")
    assert "expired" in str(e)


def test_token_auth_renewable_is_renewed(openbao: OpenBao) -> None:
    root = root_client(openbao)
    root.sys.create_or_update_policy("ehr-read", POLICY)
    created = root.auth.token.create(policies=["ehr-read"], ttl="60s", renewable=True)["auth"]
    tok = SCAN.secret(created["client_token"])
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="token", token=tok, clock=clock)
    vc.login()
    clock.advance(41)
    vc.renew_if_needed()
    assert vc.status()["expires_in_s"] >= 55
    assert accessor(vc) == created["accessor"]
    # Revoked: renewal fails, the token is kept until its expiry, then VaultError.
    root.auth.token.revoke_accessor(created["accessor"])
    clock.advance(41)
    vc.renew_if_needed()
    clock.advance(20)
    e = expect_vault_error(vc.renew_if_needed)
    assert "renewal failed" in str(e)


def test_root_token_never_renews(openbao: OpenBao) -> None:
    vc = VaultClient(openbao.url, auth="token", token=openbao.root_token)
    vc.login()
    assert vc.seconds_until_renewal() == float("inf")
    vc.renew_if_needed()
    assert vc.status()["expires_in_s"] is None


class _TokenReview(BaseHTTPRequestHandler):
    """A stand-in Kubernetes API: TokenReview accepts exactly the JWTs in `valid`."""

    valid: ClassVar[set[str]] = set()
    calls: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(self.path)
        ok = body.get("spec", {}).get("token") in self.valid
        status = {"authenticated": ok}
        if ok:
            status["user"] = {"username": "system:serviceaccount:ehr:sidecar", "uid": "uid-1", "groups": []}
        raw = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


def _sa_jwt(key: ec.EllipticCurvePrivateKey) -> str:
    claims = {
        "iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:ehr:sidecar",
        "kubernetes.io/serviceaccount/namespace": "ehr",
        "kubernetes.io/serviceaccount/service-account.name": "sidecar",
        "kubernetes.io/serviceaccount/service-account.uid": "uid-1",
        "jti": secrets.token_hex(8),
    }
    return SCAN.secret(jwt.encode(claims, key, algorithm="ES256"))


def test_kubernetes_login_rereads_the_projected_token(openbao: OpenBao, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _TokenReview.valid, _TokenReview.calls = set(), []
    kube = ThreadingHTTPServer(("127.0.0.1", 0), _TokenReview)
    threading.Thread(target=kube.serve_forever, daemon=True).start()
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-kube-ca")])
        now = datetime.datetime.now(datetime.UTC)
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        root = root_client(openbao)
        root.sys.create_or_update_policy("ehr-read", POLICY)
        root.sys.enable_auth_method("kubernetes")
        root.write("auth/kubernetes/config", kubernetes_host=f"http://127.0.0.1:{kube.server_port}",
                   kubernetes_ca_cert=ca, disable_local_ca_jwt=True, token_reviewer_jwt="reviewer")
        root.write("auth/kubernetes/role/sidecar", bound_service_account_names="sidecar",
                   bound_service_account_namespaces="ehr", token_ttl="60s", token_policies="ehr-read")
        put(root, "ehr/k8s", token="k8s-" + secrets.token_hex(8))

        jwt1, jwt2 = _sa_jwt(key), _sa_jwt(key)
        _TokenReview.valid = {jwt1}
        jwt_file = tmp_path / "token"
        jwt_file.write_text(jwt1 + "\n")
        clock = FakeClock()
        vc = VaultClient(openbao.url, auth="kubernetes", role="sidecar", jwt_path=str(jwt_file), clock=clock)
        assert vc.read("secret/data/ehr/k8s", "token").startswith("k8s-")
        assert vc.status()["renewable"]

        # The kubelet rotated the projected token; the old one is no longer accepted.
        _TokenReview.valid = {jwt2}
        jwt_file.write_text(jwt2)
        root.auth.token.revoke_accessor(accessor(vc))
        clock.advance(41)
        vc.renew_if_needed()  # renewal fails → re-login with the *new* file contents
        clock.advance(25)  # past the read cache, well within the new token's TTL
        assert vc.read("secret/data/ehr/k8s", "token").startswith("k8s-")
        assert len(_TokenReview.calls) == 2

        jwt_file.unlink()
        vc2 = VaultClient(openbao.url, auth="kubernetes", role="sidecar", jwt_path=str(jwt_file))
        e = expect_vault_error(vc2.login)
        assert "cannot read the service account token" in str(e) and str(jwt_file) in str(e)
        _TokenReview.valid = set()
        jwt_file.write_text(jwt1)
        e = expect_vault_error(vc2.login)
        assert "login (kubernetes)" in str(e)
    finally:
        kube.shutdown()
        kube.server_close()


async def test_run_renewal_renews_off_loop_and_survives_failures(openbao: OpenBao) -> None:
    root = root_client(openbao)
    role_id, secret_id = setup_approle(root, ttl="60s")
    clock = FakeClock()
    vc = VaultClient(openbao.url, auth="approle", role_id=role_id, secret_id=secret_id, clock=clock)
    await asyncio.to_thread(vc.login)
    first = await asyncio.to_thread(accessor, vc)
    stop = asyncio.Event()
    task = asyncio.create_task(run_renewal(vc, stop, min_interval_s=0.01, max_interval_s=0.02, retry_s=0.02))
    await asyncio.sleep(0.1)
    assert vc.status()["expires_in_s"] >= 59  # nothing to do yet
    clock.advance(41)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if vc.status()["expires_in_s"] >= 55:
            break
    assert vc.status()["expires_in_s"] >= 55
    assert await asyncio.to_thread(accessor, vc) == first  # renewed, not re-logged-in

    openbao.stop()  # Vault gone: renewal and re-login fail, the loop keeps going
    clock.advance(41)
    await asyncio.sleep(0.15)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 2)


def test_zz_no_secret_in_logs_errors_or_reprs() -> None:
    for event in ("vault login succeeded", "vault token renewed", "vault token renewal failed",
                  "vault login failed", "vault token upkeep failed"):
        assert any(event in t for t in SCAN.texts), event  # the log capture saw our events
    assert len(SCAN.secrets) > 20
    SCAN.assert_clean()
