"""Structured JSON logging with one fail-closed redaction processor for *every* logger.

structlog loggers and stdlib ``logging`` (mitmproxy logs through it) share a single root handler whose
``ProcessorFormatter`` runs :func:`redact` right before JSON rendering, so no record can bypass it.

Redaction is an allowlist: only keys in :data:`SAFE_KEYS` keep their values, and even those strings are
scrubbed with the free-text patterns below. Keys in :data:`PHI_KEYS` are redacted even if someone adds
them to ``SAFE_KEYS``. Exceptions become ``error_type`` + a scrubbed ``error_message``; tracebacks are
never rendered (frames and messages can hold request bodies).

Decision: client ``IP:port`` pairs are left readable in free text. The sidecar's clients are backend
apps (system scopes), not patients, and operators need peer addresses to debug. Note HIPAA Safe Harbor
lists IP addresses as identifiers, so a patient-facing deployment must revisit this.

Known limits (pattern scrubbing is best effort; keep PHI in keyword fields, which are redacted):
lower-case or ALL-CAPS names and clinical prose without identifiers are not recognised in free text;
a single capitalised word at the start of a sentence is kept (so "Observation created" stays readable).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor

__all__ = ["PHI_KEYS", "REDACTED", "SAFE_KEYS", "FastLogger", "configure_logging", "get_fast_logger", "get_logger",
           "redact", "scrub_text"]

REDACTED = "[redacted]"

# Mutable on purpose: modules may SAFE_KEYS.add("their_field") at import time.
SAFE_KEYS: set[str] = {
    "ts", "level", "logger", "event", "correlation_id", "traceparent", "client_id", "tenant",
    "interaction", "resource_type", "method", "decision", "status", "upstream_status", "latency_ms",
    "reasons", "policy_revision", "kill_switch", "scope", "mode", "listen", "upstream_host", "count",
    "seq", "chain", "audit_seq", "component", "error_type", "operation", "would_deny", "worker",
    "version", "path_template", "reason_code", "key_id",
}

PHI_KEYS: frozenset[str] = frozenset({
    "name", "given", "family", "telecom", "address", "birthDate", "identifier", "value", "text", "note",
    "valueString", "div", "display", "comment", "description", "body", "content", "resource", "token",
    "authorization", "password", "secret", "api_key", "cookie", "query", "url", "path", "headers",
})


def _norm_key(key: str) -> str:
    # "birth_date", "birthDate" and "Birth-Date" must all hit the same PHI entry.
    return re.sub(r"[^a-z0-9]", "", key.lower())


_PHI_NORMALIZED = frozenset(_norm_key(k) for k in PHI_KEYS)
# Substring match for credential-ish keys ("access_token", "x_api_key"); none of SAFE_KEYS contains these.
_SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "authorization", "cookie", "apikey", "credential")
_KEY_RE = re.compile(r"^[a-z_][A-Za-z0-9_.-]{0,63}$")
_CLASS_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")

# Safe keys whose well-formed values would be mangled by the token scrubbers but are not secrets.
_DIGEST = re.compile(r"^(?:[a-z0-9]{1,16}:)?[0-9a-f]{7,128}$")
_VALUE_SHAPES: dict[str, re.Pattern[str]] = {
    "ts": re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})$"),
    "traceparent": re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"),
    "correlation_id": re.compile(r"^(?:[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}|[0-9a-f]{16,32})$"),
    "policy_revision": _DIGEST,
    "chain": _DIGEST,
    "path_template": re.compile(
        r"^/(?:metadata|\$[a-z][A-Za-z-]*|[A-Z][A-Za-z]{1,63}"
        r"(?:/_history|/_search|/\$[a-z][A-Za-z-]*|/\{id\}(?:/_history(?:/\{vid\})?|/\$[a-z][A-Za-z-]*)?)?)?$"
    ),
}

_WHITESPACE = re.compile(r"\s")  # the characters str.isspace() accepts (both use Py_UNICODE_ISSPACE)
_MAX_IN = 8192  # bound regex work on huge messages (e.g. a body str()'d into an exception)
_MAX_OUT = 1000

_SCRUBBERS: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+"), "[url]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[jwt]"),
    (re.compile(r"\b(Bearer|Basic|Digest|Token|ApiKey|Negotiate)\s+[^\s,;]+", re.I), r"\1 [credential]"),
    (re.compile(r"\b(?:[sprw]k_(?:live|test)_|gh[pousr]_|xox[abprs]-|AKIA|glpat-)[A-Za-z0-9_-]{4,}"), "[secret]"),
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[email]"),
    # Python reprs and JSON fragments: '...', "...", b'...'. An apostrophe inside a word ("proxy's") never opens.
    (re.compile(r"(?<!\w)[bBrRuU]{0,2}(['\"])(?:\\.|(?!\1)[^\\\n])*\1"), "[quoted]"),
    (re.compile(r"\?\S+"), "?[query]"),
    # Request targets "/Patient/123?..." and FHIR relative references "Patient/123"; "HTTP/1.1" is neither.
    (re.compile(r"(?<![\w/.:\-\]])/[^\s/]\S*"), "[path]"),
    (re.compile(r"\b[A-Z][a-z][A-Za-z]{0,62}/[A-Za-z0-9\-.$_{}]+"), "[path]"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ssn]"),
    (re.compile(r"(?:\(\d{3}\)\s?|\b\d{3}[-. ])\d{3}[-. ]\d{4}\b"), "[phone]"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"), "[date]"),
    (re.compile(r"\b\d{1,2}/\d{1,2}/\d{2,4}\b"), "[date]"),
]
# Long hex/base64 tokens; requiring a digit or mixed case keeps long CONSTANT_NAMES readable.
_LONG_TOKEN = re.compile(r"(?<![\w+/-])[A-Za-z0-9+/_]{24,}={0,2}")
_DIGITS = re.compile(r"\d{6,}")
# Identifier-like tokens in free text (MRNs, logical ids): letters plus >= 3 digits.
_MIXED_ID = re.compile(r"(?<![\w.-])(?=[A-Za-z0-9_-]*[A-Za-z])(?=(?:[A-Za-z_-]*\d){3})[A-Za-z0-9_-]{6,}(?![\w-])")

_UP, _LO = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
_WORD = rf"(?:[{_UP}]['’])?(?:Ma?c)?[{_UP}][{_LO}]+(?:-[{_UP}][{_LO}]+)*"
_NAME_RUN = re.compile(rf"(?<![\w'’-]){_WORD}(?:\s+{_WORD})*(?![\w-])")
_SENTENCE_END = re.compile(r"(?:^|[.!?]\s|\n)\s*$")
# Capitalised words that are vocabulary, not names (network/Python/FHIR terms seen in log messages).
_COMMON_WORDS = frozenset("""
A An The This That These Those It Its If When While After Before For From To With Without In On At Of
And Or Not No Yes Is Are Was Were Be Please See Use Check Ensure Expected Got Missing Unknown Invalid
Unsupported Unexpected Malformed Unable Cannot Failed Failure Error Errno Exception Warning Traceback
Timeout Refused Reset Broken Pipe Client Server Proxy Upstream Downstream Connection Connect Connected
Closing Closed Open Opening Peer Remote Local Host Port Address Socket Stream Transport Layer Handshake
Certificate Request Response Method Header Headers Content Type Length Accept Bearer Basic Digest Token
Key Scope Policy Audit Kill Switch Mode Flow Running Starting Stopping Shutting Listening Loading Loaded
Received Sending Sent Retrying Retry Skipping Ignoring Denied Allowed Rejected Accepted Blocked Dropped
Created Updated Deleted Read Write Search Bad Gateway Service Unavailable Internal Forbidden Unauthorized
Conflict Gone Precondition Unprocessable Entity Found True False None Python Json Yaml Http Https Web
Patient Observation Encounter Condition Procedure Practitioner Organization Location Device Appointment
Schedule Slot Task Consent Provenance Bundle Composition Communication Coverage Claim Account Binary
Endpoint Group Goal Flag Invoice Library Linkage List Measure Media Medication Parameters Person
Questionnaire Specimen Subscription Substance Contract Resource Reference Operation Outcome
""".split())


def _mask_names(match: re.Match[str]) -> str:
    words = match.group(0).split()
    suspicious = [w for w in words if w not in _COMMON_WORDS]
    if not suspicious:
        return match.group(0)
    # A lone capitalised word opening a sentence is usually just grammar; two in a row look like a name.
    if len(words) == 1 and _SENTENCE_END.search(match.string[: match.start()]):
        return match.group(0)
    return re.sub(r"\S+", lambda w: w.group(0) if w.group(0) in _COMMON_WORDS else "[name]", match.group(0))


def _mask_long_token(match: re.Match[str]) -> str:
    tok = match.group(0)
    if any(c.isdigit() for c in tok) or (any(c.isupper() for c in tok) and any(c.islower() for c in tok)):
        return "[token]"
    return tok


def scrub_text(text: str, *, free_text: bool = True) -> str:
    """Replace URLs, paths, queries, credentials, quoted strings, identifiers and name-like words.

    ``free_text=False`` (used for single-token values of safe keys) skips the mixed letter+digit id
    rule so identifiers such as ``client_id="app-123"`` stay readable.
    """
    if len(text) > _MAX_IN:
        head = text[:_MAX_IN].rsplit(None, 1)  # drop the cut word: a half token may evade the patterns
        text = head[0] if head else ""
    for pattern, repl in _SCRUBBERS:
        text = pattern.sub(repl, text)
    text = _LONG_TOKEN.sub(_mask_long_token, text)
    if free_text:
        text = _MIXED_ID.sub("[id]", text)
    text = _DIGITS.sub("[number]", text)
    text = _NAME_RUN.sub(_mask_names, text)
    if len(text) > _MAX_OUT:
        text = text[:_MAX_OUT] + "…[truncated]"
    return text


def _is_phi_key(key: str) -> bool:
    norm = _norm_key(key)
    return norm in _PHI_NORMALIZED or any(part in norm for part in _SECRET_KEY_PARTS)


def _scalar(key: str, value: Any) -> Any:
    t = type(value)
    if t is str:  # the common case first; str subclasses (enums) take the general path below
        text = value
    elif value is None or t is bool or t is int:
        return value
    elif t is float:
        return value if math.isfinite(value) else str(value)  # NaN/inf are not valid JSON
    elif isinstance(value, bool):
        return value
    elif isinstance(value, int):
        return int(value)  # IntEnum -> plain int
    elif isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    elif isinstance(value, str):
        text = str.__str__(value)  # str-based enums render as their value
    else:
        return REDACTED  # dicts, bytes, arbitrary objects: their str() is unbounded
    shape = _VALUE_SHAPES.get(key)
    if shape is not None and shape.match(text):
        return text
    # Multi-word values are prose whatever the key; single tokens keep ids like "app-123" readable.
    free = key == "event" or _WHITESPACE.search(text) is not None
    # values repeat (interactions, types, client ids, reasons): scrubbing is pure, so cache it
    return _scrub_cached(text, free) if len(text) <= 256 else scrub_text(text, free_text=free)


@functools.lru_cache(maxsize=1024)
def _key_verdict(key: str, safe: bool) -> str:
    """Keys repeat from line to line: decide once. `safe` is part of the cache key because
    SAFE_KEYS may be extended at run time."""
    # Dynamic keys can be data themselves (a JWT, an MRN): rename any key the scrubbers would touch.
    if not _KEY_RE.match(key) or scrub_text(key) != key:
        return "odd"
    if _is_phi_key(key) or not safe:
        return "redact"
    return "safe"


@functools.lru_cache(maxsize=8192)
def _scrub_cached(text: str, free_text: bool) -> str:
    return scrub_text(text, free_text=free_text)


def _safe_value(key: str, value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [REDACTED if isinstance(v, (list, tuple, set, frozenset, dict)) else _scalar(key, v) for v in items]
    return _scalar(key, value)


def _exception_from(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and isinstance(exc_info[1], BaseException):
        return exc_info[1]
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def redact(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: allowlist keys, scrub strings, reduce exceptions to type + scrubbed message."""
    exc = _exception_from(event_dict.pop("exc_info", None))
    # Pre-rendered tracebacks / stacks (format_exc_info, dict_tracebacks, stack_info) are dropped outright.
    for key in ("exception", "stack", "stack_info", "positional_args"):
        event_dict.pop(key, None)
    out: dict[str, Any] = {}
    odd = 0
    for key, value in event_dict.items():
        verdict = _key_verdict(key, key in SAFE_KEYS) if isinstance(key, str) else "odd"
        if verdict == "odd":
            odd += 1
            out[f"redacted_key_{odd}"] = REDACTED
        elif verdict == "redact":
            out[key] = REDACTED
        elif isinstance(value, (list, tuple, set, frozenset)):
            out[key] = _safe_value(key, value)
        else:
            out[key] = _scalar(key, value)
    if exc is not None:
        name = type(exc).__name__
        out["error_type"] = name if _CLASS_NAME_RE.match(name) else REDACTED
        try:
            message = str(exc)
        except Exception:  # a broken __str__ must not break logging
            message = "[unrenderable]"
        out["error_message"] = scrub_text(message)
    # Operators scan the first fields; keep them first and in a fixed order.
    head = {k: out.pop(k) for k in ("ts", "level", "logger", "event") if k in out}
    return {**head, **out}


