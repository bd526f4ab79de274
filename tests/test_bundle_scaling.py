"""Large transactions: every entry is still parsed, classified, scoped, validated and compartment-
checked, a bad entry anywhere (here: the last of 1,000) is refused by name, `urn:uuid` references
resolve across the whole Bundle, and the work per entry is constant (counted, never timed).

The last tests run 1,000-entry transactions through the real `Pipeline.decide` (runtime built from a
config as `fhir-sidecar run` builds it, the shipped starter policy, an audit sink in a temp dir); the
upstream is never contacted (creates read no prior state, and the prior-state reader fails the test
if it is asked).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sidecar import compartment, guards, scopes
from sidecar.classify import classify
from sidecar.config import Fhir, parse_config
from sidecar.context_guard import check_context
from sidecar.errors import Refusal
from sidecar.fhir import jsonbody
from sidecar.fhir import validate as fhir_validate
from sidecar.identity import Principal
from sidecar.parse import parse_request
from sidecar.pipeline import Pipeline
from sidecar.request import Classification, FhirRequest, RawRequest
from sidecar.runtime import build_runtime
from sidecar.scopes import ScopeSet
from tests.harness import WRITER_KEY, make_config

UPSTREAM = "http://127.0.0.1:9/fhir/R4"  # never contacted
BASE = "/fhir/R4"
N = 1000
LOINC = [("8867-4", "Heart rate", "/min"), ("9279-1", "Respiratory rate", "/min"), ("8310-5", "Body temperature", "Cel"),
         ("59408-5", "Oxygen saturation", "%"), ("29463-7", "Body weight", "kg"), ("8302-2", "Body height", "cm"),
         ("39156-5", "BMI", "kg/m2")]
VITALS = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]


def uuid_url(i: int) -> str:
    return f"urn:uuid:00000000-0000-4000-8000-{i:012d}"


def observation(i: int, subject: str = "Patient/example", members: list[str] | None = None) -> dict[str, Any]:
    """A vital-signs Observation (synthetic); every 8th a panel whose members are the previous seven entries."""
    code, display, unit = LOINC[i % len(LOINC)]
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final", "category": VITALS,
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "subject": {"reference": subject}, "effectiveDateTime": "2026-11-25T09:30:00Z",
        "performer": [{"reference": "Practitioner/example"}],
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{display}</p></div>'},
    }
    if members:
        obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "85353-1"}], "text": "Vital signs panel"}
        obs["hasMember"] = [{"reference": m} for m in members]
    else:
        obs["valueQuantity"] = {"value": 60 + i % 40, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    return obs


def transaction(n: int, subject: str = "Patient/example") -> dict[str, Any]:
    entries = []
    for i in range(n):
        members = [uuid_url(j) for j in range(i - 7, i)] if i % 8 == 7 else None
        entries.append({"fullUrl": uuid_url(i), "resource": observation(i, subject, members),
                        "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def parsed(bundle: dict[str, Any]) -> tuple[FhirRequest, Classification]:
    raw = RawRequest("POST", BASE.encode(), (("content-type", "application/fhir+json"),), json.dumps(bundle).encode())
    req = parse_request(raw, base_path=BASE, max_body_bytes=Fhir().max_body_bytes, upstream_base=UPSTREAM)
    return req, classify(req, upstream_base=UPSTREAM)


def system_writer() -> Principal:
    return Principal("lab", "api-key", ScopeSet.from_strings(["system/Observation.c"]))


def patient_app(*more_scopes: str) -> Principal:
    return Principal("app", "bearer", ScopeSet.from_strings(["patient/Observation.c", *more_scopes]),
                     ("system", "patient"), patient="example")


def all_guards(bundle: dict[str, Any], who: Principal) -> None:
    """parse -> classify -> scopes -> validation -> qualified scopes + compartment: the pipeline's order."""
    req, cls = parsed(bundle)
    guards.check_scopes(cls, who)
    guards.check_valid(req, cls)
    check_context(req, cls, who, None, UPSTREAM)


@pytest.fixture(scope="module")
def big() -> dict[str, Any]:
    return transaction(N)


