"""The sandbox's own request parser: target -> route -> classified FhirRequest.

Its ``action`` is what the witness reports in the request log, so it must stay
independent of the sidecar's classifier (a differential fuzzer compares them).
Parsing never raises: failures become ``action == "error"`` with ``error`` set.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from .jsonpatch import validate_patch
from .store import ID_RE, TYPE_RE, FhirError, Json

JSON_TYPES = ("application/fhir+json", "application/json")
PATCH_TYPE = "application/json-patch+json"
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass
class FhirRequest:
    """One FHIR interaction, from an HTTP request or a Bundle entry."""

    method: str
    action: str
    route: str = "error"  # action judged from method + path only
    rtype: str | None = None
    rid: str | None = None
    vid: int | None = None
    params: list[tuple[str, str]] = field(default_factory=list)
    resource: Json | None = None
    patch: list[dict[str, Any]] | None = None
    if_match: str | None = None
    if_none_exist: str | None = None
    prefer_return: str = "representation"
    strict: bool = False
    url: str = ""
    full_url: str | None = None
    assigned_id: str | None = None  # pre-assigned id for creates in a transaction
    entries: list[FhirRequest] = field(default_factory=list)
    error: FhirError | None = None


def split_target(target: str) -> tuple[str, str]:
    """Split a request target into (path, query); absolute-form is accepted."""
    target = target.split("#", 1)[0]
    if "://" in target.split("?", 1)[0]:
        after_scheme = target.split("://", 1)[1]
        slash = after_scheme.find("/")
        query_mark = after_scheme.find("?")
        cut = min(i for i in (slash, query_mark, len(after_scheme)) if i >= 0)
        target = after_scheme[cut:]
        if not target.startswith("/"):
            target = "/" + target
    path, _, query = target.partition("?")
    return path, query


def _remove_dot_segments(path: str) -> str:
    # Real servers normalise dot segments before routing; so does the witness.
    out: list[str] = []
    for seg in path.split("/"):
        if seg == ".":
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            continue
        out.append(seg)
    return "/".join(out)


def fhir_segments(path: str, base_path: str) -> list[str] | None:
    """Decoded path segments below ``base_path``; None when outside it."""
    path = _remove_dot_segments(path)
    if base_path and path != base_path and not path.startswith(base_path + "/"):
        return None
    return split_relative(path[len(base_path):].lstrip("/"))


def split_relative(rel: str) -> list[str]:
    if rel == "":
        return []
    raw = rel.split("/")
    if raw[-1] == "":  # tolerate one trailing slash, as common servers do
        raw.pop()
    try:
        segments = [unquote(seg, errors="strict") for seg in raw]
    except UnicodeDecodeError:
        raise FhirError(400, "path is not valid UTF-8", "invalid") from None
    for seg in segments:
        if seg in ("", ".", "..") or "/" in seg:
            raise FhirError(400, f"invalid path segment {seg!r}", "invalid")
    return segments


def route(method: str, segs: list[str]) -> tuple[str, str | None, str | None, int | None]:
    """Map method + segments to (action, type, id, version id)."""
    n = len(segs)
    if any(seg.startswith("$") for seg in segs):
        return "operation", segs[0] if n > 1 else None, None, None
    if n == 0:
        if method == "POST":
            return "bundle", None, None, None  # transaction or batch, decided by the body
        raise FhirError(405, f"{method} on the base URL is not supported", "not-supported")
    if n == 1 and segs[0] == "metadata":
        if method in ("GET", "HEAD"):
            return "capabilities", None, None, None
        raise FhirError(405, f"{method} metadata is not allowed", "not-supported")
    rtype = segs[0]
    if not TYPE_RE.match(rtype):
        raise FhirError(404, f"unknown resource type {rtype!r}", "not-supported")
    if n == 1:
        if method in ("GET", "HEAD"):
            return "search", rtype, None, None
        if method == "POST":
            return "create", rtype, None, None
        raise FhirError(405, f"conditional {method} is not supported", "not-supported")
    if n == 2 and segs[1] == "_search":
        if method in ("GET", "POST"):
            return "search", rtype, None, None
        raise FhirError(405, f"{method} _search is not allowed", "not-supported")
    rid = segs[1]
    if not ID_RE.match(rid):
        raise FhirError(400, f"invalid id {rid!r}", "invalid")
    if n == 2:
        actions = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch",
                   "DELETE": "delete"}
        if method not in actions:
            raise FhirError(405, f"{method} on an instance is not allowed", "not-supported")
        return actions[method], rtype, rid, None
    if segs[2] != "_history" or n > 4:
        raise FhirError(404, "unknown path", "not-found")
    if method not in ("GET", "HEAD"):
        raise FhirError(405, f"{method} on history is not allowed", "not-supported")
    if n == 3:
        return "history", rtype, rid, None
    if not segs[3].isdigit() or len(segs[3]) > 9:
        raise FhirError(404, f"invalid version id {segs[3]!r}", "not-found")
    return "vread", rtype, rid, int(segs[3])


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on duplicate keys (first vs last wins): refuse them.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8", errors="strict")
        return json.loads(text, object_pairs_hook=_reject_duplicates,
                          parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FhirError(400, f"malformed JSON: {exc}", "structure") from None


def check_resource(resource: Any, rtype: str, rid: str | None) -> Json:
    if not isinstance(resource, dict):
        raise FhirError(400, "body must be a JSON object", "structure")
    if resource.get("resourceType") != rtype:
        raise FhirError(400, f"resourceType must be {rtype!r}", "invalid")
    if rid is not None and resource.get("id") != rid:
        raise FhirError(400, f"resource id must equal the URL id {rid!r}", "invalid")
    return resource


def _prefer(value: str | None) -> tuple[str, bool]:
    ret, strict = "representation", False
    for token in (value or "").replace(";", ",").split(","):
        key, _, val = token.strip().partition("=")
        if key.lower() == "return" and val.strip('"'):
            ret = val.strip('"')
        elif key.lower() == "handling" and val.strip('"').lower() == "strict":
            strict = True
    return ret, strict


def parse_http(method: str, segs_or_none: list[str] | None, query: str,
               headers: dict[str, str], body: bytes, base_url: str) -> FhirRequest:
    """Classify an HTTP request under the base path (``headers`` are lower-cased)."""
    req = FhirRequest(method=method, action="error")
    try:
        if segs_or_none is None:
            raise FhirError(404, "no FHIR endpoint here", "not-found")
        req.route, req.rtype, req.rid, req.vid = route(method, segs_or_none)
        req.params = parse_qsl(query, keep_blank_values=True)
        req.if_match = headers.get("if-match")
        req.if_none_exist = headers.get("if-none-exist")
        req.prefer_return, req.strict = _prefer(headers.get("prefer"))
        _parse_body(req, media_type(headers.get("content-type")), body, base_url)
        req.action = req.route
    except FhirError as exc:
        req.action, req.error = "error", exc
    return req


def _parse_body(req: FhirRequest, ctype: str, body: bytes, base_url: str) -> None:
    needs_body = req.route in ("create", "update", "patch", "bundle")
    if req.route == "search" and req.method == "POST":
        if body and ctype != FORM_TYPE:
            raise FhirError(415, f"_search needs {FORM_TYPE}", "not-supported")
        try:
            req.params += parse_qsl(body.decode("utf-8", errors="strict"),
                                    keep_blank_values=True)
        except UnicodeDecodeError:
            raise FhirError(400, "form body is not valid UTF-8", "invalid") from None
        return
    if not needs_body:
        return  # bodies on GET/DELETE are ignored
    if not body:
        raise FhirError(400, "request body is required", "required")
    allowed = (PATCH_TYPE,) if req.route == "patch" else JSON_TYPES
    if ctype not in allowed:
        raise FhirError(415, f"content type {ctype or '(none)'!r} not supported here",
                        "not-supported")
    doc = parse_json(body)
    if req.route == "patch":
        req.patch = validate_patch(doc)
    elif req.route == "bundle":
        _parse_bundle(req, doc, base_url)
    else:
        assert req.rtype is not None
        req.resource = check_resource(doc, req.rtype,
                                      req.rid if req.route == "update" else None)


def _parse_bundle(req: FhirRequest, doc: Any, base_url: str) -> None:
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise FhirError(400, "POST to the base URL needs a Bundle", "invalid")
    kind = doc.get("type")
    if kind not in ("transaction", "batch"):
        raise FhirError(400, f"Bundle.type must be transaction or batch, not {kind!r}",
                        "invalid")
    entries = doc.get("entry", [])
    if not isinstance(entries, list):
        raise FhirError(400, "Bundle.entry must be an array", "structure")
    req.route = kind
    req.entries = [parse_entry(entry, base_url) for entry in entries]


def parse_entry(entry: Any, base_url: str) -> FhirRequest:
    """Classify one transaction/batch entry with the same router as HTTP."""
    req = FhirRequest(method="", action="error")
    try:
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict):
            raise FhirError(400, "entry.request is required", "required")
        method, url = request.get("method"), request.get("url")
        if not isinstance(method, str) or not isinstance(url, str):
            raise FhirError(400, "entry.request.method and url are required", "required")
        req.method, req.url = method.upper(), url
        full_url = entry.get("fullUrl")
        req.full_url = full_url if isinstance(full_url, str) else None
        if url.startswith(base_url + "/"):
            url = url[len(base_url) + 1:]
        elif "://" in url or url.startswith("/"):
            raise FhirError(400, f"entry url {url!r} must be relative", "invalid")
        path, _, query = url.partition("?")
        req.route, req.rtype, req.rid, req.vid = route(req.method, split_relative(path))
        if req.route in ("bundle", "transaction", "batch"):
            raise FhirError(400, "nested transaction/batch is not supported", "not-supported")
        req.params = parse_qsl(query, keep_blank_values=True)
        for key, attr in (("ifMatch", "if_match"), ("ifNoneExist", "if_none_exist")):
            if isinstance(request.get(key), str):
                setattr(req, attr, request[key])
        resource = entry.get("resource")
        if req.route in ("create", "update"):
            assert req.rtype is not None
            req.resource = check_resource(resource, req.rtype,
                                          req.rid if req.route == "update" else None)
        elif req.route == "patch":
            req.patch = validate_patch(parse_json(_binary_patch(resource)))
        req.action = req.route
    except FhirError as exc:
        req.action, req.error = "error", exc
    return req


def _binary_patch(resource: Any) -> bytes:
    # FHIR carries JSON Patch in a Bundle as a Binary resource.
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary" \
            or resource.get("contentType") != PATCH_TYPE:
        raise FhirError(400, f"PATCH entries need a Binary of {PATCH_TYPE}", "invalid")
    try:
        return base64.b64decode(str(resource.get("data", "")), validate=True)
    except binascii.Error:
        raise FhirError(400, "Binary.data is not base64", "invalid") from None
