"""Tests for the sandbox EHR (sidecar.sandbox): FHIR behaviour, witness log, faults, TLS.

All data is synthetic; every server binds 127.0.0.1 on port 0.
"""

from __future__ import annotations

import ast
import base64
import datetime as dt
import http.client
import ipaddress
import json
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.sandbox import SandboxServer

BASE = "/fhir/R4"
FHIR_JSON = "application/fhir+json"
PATCH_JSON = "application/json-patch+json"


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Client:
    """A keep-alive http.client connection to the sandbox."""

    def __init__(self, server: SandboxServer, timeout: float = 5.0,
                 context: ssl.SSLContext | None = None) -> None:
        if context is not None:
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", server.port, timeout=timeout, context=context)
        else:
            self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)

    def __call__(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None, *, base: str = BASE) -> Resp:
        headers = dict(headers or {})
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", FHIR_JSON)
        self.conn.request(method, base + path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return Resp(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as srv:
        yield srv


@pytest.fixture
def client(server: SandboxServer) -> Iterator[Client]:
    c = Client(server)
    yield c
    c.close()


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "Synthetic", "given": ["Test"]}],
            **extra}


def create(client: Client, resource: dict[str, Any]) -> dict[str, Any]:
    resp = client("POST", f"/{resource['resourceType']}", resource)
    assert resp.status == 201, resp.body
    result: dict[str, Any] = resp.json
    return result


def ids_of(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


# -- basics -------------------------------------------------------------------------

def test_capabilities(client: Client, server: SandboxServer) -> None:
    resp = client("GET", "/metadata")
    assert resp.status == 200
    assert (resp.header("content-type") or "").startswith(FHIR_JSON)
    assert resp.json["resourceType"] == "CapabilityStatement"
    assert resp.json["fhirVersion"] == "4.0.1"
    assert server.base_url == f"http://127.0.0.1:{server.port}{BASE}"


def test_create_read_vread_history(client: Client, server: SandboxServer) -> None:
    resp = client("POST", "/Patient", patient(id="client-chosen"))
    assert resp.status == 201
    body = resp.json
    rid = body["id"]
    assert rid != "client-chosen"  # server assigns ids on create
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"]
    assert resp.header("location") == f"{server.base_url}/Patient/{rid}/_history/1"
    assert resp.header("etag") == 'W/"1"'
    assert resp.header("last-modified")

    read = client("GET", f"/Patient/{rid}")
    assert read.status == 200 and read.json == body and read.header("etag") == 'W/"1"'
    assert client("PUT", f"/Patient/{rid}", patient(id=rid, active=True)).status == 200
    v1 = client("GET", f"/Patient/{rid}/_history/1")
    assert v1.status == 200 and "active" not in v1.json
    assert client("GET", f"/Patient/{rid}/_history/2").json["active"] is True
    assert client("GET", f"/Patient/{rid}/_history/3").status == 404

    history = client("GET", f"/Patient/{rid}/_history").json
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert history["entry"][0]["fullUrl"] == f"{server.base_url}/Patient/{rid}"


def test_head_read_has_length_but_no_body(client: Client) -> None:
    rid = create(client, patient())["id"]
    get = client("GET", f"/Patient/{rid}")
    head = client("HEAD", f"/Patient/{rid}")
    assert head.status == 200 and head.body == b""
    assert head.header("content-length") == get.header("content-length")


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (patient(), {"Prefer": "return=minimal"}, 201),
        (patient(), {"Content-Type": "application/json"}, 201),
        (patient(), {"Content-Type": "application/fhir+json; charset=utf-8"}, 201),
        (patient(), {"Content-Type": "application/fhir+xml"}, 415),
        (patient(), {"Content-Type": "text/plain"}, 415),
        (b'{"resourceType": "Patient"', {"Content-Type": FHIR_JSON}, 400),
        (b'{"resourceType": "Patient", "resourceType": "Patient"}',
         {"Content-Type": FHIR_JSON}, 400),
        (b'{"resourceType": "Patient", "x": NaN}', {"Content-Type": FHIR_JSON}, 400),
        (b"\xff\xfe", {"Content-Type": FHIR_JSON}, 400),
        (b"", {"Content-Type": FHIR_JSON}, 400),
        (b"[]", {"Content-Type": FHIR_JSON}, 400),
        ({"resourceType": "Observation", "status": "final"}, {}, 400),
    ],
    ids=["minimal", "json", "charset", "xml-415", "text-415", "truncated", "dup-key", "nan",
         "not-utf8", "empty", "array", "wrong-type"],
)
def test_create_variants(client: Client, server: SandboxServer, body: Any,
                         headers: dict[str, str], status: int) -> None:
    resp = client("POST", "/Patient", body, headers)
    assert resp.status == status, resp.body
    if status >= 400:
        assert resp.json["resourceType"] == "OperationOutcome"
        assert server.request_log()[-1]["action"] == "error"
    elif headers.get("Prefer") == "return=minimal":
        assert resp.body == b"" and resp.header("content-length") == "0"
        assert resp.header("location") and resp.header("etag") == 'W/"1"'
    else:
        assert resp.json["resourceType"] == "Patient"


