"""Vault / OpenBao client for secret references (`vault:PATH#field`) and its token's lifecycle.

`VaultClient.read` is a `sidecar.secretrefs.VaultReader`: `resolve(ref, vault=client.read)`.

Auth (`auth`):
- `token`: a given token. `login()` checks it with lookup-self (learns TTL and renewability).
  It is renewed while renewable; once expired and not renewable → `VaultError` (no way to re-login).
- `approle`: role_id + secret_id, mount `approle` unless `mount` says otherwise.
- `kubernetes`: role + the service-account JWT read from `jwt_path` at *each* login (projected
  tokens rotate), mount `kubernetes` unless `mount` says otherwise.

Token lifecycle (`renew_if_needed`, run by `run_renewal` off the event loop):
- a token with TTL 0 (root / non-expiring) is never renewed;
- at 2/3 of the TTL granted by the last login or renewal, renew-self;
- renewal failed, not renewable, or granted less than half the login TTL (max TTL reached) →
  re-login (approle / kubernetes). Token auth keeps its token until it expires, then `VaultError`;
- `read` also re-logs-in (approle / kubernetes) when the token is past its expiry or Vault answers
  403 (a revoked token), once per read.

Read cache (per path, the whole secret, so several fields of one path cost one request):
- an entry is served from memory for `min(lease_duration, cache_ttl_s)` seconds (KV v2 has no
  lease: `cache_ttl_s`, default 60 s), then re-read. A failed re-read raises `VaultError`: this
  layer never serves stale data; serving a cached *credential* while Vault is down is the
  credential layer's decision (`sidecar.credentials`), bounded there.
- KV v2 is recognised by path (`<mount>/data/…`) *and* response shape (`data.data` + `data.metadata`);
  anything else is read as KV v1 (the secret is `data`). A deleted/destroyed current v2 version is
  "no secret", never an empty one.

Safety:
- messages of `VaultError` hold the URL, auth mode, path and field names and a fixed description of
  the failure (HTTP status class, "unreachable", …), never a token, secret id, JWT or secret value,
  and never the text of the underlying exception (raised `from None`, no chained cause);
- `repr` shows url, auth mode and mount only;
- the HTTP session ignores proxy environment variables and `VAULT_*` variables, never follows
  redirects (the `X-Vault-Token` header would follow them), and verifies TLS (`ca_bundle` or the
  system store); plain `http://` is accepted for loopback hosts only.

Thread-safety: one re-entrant lock serialises login, renewal and reads (reads are mostly cache hits).
All calls block: from async code use `asyncio.to_thread` (as `run_renewal` and
`sidecar.credentials` do).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from sidecar.logs import get_logger

__all__ = ["DEFAULT_JWT_PATH", "VaultClient", "VaultError", "run_renewal"]

DEFAULT_JWT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
RENEW_AT = 2 / 3  # fraction of the granted TTL after which the token is renewed
_AUTHS = ("token", "approle", "kubernetes")
_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_FIELD = re.compile(r"^[A-Za-z0-9_.-]+$")

log = get_logger("sidecar.vault")


class VaultError(Exception):
    """Vault unreachable, login/renewal/read refused, or a secret missing.

    The message never contains tokens, secret ids, JWTs or secret values.
    """


@dataclass(frozen=True)
class _Entry:
    data: dict[str, Any]
    expires_at: float


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(e: BaseException) -> str:
    """A fixed phrase for a failure: never the exception's own text (it may echo request data)."""
    if isinstance(e, hvac.exceptions.Forbidden):
        return "permission denied (403)"
    if isinstance(e, hvac.exceptions.InvalidRequest):
        return "request rejected (400)"
    if isinstance(e, hvac.exceptions.InvalidPath):
        return "not found (404)"
    if isinstance(e, hvac.exceptions.RateLimitExceeded):
        return "rate limited (429)"
    if isinstance(e, hvac.exceptions.VaultDown):
        return "sealed or unavailable (503)"
    if isinstance(e, hvac.exceptions.InternalServerError):
        return "server error (500)"
    if isinstance(e, hvac.exceptions.VaultError):
        return f"error ({type(e).__name__})"
    if isinstance(e, requests.exceptions.SSLError):
        return "TLS verification failed"
    if isinstance(e, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(e, requests.exceptions.ConnectionError):
        return "unreachable"
    if isinstance(e, (KeyError, TypeError, ValueError)):
        return "unexpected response"
    return type(e).__name__


_ERRORS = (hvac.exceptions.VaultError, requests.exceptions.RequestException, KeyError, TypeError, ValueError)


class VaultClient:
    def __init__(
        self,
        url: str,
        *,
        auth: str,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        role: str | None = None,
        jwt_path: str = DEFAULT_JWT_PATH,
        mount: str | None = None,
        ca_bundle: str | None = None,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        cache_ttl_s: float = 60.0,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise VaultError("vault.url must be an absolute http(s) URL")
        if u.username or u.password or u.query or u.fragment:
            raise VaultError("vault.url must not carry credentials, a query or a fragment")
        if u.scheme == "http" and not _is_loopback(u.hostname):
            raise VaultError("vault.url: plain http is only allowed on loopback (the token would travel in clear)")
        if auth not in _AUTHS:
            raise VaultError(f"vault.auth must be one of {', '.join(_AUTHS)}")
        if auth == "token" and not token:
            raise VaultError("vault auth `token` needs a token")
        if auth == "approle" and not (role_id and secret_id):
            raise VaultError("vault auth `approle` needs role_id and secret_id")
        if auth == "kubernetes" and not role:
            raise VaultError("vault auth `kubernetes` needs role")
        if mount is not None and not _PATH.match(mount):
            raise VaultError("vault.mount must be a path like `approle` or `k8s/prod`")
        if not (timeout_s > 0 and cache_ttl_s >= 0):
            raise VaultError("vault timeouts must be positive")
        self.url = url.rstrip("/")
        self.auth = auth
        self.mount = mount or (None if auth == "token" else auth)
        self._static_token = token
        self._role_id = role_id
        self._secret_id = secret_id
        self._role = role
        self._jwt_path = jwt_path
        self._clock = clock
        self._cache_ttl_s = float(cache_ttl_s)
        self._lock = threading.RLock()
        self._cache: dict[str, _Entry] = {}
        # token state
        self._token: str | None = None
        self._ttl = 0.0  # granted by the last login / renewal; 0 = does not expire
        self._login_ttl = 0.0
        self._obtained = 0.0
        self._renewable = False

        session = requests.Session()
        session.trust_env = False  # no proxy / netrc / REQUESTS_CA_BUNDLE from the environment
        session.verify = ca_bundle or True
        # token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token.
        self._hvac = hvac.Client(
            url=self.url, token="", verify=ca_bundle or True, timeout=timeout_s,
            session=session, allow_redirects=False,
        )

    # ---- construction from the config model -------------------------------------------------

    @classmethod
    def from_config(cls, vault_cfg: Any, *, base_dir: Path | None = None, **kwargs: Any) -> VaultClient:
        """Build from `Config.vault` (a model or mapping). `token`/`secret_id` refs are `env:`/`file:`."""
        from sidecar.secretrefs import SecretError, resolve

        def get(name: str, default: Any = None) -> Any:
            if isinstance(vault_cfg, dict):
                return vault_cfg.get(name, default)
            return getattr(vault_cfg, name, default)

        def secret(name: str) -> str | None:
            ref = get(name)
            if ref is None:
                return None
            if str(ref).startswith("vault:"):
                raise VaultError(f"vault.{name} cannot itself be a vault: reference (use env: or file:)")
            try:
                return resolve(ref, base_dir=base_dir).reveal()
            except SecretError as e:
                raise VaultError(f"vault.{name}: {e}") from None

        opts: dict[str, Any] = {}
        for name in ("jwt_path", "mount", "ca_bundle", "timeout_s", "cache_ttl_s"):
            if get(name) is not None:
                opts[name] = get(name)
        ca = opts.get("ca_bundle")
        if ca and base_dir is not None and not Path(ca).is_absolute():
            opts["ca_bundle"] = str(base_dir / ca)
        opts.update(kwargs)
        return cls(
            get("url"), auth=get("auth", "token"), token=secret("token"), role_id=get("role_id"),
            secret_id=secret("secret_id"), role=get("role"), **opts,
        )

    # ---- public API -------------------------------------------------------------------------

    def login(self) -> None:
        """Authenticate now. Raises VaultError (unreachable, refused, unreadable JWT file)."""
        with self._lock:
            self._login_locked()

    def read(self, path: str, field: str) -> str:
        """The string value of `field` in the secret at `path` (as written in the reference)."""
        self._check_path(path)
        if not _FIELD.match(field or ""):
            raise VaultError(f"vault: invalid field name in {path}#…")
        with self._lock:
            now = self._clock()
            entry = self._cache.get(path)
            if entry is None or now >= entry.expires_at:
                self._ensure_token_locked()
                data, ttl = self._fetch_locked(path)
                entry = _Entry(data, now + ttl)
                self._cache[path] = entry
        value = entry.data.get(field)
        if value is None:
            raise VaultError(f"vault: secret {path} has no field {field!r}")
        if not isinstance(value, str):
            raise VaultError(f"vault: {path}#{field} is not a string")
        return value

    def renew_if_needed(self) -> None:
        """Renew the token at 2/3 of its TTL; re-login when that fails (approle / kubernetes)."""
        with self._lock:
            if self._token is None:
                self._login_locked()
                return
            if self._ttl <= 0:
                return
            now = self._clock()
            expires_at = self._obtained + self._ttl
            if now < self._obtained + self._ttl * RENEW_AT:
                return
            if self._renewable and now < expires_at:
                try:
                    resp = self._hvac.auth.token.renew_self()
                    a = resp["auth"]
                    new_ttl = float(a.get("lease_duration") or 0)
                    if new_ttl > 0:  # 0 would read as "never expires": keep the old expiry instead
                        self._obtained, self._ttl = now, new_ttl
                        self._renewable = bool(a.get("renewable", self._renewable))
                        log.info("vault token renewed", component="vault", mode=self.auth)
                    if self.auth != "token" and new_ttl < self._login_ttl / 2:
                        # At the max TTL: renewal no longer extends the token usefully.
                        self._login_locked()
                    return
                except _ERRORS as e:
                    log.warning("vault token renewal failed", component="vault", mode=self.auth,
                                reason_code=_describe(e))
            if self.auth != "token":
                self._login_locked()
            elif now >= expires_at:
                raise VaultError(
                    f"vault: the configured token expired and cannot be renewed "
                    f"({'renewal failed' if self._renewable else 'not renewable'}); provide a new token"
                )

    def seconds_until_renewal(self) -> float:
        """Seconds until `renew_if_needed` has work to do (inf for a non-expiring token)."""
        with self._lock:
            if self._token is None:
                return 0.0
            if self._ttl <= 0:
                return math.inf
            return max(0.0, self._obtained + self._ttl * RENEW_AT - self._clock())

    def status(self) -> dict[str, Any]:
        """Secret-free state for readiness checks and diagnostics."""
        with self._lock:
            now = self._clock()
            return {
                "auth": self.auth,
                "logged_in": self._token is not None,
                "renewable": self._renewable,
                "expires_in_s": None if self._token is None or self._ttl <= 0
                else max(0.0, self._obtained + self._ttl - now),
                "cached_paths": len(self._cache),
            }

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        self._hvac.adapter.close()

    def __repr__(self) -> str:
        return f"VaultClient(url={self.url!r}, auth={self.auth!r}, mount={self.mount!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled (the token would go with it)
        raise TypeError("VaultClient cannot be pickled")

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _check_path(path: str) -> None:
        if not _PATH.match(path or "") or any(seg in (".", "..") for seg in path.split("/")):
            raise VaultError("vault: invalid secret path (use e.g. secret/data/ehr/lab-feed)")

    def _login_locked(self) -> None:
        now = self._clock()
        try:
            if self.auth == "token":
                self._hvac.token = self._static_token
                data = self._hvac.auth.token.lookup_self()["data"]
                token, ttl, renewable = self._static_token, float(data.get("ttl") or 0), bool(data.get("renewable"))
            else:
                if self.auth == "approle":
                    resp = self._hvac.auth.approle.login(
                        self._role_id, self._secret_id, use_token=False, mount_point=self.mount,
                    )
                else:
                    jwt = self._read_jwt()
                    resp = self._hvac.auth.kubernetes.login(self._role, jwt, use_token=False, mount_point=self.mount)
                a = resp["auth"]
                token, ttl, renewable = a["client_token"], float(a.get("lease_duration") or 0), bool(a.get("renewable"))
                if not isinstance(token, str) or not token:
                    raise ValueError("no client token")
        except VaultError:
            raise
        except _ERRORS as e:
            log.warning("vault login failed", component="vault", mode=self.auth, reason_code=_describe(e))
            raise VaultError(f"vault: login ({self.auth}) at {self.url} failed: {_describe(e)}") from None
        self._token, self._ttl, self._login_ttl, self._obtained, self._renewable = token, ttl, ttl, now, renewable
        self._hvac.token = token
        log.info("vault login succeeded", component="vault", mode=self.auth)

    def _read_jwt(self) -> str:
        try:
            jwt = Path(self._jwt_path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise VaultError(
                f"vault: cannot read the service account token {self._jwt_path} ({e.strerror or type(e).__name__})"
            ) from None
        if not jwt:
            raise VaultError(f"vault: the service account token file {self._jwt_path} is empty")
        return jwt

    def _ensure_token_locked(self) -> None:
        if self._token is None:
            self._login_locked()
            return
        if self._ttl > 0 and self._clock() >= self._obtained + self._ttl:
            if self.auth == "token":
                raise VaultError("vault: the configured token expired; provide a new token")
            self._login_locked()

    def _fetch_locked(self, path: str) -> tuple[dict[str, Any], float]:
        for attempt in (1, 2):
            try:
                resp = self._hvac.read(path)
                break
            except hvac.exceptions.Forbidden as e:
                if attempt == 1 and self.auth != "token":
                    log.info("vault read refused; logging in again", component="vault", mode=self.auth)
                    self._login_locked()
                    continue
                raise VaultError(f"vault: read of {path} failed: {_describe(e)}") from None
            except _ERRORS as e:
                raise VaultError(f"vault: read of {path} failed: {_describe(e)}") from None
        if not isinstance(resp, dict):
            raise VaultError(f"vault: no secret at {path}")
        data = resp.get("data")
        segs = path.split("/")
        if (
            len(segs) >= 3 and "data" in segs[1:-1] and isinstance(data, dict)
            and set(data) >= {"data", "metadata"} and isinstance(data.get("metadata"), dict)
        ):
            data = data["data"]  # KV v2
            if data is None:
                raise VaultError(f"vault: secret {path} has no current version (deleted or destroyed)")
        if not isinstance(data, dict):
            raise VaultError(f"vault: no secret at {path}")
        lease = resp.get("lease_duration") or 0
        lease = float(lease) if isinstance(lease, (int, float)) else 0.0
        ttl = min(lease, self._cache_ttl_s) if lease > 0 else self._cache_ttl_s
        return data, ttl


async def run_renewal(
    client: VaultClient,
    stop_event: asyncio.Event,
    *,
    min_interval_s: float = 0.5,
    max_interval_s: float = 30.0,
    retry_s: float = 2.0,
) -> None:
    """Keep the client's token alive until `stop_event` is set. Never raises (logs instead).

    Calls `renew_if_needed` in a worker thread, then sleeps until the next renewal point
    (clamped to [min_interval_s, max_interval_s]), or `retry_s` after a failure.
    """
    while not stop_event.is_set():
        try:
            await asyncio.to_thread(client.renew_if_needed)
            delay = min(max(client.seconds_until_renewal(), min_interval_s), max_interval_s)
        except VaultError as e:
            log.error("vault token upkeep failed", component="vault", mode=client.auth, reasons=[str(e)])
            delay = retry_s
        except Exception as e:  # noqa: BLE001 - the loop must survive anything
            log.error("vault token upkeep crashed", component="vault", error_type=type(e).__name__)
            delay = retry_s
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=delay)
        except TimeoutError:
            pass
