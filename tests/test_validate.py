"""Tests for sidecar.fhir.validate: resource validation and JSON Patch shape."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.fhir.types import R4B_MODEL_TYPES
from sidecar.fhir.validate import FhirValidationError, _fields, model_class, validate_json_patch, validate_resource

CANARY = "CANARY7f3a"
XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "glucose-1",
        "meta": {"versionId": "1", "lastUpdated": "2020-01-02T10:00:00Z"},
        "text": {"status": "generated", "div": f"<div {XHTML}><p>Glucose <b>6.3</b> mmol/l</p></div>"},
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "15074-8",
                             "display": "Glucose [Moles/volume] in Blood"}]},
        "subject": {"reference": "Patient/example"},
        "effectivePeriod": {"start": "2013-04-02T09:30:10+01:00"},
        "issued": "2013-04-03T15:30:10.123+01:00",
        "valueQuantity": {"value": 6.3, "unit": "mmol/l", "system": "http://unitsofmeasure.org",
                          "code": "mmol/L"},
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                        "code": "H"}]}],
        "referenceRange": [{"low": {"value": 3.1, "unit": "mmol/l"}, "high": {"value": 6.2, "unit": "mmol/l"}}],
    }


def patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "example",
        "identifier": [{"use": "usual", "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
        "active": True,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                 {"use": "usual", "given": ["Jim"]}],
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                      "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "deceasedBoolean": False,
        "address": [{"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}],
        "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131",
                                                   "code": "N"}]}],
                     "name": {"family": "du Marché", "_family": {"extension": [
                         {"url": "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix",
                          "valueString": "VV"}]}, "given": ["Bénédicte"]},
                     "gender": "female"}],
        "managingOrganization": {"reference": "Organization/1"},
    }


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e30000000{i}", "resource": r,
         "request": {"method": "POST", "url": r["resourceType"]}} for i, r in enumerate(resources)]}


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set/delete (value=...) a dotted path with [i] indices in a copy."""
    doc = copy.deepcopy(doc)
    parts = path.replace("[", ".").replace("]", "").split(".")
    cur: Any = doc
    for p in parts[:-1]:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is Ellipsis:
        del cur[last]
    else:
        cur[last] = value
    return doc


@pytest.mark.parametrize("resource", [
    observation(), patient(), bundle(observation(), patient()),
    {"resourceType": "Bundle", "type": "transaction",
     "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]},
    {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient()},
                                                 {"name": "n", "valueInteger": 3}]},
    {"resourceType": "Basic", "code": {"text": "x"}},
    _set(patient(), "name[0]", {"given": ["A", "B"], "_given": [None, {"extension": [
        {"url": "http://x.org/e", "valueString": "v"}]}]}),
    _set(observation(), "contained", [{"resourceType": "Patient", "id": "p1", "gender": "other"}]),
    _set(observation(), "text.div",
         f'<div {XHTML}><a href="https://x.org/a?b=1">l</a><a href="#frag">f</a>'
         f'<img src="data:image/png;base64,AAAA" alt="a"/><table border="1"><tr><td colspan="2" '
         f'style="color: red">c</td></tr></table></div>'),
])
def test_valid_resources(resource: dict[str, Any]) -> None:
    validate_resource(resource)


# (mutation path, value, expected code, expected path in message). Values carry the canary.
INVALID = [
    ("status", ..., "invalid", "Observation.status"),
    ("code", ..., "invalid", "Observation.code"),
    ("status", 12345, "structure", "Observation.status"),
    ("status", ["final"], "structure", "Observation.status"),
    ("status", "", "structure", "Observation.status"),
    ("status", None, "structure", "Observation.status"),
    ("code", CANARY, "structure", "Observation.code"),
    ("code", {}, "structure", "Observation.code"),
    ("category", [], "structure", "Observation.category"),
    ("category", {"text": CANARY}, "structure", "Observation.category"),
    ("category[0]", None, "structure", "Observation.category[0]"),
    ("valueQuantity.value", "6.3", "structure", "Observation.valueQuantity.value"),
    ("valueQuantity.value", True, "structure", "Observation.valueQuantity.value"),
    ("valueQuantity.value", CANARY, "structure", "Observation.valueQuantity.value"),
    ("code.coding[0].system", 7, "structure", "Observation.code.coding[0].system"),
    ("unknownElement", CANARY, "structure", "Observation.unknownElement"),
    ("fhir_comments", [CANARY], "structure", "Observation.fhir_comments"),
    ("code.coding[0].bogus", CANARY, "structure", "Observation.code.coding[0].bogus"),
    ("issued", CANARY, "invalid", "Observation.issued"),
    ("issued", "2013-04-03", "invalid", "Observation.issued"),
    ("id", f"has space {CANARY}", "structure", "Observation.id"),
    ("id", "x" * 65, "structure", "Observation.id"),
    ("subject.reference", "", "structure", "Observation.subject.reference"),
    ("id", "a_b", "structure", "Observation.id"),
    ("valueString", CANARY, "invalid", "Observation"),  # two value[x]
    ("text.status", CANARY, "invalid", "Observation.text.status"),
    ("meta.lastUpdated", CANARY, "invalid", "Observation.meta.lastUpdated"),
]


