"""Decision table for the starter policy (policies/): every rule, both ways, with the exact decision.

The same inputs drive the engine-parity tests (tests/test_policy_parity.py): the embedded engine
and a real OPA must give these whole decisions. `VARIANT_*` run against a copy of the policy
directory whose data changes a few settings, to reach the rules the shipped data keeps quiet.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.policy.embedded import EmbeddedPolicy

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
TENANT = "https://fhir-sidecar.dev/CodeSystem/tenant"
NOON = "2026-11-25T13:00:00Z"  # a Wednesday

ALLOW = {"allow": True, "reasons": [], "review": False}


def deny(*reasons: str) -> dict[str, Any]:
    return {"allow": False, "reasons": sorted(reasons), "review": False}


def review(*reasons: str) -> dict[str, Any]:
    return {"allow": False, "reasons": sorted(reasons), "review": True}


# ---- input builders (the shape of sidecar.policy.input.build_input) --------------------------

def client(cid: str | None, tenant: str | None = "t1", scopes: list[str] | None = None) -> dict[str, Any]:
    return {"id": cid, "tenant": tenant, "scopes": scopes or [], "patient": None, "user": None, "auth": "api-key"}


def request(method: str, interaction: str, rtype: str | None, rid: str | None = None, *,
            headers: dict[str, str] | None = None, operation: str | None = None, write: bool = True,
            query: dict[str, list[str]] | None = None) -> dict[str, Any]:
    path = "/" + "/".join(x for x in (rtype, rid, operation) if x)
    return {"method": method, "path": path, "interaction": interaction, "resource_type": rtype, "id": rid,
            "operation": operation, "conditional": interaction.endswith("-conditional"), "query": query or {},
            "headers": headers or {}, "write": write}


def context(time: str = NOON, approvals: list[str] | None = None) -> dict[str, Any]:
    return {"time": time, "shadow": False, "approvals": approvals or []}


def tagged(resource: dict[str, Any], *tenants: str) -> dict[str, Any]:
    r = copy.deepcopy(resource)
    r.setdefault("meta", {})["tag"] = [{"system": TENANT, "code": t} for t in tenants]
    return r


def doc(cl: dict[str, Any], req: dict[str, Any], resource: Any = None, current: Any = "-",
        ctx: dict[str, Any] | None = None, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"client": cl, "request": req, "context": ctx or context()}
    if resource is not None:
        d["resource"] = resource
    if current != "-":
        d["current"] = current
    if entries is not None:
        d["entries"] = entries
    return d


def prov(who: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    return json.dumps({"resourceType": "Provenance", "target": targets, "agent": [{"who": who}],
                       "recorded": "2026-11-25T13:00:00Z"})


OBS = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
       "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 72, "unit": "/min"}}
OBS9 = {**OBS, "id": "9"}
MR = {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/p1"},
      "medicationCodeableConcept": {"text": "amoxicillin"}}


def docref(status: str | None, rid: str | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "DocumentReference", "status": "current", "content": [{"attachment": {"contentType": "text/plain"}}]}
    if status is not None:
        r["docStatus"] = status
    if rid:
        r["id"] = rid
    return tagged(r, "t1")


WRITER = client("demo-writer", "demo-clinic", ["system/Observation.cruds"])
SCRIBE = client("scribe-app", "t1", ["user/Observation.cru", "user/DocumentReference.cru"])
LAB_SCOPES = ["system/Observation.c", "system/Provenance.c"]
LAB = client("legacy-lab-feed", "lab", LAB_SCOPES)
BOT = client("refill-bot", "t1", ["system/MedicationRequest.cu", "system/Provenance.c"])
WARD = client("ward-app", "t1", ["user/MedicationRequest.cru", "user/AllergyIntolerance.cru"])
LAB_AGENT = {"reference": "Device/legacy-lab-feed"}
BOT_AGENT = {"identifier": {"system": "https://fhir-sidecar.dev/clients", "value": "refill-bot"}}


def lab_create(header: str | None, scopes: list[str] = LAB_SCOPES, resource: dict[str, Any] | None = None) -> dict[str, Any]:
    h = {"x-provenance": header} if header is not None else {}
    return doc(client("legacy-lab-feed", "lab", scopes), request("POST", "create", "Observation", headers=h),
               resource or tagged(OBS, "lab"))


def lab_update(frm: str, to: str, header: str | None = None) -> dict[str, Any]:
    h = header if header is not None else prov(LAB_AGENT, [{"reference": "Observation/9/_history/2"}])
    return doc(LAB, request("PUT", "update", "Observation", "9", headers={"x-provenance": h}),
               tagged({**OBS9, "status": to}, "lab"), tagged({**OBS9, "status": frm}, "lab"))


def bot_write(ctx: dict[str, Any], header: str | None = None, interaction: str = "create",
              rid: str | None = None, query: dict[str, list[str]] | None = None) -> dict[str, Any]:
    h = header if header is not None else prov(BOT_AGENT, [{"type": "MedicationRequest"}] if rid is None
                                                 else [{"reference": f"MedicationRequest/{rid}"}])
    method = "POST" if interaction.startswith("create") else "PUT"
    resource = tagged({**MR, **({"id": rid} if rid else {})}, "t1")
    current = tagged({**MR, "id": rid}, "t1") if interaction.startswith("update") else "-"
    return doc(BOT, request(method, interaction, "MedicationRequest", rid, headers={"x-provenance": h}, query=query),
               resource, current, ctx)


def ward_write(rtype: str, ctx: dict[str, Any], resource: dict[str, Any] | None = None) -> dict[str, Any]:
    return doc(WARD, request("POST", "create", rtype), resource or tagged({"resourceType": rtype, "status": "active"}, "t1"),
               ctx=ctx)


def entry(method: str, interaction: str, resource: dict[str, Any] | None, rid: str | None = None,
          write: bool = True) -> dict[str, Any]:
    rtype = (resource or {}).get("resourceType", "Observation")
    e: dict[str, Any] = {"request": request(method, interaction, rtype, rid, write=write)}
    if resource is not None:
        e["resource"] = resource
    return e


def bundle(cl: dict[str, Any], entries: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    writes = any(e["request"]["write"] for e in entries)
    return doc(cl, request("POST", kind, None, write=writes), {"resourceType": "Bundle", "type": kind}, entries=entries)


# ---- the table ---------------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # who may write what
    ("writer creates an Observation", doc(WRITER, request("POST", "create", "Observation"), OBS), ALLOW),
    ("writer updates an Observation", doc(WRITER, request("PUT", "update", "Observation", "9"), OBS9), ALLOW),
    ("writer deletes an Observation", doc(WRITER, request("DELETE", "delete", "Observation", "9")), ALLOW),
    ("writer creates a Condition", doc(WRITER, request("POST", "create", "Condition"), {"resourceType": "Condition"}), ALLOW),
    ("writer may not write MedicationRequest", doc(WRITER, request("POST", "create", "MedicationRequest"), MR),
     deny("MedicationRequest writes are not allowed for client demo-writer")),
    ("reader writes nothing", doc(client("demo-reader"), request("POST", "create", "Observation"), OBS),
     deny("Observation writes are not allowed for client demo-reader")),
    ("unknown client", doc(client("shadow-app"), request("POST", "create", "Observation"), OBS),
     deny("client has no policy entry")),
    ("client without id", doc(client(None), request("POST", "create", "Observation"), OBS),
     deny("client has no policy entry")),
    ("operation not listed ($meta-add for scribe-app)",
     doc(SCRIBE, request("POST", "operation", "Observation", "1", operation="$meta-add"), {"resourceType": "Parameters"}),
     deny("operation $meta-add is not allowed by policy for client scribe-app")),
    ("operation listed ($apply for ward-app)",
     doc(WARD, request("POST", "operation", "CarePlan", "c1", operation="$apply"), {"resourceType": "Parameters"}), ALLOW),
    ("conditional update refused", doc(WRITER, request("PUT", "update-conditional", "Observation", query={"identifier": ["x"]}), OBS),
     deny("update-conditional is not allowed for client demo-writer")),
    ("conditional create refused", doc(WRITER, request("POST", "create-conditional", "Observation"), OBS),
     deny("create-conditional is not allowed for client demo-writer")),
    ("conditional update allowed by data (refill-bot)",
     bot_write(context(approvals=["Practitioner/7"]), interaction="update-conditional", query={"identifier": ["rx-1"]},
               header=prov(BOT_AGENT, [{"type": "MedicationRequest"}])), ALLOW),
    ("transaction: every entry checked",
     bundle(WRITER, [entry("POST", "create", OBS), entry("PUT", "update", OBS9, "9"), entry("DELETE", "delete", None, "3")]), ALLOW),
    ("transaction: a denied entry denies the whole",
     bundle(WRITER, [entry("POST", "create", OBS), entry("POST", "create", {"resourceType": "Basic"})]),
     deny("Basic writes are not allowed for client demo-writer")),
    ("batch of reads only", bundle(WRITER, [entry("GET", "read", None, "1", write=False)], "batch"), ALLOW),
    ("writing request with no readable writes", doc(WRITER, request("POST", "transaction", None), {"resourceType": "Bundle"}, entries=[]),
     deny("the writes of this request could not be read")),
    # what content rules need
    ("patch without its result", doc(SCRIBE, request("PATCH", "patch", "Observation", "9"), {"resourceType": "Parameters"}, tagged(OBS9, "t1")),
     deny("the resulting Observation is not available to policy")),
    ("patch with its result", doc(SCRIBE, request("PATCH", "patch", "Observation", "9"), tagged(OBS9, "t1"), tagged(OBS9, "t1")), ALLOW),
    ("update without the stored version", doc(SCRIBE, request("PUT", "update", "Observation", "9"), tagged(OBS9, "t1")),
     deny("the stored version of Observation/9 was not provided to policy")),
    ("update with the stored version", doc(SCRIBE, request("PUT", "update", "Observation", "9"), tagged(OBS9, "t1"), tagged(OBS9, "t1")), ALLOW),
    ("update that creates (no stored version)", doc(SCRIBE, request("PUT", "update", "Observation", "9"), tagged(OBS9, "t1"), None), ALLOW),
    # fields
    ("denied field is named", doc(SCRIBE, request("POST", "create", "Observation"), tagged({**OBS, "extension": [{"url": "u", "valueString": "v"}]}, "t1")),
     deny("Observation.extension is not allowed for client scribe-app")),
    ("denied nested field", doc(SCRIBE, request("POST", "create", "Observation"),
                                {**tagged(OBS, "t1"), "meta": {"security": [{"code": "R"}], "tag": [{"system": TENANT, "code": "t1"}]}}),
     deny("Observation.meta.security is not allowed for client scribe-app")),
    ("denied field inside an array", ward_write("MedicationRequest", context(), tagged({**MR, "substitution": {"allowedBoolean": True, "extension": [{"url": "u"}]}}, "t1")),
     deny("MedicationRequest.substitution.extension is not allowed for client ward-app")),
    ("extension elsewhere is fine", ward_write("MedicationRequest", context(), tagged({**MR, "extension": [{"url": "u"}]}, "t1")), ALLOW),
    ("allow list: unlisted elements", doc(SCRIBE, request("POST", "create", "DocumentReference"), {**docref("preliminary"), "securityLabel": [], "extension": []}),
     deny("DocumentReference.extension is not allowed for client scribe-app", "DocumentReference.securityLabel is not allowed for client scribe-app")),
    ("allow list: unprintable element name", doc(SCRIBE, request("POST", "create", "DocumentReference"), {**docref("preliminary"), 'a"b': 1}),
     deny("DocumentReference.(unprintable value) is not allowed for client scribe-app")),
    # status
    ("drafting client writes preliminary", doc(SCRIBE, request("POST", "create", "DocumentReference"), docref("preliminary")), ALLOW),
    ("drafting client may not write final", doc(SCRIBE, request("POST", "create", "DocumentReference"), docref("final")),
     deny("DocumentReference.docStatus final is not allowed for client scribe-app (allowed: preliminary)")),
    ("drafting client must set docStatus", doc(SCRIBE, request("POST", "create", "DocumentReference"), docref(None)),
     deny("DocumentReference.docStatus absent is not allowed for client scribe-app (allowed: preliminary)")),
    ("drafting client may not change a final document",
     doc(SCRIBE, request("PUT", "update", "DocumentReference", "d1"), docref("preliminary", "d1"), docref("final", "d1")),
     deny("DocumentReference/d1 is docStatus final and may not be changed by client scribe-app")),
    ("drafting client may change a preliminary document",
     doc(SCRIBE, request("PUT", "update", "DocumentReference", "d1"), docref("preliminary", "d1"), docref("preliminary", "d1")), ALLOW),
    ("drafting client may not delete a final document",
     doc(SCRIBE, request("DELETE", "delete", "DocumentReference", "d1"), None, docref("final", "d1")),
     deny("DocumentReference/d1 is docStatus final and may not be changed by client scribe-app")),
    ("transition preliminary -> final", lab_update("preliminary", "final"), ALLOW),
    ("transition final -> amended", lab_update("final", "amended"), ALLOW),
    ("transition final -> preliminary", lab_update("final", "preliminary"),
     deny("Observation/9.status may not go from final to preliminary for client legacy-lab-feed")),
    ("locked entered-in-error", lab_update("entered-in-error", "final"),
     deny("Observation/9 is status entered-in-error and may not be changed by client legacy-lab-feed",
          "Observation/9.status may not go from entered-in-error to final for client legacy-lab-feed")),
    # tenancy
    ("result untagged", doc(SCRIBE, request("POST", "create", "Observation"), OBS),
     deny("the resulting Observation is not tagged with tenant t1")),
    ("result of another tenant", doc(SCRIBE, request("POST", "create", "Observation"), tagged(OBS, "t2")),
     deny("the resulting Observation is tagged with a tenant other than t1")),
    ("result tagged with two tenants", doc(SCRIBE, request("POST", "create", "Observation"), tagged(OBS, "t1", "t2")),
     deny("the resulting Observation is tagged with a tenant other than t1")),
    ("stored version of another tenant (result re-tagged)",
     doc(SCRIBE, request("PUT", "update", "Observation", "9"), tagged(OBS9, "t1"), tagged(OBS9, "t2")),
     deny("the stored Observation/9 belongs to another tenant")),
    ("stored version untagged", doc(SCRIBE, request("PUT", "update", "Observation", "9"), tagged(OBS9, "t1"), OBS9),
     deny("the stored Observation/9 is not tagged with tenant t1")),
    ("delete of another tenant's resource", doc(SCRIBE, request("DELETE", "delete", "Observation", "9"), None, tagged(OBS9, "t2")),
     deny("the stored Observation/9 belongs to another tenant")),
    ("delete of own resource", doc(SCRIBE, request("DELETE", "delete", "Observation", "9"), None, tagged(OBS9, "t1")), ALLOW),
    ("bound client without tenant", doc(client("scribe-app", None), request("POST", "create", "Observation"), tagged(OBS, "t1")),
     deny("client scribe-app has no tenant (tenant boundary)", "the resulting Observation is tagged with a tenant other than absent")),
    ("entries: tenant per entry",
     bundle(SCRIBE, [entry("POST", "create", tagged(OBS, "t1")), entry("POST", "create", tagged(OBS, "t2"))]),
     deny("entry 1: the resulting Observation is tagged with a tenant other than t1")),
    # provenance
    ("automated create with provenance", lab_create(prov(LAB_AGENT, [{"type": "Observation"}])), ALLOW),
    ("automated create with any create scope", lab_create(prov(LAB_AGENT, [{"type": "Observation"}]), ["system/*.cruds"]), ALLOW),
    ("provenance header missing", lab_create(None),
     deny("X-Provenance header is required for automated client legacy-lab-feed")),
    ("provenance not JSON", lab_create("{not json"), deny("X-Provenance is not valid JSON")),
    ("provenance of another type", lab_create(json.dumps({"resourceType": "AuditEvent"})),
     deny("X-Provenance is not a Provenance resource")),
    ("provenance agent is someone else", lab_create(prov({"reference": "Device/other"}, [{"type": "Observation"}])),
     deny("X-Provenance agent does not name client legacy-lab-feed")),
    ("provenance targets another type", lab_create(prov(LAB_AGENT, [{"type": "Patient"}])),
     deny("X-Provenance does not target Observation (no id)")),
    ("provenance targets another id", lab_update("final", "amended", prov(LAB_AGENT, [{"reference": "Observation/10"}])),
     deny("X-Provenance does not target Observation/9")),
    ("provenance needs a create scope", lab_create(prov(LAB_AGENT, [{"type": "Observation"}]), ["system/Observation.c", "system/Provenance.rs"]),
     deny("client legacy-lab-feed needs a Provenance create scope to send X-Provenance")),
    ("provenance agent by identifier", bot_write(context(approvals=["Practitioner/7"])), ALLOW),
    # review
    ("high-impact write held", bot_write(context()), review("MedicationRequest is a high-impact write and needs review")),
    ("high-impact update held", bot_write(context(), interaction="update", rid="rx1"),
     review("MedicationRequest is a high-impact write and needs review")),
    ("deny wins over review", bot_write(context(), header="{"), deny("X-Provenance is not valid JSON")),
    ("interactive client, business hours", ward_write("MedicationRequest", context()), ALLOW),
    ("after hours held", ward_write("MedicationRequest", context("2026-11-25T22:30:00Z")),
     review("MedicationRequest writes outside business hours need review")),
    ("after hours approved", ward_write("MedicationRequest", context("2026-11-25T22:30:00Z", ["Practitioner/7"])), ALLOW),
    ("after hours, first minute", ward_write("AllergyIntolerance", context("2026-11-25T07:00:00Z")), ALLOW),
    ("after hours, closing minute", ward_write("AllergyIntolerance", context("2026-11-25T19:00:00Z")),
     review("AllergyIntolerance writes outside business hours need review")),
    ("weekend held", ward_write("AllergyIntolerance", context("2026-11-29T13:00:00Z")),
     review("AllergyIntolerance writes outside business hours need review")),
    ("leap day weekday", ward_write("AllergyIntolerance", context("2024-02-29T13:00:00.250Z")), ALLOW),
    ("unreadable time held", ward_write("AllergyIntolerance", context("2026-11-25T13:00:00+01:00")),
     review("AllergyIntolerance writes outside business hours need review")),
    ("other types are not held after hours", ward_write("Observation", context("2026-11-29T23:00:00Z"),
                                                        tagged({"resourceType": "Observation", "status": "final"}, "t1")), ALLOW),
]

# A copy of policies/ whose data changes these settings (tests/test_policy_parity.py writes it).
VARIANT_SETTINGS: dict[str, Any] = {
    "tenancy": {},
    "review": {
        "high_impact": {"types": ["MedicationRequest"], "automated_only": False},
        "after_hours": {"types": ["AllergyIntolerance"], "start": "07:00", "end": "19:00", "utc_offset_minutes": 60,
                        "days": ["Mon", "Tue", "Wed", "Thu", "Fri"]},
    },
}
VARIANT_CLIENT_CHANGES: dict[str, Any] = {
    "legacy-lab-feed": {"write_types": ["Observation"], "automated": True, "tenant_boundary": False},
    "ward-app": {"write_types": ["MedicationRequest", "AllergyIntolerance", "Observation"], "tenant_boundary": False,
                 "fields": {"MedicationRequest": {"deny": ["dosageInstruction.doseAndRate.extension"]},
                            "Observation": {"deny": ["a.b.c.d.e"]}}},
}

VARIANT_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("tenant system not configured", doc(SCRIBE, request("POST", "create", "Observation"), tagged(OBS, "t1")),
     deny("tenancy.tag_system is not configured (tenant boundary)", "the resulting Observation is not tagged with tenant t1")),
    ("automated client without a configured agent", lab_create(prov(LAB_AGENT, [{"type": "Observation"}]), resource=OBS),
     deny("no provenance agent is configured for automated client legacy-lab-feed")),
    ("high impact for every client", ward_write("MedicationRequest", context(), MR),
     review("MedicationRequest is a high-impact write and needs review")),
    ("high impact for every client, approved", ward_write("MedicationRequest", context(approvals=["Practitioner/7"]), MR), ALLOW),
    ("four-step field path", ward_write("MedicationRequest", context(), {**MR, "dosageInstruction": [{"doseAndRate": [{"extension": [{"url": "u"}]}]}]}),
     deny("MedicationRequest.dosageInstruction.doseAndRate.extension is not allowed for client ward-app")),
    ("four-step field path absent", ward_write("MedicationRequest", context(approvals=["Practitioner/7"]),
                                               {**MR, "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 1}}]}]}), ALLOW),
    ("field path too long to check", ward_write("Observation", context(), {"resourceType": "Observation", "status": "final"}),
     deny("field rule a.b.c.d.e for Observation cannot be checked")),
    ("local business hours (UTC+1)", ward_write("AllergyIntolerance", context("2026-11-25T06:30:00Z"), {"resourceType": "AllergyIntolerance"}), ALLOW),
    ("local weekend (UTC+1)", ward_write("AllergyIntolerance", context("2026-11-27T23:30:00Z"), {"resourceType": "AllergyIntolerance"}),
     review("AllergyIntolerance writes outside business hours need review")),
]


def variant_data(base: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    settings = data["fhir_sidecar"]
    settings.update(copy.deepcopy(VARIANT_SETTINGS))
    settings["clients"].update(copy.deepcopy(VARIANT_CLIENT_CHANGES))
    return data


def write_variant(directory: Path) -> Path:
    """A copy of policies/ with the variant data, for both engines."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in POLICIES.glob("*.rego"):
        (directory / f.name).write_text(f.read_text())
    base = json.loads((POLICIES / "data.json").read_text())
    (directory / "data.json").write_text(json.dumps(variant_data(base)))
    return directory