def with_last(big: dict[str, Any], change) -> dict[str, Any]:
    b = copy.deepcopy(big)
    change(b["entry"][-1])
    return b


# --------------------------------------------------------------------------------------------
# A large transaction passes every guard; one bad entry at the end is refused by name
# --------------------------------------------------------------------------------------------

def test_a_large_transaction_passes_every_guard(big: dict[str, Any]) -> None:
    assert len(json.dumps(big)) < Fhir().max_body_bytes  # the default limit admits it
    all_guards(big, system_writer())
    all_guards(big, patient_app())


LAST = f"Bundle.entry[{N - 1}]"
BAD_LAST = [
    ("missing required element (model)", lambda e: e["resource"].pop("code"), 400, "invalid",
     f"{LAST}.resource.code: required element missing"),
    ("bad date (model)", lambda e: e["resource"].update(effectiveDateTime="2026-13-45"), 400, "invalid",
     f"{LAST}.resource.effectiveDateTime"),
    ("code outside the required value set (strict walk)", lambda e: e["resource"]["text"].update(status="done"),
     400, "invalid", f"{LAST}.resource.text.status: code not in required value set"),
    ("wrong JSON type (strict walk)", lambda e: e["resource"].update(status=5), 400, "structure",
     f"{LAST}.resource.status: wrong JSON type or empty value"),
    ("empty string (strict walk)", lambda e: e["resource"]["subject"].update(display=""), 400, "structure",
     f"{LAST}.resource.subject.display"),
    ("bad narrative", lambda e: e["resource"]["text"].update(div="<div>x</div>"), 400, "invalid",
     f"{LAST}.resource.text.div"),
    ("unsupported type", lambda e: e.update(resource={"resourceType": "MedicinalProduct"},
                                            request={"method": "POST", "url": "MedicinalProduct"}),
     403, None, None),
    ("another type than the scopes grant", lambda e: e.update(
        resource={"resourceType": "Condition", "subject": {"reference": "Patient/example"}, "code": {"text": "x"}},
        request={"method": "POST", "url": "Condition"}),
     403, "forbidden", f"Bundle entry {N - 1}: scope does not grant 'c' on Condition for create"),
    ("an entry URL that cannot be classified", lambda e: e["request"].update(url="Observation/../Patient"), 403,
     "forbidden", f"Bundle entry {N - 1}: "),
    ("body resourceType against the entry URL", lambda e: e["request"].update(url="Condition"), None, None,
     f"Bundle entry {N - 1}: "),
]


@pytest.mark.parametrize(("change", "status", "code", "text"), [c[1:] for c in BAD_LAST], ids=[c[0] for c in BAD_LAST])
def test_one_bad_entry_at_the_end_is_refused_by_name(big, change, status, code, text) -> None:
    with pytest.raises(Refusal) as info:
        all_guards(with_last(big, change), system_writer())
    r = info.value
    if status is not None:
        assert r.status == status
    if code is not None:
        assert r.code == code
    assert (text or f"{N - 1}") in r.reason


def test_another_patient_in_the_last_entry_is_refused_for_a_patient_context_client(big) -> None:
    bad = with_last(big, lambda e: e["resource"].update(subject={"reference": "Patient/other"}))
    all_guards(bad, system_writer())  # a system client may write it
    with pytest.raises(Refusal) as info:
        all_guards(bad, patient_app())
    assert info.value.status == 403
    assert info.value.reason == (f"Bundle entry {N - 1}: patient context: "
                                 "Observation.subject references a patient other than the context patient")


def test_several_bad_entries_are_reported_first_ones_first(big) -> None:
    b = copy.deepcopy(big)
    for i in (3, 500, 998, 999):
        del b["entry"][i]["resource"]["status"]
    req, cls = parsed(b)
    with pytest.raises(Refusal) as info:
        guards.check_valid(req, cls)
    assert info.value.reason == ("invalid resource: Bundle.entry[3].resource.status: required element missing; "
                                 "Bundle.entry[500].resource.status: required element missing; "
                                 "Bundle.entry[998].resource.status: required element missing")


