"""`fhir-sidecar policy test [DIR]`: run the `test_` rules of `*_test.rego` with the embedded engine.

Every `test_*` rule of every package found in the directory's `*_test.rego` files is evaluated
as `data.<package>.<rule>` against all modules (tests included) and all data files; a test
passes when it is `true`, fails when it is undefined or anything else, and errors when the
engine reports an error. The output reads like `opa test`:

    FAIL: data.fhir.writeback_test.test_x (policies/writeback_test.rego)
    --------------------------------------------------------------------------------
    PASS: 41/42
    FAIL: 1/42

A run with no test rules, or whose policies do not compile, is not a pass (`ok` is False).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regopy import Input, Interpreter
from regopy.rego_shared import (
    LogLevel,
    rego,
    rego_free_output,
    rego_get_error,
    rego_output_node,
    rego_output_ok,
    rego_output_string,
)

from sidecar.policy.embedded import (
    PolicyEvalError,
    PolicyLoadError,
    _bundle_error,
    _decision_value,
    read_policy_dir,
)

_PACKAGE_RE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*(?:#.*)?$", re.MULTILINE)
_TEST_RE = re.compile(r"^(test_[A-Za-z0-9_]*)(?=[\s\[{:=(]|$)", re.MULTILINE)
_RULER = "-" * 80
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PolicyTest:
    package: str
    name: str
    file: str

    @property
    def ref(self) -> str:
        return f"data.{self.package}.{self.name}"


@dataclass
class PolicyTestReport:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def ok(self) -> bool:
        """Exit 0 only for this: at least one test ran, and none failed or errored."""
        return self.passed > 0 and self.failed == 0 and self.errors == 0


def discover_tests(modules: dict[str, str]) -> list[PolicyTest]:
    """The `test_` rules of the `*_test.rego` modules, in file order, each (package, name) once."""
    seen: set[tuple[str, str]] = set()
    tests: list[PolicyTest] = []
    for rel in sorted(modules):
        if not rel.endswith("_test.rego"):
            continue
        src = _strip_comments(modules[rel])
        pkg = _PACKAGE_RE.search(src)
        if pkg is None:
            continue
        for m in _TEST_RE.finditer(src, pkg.end()):
            key = (pkg.group(1), m.group(1))
            if key not in seen:
                seen.add(key)
                tests.append(PolicyTest(key[0], key[1], rel))
    return tests


def run_policy_tests(directory: Path, *, verbose: bool = False) -> PolicyTestReport:
    report = PolicyTestReport()
    try:
        files = read_policy_dir(directory, include_tests=True)
    except PolicyLoadError as e:
        report.errors = 1
        report.lines = [f"ERROR: {e}", _RULER, "ERROR: 1/1"]
        return report
    tests = discover_tests(files.modules)
    if not tests:
        report.errors = 1
        report.lines = [f"ERROR: no test_ rules in any *_test.rego under {directory}", _RULER, "ERROR: 1/1"]
        return report
    with _LOCK:  # one interpreter, queries one at a time
        try:
            interp = Interpreter()
            interp.log_level = LogLevel.NONE
            for name, src in files.modules.items():
                interp.add_module(name, src)
            interp.add_data_json(json.dumps(files.data))
            # compile once for every test (a query per test would recompile everything each time)
            entrypoints = [t.ref[len("data."):].replace(".", "/") for t in tests]
            bundle = interp.build(None, entrypoints)
            if not bundle.ok():
                raise RuntimeError(_bundle_error(bundle, interp))
            interp.set_input(Input({}))
        except Exception as e:
            report.errors = len(tests)
            report.lines = [f"ERROR: policies do not compile: {_short(str(e))}", _RULER,
                            f"ERROR: {len(tests)}/{len(tests)}"]
            return report
        for t, entrypoint in zip(tests, entrypoints):
            started = time.perf_counter()
            outcome, detail = _run_one(interp, bundle, entrypoint)
            took = _duration(time.perf_counter() - started)
            if outcome == "pass":
                report.passed += 1
                if verbose:
                    report.lines.append(f"PASS: {t.ref} ({took})")
            elif outcome == "fail":
                report.failed += 1
                report.lines.append(f"FAIL: {t.ref} ({t.file}, {took})")
            else:
                report.errors += 1
                report.lines.append(f"ERROR: {t.ref} ({t.file}): {detail}")
    n = report.total
    report.lines.append(_RULER)
    if report.passed:
        report.lines.append(f"PASS: {report.passed}/{n}")
    if report.failed:
        report.lines.append(f"FAIL: {report.failed}/{n}")
    if report.errors:
        report.lines.append(f"ERROR: {report.errors}/{n}")
    return report


def _run_one(interp: Interpreter, bundle: Any, entrypoint: str) -> tuple[str, str]:
    out = rego.regoBundleQueryEntrypoint(interp._impl, bundle._impl, entrypoint.encode("utf-8"))
    if not out:
        return "error", _short(rego_get_error(interp._impl))
    try:
        if not rego_output_ok(out):
            return "error", _short(rego_output_string(out))
        try:
            value = _decision_value(rego_output_node(out))
        except PolicyEvalError:
            return "fail", "undefined"
        return ("pass", "") if value is True else ("fail", "not true")
    finally:
        rego_free_output(out)


def _short(text: str) -> str:
    """An engine error in one line: rego-cpp appends its whole AST to some messages."""
    text = " ".join(text.split("(rego-errorseq", 1)[0].split()) or " ".join(text.split())
    return text[:300]


def _strip_comments(src: str) -> str:
    """Drop `#` comments (outside strings) so a commented-out test is not discovered."""
    out = []
    for line in src.splitlines():
        in_str: str | None = None
        cut = len(line)
        i = 0
        while i < len(line):
            c = line[i]
            if in_str:
                if c == "\\" and in_str == '"':
                    i += 2
                    continue
                if c == in_str:
                    in_str = None
            elif c in "\"`":
                in_str = c
            elif c == "#":
                cut = i
                break
            i += 1
        out.append(line[:cut])
    return "\n".join(out)


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    return f"{seconds * 1e3:.1f}ms"
