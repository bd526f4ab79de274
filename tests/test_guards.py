"""guards: scopes and validation on classified requests (pure; no network)."""

from __future__ import annotations

import json

import pytest

from sidecar.classify import classify
from sidecar.errors import Refusal
from sidecar.guards import check_scopes, check_valid
from sidecar.identity import ANONYMOUS, Principal
from sidecar.parse import parse_request
from sidecar.request import Classification, FhirRequest, RawRequest
from sidecar.scopes import ScopeSet

UPSTREAM = "https://ehr.example.org/fhir/R4"
P = "/fhir/R4"
FHIR_JSON = ("content-type", "application/fhir+json")
JSON_PATCH = ("content-type", "application/json-patch+json")
FORM = ("content-type", "application/x-www-form-urlencoded")
IF_MATCH = ("if-match", 'W/"1"')

OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
OBS_9 = {**OBS, "id": "9"}
PARAMS = {"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]}
PATCH_OPS = [{"op": "replace", "path": "/status", "value": "amended"}]
FHIRPATH_PATCH = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
    {"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.status"},
    {"name": "value", "valueCode": "amended"}]}]}


def request(method: str, target: str, headers=(), body: object = None) -> tuple[FhirRequest, Classification]:
    data = b"" if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = parse_request(RawRequest(method, target.encode(), tuple(headers), data), base_path=P,
                        max_body_bytes=1 << 20)
    return req, classify(req, upstream_base=UPSTREAM)


def who(*scopes: str, operations=(), conditional_writes: bool = False, contexts=("system",)) -> Principal:
    return Principal("app", "api-key", ScopeSet.from_strings(scopes), contexts,
                     operations=frozenset(operations), conditional_writes=conditional_writes)


def entry(method: str, url: str, resource: dict | None = None, **request_fields) -> dict:
    e: dict = {"request": {"method": method, "url": url, **request_fields}}
    if resource is not None:
        e["resource"] = resource
    return e


