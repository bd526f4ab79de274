"""classify: every row of DESIGN's interaction table, from raw requests (pure; no network).

Each case is a raw request (method, target bytes, headers, body) through `parse_request` and
`classify` with base path /fhir/R4, and the expected interaction, write flag and SMART
letters per resource type.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from sidecar.classify import INTERACTIONS, LETTERS, classify
from sidecar.errors import Refusal
from sidecar.parse import parse_request
from sidecar.request import Classification, RawRequest

BASE = "/fhir/R4"
UPSTREAM = "https://ehr.example.org/fhir/R4"
SIDECAR = "http://127.0.0.1:8080/fhir/R4"

FHIR_JSON = ("content-type", "application/fhir+json")
JSON = ("content-type", "application/json")
JSON_PATCH = ("content-type", "application/json-patch+json")
FORM = ("content-type", "application/x-www-form-urlencoded")
IF_MATCH = ("if-match", 'W/"3"')

OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
OBS_9 = {**OBS, "id": "9"}
JSON_PATCH_OPS = [{"op": "replace", "path": "/status", "value": "amended"}]
FHIRPATH_PATCH = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
    {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.status"},
    {"name": "value", "valueCode": "amended"}]}]}
PARAMS = {"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]}


def raw(method: str, target: bytes | str, headers=(), body: object = None) -> RawRequest:
    if isinstance(target, str):
        target = target.encode()
    if body is None:
        data = b""
    elif isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    return RawRequest(method, target, tuple(headers), data)


def run(r: RawRequest, **kw) -> Classification:
    req = parse_request(r, base_path=BASE, max_body_bytes=1 << 20, **kw)
    return classify(req, upstream_base=UPSTREAM)


def letters(cls_or_reqs) -> dict[str, str]:
    """Requirements as {type: letters in c,r,u,d,s order}; several on one type are merged."""
    reqs = cls_or_reqs.requires if isinstance(cls_or_reqs, Classification) else cls_or_reqs
    out: dict[str, set[str]] = {}
    for r in reqs:
        out.setdefault(r.resource_type, set()).update(r.letters)
    return {t: "".join(c for c in "cruds" if c in ls) for t, ls in out.items()}


def bundle(btype: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


def entry(method: str, url: str, resource: dict | None = None, **request) -> dict:
    e: dict = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        e["resource"] = resource
    return e


def gql(text: str) -> str:
    return quote(text, safe="")


# --------------------------------------------------------------------------------------------
# The interaction table
# --------------------------------------------------------------------------------------------

P = "/fhir/R4"
GQL_QUERY = gql('{PatientList(name:"x"){id}}')
ROWS = [
    # id, method, target, headers, body, interaction, is_write, {type: letters}
    ("capabilities", "GET", f"{P}/metadata", [], None, "capabilities", False, {}),
    ("capabilities-head", "HEAD", f"{P}/metadata", [], None, "capabilities", False, {}),
    ("discovery", "GET", f"{P}/.well-known/smart-configuration", [], None, "discovery", False, {}),
    ("read", "GET", f"{P}/Observation/9", [], None, "read", False, {"Observation": "r"}),
    ("read-head", "HEAD", f"{P}/Observation/9", [], None, "read", False, {"Observation": "r"}),
    ("read-format-summary", "GET", f"{P}/Observation/9?_format=json&_summary=true&_elements=status", [], None,
     "read", False, {"Observation": "r"}),
    ("vread", "GET", f"{P}/Observation/9/_history/2", [], None, "vread", False, {"Observation": "r"}),
    ("history-instance", "GET", f"{P}/Observation/9/_history", [], None, "history-instance", False,
     {"Observation": "r"}),
    ("history-instance-count", "GET", f"{P}/Observation/9/_history?_count=5&_since=2020-01-01", [], None,
     "history-instance", False, {"Observation": "r"}),
    ("search-type-get", "GET", f"{P}/Observation?code=1234-5", [], None, "search-type", False, {"Observation": "s"}),
    ("search-type-get-bare", "GET", f"{P}/Observation", [], None, "search-type", False, {"Observation": "s"}),
    ("search-type-post", "POST", f"{P}/Observation/_search", [FORM], "code=1234-5", "search-type", False,
     {"Observation": "s"}),
    ("search-type-post-empty", "POST", f"{P}/Observation/_search", [], None, "search-type", False,
     {"Observation": "s"}),
    ("search-type-include", "GET", f"{P}/Observation?_include=Observation:subject:Patient", [], None,
     "search-type", False, {"Observation": "s", "Patient": "r"}),
    ("search-type-include-no-target", "GET", f"{P}/Observation?_include=Observation:subject", [], None,
     "search-type", False, {"Observation": "s", "*": "r"}),
    ("search-type-include-star", "GET", f"{P}/Observation?_include=*", [], None,
     "search-type", False, {"Observation": "s", "*": "r"}),
    ("search-type-include-iterate", "GET", f"{P}/Observation?_include:iterate=Observation:subject:Patient",
     [], None, "search-type", False, {"Observation": "s", "Patient": "r"}),
    ("search-type-revinclude", "GET", f"{P}/Patient?_revinclude=Provenance:target", [], None,
     "search-type", False, {"Patient": "s", "Provenance": "r"}),
    ("search-type-include-in-form", "POST", f"{P}/Observation/_search", [FORM],
     "code=x&_include=Observation:subject:Patient&_revinclude=Provenance:target", "search-type", False,
     {"Observation": "s", "Patient": "r", "Provenance": "r"}),
    ("search-type-chain", "GET", f"{P}/Observation?subject:Patient.name=x", [], None, "search-type", False,
     {"Observation": "s", "Patient": "s"}),
    ("search-type-chain-untyped", "GET", f"{P}/Observation?subject.name=x", [], None, "search-type", False,
     {"Observation": "s", "*": "s"}),
    ("search-type-has", "GET", f"{P}/Patient?_has:Observation:patient:code=x", [], None, "search-type", False,
     {"Patient": "s", "Observation": "s"}),
    ("search-type-chain-two-hops", "GET", f"{P}/Observation?subject:Patient.organization:Organization.name=x",
     [], None, "search-type", False, {"Observation": "s", "Patient": "s", "Organization": "s"}),
    ("search-type-chain-untyped-second-hop", "GET", f"{P}/Observation?subject:Patient.organization.name=x",
     [], None, "search-type", False, {"Observation": "s", "Patient": "s", "*": "s"}),
    ("search-type-has-nested", "GET", f"{P}/Patient?_has:Observation:patient:_has:AuditEvent:entity:agent=x",
     [], None, "search-type", False, {"Patient": "s", "Observation": "s", "AuditEvent": "s"}),
    ("search-type-has-untyped", "GET", f"{P}/Patient?_has=x", [], None, "search-type", False,
     {"Patient": "s", "*": "s"}),
    ("search-type-has-with-chain", "GET", f"{P}/Patient?_has:Observation:patient:subject.name=x", [], None,
     "search-type", False, {"Patient": "s", "Observation": "s", "*": "s"}),
    ("search-type-chain-in-form", "POST", f"{P}/Observation/_search", [FORM], "subject:Patient.name=x",
     "search-type", False, {"Observation": "s", "Patient": "s"}),
    ("search-system-type", "GET", f"{P}?_type=Observation,Patient", [], None, "search-system", False,
     {"Observation": "s", "Patient": "s"}),
    ("search-system-base-slash", "GET", f"{P}/?_type=Observation", [], None, "search-system", False,
     {"Observation": "s"}),
    ("search-system-no-type", "GET", f"{P}?_lastUpdated=gt2020-01-01", [], None, "search-system", False, {"*": "s"}),
    ("search-system-bare", "GET", P, [], None, "search-system", False, {"*": "s"}),
    ("search-system-include", "GET", f"{P}?_type=Observation&_include=Observation:subject:Patient", [], None,
     "search-system", False, {"Observation": "s", "Patient": "r"}),
    ("search-system-post", "POST", f"{P}/_search", [FORM], "_type=Observation", "search-system", False,
     {"Observation": "s"}),
    ("search-system-post-no-type", "POST", f"{P}/_search", [FORM], "_id=1", "search-system", False, {"*": "s"}),
    ("search-compartment", "GET", f"{P}/Patient/1/Observation", [], None, "search-compartment", False,
     {"Observation": "s"}),
    ("search-compartment-query", "GET", f"{P}/Patient/1/Observation?code=x&_include=Observation:performer:Practitioner",
     [], None, "search-compartment", False, {"Observation": "s", "Practitioner": "r"}),
    ("search-compartment-star", "GET", f"{P}/Patient/1/*", [], None, "search-compartment", False, {"*": "s"}),
    ("search-compartment-encounter", "GET", f"{P}/Encounter/e1/Observation", [], None, "search-compartment", False,
     {"Observation": "s"}),
    ("history-type", "GET", f"{P}/Observation/_history", [], None, "history-type", False, {"Observation": "s"}),
    ("history-system", "GET", f"{P}/_history", [], None, "history-system", False, {"*": "s"}),
    ("history-system-type", "GET", f"{P}/_history?_type=Patient", [], None, "history-system", False, {"Patient": "s"}),
    ("create", "POST", f"{P}/Observation", [FHIR_JSON], OBS, "create", True, {"Observation": "c"}),
    ("create-json", "POST", f"{P}/Observation", [JSON], OBS, "create", True, {"Observation": "c"}),
    ("create-format", "POST", f"{P}/Observation?_format=json&_pretty=true", [FHIR_JSON], OBS, "create", True,
     {"Observation": "c"}),
    ("create-conditional", "POST", f"{P}/Observation", [FHIR_JSON, ("if-none-exist", "identifier=http://x|1")], OBS,
     "create-conditional", True, {"Observation": "cs"}),
    ("update-if-match", "PUT", f"{P}/Observation/9", [FHIR_JSON, IF_MATCH], OBS_9, "update", True,
     {"Observation": "u"}),
    ("update-no-if-match", "PUT", f"{P}/Observation/9", [FHIR_JSON], OBS_9, "update", True, {"Observation": "cu"}),
    ("update-empty-if-match", "PUT", f"{P}/Observation/9", [FHIR_JSON, ("if-match", "")], OBS_9, "update", True,
     {"Observation": "cu"}),
    ("update-if-none-match", "PUT", f"{P}/Observation/9", [FHIR_JSON, ("if-none-match", "*")], OBS_9, "update", True,
     {"Observation": "cu"}),
    ("update-conditional", "PUT", f"{P}/Observation?identifier=http://x|1", [FHIR_JSON], OBS, "update-conditional",
     True, {"Observation": "cus"}),
    ("update-conditional-special", "PUT", f"{P}/Observation?_id=9&_format=json", [FHIR_JSON], OBS,
     "update-conditional", True, {"Observation": "cus"}),
    ("patch-json-patch", "PATCH", f"{P}/Observation/9", [JSON_PATCH], JSON_PATCH_OPS, "patch", True,
     {"Observation": "u"}),
    ("patch-fhirpath", "PATCH", f"{P}/Observation/9", [FHIR_JSON], FHIRPATH_PATCH, "patch", True,
     {"Observation": "u"}),
    ("patch-if-match", "PATCH", f"{P}/Observation/9", [JSON_PATCH, IF_MATCH], JSON_PATCH_OPS, "patch", True,
     {"Observation": "u"}),
    ("patch-conditional", "PATCH", f"{P}/Observation?identifier=http://x|1", [JSON_PATCH], JSON_PATCH_OPS,
     "patch-conditional", True, {"Observation": "us"}),
    ("patch-conditional-fhirpath", "PATCH", f"{P}/Observation?identifier=http://x|1", [FHIR_JSON], FHIRPATH_PATCH,
     "patch-conditional", True, {"Observation": "us"}),
    ("delete", "DELETE", f"{P}/Observation/9", [], None, "delete", True, {"Observation": "d"}),
    ("delete-conditional", "DELETE", f"{P}/Observation?identifier=http://x|1", [], None, "delete-conditional", True,
     {"Observation": "ds"}),
    # operations: read-only allowlist => the read it performs
    ("op-everything", "GET", f"{P}/Patient/1/$everything", [], None, "operation", False, {"*": "rs"}),
    ("op-everything-type-post", "POST", f"{P}/Patient/$everything", [], None, "operation", False, {"*": "rs"}),
    ("op-everything-encounter", "GET", f"{P}/Encounter/e1/$everything", [], None, "operation", False, {"*": "rs"}),
    ("op-meta-instance", "GET", f"{P}/Observation/9/$meta", [], None, "operation", False, {"Observation": "r"}),
    ("op-meta-type", "GET", f"{P}/Observation/$meta", [], None, "operation", False, {"Observation": "s"}),
    ("op-meta-system", "GET", f"{P}/$meta", [], None, "operation", False, {"*": "s"}),
    ("op-validate-type", "POST", f"{P}/Observation/$validate", [FHIR_JSON], OBS, "operation", False,
     {"Observation": "s"}),
    ("op-validate-instance", "POST", f"{P}/Observation/9/$validate", [FHIR_JSON], PARAMS, "operation", False,
     {"Observation": "r"}),
    ("op-lastn", "GET", f"{P}/Observation/$lastn?code=x", [], None, "operation", False, {"Observation": "s"}),
    ("op-expand", "GET", f"{P}/ValueSet/$expand?url=http://x", [], None, "operation", False, {"ValueSet": "s"}),
    ("op-graphql-query", "GET", f"{P}/$graphql?query={GQL_QUERY}", [], None,
     "operation", False, {"*": "rs"}),
    ("op-graphql-query-named", "GET", f"{P}/$graphql?query={gql('query Q { PatientList { id } }')}", [], None,
     "operation", False, {"*": "rs"}),
    ("op-graphql-instance", "GET", f"{P}/Patient/1/$graphql?query={gql('{id name{given}}')}", [], None,
     "operation", False, {"*": "rs"}),
    ("op-graphql-post-query", "POST", f"{P}/$graphql", [JSON], {"query": "{PatientList{id}}"}, "operation", False,
     {"*": "rs"}),
    # operations: everything else is a write needing explicit enablement (no scope letters)
    ("op-merge", "POST", f"{P}/Patient/$merge", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-process-message", "POST", f"{P}/$process-message", [FHIR_JSON], {"resourceType": "Bundle", "type": "message"},
     "operation", True, {}),
    ("op-apply", "POST", f"{P}/PlanDefinition/1/$apply", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-apply-get", "GET", f"{P}/PlanDefinition/1/$apply?subject=Patient/1", [], None, "operation", True, {}),
    ("op-meta-add", "POST", f"{P}/Observation/9/$meta-add", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-meta-delete", "POST", f"{P}/Observation/9/$meta-delete", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-unknown", "POST", f"{P}/Observation/$frobnicate", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-unknown-get", "GET", f"{P}/$frobnicate", [], None, "operation", True, {}),
    ("op-expunge", "POST", f"{P}/Observation/9/$expunge", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-delete-meta", "DELETE", f"{P}/Observation/9/$meta", [], None, "operation", True, {}),
    ("op-delete-everything", "DELETE", f"{P}/Patient/1/$everything", [], None, "operation", True, {}),
    ("op-put-validate", "PUT", f"{P}/Observation/$validate", [FHIR_JSON], OBS, "operation", True, {}),
    ("op-everything-wrong-type", "GET", f"{P}/Observation/9/$everything", [], None, "operation", True, {}),
    ("op-meta-post", "POST", f"{P}/Observation/9/$meta", [FHIR_JSON], PARAMS, "operation", True, {}),
    ("op-graphql-mutation", "GET", f"{P}/$graphql?query={gql('mutation { PatientCreate(res: {}) { id } }')}", [],
     None, "operation", True, {}),
    ("op-graphql-mutation-post", "POST", f"{P}/$graphql", [JSON], {"query": "mutation{PatientDelete(id:1){id}}"},
     "operation", True, {}),
    ("op-graphql-no-query", "GET", f"{P}/$graphql", [], None, "operation", True, {}),
    ("op-graphql-unparseable", "GET", f"{P}/$graphql?query={gql('{PatientList{id}')}", [], None, "operation", True, {}),
    ("op-graphql-two-queries", "GET",
     f"{P}/$graphql?query={gql('{PatientList{id}}')}&query={gql('mutation{PatientDelete(id:1){id}}')}",
     [], None, "operation", True, {}),
    ("op-graphql-url-and-body", "POST", f"{P}/$graphql?query={gql('{PatientList{id}}')}", [JSON],
     {"query": "mutation{PatientDelete(id:1){id}}"}, "operation", True, {}),
    ("op-graphql-persisted", "POST", f"{P}/$graphql", [JSON],
     {"query": "{PatientList{id}}", "extensions": {"persistedQuery": {"sha256Hash": "ab"}}}, "operation", True, {}),
    ("op-graphql-type-level", "GET", f"{P}/Patient/$graphql?query={gql('{id}')}", [], None, "operation", True, {}),
]


@pytest.mark.parametrize(("method", "target", "headers", "body", "interaction", "is_write", "requires"),
                         [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_interaction_table(method, target, headers, body, interaction, is_write, requires) -> None:
    cls = run(raw(method, target, headers, body))
    assert (cls.interaction, cls.is_write, letters(cls)) == (interaction, is_write, requires)
    assert cls.public == (interaction in ("capabilities", "discovery"))
    assert cls.entries == ()


@pytest.mark.parametrize(
    ("target", "operation", "write_operations"),
    [
        (f"{P}/Patient/$merge", "$merge", ("$merge",)),
        (f"{P}/$process-message", "$process-message", ("$process-message",)),
        (f"{P}/Observation/9/$meta-add", "$meta-add", ("$meta-add",)),
        (f"{P}/Observation/$validate", "$validate", ()),  # read-only: nothing to enable
    ],
)
def test_operation_names(target: str, operation: str, write_operations: tuple) -> None:
    cls = run(raw("POST", target, [FHIR_JSON], PARAMS))
    assert cls.operation == operation and cls.write_operations == write_operations


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "conditional"),
    [
        ("PUT", f"{P}/Observation?identifier=a|1", [FHIR_JSON], OBS, True),
        ("PATCH", f"{P}/Observation?identifier=a|1", [JSON_PATCH], JSON_PATCH_OPS, True),
        ("DELETE", f"{P}/Observation?identifier=a|1", [], None, True),
        ("POST", f"{P}/Observation", [FHIR_JSON, ("if-none-exist", "identifier=a|1")], OBS, False),  # not gated
        ("PUT", f"{P}/Observation/9", [FHIR_JSON], OBS_9, False),
        ("DELETE", f"{P}/Observation/9", [], None, False),
    ],
)
def test_conditional_flag(method, target, headers, body, conditional) -> None:
    assert run(raw(method, target, headers, body)).conditional is conditional


def test_every_design_row_is_in_the_tables() -> None:
    design = {"capabilities", "discovery", "read", "vread", "history-instance", "search-type", "search-system",
              "search-compartment", "history-type", "history-system", "create", "create-conditional", "update",
              "update-conditional", "patch", "patch-conditional", "delete", "delete-conditional"}
    assert set(LETTERS) == design
    assert set(INTERACTIONS.values()) == design - {"create-conditional"}  # If-None-Exist turns create into it
    tested = {r[5] for r in ROWS}
    assert design | {"operation"} <= tested
    writes = {k for k, (w, _) in LETTERS.items() if w}
    assert writes == {"create", "create-conditional", "update", "update-conditional", "patch", "patch-conditional",
                      "delete", "delete-conditional"}


# --------------------------------------------------------------------------------------------
# Requests that match no row: deny
# --------------------------------------------------------------------------------------------

DENIED = [
    ("post-instance", "POST", f"{P}/Observation/9", [FHIR_JSON], OBS_9, 403),
    ("put-type-no-query", "PUT", f"{P}/Observation", [FHIR_JSON], OBS, 403),
    ("patch-type-no-query", "PATCH", f"{P}/Observation", [JSON_PATCH], JSON_PATCH_OPS, 403),
    ("delete-type-no-query", "DELETE", f"{P}/Observation", [], None, 403),
    ("delete-system", "DELETE", P, [], None, 403),
    ("delete-system-query", "DELETE", f"{P}?_type=Observation", [], None, 403),
    ("put-system", "PUT", P, [FHIR_JSON], OBS, 403),
    ("patch-system", "PATCH", P, [JSON_PATCH], JSON_PATCH_OPS, 403),
    ("delete-history", "DELETE", f"{P}/Observation/9/_history", [], None, 403),
    ("delete-vread", "DELETE", f"{P}/Observation/9/_history/1", [], None, 403),
    ("post-history", "POST", f"{P}/Observation/_history", [FHIR_JSON], OBS, 403),
    ("get-search-post-shape", "GET", f"{P}/Observation/_search", [], None, 403),
    ("post-compartment", "POST", f"{P}/Patient/1/Observation", [FHIR_JSON], OBS, 403),
    ("delete-compartment", "DELETE", f"{P}/Patient/1/Observation", [], None, 403),
    ("compartment-of-non-compartment-type", "GET", f"{P}/Observation/9/Patient", [], None, 403),
    ("post-metadata", "POST", f"{P}/metadata", [FHIR_JSON], OBS, 403),
    ("delete-metadata", "DELETE", f"{P}/metadata", [], None, 403),
    ("if-none-exist-on-update", "PUT", f"{P}/Observation/9", [FHIR_JSON, ("if-none-exist", "a=1")], OBS_9, 403),
    ("if-none-exist-on-search", "POST", f"{P}/Observation/_search", [FORM, ("if-none-exist", "a=1")], "code=x", 403),
    ("if-none-exist-bad-query", "POST", f"{P}/Observation", [FHIR_JSON, ("if-none-exist", "_method=DELETE")], OBS, 403),
    ("search-system-unknown-type", "GET", f"{P}?_type=Observation,observation", [], None, 403),
    ("post-base-not-bundle", "POST", P, [FHIR_JSON], OBS, 403),
    ("post-base-document-bundle", "POST", P, [FHIR_JSON], bundle("document"), 403),
    ("post-base-collection-bundle", "POST", P, [FHIR_JSON], bundle("collection"), 403),
    ("post-base-no-type", "POST", P, [FHIR_JSON], {"resourceType": "Bundle"}, 403),
    ("conditional-update-count", "PUT", f"{P}/Observation?identifier=a|1&_count=1", [FHIR_JSON], OBS, 403),
    ("conditional-update-sort", "PUT", f"{P}/Observation?identifier=a|1&_sort=date", [FHIR_JSON], OBS, 403),
    ("conditional-patch-include", "PATCH", f"{P}/Observation?identifier=a|1&_include=*", [JSON_PATCH],
     JSON_PATCH_OPS, 403),
]


@pytest.mark.parametrize(("method", "target", "headers", "body", "status"),
                         [r[1:] for r in DENIED], ids=[r[0] for r in DENIED])
def test_unclassifiable_is_denied(method, target, headers, body, status) -> None:
    with pytest.raises(Refusal) as info:
        run(raw(method, target, headers, body))
    assert info.value.status == status


# --------------------------------------------------------------------------------------------
# Batch and transaction Bundles: each entry its own interaction
# --------------------------------------------------------------------------------------------

def run_bundle(b: dict, **kw) -> Classification:
    return run(raw("POST", P, [FHIR_JSON], b), **kw)


BUNDLES = [
    # id, bundle, interaction, is_write, entry interactions, {type: letters}, conditional
    ("batch-reads", bundle("batch", entry("GET", "Observation/1"), entry("GET", "Patient?name=x")),
     "batch", False, ["read", "search-type"], {"Observation": "r", "Patient": "s"}, False),
    ("transaction-reads-only", bundle("transaction", entry("GET", "Observation/1/_history/2"),
                                      entry("HEAD", "Observation/1")),
     "transaction", False, ["vread", "read"], {"Observation": "r"}, False),
    ("transaction-mixed", bundle("transaction", entry("GET", "Patient/1"), entry("POST", "Observation", OBS)),
     "transaction", True, ["read", "create"], {"Patient": "r", "Observation": "c"}, False),
    ("batch-one-write-makes-it-a-write", bundle("batch", entry("GET", "Observation/1"),
                                                entry("DELETE", "Observation/2")),
     "batch", True, ["read", "delete"], {"Observation": "rd"}, False),
    ("transaction-all-writes", bundle("transaction",
                                      entry("POST", "Observation", OBS),
                                      entry("PUT", "Observation/9", OBS_9, ifMatch='W/"1"'),
                                      entry("PATCH", "Observation/10", FHIRPATH_PATCH),
                                      entry("DELETE", "Condition/3")),
     "transaction", True, ["create", "update", "patch", "delete"], {"Observation": "cu", "Condition": "d"}, False),
    ("entry-update-without-if-match", bundle("transaction", entry("PUT", "Observation/9", OBS_9)),
     "transaction", True, ["update"], {"Observation": "cu"}, False),
    ("entry-update-with-if-match", bundle("transaction", entry("PUT", "Observation/9", OBS_9, ifMatch='W/"2"')),
     "transaction", True, ["update"], {"Observation": "u"}, False),
    ("entry-create-conditional", bundle("transaction", entry("POST", "Observation", OBS, ifNoneExist="identifier=a|1")),
     "transaction", True, ["create-conditional"], {"Observation": "cs"}, False),
    ("entry-update-conditional", bundle("transaction", entry("PUT", "Observation?identifier=a|1", OBS)),
     "transaction", True, ["update-conditional"], {"Observation": "cus"}, True),
    ("entry-delete-conditional", bundle("batch", entry("DELETE", "Observation?identifier=a|1")),
     "batch", True, ["delete-conditional"], {"Observation": "ds"}, True),
    ("entry-include", bundle("batch", entry("GET", "Observation?code=x&_include=Observation:subject:Patient")),
     "batch", False, ["search-type"], {"Observation": "s", "Patient": "r"}, False),
    ("entry-revinclude", bundle("batch", entry("GET", "Patient?name=x&_revinclude=Provenance:target")),
     "batch", False, ["search-type"], {"Patient": "s", "Provenance": "r"}, False),
    ("entry-include-untyped", bundle("batch", entry("GET", "Observation?_include=Observation:subject")),
     "batch", False, ["search-type"], {"Observation": "s", "*": "r"}, False),
    ("entry-upstream-absolute-url", bundle("transaction", entry("PUT", UPSTREAM + "/Observation/9", OBS_9,
                                                                ifMatch='W/"1"')),
     "transaction", True, ["update"], {"Observation": "u"}, False),
    ("entry-read-only-operation", bundle("batch", entry("GET", "Patient/1/$everything")),
     "batch", False, ["operation"], {"*": "rs"}, False),
    ("entry-write-operation", bundle("batch", entry("POST", "Patient/$merge", PARAMS)),
     "batch", True, ["operation"], {}, False),
    ("entry-graphql-is-never-read-only", bundle("batch", entry("GET", "$graphql?query=" + gql("{PatientList{id}}"))),
     "batch", True, ["operation"], {}, False),
    ("entry-compartment", bundle("batch", entry("GET", "Patient/1/Observation")),
     "batch", False, ["search-compartment"], {"Observation": "s"}, False),
    ("empty-batch", bundle("batch"), "batch", False, [], {}, False),
]


@pytest.mark.parametrize(("b", "interaction", "is_write", "entries", "requires", "conditional"),
                         [r[1:] for r in BUNDLES], ids=[r[0] for r in BUNDLES])
def test_bundles(b, interaction, is_write, entries, requires, conditional) -> None:
    cls = run_bundle(b)
    assert (cls.interaction, cls.is_write, cls.conditional) == (interaction, is_write, conditional)
    assert [e.interaction for e in cls.entries] == entries
    assert [e.index for e in cls.entries] == list(range(len(entries)))
    assert letters(cls) == requires
    assert cls.is_write == any(e.is_write for e in cls.entries)
    for e, raw_entry in zip(cls.entries, b["entry"]):
        if e.interaction != "operation":
            assert e.is_write == LETTERS[e.interaction][0]
        assert (e.method, e.url) == (raw_entry["request"]["method"], raw_entry["request"]["url"])


def test_bundle_entry_letters_are_per_entry() -> None:
    cls = run_bundle(bundle("transaction", entry("PUT", "Observation/9", OBS_9),
                            entry("PUT", "Observation/10", {**OBS, "id": "10"}, ifMatch='W/"1"')))
    assert [letters(e.requires) for e in cls.entries] == [{"Observation": "cu"}, {"Observation": "u"}]


def test_bundle_write_operations_are_listed() -> None:
    cls = run_bundle(bundle("batch", entry("POST", "Patient/$merge", PARAMS), entry("GET", "Observation/1"),
                            entry("DELETE", "Observation/9/$meta")))
    assert cls.write_operations == ("$merge", "$meta")


def test_sidecar_base_in_entry_urls_is_rewritten_then_accepted() -> None:
    b = bundle("transaction", entry("DELETE", SIDECAR + "/Observation/9"))
    cls = run_bundle(b, sidecar_bases=(SIDECAR,), upstream_base=UPSTREAM)
    assert cls.entries[0].interaction == "delete" and cls.entries[0].url == UPSTREAM + "/Observation/9"


BAD_BUNDLES = [
    ("absolute-other-host", bundle("transaction", entry("DELETE", "https://evil.example/fhir/R4/Observation/9")), 403),
    ("absolute-sidecar-without-rewrite", bundle("transaction", entry("DELETE", SIDECAR + "/Observation/9")), 403),
    ("absolute-upstream-host-other-path", bundle("batch", entry("GET", "https://ehr.example.org/admin/Observation/9")),
     403),
    ("absolute-upstream-prefix-only", bundle("batch", entry("GET", UPSTREAM + "x/Observation/9")), 403),
    ("absolute-upstream-base-itself", bundle("batch", entry("GET", UPSTREAM)), 403),
    ("scheme-relative", bundle("batch", entry("GET", "//evil.example/fhir/R4/Observation/9")), 403),
    ("http-upstream", bundle("batch", entry("GET", "http://ehr.example.org/fhir/R4/Observation/9")), 403),
    ("method-unknown", bundle("batch", entry("PURGE", "Observation/9")), 403),
    ("method-lowercase", bundle("batch", entry("post", "Observation", OBS)), 403),
    ("method-missing", bundle("batch", {"request": {"url": "Observation/9"}}), 403),
    ("method-not-string", bundle("batch", {"request": {"method": 1, "url": "Observation/9"}}), 403),
    ("method-options", bundle("batch", entry("OPTIONS", "Observation/9")), 403),
    ("url-missing", bundle("batch", {"request": {"method": "GET"}}), 403),
    ("url-empty", bundle("batch", entry("GET", "")), 403),
    ("url-not-string", bundle("batch", {"request": {"method": "GET", "url": ["Observation/9"]}}), 403),
    ("nested-post-to-base-slash", bundle("transaction", entry("POST", "/", bundle("transaction"))), 403),
    ("entry-leading-slash", bundle("batch", entry("GET", "/Observation/9")), 403),
    ("entry-upstream-double-slash", bundle("batch", entry("GET", UPSTREAM + "//Observation/9")), 403),
    ("nested-post-to-base-query", bundle("transaction", entry("POST", "?", bundle("transaction"))), 403),
    ("nested-post-to-base-dot", bundle("transaction", entry("POST", ".", bundle("transaction"))), 403),
    ("nested-post-to-upstream-base", bundle("transaction", entry("POST", UPSTREAM + "/", bundle("batch"))), 403),
    ("nested-get-base", bundle("batch", entry("GET", "?_type=Patient")), 403),
    ("entry-metadata", bundle("batch", entry("GET", "metadata")), 403),
    ("entry-dot-dot", bundle("batch", entry("GET", "Observation/../Patient/1")), 403),
    ("entry-encoded-slash", bundle("batch", entry("GET", "Observation%2F9")), 403),
    ("entry-non-ascii", bundle("batch", entry("GET", "Observation/é")), 403),
    ("entry-invalid-utf8-escape", bundle("batch", entry("GET", "Observation/%FF")), 403),
    ("entry-newline", bundle("batch", entry("GET", "Observation/9\n")), 403),
    ("entry-query-newline-name", bundle("batch", entry("GET", "Observation?access_token\n=x")), 403),
    ("entry-access-token", bundle("batch", entry("GET", "Observation?access_token=x")), 403),
    ("entry-method-in-query", bundle("batch", entry("POST", "Observation/9?_method=DELETE")), 403),
    ("entry-cascade", bundle("transaction", entry("DELETE", "Observation/9?_cascade=delete")), 403),
    ("entry-lowercase-type", bundle("batch", entry("GET", "observation/9")), 403),
    ("entry-post-instance", bundle("transaction", entry("POST", "Observation/9", OBS_9)), 403),
    ("entry-if-none-exist-on-put", bundle("transaction", entry("PUT", "Observation/9", OBS_9, ifNoneExist="a=1")), 403),
    ("entry-no-request", bundle("batch", {"resource": OBS}), 400),
    ("entry-not-object", {"resourceType": "Bundle", "type": "batch", "entry": ["Observation/9"]}, 400),
    ("entries-not-array", {"resourceType": "Bundle", "type": "batch", "entry": {"request": {}}}, 400),
    ("entry-body-type-mismatch", bundle("transaction", entry("POST", "Observation", {"resourceType": "Patient"})), 400),
    ("entry-update-id-mismatch", bundle("transaction", entry("PUT", "Observation/9", {**OBS, "id": "8"})), 400),
    ("entry-update-id-missing", bundle("transaction", entry("PUT", "Observation/9", OBS)), 400),
    ("entry-delete-with-resource", bundle("transaction", entry("DELETE", "Observation/9", OBS_9)), 400),
    ("entry-get-with-resource", bundle("batch", entry("GET", "Observation/9", OBS_9)), 400),
    ("entry-patch-without-parameters", bundle("transaction", entry("PATCH", "Observation/9", OBS_9)), 400),
    ("entry-if-none-exist-not-string", bundle("transaction", entry("POST", "Observation", OBS, ifNoneExist=1)), 400),
]


@pytest.mark.parametrize(("b", "status"), [r[1:] for r in BAD_BUNDLES], ids=[r[0] for r in BAD_BUNDLES])
def test_bad_bundles(b: dict, status: int) -> None:
    with pytest.raises(Refusal) as info:
        run_bundle(b)
    assert info.value.status == status
    if any(isinstance(e, dict) and "request" in e for e in b.get("entry") or []) and status == 403:
        assert info.value.reason.startswith("Bundle entry 0")
