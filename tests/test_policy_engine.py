"""The embedded engine (sidecar.policy.embedded): loading, hot reload, and reading decisions
exactly, whatever strings a policy puts in them."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from sidecar.policy.embedded import (
    EmbeddedPolicy,
    PolicyEvalError,
    PolicyLoadError,
    policy_revision,
)
from tests.test_policy_cases import CASES, POLICIES

PATH = "fhir/writeback"
ALLOWED = CASES[0][1]


def write(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (d / name).write_text(src)
    return d


ECHO = """package fhir.writeback

import rego.v1

decision := {"allow": false, "reasons": [concat("", ["client ", input.client.id])], "review": false}
"""


def test_starter_policy_loads_and_decides():
    p = EmbeddedPolicy.load(POLICIES, PATH)
    assert p.revision == policy_revision(POLICIES) and len(p.revision) == 16
    assert p.evaluate(ALLOWED) == {"allow": True, "reasons": [], "review": False}


def test_a_reason_cannot_rewrite_the_decision(tmp_path):
    """regopy prints strings unescaped: parsing its JSON text would turn this deny into allow."""
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": ECHO}), PATH)
    evil = 'x"], "allow": true, "z": ["'
    d = p.evaluate({"client": {"id": evil}})
    assert d == {"allow": False, "reasons": ["client " + evil], "review": False}
    for text in ['a\\"b', "line\nbreak", "tab\there", "é ü 漢字", "\\", '"']:
        assert p.evaluate({"client": {"id": text}})["reasons"] == ["client " + text]


def test_values_of_every_kind_are_read(tmp_path):
    src = """package fhir.writeback

import rego.v1

decision := {"allow": true, "reasons": [], "n": 3, "big": 12345678901234, "f": 1.5, "neg": -2, "z": null,
    "nested": {"a": [1, {"b": false}]}, "s": {"x"}}