def test_conditional_create_if_none_exist(client: Client) -> None:
    rid = create(client, patient())["id"]
    again = client("POST", "/Patient", patient(), {"If-None-Exist": f"_id={rid}"})
    assert again.status == 200 and again.json["id"] == rid
    fresh = client("POST", "/Patient", patient(), {"If-None-Exist": "_id=nope"})
    assert fresh.status == 201 and fresh.json["id"] != rid
    other = client("POST", "/Patient", patient(), {"If-None-Exist": "identifier=x|y"})
    assert other.status == 400
    assert client("GET", "/Patient").json["total"] == 2


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/Patient/unknown", 404),
        ("/Patient/bad id!", 400),
        ("/patient/x", 404),
        ("/Patient/x/_history/abc", 404),
        ("/Patient/x/_history/1/extra", 404),
        ("/Patient/x/extra", 404),
        ("/Patient/$everything", 400),
        ("", 405),
    ],
)
def test_read_errors(client: Client, path: str, status: int) -> None:
    resp = client("GET", path.replace(" ", "%20"))
    assert resp.status == status
    assert resp.json["resourceType"] == "OperationOutcome"


def test_outside_base_path_is_404_and_logged(client: Client, server: SandboxServer) -> None:
    resp = client("GET", "/other/Patient", base="")
    assert resp.status == 404 and resp.json["resourceType"] == "OperationOutcome"
    resp = client("POST", "/fhir/R4/../../admin/Patient", patient(), base="")
    assert resp.status == 404
    assert [e["action"] for e in server.request_log()] == ["error", "error"]


def test_dot_segments_are_normalised_like_real_servers(client: Client,
                                                       server: SandboxServer) -> None:
    resp = client("POST", "/Observation/../Patient", patient())
    assert resp.status == 201
    entry = server.request_log()[-1]
    assert entry["path"] == f"{BASE}/Observation/../Patient" and entry["action"] == "create"


# -- update / patch / delete --------------------------------------------------------

@pytest.mark.parametrize(
    ("url_id", "body_id", "headers", "status"),
    [
        ("EXISTING", "EXISTING", {}, 200),
        ("EXISTING", "EXISTING", {"If-Match": 'W/"1"'}, 200),
        ("EXISTING", "EXISTING", {"If-Match": '"1"'}, 200),
        ("EXISTING", "EXISTING", {"If-Match": "*"}, 200),
        ("EXISTING", "EXISTING", {"If-Match": 'W/"7"'}, 412),
        ("EXISTING", "EXISTING", {"If-Match": "garbage"}, 400),
        ("EXISTING", "other", {}, 400),
        ("EXISTING", None, {}, 400),
        ("new-id", "new-id", {}, 201),
        ("new-id", "new-id", {"If-Match": 'W/"1"'}, 412),
        ("new-id", "new-id", {"If-Match": "*"}, 412),
    ],
)
def test_update(client: Client, server: SandboxServer, url_id: str, body_id: str | None,
                headers: dict[str, str], status: int) -> None:
    existing = create(client, patient())["id"]
    url_id = existing if url_id == "EXISTING" else url_id
    body_id = existing if body_id == "EXISTING" else body_id
    body = patient(active=False) if body_id is None else patient(id=body_id, active=False)
    resp = client("PUT", f"/Patient/{url_id}", body, headers)
    assert resp.status == status, resp.body
    expected_version = {200: "2", 201: "1"}.get(status)
    if expected_version:
        assert resp.json["meta"]["versionId"] == expected_version
        assert resp.header("etag") == f'W/"{expected_version}"'
        assert resp.header("location") == \
            f"{server.base_url}/Patient/{url_id}/_history/{expected_version}"
    else:
        assert resp.json["resourceType"] == "OperationOutcome"
        assert client("GET", f"/Patient/{existing}").json["meta"]["versionId"] == "1"


