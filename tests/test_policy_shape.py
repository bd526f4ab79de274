"""The shape of the starter policy that keeps it fast on the embedded engine, and equal to itself.

`decision` (writeback.rego, what the sidecar asks for) and `decision_for(inp)` (decision_for_test.rego,
what the Rego tests call) must be the same rules: the first over `input`, the second over an
argument (policies/README.md says why there are two). These tests hold their texts equal, their
decisions equal on the whole decision table, show that the short paths are taken for plain writes
(and only for them), and decide large bundles entry by entry.
"""

from __future__ import annotations

import copy
import re
from datetime import UTC
from pathlib import Path

import pytest

from sidecar.policy.embedded import EmbeddedPolicy, read_policy_dir
from sidecar.policy.input import build_input, context_clock, header_json
from tests.test_policy_cases import (
    CASES,
    OBS,
    POLICIES,
    SCRIBE,
    VARIANT_CASES,
    WRITER,
    bundle,
    deny,
    entry,
    prov,
    tagged,
    write_variant,
)

PATH = "fhir/writeback"


def _block(src: str, name: str) -> str:
    m = re.search(rf"^# >>> {name}\n(.*?)^# <<< {name}\n", src, re.MULTILINE | re.DOTALL)
    assert m, f"no `# >>> {name}` ... `# <<< {name}` block"
    return m.group(1)


def served_as_test_text(served: str) -> str:
    """writeback.rego's `decision` block as decision_for_test.rego must spell it."""
    text = re.sub(r"\binput\b", "inp", served)
    text = text.replace("decision := allowed if {", "decision_for(inp) := allowed if {", 1)
    return text.replace("} else := verdict(d, h) if {\n",
                        "} else := full_decision(inp)\n\nfull_decision(inp) := verdict(d, h) if {\n", 1)


def test_decision_for_is_the_served_decision_word_for_word():
    served = _block((POLICIES / "writeback.rego").read_text(), "decision")
    for_tests = _block((POLICIES / "decision_for_test.rego").read_text(), "decision_for")
    assert "decision := allowed if {" in served and "} else := verdict(d, h) if {\n" in served
    assert for_tests == served_as_test_text(served)


def _with_probe(directory: Path, probe: str) -> EmbeddedPolicy:
    files = read_policy_dir(directory, include_tests=True)
    modules = {**files.modules, "probe.rego": "package probe\n\nimport rego.v1\n\n" + probe}
    return EmbeddedPolicy(modules, files.data, "probe", "probe", probe=False)


@pytest.mark.parametrize("variant", [False, True])
def test_decision_and_decision_for_agree_on_the_table(tmp_path, variant):
    directory = write_variant(tmp_path / "v") if variant else POLICIES
    cases = VARIANT_CASES if variant else CASES
    served = EmbeddedPolicy.load(directory, PATH)
    for_tests = _with_probe(directory, "decision := data.fhir.writeback.decision_for(input)\n")
    full = _with_probe(directory, "decision := data.fhir.writeback.full_decision(input)\n")
    for name, input_doc, expected in cases:
        assert served.evaluate(input_doc) == expected, name
        assert for_tests.evaluate(input_doc) == expected, name
        assert full.evaluate(input_doc) == expected, name


MARK = {"allow": False, "reasons": ["every rule ran"], "review": False}


def _marking_copy(tmp_path: Path) -> EmbeddedPolicy:
    """The policy whose full-rules branch answers MARK instead of deciding."""
    d = tmp_path / "marked"
    d.mkdir()
    for f in POLICIES.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    src = (d / "writeback.rego").read_text()
    head = "} else := verdict(d, h) if {\n"
    assert src.count(head) == 1
    (d / "writeback.rego").write_text(src.replace(head, '} else := {"allow": false, "reasons": ["every rule ran"], "review": false} if {\n'))
    return EmbeddedPolicy.load(d, PATH)


def _plain_bundle(n: int, client=WRITER) -> dict:
    return bundle(client, [entry("POST", "create", OBS) for _ in range(n)])


