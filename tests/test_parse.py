"""parse: raw request -> FhirRequest, or the exact refusal (pure; no network).

Every hardening case of the foundation issue is a row: one request, one expected status.
Rows that need the interaction (body vs URL, query parameters on writes) go through
`classify` too, as the pipeline does.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import uuid

import pytest

import sidecar.parse as parse_mod

from sidecar.classify import classify
from sidecar.errors import Refusal
from sidecar.parse import parse_request
from sidecar.request import RawRequest

BASE = "/fhir/R4"
UPSTREAM = "https://ehr.example.org/fhir/R4"
SIDECAR = "http://127.0.0.1:8080/fhir/R4"
MAX = 64 * 1024

FHIR_JSON = ("content-type", "application/fhir+json")
JSON_PATCH = ("content-type", "application/json-patch+json")
FORM = ("content-type", "application/x-www-form-urlencoded")

OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
OBS_9 = {**OBS, "id": "9"}
PATCH_OPS = [{"op": "replace", "path": "/status", "value": "amended"}]


def body_of(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def raw(method: str = "GET", target: bytes = b"/fhir/R4/Observation", headers=(), body: object = None,
        **kw) -> RawRequest:
    return RawRequest(method, target, tuple(headers), body_of(body), **kw)


def parse(r: RawRequest, **kw):
    kw.setdefault("max_body_bytes", MAX)
    return parse_request(r, base_path=BASE, **kw)


def run(r: RawRequest, **kw):
    """parse + classify, as the pipeline's first two stages."""
    return classify(parse(r, **kw), upstream_base=UPSTREAM)


def refusal(r: RawRequest, **kw) -> Refusal:
    with pytest.raises(Refusal) as info:
        run(r, **kw)
    return info.value


# --------------------------------------------------------------------------------------------
# The hardening table: request -> exact status
# --------------------------------------------------------------------------------------------

P = b"/fhir/R4/Observation"
P9 = b"/fhir/R4/Observation/9"
GZ_BOMB = gzip.compress(b"{" + b" " * (2 * MAX) + b"}")  # small on the wire, over the limit decoded

