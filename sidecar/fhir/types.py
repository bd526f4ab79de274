"""FHIR R4 type tables and operation/parameter tables (deny by default).

Resource types
--------------
``R4_RESOURCE_TYPES`` holds the 146 concrete FHIR R4 (4.0.1) resource types
(``sidecar/data/r4_resource_types.txt``; the abstract ``Resource`` and
``DomainResource`` are not types a client may send).

We validate bodies with the ``fhir.resources.R4B`` models because the package
ships no R4 models. R4B is R4-compatible except for a limited set of content,
so:

* ``UNSUPPORTED_R4_TYPES`` = R4 types without any R4B model (18 types:
  ``EffectEvidenceSynthesis``, ``RiskEvidenceSynthesis``, the ten
  ``MedicinalProduct*`` types, ``SubstanceNucleicAcid``, ``SubstancePolymer``,
  ``SubstanceProtein``, ``SubstanceReferenceInformation``,
  ``SubstanceSourceMaterial``, ``SubstanceSpecification``). The caller must
  refuse them; it never passes them through unvalidated.
* ``R4B_INCOMPATIBLE_TYPES`` = R4 types that do have an R4B model, but one
  that R4B reworked incompatibly (``Evidence``, ``EvidenceVariable``): the R4B
  model would reject valid R4 content and accept content an R4 server does not
  understand, so they are refused as well.
* ``is_supported(name)`` is true only for the remaining types.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Mapping

__all__ = [
    "R4_RESOURCE_TYPES", "R4B_MODEL_TYPES", "R4B_INCOMPATIBLE_TYPES",
    "UNSUPPORTED_R4_TYPES", "SUPPORTED_TYPES", "is_r4_type", "is_supported",
    "OperationRule", "READ_ONLY_OPERATIONS", "OPERATION_LEVELS",
    "is_valid_operation_name", "operation_is_read_only", "graphql_is_mutation",
    "SEARCH_RESULT_PARAMS", "WRITE_ALLOWED_PARAMS", "FORBIDDEN_WRITE_PARAMS",
    "CONDITIONAL_SPECIAL_PARAMS", "is_allowed_write_param",
]


def _load_r4_types() -> frozenset[str]:
    text = (importlib.resources.files("sidecar") / "data" / "r4_resource_types.txt").read_text("utf-8")
    names = [ln.strip() for ln in text.splitlines()]
    return frozenset(n for n in names if n and not n.startswith("#"))


R4_RESOURCE_TYPES: Final[frozenset[str]] = _load_r4_types()


def _r4b_model_types() -> frozenset[str]:
    # Cheap: look for the model module file (<lowercased type>.py) instead of
    # importing ~140 modules. tests/test_fhir_types.py imports every one and
    # checks that the module really defines the resource class of that name.
    spec = importlib.util.find_spec("fhir.resources.R4B")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()  # fail closed: nothing is supported
    dirs = list(spec.submodule_search_locations)
    return frozenset(
        n for n in R4_RESOURCE_TYPES
        if any(os.path.isfile(os.path.join(d, n.lower() + ".py")) for d in dirs)
    )


R4B_MODEL_TYPES: Final[frozenset[str]] = _r4b_model_types()
R4B_INCOMPATIBLE_TYPES: Final[frozenset[str]] = frozenset({"Evidence", "EvidenceVariable"})
UNSUPPORTED_R4_TYPES: Final[frozenset[str]] = R4_RESOURCE_TYPES - R4B_MODEL_TYPES
SUPPORTED_TYPES: Final[frozenset[str]] = R4B_MODEL_TYPES - R4B_INCOMPATIBLE_TYPES


def is_r4_type(name: object) -> bool:
    """Exact, case-sensitive membership (``observation`` is not a type)."""
    return isinstance(name, str) and name in R4_RESOURCE_TYPES


def is_supported(name: object) -> bool:
    """True for R4 types we can validate faithfully with an R4B model."""
    return isinstance(name, str) and name in SUPPORTED_TYPES


# --------------------------------------------------------------------------
# Operations. Only what is listed here is read-only; every other $operation
# (e.g. $merge, $process-message, $apply, $meta-add, $meta-delete, $closure,
# $expunge, $document, unknown ones) is a write.
#
# $document is deliberately NOT listed: with persist=true the server stores
# the generated document Bundle, and the query may be carried in a POST body
# we do not inspect here.
# --------------------------------------------------------------------------

OPERATION_LEVELS: Final[frozenset[str]] = frozenset({"system", "type", "instance"})
_OP_NAME_RE: Final = re.compile(r"\$[a-z][a-z0-9-]{0,63}")  # used with fullmatch
_READ = frozenset({"GET", "HEAD", "POST"})  # affectsState=false ops may be POSTed
_GET = frozenset({"GET", "HEAD"})
_ALL = frozenset({"system", "type", "instance"})
_TI = frozenset({"type", "instance"})
_T = frozenset({"type"})


@dataclass(frozen=True)
class OperationRule:
    """Where a read-only operation may be invoked.

    ``resource_types`` None means any R4 type (at type/instance level).
    ``needs_query_check``: read-only only for a query that is provably not a
    mutation (``$graphql``).
    """

    levels: frozenset[str]
    resource_types: frozenset[str] | None
    methods: frozenset[str]
    needs_query_check: bool = False


# Levels follow the R4 OperationDefinitions (system/type/instance flags).
READ_ONLY_OPERATIONS: Final[Mapping[str, OperationRule]] = MappingProxyType({
    "$meta": OperationRule(_ALL, None, _GET),
    "$validate": OperationRule(_TI, None, _READ),  # validates only, stores nothing
    "$everything": OperationRule(_TI, frozenset({"Patient"}), _READ),
    # Encounter $everything is instance-level only in R4.
    "$expand": OperationRule(_TI, frozenset({"ValueSet"}), _READ),
    "$lookup": OperationRule(_T, frozenset({"CodeSystem"}), _READ),
    "$validate-code": OperationRule(_TI, frozenset({"ValueSet", "CodeSystem"}), _READ),
    "$subsumes": OperationRule(_TI, frozenset({"CodeSystem"}), _READ),
    "$translate": OperationRule(_TI, frozenset({"ConceptMap"}), _READ),
    "$lastn": OperationRule(_T, frozenset({"Observation"}), _READ),
    "$stats": OperationRule(_T, frozenset({"Observation"}), _READ),
    "$match": OperationRule(_T, frozenset({"Patient"}), _READ),
    "$graphql": OperationRule(frozenset({"system", "instance"}), None, _READ, True),
})
_ENCOUNTER_EVERYTHING = OperationRule(frozenset({"instance"}), frozenset({"Encounter"}), _READ)


def is_valid_operation_name(name: object) -> bool:
    # fullmatch, not ^...$: '$' would also match before a trailing newline.
    return isinstance(name, str) and _OP_NAME_RE.fullmatch(name) is not None


def operation_is_read_only(name: str, level: str, resource_type: str | None, method: str,
                           *, graphql_query: str | None = None) -> bool:
    """True only if the operation is on the read-only allowlist at this
    level/type/method. ``$graphql`` additionally needs ``graphql_query`` (the
    query text) and is read-only only if it is provably not a mutation."""
    if not is_valid_operation_name(name) or level not in OPERATION_LEVELS:
        return False
    if method not in _READ:  # DELETE/PUT/PATCH/unknown: never read-only
        return False
    if level == "system":
        if resource_type is not None:
            return False
    elif not is_r4_type(resource_type):
        return False
    rules = [READ_ONLY_OPERATIONS.get(name)]
    if name == "$everything":
        rules.append(_ENCOUNTER_EVERYTHING)
    for rule in rules:
        if rule is None or level not in rule.levels or method not in rule.methods:
            continue
        if rule.resource_types is not None and resource_type not in rule.resource_types:
            continue
        if rule.needs_query_check:
            return graphql_query is not None and not graphql_is_mutation(graphql_query)
        return True
    return False


# GraphQL lexer (spec "Lexical Tokens"). Strings and comments are tokens, so a
# 'mutation' inside them does not count, and '{' in them does not nest.
_GQL_TOKEN: Final = re.compile(
    r'(?P<ignored>[\s,\ufeff]+|#[^\n\r]*)'
    r'|(?P<string>"""(?:\\"""|[^"]|"(?!""))*"""'
    r'|"(?:[^"\\\n\r]|\\["\\/bfnrt]|\\u[0-9A-Fa-f]{4})*")'
    r'|(?P<punct>\.\.\.|[!$&():=@\[\]{}|])'
    r'|(?P<name>[_A-Za-z][_0-9A-Za-z]*)'
    r'|(?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)'
)
_GQL_MAX_LEN: Final = 100_000
_GQL_NOT_READ: Final = frozenset({"mutation", "subscription"})


