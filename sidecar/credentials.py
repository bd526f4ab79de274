"""Upstream credential injection for clients with `upstream_credentials`.

`build_credential(spec, reader)` turns the config value into an `UpstreamCredential` whose
`await authorization()` is the full `Authorization` header value for the upstream request. If it
raises `CredentialUnavailable`, the sidecar answers 503 and forwards nothing.

`reader` resolves a secret reference (`vault:PATH#field`, `env:NAME`, `file:PATH`) to its value; it
blocks, so it is always called in a worker thread (`asyncio.to_thread`). `ref_reader(base_dir=…,
vault=VaultClient)` builds one on `sidecar.secretrefs.resolve`.

Caching and rotation (every secret read through the reader, `_SecretCache`):
- a value is used from memory for `refresh_after_s` (300 s) after its last successful read, then
  re-read, single-flight (concurrent callers share one read). A rotated Vault value is therefore
  picked up within refresh_after_s (+ VaultClient.cache_ttl_s, 60 s).
- a failed re-read (Vault down) keeps serving the cached value until `max_age_s` (900 s) after the
  last successful read, retrying at most every `retry_s` (5 s); after that → CredentialUnavailable.
- `invalidate()` (e.g. the upstream answered 401) forces a re-read on next use (at most once per
  `min_invalidate_s`, 10 s), still bounded by max_age_s if Vault is down.

OAuth2 client credentials (`ClientCredentialsGrant`):
- `private_key` (SMART Backend Services, `private_key_jwt`): a client assertion signed RS384 (RSA
  ≥ 2048 bits) or ES384 (P-384), header `kid` (configured, else the RFC 7638 thumbprint of the
  public key) and `typ: JWT`, claims iss = sub = client_id, aud = token_url, exp = now + 240 s
  (≤ 5 min), iat, random `jti`; or `client_secret` sent as client_secret_basic (RFC 6749 §2.3.1:
  id and secret form-urlencoded, then Basic).
- the access token is cached; refresh starts at expires_in − min(60 s, 10 % of expires_in) after
  the request was sent (a 300 s token refreshes at 270 s, a 1 h token at 59 min), single-flight:
  concurrent callers await one token request. The token counts as usable until expires_in −
  min(5 s, 5 %) (a margin for the request in flight).
- refresh failed: the cached token is used while usable (retry at most every `retry_s`), then
  CredentialUnavailable; without a usable token, failures are not retried more often than every
  `retry_s` either (callers get 503 immediately instead of hammering the endpoint).
- token endpoint: https (http for loopback hosts only), TLS verified (`ca_bundle` or the system
  store), proxy environment variables ignored, redirects not followed, `timeout_s` (10 s).
- response checks: 200, JSON object, `access_token` of visible ASCII, `token_type` Bearer,
  `expires_in` > 0 (absent → `default_expires_in_s`, 300 s; capped at 24 h).

Nothing here logs or puts into an exception message a token, secret, key or assertion: messages
hold the client id, the reference or token URL, and a fixed description of the failure.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import json
import math
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote_plus, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.logs import get_logger
from sidecar.secretrefs import SecretError, check_ref, resolve

__all__ = [
    "ClientCredentialsGrant", "CredentialUnavailable", "SecretReader", "StaticCredential",
    "UpstreamCredential", "build_credential", "ref_reader",
]

SecretReader = Callable[[str], str]
T = TypeVar("T")

log = get_logger("sidecar.credentials")

_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OAUTH_ERROR = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAX_TOKEN_RESPONSE = 64 * 1024
_MAX_EXPIRES_IN = 86_400.0
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class CredentialUnavailable(Exception):
    """No usable upstream credential: answer 503, forward nothing. Never holds a secret."""


def _safe_reason(e: BaseException) -> str:
    """Messages of our own error types are secret-free by construction; others: the class name only."""
    from sidecar.vault import VaultError

    if isinstance(e, (SecretError, VaultError, CredentialUnavailable)):
        return str(e)
    return type(e).__name__


def ref_reader(*, base_dir: Path | None = None, vault: Any = None) -> SecretReader:
    """A reader over `sidecar.secretrefs.resolve`; `vault` is a VaultClient (or anything with .read)."""
    vault_read = vault.read if vault is not None else None

    def read(ref: str) -> str:
        if ref.startswith("vault:") and vault_read is not None:
            # Direct, so VaultError's (secret-free) reason survives: resolve() keeps only its type name.
            path, field = check_ref(ref)[len("vault:"):].split("#", 1)
            return vault_read(path, field)
        return resolve(ref, base_dir=base_dir, vault=vault_read).reveal()

    return read


class _SingleFlight:
    """Concurrent callers of `run` share one in-flight coroutine (per event loop)."""

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None

    async def run(self, factory: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(factory())  # type: ignore[arg-type]
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "unretrieved"
            self._task = task
        # shield: a caller that is cancelled must not cancel the others' refresh
        return await asyncio.shield(task)


class _SecretCache:
    """One secret reference read through the reader, cached with refresh / max-age semantics."""

    def __init__(
        self, ref: str, reader: SecretReader, *, clock: Callable[[], float],
        refresh_after_s: float, max_age_s: float, retry_s: float, min_invalidate_s: float,
    ) -> None:
        if not (0 < refresh_after_s <= max_age_s):
            raise ValueError("need 0 < refresh_after_s <= max_age_s")
        self.ref = ref
        self._reader = reader
        self._clock = clock
        self._refresh_after_s = refresh_after_s
        self._max_age_s = max_age_s
        self._retry_s = retry_s
        self._min_invalidate_s = min_invalidate_s
        self._value: str | None = None
        self._fetched = -math.inf
        self._stale = False
        self._next_try = -math.inf
        self._last_reason = ""
        self._flight = _SingleFlight()

    def __repr__(self) -> str:
        return f"_SecretCache({self.ref!r})"

    def invalidate(self) -> None:
        if self._clock() - self._fetched >= self._min_invalidate_s:
            self._stale = True
            self._next_try = -math.inf

    async def get(self) -> str:
        now = self._clock()
        value = self._value
        if value is not None and not self._stale and now < self._fetched + self._refresh_after_s:
            return value
        usable = value is not None and now < self._fetched + self._max_age_s
        if now < self._next_try:  # backing off after a failed read
            if usable:
                return value  # type: ignore[return-value]
            raise CredentialUnavailable(f"secret {self.ref} unavailable: {self._last_reason}")
        try:
            return await self._flight.run(self._read)
        except CredentialUnavailable:
            if usable and self._clock() < self._fetched + self._max_age_s:
                log.warning("secret re-read failed; using the cached value", component="credentials",
                            reasons=[self._last_reason])
                return value  # type: ignore[return-value]
            raise

    async def _read(self) -> str:
        started = self._clock()
        try:
            value = await asyncio.to_thread(self._reader, self.ref)
            if not isinstance(value, str) or not value:
                raise CredentialUnavailable(f"secret {self.ref} is empty")
        except Exception as e:  # noqa: BLE001 - reduced to a secret-free reason
            self._last_reason = _safe_reason(e)
            self._next_try = self._clock() + self._retry_s
            raise CredentialUnavailable(f"secret {self.ref} unavailable: {self._last_reason}") from None
        self._value, self._fetched, self._stale = value, started, False
        self._next_try = -math.inf
        return value


class UpstreamCredential(abc.ABC):
    """Provider of the upstream `Authorization` header value."""

    @abc.abstractmethod
    async def authorization(self) -> str:
        """The full header value (e.g. "Bearer abc"), or raise CredentialUnavailable."""

    async def prime(self) -> None:
        """Load the secret material now (start-up: raise CredentialUnavailable → refuse to start)."""

    def invalidate(self) -> None:
        """The upstream rejected the credential (401): fetch a fresh one on next use."""

    async def aclose(self) -> None:
        """Release network resources."""


class StaticCredential(UpstreamCredential):
    """A bearer token or basic username + password stored as secrets (e.g. in KV v2)."""

    def __init__(
        self, scheme: str, *, reader: SecretReader, token_ref: str | None = None,
        username: str | None = None, password_ref: str | None = None,
        clock: Callable[[], float] = time.monotonic, refresh_after_s: float = 300.0,
        max_age_s: float = 900.0, retry_s: float = 5.0, min_invalidate_s: float = 10.0,
    ) -> None:
        cache: dict[str, Any] = {"clock": clock, "refresh_after_s": refresh_after_s, "max_age_s": max_age_s,
                                 "retry_s": retry_s, "min_invalidate_s": min_invalidate_s}
        if scheme == "bearer":
            if not token_ref:
                raise ValueError("bearer upstream credentials need `token` (a secret reference)")
            self._secret = _SecretCache(check_ref(token_ref), reader, **cache)
        elif scheme == "basic":
            if not username or not password_ref:
                raise ValueError("basic upstream credentials need `username` and `password` (a secret reference)")
            if ":" in username or _CONTROL.search(username):
                raise ValueError("basic upstream credentials: username must not contain ':' or control characters")
            self._secret = _SecretCache(check_ref(password_ref), reader, **cache)
        else:
            raise ValueError(f"unknown static credential scheme {scheme!r}")
        self.scheme = scheme
        self.username = username

    def __repr__(self) -> str:
        who = f", username={self.username!r}" if self.username else ""
        return f"StaticCredential({self.scheme}{who}, ref={self._secret.ref!r})"

    async def prime(self) -> None:
        await self.authorization()

    def invalidate(self) -> None:
        self._secret.invalidate()

    async def authorization(self) -> str:
        value = await self._secret.get()
        if self.scheme == "bearer":
            if not _VISIBLE_ASCII.match(value):
                raise CredentialUnavailable(
                    f"secret {self._secret.ref} is not a usable bearer token (spaces or control characters)"
                )
            return f"Bearer {value}"
        if _CONTROL.search(value):
            raise CredentialUnavailable(f"secret {self._secret.ref} is not a usable password (control characters)")
        raw = f"{self.username}:{value}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _thumbprint(public_key: Any) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        members = {"e": _b64url_uint(nums.e), "kty": "RSA", "n": _b64url_uint(nums.n)}
    else:
        nums = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8

        def b64(v: int) -> str:
            return base64.urlsafe_b64encode(v.to_bytes(size, "big")).rstrip(b"=").decode("ascii")

        members = {"crv": "P-384", "kty": "EC", "x": b64(nums.x), "y": b64(nums.y)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")


def _check_endpoint_url(url: str, what: str) -> str:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{what} must be an absolute https URL")
    if u.username or u.password or u.fragment:
        raise ValueError(f"{what} must not carry credentials or a fragment")
    if u.scheme == "http":
        from sidecar.vault import _is_loopback

        if not _is_loopback(u.hostname):
            raise ValueError(f"{what} must use https (plain http only on loopback)")
    return url


class ClientCredentialsGrant(UpstreamCredential):
    """OAuth2 client_credentials: private_key_jwt (SMART Backend Services) or client_secret_basic."""

    def __init__(
        self, token_url: str, client_id: str, *, reader: SecretReader,
        private_key_ref: str | None = None, client_secret_ref: str | None = None,
        scope: str | None = None, kid: str | None = None, algorithm: str | None = None,
        ca_bundle: str | None = None, timeout_s: float = 10.0, http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
        assertion_lifetime_s: int = 240, refresh_margin_s: float = 60.0, refresh_fraction: float = 0.1,
        retry_s: float = 5.0, default_expires_in_s: float = 300.0,
        secret_refresh_after_s: float = 300.0, secret_max_age_s: float = 900.0,
    ) -> None:
        if (private_key_ref is None) == (client_secret_ref is None):
            raise ValueError("client_credentials needs exactly one of `private_key` or `client_secret`")
        if not client_id or _CONTROL.search(client_id):
            raise ValueError("client_credentials needs a `client_id`")
        if algorithm is not None and algorithm not in ("RS384", "ES384"):
            raise ValueError("client_credentials algorithm must be RS384 or ES384")
        if not 0 < assertion_lifetime_s <= 300:
            raise ValueError("the client assertion lifetime must be at most 5 minutes")
        self.token_url = _check_endpoint_url(token_url, "token_url")
        self.client_id = client_id
        self.scope = scope
        self._kid = kid
        self._algorithm = algorithm
        self._ca_bundle = ca_bundle
        self._timeout_s = timeout_s
        self._http = http_client
        self._own_http: httpx.AsyncClient | None = None
        self._own_http_loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock
        self._wall = wall_clock
        self._assertion_lifetime_s = assertion_lifetime_s
        self._refresh_margin_s = refresh_margin_s
        self._refresh_fraction = refresh_fraction
        self._retry_s = retry_s
        self._default_expires_in_s = default_expires_in_s
        cache: dict[str, Any] = {"clock": clock, "refresh_after_s": secret_refresh_after_s,
                                 "max_age_s": secret_max_age_s, "retry_s": retry_s, "min_invalidate_s": 10.0}
        ref = private_key_ref if private_key_ref is not None else client_secret_ref
        self._secret = _SecretCache(check_ref(ref or ""), reader, **cache)
        self.method = "private_key_jwt" if private_key_ref is not None else "client_secret_basic"
        self._key_cache: tuple[str, Any, str, str] | None = None  # (pem, key, alg, kid)
        # token state
        self._token: str | None = None
        self._refresh_at = -math.inf
        self._usable_until = -math.inf
        self._obtained = -math.inf
        self._next_try = -math.inf
        self._last_reason = ""
        self._flight = _SingleFlight()

    def __repr__(self) -> str:
        return (f"ClientCredentialsGrant(client_id={self.client_id!r}, token_url={self.token_url!r}, "
                f"method={self.method!r}, has_token={self._token is not None})")

    # ---- interface --------------------------------------------------------------------------

    async def prime(self) -> None:
        """Read and check the key / secret now (does not request a token)."""
        material = await self._secret.get()
        if self.method == "private_key_jwt":
            self._signing_key(material)

    def invalidate(self) -> None:
        if self._clock() - self._obtained >= 10.0:
            self._refresh_at = self._usable_until = -math.inf
            self._next_try = -math.inf

    async def aclose(self) -> None:
        if self._own_http is not None:
            await self._own_http.aclose()
            self._own_http = None

    async def authorization(self) -> str:
        now = self._clock()
        token = self._token
        if token is not None and now < self._refresh_at:
            return f"Bearer {token}"
        if token is not None and now < self._usable_until:
            if now >= self._next_try:
                try:
                    await self._flight.run(self._refresh)
                except CredentialUnavailable:
                    pass
            if self._token is not None and self._clock() < self._usable_until:
                return f"Bearer {self._token}"
            raise CredentialUnavailable(f"client {self.client_id}: no usable upstream token ({self._last_reason})")
        if now < self._next_try:
            raise CredentialUnavailable(
                f"client {self.client_id}: upstream token unavailable, retrying later ({self._last_reason})"
            )
        await self._flight.run(self._refresh)
        if self._token is None or self._clock() >= self._usable_until:
            raise CredentialUnavailable(f"client {self.client_id}: no usable upstream token")
        return f"Bearer {self._token}"

    # ---- token request ----------------------------------------------------------------------

    async def _refresh(self) -> None:
        sent_at = self._clock()
        try:
            token, expires_in = await self._request_token()
        except CredentialUnavailable as e:
            self._fail(str(e))
            raise
        except Exception as e:  # noqa: BLE001 - reduced to a secret-free reason
            reason = self._http_reason(e)
            self._fail(reason)
            raise CredentialUnavailable(f"client {self.client_id}: token request failed: {reason}") from None
        margin = min(self._refresh_margin_s, expires_in * self._refresh_fraction)
        skew = min(5.0, expires_in * 0.05)
        self._token = token
        self._obtained = sent_at
        self._refresh_at = sent_at + expires_in - margin
        self._usable_until = sent_at + expires_in - skew
        self._next_try = -math.inf
        self._last_reason = ""
        log.info("upstream token obtained", component="credentials", client_id=self.client_id)

    def _fail(self, reason: str) -> None:
        self._last_reason = reason
        self._next_try = self._clock() + self._retry_s
        log.warning("upstream token request failed", component="credentials", client_id=self.client_id,
                    reasons=[reason])

    @staticmethod
    def _http_reason(e: BaseException) -> str:
        if isinstance(e, httpx.TimeoutException):
            return "token endpoint timed out"
        if isinstance(e, httpx.ConnectError):
            return "token endpoint unreachable"
        if isinstance(e, httpx.HTTPError):
            return f"token endpoint error ({type(e).__name__})"
        return type(e).__name__

    def _client(self) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        loop = asyncio.get_running_loop()
        if self._own_http is None or self._own_http_loop is not loop:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=self._ca_bundle) if self._ca_bundle else True
            )
            self._own_http = httpx.AsyncClient(
                verify=verify, timeout=self._timeout_s, trust_env=False, follow_redirects=False,
            )
            self._own_http_loop = loop
        return self._own_http

    async def _request_token(self) -> tuple[str, float]:
        material = await self._secret.get()  # CredentialUnavailable if the secret is gone
        form: dict[str, str] = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.method == "private_key_jwt":
            form["client_assertion_type"] = JWT_BEARER
            form["client_assertion"] = self._assertion(material)
        else:
            basic = f"{quote_plus(self.client_id)}:{quote_plus(material)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(basic).decode("ascii")
        resp = await self._client().post(self.token_url, data=form, headers=headers)
        if len(resp.content) > _MAX_TOKEN_RESPONSE:
            raise CredentialUnavailable(f"client {self.client_id}: token response too large")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200:
            err = body.get("error") if isinstance(body, dict) else None
            code = f" ({err})" if isinstance(err, str) and _OAUTH_ERROR.match(err) else ""
            raise CredentialUnavailable(
                f"client {self.client_id}: token endpoint answered {resp.status_code}{code}"
            )
        if not isinstance(body, dict):
            raise CredentialUnavailable(f"client {self.client_id}: token response is not a JSON object")
        token = body.get("access_token")
        if not isinstance(token, str) or not _VISIBLE_ASCII.match(token):
            raise CredentialUnavailable(f"client {self.client_id}: token response has no usable access_token")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise CredentialUnavailable(f"client {self.client_id}: token_type is not Bearer")
        expires_in: Any = body.get("expires_in", self._default_expires_in_s)
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError):
            raise CredentialUnavailable(f"client {self.client_id}: token response has an invalid expires_in") from None
        if not (math.isfinite(expires_in) and expires_in > 0):
            raise CredentialUnavailable(f"client {self.client_id}: token response has an invalid expires_in")
        return token, min(expires_in, _MAX_EXPIRES_IN)

    # ---- private_key_jwt --------------------------------------------------------------------

    def _signing_key(self, pem: str) -> tuple[Any, str, str]:
        cached = self._key_cache
        if cached is not None and cached[0] == pem:
            return cached[1], cached[2], cached[3]
        bad = f"client {self.client_id}: private_key {self._secret.ref} is not a usable unencrypted PEM private key"
        try:
            key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
        except Exception:  # noqa: BLE001 - never echo key parsing errors
            raise CredentialUnavailable(bad) from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise CredentialUnavailable(f"{bad} (RSA keys need at least 2048 bits)")
            alg = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
            alg = "ES384"
        else:
            raise CredentialUnavailable(f"{bad} (need RSA for RS384 or EC P-384 for ES384)")
        if self._algorithm is not None and self._algorithm != alg:
            raise CredentialUnavailable(f"{bad} (the key does not fit algorithm {self._algorithm})")
        kid = self._kid or _thumbprint(key.public_key())
        self._key_cache = (pem, key, alg, kid)
        return key, alg, kid

    def _assertion(self, pem: str) -> str:
        key, alg, kid = self._signing_key(pem)
        now = int(self._wall())
        claims = {
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "iat": now, "exp": now + self._assertion_lifetime_s, "jti": secrets.token_urlsafe(32),
        }
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def _get(spec: Any, name: str) -> Any:
    if isinstance(spec, dict):
        return spec.get(name)
    return getattr(spec, name, None)


def build_credential(spec: Any, reader: SecretReader, **options: Any) -> UpstreamCredential:
    """From the config value: a reference string (→ bearer) or {type: basic|bearer|client_credentials, …}.

    `options` go to the provider's constructor (clock, timeouts, ca_bundle, http_client, …).
    Raises ValueError for an unusable spec (a config error).
    """
    if isinstance(spec, str):
        return StaticCredential("bearer", token_ref=check_ref(spec), reader=reader, **options)
    kind = _get(spec, "type")
    if kind in ("bearer", "basic"):
        return StaticCredential(
            kind, reader=reader, token_ref=_get(spec, "token"), username=_get(spec, "username"),
            password_ref=_get(spec, "password"), **options,
        )
    if kind == "client_credentials":
        token_url, client_id = _get(spec, "token_url"), _get(spec, "client_id")
        if not token_url or not client_id:
            raise ValueError("client_credentials needs token_url and client_id")
        extra = {k: _get(spec, k) for k in ("scope", "kid", "algorithm", "ca_bundle", "timeout_s")}
        extra = {k: v for k, v in extra.items() if v is not None}
        extra.update(options)
        return ClientCredentialsGrant(
            token_url, client_id, reader=reader, private_key_ref=_get(spec, "private_key"),
            client_secret_ref=_get(spec, "client_secret"), **extra,
        )
    raise ValueError("upstream_credentials: type must be bearer, basic or client_credentials")
