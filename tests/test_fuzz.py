"""Differential fuzzing: what the sidecar classified vs what the EHR actually executed.

Hypothesis builds FHIR-ish requests from pieces (types in right and wrong case, ids, `_history`,
`$operations`, queries, method overrides, encodings, valid and invalid resources, JSON Patch,
Bundles) and sends each as raw bytes through one live `fhir-sidecar run` to the sandbox EHR,
which runs the `method-override` profile (it would honour an override the sidecar let through).

For every request:
- the answer is a well-formed HTTP response carrying `X-Correlation-ID`; a refusal by the
  sidecar (nothing in the EHR's log for that correlation id) has an OperationOutcome body;
- for everything that reached the EHR, the EHR's log (`action`, `effective_method`,
  Bundle `entries`) must match what the sidecar classified: `parse_request` + `classify`
  run here on the same bytes and, afterwards, the audit records' `interaction` for the same
  correlation id. A write the sidecar called a read (or another write) fails the test.
- the sidecar stays ready.

Deterministic (`derandomize=True`, no example database) and bounded: `FUZZ_EXAMPLES`
(default 2,000, about 10 s) examples.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar.classify import classify
from sidecar.errors import Refusal
from sidecar.parse import parse_request
from sidecar.request import RawRequest
from sidecar.sandbox import SandboxServer
from tests.harness import READER_KEY, SidecarProcess, make_config, request, sha

pytestmark = pytest.mark.e2e

BASE = "/fhir/R4"
FUZZ_KEY = "fuzz-writer-key-1"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
MAX_BODY = 64 * 1024
SEED = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]},
    {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "hr"},
     "subject": {"reference": "Patient/p1"}},
    {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "hr"},
     "subject": {"reference": "Patient/p1"}},
]

# sidecar interaction -> the sandbox action that executes it ("error": the EHR refused it,
# nothing executed, always acceptable)
EXPECTED_ACTION = {
    "capabilities": "capabilities", "read": "read", "vread": "vread", "history-instance": "history",
    "search-type": "search", "search-system": "error", "search-compartment": "error",
    "history-type": "error", "history-system": "error",
    "create": "create", "create-conditional": "create", "update": "update", "update-conditional": "error",
    "patch": "patch", "patch-conditional": "error", "delete": "delete", "delete-conditional": "error",
    "operation": "operation", "batch": "batch", "transaction": "transaction", "discovery": "error",
}
WRITE_ACTIONS = frozenset({"create", "update", "patch", "delete", "batch", "transaction"})


# -- strategies -------------------------------------------------------------------------------

TYPES = st.sampled_from(["Observation", "Patient", "Condition", "Encounter", "Bundle", "Parameters", "Binary",
                         "observation", "OBSERVATION", "Foo", "MedicinalProduct", "Observation%2Fo1"])
IDS = st.sampled_from(["o1", "o2", "p1", "new-1", "x.y-Z", "..", "%2e%2e", "a%2Fb", "%C3%A9", "o1%00", "_history",
                       "$meta", "_search", "*", "a" * 65])
VIDS = st.sampled_from(["1", "2", "9", "x", "%31"])
OPS = st.sampled_from(["$meta", "$meta-add", "$meta-delete", "$everything", "$validate", "$expunge", "$graphql",
                       "$EXPUNGE", "%24expunge", "$process-message", "$lastn"])


@st.composite
def paths(draw: Any) -> tuple[list[str], str | None, str | None]:
    """(segments below the base, the type used, the id used)."""
    t, i = draw(TYPES), draw(IDS)
    shape = draw(st.sampled_from(["type", "instance", "vread", "history", "search", "type-op", "instance-op",
                                  "system-op", "base", "metadata", "history-type", "history-system",
                                  "compartment", "random"]))
    segs = {
        "type": [t], "instance": [t, i], "vread": [t, i, "_history", draw(VIDS)], "history": [t, i, "_history"],
        "search": [t, "_search"], "type-op": [t, draw(OPS)], "instance-op": [t, i, draw(OPS)],
        "system-op": [draw(OPS)], "base": [], "metadata": ["metadata"], "history-type": [t, "_history"],
        "history-system": ["_history"], "compartment": ["Patient", "p1", t],
    }.get(shape)
    if segs is None:
        segs = draw(st.lists(st.one_of(TYPES, IDS, OPS, st.sampled_from(["_history", "_search", "", ".", "metadata"])),
                             max_size=5))
    return segs, t, i


QUERY_PAIRS = st.sampled_from([
    ("_id", "o1"), ("_format", "json"), ("_format", "xml"), ("_count", "2"), ("code", "hr"), ("patient", "p1"),
    ("_include", "Observation:subject"), ("_revinclude", "*"), ("_summary", "true"), ("_elements", "id"),
    ("_method", "DELETE"), ("_cascade", "delete"), ("hardDelete", "true"), ("access_token", "x"),
    ("identifier", "a|b"), ("_tag", "x"), ("_type", "Observation"), ("subject:Patient.name", "One"),
    ("_has:Observation:patient:code", "hr"), ("_pretty", "true"), ("x-vendor", "1"), ("_lastUpdated", "gt2020"),
])


@st.composite
def queries(draw: Any) -> str:
    pairs = draw(st.lists(QUERY_PAIRS, max_size=3))
    if not pairs:
        return ""
    q = "&".join(f"{k}={v}" for k, v in pairs)
    return "?" + draw(st.sampled_from([q, q, q.replace("=", "%3D", 1), q.replace("&", ";"), q + "&"]))


def obs(oid: str | None = None, **extra: Any) -> dict[str, Any]:
    o: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                         "subject": {"reference": "Patient/p1"}, **extra}
    if oid:
        o["id"] = oid
    return o


ENTRY_URLS = st.sampled_from(["Observation", "Observation/o1", "Observation/o2", "Observation/new-1", "Patient/p1",
                              "Observation?code=hr", "Observation/o1/_history", "Observation/o1/$meta", "metadata",
                              "observation/o1", "/Observation/o1", "Observation/../Patient/p1", "Foo/1",
                              "Observation/o1?_cascade=delete", "Observation/_search"])


@st.composite
def bundle_entries(draw: Any) -> dict[str, Any]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "delete"]))
    url = draw(ENTRY_URLS)
    e: dict[str, Any] = {"request": {"method": method, "url": url}}
    kind = draw(st.sampled_from(["none", "obs", "obs-id", "patch", "patient"]))
    if kind == "obs":
        e["resource"] = obs()
    elif kind == "obs-id":
        e["resource"] = obs(url.split("/")[1] if url.count("/") == 1 else "o1")
    elif kind == "patch":
        e["resource"] = {"resourceType": "Binary", "contentType": "application/json-patch+json",
                         "data": base64.b64encode(b'[{"op":"replace","path":"/status","value":"amended"}]').decode()}
    elif kind == "patient":
        e["resource"] = {"resourceType": "Patient", "id": "p1", "active": True}
    if draw(st.booleans()):
        e["fullUrl"] = f"urn:uuid:{draw(st.uuids())}"
    return e


@st.composite
def bodies(draw: Any, rtype: str | None, rid: str | None) -> tuple[bytes, str | None]:
    """(body bytes, content type to send or None)."""
    kind = draw(st.sampled_from(["none", "none", "resource", "resource", "resource-id", "wrong-type", "invalid-fhir",
                                 "bad-json", "dup-keys", "json-patch", "bad-patch", "fhirpath", "bundle", "bundle",
                                 "form", "xml", "random"]))
    json_ct = draw(st.sampled_from(["application/fhir+json", "application/json", "application/fhir+json; charset=utf-8"]))
    if kind == "none":
        return b"", draw(st.sampled_from([None, None, json_ct]))
    if kind in ("resource", "resource-id", "wrong-type", "invalid-fhir"):
        doc: dict[str, Any] = obs() if rtype != "Patient" else {"resourceType": "Patient", "active": True}
        if rtype and rtype not in ("Observation", "Patient") and kind == "resource":
            doc["resourceType"] = rtype
        if kind == "resource-id" and rid:
            doc["id"] = rid
        if kind == "wrong-type":
            doc["resourceType"] = draw(st.sampled_from(["Patient", "observation", "Bundle"]))
        if kind == "invalid-fhir":
            doc[draw(st.sampled_from(["bogus", "status", "code"]))] = draw(st.sampled_from([1, None, [], "", {"x": 1}]))
        return json.dumps(doc).encode(), json_ct
    if kind == "bad-json":
        return draw(st.sampled_from([b"{", b"\xef\xbb\xbf{}", b"[]", b'{"a":NaN}', b"{}{}", b'{"resourceType":"Observation",}'])), json_ct
    if kind == "dup-keys":
        return b'{"resourceType":"Observation","status":"final","code":{"text":"hr"},"resourceType":"Patient"}', json_ct
    if kind == "json-patch":
        return b'[{"op":"replace","path":"/status","value":"amended"}]', "application/json-patch+json"
    if kind == "bad-patch":
        return draw(st.sampled_from([b"[]", b'[{"op":"move","path":"/id","from":"/x"}]', b'{"op":"add"}'])), \
            draw(st.sampled_from(["application/json-patch+json", json_ct]))
    if kind == "fhirpath":
        return json.dumps({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Observation.subject"}]}]}).encode(), json_ct
    if kind == "bundle":
        b = {"resourceType": "Bundle", "type": draw(st.sampled_from(["batch", "transaction", "transaction", "collection"])),
             "entry": draw(st.lists(bundle_entries(), max_size=3))}
        return json.dumps(b).encode(), json_ct
    if kind == "form":
        return draw(st.sampled_from([b"_id=o1", b"_method=DELETE", b"code=hr&_count=1"])), "application/x-www-form-urlencoded"
    if kind == "xml":
        return b'<Observation xmlns="http://hl7.org/fhir"/>', draw(st.sampled_from(["application/fhir+xml", json_ct]))
    return draw(st.binary(max_size=64)), draw(st.sampled_from([None, json_ct, "text/plain"]))


HEADER_PIECES = st.sampled_from([
    ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method-Override", "PUT"), ("X-HTTP-Method-Override", "PATCH"),
    ("X-Method-Override", "DELETE"), ("X-HTTP-Method-Override", "GET"), ("X-HTTP-Method", "DELETE"),
    ("If-Match", 'W/"1"'), ("If-Match", '"1"'), ("If-Match", "*"), ("If-Match", 'W/"9"'),
    ("If-None-Exist", "_id=o1"), ("If-None-Exist", "identifier=a|b"), ("Prefer", "return=minimal"),
    ("Prefer", "handling=strict"), ("Accept", "application/fhir+json"), ("X-Tenant-ID", "other"),
    ("X-Forwarded-Host", "evil.example"), ("Connection", "X-HTTP-Method-Override"), ("Cache-Control", "no-cache"),
])


PATCH_OK = b'[{"op":"replace","path":"/status","value":"amended"}]'


def _bundle_entry(method: str, url: str, resource: dict[str, Any] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"request": {"method": method, "url": url}}
    if resource is not None:
        e["resource"] = resource
    return e


@st.composite
def coherent_requests(draw: Any) -> dict[str, Any]:
    """A well-formed request of one interaction (most reach the EHR), then perhaps one trick."""
    oid = draw(st.sampled_from(["o1", "o2", "new-1"]))
    json_ct = ("Content-Type", "application/fhir+json")
    patch_ct = ("Content-Type", "application/json-patch+json")
    kind = draw(st.sampled_from([
        "create", "create", "create-conditional", "update", "update", "update-if-match", "patch", "patch", "delete",
        "delete", "read", "vread", "history", "search", "search-post", "capabilities", "override-delete",
        "override-put", "override-patch", "transaction", "batch", "op-read", "op-write", "head"]))
    method, target, headers, body = "GET", f"{BASE}/Observation", [], b""
    if kind == "create":
        method, headers, body = "POST", [json_ct], json.dumps(obs()).encode()
    elif kind == "create-conditional":
        method, headers, body = "POST", [json_ct, ("If-None-Exist", f"_id={oid}")], json.dumps(obs()).encode()
    elif kind in ("update", "update-if-match"):
        method, target, headers, body = "PUT", f"{BASE}/Observation/{oid}", [json_ct], json.dumps(obs(oid)).encode()
        if kind == "update-if-match":
            headers.append(("If-Match", draw(st.sampled_from(['W/"1"', '"1"', 'W/"2"', "*"]))))
    elif kind == "patch":
        method, target, headers, body = "PATCH", f"{BASE}/Observation/{oid}", [patch_ct], PATCH_OK
    elif kind == "delete":
        method, target = "DELETE", f"{BASE}/Observation/{oid}"
    elif kind == "read":
        target = f"{BASE}/Observation/{oid}"
    elif kind == "head":
        method, target = "HEAD", f"{BASE}/Observation/{oid}"
    elif kind == "vread":
        target = f"{BASE}/Observation/{oid}/_history/1"
    elif kind == "history":
        target = f"{BASE}/Observation/{oid}/_history"
    elif kind == "search":
        target = f"{BASE}/Observation?_id={oid}"
    elif kind == "search-post":
        method, target = "POST", f"{BASE}/Observation/_search"
        headers, body = [("Content-Type", "application/x-www-form-urlencoded")], f"_id={oid}".encode()
    elif kind == "capabilities":
        target = f"{BASE}/metadata"
    elif kind == "override-delete":
        method, target = "POST", f"{BASE}/Observation/{oid}"
        headers = [(draw(st.sampled_from(["X-HTTP-Method-Override", "X-Method-Override"])), "DELETE")]
    elif kind == "override-put":
        method, target = "POST", f"{BASE}/Observation/{oid}"
        headers, body = [("X-HTTP-Method-Override", "PUT"), json_ct], json.dumps(obs(oid)).encode()
    elif kind == "override-patch":
        method, target = "POST", f"{BASE}/Observation/{oid}"
        headers, body = [("X-HTTP-Method-Override", "PATCH"), patch_ct], PATCH_OK
    elif kind in ("transaction", "batch"):
        entries = draw(st.lists(st.sampled_from([
            _bundle_entry("POST", "Observation", obs()), _bundle_entry("PUT", "Observation/o1", obs("o1")),
            _bundle_entry("PUT", "Observation/new-2", obs("new-2")), _bundle_entry("DELETE", "Observation/o2"),
            _bundle_entry("GET", "Observation/o1"), _bundle_entry("GET", "Observation?_id=o1"),
            _bundle_entry("PATCH", "Observation/o1", {"resourceType": "Binary", "contentType": "application/json-patch+json",
                                                      "data": base64.b64encode(PATCH_OK).decode()}),
        ]), min_size=1, max_size=3, unique_by=lambda e: e["request"]["url"]))
        method, target, headers = "POST", BASE, [json_ct]
        body = json.dumps({"resourceType": "Bundle", "type": kind, "entry": entries}).encode()
    elif kind == "op-read":
        target = f"{BASE}/Observation/{oid}/$meta"
    elif kind == "op-write":
        method, target, headers = "POST", f"{BASE}/Observation/{oid}/$meta-add", [json_ct]
        body = json.dumps({"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": [
            {"system": "http://example.org/tags", "code": "x"}]}}]}).encode()
    headers = [*headers, ("X-API-Key", draw(st.sampled_from([FUZZ_KEY, FUZZ_KEY, FUZZ_KEY, READER_KEY])))]
    trick = draw(st.sampled_from(["none", "none", "none", "header", "query", "method-case"]))
    if trick == "header":
        headers.append(draw(HEADER_PIECES))
    elif trick == "query":
        k, v = draw(QUERY_PAIRS)
        target += ("&" if "?" in target else "?") + f"{k}={v}"
    elif trick == "method-case":
        method = method.lower()
    return {"method": method, "target": target, "headers": headers, "body": body}


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    if draw(st.integers(0, 2)) > 0:
        return draw(coherent_requests())
    segs, rtype, rid = draw(paths())
    method = draw(st.sampled_from(["GET", "GET", "POST", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
                                   "get", "PURGE"]))
    target = BASE + ("/" + "/".join(segs) if segs else "") + draw(queries())
    body, ctype = draw(bodies(rtype, rid))
    headers = draw(st.lists(HEADER_PIECES, max_size=3))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    if body and draw(st.integers(0, 9)) == 0:  # sometimes gzip the body
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    key = draw(st.sampled_from([FUZZ_KEY, FUZZ_KEY, FUZZ_KEY, READER_KEY, None]))
    if key:
        headers.append(("X-API-Key", key))
    return {"method": method, "target": target, "headers": headers, "body": body}


# -- environment --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    sandbox = SandboxServer("127.0.0.1", 0, profile={"extends": "method-override", "seed": SEED, "name": "fuzz"})
    sandbox.start()
    clients = [
        {"id": "fuzz-writer", "auth": "api-key", "api_key_sha256": sha(FUZZ_KEY), "scopes": ["system/*.cruds"],
         "conditional_writes": True, "operations": ["$meta-add", "$meta-delete", "$validate"]},
        {"id": "demo-reader", "auth": "api-key", "api_key_sha256": sha(READER_KEY), "scopes": ["system/*.rs"]},
    ]
    # No Rego policy: it decides allow/deny, not classification; without it more reaches the EHR.
    cfg = make_config(tmp, sandbox.base_url, clients=clients, policy={"engine": "off"},
                      fhir={"max_body_bytes": MAX_BODY})
    sc = SidecarProcess(cfg, tmp).start()
    state: dict[str, Any] = {"sidecar": sc, "sandbox": sandbox, "n": 0, "reached": 0, "forwarded": {},
                             "statuses": Counter(), "interactions": Counter(), "tmp": tmp}
    yield state
    sc.stop()
    sandbox.stop()


def send(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict[str, str], bytes]:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head.encode("latin-1") + body)
        resp = http.client.HTTPResponse(s, method=method.upper())
        resp.begin()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def local_decision(port: int, r: dict[str, Any], upstream_base: str) -> Any:
    """`parse_request` + `classify` on the same bytes, as the sidecar's pipeline calls them."""
    headers = tuple((k.lower(), v) for k, v in r["headers"]) + (("host", f"127.0.0.1:{port}"),)
    raw = RawRequest(r["method"].upper(), r["target"].encode("latin-1"), headers, r["body"],
                     host=f"127.0.0.1:{port}", mode="reverse")
    req = parse_request(raw, base_path=BASE, max_body_bytes=MAX_BODY,
                        sidecar_bases=(f"http://127.0.0.1:{port}{BASE}",), upstream_base=upstream_base)
    return req, classify(req, upstream_base=upstream_base)


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          phases=(Phase.explicit, Phase.generate, Phase.shrink),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(r=requests())
def test_classification_matches_what_the_ehr_executed(env: dict[str, Any], r: dict[str, Any]) -> None:
    sc, sandbox = env["sidecar"], env["sandbox"]
    env["n"] += 1
    corr = f"fuzz-{env['n']:05d}-{os.urandom(4).hex()}"
    headers = [*r["headers"], ("X-Correlation-ID", corr)]
    sandbox.reset()
    status, resp_headers, data = send(sc.port, r["method"], r["target"], headers, r["body"])
    env["statuses"][status] += 1
    assert 100 <= status <= 599
    log = [e for e in sandbox.request_log() if e["correlation_id"] == corr]
    stray = [e for e in sandbox.request_log() if e["correlation_id"] != corr]
    assert not stray, f"requests at the EHR without our correlation id: {stray}"
    if not log:  # refused (or answered) by the sidecar itself
        assert resp_headers.get("x-correlation-id") == corr, (status, resp_headers, data[:200])
        if status >= 400 and r["method"].upper() != "HEAD":
            doc = json.loads(data)
            assert doc["resourceType"] == "OperationOutcome", data[:300]
            assert doc["issue"] and doc["issue"][0].get("diagnostics"), data[:300]
        return
    try:
        req, cls = local_decision(sc.port, r, sandbox.base_url)
    except Refusal as e:
        pytest.fail(f"the sidecar forwarded what parse/classify refuse here ({e.status} {e.reason}); EHR saw {log}")
    env["forwarded"][corr] = cls.interaction
    prior: list[dict[str, Any]] = []
    if cls.interaction in ("update", "patch", "delete") and log[0]["method"] == "GET":
        prior, log = log[:1], log[1:]  # the sidecar's prior-state read of the addressed resource
        assert prior[0]["action"] in ("read", "error"), prior
        assert prior[0]["path"] == f"{BASE}/{req.target.resource_type}/{req.target.id}", prior
    if not log:  # refused after reading the prior state (missing resource, stale If-Match, bad patch)
        assert status >= 400 and resp_headers.get("x-correlation-id") == corr, (status, data[:200])
        assert json.loads(data)["resourceType"] == "OperationOutcome", data[:300]
        return
    assert len(log) == 1, f"one request should reach the EHR per request: {log}"
    last = log[0]
    env["reached"] += 1
    env["interactions"][cls.interaction] += 1
    assert last["override"] is None, f"an override reached the EHR: {last}"
    assert r["method"] == r["method"].upper(), f"a non-upper-case method reached the EHR: {last}"
    assert last["effective_method"] == req.method or (req.method == "HEAD" and last["effective_method"] == "HEAD"), \
        (req.method, last)
    action = last["action"]
    if action.startswith("fault:"):
        return
    expected = EXPECTED_ACTION.get(cls.interaction)
    assert expected is not None, cls.interaction
    if action in WRITE_ACTIONS or expected in WRITE_ACTIONS:
        assert action in (expected, "error"), f"sidecar classified {cls.interaction}, EHR executed {action}: {last}"
    else:
        assert action in (expected, "error"), f"sidecar classified {cls.interaction}, EHR executed {action}: {last}"
    if action in ("batch", "transaction"):
        ehr_entries = last.get("entries", [])
        assert len(ehr_entries) == len(cls.entries), (ehr_entries, cls.entries)
        for mine, theirs in zip(cls.entries, ehr_entries):
            want = EXPECTED_ACTION.get(mine.interaction)
            assert theirs["action"] in (want, "error"), f"entry: sidecar {mine.interaction}, EHR {theirs}"
            if theirs["action"] in WRITE_ACTIONS - {"batch", "transaction"}:
                assert mine.is_write, (mine, theirs)


