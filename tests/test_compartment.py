"""Patient compartment: reference extraction, write checks, search confinement (pure; no I/O)."""

from __future__ import annotations

import copy

import pytest

from sidecar.compartment import (
    CONDITIONAL, CONTAINED, IDENTIFIER_ONLY, MALFORMED, MARKERS, NEW_IN_TRANSACTION, OTHER_SERVER,
    PATIENT_COMPARTMENT, TYPE_MISMATCH, UNRESOLVED, CompartmentViolation, check_patient_context,
    is_valid_id, patient_references, search_confined, transaction_fullurl_map,
)

CTX = "123"
BASE = "https://ehr.example.org/fhir/R4"


def obs(*, subject: object = "Patient/123", **extra: object) -> dict:
    r: dict = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    if subject is not None:
        r["subject"] = subject if isinstance(subject, dict) else {"reference": subject}
    r.update(extra)
    return r


def ref(value: str, **kw: object) -> dict:
    return {"reference": value, **kw}


# --- patient_references ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", "123"),
        ("Patient/456", "456"),
        ("Patient/123/_history/2", "123"),
        (f"{BASE}/Patient/123", "123"),                      # absolute, same server
        (f"{BASE}/Patient/123/_history/7", "123"),
        ("https://other.example.org/fhir/Patient/123", OTHER_SERVER),
        ("http://ehr.example.org/fhir/R4/Patient/123", OTHER_SERVER),  # scheme differs: not provably ours
        ("https://ehr.example.org/fhir/R4x/Patient/123", OTHER_SERVER),
        ("//other.example.org/Patient/123", OTHER_SERVER),
        ("Patient?identifier=http://mrn|42", CONDITIONAL),   # a URL in the query is not an absolute reference
        (f"{BASE}/Patient?identifier=http://mrn|42", CONDITIONAL),
        ("https://other.example.org/Patient?identifier=http://mrn|42", OTHER_SERVER),
        ("Patient:123", UNRESOLVED),
        ("Patient", MALFORMED),
        ("Patient/", MALFORMED),
        ("Patient/123/Observation/1", MALFORMED),
        ("Patient/a b", MALFORMED),
        ("patient/123", MALFORMED),                           # case variant: a lenient server might follow it
        ("./Patient/123", MALFORMED),
        ("Pati%65nt/123", MALFORMED),
        ("urn:uuid:7f1d9c1e-0000-4000-8000-000000000001", UNRESOLVED),  # not in a transaction map
        ("urn:oid:1.2.3", UNRESOLVED),
        ("#nope", UNRESOLVED),
    ],
)
def test_reference_forms(reference: str, expected: str) -> None:
    assert patient_references(obs(subject=reference), upstream_base=BASE) == [("Observation.subject", expected)]


@pytest.mark.parametrize(
    "reference",
    ["Group/1", "Device/1", "Practitioner/123", "Observation?patient=Patient/9",
     "https://other.example.org/fhir/Practitioner/1", f"{BASE}/Location/2"],
)
def test_non_patient_references_are_ignored(reference: str) -> None:
    assert patient_references(obs(subject=reference), upstream_base=BASE) == []


def test_paths_cover_nested_contained_and_extensions() -> None:
    r = obs(
        performer=[ref("Practitioner/1"), ref("Patient/123"), ref("Patient/9")],
        contained=[{"resourceType": "Observation", "id": "c1", "subject": ref("Patient/456")}],
        extension=[{"url": "http://x", "valueReference": ref("Patient/789")}],
        component=[{"code": {"text": "c"}, "extension": [{"url": "u", "valueReference": ref("Patient/1")}]}],
    )
    assert patient_references(r) == [
        ("Observation.subject", "123"),
        ("Observation.performer[1]", "123"),
        ("Observation.performer[2]", "9"),
        ("Observation.contained[0].subject", "456"),
        ("Observation.extension[0].valueReference", "789"),
        ("Observation.component[0].extension[0].valueReference", "1"),
    ]