def test_update_recreates_after_delete(client: Client) -> None:
    rid = create(client, patient())["id"]
    assert client("DELETE", f"/Patient/{rid}").status == 200
    resp = client("PUT", f"/Patient/{rid}", patient(id=rid))
    assert resp.status == 201 and resp.json["meta"]["versionId"] == "3"


@pytest.mark.parametrize(
    ("patch", "headers", "status", "check"),
    [
        ([{"op": "replace", "path": "/name/0/family", "value": "Other"}], {}, 200,
         lambda r: r["name"][0]["family"] == "Other"),
        ([{"op": "add", "path": "/active", "value": True}], {"If-Match": 'W/"1"'}, 200,
         lambda r: r["active"] is True),
        ([{"op": "add", "path": "/name/-", "value": {"family": "Second"}}], {}, 200,
         lambda r: r["name"][1]["family"] == "Second"),
        ([{"op": "remove", "path": "/name"}], {}, 200, lambda r: "name" not in r),
        ([{"op": "test", "path": "/name/0/family", "value": "Synthetic"},
          {"op": "add", "path": "/gender", "value": "unknown"}], {}, 200,
         lambda r: r["gender"] == "unknown"),
        ([{"op": "test", "path": "/name/0/family", "value": "Nope"}], {}, 422, None),
        ([{"op": "replace", "path": "/missing", "value": 1}], {}, 422, None),
        ([{"op": "remove", "path": "/name/5"}], {}, 422, None),
        ([{"op": "replace", "path": "/id", "value": "x"}], {}, 422, None),
        ([{"op": "add", "path": "/active", "value": True}], {"If-Match": 'W/"9"'}, 412, None),
        ({"op": "add"}, {}, 400, None),
        ([{"op": "jump", "path": "/a"}], {}, 400, None),
        ([{"op": "add", "path": "active", "value": 1}], {}, 400, None),
        ([{"op": "add", "path": "/active", "value": True}], {"Content-Type": FHIR_JSON}, 415,
         None),
    ],
)
def test_patch(client: Client, patch: Any, headers: dict[str, str], status: int,
               check: Any) -> None:
    rid = create(client, patient())["id"]
    resp = client("PATCH", f"/Patient/{rid}", json.dumps(patch).encode(),
                  {"Content-Type": PATCH_JSON, **headers})
    assert resp.status == status, resp.body
    current = client("GET", f"/Patient/{rid}").json
    if check is not None:
        assert check(resp.json) and resp.json == current
        assert resp.header("etag") == 'W/"2"'
    else:
        assert resp.json["resourceType"] == "OperationOutcome"
        assert current["meta"]["versionId"] == "1"


def test_patch_missing_and_deleted(client: Client) -> None:
    body = json.dumps([{"op": "add", "path": "/active", "value": True}]).encode()
    assert client("PATCH", "/Patient/nobody", body,
                  {"Content-Type": PATCH_JSON}).status == 404
    rid = create(client, patient())["id"]
    client("DELETE", f"/Patient/{rid}")
    assert client("PATCH", f"/Patient/{rid}", body, {"Content-Type": PATCH_JSON}).status == 410


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 200), ({"If-Match": 'W/"1"'}, 200), ({"If-Match": 'W/"2"'}, 412)],
)
def test_delete(client: Client, headers: dict[str, str], status: int) -> None:
    rid = create(client, patient())["id"]
    resp = client("DELETE", f"/Patient/{rid}", headers=headers)
    assert resp.status == status
    after = client("GET", f"/Patient/{rid}")
    if status == 200:
        assert resp.header("etag") == 'W/"2"'
        assert after.status == 410
        assert client("GET", f"/Patient/{rid}/_history/2").status == 410
        assert client("GET", f"/Patient/{rid}/_history").json["total"] == 2
        assert client("DELETE", f"/Patient/{rid}").status == 200  # idempotent
        assert client("GET", "/Patient").json["total"] == 0
    else:
        assert after.status == 200