REFUSED = [
    # --- method overrides -------------------------------------------------------------------
    ("override-on-get", "GET", P9, [("x-http-method-override", "DELETE")], None, 403),
    ("override-on-put", "PUT", P9, [("x-http-method-override", "DELETE"), FHIR_JSON], OBS_9, 403),
    ("override-on-delete", "DELETE", P9, [("x-method-override", "GET")], None, 403),
    ("override-conflicting", "POST", P9, [("x-http-method-override", "DELETE"), ("x-method-override", "PUT")], None, 403),
    ("override-same-header-twice", "POST", P9, [("x-http-method-override", "DELETE"),
                                                ("x-http-method-override", "PUT")], None, 400),
    ("override-to-head", "POST", P9, [("x-http-method-override", "HEAD")], None, 403),
    ("override-to-trace", "POST", P9, [("x-http-method-override", "TRACE")], None, 403),
    ("override-empty", "POST", P9, [("x-http-method-override", "")], None, 403),
    ("method-query", "POST", P9 + b"?_method=DELETE", [], None, 403),
    ("method-query-on-get", "GET", P9 + b"?_method=DELETE", [], None, 403),
    ("method-query-encoded", "POST", P9 + b"?%5Fmethod=DELETE", [], None, 403),
    ("method-query-upper", "POST", P9 + b"?_METHOD=DELETE", [], None, 403),
    ("method-form", "POST", P + b"/_search", [FORM], "code=x&_method=DELETE", 403),
    ("method-form-upper", "POST", P + b"/_search", [FORM], "_Method=DELETE", 403),
    ("form-name-trailing-space", "POST", P + b"/_search", [FORM], "_include%20=Observation:subject:Patient", 403),
    ("form-name-newline", "POST", P + b"/_search", [FORM], "_method%0A=DELETE", 400),  # control char: parse_form
    ("form-name-empty", "POST", P + b"/_search", [FORM], "=x", 400),
    ("method-lowercase", "get", P9, [], None, 403),
    ("method-trace", "TRACE", P9, [], None, 403),
    ("method-options", "OPTIONS", P9, [], None, 403),
    ("method-connect", "CONNECT", P9, [], None, 403),
    # --- resource types are exact -----------------------------------------------------------
    ("type-lowercase", "GET", b"/fhir/R4/observation", [], None, 403),
    ("type-uppercase", "GET", b"/fhir/R4/OBSERVATION/9", [], None, 403),
    ("type-abstract-resource", "GET", b"/fhir/R4/Resource/1", [], None, 403),
    ("type-abstract-domainresource", "GET", b"/fhir/R4/DomainResource", [], None, 403),
    ("type-r5-only", "GET", b"/fhir/R4/ActorDefinition", [], None, 403),
    ("type-encoded-lowercase", "GET", b"/fhir/R4/%6Fbservation", [], None, 403),
    ("type-in-compartment-lowercase", "GET", b"/fhir/R4/Patient/1/observation", [], None, 403),
    # --- percent-encoding and path shapes ---------------------------------------------------
    ("pct-2F-in-segment", "GET", b"/fhir/R4/Observation%2F9", [], None, 403),
    ("pct-2f-lower-in-id", "GET", b"/fhir/R4/Observation/9%2f..", [], None, 403),
    ("pct-dot-dot", "GET", b"/fhir/R4/Observation/%2e%2e/Patient/1", [], None, 403),
    ("pct-dot-dot-upper", "GET", b"/fhir/R4/Observation/%2E%2E", [], None, 403),
    ("pct-single-dot", "GET", b"/fhir/R4/%2e/Observation", [], None, 403),
    ("dot-dot", "GET", b"/fhir/R4/Observation/../Patient/1", [], None, 403),
    ("dot-dot-out-of-base", "GET", b"/fhir/R4/../R5/Observation", [], None, 403),
    ("single-dot", "GET", b"/fhir/R4/./Observation", [], None, 403),
    ("double-slash", "GET", b"/fhir/R4//Observation", [], None, 403),
    ("double-slash-inner", "GET", b"/fhir/R4/Observation//9", [], None, 403),
    ("trailing-slash", "GET", b"/fhir/R4/Observation/", [], None, 403),
    ("matrix-jsessionid", "GET", b"/fhir/R4/Observation;jsessionid=x", [], None, 403),
    ("matrix-on-id", "GET", b"/fhir/R4/Observation/9;jsessionid=x", [], None, 403),
    ("matrix-encoded", "GET", b"/fhir/R4/Observation/9%3Bx=1", [], None, 403),
    ("double-encoding-2F", "GET", b"/fhir/R4/Observation%252F9", [], None, 403),
    ("double-encoding-dots", "GET", b"/fhir/R4/Observation/%252e%252e", [], None, 403),
    ("non-ascii-raw", "GET", "/fhir/R4/Observation/é".encode(), [], None, 403),
    ("non-ascii-latin1", "GET", b"/fhir/R4/Observation/\xe9", [], None, 403),
    ("non-ascii-encoded", "GET", b"/fhir/R4/Observation/%C3%A9", [], None, 403),
    ("invalid-utf8-encoded", "GET", b"/fhir/R4/Observation/%FF", [], None, 403),
    ("backslash", "GET", b"/fhir/R4/Observation\\9", [], None, 403),
    ("backslash-encoded", "GET", b"/fhir/R4/Observation/9%5C..", [], None, 403),
    ("nul-encoded", "GET", b"/fhir/R4/Observation/9%00", [], None, 403),
    ("newline-encoded", "GET", b"/fhir/R4/Observation/9%0A", [], None, 403),
    ("space-raw", "GET", b"/fhir/R4/Observation/9 x", [], None, 403),
    ("broken-escape", "GET", b"/fhir/R4/Observation/9%zz", [], None, 403),
    ("truncated-escape", "GET", b"/fhir/R4/Observation/9%2", [], None, 403),
    ("fragment", "GET", b"/fhir/R4/Observation/9#x", [], None, 403),
    ("query-broken-escape", "GET", P + b"?code=%zz", [], None, 403),
    ("query-invalid-utf8", "GET", P + b"?code=%FF", [], None, 403),
    ("query-control-char", "GET", P + b"?code=a%00b", [], None, 403),
    ("query-newline-in-name", "GET", P + b"?access_token%0A=x", [], None, 403),
    ("query-semicolon", "GET", P + b"?code=a;b", [], None, 403),
    ("query-space-in-name", "GET", P + b"?co%20de=a", [], None, 403),
    ("bad-id-chars", "GET", b"/fhir/R4/Observation/9_x", [], None, 403),
    ("id-too-long", "GET", b"/fhir/R4/Observation/" + b"a" * 65, [], None, 403),
    ("bad-operation-name", "GET", b"/fhir/R4/Observation/$Everything", [], None, 403),
    ("unknown-shape", "GET", b"/fhir/R4/Observation/9/foo/bar", [], None, 403),
    # --- request-target form and base path --------------------------------------------------
    ("absolute-form-target", "GET", b"http://evil.example/fhir/R4/Observation/9", [], None, 403),
    ("asterisk-form", "GET", b"*", [], None, 403),
    ("outside-base-root", "GET", b"/", [], None, 403),
    ("outside-base-admin", "GET", b"/admin", [], None, 403),
    ("outside-base-prefix", "GET", b"/fhir/R4x/Observation", [], None, 403),
    ("outside-base-parent", "GET", b"/fhir/Observation/9", [], None, 403),
    ("outside-base-case", "GET", b"/fhir/r4/Observation/9", [], None, 403),
    ("outside-base-encoded-slash", "GET", b"/fhir/R4%2FObservation", [], None, 403),
    ("outside-base-encoded-base", "GET", b"/fhir/%52%34/Observation", [], None, 403),
    # --- bodies -------------------------------------------------------------------------------
    ("ct-text-plain", "POST", P, [("content-type", "text/plain")], OBS, 415),
    ("ct-fhir-xml", "POST", P, [("content-type", "application/fhir+xml")], b"<Observation/>", 415),
    ("ct-xml", "POST", P, [("content-type", "application/xml")], b"<Observation/>", 415),
    ("ct-multipart", "POST", P, [("content-type", "multipart/form-data; boundary=x")], b"--x--", 415),
    ("ct-missing", "POST", P, [], OBS, 415),
    ("ct-charset-latin1", "POST", P, [("content-type", "application/fhir+json; charset=latin-1")], OBS, 415),
    ("ct-charset-iso-8859-1", "POST", P, [("content-type", "application/json;charset=ISO-8859-1")], OBS, 415),
    ("ct-charset-utf16", "POST", P, [("content-type", "application/fhir+json; charset=utf-16")], OBS, 415),
    ("ct-form-on-create", "POST", P, [FORM], "status=final", 415),
    ("ct-json-patch-on-post", "POST", P, [JSON_PATCH], PATCH_OPS, 415),
    ("ct-json-patch-on-put", "PUT", P9, [JSON_PATCH], PATCH_OPS, 415),
    ("ce-br", "POST", P, [FHIR_JSON, ("content-encoding", "br")], b"\x0b\x02\x80{}\x03", 415),
    ("ce-zstd", "POST", P, [FHIR_JSON, ("content-encoding", "zstd")], b"(\xb5/\xfd", 415),
    ("ce-stacked", "POST", P, [FHIR_JSON, ("content-encoding", "gzip, gzip")], gzip.compress(gzip.compress(b"{}")), 415),
    ("ce-on-empty-body", "DELETE", P9, [("content-encoding", "gzip")], None, 415),
    ("gzip-bomb", "POST", P, [FHIR_JSON, ("content-encoding", "gzip")], GZ_BOMB, 413),
    ("gzip-corrupt", "POST", P, [FHIR_JSON, ("content-encoding", "gzip")], b"\x1f\x8b\x08\x00garbage", 400),
    ("gzip-trailing-member", "POST", P, [FHIR_JSON, ("content-encoding", "gzip")],
     gzip.compress(json.dumps(OBS).encode()) + gzip.compress(b"{}"), 400),
    ("over-max", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","x":"' + b"a" * MAX + b'"}', 413),
    ("dup-key-top", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","status":"final","status":"amended"}', 400),
    ("dup-key-nested", "POST", P, [FHIR_JSON],
     b'{"resourceType":"Observation","code":{"text":"a","text":"b"},"status":"final"}', 400),
    ("dup-key-in-array", "POST", P, [FHIR_JSON],
     b'{"resourceType":"Observation","identifier":[{"value":"a","value":"b"}]}', 400),
    ("nan", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","valueQuantity":{"value":NaN}}', 400),
    ("infinity", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","valueQuantity":{"value":Infinity}}', 400),
    ("minus-infinity", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","valueQuantity":{"value":-Infinity}}', 400),
    ("huge-float", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","valueQuantity":{"value":1e400}}', 400),
    ("bom", "POST", P, [FHIR_JSON], b"\xef\xbb\xbf" + json.dumps(OBS).encode(), 400),
    ("invalid-utf8-body", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","status":"\xff"}', 400),
    ("lone-surrogate", "POST", P, [FHIR_JSON], b'{"resourceType":"Observation","status":"\\ud800"}', 400),
    ("trailing-data", "POST", P, [FHIR_JSON], json.dumps(OBS).encode() + b"{}", 400),
    ("top-level-string", "POST", P, [FHIR_JSON], b'"Observation"', 400),
    ("top-level-number", "POST", P, [FHIR_JSON], b"1", 400),
    ("top-level-null", "POST", P, [FHIR_JSON], b"null", 400),
    ("array-on-post", "POST", P, [FHIR_JSON], [OBS], 400),
    ("array-on-put", "PUT", P9, [FHIR_JSON], [OBS_9], 400),
    ("array-as-fhirpath-patch", "PATCH", P9, [FHIR_JSON], PATCH_OPS, 400),
    ("json-patch-object", "PATCH", P9, [JSON_PATCH], {"op": "remove", "path": "/status"}, 400),
    ("fhirpath-patch-not-parameters", "PATCH", P9, [FHIR_JSON], OBS_9, 400),
    ("patch-without-body", "PATCH", P9, [], None, 400),
    ("body-on-get", "GET", P9, [FHIR_JSON], OBS, 400),
    ("body-on-head", "HEAD", P9, [FHIR_JSON], OBS, 400),
    ("body-on-delete", "DELETE", P9, [FHIR_JSON], OBS, 400),
    ("body-on-override-delete", "POST", P9, [("x-http-method-override", "DELETE"), FHIR_JSON], OBS, 400),
    ("body-on-override-get", "POST", P + b"/_search", [("x-http-method-override", "GET"), FORM], "code=x", 400),
    ("body-type-mismatch", "POST", P, [FHIR_JSON], {"resourceType": "Patient"}, 400),
    ("body-type-missing", "POST", P, [FHIR_JSON], {"status": "final"}, 400),
    ("body-type-mismatch-put", "PUT", P9, [FHIR_JSON], {"resourceType": "Patient", "id": "9"}, 400),
    ("body-type-mismatch-conditional-put", "PUT", P + b"?identifier=a|1", [FHIR_JSON], {"resourceType": "Patient"}, 400),
    ("update-id-mismatch", "PUT", P9, [FHIR_JSON], {**OBS, "id": "10"}, 400),
    ("update-id-missing", "PUT", P9, [FHIR_JSON], OBS, 400),
    ("update-id-number", "PUT", P9, [FHIR_JSON], {**OBS, "id": 9}, 400),
    ("create-without-body", "POST", P, [], None, 400),
    ("update-without-body", "PUT", P9, [], None, 400),
    # --- tokens, query switches on writes ----------------------------------------------------
    ("access-token-get", "GET", P + b"?access_token=abc", [], None, 403),
    ("access-token-post", "POST", P + b"?access_token=abc", [FHIR_JSON], OBS, 403),
    ("access-token-upper", "GET", P + b"?ACCESS_TOKEN=abc", [], None, 403),
    ("access-token-form", "POST", P + b"/_search", [FORM], "code=x&access_token=abc", 403),
    ("cascade-delete", "DELETE", P9 + b"?_cascade=delete", [], None, 403),
    ("harddelete", "DELETE", P9 + b"?hardDelete=true", [], None, 403),
    ("expunge", "DELETE", P9 + b"?_expunge=true", [], None, 403),
    ("purge", "DELETE", P9 + b"?_purge=true", [], None, 403),
    ("cascade-on-conditional-delete", "DELETE", P + b"?identifier=a|1&_cascade=delete", [], None, 403),
    ("harddelete-on-conditional-delete", "DELETE", P + b"?identifier=a|1&hardDelete=true", [], None, 403),
    ("count-on-conditional-delete", "DELETE", P + b"?identifier=a|1&_count=100", [], None, 403),
    ("tenant-switch-on-update", "PUT", P9 + b"?_tenant=other", [FHIR_JSON, ("if-match", 'W/"1"')], OBS_9, 403),
    ("unknown-param-on-create", "POST", P + b"?foo=bar", [FHIR_JSON], OBS, 403),
    ("unknown-param-on-update", "PUT", P9 + b"?foo=bar", [FHIR_JSON], OBS_9, 403),
    ("unknown-param-on-patch", "PATCH", P9 + b"?foo=bar", [JSON_PATCH], PATCH_OPS, 403),
    ("unknown-param-on-delete", "DELETE", P9 + b"?foo=bar", [], None, 403),
    ("summary-on-write", "POST", P + b"?_summary=true", [FHIR_JSON], OBS, 403),
    ("search-param-on-read", "GET", P9 + b"?code=x", [], None, 403),
    ("conditional-delete-only-format", "DELETE", P + b"?_format=json", [], None, 403),
    # --- protocol upgrades --------------------------------------------------------------------
    ("upgrade-websocket", "GET", P9, [("upgrade", "websocket"), ("connection", "Upgrade")], None, 403),
    ("upgrade-header-alone", "GET", P9, [("upgrade", "websocket")], None, 403),
    ("connection-upgrade-alone", "GET", P9, [("connection", "upgrade")], None, 403),
    ("connection-upgrade-list", "GET", P9, [("connection", "keep-alive, Upgrade")], None, 403),
    ("connection-upgrade-second-header", "GET", P9, [("connection", "keep-alive"), ("connection", "upgrade")], None, 403),
    ("upgrade-h2c", "GET", P9, [("upgrade", "h2c"), ("connection", "Upgrade, HTTP2-Settings"),
                                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")], None, 403),
    # --- duplicated security headers ----------------------------------------------------------
    ("dup-if-match", "PUT", P9, [FHIR_JSON, ("if-match", 'W/"1"'), ("if-match", 'W/"2"')], OBS_9, 400),
    ("dup-content-type", "POST", P, [FHIR_JSON, ("content-type", "application/json")], OBS, 400),
    ("dup-content-type-same", "POST", P, [FHIR_JSON, FHIR_JSON], OBS, 400),
    ("dup-x-api-key", "GET", P9, [("x-api-key", "a"), ("x-api-key", "b")], None, 400),
    ("dup-authorization", "GET", P9, [("authorization", "Bearer a"), ("authorization", "Bearer b")], None, 400),
    ("dup-if-none-exist", "POST", P, [FHIR_JSON, ("if-none-exist", "a=1"), ("if-none-exist", "b=2")], OBS, 400),
    ("dup-if-none-match", "PUT", P9, [FHIR_JSON, ("if-none-match", "*"), ("if-none-match", "*")], OBS_9, 400),
    ("dup-content-encoding", "POST", P, [FHIR_JSON, ("content-encoding", "identity"), ("content-encoding", "gzip")], OBS, 400),
    ("dup-content-length", "POST", P, [FHIR_JSON, ("content-length", "10"), ("content-length", "20")], OBS, 400),
    ("dup-idempotency-key", "POST", P, [FHIR_JSON, ("idempotency-key", "a"), ("idempotency-key", "b")], OBS, 400),
    ("dup-prefer", "POST", P, [FHIR_JSON, ("prefer", "return=minimal"), ("prefer", "respond-async")], OBS, 400),
    ("dup-x-provenance", "POST", P, [FHIR_JSON, ("x-provenance", "{}"), ("x-provenance", "{}")], OBS, 400),
    ("dup-host", "GET", P9, [("host", "a"), ("host", "b")], None, 400),
    ("dup-correlation-id", "GET", P9, [("x-correlation-id", "abcdefgh1"), ("x-correlation-id", "abcdefgh2")], None, 400),
    ("dup-traceparent", "GET", P9, [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")] * 2, None, 400),
    # --- If-None-Exist hardening --------------------------------------------------------------
    ("if-none-exist-on-put", "PUT", P9, [FHIR_JSON, ("if-none-exist", "identifier=a|1")], OBS_9, 403),
    ("if-none-exist-access-token", "POST", P, [FHIR_JSON, ("if-none-exist", "access_token=x")], OBS, 403),
]


@pytest.mark.parametrize(("method", "target", "headers", "body", "status"),
                         [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused(method, target, headers, body, status) -> None:
    assert refusal(raw(method, target, headers, body)).status == status


@pytest.mark.parametrize(("status", "code"), [(400, {"invalid", "structure"}), (403, {"forbidden"}),
                                              (413, {"too-costly"}), (415, {"not-supported"})])
def test_refusal_codes_match_the_status(status: int, code: set[str]) -> None:
    for _id, method, target, headers, body, expected in REFUSED:
        if expected == status:
            assert refusal(raw(method, target, headers, body)).code in code, _id


def test_absolute_form_target_with_authority_is_refused() -> None:
    r = raw("GET", P9, authority="ehr.example.org")
    assert refusal(r).status == 403
    assert refusal(raw("GET", P9, authority="127.0.0.1:8080")).status == 403


# --------------------------------------------------------------------------------------------
# Accepted requests: what parse makes of them
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("method", "headers", "effective", "interaction"),
    [
        ("POST", [("x-http-method-override", "DELETE")], "DELETE", "delete"),
        ("POST", [("x-method-override", "DELETE")], "DELETE", "delete"),
        ("POST", [("x-http-method-override", "delete")], "DELETE", "delete"),
        ("POST", [("x-http-method-override", " DELETE ")], "DELETE", "delete"),
        ("POST", [("x-http-method-override", "DELETE"), ("x-method-override", "DELETE")], "DELETE", "delete"),
        ("POST", [("x-http-method-override", "GET")], "GET", "read"),
        ("DELETE", [], "DELETE", "delete"),
    ],
)
def test_method_override_is_classified_as_the_method_it_asks_for(method, headers, effective, interaction) -> None:
    req = parse(raw(method, P9, headers))
    assert (req.method, req.original_method) == (effective, method)
    assert "x-http-method-override" not in req.headers and "x-method-override" not in req.headers
    cls = classify(req, upstream_base=UPSTREAM)
    assert cls.interaction == interaction
    assert cls.is_write == (effective == "DELETE")


def test_override_patch_on_post_is_a_patch() -> None:
    req = parse(raw("POST", P9, [("x-http-method-override", "PATCH"), JSON_PATCH], PATCH_OPS))
    assert req.method == "PATCH" and req.body == PATCH_OPS
    assert classify(req, upstream_base=UPSTREAM).interaction == "patch"


@pytest.mark.parametrize(
    ("target", "kind", "rtype", "rid"),
    [
        (b"/fhir/R4/Observation", "type", "Observation", None),
        (b"/fhir/R4/Observation/9", "instance", "Observation", "9"),
        (b"/fhir/R4/Observation/a-B.9", "instance", "Observation", "a-B.9"),
        (b"/fhir/R4/Observation/" + b"a" * 64, "instance", "Observation", "a" * 64),
        (b"/fhir/R4/MedicinalProduct/1", "instance", "MedicinalProduct", "1"),  # refused later (guards)
        (b"/fhir/R4/Observation/%39", "instance", "Observation", "9"),  # decoded once
        (b"/fhir/R4", "base", None, None),
        (b"/fhir/R4/", "base", None, None),
        (b"/fhir/R4/metadata", "metadata", None, None),
        (b"/fhir/R4/.well-known/smart-configuration", "discovery", None, None),
    ],
)
def test_path_shapes(target: bytes, kind: str, rtype, rid) -> None:
    t = parse(raw("GET", target)).target
    assert (t.kind, t.resource_type, t.id) == (kind, rtype, rid)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"_format=json", (("_format", "json"),)),
        (b"_format=application/fhir%2Bjson&_pretty=true", (("_format", "application/fhir+json"), ("_pretty", "true"))),
        (b"subject=Patient%2F1", (("subject", "Patient/1"),)),
        (b"code=http://loinc.org|1234-5", (("code", "http://loinc.org|1234-5"),)),
        (b"name=a+b&name=c", (("name", "a b"), ("name", "c"))),
        (b"date=ge2020-01-01&_count=10", (("date", "ge2020-01-01"), ("_count", "10"))),
        (b"code:not=x", (("code:not", "x"),)),
        (b"name=%C3%A9", (("name", "é"),)),
    ],
)
def test_query_decoded_once(query: bytes, expected: tuple) -> None:
    assert parse(raw("GET", P + b"?" + query)).target.query == expected


@pytest.mark.parametrize(
    ("method", "target", "headers", "body"),
    [
        ("GET", P9 + b"?_format=json", [], None),
        ("POST", P + b"?_format=json", [FHIR_JSON], OBS),
        ("PUT", P9 + b"?_format=json&_pretty=true", [FHIR_JSON], OBS_9),
        ("PATCH", P9 + b"?_format=json", [JSON_PATCH], PATCH_OPS),
        ("DELETE", P9 + b"?_format=json", [], None),
        ("DELETE", P + b"?identifier=a|1&_format=json", [], None),
    ],
)
def test_format_allowed(method, target, headers, body) -> None:
    run(raw(method, target, headers, body))


@pytest.mark.parametrize(
    ("content_type", "body", "parsed"),
    [
        ("application/fhir+json", OBS, OBS),
        ("application/json", OBS, OBS),
        ("Application/FHIR+JSON", OBS, OBS),
        ("application/fhir+json; charset=utf-8", OBS, OBS),
        ("application/fhir+json;charset=UTF-8", OBS, OBS),
        ('application/fhir+json; charset="utf-8"', OBS, OBS),
        ("application/fhir+json; fhirVersion=4.0", OBS, OBS),
    ],
)
def test_json_content_types(content_type: str, body, parsed) -> None:
    req = parse(raw("POST", P, [("content-type", content_type)], body))
    assert req.body == parsed
    assert req.content_type == content_type.split(";")[0].strip().lower()


def test_gzip_body_is_decoded_for_checks_and_forwarded_as_sent() -> None:
    wire = gzip.compress(json.dumps(OBS).encode())
    req = parse(raw("POST", P, [FHIR_JSON, ("content-encoding", "gzip")], wire))
    assert req.body == OBS
    assert req.raw_body == wire and req.headers["content-encoding"] == "gzip"
    assert classify(req, upstream_base=UPSTREAM).interaction == "create"


def test_gzip_exactly_at_limit_passes_one_byte_over_is_413() -> None:
    doc = json.dumps({**OBS, "id": "x" * 10}).encode()
    pad = MAX - len(doc)
    at = doc[:-1] + b" " * pad + b"}"
    assert len(at) == MAX
    parse(raw("POST", P, [FHIR_JSON, ("content-encoding", "gzip")], gzip.compress(at)))
    with pytest.raises(Refusal) as info:
        parse(raw("POST", P, [FHIR_JSON, ("content-encoding", "gzip")], gzip.compress(at[:-1] + b"  }")))
    assert info.value.status == 413


def test_form_search_body() -> None:
    req = parse(raw("POST", P + b"/_search", [FORM], "code=x&subject=Patient%2F1"))
    assert req.body == (("code", "x"), ("subject", "Patient/1"))


def test_empty_body_needs_no_content_type() -> None:
    req = parse(raw("DELETE", P9))
    assert req.body is None and req.raw_body == b"" and req.content_type is None


# --------------------------------------------------------------------------------------------
# Header hygiene: the allowlist, credentials kept apart, Connection-named headers dropped
# --------------------------------------------------------------------------------------------

def test_only_allowlisted_headers_are_kept() -> None:
    headers = [FHIR_JSON, ("if-match", 'W/"1"'), ("prefer", "return=minimal"), ("accept", "application/fhir+json"),
               ("x-api-key", "s3cr3t-key"), ("cookie", "s=1"), ("forwarded", "for=1.2.3.4"), ("x-forwarded-for", "1.2.3.4"),
               ("x-original-url", "/admin"), ("x-rewrite-url", "/admin"), ("x-tenant-id", "other"),
               ("x-http-method-override", "PUT"), ("keep-alive", "300"), ("te", "trailers"),
               ("transfer-encoding", "chunked"), ("proxy-authorization", "Basic x"), ("host", "sidecar")]
    req = parse(raw("POST", P9, headers, OBS_9))
    assert set(req.headers) == {"content-type", "if-match", "prefer", "accept"}
    assert req.credentials == {"x-api-key": "s3cr3t-key"}
    assert "s3cr3t-key" not in repr(req)


def test_credentials_are_kept_for_identify_only() -> None:
    req = parse(raw("GET", P9, [("authorization", "Bearer t0k3n")]))
    assert req.credentials == {"authorization": "Bearer t0k3n"} and "authorization" not in req.headers
    assert "t0k3n" not in repr(req)


@pytest.mark.parametrize("named", ["if-match", "If-Match", "keep-alive, if-match"])
def test_header_named_in_connection_is_dropped_not_used(named: str) -> None:
    """DESIGN, header hygiene: headers named in Connection are never forwarded. The
    classification must then not count them either (an update without If-Match may create)."""
    req = parse(raw("PUT", P9, [FHIR_JSON, ("if-match", 'W/"1"'), ("connection", named)], OBS_9))
    assert "if-match" not in req.headers
    cls = classify(req, upstream_base=UPSTREAM)
    assert cls.requires[0].letters == frozenset("uc")


def test_credential_named_in_connection_is_dropped() -> None:
    req = parse(raw("GET", P9, [("x-api-key", "k"), ("connection", "x-api-key")]))
    assert req.credentials == {}


def test_content_type_named_in_connection_leaves_a_body_without_type() -> None:
    assert refusal(raw("POST", P, [FHIR_JSON, ("connection", "content-type")], OBS)).status == 415


# --------------------------------------------------------------------------------------------
# Correlation id and traceparent
# --------------------------------------------------------------------------------------------

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("abcdefgh", True),
        ("req-2026.11_25-0001", True),
        ("A" * 64, True),
        (str(uuid.UUID(int=7)), True),
        ("abcdefg", False),             # 7 characters
        ("A" * 65, False),
        ("abc defgh", False),
        ("abcdefgh\n", False),          # `$` must not accept a trailing newline
        ("abcdefgh\r\nx-evil: 1", False),
        ("abcdefgh/", False),
        ("abcdéfgh", False),
        ("", False),
        (None, False),
    ],
)
def test_correlation_id(value: str | None, kept: bool) -> None:
    headers = [("x-correlation-id", value)] if value is not None else []
    if value is not None and any(ord(c) < 0x20 for c in value):
        # a control character in any header refuses the request; the answer still gets a fresh id
        with pytest.raises(Refusal) as info:
            parse(raw("GET", P9, headers))
        assert info.value.status == 400
        assert UUID_RE.fullmatch(parse_mod.correlation_id(raw("GET", P9, headers)))
        return
    cid = parse(raw("GET", P9, headers)).correlation_id
    if kept:
        assert cid == value
    else:
        assert UUID_RE.fullmatch(cid), cid


def test_correlation_id_is_minted_fresh_each_time() -> None:
    assert parse(raw("GET", P9)).correlation_id != parse(raw("GET", P9)).correlation_id


TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (TRACE, True),
        (TRACE[:-2] + "00", True),
        (TRACE.upper(), False),
        ("01" + TRACE[2:], False),                      # unknown version
        ("ff" + TRACE[2:], False),
        ("00-" + "0" * 32 + "-b7ad6b7169203331-01", False),  # all-zero trace id
        ("00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01", False),  # all-zero parent id
        (TRACE + "-extra", False),
        (TRACE + "\n", False),
        (TRACE[:-1], False),
        ("garbage", False),
        (None, False),
    ],
)
def test_traceparent(value: str | None, kept: bool) -> None:
    headers = [("traceparent", value)] if value is not None else []
    if value is not None and any(ord(c) < 0x20 for c in value):
        with pytest.raises(Refusal) as info:  # control characters in a header: refused outright
            parse(raw("GET", P9, headers))
        assert info.value.status == 400
        assert parse_mod.traceparent(raw("GET", P9, headers)) != value
        return
    tp = parse(raw("GET", P9, headers)).traceparent
    if kept:
        assert tp == value
    else:
        assert tp != value
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", tp)
        assert m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16


def test_explicit_correlation_and_trace_win() -> None:
    req = parse(raw("GET", P9, [("x-correlation-id", "abcdefgh")]), correlation="given-123", trace=TRACE)
    assert (req.correlation_id, req.traceparent) == ("given-123", TRACE)


# --------------------------------------------------------------------------------------------
# Base-URL rewrite: the one case where the sidecar changes a request body
# --------------------------------------------------------------------------------------------

REWRITE = {"sidecar_bases": (SIDECAR,), "upstream_base": UPSTREAM}


def test_sidecar_base_in_body_is_rewritten_to_upstream() -> None:
    body = ('{"resourceType":"Observation","status":"final","code":{"text":"x"},'
            '"subject":{"reference":"http://127.0.0.1:8080/fhir/R4/Patient/1"}}').encode()
    req = parse(raw("POST", P, [FHIR_JSON], body), **REWRITE)
    assert req.body_rewritten is True
    assert req.body["subject"]["reference"] == "https://ehr.example.org/fhir/R4/Patient/1"
    assert req.raw_body == body.replace(b"http://127.0.0.1:8080/fhir/R4/", b"https://ehr.example.org/fhir/R4/")
    assert b"127.0.0.1:8080" not in req.raw_body


def test_body_without_sidecar_base_is_byte_identical() -> None:
    body = b'{ "resourceType" : "Observation",\n  "status":"final", "code":{"text":"http://127.0.0.1:8080/x"}}'
    req = parse(raw("POST", P, [FHIR_JSON], body), **REWRITE)
    assert req.body_rewritten is False
    assert req.raw_body == body


@pytest.mark.parametrize(
    ("value", "rewritten"),
    [
        ("http://127.0.0.1:8080/fhir/R4", "https://ehr.example.org/fhir/R4"),
        ("http://127.0.0.1:8080/fhir/R4/Patient/1", "https://ehr.example.org/fhir/R4/Patient/1"),
        ("http://127.0.0.1:8080/fhir/R4x/Patient/1", None),   # not the base: a prefix only
        ("http://127.0.0.1:8080/fhir/R4/", "https://ehr.example.org/fhir/R4/"),
        ("see http://127.0.0.1:8080/fhir/R4/Patient/1", None),  # not at the start of a string
        ("http://127.0.0.1:8081/fhir/R4/Patient/1", None),
    ],
)
def test_rewrite_touches_only_strings_starting_with_the_base(value: str, rewritten: str | None) -> None:
    body = json.dumps({**OBS, "note": [{"text": value}]}).encode()
    req = parse(raw("POST", P, [FHIR_JSON], body), **REWRITE)
    assert req.body_rewritten is (rewritten is not None)
    assert req.body["note"][0]["text"] == (rewritten or value)


def test_rewrite_of_a_gzip_body_forwards_it_decoded() -> None:
    doc = json.dumps({**OBS, "subject": {"reference": SIDECAR + "/Patient/1"}}).encode()
    req = parse(raw("POST", P, [FHIR_JSON, ("content-encoding", "gzip")], gzip.compress(doc)), **REWRITE)
    assert req.body_rewritten and req.raw_body == doc.replace(SIDECAR.encode(), UPSTREAM.encode())
    assert "content-encoding" not in req.headers


def test_rewrite_in_bundle_entries_makes_them_upstream_urls() -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": SIDECAR + "/Observation/9", "resource": OBS_9,
         "request": {"method": "PUT", "url": SIDECAR + "/Observation/9"}}]}
    cls = run(raw("POST", b"/fhir/R4", [FHIR_JSON], bundle), **REWRITE)
    assert cls.entries[0].interaction == "update"
    assert cls.entries[0].url == UPSTREAM + "/Observation/9"


def test_minted_ids_never_repeat_across_pool_refills() -> None:
    # 600 ids read 24 + 16 bytes each: several 4 KiB refills of the random pool
    seen = {parse_mod.correlation_id(raw("GET", P9)) for _ in range(600)}
    traces = {parse_mod.traceparent(raw("GET", P9)) for _ in range(600)}
    assert len(seen) == 600 and len(traces) == 600
    assert all(UUID_RE.fullmatch(c) for c in seen)


def test_forked_child_does_not_repeat_the_parents_random_bytes() -> None:
    parse_mod.correlation_id(raw("GET", P9))  # the pool holds unread bytes now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its next id, then exit at once
        try:
            os.write(w, parse_mod.correlation_id(raw("GET", P9)).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    assert UUID_RE.fullmatch(child)
    assert child != parse_mod.correlation_id(raw("GET", P9))