def test_plain_writes_take_the_short_paths_and_only_they(tmp_path):
    marked = _marking_copy(tmp_path)
    short = [c for c in CASES if c[0] in {"writer creates an Observation", "writer updates an Observation",
                                          "writer deletes an Observation", "writer creates a Condition",
                                          "transaction: every entry checked"}]
    assert len(short) == 5
    for name, input_doc, expected in short:
        assert marked.evaluate(input_doc) == expected, name
    assert marked.evaluate(_plain_bundle(3)) == {"allow": True, "reasons": [], "review": False}
    # everything that any rule could object to goes through every rule (clients without a
    # policy entry get the last branch)
    for name, input_doc, expected in CASES:
        if expected == deny("client has no policy entry"):
            assert marked.evaluate(input_doc) == expected, name
        elif expected != {"allow": True, "reasons": [], "review": False}:
            assert marked.evaluate(input_doc) == MARK, name


def test_large_bundles_are_decided_entry_by_entry():
    p = EmbeddedPolicy.load(POLICIES, PATH)
    assert p.evaluate(_plain_bundle(300)) == {"allow": True, "reasons": [], "review": False}
    entries = [entry("POST", "create", OBS) for _ in range(299)] + [entry("POST", "create", {"resourceType": "Basic"})]
    assert p.evaluate(bundle(WRITER, entries)) == deny("Basic writes are not allowed for client demo-writer")
    good = tagged(OBS, "t1")
    entries = [entry("POST", "create", good) for _ in range(200)]
    assert p.evaluate(bundle(SCRIBE, entries)) == {"allow": True, "reasons": [], "review": False}
    entries[57] = entry("POST", "create", tagged(OBS, "t2"))
    entries[199] = entry("POST", "create", {**good, "extension": [{"url": "u"}]})
    assert p.evaluate(bundle(SCRIBE, copy.deepcopy(entries))) == deny(
        "entry 57: the resulting Observation is tagged with a tenant other than t1",
        "entry 199: Observation.extension is not allowed for client scribe-app",
    )


# ---- context.x_provenance: the sidecar parses X-Provenance for the policy ----------------------

def test_the_sidecars_parse_of_x_provenance_decides_as_the_policys_own():
    p = EmbeddedPolicy.load(POLICIES, PATH)
    seen = 0
    for name, input_doc, expected in CASES:
        header = input_doc["request"]["headers"].get("x-provenance")
        if header is None:
            continue
        parsed = header_json(header)
        assert parsed is not None, name
        with_parse = copy.deepcopy(input_doc)
        with_parse["context"]["x_provenance"] = parsed
        assert p.evaluate(with_parse) == expected, name
        seen += 1
    assert seen >= 10


@pytest.mark.parametrize("text,parsed", [
    ('{"resourceType": "Provenance"}', {"valid": True, "value": {"resourceType": "Provenance"}}),
    ("null", {"valid": True, "value": None}),
    ("{not json", {"valid": False}),
    ("", {"valid": False}),
    ("NaN", {"valid": False}),                      # JSON has no NaN (Python's json would take it)
    ('{"a": [1, 2.5, true, "x"]} ', {"valid": True, "value": {"a": [1, 2.5, True, "x"]}}),
    ("[1e400]", None),                               # not a finite number here: the policy parses it
    ("[123456789012345678901234567890]", None),      # beyond 64 bits
    ('"a\\u0000b"', None),                          # NUL
    ('"\\ud800"', None),                            # a lone surrogate
    ("[" * 100 + "]" * 100, None),                   # deeper than the sidecar parses for the policy
])
def test_header_json(text, parsed):
    assert header_json(text) == parsed


def _built(headers: dict[str, str]) -> dict:
    import json as _json

    from sidecar.classify import classify
    from sidecar.identity import Principal
    from sidecar.parse import parse_request
    from sidecar.request import RawRequest
    from sidecar.scopes import ScopeSet

    base, upstream = "/fhir/R4", "http://127.0.0.1:9/fhir/R4"
    hdrs = (("content-type", "application/fhir+json"),) + tuple((k, v) for k, v in headers.items())
    raw = RawRequest(method="POST", target=f"{base}/Observation".encode(), headers=hdrs,
                     body=_json.dumps(tagged(OBS, "lab")).encode(), host="127.0.0.1:8080")
    req = parse_request(raw, base_path=base, max_body_bytes=1 << 20, upstream_base=upstream)
    who = Principal(client_id="legacy-lab-feed", auth="api-key", tenant="lab",
                    scopes=ScopeSet.from_strings(["system/Observation.c", "system/Provenance.c"]))
    return build_input(req, classify(req, upstream_base=upstream), who, shadow=False)


