"""The sidecar's configuration: pydantic models, validated once at start-up.

Unknown keys are an error (a typo must never silently disable a guard). Secret-bearing
values are references (`env:`, `file:`, `vault:`), checked for shape here and resolved by
`sidecar.secretrefs` when the sidecar starts. `fhir-sidecar config schema` prints the JSON
Schema generated from these models.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from sidecar.alerts import AlertsConfig
from sidecar.approvals.config import ApprovalsConfig, check_reviewers_against_clients
from sidecar.recording import RecordingConfig, check_recording_clients
from sidecar.scopes import parse_scope
from sidecar.secretrefs import check_ref

SecretRef = Annotated[str, AfterValidator(check_ref)]

CONFIG_ENV = "FHIR_SIDECAR_CONFIG"


class ConfigError(ValueError):
    """A config that cannot be used. The message says what to fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Upstream(_Model):
    url: str = Field(description="FHIR base URL of the EHR, e.g. https://ehr.example.org/fhir/R4")
    ca_bundle: str | None = Field(None, description="PEM trust anchors for the EHR's TLS certificate")
    spki_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = Field(
        default_factory=list, description="optional pins: hex SHA-256 of the EHR certificate's SubjectPublicKeyInfo")
    timeout_s: float = Field(30, gt=0, le=600)

    @model_validator(mode="after")
    def _check_url(self) -> "Upstream":
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("upstream.url must be an absolute http(s) URL")
        if u.query or u.fragment or u.username or u.password:
            raise ValueError("upstream.url must not carry a query, fragment or credentials")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        u = urlsplit(self.url)
        return u.port or (443 if u.scheme == "https" else 80)

    @property
    def base_path(self) -> str:
        """The upstream base path without a trailing slash ("" for a base at the root)."""
        return urlsplit(self.url).path.rstrip("/")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


class TlsFiles(_Model):
    cert: SecretRef
    key: SecretRef


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    mode: Literal["reverse", "forward", "transparent"] = "reverse"
    tls: TlsFiles | None = None
    confdir: str | None = Field(
        None, description="forward mode: mitmproxy confdir holding the sidecar CA (writable, or pre-provisioned)"
    )

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)