# --------------------------------------------------------------------------------------------
# urn:uuid references across many entries (patient context)
# --------------------------------------------------------------------------------------------

def put_patient(pid: str, full: str) -> dict[str, Any]:
    return {"fullUrl": full, "resource": {"resourceType": "Patient", "id": pid},
            "request": {"method": "PUT", "url": f"Patient/{pid}"}}


def test_urn_uuid_references_resolve_across_the_transaction() -> None:
    me = "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001"
    b = transaction(N, subject=me)  # every Observation names its subject by the placeholder ...
    b["entry"].append(put_patient("example", me))  # ... defined by the LAST entry: Patient/example
    who = patient_app("system/Patient.cu")
    all_guards(b, who)
    # the same placeholder defined as another patient: the first entry using it is refused
    b["entry"][-1] = put_patient("other", me)
    with pytest.raises(Refusal) as info:
        all_guards(b, who)
    assert info.value.reason == ("Bundle entry 0: patient context: "
                                 "Observation.subject references a patient other than the context patient")


@pytest.mark.parametrize(("reference", "phrase"), [
    ("urn:uuid:aaaaaaaa-0000-4000-8000-00000000ffff", "is a reference that cannot be resolved"),
    (uuid_url(N - 2), "declares type Patient but does not reference one"),  # an Observation of this Bundle
    ("urn:uuid:bbbbbbbb-0000-4000-8000-000000000001", "references a Patient created in this transaction"),
])
def test_a_placeholder_in_the_last_entry_is_resolved_against_all_the_others(big, reference, phrase) -> None:
    b = copy.deepcopy(big)
    b["entry"].insert(0, {"fullUrl": "urn:uuid:bbbbbbbb-0000-4000-8000-000000000001",
                          "resource": {"resourceType": "Patient", "name": [{"family": "New"}]},
                          "request": {"method": "POST", "url": "Patient"}})
    b["entry"][-1]["resource"]["subject"] = {"reference": reference, "type": "Patient"}
    req, cls = parsed(b)
    with pytest.raises(Refusal) as info:
        check_context(req, cls, patient_app("system/Patient.c"), None, UPSTREAM)
    assert info.value.reason == f"Bundle entry {N}: patient context: Observation.subject {phrase}"


def test_a_duplicate_full_url_at_the_end_is_found() -> None:
    b = transaction(2 * N)
    b["entry"][-1]["fullUrl"] = b["entry"][0]["fullUrl"]
    req, cls = parsed(b)
    with pytest.raises(Refusal) as info:
        check_context(req, cls, patient_app(), None, UPSTREAM)
    assert info.value.reason == f"Bundle: Bundle.entry[{2 * N - 1}].fullUrl is not unique"


# --------------------------------------------------------------------------------------------
# Work per entry is constant: operations counted for n and 2n entries
# --------------------------------------------------------------------------------------------