@pytest.mark.parametrize("path,value,code,where", INVALID)
def test_invalid_observation(path: str, value: Any, code: str, where: str) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(_set(observation(), path, value))
    msg = str(ei.value)
    assert ei.value.code == code
    assert where in msg
    assert CANARY not in msg


@pytest.mark.parametrize("path,value,where", [
    ("gender", CANARY, "Patient.gender"),  # required binding
    ("active", "true", "Patient.active"),
    ("active", 1, "Patient.active"),
    ("birthDate", f"1974-13-{CANARY}", "Patient.birthDate"),
    ("name", {"family": CANARY}, "Patient.name"),
    ("name[0].given", [CANARY, None], "Patient.name[0].given[1]"),  # null without _given
    ("telecom[0].rank", 0, "Patient.telecom[0].rank"),  # positiveInt
    ("telecom[0].rank", 1.5, "Patient.telecom[0].rank"),
    ("telecom[0].rank", "1", "Patient.telecom[0].rank"),
    ("_birthDate", {}, "Patient._birthDate"),
    ("_birthDate.extension[0].url", ..., "Patient._birthDate.extension[0].url"),
    ("contact[0].gender", CANARY, "Patient.contact[0].gender"),
    ("resourceType", "patient", "Resource"),
])
def test_invalid_patient(path: str, value: Any, where: str) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(_set(patient(), path, value))
    assert where in str(ei.value)
    assert CANARY not in str(ei.value)


@pytest.mark.parametrize("div", [
    f"<div {XHTML}><script>alert('{CANARY}')</script></div>",
    f'<div {XHTML}><p onclick="x()">{CANARY}</p></div>',
    f'<div {XHTML}><a href="javascript:alert(1)">{CANARY}</a></div>',
    f'<div {XHTML}><a href="java\tscript:alert(1)">{CANARY}</a></div>',
    f'<div {XHTML}><img src="data:image/svg+xml;base64,AAAA"/>{CANARY}</div>',
    f'<div {XHTML}><p style="background:url(http://x/{CANARY})">x</p></div>',
    f'<div {XHTML}><iframe src="https://x"/>{CANARY}</div>',
    f'<div {XHTML}><form><input/></form>{CANARY}</div>',
    f'<div {XHTML}><object data="x"/>{CANARY}</div>',
    f'<div {XHTML}><base href="https://x"/>{CANARY}</div>',
    f"<div>{CANARY}</div>",  # no XHTML namespace
    f"<p {XHTML}>{CANARY}</p>",  # root must be div
    f"<div {XHTML}><p>{CANARY}</div>",  # not well-formed
    f"<div {XHTML}>   </div>",  # txt-2: no content
    f'<!DOCTYPE d [<!ENTITY a "{CANARY}">]><div {XHTML}>&a;</div>',
    f'<div {XHTML} xmlns:x="urn:x"><x:p>{CANARY}</x:p></div>',
    f'<div {XHTML} xmlns:l="http://www.w3.org/1999/xlink"><a l:href="https://x">{CANARY}</a></div>',
])
def test_narrative_refused(div: str) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(_set(observation(), "text.div", div))
    assert ei.value.code == "invalid"
    assert "Observation.text.div" in str(ei.value)
    assert CANARY not in str(ei.value)


def test_bundle_entry_validated_as_its_type() -> None:
    bad = _set(observation(), "status", ...)
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(bundle(patient(), bad))
    assert "Bundle.entry[1].resource.status" in str(ei.value)
    bad = _set(observation(), "valueQuantity.value", CANARY)
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(bundle(bad))
    assert "Bundle.entry[0].resource.valueQuantity.value" in str(ei.value)
    assert CANARY not in str(ei.value)


