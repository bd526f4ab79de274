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