def _json_default(_: Any) -> str:
    return REDACTED  # never repr() an unknown object into the log


class _RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler whose error path cannot leak: the default handleError prints msg + args to stderr."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (stdlib name)
        try:
            exc = sys.exc_info()[1]
            line = json.dumps({
                "ts": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "level": "error",
                "logger": "sidecar.logs",
                "event": "log record dropped: formatting failed",
                "error_type": type(exc).__name__ if exc is not None else None,
            })
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the proxy
            pass


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]


def _level(level: str) -> int:
    mapping = logging.getLevelNamesMapping()
    value = mapping.get(level.upper())
    if value is None:
        raise ValueError(f"unknown log level {level!r}; use one of debug, info, warning, error, critical")
    return value


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one JSON handler that ends in :func:`redact`.

    Idempotent. Replaces *all* root handlers: any pre-existing handler would print unredacted records.
    Handlers added later (e.g. mitmproxy's TermLog addon) are outside this guarantee.
    """
    numeric = _level(level)
    shared = _shared_processors()
    chain: list[Processor] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    structlog.configure(
        processors=chain,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,  # reconfiguration (tests, CLI flags) must take effect
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact,
            structlog.processors.JSONRenderer(default=_json_default),
        ],
    )
    handler = _RedactingHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _RedactingHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    _installed.update(handler=handler, processors=structlog.get_config()["processors"])
    logging.captureWarnings(True)  # warnings text goes through redact instead of raw stderr
    _quiet_libraries()


def _quiet_libraries() -> None:
    # httpx/httpcore log every side call at INFO; the request event already says what happened
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return cast(structlog.stdlib.BoundLogger, structlog.stdlib.get_logger(name))


# -- the per-request line, without the stdlib detour --------------------------------------------------

_STAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
_RENDERER = structlog.processors.JSONRenderer(default=_json_default)
_installed: dict[str, Any] = {"handler": None, "processors": None}


class FastLogger:
    """A logger for the hot path (one line per request): the very processors :func:`configure_logging`
    chains -- level filter, contextvars, level, logger name, ISO timestamp, :func:`redact`, the JSON
    renderer -- in the same order, written by the same handler under its lock, but without a LogRecord,
    the stdlib dispatch or the formatter's record copies (about a third of the cost).

    It takes this path only while the logging setup is what ``configure_logging`` installed: its handler on
    the root logger, every other handler there above the line's level (mitmproxy's startup error check
    listens from ERROR), no filters, no handler or filter on the way, structlog not reconfigured. Anything
    else (a test's capture handler, another configuration) goes through the normal structlog logger, so
    every handler still sees every line; either way the line passes :func:`redact`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._std = logging.getLogger(name)
        self._slow = get_logger(name)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, "error", event, kw)

    def _direct_handler(self, level: int) -> _RedactingHandler | None:
        h = _installed["handler"]
        if h is None or h.filters:
            return None
        root = logging.root
        if root.filters:
            return None
        mine = 0
        for other in root.handlers:
            if other is h:
                mine += 1
            elif level >= other.level:  # a handler that would see this line (a test's capture, ...)
                return None
        if mine != 1:
            return None
        c: logging.Logger | None = self._std
        while c is not None and c is not root:  # nothing between this logger and the root may act
            if c.handlers or c.filters or not c.propagate:
                return None
            c = c.parent
        if structlog.get_config()["processors"] is not _installed["processors"]:
            return None
        return h

    def is_enabled_for(self, level: int) -> bool:
        """The level filter that runs first on either path (a line below it costs nothing to skip)."""
        return self._std.isEnabledFor(level)

    def _emit(self, level: int, method: str, event: str, kw: dict[str, Any]) -> None:
        if not self._std.isEnabledFor(level):  # structlog's filter_by_level, first in either chain
            return
        h = self._direct_handler(level)
        if h is None:
            getattr(self._slow, method)(event, **kw)
            return
        if level < h.level:
            return
        ed: EventDict = kw  # a fresh dict: **kw
        ed["event"] = event
        structlog.contextvars.merge_contextvars(None, method, ed)
        ed["level"] = method
        ed["logger"] = self.name
        _STAMPER(None, method, ed)
        h.acquire()
        try:
            try:
                line = cast(str, _RENDERER(None, method, redact(None, method, ed)))
                h.stream.write(line + h.terminator)
                h.flush()
            except RecursionError:
                raise
            except Exception:
                h.handleError(cast(logging.LogRecord, None))
        finally:
            h.release()


def get_fast_logger(name: str) -> FastLogger:
    return FastLogger(name)
