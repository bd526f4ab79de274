"""`fhir-sidecar policy test`: sidecar.policy.testing.run_policy_tests on the library and on
broken copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sidecar.policy.testing import discover_tests, run_policy_tests
from tests.test_policy_cases import POLICIES


@pytest.fixture(scope="module")
def library_report():
    return run_policy_tests(POLICIES)


def test_library_passes(library_report):
    r = library_report
    assert r.ok, "\n".join(r.lines)
    assert r.passed >= 40 and r.failed == 0 and r.errors == 0
    assert r.lines[-1] == f"PASS: {r.passed}/{r.passed}"
    assert not any(line.startswith("FAIL") for line in r.lines)


def test_every_package_is_discovered():
    tests = discover_tests({p.name: p.read_text() for p in POLICIES.glob("*.rego")})
    packages = {t.package for t in tests}
    assert packages == {"fhir.writeback_test", "fhir.writeback_review_test"}
    assert all(t.name.startswith("test_") for t in tests)


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    shutil.copytree(POLICIES, d)
    return d


@pytest.mark.parametrize("file,old,new,expect_failing", [
    ("status.rego", "not v in rule.write", "v in rule.write", "test_drafting_client_writes_only_preliminary"),
    ("tenancy.rego", "codes - {tenant} != set()", "codes - {tenant} == set()", "test_result_must_carry_the_client_tenant"),
    ("review.rego", "high_impact_client(c, _) if automated(c)", "high_impact_client(c, _) if not automated(c)",
     "test_high_impact_write_by_automated_client_is_held"),
    ("provenance.rego", "not agent_matches(agent_setting, ", "agent_matches(agent_setting, ",
     "test_provenance_agent_must_name_the_client"),
    ("fields.rego", "k != \"resourceType\"", "k != \"nothing\"", "test_field_allow_list"),
    ("data.json", "\"write\": [\"preliminary\"]", "\"write\": [\"preliminary\", \"final\"]",
     "test_drafting_client_writes_only_preliminary"),
])
def test_a_broken_rule_fails(tmp_path, file, old, new, expect_failing):
    d = _copy(tmp_path)
    src = (d / file).read_text()
    assert old in src
    (d / file).write_text(src.replace(old, new, 1))
    r = run_policy_tests(d)
    assert not r.ok and r.failed + r.errors > 0
    failing = [line for line in r.lines if line.startswith(("FAIL: data.", "ERROR: data."))]
    assert any(expect_failing in line for line in failing), r.lines
    assert r.lines[-1].startswith(("FAIL: ", "ERROR: ")) and f"/{r.total}" in r.lines[-1]
    assert any(line.startswith("FAIL: ") and line.endswith(f"/{r.total}") for line in r.lines) or r.errors


def test_a_policy_that_does_not_compile_is_an_error(tmp_path):
    d = _copy(tmp_path)
    (d / "writeback.rego").write_text((d / "writeback.rego").read_text() + "\nbroken := {\n")
    r = run_policy_tests(d)
    assert not r.ok and r.errors > 0 and r.passed == 0
    assert r.lines[0].startswith("ERROR: policies do not compile")


def test_no_tests_is_not_a_pass(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "p.rego").write_text("package p\n\nimport rego.v1\n\nx := 1\n")
    r = run_policy_tests(d)
    assert not r.ok and "no test_ rules" in r.lines[0]


def test_discovery_details(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "p.rego").write_text("package p\n\nimport rego.v1\n\nx := 1\n")
    (d / "a_test.rego").write_text(
        "package p_test\n\nimport rego.v1\n\n"
        "test_one if data.p.x == 1\n\n"
        "# test_commented_out if false\n\n"
        "test_two if {\n\tdata.p.x == 2 # a failing test\n}\n\n"
        "helper_test_ok if true\n\n"
        "test_conflict := 1 if true\n\ntest_conflict := 2 if true\n")
    (d / "b_test.rego").write_text("package p_test\n\nimport rego.v1\n\ntest_one if true\n")
    names = [t.name for t in discover_tests({p.name: p.read_text() for p in d.glob("*.rego")})]
    assert names == ["test_one", "test_two", "test_conflict"]
    r = run_policy_tests(d, verbose=True)
    assert (r.passed, r.failed, r.errors) == (1, 1, 1) and not r.ok
    assert any(line.startswith("PASS: data.p_test.test_one") for line in r.lines)
    assert any(line.startswith("FAIL: data.p_test.test_two (a_test.rego") for line in r.lines)
    assert any(line.startswith("ERROR: data.p_test.test_conflict") for line in r.lines)
    assert r.lines[-3:] == ["PASS: 1/3", "FAIL: 1/3", "ERROR: 1/3"]
