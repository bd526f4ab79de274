"""Opt-in recording of requests, for `fhir-sidecar replay` (issue #7 item 4).

The file is a stream of mitmproxy flows (`mitmproxy.io.FlowWriter`, readable by `FlowReader`,
mitmdump and mitmweb), but nothing in it names a patient or holds a credential:

- in clear, per flow: method, interaction, resource type, client id, correlation id, the live
  decision and status, the time (flow timestamps and `flow.metadata["fhir_sidecar.recording"]`).
  The flow's URL is a placeholder (`http://recording.invalid/<ResourceType>`), it has no headers
  but a content type, and its response carries the status only;
- sealed (AES-256-GCM, the clear fields as associated data so they cannot be edited either): the
  request as received (target, headers, body), the verified identity, `current` and the live
  decision's reasons. That is the flow's request content;
- credential headers (`Authorization`, `Proxy-Authorization`, `X-API-Key`, `Cookie`, plus any named
  in `recording.strip_headers`) keep their name with the value `[stripped]` even inside the sealed
  payload, and so does an `access_token` query value. Upstream credentials the sidecar injects
  never appear: the recording is made from the request as the app sent it (`RawRequest`).

The key is an HKDF sub-key (`derive_key(secret, "recording")`) of `recording.key`, or of the
audit secret when that is not set. Each flow names the key's id, so a wrong key is a clear error.

This module stays free of `sidecar.config` and of mitmproxy at import time: `sidecar.config`
imports `RecordingConfig` from here, and mitmproxy is imported only where a file is written/read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import queue
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from sidecar.audit.record import derive_key
from sidecar.fhir.types import is_r4_type
from sidecar.logs import get_logger
from sidecar.request import RawRequest
from sidecar.secretrefs import SecretError, check_ref, resolve

if TYPE_CHECKING:  # identity imports config, which imports this module
    from sidecar.identity import Principal

log = get_logger("sidecar.recording")

SecretRef = Annotated[str, AfterValidator(check_ref)]

FORMAT_VERSION = 1
META = "fhir_sidecar.recording"
MAGIC = b"FSR1"
KEY_PURPOSE = "recording"
MIN_SECRET_CHARS = 32
PLACEHOLDER_HOST = "recording.invalid"
SEALED_TYPE = "application/vnd.fhir-sidecar.sealed"
STRIPPED = "[stripped]"
# Credential-bearing request headers: their values never reach the file, not even sealed.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
_ACCESS_TOKEN = re.compile(rb"((?:^|[?&;])access_token=)[^&;#]*", re.I)
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_INTERACTION = re.compile(r"[a-z][a-z-]{0,39}")
_CLIENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_CORRELATION = re.compile(r"[A-Za-z0-9._-]{8,64}")
_DECISIONS = frozenset({"allow", "deny", "review", "error", "replay"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Live refusals that came from runtime state, not from anything replay re-decides: the listener,
# kill switch, rate limit, idempotency, breaker/back-off, unavailable engines and stores, the EHR
# (prior-state read), and the response-side patient check (the response is not recorded).
_LISTENER_REASONS = frozenset({
    "sidecar is shutting down", "this listener requires TLS", "destination is not the EHR",
    "plain HTTP to the EHR refused", "patient context: the resource belongs to another patient",
})


class RecordingError(ValueError):
    """A recording that cannot be read (or a key that cannot be made). The message says why."""


class RecordingKeyError(RecordingError):
    """The key given is not the key the recording was sealed with."""


class RecordingConfig(BaseModel):
    """`recording:` in the config. Present = on (opt-in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="the flow file (appended to; created 0600); relative to the config file")
    key: SecretRef | None = Field(
        None, description="secret (>= 32 characters) the recording key is derived from (HKDF, purpose "
                          "'recording'); default: the first audit key")
    clients: list[str] = Field(default_factory=list, description="record only these client ids (empty: all)")
    writes_only: bool = Field(False, description="record writes only")
    strip_headers: list[str] = Field(default_factory=list,
                                     description="more request headers whose values are credentials")
    max_pending: int = Field(1000, gt=0, le=100_000, description="requests queued for the writer; more are dropped")
    max_pending_bytes: int = Field(64 * 1024 * 1024, gt=0, description="body bytes queued; more are dropped")
    max_bytes: int | None = Field(None, gt=0, description="stop recording (count drops) once the file is this big")

    @field_validator("strip_headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v if h.strip()]


def check_recording_clients(rec: RecordingConfig | None, client_ids: list[str]) -> None:
    """Config cross-check: `recording.clients` names configured clients only."""
    if rec is None:
        return
    unknown = sorted(set(rec.clients) - set(client_ids))
    if unknown:
        raise ValueError(f"recording.clients names unknown clients: {', '.join(unknown)}")


# ------------------------------------------------------------------------------------ keys

def recording_key_from_secret(secret: bytes) -> bytes:
    """The AES-256 key: never the secret itself."""
    return derive_key(secret, KEY_PURPOSE)


def recording_key(cfg: Any, base_dir: Path, *, key_ref: str | None = None, vault: Any = None) -> bytes:
    """The recording key for a config: `key_ref` (e.g. a CLI `--key`), else `recording.key`, else
    the first audit key (`audit.key`, or the first of `audit.keys`). Raises RecordingError."""
    ref = key_ref
    rec = getattr(cfg, "recording", None)
    if ref is None and rec is not None and rec.key:
        ref = rec.key
    what = "recording key"
    if ref is None:
        refs, _active = cfg.audit.key_refs()
        kid = next(iter(refs))
        ref, what = refs[kid], f"audit key {kid}"
    try:
        secret = resolve(ref, base_dir=base_dir, vault=vault.read if vault is not None else None).reveal()
    except SecretError as e:
        raise RecordingError(f"cannot resolve the {what}: {e}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise RecordingError(f"the {what} must be at least {MIN_SECRET_CHARS} characters")
    return recording_key_from_secret(secret.encode())


def key_id(key: bytes) -> str:
    """A public name for a key (first 8 bytes of an HMAC of a fixed label): says which key, reveals nothing."""
    return hmac.new(key, b"fhir-sidecar/recording-key-id", hashlib.sha256).hexdigest()[:16]


# -------------------------------------------------------------------------- the live decision

def summarize_decision(decision: Any, status: int | None) -> dict[str, Any]:
    """`decision_summary` for `Recorder.record`, from a `sidecar.pipeline.Decision` (duck-typed).

    Keys: decision (allow/deny/review/error/replay), reasons, status, runtime (the refusal came from
    runtime state that replay does not re-decide), write, interaction, resource_type, correlation_id.
    """
    refusal = getattr(decision, "refusal", None)
    cls = getattr(decision, "classification", None)
    req = getattr(decision, "request", None)
    out: dict[str, Any] = {
        "decision": "allow", "reasons": [], "status": status, "runtime": False,
        "write": bool(cls.is_write) if cls is not None else None,
        "interaction": cls.interaction if cls is not None else None,
        "resource_type": req.target.resource_type if req is not None else None,
        "correlation_id": getattr(decision, "correlation_id", None),
    }
    if getattr(decision, "replay", None) is not None:
        out.update(decision="replay", reasons=["idempotent replay of a completed write"], runtime=True)
    elif refusal is not None:
        out.update(decision=refusal.decision, reasons=[refusal.reason], status=refusal.status,
                   runtime=is_runtime_refusal(refusal.decision, refusal.status, refusal.reason))
    return out


def is_runtime_refusal(decision: str, status: int | None, reason: str) -> bool:
    if decision in ("error", "replay"):
        return True
    if status is not None and (status == 429 or status >= 500):
        return True
    return "Idempotency-Key" in reason or reason in _LISTENER_REASONS


# ------------------------------------------------------------------------------ the record

@dataclass(frozen=True, slots=True)
class RecordedIdentity:
    """The verified identity a live decision used (scopes: as granted, i.e. token ∩ ceiling then)."""

    client_id: str | None
    auth: str
    scopes: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ("system",)
    tenant: str | None = None
    patient: str | None = None
    user: str | None = None
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    index: int                         # 0-based position in the file
    time: datetime                     # `context.time` of the live decision (UTC)
    method: str
    interaction: str | None
    resource_type: str | None
    client_id: str | None
    correlation_id: str | None
    write: bool
    raw: RawRequest                    # credentials stripped
    identity: RecordedIdentity | None  # None: no verified identity (refused before identify)
    current: dict[str, Any] | None
    prior_read: bool | None            # True: `current` is the stored version (None = none exists)
    etag: str | None
    live: dict[str, Any] = field(default_factory=dict)   # decision, reasons, status, runtime


def _clean(pattern: re.Pattern[str], value: Any) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def strip_credentials(raw: RawRequest, extra: frozenset[str] = frozenset()) -> RawRequest:
    names = CREDENTIAL_HEADERS | extra
    headers = tuple((k, STRIPPED if k in names else v) for k, v in raw.headers)
    target = _ACCESS_TOKEN.sub(rb"\1" + STRIPPED.encode(), raw.target)
    return RawRequest(method=raw.method, target=target, headers=headers, body=raw.body, scheme=raw.scheme,
                      authority=raw.authority, host=raw.host, client_addr=raw.client_addr, mode=raw.mode,
                      peer_client=raw.peer_client)


def _identity_doc(p: Any) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"client_id": p.client_id, "auth": p.auth, "scopes": list(p.scopes.as_strings()),
            "contexts": list(p.contexts), "tenant": p.tenant, "patient": p.patient, "user": p.user,
            "enforce": bool(p.enforce)}


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _aad(clear: dict[str, Any]) -> bytes:
    return json.dumps(clear, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(aead: AESGCM, clear: dict[str, Any], doc: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    nonce = os.urandom(12)
    plain = struct.pack(">I", len(head)) + head + body
    return MAGIC + nonce + aead.encrypt(nonce, plain, _aad(clear))


def build_flow(*, clear: dict[str, Any], sealed: bytes, when: float, status: int | None) -> Any:
    """An `http.HTTPFlow` holding only clear, non-PHI fields and the sealed blob."""
    from mitmproxy import connection, http

    client = connection.Client(peername=("0.0.0.0", 0), sockname=("0.0.0.0", 0), timestamp_start=when)
    server = connection.Server(address=None)
    flow = http.HTTPFlow(client, server)
    path = "/" + (clear.get("resource_type") or "")
    flow.request = http.Request(
        host=PLACEHOLDER_HOST, port=80, method=clear["method"].encode(), scheme=b"http", authority=b"",
        path=path.encode(), http_version=b"HTTP/1.1",
        headers=http.Headers([(b"content-type", SEALED_TYPE.encode())]), content=sealed, trailers=None,
        timestamp_start=when, timestamp_end=when)
    if status is not None:
        flow.response = http.Response(
            http_version=b"HTTP/1.1", status_code=int(status), reason=b"", headers=http.Headers([]), content=b"",
            trailers=None, timestamp_start=when, timestamp_end=when)
    flow.metadata[META] = clear
    flow.timestamp_created = when
    return flow


def make_record(aead: AESGCM, kid: str, *, raw: RawRequest, decision_summary: dict[str, Any],
                principal: Any, current: dict[str, Any] | None, when: datetime, status: int | None,
                prior_read: bool | None = None, etag: str | None = None,
                strip: frozenset[str] = frozenset()) -> Any:
    """One flow, ready for `FlowWriter.add` (pure: used by the writer thread and by tests)."""
    s = decision_summary or {}
    when = _utc(when)
    method = raw.method.upper()[:16] if raw.method.isascii() and raw.method.isalpha() else "UNKNOWN"
    decision = s.get("decision") if s.get("decision") in _DECISIONS else "error"
    clear: dict[str, Any] = {
        "v": FORMAT_VERSION, "kid": kid, "time": when.isoformat().replace("+00:00", "Z"),
        "method": method,
        "interaction": _clean(_INTERACTION, s.get("interaction")),
        # only a real FHIR type name: a path segment an app got wrong could be anything (a name)
        "resource_type": _clean(_TYPE, s.get("resource_type")) if is_r4_type(s.get("resource_type")) else None,
        "client_id": _clean(_CLIENT, getattr(principal, "client_id", None)),
        "correlation_id": _clean(_CORRELATION, s.get("correlation_id")),
        "decision": decision,
        "status": int(status) if isinstance(status, int) else None,
        "write": bool(s["write"]) if isinstance(s.get("write"), bool) else method not in READ_METHODS,
    }
    clean = strip_credentials(raw, strip)
    live_status = s.get("status")
    doc = {
        "request": {
            "method": clean.method, "target": clean.target.decode("latin-1"),
            "headers": [list(h) for h in clean.headers], "scheme": clean.scheme, "authority": clean.authority,
            "host": clean.host, "client_addr": clean.client_addr, "mode": clean.mode,
            "peer_client": clean.peer_client,
        },
        "identity": _identity_doc(principal),
        "current": current,
        "prior_read": prior_read,
        "etag": etag,
        "live": {
            "decision": decision,
            "reasons": [str(r)[:1000] for r in (s.get("reasons") or [])][:64],
            "status": live_status if isinstance(live_status, int) else clear["status"],
            "runtime": bool(s.get("runtime")),
        },
    }
    sealed = seal(aead, clear, doc, clean.body)
    return build_flow(clear=clear, sealed=sealed, when=when.timestamp(), status=clear["status"])


# ------------------------------------------------------------------------------- the writer

_STOP = object()


class Recorder:
    """Append-only, bounded memory, writes on its own thread, fsync on close.

    `record` never raises into the request path: a request that cannot be queued (queue full,
    file over `max_bytes`, recorder closed) or written is counted in `stats`, and that is all.
    """

    def __init__(self, cfg: RecordingConfig, key: bytes, base_dir: Path) -> None:
        if len(key) != 32:
            raise RecordingError("the recording key must be 32 bytes (use recording_key())")
        path = Path(cfg.path)
        self.path = path if path.is_absolute() else Path(base_dir) / path
        self.cfg = cfg
        self._aead = AESGCM(key)
        self._kid = key_id(key)
        self._clients = frozenset(cfg.clients)
        self._strip = frozenset(cfg.strip_headers)
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        self._closed = False
        self.stats = {"recorded": 0, "filtered": 0, "dropped": 0, "errors": 0}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size
        if created:
            _fsync_dir(self.path.parent)
        self._thread = threading.Thread(target=self._run, name="fhir-sidecar-recorder", daemon=True)
        self._thread.start()

    # -- request path ----------------------------------------------------------------------

    def record(self, *, raw: RawRequest, decision_summary: dict, principal: Principal | None,
               current: dict | None, when: datetime, status: int | None,
               prior_read: bool | None = None, etag: str | None = None) -> None:
        try:
            if not self._wanted(raw, decision_summary, principal):
                self._count("filtered")
                return
            size = len(raw.body) + len(raw.target) + 4096
            with self._lock:
                full = (self._closed or self._pending >= self.cfg.max_pending
                        or self._pending_bytes + size > self.cfg.max_pending_bytes
                        or (self.cfg.max_bytes is not None and self._size >= self.cfg.max_bytes))
                if full:
                    self.stats["dropped"] += 1
                    return
                self._pending += 1
                self._pending_bytes += size
            self._queue.put((size, {"raw": raw, "decision_summary": dict(decision_summary or {}),
                                    "principal": principal, "current": current, "when": when, "status": status,
                                    "prior_read": prior_read, "etag": etag}))
        except Exception as e:  # never into the request path
            self._count("errors")
            log.error("recording failed", error_type=type(e).__name__)

    def _wanted(self, raw: RawRequest, s: dict, principal: Any) -> bool:
        if self._clients and getattr(principal, "client_id", None) not in self._clients:
            return False
        if self.cfg.writes_only:
            w = (s or {}).get("write")
            return w if isinstance(w, bool) else raw.method.upper() not in READ_METHODS
        return True

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        from mitmproxy import io

        writer = io.FlowWriter(self._file)
        last_sync = time.monotonic()
        while True:
            item = self._queue.get()
            stop = item is _STOP
            if not stop:
                size, kwargs = item
                try:
                    before = self._file.tell()
                    writer.add(make_record(self._aead, self._kid, strip=self._strip, **kwargs))
                    with self._lock:
                        self.stats["recorded"] += 1
                        self._size += self._file.tell() - before
                except Exception as e:
                    self._count("errors")
                    log.error("recording write failed", error_type=type(e).__name__)
                finally:
                    with self._lock:
                        self._pending -= 1
                        self._pending_bytes -= size
            if stop or self._queue.empty():
                try:
                    self._file.flush()
                    if stop or time.monotonic() - last_sync >= 1.0:
                        os.fsync(self._file.fileno())
                        last_sync = time.monotonic()
                except Exception as e:
                    self._count("errors")
                    log.error("recording flush failed", error_type=type(e).__name__)
            if stop:
                try:
                    self._file.close()
                except Exception:
                    pass
                return

    async def close(self) -> None:
        """Write what is queued, fsync, close. Later `record` calls are dropped (counted)."""
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._lock:
            if self._closed:
                already = True
            else:
                already, self._closed = False, True
        if not already:
            self._queue.put(_STOP)
        self._thread.join()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- the reader

def open_record(aead: AESGCM, clear: dict[str, Any], sealed: bytes) -> tuple[dict[str, Any], bytes]:
    if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + 12 + 16:
        raise RecordingError("not a sealed fhir-sidecar record")
    nonce = sealed[len(MAGIC):len(MAGIC) + 12]
    plain = aead.decrypt(nonce, sealed[len(MAGIC) + 12:], _aad(clear))  # InvalidTag: caller says why
    (n,) = struct.unpack(">I", plain[:4])
    return json.loads(plain[4:4 + n].decode("utf-8")), plain[4 + n:]


def read_recording(path: str | os.PathLike[str], key: bytes, *,
                   on_torn_tail: Callable[[int], None] | None = None) -> Iterator[RecordedRequest]:
    """Decrypt a recording, flow by flow. A wrong key raises RecordingKeyError naming both key ids;
    a flow that does not authenticate, RecordingError. An unreadable tail (a sidecar killed
    mid-write) raises RecordingError, or with `on_torn_tail` calls it with the flows read and ends."""
    from mitmproxy import exceptions, io

    p = Path(path)
    if len(key) != 32:
        raise RecordingError("the recording key must be 32 bytes (use recording_key())")
    aead, kid = AESGCM(key), key_id(key)
    try:
        fo = open(p, "rb")
    except OSError as e:
        raise RecordingError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    with fo:
        reader = io.FlowReader(fo)
        stream = iter(reader.stream())
        index = 0
        while True:
            try:
                flow = next(stream)
            except StopIteration:
                return
            except exceptions.FlowReadException:
                if on_torn_tail is not None:
                    on_torn_tail(index)
                    return
                raise RecordingError(f"{p}: unreadable after {index} flows (a torn tail?)") from None
            yield _decode(p, index, flow, aead, kid)
            index += 1


def _decode(p: Path, index: int, flow: Any, aead: AESGCM, kid: str) -> RecordedRequest:
    clear = flow.metadata.get(META) if hasattr(flow, "metadata") else None
    if not isinstance(clear, dict) or clear.get("v") != FORMAT_VERSION or getattr(flow, "request", None) is None:
        raise RecordingError(f"{p}: flow {index} is not a fhir-sidecar recording (format v{FORMAT_VERSION})")
    if clear.get("kid") != kid:
        raise RecordingKeyError(
            f"{p}: flow {index} was sealed with recording key id {clear.get('kid')}, but the key given has id "
            f"{kid}: wrong key (recording.key, or the audit key it defaults to)")
    try:
        doc, body = open_record(aead, clear, flow.request.raw_content or b"")
    except InvalidTag:
        raise RecordingError(f"{p}: flow {index} does not authenticate: tampered or corrupt") from None
    r = doc["request"]
    raw = RawRequest(method=r["method"], target=r["target"].encode("latin-1"),
                     headers=tuple((str(k), str(v)) for k, v in r["headers"]), body=body,
                     scheme=r.get("scheme") or "http", authority=r.get("authority") or "", host=r.get("host") or "",
                     client_addr=r.get("client_addr") or "", mode=r.get("mode") or "reverse",
                     peer_client=r.get("peer_client"))
    ident = doc.get("identity")
    identity = None if ident is None else RecordedIdentity(
        client_id=ident.get("client_id"), auth=ident.get("auth") or "none", scopes=tuple(ident.get("scopes") or ()),
        contexts=tuple(ident.get("contexts") or ()), tenant=ident.get("tenant"), patient=ident.get("patient"),
        user=ident.get("user"), enforce=bool(ident.get("enforce", True)))
    t = clear["time"]
    when = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith("Z") else t)
    return RecordedRequest(
        index=index, time=when, method=clear["method"], interaction=clear.get("interaction"),
        resource_type=clear.get("resource_type"), client_id=clear.get("client_id"),
        correlation_id=clear.get("correlation_id"), write=bool(clear.get("write")), raw=raw, identity=identity,
        current=doc.get("current"), prior_read=doc.get("prior_read"), etag=doc.get("etag"),
        live=dict(doc.get("live") or {}))


def record_decision(recorder: Recorder | None, raw: RawRequest | None, decision: Any, status: int | None,
                    when: datetime | None) -> None:
    """The adapter's one call: record a finished request from its `Decision` (never raises)."""
    if recorder is None or raw is None or decision is None:
        return
    try:
        prior = getattr(decision, "prior", None)
        recorder.record(raw=raw, decision_summary=summarize_decision(decision, status),
                        principal=getattr(decision, "principal", None),
                        current=prior.current if prior is not None else None,
                        when=when or datetime.now(timezone.utc), status=status,
                        prior_read=prior is not None, etag=prior.etag if prior is not None else None)
    except Exception as e:
        log.error("recording failed", error_type=type(e).__name__)


__all__ = [
    "CREDENTIAL_HEADERS", "META", "Recorder", "RecordedIdentity", "RecordedRequest", "RecordingConfig",
    "RecordingError", "RecordingKeyError", "check_recording_clients", "is_runtime_refusal", "key_id",
    "make_record", "read_recording", "record_decision", "recording_key", "recording_key_from_secret",
    "strip_credentials", "summarize_decision",
]
