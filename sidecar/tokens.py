"""Access-token verification for `bearer` clients: JWTs against a JWKS, opaque tokens by RFC 7662 introspection.

Fail-closed rules:
- every failure is ``InvalidToken`` with a fixed ``reason``; the token, claim values and key material never
  appear in exceptions or logs (``verify`` re-raises a fresh exception with no chained context);
- JWT keys come only from the configured JWKS: the ``jku``/``x5u``/``jwk``/``x5c`` headers are never read;
- only asymmetric algorithms, each bound to a key type/curve (no ``none``, no HS*: no key confusion);
- a JWT-shaped token with a JWKS configured never falls back to introspection; an unreachable JWKS or
  introspection endpoint means "invalid", never "valid".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from sidecar.config import ConfigError
from sidecar.logs import get_logger

__all__ = ["DEFAULT_ALGORITHMS", "IntrospectionSettings", "InvalidToken", "TokenClaims", "TokenVerifier"]

log = get_logger(__name__)

# Each algorithm is bound to one key type (and curve): a token cannot pick how its key is interpreted.
_ALG_KEY: dict[str, tuple[str, frozenset[str] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_ALG_NAMES = tuple(_ALG_KEY)  # a tuple: `x in` works for unhashable JSON values too
DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
MAX_TOKEN_CHARS = 16_384
MAX_JWKS_BYTES = 1 << 20
MAX_INTROSPECTION_BYTES = 64 << 10
POSITIVE_TTL_S = 300.0
NEGATIVE_TTL_S = 10.0
CACHE_MAX_ENTRIES = 10_000
HTTP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class TokenClaims:
    client_id: str
    scopes: tuple[str, ...]
    patient: str | None
    fhir_user: str | None
    expires_at: float
    subject: str | None
    token_id: str  # sha256 hex of the token: cache key and audit correlation, never the token


@dataclass(frozen=True, slots=True)
class IntrospectionSettings:
    url: str
    client_id: str
    client_secret: str = field(repr=False)  # already resolved from its secret reference


class InvalidToken(Exception):
    """The token does not prove anything. ``reason`` is a fixed phrase, safe to log and to return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _FetchError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own `alg`, if it names one
    key: Any         # a cryptography public key

    def accepts(self, alg: str) -> bool:
        kty, curves = _ALG_KEY[alg]
        return self.kty == kty and (curves is None or self.crv in curves) and self.alg in (None, alg)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenVerifier:
    def __init__(self, *, jwks: str | None, issuer: str | None, audience: str | None,
                 introspection: IntrospectionSettings | None = None, base_dir: Path | None = None,
                 algorithms: Sequence[str] = DEFAULT_ALGORITHMS, leeway_s: int = 30,
                 jwks_min_refresh_s: float = 30.0, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        bad = [a for a in algorithms if a not in _ALG_KEY]
        if bad or not algorithms:
            raise ConfigError("identity: token algorithms must be asymmetric (RS*, PS*, ES*, EdDSA); "
                              f"refused: {', '.join(bad) or '(empty list)'}")
        if jwks is None and introspection is None:
            raise ConfigError("identity: bearer clients need identity.jwks or identity.introspection")
        if jwks is not None and (not issuer or not audience):
            raise ConfigError("identity: identity.jwks needs identity.issuer and identity.audience")
        if not (0 <= leeway_s <= 300 and jwks_min_refresh_s >= 0):
            raise ConfigError("identity: leeway must be 0..300 s and the JWKS refresh interval >= 0")
        self._jwks_url: str | None = None
        self._jwks_path: Path | None = None
        if jwks is not None:
            if "://" in jwks:
                self._jwks_url = _check_url(jwks, "identity.jwks")
            else:
                p = Path(jwks.removeprefix("file:"))
                self._jwks_path = p if p.is_absolute() or base_dir is None else base_dir / p
        if introspection is not None:
            _check_url(introspection.url, "identity.introspection.url")
        self._issuer = issuer
        self._audience = audience
        self._introspection = introspection
        self._algorithms = frozenset(algorithms)
        self._impl: dict[str, Algorithm] = {a: get_default_algorithms()[a] for a in self._algorithms}
        self._leeway = float(leeway_s)
        self._min_refresh = float(jwks_min_refresh_s)
        self._clock = clock
        self._http = http
        self._own_http = http is None
        self._keys: tuple[_Key, ...] = ()
        self._started = False
        self._last_fetch: float | None = None
        self._refresh_lock = asyncio.Lock()
        # token_id -> (claims or None for "inactive", valid until); bounded so junk tokens cannot grow it
        self._cache: OrderedDict[str, tuple[TokenClaims | None, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[TokenClaims | None]] = {}


    async def start(self) -> None:
        """Load the JWKS. A JWKS that cannot be loaded is a start-up error (ConfigError), not a 401 later."""
        if self._http is None:
            self._http = httpx.AsyncClient(verify=True, timeout=HTTP_TIMEOUT_S, follow_redirects=False)
        if self._jwks_url is not None or self._jwks_path is not None:
            self._last_fetch = self._clock()
            try:
                self._keys = await self._load_keys()
            except _FetchError as e:
                raise ConfigError(f"identity.jwks: {e}") from None
            log.info("jwks loaded", component="tokens", count=len(self._keys))
        self._started = True

    async def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._own_http and self._http is not None:
            await self._http.aclose()
        self._http = None
        self._started = False


    async def verify(self, token: str) -> TokenClaims:
        reason = "token verification failed"
        try:
            return await self._verify(token)
        except InvalidToken as e:
            reason = e.reason
        except Exception:  # noqa: BLE001 - anything unexpected is "invalid", never "valid"
            pass
        # Raised outside the except blocks: no __context__ chain that could carry token bytes or claims.
        raise InvalidToken(reason)

    async def _verify(self, token: str) -> TokenClaims:
        if not self._started:
            raise InvalidToken("token verifier not started")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _B64TOKEN.fullmatch(token):
            raise InvalidToken("malformed token")
        if token.count(".") == 2 and (self._jwks_url is not None or self._jwks_path is not None):
            return await self._verify_jwt(token)
        if self._introspection is not None:
            return await self._verify_opaque(token)
        raise InvalidToken("token cannot be verified")

    async def _verify_jwt(self, token: str) -> TokenClaims:
        h64, p64, s64 = token.split(".")
        header = _json_object(_b64decode(h64))
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("token algorithm not allowed")
        if "crit" in header or "b64" in header:  # we implement no JWS extensions
            raise InvalidToken("unsupported token header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token")
        if not (_B64URL.fullmatch(p64) and _B64URL.fullmatch(s64)):
            raise InvalidToken("malformed token")
        key = await self._key_for(kid, alg)
        try:
            ok = self._impl[alg].verify(f"{h64}.{p64}".encode("ascii"), key.key, _b64decode(s64))
        except Exception:  # noqa: BLE001 - fail closed
            ok = False
        if not ok:
            raise InvalidToken("bad token signature")
        return self._claims(_json_object(_b64decode(p64)), token, jwt=True, default_exp=None)

    async def _key_for(self, kid: str | None, alg: str) -> _Key:
        if kid is None:
            # Which key? With one key the answer is clear; with several, guessing is how confusion starts.
            if len(self._keys) != 1:
                raise InvalidToken("token names no key")
            candidates = list(self._keys)
        else:
            candidates = [k for k in self._keys if k.kid == kid]
            if not candidates:
                await self._refresh(kid)
                candidates = [k for k in self._keys if k.kid == kid]
                if not candidates:
                    raise InvalidToken("unknown token key")
        usable = [k for k in candidates if k.accepts(alg)]
        if len(usable) != 1:
            raise InvalidToken("token key not usable for its algorithm")
        return usable[0]

    async def _refresh(self, kid: str) -> None:
        """Re-load the JWKS for an unknown `kid`: at most once per interval; concurrent misses share it."""
        async with self._refresh_lock:
            if any(k.kid == kid for k in self._keys):
                return  # the fetch we waited for brought it
            now = self._clock()
            if self._last_fetch is not None and now - self._last_fetch < self._min_refresh:
                return
            self._last_fetch = now
            try:
                keys = await self._load_keys()
            except _FetchError as e:
                # keep the keys we have: a failed refresh must not lock every client out
                log.warning("jwks refresh failed", component="tokens", error_type=str(e))
                return
            self._keys = keys
            log.info("jwks refreshed", component="tokens", count=len(keys))

    async def _load_keys(self) -> tuple[_Key, ...]:
        if self._jwks_path is not None:
            try:
                with self._jwks_path.open("rb") as f:
                    raw = f.read(MAX_JWKS_BYTES + 1)
            except OSError as e:
                raise _FetchError(f"cannot read the JWKS file ({e.strerror or type(e).__name__})") from None
            if len(raw) > MAX_JWKS_BYTES:
                raise _FetchError("JWKS file too large")
        else:
            assert self._jwks_url is not None
            raw = await self._fetch("GET", self._jwks_url, MAX_JWKS_BYTES)
        return _parse_jwks(raw)

    async def _verify_opaque(self, token: str) -> TokenClaims:
        tid = token_id(token)
        now = self._clock()
        hit = self._cache.get(tid)
        if hit is not None:
            claims, until = hit
            if now < until:
                if claims is None:
                    raise InvalidToken("token is not active")
                return claims
            del self._cache[tid]
        task = self._inflight.get(tid)
        if task is None:  # concurrent requests with one new token share one introspection call
            task = asyncio.ensure_future(self._introspect(token, tid))
            self._inflight[tid] = task
            task.add_done_callback(lambda t: (self._inflight.pop(tid, None), t.cancelled() or t.exception()))
        result = await asyncio.shield(task)
        if result is None:
            raise InvalidToken("token is not active")
        return result

    async def _introspect(self, token: str, tid: str) -> TokenClaims | None:
        s = self._introspection
        assert s is not None
        # RFC 6749 §2.3.1: client id and secret are form-encoded before Basic encoding.
        basic = base64.b64encode(f"{quote(s.client_id, safe='')}:{quote(s.client_secret, safe='')}".encode()).decode()
        try:
            raw = await self._fetch("POST", s.url, MAX_INTROSPECTION_BYTES,
                                    data={"token": token, "token_type_hint": "access_token"},
                                    headers={"Authorization": f"Basic {basic}"})
        except _FetchError as e:
            # not cached: an outage must not outlive itself; fail closed for this request only
            log.warning("token introspection failed", component="tokens", error_type=str(e))
            raise InvalidToken("token introspection failed") from None
        doc = _json_object(raw, "token introspection failed")
        now = self._clock()
        if doc.get("active") is not True:
            self._remember(tid, None, now + NEGATIVE_TTL_S)
            return None
        claims = self._claims(doc, token, jwt=False, default_exp=now + POSITIVE_TTL_S)
        self._remember(tid, claims, min(claims.expires_at, now + POSITIVE_TTL_S))
        return claims

    def _remember(self, tid: str, claims: TokenClaims | None, until: float) -> None:
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            now = self._clock()
            for k in [k for k, (_c, u) in self._cache.items() if u <= now]:
                del self._cache[k]
            while len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.popitem(last=False)
        self._cache[tid] = (claims, until)

    async def _fetch(self, method: str, url: str, limit: int, *, headers: dict[str, str] | None = None,
                     data: dict[str, str] | None = None) -> bytes:
        if self._http is None:
            raise _FetchError("not started")
        # identity encoding: `limit` then bounds what we hold, with no decompression bomb in between
        hdrs = {"Accept": "application/json", "Accept-Encoding": "identity", **(headers or {})}
        try:
            async with self._http.stream(method, url, headers=hdrs, data=data, follow_redirects=False,
                                         timeout=HTTP_TIMEOUT_S) as resp:
                if resp.status_code != 200:
                    raise _FetchError(f"HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise _FetchError("response too large")
                return bytes(body)
        except httpx.HTTPError as e:
            raise _FetchError(type(e).__name__) from None


    def _claims(self, c: dict[str, Any], token: str, *, jwt: bool, default_exp: float | None) -> TokenClaims:
        """JWT: iss/aud/exp required. Introspection (the AS vouches): each checked when present."""
        now = self._clock()
        iss = c.get("iss")
        if (jwt or iss is not None) and self._issuer is not None and iss != self._issuer:
            raise InvalidToken("wrong token issuer")
        aud = c.get("aud")
        if jwt or aud is not None:
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if self._audience is not None and self._audience not in [a for a in auds if isinstance(a, str)]:
                raise InvalidToken("wrong token audience")
        exp = _number(c, "exp")
        if exp is None:
            if jwt or default_exp is None:
                raise InvalidToken("token has no expiry")
            exp = default_exp
        if now >= exp + self._leeway:
            raise InvalidToken("token expired")
        nbf = _number(c, "nbf")
        if nbf is not None and now + self._leeway < nbf:
            raise InvalidToken("token not yet valid")
        iat = _number(c, "iat")
        if iat is not None and now + self._leeway < iat:
            raise InvalidToken("token issued in the future")
        client_id = _string(c, "client_id") or _string(c, "azp")
        if client_id is None:
            raise InvalidToken("token names no client")
        scope = c.get("scope")
        if scope is None:
            scopes: tuple[str, ...] = ()
        elif isinstance(scope, str):
            scopes = tuple(s for s in scope.split(" ") if s)
        elif isinstance(scope, list) and all(isinstance(s, str) and s and " " not in s for s in scope):
            scopes = tuple(scope)
        else:
            raise InvalidToken("malformed token claim")
        return TokenClaims(client_id=client_id, scopes=scopes, patient=_string(c, "patient"),
                           fhir_user=_string(c, "fhirUser"), expires_at=exp, subject=_string(c, "sub"),
                           token_id=token_id(token))



def _check_url(url: str, what: str) -> str:
    u = urlsplit(url)
    if u.username or u.password or u.fragment or not u.hostname:
        raise ConfigError(f"{what}: must be an absolute https URL without credentials")
    # plain http only to 127.0.0.1 (tests, a local AS sidecar): keys and tokens never cross a network in clear
    if u.scheme != "https" and not (u.scheme == "http" and u.hostname == "127.0.0.1"):
        raise ConfigError(f"{what}: must be an https URL")
    return url


def _b64decode(seg: str) -> bytes:
    if not _B64URL.fullmatch(seg):
        raise InvalidToken("malformed token")
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except ValueError:
        raise InvalidToken("malformed token") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # two `aud` or `alg` members: which one did the issuer mean?
        raise ValueError("duplicate member")
    return out


def _no_constants(_name: str) -> Any:
    raise ValueError("NaN/Infinity")


def _json_object(raw: bytes, reason: str = "malformed token") -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both; their .doc would hold the input
        doc = None
    if not isinstance(doc, dict):
        raise InvalidToken(reason)
    return doc


def _number(c: dict[str, Any], name: str) -> float | None:
    v = c.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidToken("malformed token claim")
    return float(v)


def _string(c: dict[str, Any], name: str) -> str | None:
    v = c.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise InvalidToken("malformed token claim")
    return v


def _parse_jwks(raw: bytes) -> tuple[_Key, ...]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise _FetchError("not JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise _FetchError("not a JWKS (no `keys` list)")
    out: list[_Key] = []
    for jwk in keys:
        if not isinstance(jwk, dict):
            continue
        kty = jwk.get("kty")
        if kty != "oct" and any(m in jwk for m in _PRIVATE_JWK_MEMBERS):
            # a published private key is an incident, not a key: refuse the whole set
            raise _FetchError("the JWKS holds private key material")
        use, ops, kid, alg = jwk.get("use"), jwk.get("key_ops"), jwk.get("kid"), jwk.get("alg")
        if use not in (None, "sig") or (ops is not None and (not isinstance(ops, list) or "verify" not in ops)):
            continue
        if (kid is not None and not isinstance(kid, str)) or (alg is not None and alg not in _ALG_NAMES):
            continue  # encryption keys, HS* keys, ...: never used for signatures
        key = _public_key(kty, jwk)
        if key is not None and isinstance(kty, str):
            crv = jwk.get("crv") if kty in ("EC", "OKP") else None
            out.append(_Key(kid=kid, kty=kty, crv=crv, alg=alg, key=key))
    if not out:
        raise _FetchError("the JWKS has no usable signing keys")
    return tuple(out)


def _public_key(kty: object, jwk: dict[str, Any]) -> Any:
    """The JWK's public key, or None when unsupported or malformed (error texts would echo key material)."""
    try:
        if kty == "RSA":
            k_rsa = RSAAlgorithm.from_jwk(jwk)
            return k_rsa if isinstance(k_rsa, rsa.RSAPublicKey) and k_rsa.key_size >= 2048 else None
        if kty == "EC" and jwk.get("crv") in ("P-256", "P-384", "P-521"):
            k_ec = ECAlgorithm.from_jwk(jwk)
            return k_ec if isinstance(k_ec, ec.EllipticCurvePublicKey) else None
        if kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448"):
            k_okp = OKPAlgorithm.from_jwk(jwk)
            return k_okp if isinstance(k_okp, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)) else None
    except Exception:  # noqa: BLE001 - fail closed
        return None
    return None
