"""Parse: raw request bytes -> one immutable `FhirRequest`, or a `Refusal`.

Everything here is a pure function of its inputs. It refuses whatever it cannot read with
certainty: ambiguous encodings, duplicated security headers, method overrides it will not
honour, bodies that are not exactly one well-formed JSON document.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from urllib.parse import parse_qsl, unquote

from sidecar.errors import Refusal, bad_request, deny
from sidecar.fhir import jsonbody
from sidecar.fhir.types import is_r4_type
from sidecar.request import FhirRequest, Query, RawRequest, Target

# Headers that may travel upstream (after our own checks). Everything else is dropped.
FORWARD_HEADERS = frozenset({
    "accept", "accept-charset", "accept-language", "cache-control", "content-type",
    "if-match", "if-none-match", "if-none-exist", "if-modified-since", "if-unmodified-since",
    "prefer", "user-agent", "x-provenance",
})
# Security-relevant headers that must not appear twice (which one would the EHR believe?).
SINGLE_HEADERS = frozenset({
    "content-type", "content-encoding", "content-length", "if-match", "if-none-match", "if-none-exist",
    "x-api-key", "authorization", "x-http-method-override", "x-method-override",
    "idempotency-key", "prefer", "x-provenance", "x-correlation-id", "traceparent", "host",
})
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
BODYLESS = frozenset({"GET", "HEAD", "DELETE"})

# All patterns below are used with fullmatch: with match, `$` also matches before a trailing "\n".
CORRELATION_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
# Raw path characters we accept: RFC 3986 pchar without ';' (matrix params confuse servers).
_RAW_PATH_RE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/%]*$")
_RAW_QUERY_RE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/?%|\[\]]*$")
_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_OP_RE = re.compile(r"^\$[a-z][a-z0-9-]{0,63}$")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-:.]{0,127}$")
COMPARTMENT_TYPES = frozenset({"Patient", "Encounter", "RelatedPerson", "Practitioner", "Device"})
# Query parameters that are never acceptable: tokens never in URLs; `_method` tunnels a method.
_FORBIDDEN_QUERY = frozenset({"access_token", "_method"})

JSON_TYPES = frozenset({"application/fhir+json", "application/json"})
PATCH_TYPES = frozenset({"application/json-patch+json"})
FORM_TYPES = frozenset({"application/x-www-form-urlencoded"})


class _RandomPool:
    """Bytes of os.urandom read 4 KiB at a time: one syscall per ~100 requests instead of three
    per request (a new correlation id and trace ids). The same kernel source, never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child must not repeat the parent's bytes

    def _reset(self) -> None:
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(max(4096, n)), 0
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out


_random = _RandomPool()


def correlation_id(raw: RawRequest) -> str:
    vals = raw.header_values("x-correlation-id")
    if len(vals) == 1 and CORRELATION_RE.fullmatch(vals[0]):
        return vals[0]
    return str(uuid.UUID(bytes=_random.take(16), version=4))


def traceparent(raw: RawRequest) -> str:
    vals = raw.header_values("traceparent")
    if len(vals) == 1:
        m = TRACEPARENT_RE.fullmatch(vals[0])
        if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
            return vals[0]
    ids = _random.take(24).hex()
    return f"00-{ids[:32]}-{ids[32:]}-01"