@pytest.mark.parametrize(
    ("contained", "reference", "expected"),
    [
        ([{"resourceType": "Patient", "id": "p"}], "#p", [("Observation.subject", CONTAINED)]),
        ([{"resourceType": "Group", "id": "g"}], "#g", []),
        # two contained resources share an id: assume the worst
        ([{"resourceType": "Group", "id": "g"}, {"resourceType": "Group", "id": "g"}], "#g",
         [("Observation.subject", CONTAINED)]),
    ],
)
def test_contained_references(contained: list, reference: str, expected: list) -> None:
    assert patient_references(obs(subject=reference, contained=contained)) == expected


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        ({"type": "Patient", "identifier": {"system": "http://mrn", "value": "42"}}, IDENTIFIER_ONLY),
        ({"type": "http://hl7.org/fhir/StructureDefinition/Patient", "identifier": {"value": "42"}}, IDENTIFIER_ONLY),
        ({"reference": "Practitioner/1", "type": "Patient"}, TYPE_MISMATCH),
        ({"reference": 123}, MALFORMED),
    ],
)
def test_identifier_only_type_mismatch_malformed(element: dict, expected: str) -> None:
    assert patient_references(obs(subject=element)) == [("Observation.subject", expected)]


def test_element_named_reference_holding_a_reference() -> None:
    consent = {"resourceType": "Consent", "patient": ref("Patient/123"), "provision": {"data": [
        {"meaning": "instance", "reference": ref("Observation/1")},
        {"meaning": "related", "reference": ref("Patient/456")}]}}
    assert patient_references(consent) == [
        ("Consent.patient", "123"), ("Consent.provision.data[1].reference", "456")]


def test_identifier_without_patient_type_is_not_a_patient_reference() -> None:
    assert patient_references(obs(subject={"identifier": {"value": "42"}})) == []
    # a CapabilityStatement-like {"type": "Patient"} without identifier is not a reference
    assert patient_references({"resourceType": "Basic", "x": {"type": "Patient"}}) == []


def test_markers_never_equal_an_id() -> None:
    assert all(not is_valid_id(m) for m in MARKERS)


def test_paths_never_carry_values() -> None:
    r = obs(**{"Patient/999": {"reference": "Patient/999"}})
    [(path, value)] = [x for x in patient_references(r) if x[1] == "999"]
    assert "999" not in path and path == "Observation.?"


# --- transactions ------------------------------------------------------------------------------------

UUID_CTX = "urn:uuid:00000000-0000-4000-8000-000000000001"
UUID_NEW = "urn:uuid:00000000-0000-4000-8000-000000000002"
UUID_COND = "urn:uuid:00000000-0000-4000-8000-000000000003"
UUID_OBS = "urn:uuid:00000000-0000-4000-8000-000000000004"


def tx_bundle() -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": UUID_CTX, "resource": {"resourceType": "Patient", "id": CTX},
         "request": {"method": "PUT", "url": f"Patient/{CTX}"}},
        {"fullUrl": UUID_NEW, "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": UUID_COND, "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=http://mrn|42"}},
        {"fullUrl": UUID_OBS, "resource": obs(), "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000005", "request": {"method": "GET", "url": "Patient/1"}},
    ]}


def test_transaction_fullurl_map() -> None:
    assert transaction_fullurl_map(tx_bundle(), upstream_base=BASE) == {
        UUID_CTX: "Patient/123",
        UUID_NEW: f"Patient/{UUID_NEW}",
        UUID_COND: "Patient?identifier=http://mrn|42",
        UUID_OBS: f"Observation/{UUID_OBS}",
    }


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (UUID_CTX, [("Observation.subject", "123")]),
        (UUID_NEW, [("Observation.subject", NEW_IN_TRANSACTION)]),
        (UUID_COND, [("Observation.subject", CONDITIONAL)]),
        (UUID_OBS, []),
        ("urn:uuid:00000000-0000-4000-8000-000000000005", [("Observation.subject", UNRESOLVED)]),  # GET entry
    ],
)
def test_urn_resolution_through_the_transaction(reference: str, expected: list) -> None:
    fmap = transaction_fullurl_map(tx_bundle(), upstream_base=BASE)
    assert patient_references(obs(subject=reference), fullurl_map=fmap, upstream_base=BASE) == expected


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([{"fullUrl": UUID_NEW, "request": {"method": "POST", "url": "Patient"}},
          {"fullUrl": UUID_NEW, "request": {"method": "POST", "url": "Observation"}}], "is not unique"),
        ([{"fullUrl": "https://other.example.org/Patient/1", "request": {"method": "PUT", "url": "Patient/1"}}],
         "is on another server"),
        ([{"fullUrl": f"{BASE}/Patient/1", "request": {"method": "PUT", "url": "Patient/2"}}],
         "does not match the entry's request.url"),
        ([{"fullUrl": f"{BASE}/Patient/1", "request": {"method": "POST", "url": "Patient"}}],
         "does not match the entry's request.url"),
    ],
)
def test_transaction_fullurl_map_refuses_ambiguity(entries: list, reason: str) -> None:
    with pytest.raises(CompartmentViolation) as err:
        transaction_fullurl_map({"resourceType": "Bundle", "entry": entries}, upstream_base=BASE)
    assert reason in err.value.reason