def test_bundle_entry_model_level_error() -> None:
    # Only pydantic sees this one (date syntax): the nested model is the real type.
    bad = _set(patient(), "birthDate", f"1974-13-{CANARY}")
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(bundle(observation(), bad))
    assert "Bundle.entry[1].resource.birthDate" in str(ei.value)
    assert CANARY not in str(ei.value)


@pytest.mark.parametrize("rtype,code", [
    ("MedicinalProduct", "not-supported"),
    ("EffectEvidenceSynthesis", "not-supported"),
    ("Evidence", "not-supported"),
    ("SubscriptionTopic", "not-supported"),  # R4B-only: not an R4 type
    ("Citation", "not-supported"),
    ("Resource", "not-supported"),
    ("observation", "not-supported"),
])
def test_unsupported_types(rtype: str, code: str) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_resource({"resourceType": rtype, "id": "x"})
    assert ei.value.code == code
    # ... also when nested
    for doc, where in ((bundle({"resourceType": rtype, "id": "x"}), "Bundle.entry[0].resource"),
                       (_set(observation(), "contained", [{"resourceType": rtype, "id": "c"}]),
                        "Observation.contained[0]"),
                       ({"resourceType": "Parameters", "parameter": [{"name": "r", "resource": {
                           "resourceType": rtype, "id": "x"}}]}, "Parameters.parameter[0].resource")):
        with pytest.raises(FhirValidationError) as ei:
            validate_resource(doc)
        assert ei.value.code == code and where in str(ei.value)


@pytest.mark.parametrize("resource", [
    {}, {"id": "x"}, {"resourceType": 1}, {"resourceType": None}, {"resourceType": ["Patient"]},
    [], "Patient", None,
])
def test_malformed(resource: Any) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(resource)
    assert ei.value.code == "structure"


def test_contained_rules() -> None:
    nested = {"resourceType": "Patient", "id": "p", "contained": [{"resourceType": "Patient", "id": "q"}]}
    with pytest.raises(FhirValidationError):  # dom-2
        validate_resource(_set(observation(), "contained", [nested]))
    with pytest.raises(FhirValidationError):
        validate_resource(_set(observation(), "contained", [{"id": "p"}]))


def test_primitive_array_alignment() -> None:
    ok = {"resourceType": "Patient", "name": [{"given": ["A", None], "_given": [None, {"id": "x"}]}]}
    validate_resource(ok)
    for given, ext in ((["A", None], [None, None]), (["A", None], [{"id": "x"}]), ([None], [None])):
        with pytest.raises(FhirValidationError):
            validate_resource({"resourceType": "Patient", "name": [{"given": given, "_given": ext}]})


def test_every_model_field_is_classified() -> None:
    seen: set[type] = set()

    def visit(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for key, f in _fields(cls).items():
            assert f.kind != "other", (cls.__name__, key)
            if f.sub is not None:
                visit(f.sub)

    for name in sorted(R4B_MODEL_TYPES):
        if name not in ("Evidence", "EvidenceVariable"):
            visit(model_class(name))
    assert len(seen) > 400


# --------------------------------------------------------------------------
# JSON Patch
# --------------------------------------------------------------------------

@pytest.mark.parametrize("ops", [
    [{"op": "add", "path": "/name/-", "value": {"family": "x"}}],
    [{"op": "remove", "path": "/telecom/0"}],
    [{"op": "replace", "path": "/active", "value": False}],
    [{"op": "replace", "path": "/x", "value": None}],
    [{"op": "move", "from": "/a/0", "path": "/a/1"}],
    [{"op": "copy", "from": "/a", "path": "/b"}],
    [{"op": "test", "path": "/meta/versionId", "value": "3"}, {"op": "remove", "path": "/a~1b~0c"}],
    [{"op": "add", "path": "", "value": {}}],
])
def test_patch_ok(ops: list[Any]) -> None:
    validate_json_patch(ops)


@pytest.mark.parametrize("ops", [
    [],
    {"op": "add"},
    [1],
    [None],
    [{"path": "/a", "value": 1}],
    [{"op": "ADD", "path": "/a", "value": 1}],
    [{"op": "merge", "path": "/a", "value": 1}],
    [{"op": 1, "path": "/a"}],
    [{"op": "add", "path": "/a"}],  # value missing
    [{"op": "replace", "path": "/a"}],
    [{"op": "test", "path": "/a"}],
    [{"op": "remove", "path": "/a", "value": 1}],  # unknown member for remove
    [{"op": "add", "path": "/a", "value": 1, "extra": CANARY}],
    [{"op": "move", "path": "/a"}],  # from missing
    [{"op": "copy", "path": "/a", "from": 1}],
    [{"op": "add", "path": "a", "value": 1}],  # not a pointer
    [{"op": "add", "path": "/a~2", "value": 1}],
    [{"op": "add", "path": "/a~", "value": 1}],
    [{"op": "remove", "path": None}],
    [{"op": "remove", "path": ["/a"]}],
    [{"op": "remove", "path": "/a"}] * 1001,
])
def test_patch_bad(ops: Any) -> None:
    with pytest.raises(FhirValidationError) as ei:
        validate_json_patch(ops)
    assert CANARY not in str(ei.value)


# --------------------------------------------------------------------------------------------
# Bundles are validated entry by entry: the same answer as the whole-Bundle model
# --------------------------------------------------------------------------------------------

def _whole_model_message(doc: dict[str, Any]) -> str | None:
    """What the R4B Bundle model says when it validates the whole Bundle at once (the reference)."""
    from pydantic import ValidationError

    from sidecar.fhir.validate import _describe, _loc_path

    try:
        model_class("Bundle").model_validate(doc)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_context=False, include_input=False)[:3]
        return "invalid resource: " + "; ".join(f"{_loc_path('Bundle', tuple(x['loc']))}: {_describe(x['type'])}"
                                                for x in errs)
    return None