def split_target(target: bytes, base_path: str) -> tuple[str, str]:
    """Return (raw path relative to the base, raw query). Refuses anything ambiguous."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise deny("request target is not ASCII") from None
    if not text.startswith("/"):
        raise deny("request target must be origin-form")
    path, sep, query = text.partition("?")
    if "#" in text:
        raise deny("fragment in request target")
    if not _RAW_PATH_RE.fullmatch(path) or _PCT_RE.search(path):
        raise deny("illegal character or encoding in path")
    if sep and (not _RAW_QUERY_RE.fullmatch(query) or _PCT_RE.search(query) or ";" in query):
        raise deny("illegal character or encoding in query")
    if base_path:
        if path == base_path:
            rel = ""
        elif path.startswith(base_path + "/"):
            rel = path[len(base_path):]
        else:
            raise deny("path is outside the FHIR base")
    else:
        rel = path
    return rel, query


def parse_query(raw_query: str) -> Query:
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise deny("query is not valid UTF-8 percent-encoding") from None
    for k, v in pairs:
        if not _PARAM_RE.fullmatch(k):
            raise deny("malformed query parameter name")
        if k.lower() in _FORBIDDEN_QUERY:
            raise deny(f"query parameter {k} is refused")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise deny("control character in query value")
    return tuple(pairs)


def parse_path(rel: str, query: Query) -> Target:
    """Decode the base-relative path once and match it against the FHIR URL shapes."""
    if rel in ("", "/"):
        return Target("base", query=query, path="/")
    segs_raw = rel[1:].split("/")
    segs: list[str] = []
    for s in segs_raw:
        if s == "":
            raise deny("empty path segment")
        try:
            d = unquote(s, errors="strict") if "%" in s else s
        except UnicodeDecodeError:
            raise deny("path segment is not valid UTF-8 percent-encoding") from None
        if "%" in d or "/" in d or "\\" in d or d in (".", "..") or not d.isascii() or not d.isprintable():
            raise deny("path segment encodes a separator, a dot segment or a second encoding")
        segs.append(d)
    path = "/" + "/".join(segs)
    n = len(segs)
    first = segs[0]

    def rtype(name: str) -> str:
        if not is_r4_type(name):
            raise deny("unknown resource type")
        return name

    def rid(value: str) -> str:
        if not _ID_RE.fullmatch(value):
            raise deny("malformed resource id")
        return value

    def op(value: str) -> str:
        if not _OP_RE.fullmatch(value):
            raise deny("malformed operation name")
        return value

    if n == 1:
        if first == "metadata":
            return Target("metadata", query=query, path=path)
        if first == "_history":
            return Target("history-system", query=query, path=path)
        if first == "_search":
            return Target("search-system-post", query=query, path=path)
        if first.startswith("$"):
            return Target("operation-system", operation=op(first), query=query, path=path)
        return Target("type", rtype(first), query=query, path=path)
    if n == 2 and segs == [".well-known", "smart-configuration"]:
        return Target("discovery", query=query, path=path)
    t = rtype(first)
    second = segs[1]
    if n == 2:
        if second == "_history":
            return Target("history-type", t, query=query, path=path)
        if second == "_search":
            return Target("search-type-post", t, query=query, path=path)
        if second.startswith("$"):
            return Target("operation-type", t, operation=op(second), query=query, path=path)
        return Target("instance", t, rid(second), query=query, path=path)
    i = rid(second)
    third = segs[2]
    if n == 3:
        if third == "_history":
            return Target("history-instance", t, i, query=query, path=path)
        if third.startswith("$"):
            return Target("operation-instance", t, i, operation=op(third), query=query, path=path)
        if t in COMPARTMENT_TYPES:
            inner = "*" if third == "*" else rtype(third)
            return Target("compartment", inner, compartment=(t, i), query=query, path=path)
        raise deny("unsupported URL shape")
    if n == 4 and third == "_history":
        return Target("vread", t, i, vid=rid(segs[3]), query=query, path=path)
    raise deny("unsupported URL shape")


def effective_method(raw: RawRequest) -> str:
    """The method the request asks for. Header overrides are honoured only on POST."""
    method = raw.method.upper()
    if raw.method != method or method not in METHODS:
        raise deny("method not supported")
    asked = {v.strip().upper() for h in METHOD_OVERRIDE_HEADERS for v in raw.header_values(h)}
    if not asked:
        return method
    if len(asked) > 1:
        raise deny("conflicting method overrides")
    override = asked.pop()
    if method != "POST" or override not in METHODS or override == "HEAD":
        raise deny("method override refused")
    return override


_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _single_headers(raw: RawRequest) -> dict[str, str]:
    seen: dict[str, str] = {}
    for k, v in raw.headers:
        if _HEADER_CONTROL.search(v) or _HEADER_CONTROL.search(k):
            # a bare CR or NUL in a value would split it into two headers further on
            raise bad_request("control character in a header")
        if k in SINGLE_HEADERS and k in seen:
            raise bad_request(f"duplicate {k} header")
        seen.setdefault(k, v)
    return seen


def _connection_tokens(raw: RawRequest) -> frozenset[str]:
    """Every header name listed in any `Connection` header (there may be several)."""
    return frozenset(t.strip().lower() for v in raw.header_values("connection") for t in v.split(",") if t.strip())


def _media_type(value: str | None) -> str | None:
    if value is None:
        return None
    main, *params = value.split(";")
    for p in params:
        k, _, v = p.strip().partition("=")
        if k.strip().lower() == "charset" and v.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise Refusal(415, "only UTF-8 bodies are accepted", "not-supported")
    return main.strip().lower()


def rewrite_base(body: bytes, sidecar_bases: tuple[str, ...], upstream_base: str) -> tuple[bytes, bool]:
    """Absolute URLs with the sidecar's base inside a write body point at the upstream instead.

    Only JSON string values that *start* with the base (`"http://sidecar/fhir/R4/...`) are
    touched, so everything else in the bytes stays exactly as the app sent it.
    """
    changed = False
    for base in sidecar_bases:
        if base == upstream_base:
            continue
        for needle, repl in (
            (f'"{base}/'.encode(), f'"{upstream_base}/'.encode()),
            (f'"{base}"'.encode(), f'"{upstream_base}"'.encode()),
        ):
            if needle in body:
                body = body.replace(needle, repl)
                changed = True
    return body, changed


def parse_request(
    raw: RawRequest,
    *,
    base_path: str,
    max_body_bytes: int,
    sidecar_bases: tuple[str, ...] = (),
    upstream_base: str = "",
    correlation: str = "",
    trace: str = "",
) -> FhirRequest:
    """Normalise once. Raises `Refusal` for anything not read with certainty."""
    single = _single_headers(raw)
    hop = _connection_tokens(raw)
    if "upgrade" in single or any("upgrade" in v.lower() for v in raw.header_values("connection")):
        raise deny("protocol upgrade refused")
    # Headers named in Connection are hop-by-hop: dropped, so neither used nor forwarded.
    single = {k: v for k, v in single.items() if k not in hop}
    if raw.authority:
        raise deny("absolute-form request target refused")
    method = effective_method(raw)
    rel, raw_query = split_target(raw.target, base_path)
    query = parse_query(raw_query)
    target = parse_path(rel, query)

    body_bytes = raw.body or b""
    content_type = _media_type(single.get("content-type"))
    parsed: object = None
    rewritten = False
    if body_bytes:
        if method in BODYLESS or raw.method.upper() in BODYLESS:
            raise bad_request(f"a {method} request carries no body")
        if len(body_bytes) > max_body_bytes:
            raise Refusal(413, "body exceeds the size limit", "too-costly")
        if content_type is None:
            raise Refusal(415, "a body needs a Content-Type", "not-supported")
        try:
            decoded = jsonbody.decode_content(body_bytes, single.get("content-encoding"), max_body_bytes)
            if content_type in FORM_TYPES:
                if target.kind not in ("search-type-post", "search-system-post"):
                    raise Refusal(415, "form bodies are accepted for POST _search only", "not-supported")
                parsed = tuple(jsonbody.parse_form(decoded))
                if not all(_PARAM_RE.fullmatch(k) for k, _ in parsed):
                    raise deny("malformed form parameter name")  # the same names as a URL query
                names = {k.lower() for k, _ in parsed}
                if names & _FORBIDDEN_QUERY:
                    raise deny("form parameter refused (_method / access_token)")
            elif content_type in PATCH_TYPES:
                if method != "PATCH":
                    raise Refusal(415, "JSON Patch bodies are accepted for PATCH only", "not-supported")
                parsed = jsonbody.parse_json(decoded, allow_array=True)
                if not isinstance(parsed, list):
                    raise bad_request("a JSON Patch body is an array", "structure")
            elif content_type in JSON_TYPES:
                if sidecar_bases and upstream_base:
                    decoded, rewritten = rewrite_base(decoded, sidecar_bases, upstream_base)
                parsed = jsonbody.parse_json(decoded)
            else:
                raise Refusal(415, "unsupported Content-Type", "not-supported")
        except jsonbody.BodyError as e:
            raise Refusal(e.status, str(e), e.code) from None
        if rewritten:
            body_bytes = decoded  # forwarded decoded; the content-encoding header is then dropped
    elif single.get("content-encoding") not in (None, "identity"):
        raise Refusal(415, "content-encoding on an empty body", "not-supported")

    headers = {k: v for k, v in single.items() if k in FORWARD_HEADERS}
    if body_bytes and not rewritten and "content-encoding" in single:
        headers["content-encoding"] = single["content-encoding"]
    return FhirRequest(
        method=method,
        original_method=raw.method.upper(),
        target=target,
        headers=headers,
        content_type=content_type,
        body=parsed,
        raw_body=body_bytes,
        body_rewritten=rewritten,
        credentials={**{k: single[k] for k in ("x-api-key", "authorization") if k in single},
                     **({"mtls": raw.peer_client} if raw.peer_client else {})},
        correlation_id=correlation or correlation_id(raw),
        traceparent=trace or traceparent(raw),
    )
