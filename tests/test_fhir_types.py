"""Tests for sidecar.fhir.types: type tables, operation table, GraphQL, params."""

from __future__ import annotations

import importlib

import pytest

from sidecar.fhir import types as t

EXPECTED_UNSUPPORTED = frozenset({
    "EffectEvidenceSynthesis", "RiskEvidenceSynthesis",
    "MedicinalProduct", "MedicinalProductAuthorization", "MedicinalProductContraindication",
    "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
    "MedicinalProductManufactured", "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
    "SubstanceReferenceInformation", "SubstanceSourceMaterial", "SubstanceSpecification",
})


def test_counts() -> None:
    assert len(t.R4_RESOURCE_TYPES) == 146
    assert len(t.R4B_MODEL_TYPES) == 128
    assert t.UNSUPPORTED_R4_TYPES == EXPECTED_UNSUPPORTED
    assert len(t.SUPPORTED_TYPES) == 126


def test_partition_is_exact() -> None:
    # Every R4 type either has an R4B model or is in the unsupported list.
    assert t.R4B_MODEL_TYPES | t.UNSUPPORTED_R4_TYPES == t.R4_RESOURCE_TYPES
    assert not t.R4B_MODEL_TYPES & t.UNSUPPORTED_R4_TYPES
    assert t.R4B_INCOMPATIBLE_TYPES <= t.R4B_MODEL_TYPES
    assert t.SUPPORTED_TYPES == t.R4B_MODEL_TYPES - t.R4B_INCOMPATIBLE_TYPES


def test_r4b_model_types_really_are_models() -> None:
    """The cheap file-existence check at import agrees with the real modules."""
    from fhir.resources.R4B.resource import Resource

    for name in sorted(t.R4B_MODEL_TYPES):
        cls = getattr(importlib.import_module(f"fhir.resources.R4B.{name.lower()}"), name)
        assert issubclass(cls, Resource) and cls.get_resource_type() == name
    for name in sorted(t.UNSUPPORTED_R4_TYPES):
        with pytest.raises(ImportError):
            importlib.import_module(f"fhir.resources.R4B.{name.lower()}")


@pytest.mark.parametrize("name", [
    "Patient", "Observation", "Bundle", "Parameters", "Binary", "List", "CatalogEntry",
    "DeviceUseStatement", "EffectEvidenceSynthesis", "RiskEvidenceSynthesis", "MedicinalProduct",
    "MedicinalProductAuthorization", "SubstanceNucleicAcid", "Media", "RequestGroup",
    "ImmunizationEvaluation", "VerificationResult", "TerminologyCapabilities",
])
def test_r4_names_present(name: str) -> None:
    assert t.is_r4_type(name)


@pytest.mark.parametrize("name", [
    # case-sensitive
    "observation", "PATIENT", "patient", " Patient", "Patient ",
    # abstract
    "Resource", "DomainResource",
    # R4B/R5-only
    "Citation", "EvidenceReport", "Ingredient", "SubscriptionTopic", "SubscriptionStatus",
    "MedicinalProductDefinition", "RegulatedAuthorization", "NutritionProduct",
    "ActorDefinition", "Requirements", "DeviceUsage", "InventoryReport", "Permission",
    # datatypes, junk
    "HumanName", "Quantity", "", "Patient/1",
])
def test_not_r4_names(name: str) -> None:
    assert not t.is_r4_type(name)
    assert not t.is_supported(name)


@pytest.mark.parametrize("value", [None, 1, b"Patient", ["Patient"]])
def test_non_str_names(value: object) -> None:
    assert not t.is_r4_type(value)
    assert not t.is_supported(value)


@pytest.mark.parametrize("name,supported", [
    ("Patient", True), ("Observation", True), ("Bundle", True), ("Substance", True),
    ("MedicinalProduct", False), ("SubstanceSpecification", False),
    ("Evidence", False), ("EvidenceVariable", False),  # reworked in R4B
])
def test_is_supported(name: str, supported: bool) -> None:
    assert t.is_r4_type(name)
    assert t.is_supported(name) is supported


@pytest.mark.parametrize("name,level,rtype,method,expected", [
    ("$everything", "instance", "Patient", "GET", True),
    ("$everything", "type", "Patient", "GET", True),
    ("$everything", "instance", "Encounter", "POST", True),
    ("$everything", "type", "Encounter", "GET", False),
    ("$everything", "instance", "Observation", "GET", False),
    ("$everything", "system", None, "GET", False),
    ("$meta", "system", None, "GET", True),
    ("$meta", "type", "Observation", "GET", True),
    ("$meta", "instance", "Patient", "GET", True),
    ("$meta", "instance", "Patient", "POST", False),
    ("$meta-add", "instance", "Patient", "POST", False),
    ("$meta-delete", "instance", "Patient", "POST", False),
    ("$merge", "type", "Patient", "POST", False),
    ("$process-message", "system", None, "POST", False),
    ("$apply", "instance", "PlanDefinition", "POST", False),
    ("$closure", "system", None, "POST", False),
    ("$expunge", "system", None, "POST", False),
    ("$document", "instance", "Composition", "GET", False),
    ("$frobnicate", "type", "Patient", "GET", False),
    ("$validate", "type", "Observation", "POST", True),
    ("$validate", "instance", "Observation", "POST", True),
    ("$validate", "instance", "Observation", "DELETE", False),
    ("$validate", "instance", "Observation", "PUT", False),
    ("$validate", "instance", "Observation", "PATCH", False),
    ("$validate", "system", None, "POST", False),
    ("$validate", "type", "observation", "POST", False),
    ("$expand", "type", "ValueSet", "GET", True),
    ("$expand", "instance", "ValueSet", "POST", True),
    ("$expand", "type", "CodeSystem", "GET", False),
    ("$lookup", "type", "CodeSystem", "GET", True),
    ("$lookup", "instance", "CodeSystem", "GET", False),
    ("$validate-code", "type", "ValueSet", "GET", True),
    ("$validate-code", "instance", "CodeSystem", "GET", True),
    ("$subsumes", "type", "CodeSystem", "GET", True),
    ("$translate", "instance", "ConceptMap", "GET", True),
    ("$lastn", "type", "Observation", "GET", True),
    ("$stats", "type", "Observation", "GET", True),
    ("$stats", "type", "Patient", "GET", False),
    ("$match", "type", "Patient", "POST", True),
    ("$match", "instance", "Patient", "POST", False),
    # level / type consistency
    ("$meta", "system", "Patient", "GET", False),
    ("$meta", "type", None, "GET", False),
    ("$meta", "server", None, "GET", False),
    ("$meta", "type", "Citation", "GET", False),
    # methods
    ("$meta", "instance", "Patient", "get", False),
    ("$meta", "instance", "Patient", "OPTIONS", False),
    ("$everything", "instance", "Patient", "HEAD", True),
])
def test_operation_table(name: str, level: str, rtype: str | None, method: str, expected: bool) -> None:
    assert t.operation_is_read_only(name, level, rtype, method) is expected