def test_transaction_fullurl_map_accepts_matching_absolute_fullurl() -> None:
    b = {"resourceType": "Bundle", "entry": [
        {"fullUrl": f"{BASE}/Patient/123", "request": {"method": "PUT", "url": f"{BASE}/Patient/123"}}]}
    assert transaction_fullurl_map(b, upstream_base=BASE + "/") == {f"{BASE}/Patient/123": "Patient/123"}


# --- check_patient_context ---------------------------------------------------------------------------

OK_WRITES = [
    ("own subject", obs(), "Observation", None),
    ("own subject, versioned", obs(subject="Patient/123/_history/3"), "Observation", None),
    ("own, absolute same server", obs(subject=f"{BASE}/Patient/123"), "Observation", None),
    ("own subject + practitioner performer", obs(performer=[ref("Practitioner/1")]), "Observation", None),
    ("performer only (compartment element)", obs(subject="Group/1", performer=[ref("Patient/123")]),
     "Observation", None),
    ("contained Observation about own patient", obs(contained=[{"resourceType": "Observation", "id": "c",
                                                                 "subject": ref("Patient/123")}]),
     "Observation", None),
    ("condition", {"resourceType": "Condition", "subject": ref("Patient/123")}, "Condition", None),
    ("careplan performer deep", {"resourceType": "CarePlan", "subject": ref("Group/2"),
                                 "activity": [{"detail": {"performer": [ref("Patient/123")]}}]}, "CarePlan", None),
    ("own Patient", {"resourceType": "Patient", "id": "123"}, "Patient", "123"),
    ("own Patient, id from body", {"resourceType": "Patient", "id": "123"}, "Patient", None),
    ("own Patient linking itself", {"resourceType": "Patient", "id": "123",
                                    "link": [{"other": ref("Patient/123"), "type": "seealso"}]}, "Patient", "123"),
    ("own Patient, '#' self reference", {"resourceType": "Patient", "id": "123",
                                         "contained": [{"resourceType": "Provenance", "id": "p",
                                                        "target": [ref("#")]}]}, "Patient", "123"),
]


@pytest.mark.parametrize(("name", "resource", "rtype", "rid"), OK_WRITES, ids=[w[0] for w in OK_WRITES])
def test_check_patient_context_allows(name: str, resource: dict, rtype: str, rid: str | None) -> None:
    before = copy.deepcopy(resource)
    check_patient_context(resource, CTX, resource_type=rtype, resource_id=rid, upstream_base=BASE)
    assert resource == before  # never mutated


BAD_WRITES = [
    ("other patient", obs(subject="Patient/456"), "Observation", None, "Observation.subject references a patient other"),
    ("no patient at all", obs(subject=None), "Observation", None, "does not reference the context patient"),
    ("group subject only", obs(subject="Group/1"), "Observation", None, "does not reference the context patient"),
    ("own patient only in a non-compartment element", obs(subject=None, focus=[ref("Patient/123")]),
     "Observation", None, "does not reference the context patient"),
    ("mixed: own subject + other performer", obs(performer=[ref("Patient/123"), ref("Patient/456")]),
     "Observation", None, "Observation.performer[1] references a patient other"),
    ("contained Patient", obs(subject="#p", contained=[{"resourceType": "Patient", "id": "p"}]),
     "Observation", None, "Observation.subject references a contained Patient"),
    ("contained Observation about another patient",
     obs(contained=[{"resourceType": "Observation", "id": "c", "subject": ref("Patient/456")}]),
     "Observation", None, "Observation.contained[0].subject references a patient other"),
    ("extension to another patient", obs(extension=[{"url": "u", "valueReference": ref("Patient/456")}]),
     "Observation", None, "Observation.extension[0].valueReference"),
    ("absolute other server", obs(subject="https://other.example.org/fhir/Patient/123"), "Observation", None,
     "references a Patient on another server"),
    ("conditional reference", obs(subject="Patient?identifier=http://mrn|42"), "Observation", None,
     "is a conditional Patient reference"),
    ("identifier only", obs(subject={"type": "Patient", "identifier": {"value": "42"}}), "Observation", None,
     "identifies a Patient by identifier only"),
    ("resourceType mismatch", obs(), "Condition", None, "resourceType does not match"),
    ("type not in the table", {"resourceType": "Device", "patient": ref("Patient/123")}, "Device", None,
     "not in the patient compartment table"),
    ("Patient: another id", {"resourceType": "Patient", "id": "456"}, "Patient", "456",
     "may only write its own Patient"),
    ("Patient: create (no id)", {"resourceType": "Patient"}, "Patient", None, "may only write its own Patient"),
    ("Patient: body id differs from URL id", {"resourceType": "Patient", "id": "456"}, "Patient", "123",
     "may only write its own Patient"),
    ("Patient: link to another patient", {"resourceType": "Patient", "id": "123",
                                          "link": [{"other": ref("Patient/456"), "type": "seealso"}]},
     "Patient", "123", "Patient.link[0].other references a patient other"),
]