def _gql_tokens(text: str) -> list[tuple[str, str]] | None:
    out: list[tuple[str, str]] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _GQL_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            return None
        kind = m.lastgroup or ""
        if kind != "ignored":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def graphql_is_mutation(text: str) -> bool:
    """Conservative: False only for a document that lexes cleanly and consists
    solely of ``query``/shorthand ``{...}`` operations and fragments, with the
    word ``mutation``/``subscription`` nowhere outside strings and comments.
    Anything else (unparseable, empty, unbalanced, too long) counts as a
    mutation."""
    if not isinstance(text, str) or len(text) > _GQL_MAX_LEN:
        return True
    toks = _gql_tokens(text)
    if not toks:
        return True
    if any(k == "name" and v in _GQL_NOT_READ for k, v in toks):
        return True
    i, n = 0, len(toks)
    while i < n:  # one top-level definition per iteration
        kind, val = toks[i]
        if kind == "name" and val in ("query", "fragment"):
            i += 1
            parens = 0  # '{' inside (...) is an object value in a variable default
            while i < n and not (toks[i] == ("punct", "{") and parens == 0):
                if toks[i] == ("punct", "("):
                    parens += 1
                elif toks[i] == ("punct", ")"):
                    parens -= 1
                    if parens < 0:
                        return True
                i += 1
            if i == n:
                return True
        elif (kind, val) != ("punct", "{"):
            return True  # mutation, subscription, SDL, garbage...
        depth = 0
        while i < n:  # consume the balanced selection set
            if toks[i] == ("punct", "{"):
                depth += 1
            elif toks[i] == ("punct", "}"):
                depth -= 1
                if depth == 0:
                    break
            i += 1
        if depth != 0:
            return True
        i += 1
    return False