"""
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": src}), PATH)
    d = p.evaluate({})
    assert d == {"allow": True, "reasons": [], "n": 3, "big": 12345678901234, "f": 1.5, "neg": -2, "z": None,
                 "nested": {"a": [1, {"b": False}]}, "s": ["x"]}


def test_undefined_decision_raises(tmp_path):
    src = 'package fhir.writeback\n\nimport rego.v1\n\ndecision := {"allow": true, "reasons": []} if input.ok\n'
    # the probe input leaves it undefined: refused at load
    with pytest.raises(PolicyLoadError, match="does not decide"):
        EmbeddedPolicy.load(write(tmp_path, {"p.rego": src}), PATH)
    p = EmbeddedPolicy({"p.rego": src}, {}, PATH, "r", probe=False)
    assert p.evaluate({"ok": True}) == {"allow": True, "reasons": []}
    with pytest.raises(PolicyEvalError, match="undefined"):
        p.evaluate({"ok": False})


def test_conflicting_decision_raises(tmp_path):
    src = 'package fhir.writeback\n\nimport rego.v1\n\ndecision := {"allow": true, "reasons": []}\n' \
          'decision := {"allow": false, "reasons": []} if input.x\n'
    p = EmbeddedPolicy({"p.rego": src}, {}, PATH, "r", probe=False)
    with pytest.raises(PolicyEvalError):
        p.evaluate({"x": True})


def test_decision_of_the_wrong_shape_is_refused_at_load(tmp_path):
    src = 'package fhir.writeback\n\nimport rego.v1\n\ndecision := "yes"\n'
    with pytest.raises(PolicyLoadError, match="is not"):
        EmbeddedPolicy.load(write(tmp_path, {"p.rego": src}), PATH)


def test_compile_errors_are_load_errors(tmp_path):
    with pytest.raises(PolicyLoadError, match="does not compile"):
        EmbeddedPolicy.load(write(tmp_path, {"p.rego": "package fhir.writeback\n\ndecision := {\n"}), PATH)


@pytest.mark.parametrize("files,match", [
    ({}, "holds no .rego"),
    ({"p.rego": ECHO, "d.json": "{not json"}, "policy data d.json"),
    ({"p.rego": ECHO, "d.json": "[1]"}, "JSON object"),
    ({"p.rego": ECHO, "a.json": '{"x": {"y": 1}}', "b.json": '{"x": {"y": 2}}'}, "defined twice"),
])
def test_bad_policy_dirs(tmp_path, files, match):
    with pytest.raises(PolicyLoadError, match=match):
        EmbeddedPolicy.load(write(tmp_path, files), PATH)


def test_missing_dir(tmp_path):
    with pytest.raises(PolicyLoadError, match="not a directory"):
        EmbeddedPolicy.load(tmp_path / "nope", PATH)


def test_hot_reload_keeps_the_last_good_engine(tmp_path):
    d = tmp_path / "p"
    shutil.copytree(POLICIES, d)
    good = EmbeddedPolicy.load(d, PATH)
    rev = good.revision
    # a broken edit: reload refuses with the reason, the running engine still decides
    (d / "writeback.rego").write_text((d / "writeback.rego").read_text() + "\nbroken := {\n")
    with pytest.raises(PolicyLoadError, match="does not compile"):
        good.reload()
    assert good.evaluate(ALLOWED)["allow"] and good.revision == rev
    # a good edit: the new engine has a new revision and the new rules
    shutil.copy(POLICIES / "writeback.rego", d / "writeback.rego")
    data = json.loads((d / "data.json").read_text())
    data["fhir_sidecar"]["clients"]["demo-writer"]["write_types"] = []
    (d / "data.json").write_text(json.dumps(data))
    new = good.reload()
    assert new.revision != rev
    assert new.evaluate(ALLOWED)["reasons"] == ["Observation writes are not allowed for client demo-writer"]
    assert good.evaluate(ALLOWED)["allow"]


def test_revision_ignores_test_files_and_dotfiles(tmp_path):
    d = tmp_path / "p"
    shutil.copytree(POLICIES, d)
    rev = policy_revision(d)
    (d / "extra_test.rego").write_text("package x_test\n\nimport rego.v1\n\ntest_x if true\n")
    (d / ".swp.rego").write_text("garbage")
    assert policy_revision(d) == rev


def test_concurrent_evaluations_do_not_mix(tmp_path):
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": ECHO}), PATH)
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(200):
            cid = f"c{n}-{i}"
            if p.evaluate({"client": {"id": cid}})["reasons"] != [f"client {cid}"]:
                errors.append(cid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_decide_is_async_and_checks_the_shape(tmp_path):
    import asyncio
    p = EmbeddedPolicy.load(POLICIES, PATH)
    assert asyncio.run(p.decide(ALLOWED)) == {"allow": True, "reasons": [], "review": False}
    src = 'package fhir.writeback\n\nimport rego.v1\n\ndecision := [1]\n'
    q = EmbeddedPolicy({"p.rego": src}, {}, PATH, "r", probe=False)
    with pytest.raises(PolicyEvalError):
        asyncio.run(q.decide(ALLOWED))


def test_inputs_the_engine_cannot_hold_exactly_are_refused(tmp_path):
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": ECHO}), PATH)
    for bad in ({"client": {"id": "a\x00b"}}, {"client": {"id": 1.0e400}}, {"x": {1: 2}}, {"x": object()},
                {"x": 2**70}, {"x": float("nan")}):
        with pytest.raises(PolicyEvalError):
            p.evaluate(bad)
    assert p.evaluate({"client": {"id": "ok"}, "t": (1, 2)})["reasons"] == ["client ok"]


def test_long_and_unusual_strings_are_read_back_exactly(tmp_path):
    """Decision strings longer than the reader's reusable buffer, and every kind of scalar in
    the input, come back as they went in."""
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": ECHO}), PATH)
    for text in ["x" * 5000, "é" * 700, 'q"' * 600]:
        assert p.evaluate({"client": {"id": text}})["reasons"] == ["client " + text]
    src = 'package fhir.writeback\n\nimport rego.v1\n\ndecision := {"allow": false, "reasons": [], "echo": input}\n'
    q = EmbeddedPolicy({"p.rego": src}, {}, PATH, "r", probe=False)
    value = {"a": [1, -2, 2**62, 1.5, True, False, None, "s", [], {}], "b": {"c": ("t", 2)}, "d": [[[["deep"]]]]}
    assert q.evaluate(value)["echo"] == {**value, "b": {"c": ["t", 2]}}


def test_input_nesting_limit(tmp_path):
    p = EmbeddedPolicy.load(write(tmp_path, {"p.rego": ECHO}), PATH)
    ok: dict = {"client": {"id": "n"}}
    node = ok
    for _ in range(150):
        node["x"] = {}
        node = node["x"]
    assert p.evaluate(ok)["reasons"] == ["client n"]
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(PolicyEvalError, match="nested too deeply"):
        p.evaluate({"client": {"id": "n"}, "x": deep})