@pytest.mark.parametrize("name", [
    "meta", "$", "$Meta", "$META", "$1meta", "$-meta", "$meta_add", "$meta add", "$meta\n",
    "$meta/", "$$meta", "$" + "a" * 65, "", "$méta", "$meta%00",
])
def test_bad_operation_names(name: str) -> None:
    assert not t.is_valid_operation_name(name)
    assert not t.operation_is_read_only(name, "system", None, "GET")


def test_operation_name_length_limit() -> None:
    assert t.is_valid_operation_name("$" + "a" * 64)


@pytest.mark.parametrize("query,expected", [
    ("{ Patient { name { given } } }", True),
    ("query { PatientList(name: \"x\") { id } }", True),
    ("query Q($n: String = \"mutation\") { PatientList(name: $n) { id } }", True),
    ("# mutation in a comment\nquery { a }", True),
    ("query { a(s: \"\"\"mutation { x }\"\"\") }", True),
    ("query Q($v: In = {a: {b: 1}}) { a(x: $v) { ...F } } fragment F on P { b }", True),
    ("query A { a } query B { b }", True),
    ("mutation { PatientCreate(res: {}) { id } }", False),
    ("  \n\t mutation M { PatientDelete(id: \"1\") }", False),
    ("# comment\n# another\nmutation { x }", False),
    ("query { a } mutation { b }", False),
    ("{ a } mutation { b }", False),
    ("subscription { a }", False),
    ("query { mutation }", False),  # conservative: the word anywhere
    ("", False),
    ("   ", False),
    ("# only a comment", False),
    ("{", False),
    ("{ a", False),
    ("query { a } }", False),
    ("query", False),
    ("query Q(", False),
    ("query { a(s: \"unterminated) }", False),
    ("query { a(s: \"bad \\x escape\") }", False),
    ("query { a } ;", False),
    ("type Query { a: Int }", False),
    ("schema { query: Q }", False),
    ("\"\"\"desc\"\"\" query { a }", False),
    ("query { a(x: 1) } extra", False),
    ("query { a }" + " " * 100_001, False),
])
def test_graphql(query: str, expected: bool) -> None:
    assert t.graphql_is_mutation(query) is (not expected)


@pytest.mark.parametrize("query,expected", [
    ("{ Patient { name } }", True),
    ("mutation { PatientCreate { id } }", False),
    (None, False),
])
def test_graphql_operation(query: str | None, expected: bool) -> None:
    assert t.operation_is_read_only("$graphql", "system", None, "POST", graphql_query=query) is expected
    assert t.operation_is_read_only("$graphql", "instance", "Patient", "GET", graphql_query=query) is expected
    assert not t.operation_is_read_only("$graphql", "type", "Patient", "GET", graphql_query=query)


def test_graphql_non_str() -> None:
    assert t.graphql_is_mutation(b"{ a }")  # type: ignore[arg-type]


@pytest.mark.parametrize("name,conditional,expected", [
    ("_format", False, True), ("_pretty", False, True),
    ("_summary", False, False), ("_elements", False, False), ("identifier", False, False),
    ("_cascade", False, False), ("_cascade", True, False), ("hardDelete", True, False),
    ("HardDelete", True, False), ("_expunge", True, False), ("_EXPUNGE", True, False),
    ("_method", True, False), ("_purge", True, False),
    ("identifier", True, True), ("identifier:exact", True, True), ("subject.name", True, True),
    ("subject:Patient.name", True, True), ("_id", True, True), ("_lastUpdated", True, True),
    ("_tag", True, True), ("_has:Observation:patient:code", True, True),
    ("_count", True, False), ("_sort", True, False), ("_include", True, False),
    ("_include:iterate", True, False), ("_summary", True, False), ("_total", True, False),
    ("_unknown", True, False), ("", True, False), ("a b", True, False), ("x" * 200, True, False),
])
def test_write_params(name: str, conditional: bool, expected: bool) -> None:
    assert t.is_allowed_write_param(name, conditional=conditional) is expected


def test_param_tables() -> None:
    assert t.WRITE_ALLOWED_PARAMS == frozenset({"_format", "_pretty"})
    assert {"_cascade", "harddelete", "_expunge"} <= set(t.FORBIDDEN_WRITE_PARAMS)
    assert {"_count", "_sort", "_include", "_revinclude", "_summary", "_elements"} <= t.SEARCH_RESULT_PARAMS
    assert not t.WRITE_ALLOWED_PARAMS & t.SEARCH_RESULT_PARAMS