# --------------------------------------------------------------------------
# Query parameters.
# --------------------------------------------------------------------------

# R4 "search result parameters" (http.html#search / search.html#return): they
# shape a result set. Split a name on ':' (e.g. _include:iterate) before lookup.
SEARCH_RESULT_PARAMS: Final[frozenset[str]] = frozenset({
    "_sort", "_count", "_include", "_revinclude", "_summary", "_total",
    "_elements", "_contained", "_containedType",
})
# The only parameters FHIR defines for create/update/patch/delete by id.
# (_summary/_elements only shape read results.)
WRITE_ALLOWED_PARAMS: Final[frozenset[str]] = frozenset({"_format", "_pretty"})
# Server extensions that widen the blast radius of a write. Documented here
# and refused (case-insensitively) even where search parameters are allowed.
FORBIDDEN_WRITE_PARAMS: Final[Mapping[str, str]] = MappingProxyType({
    "_cascade": "cascading delete of every resource that references the target (HAPI)",
    "harddelete": "physical deletion including history (e.g. Azure FHIR hardDelete=true)",
    "_expunge": "expunge deleted versions from the database (HAPI)",
    "_purge": "purge history on some servers",
    "_method": "HTTP method override honoured by some gateways/frameworks",
})
# '_'-prefixed parameters allowed as conditional-write match criteria (R4
# "parameters for all resources"); everything else starting with '_' is refused.
CONDITIONAL_SPECIAL_PARAMS: Final[frozenset[str]] = frozenset({
    "_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_has",
})
_SEARCH_PARAM_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.:]{0,127}")


def is_allowed_write_param(name: str, *, conditional: bool) -> bool:
    """Whether a query parameter may accompany a write.

    By id (``conditional=False``): only ``_format``/``_pretty``. Conditional
    update/patch/delete: additionally search criteria, but never result
    parameters (``_count`` …) nor ``FORBIDDEN_WRITE_PARAMS``. Conditional
    create carries its criteria in ``If-None-Exist``, not the query.
    """
    if not isinstance(name, str) or name.lower() in FORBIDDEN_WRITE_PARAMS:
        return False
    if name in WRITE_ALLOWED_PARAMS:
        return True
    if not conditional or _SEARCH_PARAM_NAME.fullmatch(name) is None:
        return False
    base = name.split(":", 1)[0].split(".", 1)[0]
    if base.lower() in FORBIDDEN_WRITE_PARAMS or base in SEARCH_RESULT_PARAMS:
        return False
    return not base.startswith("_") or base in CONDITIONAL_SPECIAL_PARAMS