def _many_entries(n: int) -> dict[str, Any]:
    """Observations (even indices) and Patients (odd), each its own object."""
    def obs() -> dict[str, Any]:
        o = observation()
        del o["id"], o["meta"]
        return o
    return bundle(*[obs() if i % 2 == 0 else patient() for i in range(n)])


@pytest.mark.parametrize("breakage", [
    {},                                                             # valid
    {"entry[8].resource.status": ...},                              # one entry's resource
    {"entry[2].resource.status": ..., "entry[40].resource.code": ..., "entry[41].resource.birthDate": "1974-13"},
    {"entry[3].request.url": ...},                                  # the shell only
    {"entry[3].request.url": ..., "entry[1].resource.birthDate": "x", "entry[5].resource.birthDate": "1974-02-30"},
    {"type": ...},                                                  # the Bundle's own required element
    {"type": ..., "entry[10].resource.status": ...},                # ... not reported past an entry's error
    {"timestamp": "yesterday", "entry[0].resource.status": ...},    # a Bundle field after `entry`, and one before
    {"entry[6].resource.valueString": "x"},                         # a resource-level (choice) error
    {"entry[4].resource.effectivePeriod.start": "2013-13"},         # deep inside an entry
    {"entry[1].resource.birthDate": "x", "entry[1].fullUrl": ...},  # an entry whose shell is still valid
])
def test_bundle_split_validation_says_what_the_whole_bundle_model_says(breakage: dict[str, Any]) -> None:
    doc = _many_entries(60)
    for path, value in breakage.items():
        doc = _set(doc, path, value)
    expected = _whole_model_message(doc)
    if expected is None:
        validate_resource(doc)
        return
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(doc)
    assert (ei.value.code, str(ei.value)) == ("invalid", expected)


def test_nested_bundle_entries_are_validated_with_their_own_types() -> None:
    inner = {"resourceType": "Bundle", "type": "collection",
             "entry": [{"resource": {"resourceType": "Observation", "status": "final"}}]}
    doc = bundle(observation(), inner)
    with pytest.raises(FhirValidationError) as ei:
        validate_resource(doc)
    assert str(ei.value) == _whole_model_message(doc)
    assert "Bundle.entry[1].resource.entry[0].resource.code: required element missing" in str(ei.value)


def test_each_entry_resource_is_validated_once_with_its_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    for rtype in ("Bundle", "Observation", "Patient"):
        cls = model_class(rtype)
        original = cls.model_validate.__func__

        def counted(klass, obj, *a, _orig=original, **k):
            if klass.__name__ in ("Bundle", "Observation", "Patient"):
                seen.append(klass.__name__)
            return _orig(klass, obj, *a, **k)

        monkeypatch.setattr(cls, "model_validate", classmethod(counted))
    validate_resource(_many_entries(10))
    assert seen == ["Bundle"] + ["Observation", "Patient"] * 5
