"""Strict, bounded decoding of request bodies.

Everything the sidecar decides is decided on the parsed body, and the upstream
server parses the same bytes with its own parser. Any input two parsers could
read differently (duplicate keys, NaN, lone surrogates, a BOM, trailing data,
stacked encodings) is therefore refused rather than interpreted.

Error messages never contain body content: they may be logged.
"""

from __future__ import annotations

import json
import re
import zlib
from itertools import accumulate
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

__all__ = ["BodyError", "decode_content", "parse_json", "parse_form", "MAX_DEPTH"]

IssueCode = Literal["invalid", "structure", "too-costly", "not-supported"]

MAX_DEPTH: Final = 100  # objects + arrays; deeper is refused
MAX_FORM_FIELDS: Final = 1000


class BodyError(ValueError):
    """A body we refuse. ``status`` is the HTTP status to answer with and
    ``code`` the FHIR OperationOutcome issue code."""

    def __init__(self, status: int, code: IssueCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _invalid(msg: str, code: IssueCode = "invalid") -> BodyError:
    return BodyError(400, code, msg)


# --------------------------------------------------------------------------
# Content-Encoding
# --------------------------------------------------------------------------

_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


def _looks_like_zlib(raw: bytes) -> bool:
    # RFC 1950 header: CM=8 (deflate), CINFO<=7, (CMF*256+FLG) % 31 == 0.
    return len(raw) >= 2 and raw[0] & 0x0F == 8 and raw[0] >> 4 <= 7 and (raw[0] << 8 | raw[1]) % 31 == 0


def decode_content(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo one Content-Encoding with a hard output bound of ``limit`` bytes.

    Supported: identity, gzip, x-gzip, deflate (zlib-wrapped per RFC 9110, or
    the raw deflate some clients send). More than one coding, or any other
    coding (br, zstd, compress, ...), is 415. Output over ``limit`` is 413;
    the decompressor never produces more than ``limit + 1`` bytes. Corrupt,
    truncated or trailing data is 400.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    codings = [c for c in codings if c]
    if len(codings) > 1:
        raise BodyError(415, "not-supported", "stacked Content-Encoding is not supported")
    coding = codings[0] if codings else "identity"
    if coding == "identity":
        out = raw
    elif coding in _WBITS or coding == "deflate":
        wbits = _WBITS.get(coding) or (zlib.MAX_WBITS if _looks_like_zlib(raw) else -zlib.MAX_WBITS)
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error:
            raise _invalid(f"corrupt {coding} content") from None
        if len(out) <= limit and (not d.eof or d.unused_data or d.unconsumed_tail):
            # Not at end of stream, or bytes after it (e.g. a 2nd gzip member).
            raise _invalid(f"truncated or trailing data in {coding} content")
    else:
        raise BodyError(415, "not-supported", "unsupported Content-Encoding")
    if len(out) > limit:
        raise BodyError(413, "too-costly", f"body exceeds {limit} bytes")
    return out


# --------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _invalid("duplicate key in JSON object")
    return d


def _no_constant(_: str) -> Any:
    raise _invalid("NaN/Infinity are not JSON")


def _finite_float(s: str) -> float:
    f = float(s)
    if f in (float("inf"), float("-inf")):  # e.g. 1e400
        raise _invalid("number out of range")
    return f


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_no_constant, parse_float=_finite_float, strict=True
)
# Strings (unrolled-loop form: linear, no catastrophic backtracking).
_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS: Final = re.compile(r"[\[\]{}]")
_DELTA: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _max_depth(text: str) -> int:
    # Only called when there are more than MAX_DEPTH openers; the json module
    # itself recurses per level, so we must measure before parsing.
    brackets = _BRACKETS.findall(_STRING.sub("", text))
    return max(accumulate(_DELTA[b] for b in brackets), default=0)


# The fast depth check works on the bytes: escapes removed, then everything but quotes and
# brackets (UTF-8 continuation bytes are >= 0x80: never one of them), with `{}` read as `[]`
# (in a JSON text brackets match by kind anyway: the nesting is the same).
_STRUCTURE: Final = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_QUOTED: Final = re.compile(rb'"[^"]*"')
_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)  # a backslash and the character it escapes


