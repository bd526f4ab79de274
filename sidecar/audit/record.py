"""Audit record schema, canonical HMAC chaining and keyed pseudonyms.

Shared by the writer and the verifier so both agree byte for byte on what a
record is and how its hash is computed. Error messages name fields, never
values: values may hold identifiers and must not leak into logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_VERSION = 1
ZERO_HASH = "0" * 64
HMAC_PURPOSE = "audit-hmac"
PSEUDONYM_PREFIX = "p:"

KINDS = frozenset(
    {"intent", "outcome", "deny", "read", "replay", "review", "alert", "admin", "checkpoint"}
)
OUTCOMES = frozenset({"committed", "failed", "unknown"})

# Assigned by the writer, in this order, ahead of the caller's fields.
ENVELOPE_FIELDS = ("v", "chain", "seq", "ts", "prev", "hash", "key_id")

# Fields a caller may pass (besides `kind`), in the order they are stored.
CALLER_FIELDS = (
    "correlation_id", "client_id", "user", "tenant", "source", "method", "interaction",
    "resource_type", "resource_id", "patient", "decision", "reasons", "policy_revision",
    "outcome", "upstream_status", "latency_ms", "idempotency_key", "review_id", "reviewer",
    "traceparent",  # SIEM: join audit records with traces
)

# Extra fields only valid for one kind (writer bookkeeping, not free text).
KIND_EXTRA_FIELDS: Mapping[str, tuple[str, ...]] = {
    "admin": ("torn_sha256",),
    "checkpoint": ("checkpoint_seq", "checkpoint_hash"),
}

MAX_STR = 1024       # generous for ids/revisions, too small for a pasted resource body
MAX_REASONS = 64
MAX_INT = 2**53 - 1  # RFC 8785 (I-JSON) integer range

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PSEUDONYM = re.compile(re.escape(PSEUDONYM_PREFIX) + r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class AuditUnavailable(Exception):
    """The sink cannot record: callers answer 503 and forward nothing."""


# --------------------------------------------------------------------- keys

def derive_key(secret: bytes, purpose: str) -> bytes:
    """HKDF-SHA256 sub-key so one secret never serves two purposes directly."""
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("secret must be non-empty bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fhir-sidecar/" + purpose.encode("utf-8"))
    return hkdf.derive(bytes(secret))


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """Stable keyed pseudonym; `kind` is mixed in so equal ids of different
    types (e.g. Patient/1 vs Observation/1) do not collide or link."""
    mac = hmac.new(key, kind.encode("utf-8") + b"\0" + value.encode("utf-8"), hashlib.sha256)
    return PSEUDONYM_PREFIX + mac.hexdigest()[:32]


# `pseudonymize` is the name the issue uses; same function. Usage:
#   key = derive_key(pseudonym_secret, "pseudonym")     # once, at start-up
#   {"resource_id": pseudonymize(key, "resource", "Observation/9"),
#    "patient": pseudonymize(key, "patient", "123"),  # the token's `patient` claim
#    "user": audit_user(key, "Practitioner/7")}          # fhirUser: see audit_user
# The same key + kind + value always gives the same pseudonym, so an auditor
# holding the key can answer "what did we write for patient 123?" by computing
# pseudonymize(key, "patient", "123") and running `audit show` on it, while the
# file alone links records without naming anyone.
pseudonymize = pseudonym

# fhirUser types that name staff or systems, kept readable so an auditor sees who acted.
STAFF_USER_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Device"})
_USER_REF = re.compile(r"(?:.*/)?([A-Z][A-Za-z]{1,63})/([A-Za-z0-9.-]{1,64})")


def audit_user(key: bytes, fhir_user: str | None) -> str | None:
    """The `user` field for a fhirUser claim. Staff references stay readable
    (`Practitioner/7`, also from an absolute URL); a Patient, RelatedPerson or
    Person - or any shape we do not recognise - becomes a pseudonym, because
    then the user *is* the patient and the id is PHI."""
    if not fhir_user:
        return None
    m = _USER_REF.fullmatch(fhir_user)
    if m and m.group(1) in STAFF_USER_TYPES:
        return f"{m.group(1)}/{m.group(2)}"
    return pseudonym(key, "user", fhir_user)


def check_name(what: str, value: object) -> str:
    """Chain names and key ids end up in every line: keep them boring."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{what} must match [A-Za-z0-9._:-]{{1,128}}")
    return value


