"""The embedded Rego engine (regopy, Microsoft rego-cpp): compile once, evaluate per write.

The policy directory holds `*.rego` modules (tests `*_test.rego` are left out of the serving
bundle) and `*.json` data files merged under `data`. `revision` is a hash of all of them, and
travels into logs and audit records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from regopy import Input, Interpreter

from sidecar.config import ConfigError


class PolicyLoadError(ConfigError):
    pass


class EmbeddedPolicy:
    def __init__(self, modules: dict[str, str], data: dict[str, Any], path: str, revision: str) -> None:
        self.revision = revision
        self._query = "data." + path.replace("/", ".") + ".decision"
        self._interp = Interpreter()
        try:
            for name, src in modules.items():
                self._interp.add_module(name, src)
            self._interp.add_data_json(json.dumps(data))
            self._bundle = self._interp.build(self._query, [])
        except Exception as e:
            raise PolicyLoadError(f"policy does not compile: {e}") from None
        if not self._bundle.ok():
            raise PolicyLoadError(f"policy does not compile: {self._bundle.node}")

    @classmethod
    def load(cls, directory: Path, path: str) -> "EmbeddedPolicy":
        if not directory.is_dir():
            raise PolicyLoadError(f"policy.dir {directory} is not a directory")
        modules: dict[str, str] = {}
        data: dict[str, Any] = {}
        digest = hashlib.sha256()
        for f in sorted(directory.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(directory).as_posix()
            if f.suffix == ".rego" and not f.name.endswith("_test.rego"):
                src = f.read_text(encoding="utf-8")
                modules[rel] = src
            elif f.suffix == ".json":
                src = f.read_text(encoding="utf-8")
                try:
                    _merge(data, json.loads(src))
                except (ValueError, TypeError) as e:
                    raise PolicyLoadError(f"policy data {rel}: {e}") from None
            else:
                continue
            digest.update(rel.encode() + b"\0" + src.encode() + b"\0")
        if not modules:
            raise PolicyLoadError(f"policy.dir {directory} holds no .rego module")
        return cls(modules, data, path, digest.hexdigest()[:16])

    async def decide(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        return self.evaluate(input_doc)

    def evaluate(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        # regopy: keep the Input and the Output alive until the result is read (use-after-free)
        term = Input(input_doc)
        self._interp.set_input(term)
        out = self._interp.query_bundle(self._bundle)
        try:
            exprs = json.loads(str(out)).get("expressions")
        except ValueError:
            raise RuntimeError("policy evaluation failed") from None
        del term
        if not exprs or not isinstance(exprs[0], dict):
            raise RuntimeError("policy decision undefined")
        return exprs[0]


def _merge(into: dict[str, Any], new: Any) -> None:
    if not isinstance(new, dict):
        raise TypeError("a data file must hold a JSON object")
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        elif k in into:
            raise TypeError(f"data key {k!r} is defined twice")
        else:
            into[k] = v