@pytest.mark.parametrize(("name", "resource", "rtype", "rid", "reason"), BAD_WRITES, ids=[w[0] for w in BAD_WRITES])
def test_check_patient_context_refuses(name: str, resource: dict, rtype: str, rid: str | None, reason: str) -> None:
    with pytest.raises(CompartmentViolation) as err:
        check_patient_context(resource, CTX, resource_type=rtype, resource_id=rid, upstream_base=BASE)
    assert reason in err.value.reason
    assert "456" not in err.value.reason and "mrn" not in err.value.reason  # never a value


@pytest.mark.parametrize(
    ("reference", "ok"),
    [(UUID_CTX, True), (UUID_NEW, False), (UUID_COND, False), (f"{BASE}/Patient/123", True)],
)
def test_check_patient_context_in_a_transaction(reference: str, ok: bool) -> None:
    fmap = transaction_fullurl_map(tx_bundle(), upstream_base=BASE)
    r = obs(subject=reference)
    if ok:
        check_patient_context(r, CTX, resource_type="Observation", resource_id=None, fullurl_map=fmap,
                              upstream_base=BASE)
    else:
        with pytest.raises(CompartmentViolation):
            check_patient_context(r, CTX, resource_type="Observation", resource_id=None, fullurl_map=fmap,
                                  upstream_base=BASE)


@pytest.mark.parametrize("ctx", ["", "a/b", "Patient/123", "x" * 65, "?conditional", None])
def test_invalid_context_is_refused(ctx: object) -> None:
    with pytest.raises(CompartmentViolation, match="no valid patient context"):
        check_patient_context(obs(), ctx, resource_type="Observation", resource_id=None)  # type: ignore[arg-type]
    assert search_confined("Observation", [("patient", str(ctx))], ctx, None) is False  # type: ignore[arg-type]


def test_table_paths_are_plain_element_paths() -> None:
    for rtype, params in PATIENT_COMPARTMENT.items():
        assert rtype[0].isupper() and params
        for param, path in params.items():
            assert param == param.lower() or param.startswith("_")
            assert all(seg.isalpha() for seg in path.split(".")), (rtype, param, path)


# --- search_confined ---------------------------------------------------------------------------------