# ---- tests (embedded engine) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded() -> EmbeddedPolicy:
    return EmbeddedPolicy.load(POLICIES, "fhir/writeback")


@pytest.fixture(scope="module")
def embedded_variant(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedPolicy:
    return EmbeddedPolicy.load(write_variant(tmp_path_factory.mktemp("variant")), "fhir/writeback")


def test_table_is_big_enough_and_both_ways():
    decisions = [d for _, _, d in CASES + VARIANT_CASES]
    assert len(decisions) >= 50
    assert sum(d["allow"] for d in decisions) >= 20
    assert sum(not d["allow"] and not d["review"] for d in decisions) >= 20
    assert sum(d["review"] for d in decisions) >= 5
    assert len({name for name, _, _ in CASES + VARIANT_CASES}) == len(CASES) + len(VARIANT_CASES)


@pytest.mark.parametrize("name,input_doc,expected", CASES, ids=[c[0] for c in CASES])
def test_starter_policy_decision(embedded, name, input_doc, expected):
    assert embedded.evaluate(input_doc) == expected


@pytest.mark.parametrize("name,input_doc,expected", VARIANT_CASES, ids=[c[0] for c in VARIANT_CASES])
def test_starter_policy_decision_with_other_settings(embedded_variant, name, input_doc, expected):
    assert embedded_variant.evaluate(input_doc) == expected


def test_decisions_are_deterministic(embedded):
    for _, input_doc, _ in CASES:
        first = embedded.evaluate(input_doc)
        assert embedded.evaluate(copy.deepcopy(input_doc)) == first
        assert first["reasons"] == sorted(first["reasons"])


def test_e2e_clients_keep_working(embedded):
    """tests/test_e2e.py: demo-writer writes Observations (create, update, delete, transaction)
    without tags or prior state; scribe-app's $meta-add stays denied by the policy itself."""
    writer = client("demo-writer", "t1", ["system/Observation.cruds", "system/Patient.rs", "system/Condition.cu"])
    assert embedded.evaluate(doc(writer, request("POST", "create", "Observation"), OBS))["allow"]
    assert embedded.evaluate(doc(writer, request("PUT", "update", "Observation", "ov1"), {**OBS, "id": "ov1"}))["allow"]
    assert embedded.evaluate(doc(writer, request("DELETE", "delete", "Observation", "ov1")))["allow"]
    scribe = client("scribe-app", None, ["system/Observation.cruds"])
    d = embedded.evaluate(doc(scribe, request("POST", "operation", "Observation", "1", operation="$meta-add"),
                              {"resourceType": "Parameters"}))
    assert not d["allow"] and "operation $meta-add is not allowed by policy for client scribe-app" in d["reasons"]