def test_delete_unknown_is_404(client: Client) -> None:
    assert client("DELETE", "/Patient/never").status == 404


# -- search ---------------------------------------------------------------------------

def test_search_paging_links_are_absolute(client: Client, server: SandboxServer) -> None:
    created = [create(client, patient())["id"] for _ in range(5)]
    first = client("GET", "/Patient?_count=2")
    bundle = first.json
    assert bundle["type"] == "searchset" and bundle["total"] == 5
    assert len(bundle["entry"]) == 2
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"].startswith(server.base_url + "/Patient?")
    seen = ids_of(bundle)
    while "next" in links:
        parts = urlsplit(links["next"])
        assert f"{parts.scheme}://{parts.netloc}" == f"http://127.0.0.1:{server.port}"
        page = client("GET", f"{parts.path}?{parts.query}", base="").json
        seen += ids_of(page)
        links = {link["relation"]: link["url"] for link in page["link"]}
    assert seen == created
    assert "previous" in links
    entry = bundle["entry"][0]
    assert entry["fullUrl"] == f"{server.base_url}/Patient/{entry['resource']['id']}"
    assert entry["search"]["mode"] == "match"


def test_search_filters(client: Client) -> None:
    a, b, c = (create(client, patient())["id"] for _ in range(3))
    assert sorted(ids_of(client("GET", f"/Patient?_id={a},{c}").json)) == sorted([a, c])
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "synthetic"}}
    o1 = create(client, {**obs, "subject": {"reference": f"Patient/{a}"}})["id"]
    o2 = create(client, {**obs, "subject": {"reference": f"Patient/{b}"}})["id"]
    assert ids_of(client("GET", f"/Observation?patient={a}").json) == [o1]
    assert ids_of(client("GET", f"/Observation?subject=Patient/{b}").json) == [o2]
    assert client("GET", "/Observation?patient=nobody").json["total"] == 0
    form = client("POST", "/Observation/_search", f"patient=Patient/{b}".encode(),
                  {"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 200 and ids_of(form.json) == [o2]
    assert client("POST", "/Observation/_search", b"{}",
                  {"Content-Type": FHIR_JSON}).status == 415
    assert client("GET", "/Patient?_count=-1").status == 400
    assert client("GET", "/Patient?unknown=1").json["total"] == 3
    assert client("GET", "/Patient?unknown=1", headers={"Prefer": "handling=strict"}).status == 400


# -- transaction / batch ------------------------------------------------------------

PAT_URN = "urn:uuid:0b3c4e7a-1111-4a4a-9e9e-000000000001"


def tx_bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post_entry(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource,
                             "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def test_transaction_resolves_urn_uuid(client: Client, server: SandboxServer) -> None:
    obs = {"resourceType": "Observation", "status": "final",
           "subject": {"reference": PAT_URN}, "code": {"text": "synthetic"}}
    bundle = tx_bundle("transaction", post_entry(obs), post_entry(patient(), PAT_URN),
                       {"request": {"method": "GET", "url": "Patient?_count=5"}})
    resp = client("POST", "", bundle)
    assert resp.status == 200, resp.body
    body = resp.json
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "201 Created", "200 OK"]
    obs_loc, pat_loc = (e["response"]["location"] for e in body["entry"][:2])
    assert pat_loc.startswith(server.base_url + "/Patient/") and pat_loc.endswith("/_history/1")
    assert body["entry"][0]["response"]["etag"] == 'W/"1"'
    pat_id = pat_loc.split("/")[-3]
    stored = client("GET", obs_loc.rsplit("/_history", 1)[0][len(server.base_url):]).json
    assert stored["subject"]["reference"] == f"Patient/{pat_id}"
    # GET entries run after the writes
    assert body["entry"][2]["resource"]["total"] == 1
    entry = server.request_log()[-2]  # the last one is the GET above
    assert entry["action"] == "transaction"
    assert entry["entries"] == [
        {"method": "POST", "url": "Observation", "action": "create"},
        {"method": "POST", "url": "Patient", "action": "create"},
        {"method": "GET", "url": "Patient?_count=5", "action": "search"},
    ]


@pytest.mark.parametrize(
    ("bad_entry", "status"),
    [
        ({"resource": patient(id="p2"), "request": {"method": "PUT", "url": "Patient/p2",
                                                    "ifMatch": 'W/"3"'}}, 412),
        ({"request": {"method": "DELETE", "url": "Patient/never"}}, 404),
        ({"request": {"method": "GET", "url": "Patient/never"}}, 404),
        (post_entry({"resourceType": "Observation", "status": "final",
                     "subject": {"reference": "urn:uuid:unknown"}}), 400),
        ({"resource": patient(), "request": {"method": "POST", "url": "Observation"}}, 400),
        ({"request": {"method": "POST"}}, 400),
        ({"resource": patient(), "request": {"method": "POST",
                                             "url": "http://elsewhere/Patient"}}, 400),
        ({"resource": patient(id="p1"), "request": {"method": "PUT", "url": "Patient/p1"}}, 400),
    ],
    ids=["stale-ifmatch", "delete-missing", "read-missing", "unresolved-urn", "type-mismatch",
         "no-url", "foreign-url", "same-resource-twice"],
)
def test_transaction_is_all_or_nothing(client: Client, bad_entry: dict[str, Any],
                                       status: int) -> None:
    good = [post_entry(patient(), PAT_URN),
            {"resource": patient(id="p1"), "request": {"method": "PUT", "url": "Patient/p1"}}]
    resp = client("POST", "", tx_bundle("transaction", *good, bad_entry))
    assert resp.status == status, resp.body
    assert resp.json["resourceType"] == "OperationOutcome"
    assert client("GET", "/Patient").json["total"] == 0
    assert client("GET", "/Patient/p1").status == 404


def test_batch_entries_are_independent(client: Client, server: SandboxServer) -> None:
    patch = base64.b64encode(json.dumps(
        [{"op": "add", "path": "/active", "value": True}]).encode()).decode()
    rid = create(client, patient())["id"]
    bundle = tx_bundle(
        "batch",
        post_entry(patient()),
        {"request": {"method": "GET", "url": "Patient/never"}},
        {"resource": {"resourceType": "Binary", "contentType": PATCH_JSON, "data": patch},
         "request": {"method": "PATCH", "url": f"Patient/{rid}"}},
        {"request": {"method": "DELETE", "url": f"{server.base_url}/Patient/{rid}"}},
        {"request": {"method": "TRACE", "url": "Patient"}},
    )
    resp = client("POST", "", bundle)
    assert resp.status == 200 and resp.json["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in resp.json["entry"]]
    assert statuses == ["201 Created", "404 Not Found", "200 OK", "200 OK",
                        "405 Method Not Allowed"]
    assert resp.json["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert client("GET", f"/Patient/{rid}/_history/2").json["active"] is True
    assert client("GET", "/Patient").json["total"] == 1
    assert [e["action"] for e in server.request_log()[-3]["entries"]] == [
        "create", "read", "patch", "delete", "error"]


@pytest.mark.parametrize(
    "body",
    [{"resourceType": "Bundle", "type": "collection", "entry": []},
     {"resourceType": "Patient"}, {"resourceType": "Bundle", "type": "batch", "entry": {}}],
)
def test_base_post_requires_transaction_or_batch(client: Client, body: Any) -> None:
    assert client("POST", "", body).status == 400


# -- witness log -------------------------------------------------------------------

def test_request_log_records_exact_bytes_and_headers(server: SandboxServer) -> None:
    raw = ('{ "resourceType":"Patient",\n  "name":[{"family":"Syn\u00e9thique"}] }\t'
           ).encode("utf-8")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /fhir/R4/Patient?_pretty=true&x=%41 HTTP/1.1\r\n"
            b"Host: ehr.test\r\nContent-Type: application/fhir+json\r\n"
            b"X-Correlation-ID: corr-123\r\nX-Dup: one\r\nx-dup: two\r\n"
            b"Content-Length: " + str(len(raw)).encode() + b"\r\nConnection: close\r\n\r\n" + raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 201 ")
    (entry,) = server.request_log()
    assert base64.b64decode(entry["body_b64"]) == raw
    assert entry["method"] == "POST" and entry["path"] == "/fhir/R4/Patient"
    assert entry["query"] == "_pretty=true&x=%41"
    assert entry["headers"]["x-dup"] == "one, two"
    assert entry["headers"]["host"] == "ehr.test"
    assert entry["correlation_id"] == "corr-123"
    assert entry["action"] == "create" and entry["status"] == 201 and entry["fault"] is None
    assert entry["seq"] == 1 and isinstance(entry["ts"], float)


def test_chunked_request_body_is_logged_decoded(server: SandboxServer) -> None:
    raw = json.dumps(patient()).encode()
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                       for part in (raw[:10], raw[10:])) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n" + chunked)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 201 ")
    assert base64.b64decode(server.request_log()[0]["body_b64"]) == raw


def test_ambiguous_framing_is_rejected_and_logged(server: SandboxServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in reply
    assert server.request_log()[0]["action"] == "error"


@pytest.mark.parametrize(
    "raw",
    [b"garbage\r\n\r\n", b"GET /fhir/R4/metadata\r\n\r\n",
     b"GET /fhir/R4/metadata HTTP/1.1\r\nHost: x\r\nContent-Length: ab\r\n\r\n",
     b"POST /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    ids=["garbage", "http-0.9", "bad-length", "bad-chunk"],
)
def test_protocol_errors_get_a_400_status_line(server: SandboxServer, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(raw)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"OperationOutcome" in reply


def test_unknown_method_is_logged(client: Client, server: SandboxServer) -> None:
    assert client("FOO", "/Patient/x").status == 405
    entry = server.request_log()[-1]
    assert (entry["method"], entry["action"], entry["status"]) == ("FOO", "error", 405)


@pytest.mark.parametrize(
    ("method", "path", "ctype", "body", "action"),
    [
        ("GET", "/metadata", None, b"", "capabilities"),
        ("POST", "/Patient", FHIR_JSON, json.dumps(patient()).encode(), "create"),
        ("GET", "/Patient/x", None, b"", "read"),
        ("GET", "/Patient/x/_history/1", None, b"", "vread"),
        ("GET", "/Patient/x/_history", None, b"", "history"),
        ("PUT", "/Patient/x", FHIR_JSON, json.dumps(patient(id="x")).encode(), "update"),
        ("PATCH", "/Patient/x", PATCH_JSON, b"[]", "patch"),
        ("DELETE", "/Patient/x", None, b"", "delete"),
        ("GET", "/Patient?_id=x", None, b"", "search"),
        ("POST", "/Patient/_search", "application/x-www-form-urlencoded", b"_id=x", "search"),
        ("POST", "", FHIR_JSON, json.dumps(tx_bundle("batch")).encode(), "batch"),
        ("POST", "", FHIR_JSON, json.dumps(tx_bundle("transaction")).encode(), "transaction"),
        ("POST", "/Patient/x", FHIR_JSON, b"{}", "error"),
        ("PUT", "/Patient", FHIR_JSON, json.dumps(patient()).encode(), "error"),
        ("POST", "/Patient/$validate", FHIR_JSON, b"{}", "operation"),
    ],
)
def test_log_action_classification(client: Client, server: SandboxServer, method: str,
                                   path: str, ctype: str | None, body: bytes,
                                   action: str) -> None:
    client("GET", "/metadata")
    server.clear_log()
    client(method, path, body or None, {"Content-Type": ctype} if ctype else {})
    (entry,) = server.request_log()
    assert entry["action"] == action


def test_log_is_written_before_processing_and_copies_are_private(
        client: Client, server: SandboxServer) -> None:
    server.set_faults(delay_ms=300)
    done = threading.Event()

    def post() -> None:
        client("POST", "/Patient", patient())
        done.set()

    threading.Thread(target=post, daemon=True).start()
    deadline = time.monotonic() + 2
    while not server.request_log() and time.monotonic() < deadline:
        time.sleep(0.01)
    log = server.request_log()
    assert log and log[0]["action"] == "create" and not done.is_set()
    log[0]["action"] = "tampered"
    assert done.wait(3)
    assert server.request_log()[0]["action"] == "create"


# -- faults --------------------------------------------------------------------------

def test_fault_delay_executes_then_answers_late(client: Client, server: SandboxServer) -> None:
    server.set_faults(delay_ms=200)
    started = time.monotonic()
    assert client("POST", "/Patient", patient()).status == 201
    assert time.monotonic() - started >= 0.2
    entry = server.request_log()[-1]
    assert entry["action"] == "create" and entry["fault"] == "delay"


@pytest.mark.parametrize(
    ("faults", "expected"),
    [
        ({"status": 503, "retry_after": 7}, [(503, "7")] * 3),
        ({"status": 429, "retry_after": "Wed, 21 Oct 2037 07:28:00 GMT"},
         [(429, "Wed, 21 Oct 2037 07:28:00 GMT")] * 3),
        ({"status": 500}, [(500, None)] * 3),
        ({"burst_5xx": 2}, [(503, None), (503, None), (201, None)]),
        ({"burst_5xx": 1, "burst_status": 502, "retry_after": 1}, [(502, "1"), (201, None),
                                                                   (201, None)]),
    ],
)
def test_fault_status_and_burst(client: Client, server: SandboxServer, faults: dict[str, Any],
                                expected: list[tuple[int, str | None]]) -> None:
    server.set_faults(**faults)
    got = []
    for _ in expected:
        resp = client("POST", "/Patient", patient())
        got.append((resp.status, resp.header("retry-after")))
        if resp.status >= 400:
            assert resp.json["resourceType"] == "OperationOutcome"
    assert got == expected
    created = sum(1 for status, _ in expected if status == 201)
    assert client("GET", "/Patient").status in (200, 503, 429, 500)
    server.set_faults()
    assert client("GET", "/Patient").json["total"] == created
    kinds = [e["action"] for e in server.request_log()[:len(expected)]]
    assert kinds == [("fault:burst" if "burst_5xx" in faults else "fault:status")
                     if status != 201 else "create" for status, _ in expected]


def test_fault_methods_filter(client: Client, server: SandboxServer) -> None:
    server.set_faults(status=503, methods=["post"])
    assert client("GET", "/metadata").status == 200
    assert client("POST", "/Patient", patient()).status == 503
    assert server.faults()["methods"] == ["POST"]


def test_fault_hang_times_out_client_and_stop_does_not_block(server: SandboxServer) -> None:
    server.set_faults(hang=True)
    hung = Client(server, timeout=0.3)
    with pytest.raises(TimeoutError):
        hung("POST", "/Patient", patient())
    entry = server.request_log()[-1]
    assert entry["action"] == "fault:hang" and entry["classified"] == "create"
    server.set_faults()
    fresh = Client(server)
    assert fresh("GET", "/Patient").json["total"] == 0  # nothing was executed
    fresh.close()
    server.set_faults(hang=True)
    other = Client(server, timeout=5)

    def blocked_request() -> None:
        try:
            other("GET", "/metadata")
        except (OSError, http.client.HTTPException):
            pass  # the server went away mid-request, as intended

    threading.Thread(target=blocked_request, daemon=True).start()
    time.sleep(0.1)
    started = time.monotonic()
    server.stop()  # hung connections (one still open) must not block stop()
    assert time.monotonic() - started < 2
    hung.close()


@pytest.mark.parametrize(
    "faults",
    [{"nope": 1}, {"delay_ms": -1}, {"hang": "yes"}, {"status": 99}, {"methods": "POST"},
     {"burst_5xx": True}],
)
def test_fault_validation(server: SandboxServer, faults: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        server.set_faults(**faults)


def test_control_plane_over_http(client: Client, server: SandboxServer) -> None:
    create(client, patient())
    log = client("GET", "/_sandbox/log", base="")
    assert log.status == 200 and log.json[0]["action"] == "create"
    assert client("POST", "/_sandbox/faults", {"status": 503}, base="").json["status"] == 503
    assert client("GET", "/Patient").status == 503
    assert client("POST", "/_sandbox/faults", {"bogus": 1}, base="").status == 400
    assert client("DELETE", "/_sandbox/faults", base="").status == 200
    assert client("GET", "/Patient").json["total"] == 1
    assert client("DELETE", "/_sandbox/log", base="").status == 200
    assert server.request_log() == []
    client("POST", "/_sandbox/faults", {"burst_5xx": 5}, base="")
    assert client("POST", "/_sandbox/reset", base="").status == 200
    assert server.faults()["burst_5xx"] == 0 and server.request_log() == []
    assert client("GET", "/Patient").json["total"] == 0
    assert client("GET", "/_sandbox/nothing", base="").status == 404
    # control requests are neither logged nor faulted
    assert [e["path"] for e in server.request_log()] == [f"{BASE}/Patient"]


# -- transport ----------------------------------------------------------------------

def test_keep_alive_and_concurrent_clients(server: SandboxServer) -> None:
    def worker(errors: list[BaseException]) -> None:
        c = Client(server)
        try:
            for _ in range(15):
                assert c("POST", "/Patient", patient()).status == 201
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)
        finally:
            c.close()

    errors: list[BaseException] = []
    threads = [threading.Thread(target=worker, args=(errors,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    c = Client(server)
    assert c("GET", "/Patient?_count=0").json["total"] == 120
    c.close()
    ports = {(e["headers"].get("host")) for e in server.request_log()}
    assert ports == {f"127.0.0.1:{server.port}"}
    assert len({e["seq"] for e in server.request_log()}) == 121


def _self_signed(tmp_path: pathlib.Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_mode(tmp_path: pathlib.Path) -> None:
    cert, key = _self_signed(tmp_path)
    with SandboxServer(tls_cert=cert, tls_key=key) as server:
        assert server.base_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=cert)
        c = Client(server, context=context)
        assert c("GET", "/metadata").status == 200
        rid = create(c, patient())["id"]
        assert c("GET", f"/Patient/{rid}").status == 200  # keep-alive over TLS
        c.close()
        # a plaintext client must not break the server
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(b"GET /fhir/R4/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                sock.recv(1024)
            except (ConnectionError, TimeoutError):
                pass
        server.set_faults(hang=True)
        hung = Client(server, timeout=0.3, context=context)
        with pytest.raises(TimeoutError):
            hung("GET", "/metadata")
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        hung.close()
    assert [e["action"] for e in server.request_log()] == [
        "capabilities", "create", "read", "fault:hang"]


def test_tls_requires_cert_and_key() -> None:
    with pytest.raises(ValueError):
        SandboxServer(tls_cert="only-cert.pem")


def test_custom_base_path_and_restart() -> None:
    server = SandboxServer(base_path="/ehr/api/")
    server.start()
    try:
        assert server.base_url.endswith("/ehr/api")
        c = Client(server)
        assert c("GET", "/metadata", base="/ehr/api").status == 200
        assert c("GET", "/metadata").status == 404
        c.close()
    finally:
        server.stop()
    server.stop()  # idempotent
    assert server.port != 0  # the bound port is remembered after stop()
    server.start()  # and the server can be started again
    again = Client(server)
    try:
        assert again("GET", "/metadata", base="/ehr/api").status == 200
    finally:
        again.close()
        server.stop()


def test_cli_prints_base_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.sandbox", "--port", "0",
                             "--base-path", "/fhir/R4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname == "127.0.0.1"
        assert parts.path == "/fhir/R4"
        conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=5)
        conn.request("GET", "/fhir/R4/metadata")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_sandbox_imports_nothing_from_the_sidecar() -> None:
    """The witness must parse requests with its own code."""
    package = pathlib.Path(__file__).resolve().parents[1] / "sidecar" / "sandbox"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert not (node.module or "").startswith("sidecar"), path.name
                else:
                    assert node.level == 1, f"{path.name} reaches outside sidecar.sandbox"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sidecar") for a in node.names), path.name