def _depth_within(data: bytes, limit: int) -> bool:
    """True only if ``data``, read as JSON, nests at most ``limit`` deep; False: not shown (the
    exact ``_max_depth`` decides). Linear C-level passes instead of a regex match per string.

    After removing every escape (a backslash and the character after it, left to right, as a JSON
    lexer reads them), every quote left delimits a string. Of quotes and brackets only, adjacent
    quote pairs are dropped (an empty string, or one string's end and the next one's start:
    nothing between them), then the strings that are left (those holding brackets) go. Each pass then removes every innermost
    ``[]`` (``bytes.replace`` does not rescan what it produced: one level per pass); a matched
    sequence is empty after exactly its depth in passes. For a JSON text the answer is exact; an
    unterminated string or unbalanced brackets never empty (False), and a text that is not JSON
    but was cleared anyway fails to parse, where the exact measure decides.
    """
    s = _ESCAPE.sub(b"", data) if b"\\" in data else data
    s = s.translate(_STRUCTURE, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in s:
        s = _QUOTED.sub(b"", s)
    for _ in range(limit):
        if not s:
            return True
        s = s.replace(b"[]", b"")
    return not s


def _check_strings(value: Any) -> None:
    """Refuse lone surrogates (from \\uD800-style escapes) in keys/strings."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            v.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def parse_json(data: bytes, *, allow_array: bool = False) -> Any:
    """Parse a request body as strict JSON (RFC 8259 + I-JSON restrictions).

    Top level must be an object, or an array if ``allow_array`` (JSON Patch).
    Raises BodyError(400, "invalid" | "structure").
    """
    if data.startswith(b"\xef\xbb\xbf"):
        raise _invalid("byte order mark is not allowed")
    try:
        text = data.decode("utf-8")  # strict: also rejects encoded surrogates
    except UnicodeDecodeError:
        raise _invalid("body is not valid UTF-8") from None
    # Depth is measured before parsing (the json module recurses per level). A JSON text the
    # fast check clears is nested at most MAX_DEPTH deep; one it cannot clear is measured exactly.
    # Should a text it cleared fail to parse, the exact measure decides the message first, so
    # every answer is the one the exact measure alone gives.
    deep = text.count("{") + text.count("[") > MAX_DEPTH
    if deep and not _depth_within(data, MAX_DEPTH) and _max_depth(text) > MAX_DEPTH:
        raise _invalid(f"JSON nested deeper than {MAX_DEPTH}")
    try:
        value = _DECODER.decode(text)  # rejects trailing data ("Extra data")
    except json.JSONDecodeError as e:
        if deep and _max_depth(text) > MAX_DEPTH:
            raise _invalid(f"JSON nested deeper than {MAX_DEPTH}") from None
        # e.msg is one of the json module's fixed messages; never e.doc.
        raise _invalid(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise _invalid(f"JSON nested deeper than {MAX_DEPTH}") from None
    except BodyError:
        if deep and _max_depth(text) > MAX_DEPTH:
            raise _invalid(f"JSON nested deeper than {MAX_DEPTH}") from None
        raise
    except ValueError:  # e.g. int longer than sys.get_int_max_str_digits()
        if deep and _max_depth(text) > MAX_DEPTH:
            raise _invalid(f"JSON nested deeper than {MAX_DEPTH}") from None
        raise _invalid("invalid JSON number") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            _check_strings(value)
        except UnicodeEncodeError:
            raise _invalid("lone surrogate in JSON string") from None
    if isinstance(value, dict) or (allow_array and isinstance(value, list)):
        return value
    expected = "an object or an array" if allow_array else "an object"
    raise _invalid(f"JSON top level must be {expected}", "structure")


# --------------------------------------------------------------------------
# application/x-www-form-urlencoded (POST [type]/_search)
# --------------------------------------------------------------------------

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def parse_form(data: bytes) -> list[tuple[str, str]]:
    """Decode a form body: '&'-separated, every field ``name=value`` (blank
    values kept), percent-escapes decoding to strict UTF-8, no control
    characters, at most MAX_FORM_FIELDS fields. Order and repeats are kept."""
    try:
        text = data.decode("ascii")  # form bodies are percent-encoded ASCII
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                          encoding="utf-8", errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise _invalid("invalid application/x-www-form-urlencoded body") from None
    for name, value in pairs:
        if not name or _CONTROL.search(name) or _CONTROL.search(value):
            raise _invalid("invalid application/x-www-form-urlencoded field")
    return pairs