# --------------------------------------------------------------- validation

def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    if len(value) > MAX_STR:
        raise ValueError(f"field {name!r} longer than {MAX_STR} characters")
    if not value.isascii():  # ASCII is valid UTF-8; only other text can hold a lone surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"field {name!r} is not valid unicode") from None
    return value


def _pseudo(name: str, value: Any) -> str:
    # Fail closed on raw ids: only the pseudonym format is accepted here.
    if not isinstance(value, str) or not _PSEUDONYM.fullmatch(value):
        raise ValueError(f"field {name!r} must be a pseudonym (use pseudonym())")
    return value


def _hex64(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"field {name!r} must be 64 lowercase hex characters")
    return value


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"field {name!r} must be an integer in [{lo}, {hi}]")
    return value


def _reasons(name: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"field {name!r} must be a list of strings")
    if len(value) > MAX_REASONS:
        raise ValueError(f"field {name!r} has more than {MAX_REASONS} entries")
    return [_text(name, r) for r in value]


def _outcome(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in OUTCOMES:
        raise ValueError(f"field {name!r} must be one of {sorted(OUTCOMES)}")
    return str(value)


def _latency(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field {name!r} must be a number")
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_INT:
        raise ValueError(f"field {name!r} must be a finite number >= 0")
    return value


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    name: _text for name in CALLER_FIELDS
}
_VALIDATORS.update({
    "resource_id": _pseudo,
    "patient": _pseudo,
    "reasons": _reasons,
    "outcome": _outcome,
    "upstream_status": lambda n, v: _int(n, v, 0, 999),
    "latency_ms": _latency,
    "torn_sha256": _hex64,
    "checkpoint_seq": lambda n, v: _int(n, v, 1, MAX_INT),
    "checkpoint_hash": _hex64,
})


# Per kind: the names a caller may pass, and the storage order (computed once, not per record).
_ALLOWED = {k: frozenset(CALLER_FIELDS).union(KIND_EXTRA_FIELDS.get(k, ()), ("kind",)) for k in KINDS}
_ORDER = {k: tuple((n, _VALIDATORS[n]) for n in CALLER_FIELDS + tuple(KIND_EXTRA_FIELDS.get(k, ()))) for k in KINDS}


def validate_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a caller's fields; return them normalised, `kind` first, in storage
    order. None values mean "not known" and are dropped. Unknown names raise
    ValueError so no free-text field can sneak into the audit trail."""
    if not isinstance(fields, Mapping):
        raise ValueError("fields must be a mapping")
    kind = fields.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"field 'kind' must be one of {sorted(KINDS)}")
    allowed = _ALLOWED[kind]
    for name in fields:
        if name not in allowed:
            if name in ENVELOPE_FIELDS:
                raise ValueError(f"field {name!r} is assigned by the writer")
            raise ValueError(f"unknown audit field {str(name)[:64]!r} for kind {kind!r}")
    out: dict[str, Any] = {"kind": str(kind)}
    get = fields.get
    for name, check in _ORDER[kind]:
        value = get(name)
        if value is not None:
            out[name] = check(name, value)
    return out


def check_record(rec: Mapping[str, Any]) -> None:
    """Schema check of a stored record (verifier and writer restart). Raises
    ValueError; stricter than validate_fields: nulls never occur in a record."""
    if rec.get("v") != FORMAT_VERSION or isinstance(rec.get("v"), bool):
        raise ValueError(f"record format version is not {FORMAT_VERSION}")
    check_name("chain", rec.get("chain"))
    check_name("key_id", rec.get("key_id"))
    _int("seq", rec.get("seq"), 1, MAX_INT)
    ts = rec.get("ts")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise ValueError("field 'ts' is not RFC 3339 UTC with milliseconds")
    _hex64("prev", rec.get("prev"))
    _hex64("hash", rec.get("hash"))
    rest = {k: v for k, v in rec.items() if k not in ENVELOPE_FIELDS}
    if any(v is None for v in rest.values()):
        raise ValueError("record holds a null field")
    if validate_fields(rest) != rest:
        raise ValueError("record fields are not in normal form")


# --------------------------------------------------------------- hashing

_second: list[Any] = [None, ""]   # (the UTC second, its "YYYY-MM-DDTHH:MM:SS." text), one per second


def utc_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and 'Z', e.g. 2024-05-01T12:00:00.123Z."""
    if now is None:  # the writer's path: the wall clock, the second's text formatted once
        sec, ms = divmod(int(time.time() * 1000), 1000)
        cached = _second
        if cached[0] != sec:
            cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
            cached[0] = sec
        return f"{cached[1]}{ms:03d}Z"
    now = now.astimezone(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_JCS_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_SAFE_INT = 2**53


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """RFC 8785 (JCS) bytes. Audit records are flat: strings, safe integers, null, booleans, lists of
    strings, and a few floats. For those, sorted-key compact `json.dumps` with `ensure_ascii=False` *is*
    the JCS form (the same escapes: `\\b \\f \\n \\r \\t`, `\\u00xx` in lower case for the other control
    characters, everything else raw UTF-8) once floats are written as ECMAScript numbers and the keys are
    ASCII (so code-point and UTF-16 order agree); anything else -- nested values, big integers, other
    floats, non-ASCII keys, lone surrogates -- goes through the `rfc8785` library, which a property test
    holds this fast path against."""
    out: dict[str, Any] | None = None
    for k, v in body.items():
        t = type(v)
        if t is str or v is None or t is bool:
            pass
        elif t is int:
            if not -_SAFE_INT < v < _SAFE_INT:
                return rfc8785.dumps(dict(body))
        elif t is float:
            if not (v.is_integer() and abs(v) < _SAFE_INT) and not (1e-4 <= abs(v) < 1e15):
                return rfc8785.dumps(dict(body))
            if v.is_integer():  # ES6 writes 5.0 as 5; repr matches ES6 in this range
                if out is None:
                    out = dict(body)
                out[k] = int(v)
        elif t is list:
            for x in v:
                if type(x) is not str:
                    return rfc8785.dumps(dict(body))
        else:
            return rfc8785.dumps(dict(body))
        if type(k) is not str or not k.isascii():
            return rfc8785.dumps(dict(body))
    try:
        return _JCS_ENCODER.encode(body if out is None else out).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not JCS's domain, the library says so
        return rfc8785.dumps(dict(body))


def record_hash(key: bytes, prev: str, body: Mapping[str, Any]) -> str:
    """hex(HMAC-SHA256(key, prev + JCS(record without `hash`)))."""
    canonical = canonical_json({k: v for k, v in body.items() if k != "hash"})
    return hmac.new(key, prev.encode("ascii") + canonical, hashlib.sha256).hexdigest()


def hash_ok(key: bytes, rec: Mapping[str, Any]) -> bool:
    try:
        expected = record_hash(key, str(rec["prev"]), rec)
    except (KeyError, ValueError, TypeError, rfc8785.CanonicalizationError):
        return False
    return hmac.compare_digest(expected, str(rec.get("hash", "")))


def build_record(fields: Mapping[str, Any], *, chain: str, seq: int, ts: str, prev: str,
                 key_id: str, key: bytes, mac: Any = None) -> dict[str, Any]:
    """Assemble and seal a record from already-validated fields. `mac`: optionally
    ``hmac.new(key, digestmod=hashlib.sha256)`` made once for `key` (a copy is used per record)."""
    body: dict[str, Any] = {"v": FORMAT_VERSION, "chain": chain, "seq": seq, "ts": ts,
                            "prev": prev, "key_id": key_id, **fields}
    h = mac.copy() if mac is not None else hmac.new(key, digestmod=hashlib.sha256)
    h.update(prev.encode("ascii"))
    h.update(canonical_json(body))
    rec = {"v": FORMAT_VERSION, "chain": chain, "seq": seq, "ts": ts, "prev": prev,
           "hash": h.hexdigest(), "key_id": key_id}
    rec.update(fields)
    return rec


# ------------------------------------------------------------ serialisation

_LINE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps_line(rec: Mapping[str, Any]) -> bytes:
    """One JSON line; json escapes control characters so a value cannot break
    the line structure."""
    return _LINE_ENCODER.encode(rec).encode("utf-8") + b"\n"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key in record")
        out[k] = v
    return out


def _no_constant(_: str) -> Any:
    raise ValueError("NaN/Infinity in record")


def loads_line(raw: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) into a dict; ValueError otherwise.
    Duplicate keys are refused: a parser that kept the first copy could be
    shown different content than the one that was hashed."""
    obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                     parse_constant=_no_constant)
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    return obj