def test_build_input_adds_the_parse_only_with_the_header():
    header = prov({"reference": "Device/legacy-lab-feed"}, [{"type": "Observation"}])
    doc = _built({"x-provenance": header})
    assert doc["request"]["headers"]["x-provenance"] == header
    assert doc["context"]["x_provenance"] == {"valid": True, "value": __import__("json").loads(header)}
    assert EmbeddedPolicy.load(POLICIES, PATH).evaluate(doc)["allow"]
    assert "x_provenance" not in _built({})["context"]
    assert _built({"x-provenance": "{oops"})["context"]["x_provenance"] == {"valid": False}


# ---- context.clock: the sidecar reads context.time for the after-hours rule --------------------

@pytest.mark.parametrize("variant", [False, True])
def test_the_sidecars_clock_decides_as_the_policys_own_reading_of_the_time(tmp_path, variant):
    from datetime import datetime

    directory = write_variant(tmp_path / "v") if variant else POLICIES
    p = EmbeddedPolicy.load(directory, PATH)
    seen = 0
    for name, input_doc, expected in (VARIANT_CASES if variant else CASES):
        time = input_doc["context"]["time"]
        if not time.endswith("Z"):
            continue  # an unreadable time (the sidecar always writes ...Z)
        with_clock = copy.deepcopy(input_doc)
        with_clock["context"]["clock"] = context_clock(datetime.fromisoformat(time))
        assert p.evaluate(with_clock) == expected, name
        seen += 1
    assert seen >= 8


def test_context_clock():
    from datetime import datetime

    assert context_clock(datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC)) == {"weekday": 0, "minute": 1439}
    assert context_clock(datetime(2024, 2, 29, 13, 0, 0, 250000, tzinfo=UTC)) == {"weekday": 4, "minute": 780}
    doc = _built({})
    assert doc["context"]["clock"] == context_clock(datetime.fromisoformat(doc["context"]["time"]))


def test_a_finding_without_its_reason_still_denies(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    for f in POLICIES.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    src = (d / "tenancy.rego").read_text()
    clause = next(line for line in src.splitlines() if line.startswith("reason(") and '"result_other"' in line)
    (d / "tenancy.rego").write_text(src.replace(clause + "\n", ""))
    p = EmbeddedPolicy.load(d, PATH)
    case = next(c for c in CASES if c[0] == "result of another tenant")
    assert p.evaluate(case[1]) == deny("policy rule result_other denies this write")


def write_decision_for(directory: Path = POLICIES) -> None:
    """Rewrite decision_for_test.rego's block from writeback.rego's `decision` (after editing it):
    `.venv/bin/python -m tests.test_policy_shape`."""
    served = _block((directory / "writeback.rego").read_text(), "decision")
    target = directory / "decision_for_test.rego"
    src = target.read_text()
    head, rest = src.split("# >>> decision_for\n", 1)
    tail = rest.split("# <<< decision_for\n", 1)[1]
    target.write_text(head + "# >>> decision_for\n" + served_as_test_text(served) + "# <<< decision_for\n" + tail)


if __name__ == "__main__":
    write_decision_for()


def test_a_bundles_entry_resources_are_in_entries_only():
    import json as _json

    from sidecar.classify import classify
    from sidecar.identity import Principal
    from sidecar.parse import parse_request
    from sidecar.request import RawRequest
    from sidecar.scopes import ScopeSet

    base, upstream = "/fhir/R4", "http://127.0.0.1:9/fhir/R4"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:00000000-0000-4000-8000-00000000000{i}", "resource": dict(OBS),
         "request": {"method": "POST", "url": "Observation"}} for i in range(3)]}
    raw = RawRequest(method="POST", target=base.encode(), headers=(("content-type", "application/fhir+json"),),
                     body=_json.dumps(bundle).encode(), host="127.0.0.1:8080")
    req = parse_request(raw, base_path=base, max_body_bytes=1 << 20, upstream_base=upstream)
    who = Principal(client_id="demo-writer", auth="api-key", tenant="t1",
                    scopes=ScopeSet.from_strings(["system/Observation.c"]))
    doc = build_input(req, classify(req, upstream_base=upstream), who, shadow=False)
    assert [e["resource"] for e in doc["entries"]] == [OBS] * 3
    assert doc["resource"]["entry"] == [{k: v for k, v in e.items() if k != "resource"} for e in bundle["entry"]]
    assert doc["resource"]["type"] == "transaction"
    assert req.body["entry"][0]["resource"] == OBS  # what is forwarded is untouched
    assert EmbeddedPolicy.load(POLICIES, PATH).evaluate(doc)["allow"]
