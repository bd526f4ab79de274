"""SMART scope grammar, grants and ceiling intersection (pure; no I/O)."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.scopes import LETTERS, Scope, ScopeSet, parse_scope, parse_scopes

ALL = frozenset(LETTERS)
LETTER_SETS = [frozenset(c) for n in range(len(LETTERS) + 1) for c in combinations(LETTERS, n)]


@pytest.mark.parametrize(
    ("text", "context", "rtype", "letters", "qualifiers"),
    [
        ("patient/Observation.rs", "patient", "Observation", "rs", ()),
        ("system/*.cruds", "system", "*", "cruds", ()),
        ("user/Encounter.cu?category=inpatient", "user", "Encounter", "cu", (("category", "inpatient"),)),
        ("system/Patient.c", "system", "Patient", "c", ()),
        ("system/Patient.d", "system", "Patient", "d", ()),
        ("user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
         "user", "Observation", "rs",
         (("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),)),
        ("patient/Observation.s?code=a%20b&status=final", "patient", "Observation", "s",
         (("code", "a b"), ("status", "final"))),
        ("system/Observation.r?code=%2541", "system", "Observation", "r", (("code", "%41"),)),  # decoded once
        # v1 syntax
        ("patient/Observation.read", "patient", "Observation", "rs", ()),
        ("user/Encounter.write", "user", "Encounter", "cud", ()),
        ("system/*.*", "system", "*", "cruds", ()),
        ("system/Patient.*", "system", "Patient", "cruds", ()),
    ],
)
def test_parse_valid(text: str, context: str, rtype: str, letters: str, qualifiers: tuple) -> None:
    s = parse_scope(text)
    assert (s.context, s.resource_type, s.letters, s.qualifiers, s.raw) == (
        context, rtype, frozenset(letters), qualifiers, text)
    # canonical v2 rendering re-parses to the same grant
    assert parse_scope(s.to_v2()).key == s.key


MALFORMED = [
    "patient/Observation.sr",       # wrong letter order
    "patient/Observation.rr",       # repeat
    "patient/Observation.",         # empty letters
    "patient/Observation",          # no permissions at all
    "admin/Observation.rs",         # unknown context
    "Patient/Observation.rs",       # context is case-sensitive
    "patient/observation.rs",       # lower-case type
    "patient/O.rs",                 # type too short
    "Observation.read",             # no context
    "patient/Observation.rs ",      # trailing space junk
    " patient/Observation.rs",
    "patient/Observation.rs?",      # empty qualifier
    "patient/Observation.rs?=x",    # empty param
    "patient/Observation.rs?category",       # no value
    "patient/Observation.rs?category=",      # empty value
    "patient/Observation.rs?Category=x",     # param must be lower-case
    "patient/Observation.rs?_tag=x",         # param must start with a letter (grammar: ^[a-z][a-z0-9_:.-]*$)
    "patient/Observation.rs?a=b&",           # trailing empty qualifier
    "patient/Observation.rs?a=b=c",
    "patient/Observation.rs?a=%zz",          # malformed percent-escape
    "patient/Observation.read?category=x",   # qualifiers need v2 letters
    "patient/Observation.rsx",
    "patient/Observation.READ",
    "patient/Observation.rs/extra",
    "system/Obs-ervation.rs",
    "system/**.rs",
    "patient//Observation.rs",
    "",
    "openid", "fhirUser", "launch", "launch/patient", "offline_access", "online_access",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_parse_malformed_raises(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_scope(text)
    assert str(err.value)  # actionable message, never empty


@pytest.mark.parametrize("text", MALFORMED)
def test_parse_scopes_drops_malformed(text: str) -> None:
    assert parse_scopes([text, "system/Patient.r"]) == (parse_scope("system/Patient.r"),)


def test_parse_scopes_space_separated_and_non_resource() -> None:
    got = parse_scopes("openid fhirUser launch launch/patient offline_access patient/Observation.rs "
                       "bogus system/Patient.sr user/Encounter.read patient/Observation.read")
    # .rs and .read are the same grant: first one kept
    assert [s.raw for s in got] == ["patient/Observation.rs", "user/Encounter.read"]


def test_parse_scopes_reports_only_malformed() -> None:
    seen: list[str] = []
    parse_scopes("openid system/Patient.sr launch/patient system/Patient.r", on_error=lambda t, e: seen.append(t))
    assert seen == ["system/Patient.sr"]


@pytest.mark.parametrize("granted", LETTER_SETS, ids=lambda s: "".join(sorted(s, key=LETTERS.index)) or "none")
@pytest.mark.parametrize("required", LETTER_SETS, ids=lambda s: "".join(sorted(s, key=LETTERS.index)) or "none")
def test_grants_every_letter_combination(granted: frozenset[str], required: frozenset[str]) -> None:
    scopes = [Scope("system", "Observation", granted, (), "x")] if granted else []
    ss = ScopeSet(scopes)
    assert ss.grants("Observation", required) is (required <= granted)
    assert ss.missing("Observation", required) == required - granted
    # other type, other context: only the empty requirement is granted
    assert ss.grants("Patient", required) is (not required)
    assert ss.grants("Observation", required, contexts=("patient",)) is (not required)


def test_grants_split_across_scopes_and_contexts() -> None:
    ss = ScopeSet.from_strings("system/Observation.c system/*.u patient/Observation.d")
    assert ss.grants("Observation", "cu")
    assert not ss.grants("Observation", "cud")
    assert ss.grants("Observation", "cud", contexts=("system", "patient"))
    assert ss.grants("Observation", "d", contexts="patient")  # a bare string is one context, not letters
    assert ss.missing("Observation", "crud") == frozenset("rd")
    assert ss.grants("Encounter", "u") and not ss.grants("Encounter", "c")


@pytest.mark.parametrize(
    ("scopes", "rtype", "letters", "ok"),
    [
        ("system/*.cruds", "Observation", "cruds", True),
        ("system/*.r", "Patient", "r", True),
        ("system/*.r", "*", "r", True),
        ("system/Patient.cruds", "*", "r", False),   # a typed scope never grants a system-wide interaction
        ("system/*.r", "Patient", "c", False),
        ("system/Patient.r", "Patient", "", True),   # public interaction
        ("", "Patient", "", True),
        ("", "Patient", "r", False),
        ("system/Patient.r", "Patient", "x", False),  # unknown letters are never granted
    ],
)
def test_grants_table(scopes: str, rtype: str, letters: str, ok: bool) -> None:
    assert ScopeSet.from_strings(scopes).grants(rtype, letters) is ok


@pytest.mark.parametrize("text", ["system/Observation.cruds?category=laboratory", "system/*.cruds?code:not=x"])
def test_qualified_scope_grants_nothing(text: str) -> None:
    ss = ScopeSet.from_strings(text)
    assert len(ss) == 1
    for letters in LETTER_SETS:
        if letters:
            assert not ss.grants("Observation", letters)
            assert ss.missing("Observation", letters) == letters


@pytest.mark.parametrize(
    ("token", "ceiling", "expected"),
    [
        ("system/Observation.cruds", "system/Observation.rs", ["system/Observation.rs"]),
        ("system/*.cruds", "system/Observation.cr", ["system/Observation.cr"]),
        ("system/Observation.cu", "system/*.rs", []),                       # letters disjoint
        ("system/Observation.r", "system/*.rs", ["system/Observation.r"]),
        ("patient/Observation.rs", "system/Observation.rs", []),            # context must match
        ("system/Patient.r", "system/Observation.r", []),
        ("system/*.rs", "system/*.r", ["system/*.r"]),
        ("system/Observation.rs?category=lab", "system/Observation.r", ["system/Observation.r?category=lab"]),
        ("system/Observation.rs", "system/*.rs?code=x",
         ["system/Observation.rs?code=x"]),
        ("system/Observation.rs?a=1", "system/Observation.rs?b=2", ["system/Observation.rs?a=1&b=2"]),
        ("system/Observation.rs?a=1", "system/Observation.rs?a=1", ["system/Observation.rs?a=1"]),
        ("system/Observation.c system/Patient.u", "system/*.cu", ["system/Observation.c", "system/Patient.u"]),
        ("", "system/*.cruds", []),
        ("system/*.cruds", "", []),
    ],
)
def test_intersect_table(token: str, ceiling: str, expected: list[str]) -> None:
    eff = ScopeSet.from_strings(token).intersect(ScopeSet.from_strings(ceiling))
    assert list(eff.as_strings()) == expected


def test_as_strings_is_stable_and_v2() -> None:
    a = ScopeSet.from_strings("user/Encounter.write system/Patient.read patient/Observation.rs?b=2&a=1")
    b = ScopeSet.from_strings("patient/Observation.rs?b=2&a=1 system/Patient.rs user/Encounter.cud")
    assert a.as_strings() == b.as_strings() == (
        "patient/Observation.rs?b=2&a=1", "system/Patient.rs", "user/Encounter.cud")
    assert a == b and len(a) == 3 and all(isinstance(s, Scope) for s in a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"context": "admin", "resource_type": "Patient", "letters": frozenset("r")},
        {"context": "system", "resource_type": "patient", "letters": frozenset("r")},
        {"context": "system", "resource_type": "Patient", "letters": frozenset()},
        {"context": "system", "resource_type": "Patient", "letters": frozenset("rx")},
    ],
)
def test_scope_constructor_rejects_invalid(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Scope(qualifiers=(), raw="x", **kwargs)


# --- property: the effective set never widens either side ------------------------------------------

TYPES = ["Observation", "Patient", "Encounter", "*"]
CTXS = ["patient", "user", "system"]
scope_st = st.builds(
    lambda ctx, t, letters, q: Scope(ctx, t, frozenset(letters), q, "generated"),
    st.sampled_from(CTXS),
    st.sampled_from(TYPES),
    st.sets(st.sampled_from(LETTERS), min_size=1),
    st.sampled_from([(), (("category", "lab"),), (("code", "x"), ("status", "final"))]),
)
scope_sets = st.lists(scope_st, max_size=6).map(ScopeSet)
QUERIES = [(t, ls, c) for t in TYPES for ls in LETTER_SETS if ls for c in CTXS]


@settings(max_examples=150, deadline=None)
@given(token=scope_sets, ceiling=scope_sets)
def test_intersection_never_widens(token: ScopeSet, ceiling: ScopeSet) -> None:
    eff = token.intersect(ceiling)
    reverse = ceiling.intersect(token)
    for rtype, letters, ctx in QUERIES:
        if eff.grants(rtype, letters, contexts=(ctx,)):
            assert ceiling.grants(rtype, letters, contexts=(ctx,)), (rtype, letters, ctx)
            assert token.grants(rtype, letters, contexts=(ctx,)), (rtype, letters, ctx)
        # grant-wise the intersection is symmetric
        assert eff.grants(rtype, letters, contexts=(ctx,)) == reverse.grants(rtype, letters, contexts=(ctx,))
    # rendering round-trips
    for s in eff:
        assert parse_scope(s.to_v2()).key == s.key


@settings(max_examples=100, deadline=None)
@given(token=scope_sets)
def test_intersect_with_self_keeps_unqualified_grants(token: ScopeSet) -> None:
    eff = token.intersect(token)
    for rtype, letters, ctx in QUERIES:
        assert eff.grants(rtype, letters, contexts=(ctx,)) == token.grants(rtype, letters, contexts=(ctx,))


# --- v2 qualifiers evaluated on a resource -----------------------------------------------------------

OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"


def observation(*, category: list | None = None, status: str | None = "final", code: dict | None = None) -> dict:
    r: dict = {"resourceType": "Observation"}
    if category is not None:
        r["category"] = category
    if status is not None:
        r["status"] = status
    if code is not None:
        r["code"] = code
    return r


VITALS = observation(category=[{"coding": [{"system": OBS_CAT, "code": "vital-signs"}]}],
                     code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}]})
NO_SYSTEM = observation(category=[{"coding": [{"code": "vital-signs"}]}])
TWO_CATS = observation(category=[{"coding": [{"system": OBS_CAT, "code": "laboratory"}]},
                                 {"text": "x", "coding": [{"system": "http://other", "code": "vital-signs"}]}])


@pytest.mark.parametrize(
    ("qualifier", "resource", "ok"),
    [
        ("category=vital-signs", VITALS, True),                                 # code, any system
        (f"category={OBS_CAT}|vital-signs", VITALS, True),                      # system|code
        (f"category={OBS_CAT}|", VITALS, True),                                 # system| (any code)
        ("category=|vital-signs", VITALS, False),                               # |code: must have no system
        ("category=|vital-signs", NO_SYSTEM, True),
        (f"category={OBS_CAT}|vital-signs", NO_SYSTEM, False),
        ("category=vital-signs", NO_SYSTEM, True),
        ("category=laboratory", VITALS, False),                                 # mismatch
        (f"category={OBS_CAT}|laboratory", VITALS, False),
        ("category=http://other|", VITALS, False),
        ("category=vital-signs", observation(), False),                         # missing element
        ("category=vital-signs", observation(category=[{"text": "vital-signs"}]), False),  # text is not a code
        ("category=vital-signs", observation(category=[{"coding": "junk"}]), False),      # malformed element
        ("category=vital-signs", TWO_CATS, True),                               # any of the repeats
        (f"category={OBS_CAT}|vital-signs", TWO_CATS, False),                   # system and code on ONE coding
        ("category=laboratory,vital-signs", VITALS, True),                      # OR list
        ("category=laboratory,survey", VITALS, False),
        ("category=vital\\-signs", VITALS, False),                              # escapes: not evaluated
        ("category=|", VITALS, False),                                          # neither system nor code
        ("category=a|b|c", VITALS, False),
        ("category=vital-signs,", VITALS, False),                               # empty alternative
        ("code=http://loinc.org|8867-4", VITALS, True),
        ("code=8867-4", observation(code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}), True),
        ("status=final", VITALS, True),                                         # code-typed element
        ("status=final,amended", observation(status="amended"), True),
        ("status=final", observation(status="preliminary"), False),
        ("status=final", observation(status=None), False),
        ("status=http://hl7.org/fhir/observation-status|final", VITALS, False),  # implicit system: not evaluated
        ("status=|final", VITALS, False),
        ("category:not=laboratory", VITALS, False),                             # modifier -> no grant
        ("category:text=vital", VITALS, False),
        ("subject=Patient/1", VITALS, False),                                   # unknown qualifier param
        ("value-quantity=1", VITALS, False),
        ("subject.name=x", VITALS, False),                                      # chain
        ("category=vital-signs&status=final", VITALS, True),                    # every qualifier must hold
        ("category=vital-signs&status=amended", VITALS, False),
        ("category=vital-signs&code=xyz", VITALS, False),
        ("category=vital-signs&category=laboratory", VITALS, False),            # repeated param = AND
        ("category=vital-signs&category=laboratory", TWO_CATS, True),                # both repeats present
        ("category=laboratory&category=http://other|vital-signs", TWO_CATS, True),
    ],
)
def test_qualifier_evaluation(qualifier: str, resource: dict, ok: bool) -> None:
    ss = ScopeSet.from_strings(f"patient/Observation.cu?{qualifier}")
    assert len(ss) == 1
    assert ss.grants_resource("Observation", "cu", resource, contexts=("patient",)) is ok
    assert ss.missing("Observation", "cu", contexts="patient", resource=resource) == (
        frozenset() if ok else frozenset("cu"))
    # without a resource a qualified scope never grants, whatever the resource would have said
    assert not ss.grants("Observation", "c", contexts=("patient",))
    assert not ss.grants_resource("Observation", "c", None, contexts=("patient",))
    # a grant never leaks to another context
    assert not ss.grants_resource("Observation", "c", resource, contexts=("system", "user"))


@pytest.mark.parametrize(
    ("rtype", "qualifier", "resource", "ok"),
    [
        ("DocumentReference", "type=http://loinc.org|34133-9",
         {"resourceType": "DocumentReference", "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9"}]}},
         True),
        ("DocumentReference", "category=clinical-note",
         {"resourceType": "DocumentReference", "category": [{"coding": [{"code": "clinical-note"}]}]}, True),
        ("Condition", "category=problem-list-item",
         {"resourceType": "Condition", "category": [{"coding": [{"code": "encounter-diagnosis"}]}]}, False),
        ("Encounter", "type=X", {"resourceType": "Encounter", "type": [{"coding": [{"code": "X"}]}]}, True),
        ("Encounter", "category=X", {"resourceType": "Encounter", "type": [{"coding": [{"code": "X"}]}]}, False),
        ("MedicationRequest", "code=rx1",
         {"resourceType": "MedicationRequest", "medicationCodeableConcept": {"coding": [{"code": "rx1"}]}}, True),
        ("MedicationRequest", "code=rx1",
         {"resourceType": "MedicationRequest", "medicationReference": {"reference": "Medication/rx1"}}, False),
        ("AllergyIntolerance", "code=peanut",
         {"resourceType": "AllergyIntolerance", "reaction": [{"substance": {"coding": [{"code": "peanut"}]}}]}, True),
        ("AllergyIntolerance", "category=food", {"resourceType": "AllergyIntolerance", "category": ["food"]}, True),
        ("Practitioner", "status=active", {"resourceType": "Practitioner", "status": "active"}, False),  # no mapping
        ("Observation", "category=x",
         {"resourceType": "Condition", "category": [{"coding": [{"code": "x"}]}]}, False),  # type mismatch
    ],
)
def test_qualifier_table_by_type(rtype: str, qualifier: str, resource: dict, ok: bool) -> None:
    ss = ScopeSet.from_strings(f"system/{rtype}.c?{qualifier}")
    assert ss.grants_resource(rtype, "c", resource) is ok


def test_qualifier_table_only_supported_params() -> None:
    from sidecar.scopes import QUALIFIER_ELEMENTS
    assert {p for _, p in QUALIFIER_ELEMENTS} <= {"category", "code", "status", "type"}
    assert {k for _, k in QUALIFIER_ELEMENTS.values()} <= {"CodeableConcept", "Coding", "code"}


def test_coding_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.scopes as scopes
    monkeypatch.setitem(scopes.QUALIFIER_ELEMENTS, ("Encounter", "type"), (("class",), "Coding"))
    enc = {"resourceType": "Encounter", "class": {"system": "http://v3", "code": "AMB"}}
    for q, ok in [("AMB", True), ("http://v3|AMB", True), ("http://v3|", True), ("|AMB", False), ("IMP", False)]:
        assert ScopeSet.from_strings(f"system/Encounter.u?type={q}").grants_resource("Encounter", "u", enc) is ok, q


def test_wildcard_type_qualified_scope_uses_the_concrete_type() -> None:
    ss = ScopeSet.from_strings("system/*.c?status=final")
    assert ss.grants_resource("Observation", "c", VITALS)
    assert not ss.grants_resource("Observation", "c", observation(status="amended"))
    assert not ss.grants_resource("Patient", "c", {"resourceType": "Patient", "status": "final"})  # no mapping
    assert not ss.grants_resource("*", "c", VITALS)  # a system-wide requirement is never qualified


def test_letters_split_across_qualified_and_unqualified_scopes() -> None:
    ss = ScopeSet.from_strings("patient/Observation.c?category=vital-signs patient/Observation.u?status=final "
                               "patient/Observation.r")
    assert ss.grants_resource("Observation", "cru", VITALS, contexts="patient")
    assert not ss.grants_resource("Observation", "cru", observation(status="final"), contexts="patient")
    assert ss.missing("Observation", "cru", contexts="patient", resource=observation(status="final")) == {"c"}
    assert ss.missing("Observation", "cru", contexts="patient") == {"c", "u"}


def test_write_checks_result_and_current_independently() -> None:
    # the docstring contract: an update is granted only if BOTH the result and `current` satisfy it
    ss = ScopeSet.from_strings("patient/Observation.u?category=vital-signs")
    lab = observation(category=[{"coding": [{"system": OBS_CAT, "code": "laboratory"}]}])
    assert ss.grants_resource("Observation", "u", VITALS, contexts="patient")
    assert not ss.grants_resource("Observation", "u", lab, contexts="patient")  # current=lab -> refuse the move


@pytest.mark.parametrize(
    ("scopes", "resource", "expected", "best", "best_without_system"),
    [
        ("system/Observation.cu patient/Observation.cu", None, {"system", "patient"}, "system", "patient"),
        ("user/Observation.cu patient/Observation.cu", None, {"user", "patient"}, "user", "user"),
        ("patient/Observation.c system/Observation.u", None, set(), None, None),   # never assembled across
        ("patient/Observation.cu?category=vital-signs", VITALS, {"patient"}, "patient", "patient"),
        ("patient/Observation.cu?category=vital-signs", None, set(), None, None),
        ("system/Observation.cu?category=laboratory patient/Observation.cu", VITALS, {"patient"}, "patient",
         "patient"),
        ("system/*.cruds", None, {"system"}, "system", None),
        ("", None, set(), None, None),
    ],
)
def test_contexts_for_and_best_context(scopes: str, resource: dict | None, expected: set, best: str | None,
                                       best_without_system: str | None) -> None:
    ss = ScopeSet.from_strings(scopes)
    assert ss.contexts_for("Observation", "cu", resource) == expected
    assert ss.best_context("Observation", "cu", resource) == best
    assert ss.best_context("Observation", "cu", resource, available=("user", "patient")) == best_without_system
    assert ss.best_context("Observation", "cu", resource, available=()) is None


def test_contexts_for_empty_letters_is_every_context() -> None:
    assert ScopeSet(()).contexts_for("Patient", "") == frozenset({"patient", "user", "system"})


def test_v1_scopes_unaffected_by_resources() -> None:
    ss = ScopeSet.from_strings("patient/Observation.write user/Condition.read")
    assert ss.grants_resource("Observation", "cud", VITALS, contexts="patient")
    assert ss.grants_resource("Observation", "cud", {"resourceType": "Observation"}, contexts="patient")
    assert ss.grants_resource("Observation", "cud", None, contexts="patient")
    assert not ss.grants_resource("Observation", "r", VITALS, contexts="patient")
    assert ss.grants_resource("Condition", "rs", None, contexts="user")


RESOURCES = [
    VITALS, NO_SYSTEM, TWO_CATS, observation(), observation(status="amended"),
    observation(category=[{"coding": [{"code": "lab"}]}], code={"coding": [{"code": "x"}]}),
    observation(category=[{"coding": [{"code": "lab"}]}], code={"coding": [{"code": "x"}]}, status="amended"),
]
qualified_scope_st = st.builds(
    lambda ctx, t, letters, q: Scope(ctx, t, frozenset(letters), q, "generated"),
    st.sampled_from(CTXS),
    st.sampled_from(TYPES),
    st.sets(st.sampled_from(LETTERS), min_size=1),
    st.sampled_from([(), (("category", "lab"),), (("code", "x"), ("status", "final")), (("status", "final"),),
                     (("category", "vital-signs"),), (("category:not", "lab"),)]),
)
qualified_sets = st.lists(qualified_scope_st, max_size=6).map(ScopeSet)


@settings(max_examples=150, deadline=None)
@given(token=qualified_sets, ceiling=qualified_sets)
def test_intersection_never_widens_on_resources(token: ScopeSet, ceiling: ScopeSet) -> None:
    eff = token.intersect(ceiling)
    for resource in RESOURCES:
        for ls in LETTER_SETS:
            if not ls:
                continue
            for ctx in CTXS:
                got = eff.grants_resource("Observation", ls, resource, contexts=(ctx,))
                if got:
                    assert token.grants_resource("Observation", ls, resource, contexts=(ctx,))
                    assert ceiling.grants_resource("Observation", ls, resource, contexts=(ctx,))
                assert got == ceiling.intersect(token).grants_resource("Observation", ls, resource, contexts=(ctx,))
                # a resource can only add grants to the resource-free answer, never remove them
                if eff.grants("Observation", ls, contexts=(ctx,)):
                    assert got