def test_fuzz_audit_agrees_and_the_sidecar_is_still_ready(env: dict[str, Any]) -> None:
    """Runs after the fuzzer (file order): the audit's `interaction` for every correlation id
    that reached the EHR (forwarded, or refused after its prior-state read: then a `deny`)
    equals the classification computed locally."""
    sc = env["sidecar"]
    assert env["n"] >= min(EXAMPLES, 100), "the fuzzer did not run"
    status, _, _ = request(sc.admin_port, "GET", "/readyz")
    assert status == 200
    time.sleep(0.5)  # outcome/read records are written after the answer
    audit = Path(env["tmp"]) / "audit.jsonl"
    recs = [json.loads(x) for x in audit.read_text().splitlines() if x.startswith("{")]
    by_corr: dict[str, set[str]] = {}
    for rec in recs:
        if rec.get("kind") in ("intent", "read", "outcome", "deny") and rec.get("correlation_id") and rec.get("interaction"):
            by_corr.setdefault(rec["correlation_id"], set()).add(rec["interaction"])
    mismatched = {c: (i, by_corr.get(c)) for c, i in env["forwarded"].items() if by_corr.get(c, {i}) != {i}}
    missing = [c for c in env["forwarded"] if c not in by_corr]
    print(f"\nfuzz: {env['n']} examples, {env['reached']} reached the EHR; statuses {dict(env['statuses'])}; "
          f"forwarded interactions {dict(env['interactions'])}; audit records missing for {len(missing)}")
    assert mismatched == {}
    # capabilities/discovery are public and may go unaudited; everything else forwarded has a record
    unaudited = {c: env["forwarded"][c] for c in missing if env["forwarded"][c] not in ("capabilities", "discovery")}
    assert unaudited == {}, f"forwarded without an audit record carrying its interaction: {unaudited}"
    assert env["reached"] >= env["n"] // 10, "too little reaches the EHR for the differential to mean much"
