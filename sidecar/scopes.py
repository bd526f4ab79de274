"""SMART App Launch scope grammar (v1 and v2) and scope-set ceilings. Pure: no I/O.

Fail-closed rules:
- malformed resource scopes grant nothing (``parse_scopes`` drops them);
- a scope with v2 qualifiers (``?category=...``) grants nothing without a resource to evaluate them
  on (``grants``/``missing`` with no resource: searches, system-wide requirements); with a resource
  (``grants_resource``) it grants only if the resource satisfies every qualifier, and a qualifier
  this module cannot evaluate (table ``QUALIFIER_ELEMENTS``) makes the scope grant nothing;
- ``ScopeSet.intersect`` can only narrow: the effective set never grants what either side does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = [
    "CONTEXTS", "CONTEXT_PRECEDENCE", "LETTERS", "NON_RESOURCE_SCOPES", "QUALIFIER_ELEMENTS", "Scope", "ScopeSet",
    "parse_scope", "parse_scopes", "qualifiers_hold",
]

CONTEXTS: frozenset[str] = frozenset({"patient", "user", "system"})
LETTERS = "cruds"  # canonical v2 order
NON_RESOURCE_SCOPES: frozenset[str] = frozenset({
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
    "offline_access", "online_access",
})
# Which grant the caller acts on when several contexts grant: system (no per-patient/user limit
# enforced here), then user (needs a fhirUser), then patient (needs the compartment check).
CONTEXT_PRECEDENCE: tuple[str, ...] = ("system", "user", "patient")
_V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(LETTERS)}

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_LETTERS_RE = re.compile(r"^c?r?u?d?s?$")
_PARAM_RE = re.compile(r"^[a-z][a-z0-9_:.-]*$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SHAPE_RE = re.compile(r"^(?P<ctx>[^/]*)/(?P<type>[^.]*)\.(?P<perm>[^?]*)(?:\?(?P<qual>.*))?$", re.S)
# Characters left readable when rendering qualifier values (token/URL system values); "&", "=", "?",
# "%" and whitespace are always percent-encoded so the rendered form re-parses to the same value.
_QUOTE_SAFE = ":/|-._~,"


def _render(context: str, resource_type: str, letters: frozenset[str], qualifiers: tuple[tuple[str, str], ...]) -> str:
    text = f"{context}/{resource_type}.{''.join(c for c in LETTERS if c in letters)}"
    if qualifiers:
        text += "?" + "&".join(f"{p}={quote(v, safe=_QUOTE_SAFE)}" for p, v in qualifiers)
    return text


@dataclass(frozen=True, slots=True)
class Scope:
    context: str
    resource_type: str
    letters: frozenset[str]
    qualifiers: tuple[tuple[str, str], ...]
    raw: str

    def __post_init__(self) -> None:
        # Direct construction must not smuggle in states the parser would reject.
        if self.context not in CONTEXTS:
            raise ValueError(f"scope context must be one of patient, user, system; got {self.context!r}")
        if self.resource_type != "*" and not _TYPE_RE.match(self.resource_type):
            raise ValueError(f"invalid resource type {self.resource_type!r}")
        if not self.letters or not self.letters <= frozenset(LETTERS):
            raise ValueError(f"scope letters must be a non-empty subset of c,r,u,d,s; got {sorted(self.letters)}")

    @property
    def key(self) -> tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]:
        """Identity without ``raw``: ``.read`` and ``.rs`` are the same grant."""
        return (self.context, self.resource_type, self.letters, self.qualifiers)

    def to_v2(self) -> str:
        return _render(self.context, self.resource_type, self.letters, self.qualifiers)


def _parse_letters(perm: str, text: str, has_qualifiers: bool) -> frozenset[str]:
    if perm in _V1:
        if has_qualifiers:
            raise ValueError(f"scope {text!r}: qualifiers need v2 letters (e.g. '.rs?...'), not '.{perm}'")
        return _V1[perm]
    if not perm:
        raise ValueError(f"scope {text!r}: no permissions after '.'; use letters from 'cruds' or read/write/*")
    unknown = sorted(set(perm) - set(LETTERS))
    if unknown:
        raise ValueError(f"scope {text!r}: unknown permission {perm!r}; use letters from 'cruds' or read/write/*")
    if len(set(perm)) != len(perm):
        raise ValueError(f"scope {text!r}: repeated permission letters in {perm!r}")
    if not _LETTERS_RE.match(perm):
        raise ValueError(f"scope {text!r}: letters {perm!r} must appear in the order c,r,u,d,s")
    return frozenset(perm)


def _parse_qualifiers(qual: str, text: str) -> tuple[tuple[str, str], ...]:
    if not qual:
        raise ValueError(f"scope {text!r}: empty qualifier after '?'; remove '?' or add param=value")
    out: list[tuple[str, str]] = []
    for part in qual.split("&"):
        param, sep, value = part.partition("=")
        if not sep or not _PARAM_RE.match(param):
            raise ValueError(f"scope {text!r}: qualifier {part!r} must be param=value with a lower-case param name")
        if not value or "=" in value or "?" in value:
            raise ValueError(f"scope {text!r}: qualifier {param!r} needs one non-empty value (percent-encode '=', '?')")
        if _BAD_PERCENT.search(value):
            raise ValueError(f"scope {text!r}: qualifier {param!r} has a malformed percent-escape")
        out.append((param, unquote(value)))
    return tuple(out)


def parse_scope(text: str) -> Scope:
    """Parse one SMART resource scope; raise ``ValueError`` saying what to fix."""
    if not isinstance(text, str):
        raise ValueError(f"scope must be a string, got {type(text).__name__}")
    if text in NON_RESOURCE_SCOPES or text.startswith("launch/"):
        raise ValueError(f"{text!r} is not a resource scope (identity/launch/refresh scopes grant no data access)")
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"scope {text!r} is empty or contains whitespace; pass one scope per item")
    m = _SHAPE_RE.match(text)
    if m is None:
        raise ValueError(f"scope {text!r} must look like 'system/Observation.rs' (context/Type.permissions)")
    ctx, rtype, perm, qual = m["ctx"], m["type"], m["perm"], m["qual"]
    if ctx not in CONTEXTS:
        raise ValueError(f"scope {text!r}: unknown context {ctx!r}; use patient, user or system")
    if rtype != "*" and not _TYPE_RE.match(rtype):
        raise ValueError(f"scope {text!r}: resource type {rtype!r} must be a FHIR type name like 'Observation' or '*'")
    letters = _parse_letters(perm, text, qual is not None)
    qualifiers = _parse_qualifiers(qual, text) if qual is not None else ()
    return Scope(ctx, rtype, letters, qualifiers, text)


def parse_scopes(
    texts: Iterable[str] | str, *, on_error: Callable[[str, ValueError], None] | None = None
) -> tuple[Scope, ...]:
    """Parse a space-separated string or an iterable; malformed scopes are dropped (optionally reported).

    Non-resource scopes (openid, fhirUser, launch…, offline_access…) are skipped silently. Duplicates
    (same grant, e.g. ``.read`` and ``.rs``) are collapsed, first occurrence wins.
    """
    items = texts.split() if isinstance(texts, str) else list(texts)
    seen: set[tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]] = set()
    out: list[Scope] = []
    for item in items:
        if isinstance(item, str) and (item in NON_RESOURCE_SCOPES or item.startswith("launch/")):
            continue
        try:
            scope = parse_scope(item)
        except ValueError as err:
            if on_error is not None:
                on_error(str(item), err)
            continue
        if scope.key not in seen:
            seen.add(scope.key)
            out.append(scope)
    return tuple(out)


# --- v2 qualifiers -----------------------------------------------------------------------------------

_CC, _CODING, _CODE = "CodeableConcept", "Coding", "code"
# (resource type, search parameter) -> (element paths, FHIR type of the element). A resource
# satisfies ``param=value`` if ANY value at ANY of the paths matches (the search semantics of the
# R4 parameter: e.g. AllergyIntolerance `code` = `code | reaction.substance`; MedicationRequest
# `code` = `medication.as(CodeableConcept)`). Only the token parameters category, code, status and
# type of these types are evaluated; any other (type, param) makes the scope grant nothing.
QUALIFIER_ELEMENTS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("AllergyIntolerance", "category"): (("category",), _CODE),
    ("AllergyIntolerance", "code"): (("code", "reaction.substance"), _CC),
    ("AllergyIntolerance", "type"): (("type",), _CODE),
    ("Appointment", "status"): (("status",), _CODE),
    ("Basic", "code"): (("code",), _CC),
    ("CarePlan", "category"): (("category",), _CC),
    ("CarePlan", "status"): (("status",), _CODE),
    ("CareTeam", "category"): (("category",), _CC),
    ("CareTeam", "status"): (("status",), _CODE),
    ("Communication", "category"): (("category",), _CC),
    ("Communication", "status"): (("status",), _CODE),
    ("Composition", "category"): (("category",), _CC),
    ("Composition", "status"): (("status",), _CODE),
    ("Composition", "type"): (("type",), _CC),
    ("Condition", "category"): (("category",), _CC),
    ("Condition", "code"): (("code",), _CC),
    ("Consent", "category"): (("category",), _CC),
    ("Consent", "status"): (("status",), _CODE),
    ("Coverage", "status"): (("status",), _CODE),
    ("Coverage", "type"): (("type",), _CC),
    ("DiagnosticReport", "category"): (("category",), _CC),
    ("DiagnosticReport", "code"): (("code",), _CC),
    ("DiagnosticReport", "status"): (("status",), _CODE),
    ("DocumentReference", "category"): (("category",), _CC),
    ("DocumentReference", "status"): (("status",), _CODE),
    ("DocumentReference", "type"): (("type",), _CC),
    ("Encounter", "status"): (("status",), _CODE),
    ("Encounter", "type"): (("type",), _CC),
    ("EpisodeOfCare", "status"): (("status",), _CODE),
    ("EpisodeOfCare", "type"): (("type",), _CC),
    ("Goal", "category"): (("category",), _CC),
    ("Immunization", "status"): (("status",), _CODE),
    ("List", "code"): (("code",), _CC),
    ("List", "status"): (("status",), _CODE),
    ("MedicationAdministration", "code"): (("medicationCodeableConcept",), _CC),
    ("MedicationAdministration", "status"): (("status",), _CODE),
    ("MedicationDispense", "code"): (("medicationCodeableConcept",), _CC),
    ("MedicationDispense", "status"): (("status",), _CODE),
    ("MedicationDispense", "type"): (("type",), _CC),
    ("MedicationRequest", "category"): (("category",), _CC),
    ("MedicationRequest", "code"): (("medicationCodeableConcept",), _CC),
    ("MedicationRequest", "status"): (("status",), _CODE),
    ("MedicationStatement", "category"): (("category",), _CC),
    ("MedicationStatement", "code"): (("medicationCodeableConcept",), _CC),
    ("MedicationStatement", "status"): (("status",), _CODE),
    ("Observation", "category"): (("category",), _CC),
    ("Observation", "code"): (("code",), _CC),
    ("Observation", "status"): (("status",), _CODE),
    ("Procedure", "category"): (("category",), _CC),
    ("Procedure", "code"): (("code",), _CC),
    ("Procedure", "status"): (("status",), _CODE),
    ("QuestionnaireResponse", "status"): (("status",), _CODE),
    ("ServiceRequest", "category"): (("category",), _CC),
    ("ServiceRequest", "code"): (("code",), _CC),
    ("ServiceRequest", "status"): (("status",), _CODE),
    ("Specimen", "status"): (("status",), _CODE),
    ("Specimen", "type"): (("type",), _CC),
    ("Task", "code"): (("code",), _CC),
    ("Task", "status"): (("status",), _CODE),
}
_ANY_SYSTEM = object()  # token "code": any system (including none)


def _token_alternatives(value: str) -> list[tuple[object, str]] | None:
    """``a,b`` -> OR of (system, code); system "" = no system, code "" = any code. None: cannot evaluate."""
    if "\\" in value:  # escaped ',', '|' or '$': not supported, refuse rather than misread
        return None
    out: list[tuple[object, str]] = []
    for alt in value.split(","):
        if not alt:
            return None
        if "|" not in alt:
            out.append((_ANY_SYSTEM, alt))
            continue
        system, _, code = alt.partition("|")
        if "|" in code or (not system and not code):
            return None
        out.append((system, code))
    return out


def _element_values(node: object, path: str) -> list[object]:
    values: list[object] = [node]
    for name in path.split("."):
        nxt: list[object] = []
        for v in values:
            child = v.get(name) if isinstance(v, dict) else None
            if isinstance(child, list):
                nxt.extend(child)
            elif child is not None:
                nxt.append(child)
        values = nxt
    return values


def _coding_matches(coding: object, system: object, code: str) -> bool:
    if not isinstance(coding, dict):
        return False
    c_system, c_code = coding.get("system"), coding.get("code")
    if system is _ANY_SYSTEM:
        return isinstance(c_code, str) and c_code == code
    if system == "":  # "|code": the coding must have no system
        return "system" not in coding and isinstance(c_code, str) and c_code == code
    if not isinstance(c_system, str) or c_system != system:
        return False
    return code == "" or (isinstance(c_code, str) and c_code == code)


def _token_matches(value: object, kind: str, system: object, code: str) -> bool:
    """Does one element value match one (evaluable) token alternative?"""
    if kind == _CODE:
        return isinstance(value, str) and value == code
    if kind == _CODING:
        return _coding_matches(value, system, code)
    codings = value.get("coding") if isinstance(value, dict) else None  # CodeableConcept
    return isinstance(codings, list) and any(_coding_matches(c, system, code) for c in codings)


def qualifiers_hold(resource_type: str, qualifiers: Iterable[tuple[str, str]], resource: object) -> bool:
    """True iff ``resource`` (of ``resource_type``) satisfies every qualifier. Fail closed: an unknown
    (type, param), a modifier (``category:not``), an unsupported value form, a missing element or a
    resource of another type all give False."""
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        return False
    for param, value in qualifiers:
        spec = QUALIFIER_ELEMENTS.get((resource_type, param))
        alternatives = _token_alternatives(value) if spec is not None else None
        if spec is None or alternatives is None:
            return False
        paths, kind = spec
        if kind not in (_CC, _CODING, _CODE):
            return False
        if kind == _CODE and any(system is not _ANY_SYSTEM for system, _ in alternatives):
            return False  # a code's system is implicit (its value set's): "sys|code" forms are refused
        values = [v for p in paths for v in _element_values(resource, p)]
        if not any(_token_matches(v, kind, system, code) for system, code in alternatives for v in values):
            return False
    return True


class ScopeSet:
    """An immutable set of parsed scopes answering "is this interaction granted?"."""

    __slots__ = ("_scopes",)

    def __init__(self, scopes: Iterable[Scope]) -> None:
        seen: set[tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]] = set()
        kept: list[Scope] = []
        for scope in scopes:
            if not isinstance(scope, Scope):
                raise TypeError(f"ScopeSet takes Scope objects, got {type(scope).__name__}")
            if scope.key not in seen:
                seen.add(scope.key)
                kept.append(scope)
        self._scopes: tuple[Scope, ...] = tuple(kept)

    @classmethod
    def from_strings(cls, texts: Iterable[str] | str) -> ScopeSet:
        return cls(parse_scopes(texts))

    @staticmethod
    def _contexts(contexts: Iterable[str]) -> frozenset[str]:
        return frozenset({contexts}) if isinstance(contexts, str) else frozenset(contexts)

    def _granted(self, resource_type: str, resource: dict | None, ctxs: frozenset[str]) -> set[str]:
        granted: set[str] = set()
        for s in self._scopes:
            if s.context not in ctxs or not (s.resource_type == resource_type or s.resource_type == "*"):
                continue
            # A qualified scope grants only on a resource that satisfies it; without one (or for a
            # system-wide "*" requirement) granting it would ignore its restriction (fail closed).
            if s.qualifiers and (resource is None or resource_type == "*"
                                 or not qualifiers_hold(resource_type, s.qualifiers, resource)):
                continue
            granted |= s.letters
        return granted

    def missing(
        self, resource_type: str, letters: Iterable[str], *, contexts: Iterable[str] = ("system",),
        resource: dict | None = None,
    ) -> frozenset[str]:
        """Required letters that no scope in ``contexts`` grants for ``resource_type``.

        Without ``resource`` only unqualified scopes count; with it, qualified scopes count too when
        ``resource`` satisfies all their qualifiers (see ``grants_resource``).
        """
        return frozenset(letters) - self._granted(resource_type, resource, self._contexts(contexts))

    def grants(
        self, resource_type: str, letters: Iterable[str], *, contexts: Iterable[str] = ("system",)
    ) -> bool:
        """True iff every required letter is granted; an empty letter set is always granted.

        Qualified scopes never count here (no resource to evaluate them on): use ``grants_resource``.
        """
        return not self.missing(resource_type, letters, contexts=contexts)

    def grants_resource(
        self, resource_type: str, letters: Iterable[str], resource: dict | None, *,
        contexts: Iterable[str] = ("system",),
    ) -> bool:
        """``grants`` for one concrete resource: qualified scopes count if it satisfies every qualifier.

        E.g. ``patient/Observation.cu?category=vital-signs`` grants ``cu`` on an Observation whose
        ``category`` has a coding with code ``vital-signs``. Letters may be split across scopes
        (``.c?x`` + ``.u?x``). ``resource=None`` is exactly ``grants``.

        For a write the caller checks BOTH resources the write touches, independently:
        create -> the new resource; update/patch -> the result resource AND ``current`` (the stored
        version; a patch's result is ``current`` with the patch applied); delete -> ``current``.
        Otherwise a client could move a resource out of (or into) its qualified slice. In a Bundle,
        every entry is checked on its own. This does not check the patient compartment: see
        ``contexts_for`` and ``sidecar.compartment``.
        """
        return not self.missing(resource_type, letters, contexts=contexts, resource=resource)

    def contexts_for(
        self, resource_type: str, letters: Iterable[str], resource: dict | None = None
    ) -> frozenset[str]:
        """The contexts (subset of patient/user/system) whose scopes ALONE grant every letter.

        A grant is not assembled across contexts here: ``patient/Observation.c`` plus
        ``system/Observation.u`` give no context for ``cu``. The caller acts on the strongest one
        (``best_context``): system -> no further limit; user -> requires a ``fhirUser`` claim;
        patient -> requires a ``patient`` claim and ``sidecar.compartment`` checks.
        """
        required = frozenset(letters)
        return frozenset(
            c for c in CONTEXTS if required <= self._granted(resource_type, resource, frozenset({c})))

    def best_context(
        self, resource_type: str, letters: Iterable[str], resource: dict | None = None, *,
        available: Iterable[str] = CONTEXTS,
    ) -> str | None:
        """First of system, user, patient (``CONTEXT_PRECEDENCE``) that grants and is ``available``
        (e.g. drop "user" without a fhirUser claim, "patient" without a patient claim); None: denied."""
        got = self.contexts_for(resource_type, letters, resource) & self._contexts(available)
        return next((c for c in CONTEXT_PRECEDENCE if c in got), None)

    def intersect(self, ceiling: ScopeSet) -> ScopeSet:
        """Effective scopes = token ∩ client ceiling. Narrowing only: letters ∩, qualifiers ∪, type the more specific."""
        out: list[Scope] = []
        for t in self._scopes:
            for c in ceiling._scopes:
                if t.context != c.context:
                    continue
                if t.resource_type == c.resource_type or c.resource_type == "*":
                    rtype = t.resource_type
                elif t.resource_type == "*":
                    rtype = c.resource_type
                else:
                    continue
                letters = t.letters & c.letters
                if not letters:
                    continue
                quals = t.qualifiers + tuple(q for q in c.qualifiers if q not in t.qualifiers)
                out.append(Scope(t.context, rtype, letters, quals, _render(t.context, rtype, letters, quals)))
        return ScopeSet(out)

    def as_strings(self) -> tuple[str, ...]:
        """Sorted canonical v2 strings: stable across token scope order, for logs and audit."""
        return tuple(sorted({s.to_v2() for s in self._scopes}))

    def __iter__(self) -> Iterator[Scope]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScopeSet) and {s.key for s in self} == {s.key for s in other}

    def __hash__(self) -> int:
        return hash(frozenset(s.key for s in self._scopes))

    def __repr__(self) -> str:
        return f"ScopeSet({list(self.as_strings())!r})"