def bundle(btype: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


# --------------------------------------------------------------------------------------------
# check_scopes
# --------------------------------------------------------------------------------------------

CREATE = ("POST", f"{P}/Observation", [FHIR_JSON], OBS)
UPDATE_IF_MATCH = ("PUT", f"{P}/Observation/9", [FHIR_JSON, IF_MATCH], OBS_9)
UPDATE = ("PUT", f"{P}/Observation/9", [FHIR_JSON], OBS_9)
READ = ("GET", f"{P}/Observation/9", [], None)
SEARCH = ("GET", f"{P}/Observation?code=x", [], None)
SEARCH_INCLUDE = ("GET", f"{P}/Observation?_include=Observation:subject:Patient", [], None)
DELETE = ("DELETE", f"{P}/Observation/9", [], None)
PATCH = ("PATCH", f"{P}/Observation/9", [JSON_PATCH], PATCH_OPS)
CREATE_COND = ("POST", f"{P}/Observation", [FHIR_JSON, ("if-none-exist", "identifier=a|1")], OBS)
UPDATE_COND = ("PUT", f"{P}/Observation?identifier=a|1", [FHIR_JSON], OBS)
PATCH_COND = ("PATCH", f"{P}/Observation?identifier=a|1", [JSON_PATCH], PATCH_OPS)
DELETE_COND = ("DELETE", f"{P}/Observation?identifier=a|1", [], None)
MERGE = ("POST", f"{P}/Patient/$merge", [FHIR_JSON], PARAMS)
EVERYTHING = ("GET", f"{P}/Patient/1/$everything", [], None)
META_ADD = ("POST", f"{P}/Observation/9/$meta-add", [FHIR_JSON], PARAMS)
GRAPHQL = ("GET", f"{P}/$graphql?query=%7BPatientList%7Bid%7D%7D", [], None)
METADATA = ("GET", f"{P}/metadata", [], None)
DISCOVERY = ("GET", f"{P}/.well-known/smart-configuration", [], None)
SYSTEM_SEARCH = ("GET", f"{P}?_type=Observation,Patient", [], None)
SYSTEM_SEARCH_ANY = ("GET", f"{P}?_lastUpdated=gt2020", [], None)
COMPARTMENT = ("GET", f"{P}/Patient/1/Observation", [], None)
BATCH_MIXED = ("POST", P, [FHIR_JSON], bundle("batch", entry("GET", "Patient/1"), entry("POST", "Observation", OBS)))
BATCH_MERGE = ("POST", P, [FHIR_JSON], bundle("batch", entry("POST", "Patient/$merge", PARAMS)))
BATCH_COND = ("POST", P, [FHIR_JSON], bundle("transaction", entry("DELETE", "Observation?identifier=a|1")))

SCOPE_CASES = [
    # id, principal, request, allowed
    ("c-allows-create", who("system/Observation.c"), CREATE, True),
    ("c-not-update-with-if-match", who("system/Observation.c"), UPDATE_IF_MATCH, False),
    ("c-not-update", who("system/Observation.c"), UPDATE, False),
    ("c-not-read", who("system/Observation.c"), READ, False),
    ("c-not-delete", who("system/Observation.c"), DELETE, False),
    ("u-allows-update-with-if-match", who("system/Observation.u"), UPDATE_IF_MATCH, True),
    ("u-not-update-without-if-match", who("system/Observation.u"), UPDATE, False),
    ("cu-allows-update-without-if-match", who("system/Observation.cu"), UPDATE, True),
    ("u-allows-patch", who("system/Observation.u"), PATCH, True),
    ("c-not-patch", who("system/Observation.c"), PATCH, False),
    ("d-allows-delete", who("system/Observation.d"), DELETE, True),
    ("r-allows-read", who("system/Observation.r"), READ, True),
    ("r-not-search", who("system/Observation.r"), SEARCH, False),
    ("s-allows-search", who("system/Observation.s"), SEARCH, True),
    ("s-not-include-target", who("system/Observation.s"), SEARCH_INCLUDE, False),
    ("s-plus-r-on-include", who("system/Observation.s", "system/Patient.r"), SEARCH_INCLUDE, True),
    ("other-type", who("system/Patient.cruds"), CREATE, False),
    ("star-type-all", who("system/*.cruds"), CREATE, True),
    ("star-type-update", who("system/*.cruds"), UPDATE, True),
    ("star-type-read-only-not-create", who("system/*.rs"), CREATE, False),
    ("v1-write", who("system/Observation.write"), UPDATE, True),
    ("v1-read-not-write", who("system/Observation.read"), UPDATE, False),
    ("v1-star", who("system/*.*"), DELETE, True),
    ("system-search-per-type", who("system/Observation.s", "system/Patient.s"), SYSTEM_SEARCH, True),
    ("system-search-missing-one-type", who("system/Observation.s"), SYSTEM_SEARCH, False),
    ("system-search-any-needs-star", who("system/Observation.s", "system/Patient.s"), SYSTEM_SEARCH_ANY, False),
    ("system-search-any-star", who("system/*.s"), SYSTEM_SEARCH_ANY, True),
    ("compartment", who("system/Observation.s"), COMPARTMENT, True),
    ("everything-needs-star", who("system/Patient.rs"), EVERYTHING, False),
    ("everything-star", who("system/*.rs"), EVERYTHING, True),
    ("graphql-needs-star-rs", who("system/*.s"), GRAPHQL, False),
    ("graphql-star-rs", who("system/*.rs"), GRAPHQL, True),
    ("patient-context-is-not-system", who("patient/Observation.cruds"), CREATE, False),
    ("user-context-is-not-system", who("user/Observation.cruds"), CREATE, False),
    ("patient-context-principal", who("patient/Observation.c", contexts=("patient",)), CREATE, True),
    ("qualified-scope-grants-nothing", who("system/Observation.rs?category=laboratory"), READ, False),
    ("no-scopes", who(), READ, False),
    # write operations: named in `operations`, no scope letter lets them through
    ("write-op-not-enabled", who("system/*.cruds"), MERGE, False),
    ("write-op-enabled", who("system/*.cruds", operations=["$merge"]), MERGE, True),
    ("write-op-enabled-other", who("system/*.cruds", operations=["$merge"]), META_ADD, False),
    ("write-op-enabled-no-scopes", who(operations=["$meta-add"]), META_ADD, True),
    ("read-op-needs-no-enabling", who("system/*.rs"), EVERYTHING, True),
    # conditional writes
    ("conditional-update-gated", who("system/Observation.cus"), UPDATE_COND, False),
    ("conditional-update-enabled", who("system/Observation.cus", conditional_writes=True), UPDATE_COND, True),
    ("conditional-update-needs-s", who("system/Observation.cu", conditional_writes=True), UPDATE_COND, False),
    ("conditional-update-needs-c", who("system/Observation.us", conditional_writes=True), UPDATE_COND, False),
    ("conditional-patch-gated", who("system/Observation.us"), PATCH_COND, False),
    ("conditional-patch-enabled", who("system/Observation.us", conditional_writes=True), PATCH_COND, True),
    ("conditional-delete-gated", who("system/Observation.ds"), DELETE_COND, False),
    ("conditional-delete-enabled", who("system/Observation.ds", conditional_writes=True), DELETE_COND, True),
    ("conditional-delete-needs-s", who("system/Observation.d", conditional_writes=True), DELETE_COND, False),
    ("create-conditional-not-gated", who("system/Observation.cs"), CREATE_COND, True),
    ("create-conditional-needs-s", who("system/Observation.c"), CREATE_COND, False),
    # public and anonymous
    ("capabilities-anonymous", ANONYMOUS, METADATA, True),
    ("discovery-anonymous", ANONYMOUS, DISCOVERY, True),
    ("anonymous-read", ANONYMOUS, READ, False),
    ("anonymous-search-system", ANONYMOUS, SYSTEM_SEARCH_ANY, False),
    # bundles: every entry's requirements, operations and conditionals
    ("batch-all-entries-granted", who("system/Patient.r", "system/Observation.c"), BATCH_MIXED, True),
    ("batch-one-entry-missing", who("system/Observation.c"), BATCH_MIXED, False),
    ("batch-write-op-not-enabled", who("system/*.cruds"), BATCH_MERGE, False),
    ("batch-write-op-enabled", who("system/*.cruds", operations=["$merge"]), BATCH_MERGE, True),
    ("batch-conditional-gated", who("system/*.cruds"), BATCH_COND, False),
    ("batch-conditional-enabled", who("system/*.cruds", conditional_writes=True), BATCH_COND, True),
]


@pytest.mark.parametrize(("principal", "req", "allowed"), [c[1:] for c in SCOPE_CASES], ids=[c[0] for c in SCOPE_CASES])
def test_check_scopes(principal: Principal, req: tuple, allowed: bool) -> None:
    _, cls = request(*req)
    if allowed:
        check_scopes(cls, principal)
    else:
        with pytest.raises(Refusal) as info:
            check_scopes(cls, principal)
        assert (info.value.status, info.value.code) == (403, "forbidden")


@pytest.mark.parametrize(
    ("principal", "req", "reason"),
    [
        (who("system/Observation.u"), UPDATE, "scope does not grant 'c' on Observation for update"),
        (who("system/Observation.c"), UPDATE_IF_MATCH, "scope does not grant 'u' on Observation for update"),
        (who("system/Observation.s"), SEARCH_INCLUDE, "scope does not grant 'r' on Patient for search-type"),
        (who("system/Patient.rs"), EVERYTHING, "scope does not grant 'rs' on any type for operation"),
        (who("system/*.cruds"), MERGE, "write operation $merge is not enabled for this client"),
        (who("system/*.cruds"), UPDATE_COND, "conditional writes are not enabled for this client"),
    ],
)
def test_check_scopes_reason(principal: Principal, req: tuple, reason: str) -> None:
    _, cls = request(*req)
    with pytest.raises(Refusal) as info:
        check_scopes(cls, principal)
    assert info.value.reason == reason


# --------------------------------------------------------------------------------------------
# check_valid
# --------------------------------------------------------------------------------------------

VALID = [
    ("create", CREATE),
    ("update", UPDATE),
    ("patch-json-patch", PATCH),
    ("patch-json-patch-all-ops", ("PATCH", f"{P}/Observation/9", [JSON_PATCH], [
        {"op": "test", "path": "/status", "value": "final"},
        {"op": "add", "path": "/note", "value": [{"text": "n"}]},
        {"op": "remove", "path": "/note/0"},
        {"op": "copy", "from": "/status", "path": "/x"},
        {"op": "move", "from": "/x", "path": "/y"},
        {"op": "replace", "path": "/a~1b~0c", "value": 1}])),
    ("patch-fhirpath", ("PATCH", f"{P}/Observation/9", [FHIR_JSON], FHIRPATH_PATCH)),
    ("delete", DELETE),
    ("write-op-parameters", MERGE),
    ("write-op-delete-no-body", ("DELETE", f"{P}/Observation/9/$meta", [], None)),
    ("transaction", ("POST", P, [FHIR_JSON], bundle("transaction", entry("POST", "Observation", OBS),
                                                    entry("DELETE", "Observation/1")))),
    ("read-is-not-validated", READ),
    ("search-form-is-not-validated", ("POST", f"{P}/Observation/_search", [FORM], "code=x")),
    ("read-only-op-is-not-validated", ("POST", f"{P}/Observation/$validate", [FHIR_JSON],
                                       {"resourceType": "Observation"})),
    ("read-only-batch-is-not-validated", ("POST", P, [FHIR_JSON], bundle("batch", entry("GET", "Observation/1")))),
]


@pytest.mark.parametrize("req", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_check_valid_passes(req: tuple) -> None:
    check_valid(*request(*req))


INVALID = [
    # id, request, status, code, text in the reason
    ("missing-required", ("POST", f"{P}/Observation", [FHIR_JSON], {"resourceType": "Observation",
                                                                    "code": {"text": "x"}}),
     400, "invalid", "Observation.status"),
    ("unknown-element", ("POST", f"{P}/Observation", [FHIR_JSON], {**OBS, "foo": 1}),
     400, "structure", "Observation.foo"),
    ("wrong-json-type", ("POST", f"{P}/Observation", [FHIR_JSON],
                         {**OBS, "code": {"coding": [{"system": 1}]}}),
     400, "structure", "Observation.code.coding[0].system"),
    ("empty-string", ("PUT", f"{P}/Observation/9", [FHIR_JSON], {**OBS_9, "status": ""}),
     400, "structure", "Observation.status"),
    ("null-value", ("PUT", f"{P}/Observation/9", [FHIR_JSON], {**OBS_9, "issued": None}),
     400, "structure", "Observation.issued"),
    ("bad-required-binding", ("POST", f"{P}/Patient", [FHIR_JSON], {"resourceType": "Patient", "gender": "x"}),
     400, "invalid", "Patient.gender"),
    ("r4-type-without-r4b-model", ("POST", f"{P}/MedicinalProduct", [FHIR_JSON],
                                   {"resourceType": "MedicinalProduct"}),
     403, "not-supported", "without faithful validation"),
    ("r4b-incompatible-type", ("PUT", f"{P}/Evidence/1", [FHIR_JSON], {"resourceType": "Evidence", "id": "1"}),
     403, "not-supported", "without faithful validation"),
    ("unsupported-contained", ("POST", f"{P}/Observation", [FHIR_JSON],
                               {**OBS, "contained": [{"resourceType": "MedicinalProduct", "id": "m"}]}),
     403, "not-supported", "Observation.contained[0]"),
    ("json-patch-unknown-op", ("PATCH", f"{P}/Observation/9", [JSON_PATCH], [{"op": "frob", "path": "/status"}]),
     400, "invalid", "patch[0].op"),
    ("json-patch-missing-value", ("PATCH", f"{P}/Observation/9", [JSON_PATCH], [{"op": "add", "path": "/status"}]),
     400, "structure", "patch[0].value"),
    ("json-patch-bad-pointer", ("PATCH", f"{P}/Observation/9", [JSON_PATCH],
                                [{"op": "remove", "path": "status"}]),
     400, "invalid", "patch[0].path"),
    ("json-patch-bad-escape", ("PATCH", f"{P}/Observation/9", [JSON_PATCH],
                               [{"op": "remove", "path": "/a~2"}]),
     400, "invalid", "patch[0].path"),
    ("json-patch-move-without-from", ("PATCH", f"{P}/Observation/9", [JSON_PATCH],
                                      [{"op": "move", "path": "/a"}]),
     400, "invalid", "patch[0].from"),
    ("json-patch-extra-member", ("PATCH", f"{P}/Observation/9", [JSON_PATCH],
                                 [{"op": "remove", "path": "/status", "value": 1}]),
     400, "structure", "patch[0]"),
    ("json-patch-empty", ("PATCH", f"{P}/Observation/9", [JSON_PATCH], []),
     400, "structure", "non-empty"),
    ("json-patch-not-objects", ("PATCH", f"{P}/Observation/9", [JSON_PATCH], ["remove"]),
     400, "structure", "patch[0]"),
    ("json-patch-on-unsupported-type", ("PATCH", f"{P}/MedicinalProduct/1", [JSON_PATCH], PATCH_OPS),
     403, "not-supported", "not supported"),
    ("fhirpath-patch-on-unsupported-type", ("PATCH", f"{P}/MedicinalProduct/1", [FHIR_JSON], FHIRPATH_PATCH),
     403, "not-supported", "not supported"),
    ("conditional-patch-on-unsupported-type", ("PATCH", f"{P}/MedicinalProduct?identifier=a|1", [JSON_PATCH],
                                               PATCH_OPS),
     403, "not-supported", "not supported"),
    ("fhirpath-patch-invalid-parameters", ("PATCH", f"{P}/Observation/9", [FHIR_JSON],
                                           {"resourceType": "Parameters", "parameter": []}),
     400, "structure", "Parameters.parameter"),
    ("bundle-entry-invalid", ("POST", P, [FHIR_JSON], bundle("transaction", entry("POST", "Observation", {
        "resourceType": "Observation", "code": {"text": "x"}}))),
     400, "invalid", "Bundle.entry[0].resource.status"),
    ("bundle-entry-unsupported-type", ("POST", P, [FHIR_JSON], bundle("transaction", entry(
        "POST", "MedicinalProduct", {"resourceType": "MedicinalProduct"}))),
     403, "not-supported", "Bundle.entry[0].resource"),
    ("bundle-patch-entry-on-unsupported-type", ("POST", P, [FHIR_JSON], bundle("transaction", entry(
        "PATCH", "MedicinalProduct/1", FHIRPATH_PATCH))),
     403, "not-supported", "Bundle entry 0"),
    ("write-op-invalid-body", ("POST", f"{P}/Patient/$merge", [FHIR_JSON], {"resourceType": "Parameters", "x": 1}),
     400, "structure", "Parameters.x"),
    ("write-op-without-body", ("POST", f"{P}/Patient/$merge", [], None), 400, "invalid", "needs a body"),
]


@pytest.mark.parametrize(("req", "status", "code", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_check_valid_refuses(req: tuple, status: int, code: str, text: str) -> None:
    r, cls = request(*req)
    with pytest.raises(Refusal) as info:
        check_valid(r, cls)
    assert (info.value.status, info.value.code) == (status, code)
    assert text in info.value.reason


def test_validation_reason_never_echoes_values() -> None:
    secret = "PATIENT-NAME-Zq9"
    r, cls = request("POST", f"{P}/Observation", [FHIR_JSON], {**OBS, "status": secret, secret: 1})
    with pytest.raises(Refusal) as info:
        check_valid(r, cls)
    assert secret not in info.value.reason