SEARCHES = [
    # (name, type, query, compartment, confined)
    ("compartment path", "Observation", [], ("Patient", "123"), True),
    ("compartment path + filter", "Observation", [("code", "http://loinc.org|1234-5")], ("Patient", "123"), True),
    ("other patient's compartment", "Observation", [], ("Patient", "456"), False),
    ("encounter compartment", "Observation", [], ("Encounter", "123"), False),
    ("compartment, type not in table", "Device", [], ("Patient", "123"), False),
    ("compartment Patient/123/Patient without _id", "Patient", [], ("Patient", "123"), False),
    ("patient=", "Observation", [("patient", "123")], None, True),
    ("patient=Patient/", "Observation", [("patient", "Patient/123")], None, True),
    ("subject=Patient/x", "Observation", [("subject", "Patient/123")], None, True),
    ("performer=Patient/x (compartment param)", "Observation", [("performer", "Patient/123")], None, True),
    ("subject=bare id (polymorphic)", "Observation", [("subject", "123")], None, False),
    ("patient + filters + paging", "Observation",
     [("patient", "123"), ("category", "vital-signs"), ("_count", "10"), ("_sort", "-date"), ("date", "ge2024")],
     None, True),
    ("encounter patient=", "Encounter", [("patient", "123")], None, True),
    ("condition patient=", "Condition", [("patient", "123")], None, True),
    ("Patient?_id=", "Patient", [("_id", "123")], None, True),
    ("Patient?_id=other", "Patient", [("_id", "456")], None, False),
    ("Patient?_id comma list", "Patient", [("_id", "123,456")], None, False),
    ("Patient?identifier=", "Patient", [("identifier", "http://mrn|42")], None, False),
    ("Patient?link=Patient/ctx does not confine", "Patient", [("link", "Patient/123")], None, False),
    ("other patient", "Observation", [("patient", "456")], None, False),
    ("comma list", "Observation", [("patient", "123,456")], None, False),
    ("modifier :missing", "Observation", [("patient:missing", "false")], None, False),
    ("type modifier", "Observation", [("subject:Patient", "123")], None, False),
    ("identifier modifier", "Observation", [("patient:identifier", "http://mrn|42")], None, False),
    ("own + modified second", "Observation", [("patient", "123"), ("subject:missing", "true")], None, False),
    ("missing patient param", "Observation", [("code", "1234-5")], None, False),
    ("no params", "Observation", [], None, False),
    ("chained", "Observation", [("subject.name", "smith")], None, False),
    ("chained on own patient", "Observation", [("patient", "123"), ("performer.name", "smith")], None, False),
    ("typed chain", "Observation", [("subject:Patient.identifier", "x")], None, False),
    ("_has", "Patient", [("_id", "123"), ("_has:Observation:patient:code", "x")], None, False),
    ("repeated: own then other (server may take the last)", "Observation",
     [("patient", "123"), ("patient", "456")], None, False),
    ("own + another patient via second param", "Observation",
     [("patient", "123"), ("subject", "Patient/456")], None, False),
    ("own + practitioner performer (refused: every linking param must be pinned)", "Observation",
     [("patient", "123"), ("performer", "Practitioner/1")], None, False),
    ("case variant of a linking param", "Observation", [("patient", "123"), ("PATIENT", "456")], None, False),
    ("absolute patient url", "Observation", [("subject", f"{BASE}/Patient/123")], None, False),
    ("whitespace", "Observation", [("patient", " 123")], None, False),
    ("_type", "Observation", [("patient", "123"), ("_type", "Patient")], None, False),
    ("_query", "Observation", [("patient", "123"), ("_query", "everything")], None, False),
    ("_filter", "Observation", [("patient", "123"), ("_filter", "subject eq Patient/456")], None, False),
    ("system search", "*", [("patient", "123")], None, False),
    ("type not in table", "Practitioner", [("patient", "123")], None, False),
    # _include / _revinclude
    ("_include own subject", "Observation", [("patient", "123"), ("_include", "Observation:patient")], None, True),
    ("_include own subject typed", "Observation",
     [("subject", "Patient/123"), ("_include", "Observation:subject:Patient")], None, True),
    ("_include unpinned param", "Observation", [("patient", "123"), ("_include", "Observation:subject")], None, False),
    ("_include multi-valued performer", "Observation",
     [("performer", "Patient/123"), ("_include", "Observation:performer")], None, False),
    ("_include practitioner", "Observation", [("patient", "123"), ("_include", "Observation:encounter")], None, False),
    ("_include *", "Observation", [("patient", "123"), ("_include", "*")], None, False),
    ("_include:iterate", "Observation", [("patient", "123"), ("_include:iterate", "Observation:patient")], None, False),
    ("_include wrong type", "Observation", [("patient", "123"), ("_include", "Condition:patient")], None, False),
    ("_include in a compartment search (not pinned)", "Observation", [("_include", "Observation:subject")],
     ("Patient", "123"), False),
    ("Patient _revinclude compartment param", "Patient",
     [("_id", "123"), ("_revinclude", "Observation:subject")], None, True),
    ("Patient _revinclude patient param typed", "Patient",
     [("_id", "123"), ("_revinclude", "Provenance:patient:Patient")], None, True),
    ("Patient _revinclude non-compartment param", "Patient",
     [("_id", "123"), ("_revinclude", "Provenance:target")], None, False),
    ("Patient _revinclude Patient:link", "Patient", [("_id", "123"), ("_revinclude", "Patient:link")], None, False),
    ("Observation _revinclude", "Observation", [("patient", "123"), ("_revinclude", "Provenance:target")], None, False),
    ("_revinclude:iterate", "Patient", [("_id", "123"), ("_revinclude:iterate", "Observation:subject")], None, False),
]


@pytest.mark.parametrize(("name", "rtype", "query", "compartment", "confined"), SEARCHES, ids=[s[0] for s in SEARCHES])
def test_search_confined(name: str, rtype: str, query: list, compartment: tuple | None, confined: bool) -> None:
    assert search_confined(rtype, query, CTX, compartment) is confined