def counting(monkeypatch, owner: Any, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return original(*a, **k)

    monkeypatch.setattr(owner, name, counted)
    return calls


def counts(monkeypatch, n: int) -> dict[str, int]:
    """Operations of every non-policy stage for one n-entry transaction (all guards pass)."""
    with monkeypatch.context() as m:
        c = {
            "json objects": counting(m, jsonbody, "_pairs"),
            "exact depth scans": counting(m, jsonbody, "_max_depth"),
            "model validations": counting(m, fhir_validate, "_model_errors"),
            "objects walked (validation)": counting(m, fhir_validate._Walk, "element"),
            "scope requirements decided": counting(m, scopes.ScopeSet, "missing"),
            "scope contexts on resources": counting(m, scopes.ScopeSet, "best_context"),
            "compartment checks": counting(m, compartment, "patient_references"),
            "references resolved": counting(m, compartment, "_resolve"),
        }
        m.setattr(compartment, "_walk", _counted_walk(c))
        c["objects walked (compartment)"] = [0]
        m.setattr(jsonbody, "_DECODER", jsonbody.json.JSONDecoder(  # the same decoder, with the counted hook
            object_pairs_hook=jsonbody._pairs, parse_constant=jsonbody._no_constant,
            parse_float=jsonbody._finite_float, strict=True))
        all_guards(transaction(n), patient_app())
        return {k: v[0] for k, v in c.items()}


def _counted_walk(c: dict[str, list[int]]):
    original = compartment._walk

    def walk(node: Any, path: str):
        for item in original(node, path):
            c["objects walked (compartment)"][0] += 1
            yield item
    return walk


def test_every_stage_costs_the_same_per_entry(monkeypatch) -> None:
    sizes = (80, 800, 1600)  # multiples of 8: the same mix of Observations (and panels) at each size
    got = {n: counts(monkeypatch, n) for n in sizes}
    for what in got[80]:
        per_entry = [(got[b][what] - got[a][what]) / (b - a) for a, b in itertools.pairwise(sizes)]
        assert per_entry[0] == per_entry[1], (what, got)  # exactly linear: a + b * entries
    per = {what: (got[1600][what] - got[800][what]) / 800 for what in got[80]}
    assert per["model validations"] == 1  # each entry's resource validated once (plus the Bundle's shell)
    assert got[800]["model validations"] == 801
    assert per["compartment checks"] == 1  # each entry walked once for its references
    assert per["scope contexts on resources"] == 1  # each entry's resource against the scopes (qualifiers)
    assert got[80]["scope requirements decided"] == got[1600]["scope requirements decided"] == 1  # one distinct
    assert got[800]["exact depth scans"] == 0  # the fast depth check clears a well-formed body


def test_each_distinct_scope_requirement_is_decided_once(monkeypatch) -> None:
    _, cls = parsed(transaction(N))
    assert len(cls.requires) == N
    calls = counting(monkeypatch, scopes.ScopeSet, "missing")
    guards.check_scopes(cls, system_writer())
    assert calls[0] == 1


# --------------------------------------------------------------------------------------------
# The real pipeline: 1,000 entries decided (policy included), a bad last entry refused by name
# --------------------------------------------------------------------------------------------

class NoPriorState:
    async def read(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("a create read prior state")

    async def close(self) -> None:
        return None


def decide_all(tmp: Path, bodies: list[dict[str, Any]]) -> list[Any]:
    cfg = parse_config(make_config(tmp, UPSTREAM, fhir={"max_body_bytes": Fhir().max_body_bytes}))

    async def run() -> list[Any]:
        rt = await build_runtime(cfg, tmp)
        real = rt.prior
        pipe = Pipeline(replace(rt, prior=NoPriorState()))
        try:
            out = []
            for i, body in enumerate(bodies):
                raw = RawRequest("POST", BASE.encode(), (
                    ("host", "127.0.0.1:8080"), ("content-type", "application/fhir+json"), ("x-api-key", WRITER_KEY)),
                    json.dumps(body).encode(), host="127.0.0.1:8080")
                out.append(await pipe.decide(raw, f"bundle-scaling-{i:04d}", ""))
            return out
        finally:
            await rt.audit.close()
            await rt.svc.close()
            if real is not None:
                await real.close()

    return asyncio.run(run())


def test_the_pipeline_decides_a_large_transaction_and_names_a_bad_last_entry(tmp_path, big) -> None:
    bad_model = with_last(big, lambda e: e["resource"].pop("code"))
    bad_scope = with_last(big, lambda e: e.update(
        resource={"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                  "subject": {"reference": "Patient/example"}, "medicationCodeableConcept": {"text": "x"}},
        request={"method": "POST", "url": "MedicationRequest"}))
    ok, invalid, unscoped = decide_all(tmp_path, [big, bad_model, bad_scope])
    assert ok.refusal is None and ok.forward and len(ok.classification.entries) == N
    assert ok.intent_seq is not None  # the durable intent record was written before anything could leave
    assert invalid.refusal.status == 400
    assert f"{LAST}.resource.code: required element missing" in invalid.refusal.reason
    assert unscoped.refusal.status == 403
    assert unscoped.refusal.reason == f"Bundle entry {N - 1}: scope does not grant 'c' on MedicationRequest for create"
