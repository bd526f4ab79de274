"""The two engines agree: OpaPolicy -> a real OPA (Go engine behind the Data API on 127.0.0.1)
and the embedded engine give identical whole decisions on the decision table, and the policy
library's `test_` rules pass on the Go engine too. OpaPolicy's failure modes all raise.

Needs the Go bindings (tests only): pip install --no-deps --ignore-requires-python
opa-golib-python-bindings==0.4.4. Without them these tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from sidecar.policy.embedded import (
    EmbeddedPolicy,
    PolicyEvalError,
    PolicyLoadError,
    policy_revision,
)
from sidecar.policy.opa import OpaPolicy
from sidecar.policy.testing import discover_tests
from tests.opa_server import OpaDataServer, go_engine, go_engine_unavailable
from tests.test_policy_cases import CASES, POLICIES, VARIANT_CASES, write_variant

_WHY = go_engine_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_variant(tmp_path_factory.mktemp("variant-policies"))


@pytest.fixture(scope="module")
def opa_server():
    server = OpaDataServer(POLICIES).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def opa_variant_server(variant_dir):
    server = OpaDataServer(variant_dir).start()
    yield server
    server.stop()


def _decide_all(policy: OpaPolicy, inputs: list[dict]) -> list[dict]:
    async def run() -> list[dict]:
        try:
            return [await policy.decide(i) for i in inputs]
        finally:
            await policy.aclose()
    return asyncio.run(run())


def _compare(embedded: EmbeddedPolicy, opa: OpaPolicy, cases: list) -> tuple[int, int]:
    inputs = [c[1] for c in cases]
    remote = _decide_all(opa, inputs)
    mismatches = []
    for (name, input_doc, expected), got in zip(cases, remote):
        local = embedded.evaluate(input_doc)
        if not (local == got == expected):
            mismatches.append((name, local, got, expected))
    assert mismatches == []
    return len(cases), sum(1 for _, _, e in cases if e["allow"])


def test_opa_and_embedded_give_identical_decisions(opa_server, variant_dir, opa_variant_server):
    n1, a1 = _compare(EmbeddedPolicy.load(POLICIES, "fhir/writeback"),
                      OpaPolicy(opa_server.url, "fhir/writeback", timeout_ms=5000, directory=POLICIES), CASES)
    n2, a2 = _compare(EmbeddedPolicy.load(variant_dir, "fhir/writeback"),
                      OpaPolicy(opa_variant_server.url, "fhir/writeback", timeout_ms=5000), VARIANT_CASES)
    assert n1 + n2 >= 50 and a1 + a2 >= 20


def test_policy_test_rules_pass_on_the_go_engine():
    engine, files = go_engine(POLICIES)
    try:
        tests = discover_tests(files.modules)
        assert len(tests) >= 40
        failed = []
        for t in tests:
            try:
                value = engine.eval_document(t.ref[len("data."):])
            except Exception as e:  # undefined or error
                value = repr(e)
            if value is not True:
                failed.append((t.ref, value))
        assert failed == []
    finally:
        engine.close()


def test_go_engine_sees_a_broken_rule(tmp_path):
    for f in POLICIES.iterdir():
        (tmp_path / f.name).write_text(f.read_text())
    src = (tmp_path / "status.rego").read_text().replace("not v in rule.write", "v in rule.write")
    (tmp_path / "status.rego").write_text(src)
    engine, files = go_engine(tmp_path)
    try:
        results = {}
        for t in discover_tests(files.modules):
            try:
                results[t.name] = engine.eval_document(t.ref[len("data."):])
            except Exception:
                results[t.name] = None
        assert results["test_drafting_client_writes_only_preliminary"] is not True
    finally:
        engine.close()


# ---- OpaPolicy itself ---------------------------------------------------------------------------

ALLOWED = CASES[0][1]


def test_opa_revision_is_the_policy_dir_hash_or_the_servers(opa_server):
    assert OpaPolicy(opa_server.url, "fhir/writeback", directory=POLICIES).revision == policy_revision(POLICIES)
    assert OpaPolicy(opa_server.url, "fhir/writeback", directory=POLICIES).revision == \
        EmbeddedPolicy.load(POLICIES, "fhir/writeback").revision
    p = OpaPolicy(opa_server.url, "fhir/writeback")
    assert p.revision == f"opa:{opa_server.url}"

    async def sync() -> str:
        try:
            return await p.sync_revision()
        finally:
            await p.aclose()
    rev = asyncio.run(sync())
    assert rev.startswith("opa:") and rev != f"opa:{opa_server.url}" and p.revision == rev


def _one(policy: OpaPolicy, input_doc: dict) -> dict:
    return _decide_all(policy, [input_doc])[0]


def test_opa_timeout_raises(opa_server):
    opa_server.delay_s = 0.3
    try:
        with pytest.raises(PolicyEvalError, match="did not answer within 50 ms"):
            _one(OpaPolicy(opa_server.url, "fhir/writeback", timeout_ms=50), ALLOWED)
    finally:
        opa_server.delay_s = 0.0


def test_opa_error_status_raises_without_retrying(opa_server):
    opa_server.status = 500
    before = opa_server.requests
    try:
        with pytest.raises(PolicyEvalError, match="OPA request failed"):
            _one(OpaPolicy(opa_server.url, "fhir/writeback", timeout_ms=2000), ALLOWED)
        assert opa_server.requests == before + 1
    finally:
        opa_server.status = None


def test_opa_undefined_decision_raises(opa_server):
    with pytest.raises(PolicyEvalError, match="undefined"):
        _one(OpaPolicy(opa_server.url, "no/such/package", timeout_ms=2000), ALLOWED)


def test_opa_decision_of_the_wrong_shape_raises(opa_server):
    # data.fhir.writeback.deny is a set: "its decision" is undefined; a non-decision is refused too
    with pytest.raises(PolicyEvalError):
        _one(OpaPolicy(opa_server.url, "fhir/writeback/deny", timeout_ms=2000), ALLOWED)


def test_opa_unreachable_raises():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PolicyEvalError, match="OPA request failed"):
        _one(OpaPolicy(f"http://127.0.0.1:{port}", "fhir/writeback", timeout_ms=1000), ALLOWED)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8181", "http://127.0.0.1:8181/v1", "http://u:p@127.0.0.1:8181", "127.0.0.1:8181"])
def test_opa_url_must_be_an_origin(url):
    with pytest.raises(PolicyLoadError):
        OpaPolicy(url, "fhir/writeback")


def test_opa_reload_keeps_settings(opa_server):
    p = OpaPolicy(opa_server.url, "fhir/writeback", timeout_ms=321, directory=POLICIES)
    q = p.reload()
    assert (q.opa_url, q.path, q.timeout_s, q.revision) == (p.opa_url, p.path, p.timeout_s, p.revision)
    assert _one(q, ALLOWED) == {"allow": True, "reasons": [], "review": False}


def test_opa_client_works_across_event_loops(opa_server):
    p = OpaPolicy(opa_server.url, "fhir/writeback", timeout_ms=2000)
    assert asyncio.run(p.decide(ALLOWED))["allow"]
    assert asyncio.run(p.decide(ALLOWED))["allow"]  # a new loop gets a new session
    asyncio.run(p.aclose())


def test_opa_server_answers_like_opa(opa_server):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", opa_server.port, timeout=5)
    conn.request("POST", "/v1/data/fhir/writeback/decision", json.dumps({"input": ALLOWED}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"result": {"allow": True, "reasons": [], "review": False}}
    conn.request("POST", "/v1/data/nothing/here", json.dumps({"input": {}}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {}
    conn.close()