class Admin(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    token: SecretRef | None = Field(None, description="bearer token for the admin API (required off-loopback)")

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "Admin":
        if self.token is None and not _is_loopback(self.host):
            raise ValueError("admin.token is required when the admin listener is not on loopback")
        return self


class Fhir(_Model):
    version: Literal["R4"] = "R4"
    max_body_bytes: int = Field(5 * 1024 * 1024, gt=0, le=256 * 1024 * 1024)


class IntrospectionCfg(_Model):
    url: str
    client_id: str
    client_secret: SecretRef


class Identity(_Model):
    jwks: str | None = None
    issuer: str | None = None
    audience: str | None = None
    introspection: IntrospectionCfg | None = None
    client_ca: str | None = None


class UpstreamCredentials(_Model):
    type: Literal["basic", "bearer", "client_credentials"]
    token: SecretRef | None = None
    username: str | None = None
    password: SecretRef | None = None
    token_url: str | None = None
    client_id: str | None = None
    private_key: SecretRef | None = None
    client_secret: SecretRef | None = None
    scope: str | None = None
    kid: str | None = None
    algorithm: Literal["RS384", "ES384"] | None = None
    ca_bundle: str | None = None
    timeout_s: float | None = Field(None, gt=0, le=60)

    @model_validator(mode="after")
    def _complete(self) -> "UpstreamCredentials":
        if self.type == "bearer" and not self.token:
            raise ValueError("upstream_credentials type bearer needs token")
        if self.type == "basic" and (not self.username or ":" in self.username or not self.password):
            raise ValueError("upstream_credentials type basic needs username (no ':') and password")
        if self.type == "client_credentials":
            if not self.token_url or not self.client_id or (self.private_key is None) == (self.client_secret is None):
                raise ValueError("client_credentials needs token_url, client_id and exactly one of private_key / client_secret")
            u = urlsplit(self.token_url)
            if u.scheme != "https" and not (u.scheme == "http" and _is_loopback(u.hostname or "")):
                raise ValueError("token_url must be https (http only on loopback)")
        return self


class Client(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")  # no leading "." (kill-switch file names)
    auth: Literal["bearer", "api-key", "mtls", "single"]
    scopes: list[str] = Field(default_factory=list, description="the ceiling: token scopes are intersected with it")
    tenant: str | None = None
    enforce: bool = True
    api_key_sha256: str | None = Field(None, description="hex SHA-256 of the API key, or a secret reference to it")
    upstream_credentials: SecretRef | UpstreamCredentials | None = None
    operations: list[str] = Field(default_factory=list, description="write operations ($op) this client may call")
    conditional_writes: bool = False
    dedupe: bool = Field(False, description="deduplicate key-less writes (client + method + URL + body) in the window")
    rate_limit: "RateLimits | None" = None

    @model_validator(mode="after")
    def _check(self) -> "Client":
        for s in self.scopes:
            try:
                parse_scope(s)
            except ValueError as e:
                raise ValueError(f"client {self.id}: scope {s!r}: {e}") from None
        if self.auth == "api-key":
            h = self.api_key_sha256
            if not h:
                raise ValueError(f"client {self.id}: auth api-key needs api_key_sha256")
            if h.startswith(("env:", "file:", "vault:")):
                check_ref(h)
            elif not _is_sha256_hex(h):
                raise ValueError(f"client {self.id}: api_key_sha256 must be 64 hex characters or a secret reference")
        elif self.api_key_sha256 is not None:
            raise ValueError(f"client {self.id}: api_key_sha256 is only for auth api-key")
        for op in self.operations:
            if not op.startswith("$"):
                raise ValueError(f"client {self.id}: operations are names like $merge, got {op!r}")
        return self


class Policy(_Model):
    engine: Literal["embedded", "opa", "off"] = "embedded"
    dir: str = "policies/"
    opa_url: str | None = None
    path: str = Field("fhir/writeback", pattern=r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
    shadow: bool = False
    timeout_ms: int = Field(200, gt=0, le=10_000)


class KillSwitch(_Model):
    file: str = "/var/run/fhir-sidecar/killswitch"
    scope: Literal["all", "writes"] = "all"
    retry_after_s: int = Field(30, ge=1, le=86_400)


class Audit(_Model):
    path: str = "/var/lib/fhir-sidecar/audit.jsonl"
    key: SecretRef | None = None
    keys: dict[str, SecretRef] | None = None
    active: str | None = None
    pseudonym_key: SecretRef | None = None
    reads_fail_open: bool = False
    chain: str = Field("main", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_bytes: int | None = Field(None, gt=0, description="rotate the file past this size")
    max_age_s: float | None = Field(None, gt=0, description="rotate the file past this age")
    checkpoint_every: int = Field(1000, gt=0)
    unknown_scan_records: int = Field(10_000, ge=0)

    @model_validator(mode="after")
    def _keys(self) -> "Audit":
        if (self.key is None) == (self.keys is None):
            raise ValueError("audit needs exactly one of `key` or `keys` (+ `active`)")
        if self.keys is not None and (self.active is None or self.active not in self.keys):
            raise ValueError("audit.active must name one of audit.keys")
        return self

    def key_refs(self) -> tuple[dict[str, str], str]:
        if self.keys is not None:
            return dict(self.keys), self.active or ""
        return {"k1": self.key or ""}, "k1"


class Vault(_Model):
    url: str
    auth: Literal["token", "approle", "kubernetes"] = "token"
    token: SecretRef | None = None
    role_id: str | None = None
    secret_id: SecretRef | None = None
    role: str | None = None
    mount: str | None = None
    ca_bundle: str | None = None
    timeout_s: float = Field(5, gt=0, le=60)
    jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    cache_ttl_s: float = Field(60, ge=0, le=3600)

    @model_validator(mode="after")
    def _auth(self) -> "Vault":
        need = {"token": ("token",), "approle": ("role_id", "secret_id"), "kubernetes": ("role",)}[self.auth]
        missing = [n for n in need if not getattr(self, n)]
        if missing:
            raise ValueError(f"vault auth {self.auth} needs {', '.join(missing)}")
        for n in ("token", "secret_id"):
            v = getattr(self, n)
            if v and v.startswith("vault:"):
                raise ValueError(f"vault.{n} cannot itself come from vault")
        return self


class Limit(_Model):
    rate: float = Field(gt=0, description="requests per second")
    burst: float = Field(gt=0)


class RateLimits(_Model):
    reads: Limit | None = None
    writes: Limit | None = None


class Breaker(_Model):
    threshold: int = Field(5, gt=0, description="consecutive 5xx/timeouts that open the circuit")
    cooldown_s: float = Field(30, gt=0)
    probe_timeout_s: float = Field(60, gt=0)


class Backoff(_Model):
    max_hold_s: float = Field(300, gt=0)


class State(_Model):
    store: str = "sqlite:/var/lib/fhir-sidecar/state.db"
    password: SecretRef | None = None

    @model_validator(mode="after")
    def _no_inline_password(self) -> "State":
        if urlsplit(self.store).password is not None:
            raise ValueError("state.store must not carry a password: use state.password (a secret reference)")
        return self


class Idempotency(_Model):
    ttl_s: int = Field(86_400, gt=0)
    dedupe_window_s: int = Field(0, ge=0)
    lease_s: float | None = Field(None, gt=0, description="in-flight lease (default: upstream.timeout_s + 90)")
    unknown_ttl_s: int = Field(30 * 86_400, gt=0)
    body_cap: int = Field(65_536, ge=0)


class Config(_Model):
    upstream: Upstream
    listen: Listen = Field(default_factory=Listen)
    admin: Admin = Field(default_factory=Admin)
    fhir: Fhir = Field(default_factory=Fhir)
    identity: Identity = Field(default_factory=Identity)
    clients: list[Client] = Field(min_length=1)
    policy: Policy = Field(default_factory=Policy)
    killswitch: KillSwitch = Field(default_factory=KillSwitch)
    audit: Audit
    approvals: ApprovalsConfig = Field(default_factory=ApprovalsConfig)
    vault: Vault | None = None
    state: State = Field(default_factory=State)
    idempotency: Idempotency = Field(default_factory=Idempotency)
    rate_limit: RateLimits | None = None
    breaker: Breaker = Field(default_factory=Breaker)
    backoff: Backoff = Field(default_factory=Backoff)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    recording: RecordingConfig | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        ids = [c.id for c in self.clients]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"client ids must be unique: {', '.join(dupes)}")
        hashes = [c.api_key_sha256.lower() for c in self.clients if c.api_key_sha256 and _is_sha256_hex(c.api_key_sha256)]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two clients share one api_key_sha256: a key must identify exactly one client")
        check_reviewers_against_clients(self.approvals, ids)
        if self.recording is not None:
            check_recording_clients(self.recording, ids)
        singles = [c for c in self.clients if c.auth == "single"]
        if singles and (len(self.clients) > 1 or not self.listen.is_loopback):
            raise ValueError("auth `single` is the one app in the pod: it must be the only client, on a loopback listener")
        if any(c.auth == "mtls" for c in self.clients) and (self.identity.client_ca is None or self.listen.tls is None):
            raise ValueError("mtls clients need identity.client_ca and listen.tls")
        if any(c.auth == "bearer" for c in self.clients):
            idn = self.identity
            if not (idn.jwks and idn.issuer and idn.audience) and idn.introspection is None:
                raise ValueError("bearer clients need identity.jwks with issuer and audience, or identity.introspection")
        if self.listen.tls is None and not self.listen.is_loopback and self.listen.mode == "reverse":
            raise ValueError("listen.tls is required when the listener is not on loopback")
        return self

    def client(self, client_id: str) -> Client | None:
        for c in self.clients:
            if c.id == client_id:
                return c
        return None


def unsupported_features(cfg: Config) -> list[str]:
    """Parts of the contract this build does not implement yet: refused at start, never ignored."""
    out: list[str] = []
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_sha256_hex(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdefABCDEF" for c in s)


def config_path(arg: str | None) -> Path:
    p = arg or os.environ.get(CONFIG_ENV)
    if not p:
        raise ConfigError(f"no config: pass --config FILE or set {CONFIG_ENV}")
    return Path(p)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config. Raises ConfigError with every problem listed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return parse_config(data, source=str(p))


def parse_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors(include_url=False, include_input=False):
            loc = ".".join(str(x) for x in err["loc"]) or "(top)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(lines)) from None


def json_schema() -> dict:
    return Config.model_json_schema()


Client.model_rebuild()
