"""The embedded Rego engine (regopy, Microsoft rego-cpp): compile once, evaluate per write.

The policy directory holds `*.rego` modules (tests `*_test.rego` are left out of the serving
bundle) and `*.json` data files merged under `data`. `revision` is a hash of all of them, and
travels into logs and audit records.

The decision is read from rego-cpp's result *nodes*, never from its JSON text: regopy 1.5 prints
strings without escaping them (a `"` inside a reason ends the string early), so parsing that text
would let a policy that echoes request values into its reasons change the decision's structure
(`..."], "allow": true, ...`). The node tree keeps the structure exact.

Hot reload: `EmbeddedPolicy.load(...)` or `policy.reload()` build a complete new engine (compile,
then evaluate a probe input) and raise `PolicyLoadError` with the reason if that fails, so the
caller keeps serving with the engine it has.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regopy import Interpreter
from regopy.rego_shared import (
    LogLevel,
    NodeKind,
    rego,
    rego_bundle_node,
    rego_get_error,
    rego_node_get,
    rego_node_size,
    rego_node_value,
    rego_output_string,
)

from sidecar.config import ConfigError


class PolicyLoadError(ConfigError):
    """The policy does not load, compile or decide: the caller keeps its previous engine."""


class PolicyEvalError(RuntimeError):
    """One evaluation failed or was undefined: the caller answers 503 (fail closed)."""


@dataclass(frozen=True)
class PolicyFiles:
    modules: dict[str, str]   # relative path -> Rego source
    data: dict[str, Any]      # all data files merged
    revision: str             # sha256 prefix over every file read (names and contents)


def read_policy_dir(directory: Path, *, include_tests: bool = False) -> PolicyFiles:
    """Read `*.rego` (test modules only if asked) and `*.json` data under `directory`."""
    if not directory.is_dir():
        raise PolicyLoadError(f"policy.dir {directory} is not a directory")
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    digest = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(directory).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # editor swap files, .git, ...
        if f.suffix == ".rego":
            if f.name.endswith("_test.rego") and not include_tests:
                continue
            src = _read(f, rel)
            modules[rel] = src
        elif f.suffix == ".json":
            src = _read(f, rel)
            try:
                _merge(data, json.loads(src))
            except (ValueError, TypeError) as e:
                raise PolicyLoadError(f"policy data {rel}: {e}") from None
        else:
            continue
        digest.update(rel.encode() + b"\0" + src.encode() + b"\0")
    if not modules:
        raise PolicyLoadError(f"policy.dir {directory} holds no .rego module")
    return PolicyFiles(modules, data, digest.hexdigest()[:16])


def policy_revision(directory: Path) -> str:
    """The revision `EmbeddedPolicy.load` would report for this directory (serving files only)."""
    return read_policy_dir(directory).revision


# A write that every policy must decide (usually a deny: no client is called this).
PROBE_INPUT: dict[str, Any] = {
    "client": {"id": "policy-load-probe", "tenant": None, "scopes": [], "patient": None, "user": None,
               "auth": "api-key"},
    "request": {"method": "POST", "path": "/Basic", "interaction": "create", "resource_type": "Basic", "id": None,
                "operation": None, "conditional": False, "query": {}, "headers": {}, "write": True},
    "resource": {"resourceType": "Basic"},
    "context": {"time": "2000-01-01T00:00:00Z", "shadow": False, "approvals": []},
}


class EmbeddedPolicy:
    engine = "embedded"

    def __init__(self, modules: dict[str, str], data: dict[str, Any], path: str, revision: str,
                 *, directory: Path | None = None, probe: bool = True) -> None:
        self.revision = revision
        self.path = path
        self.directory = directory
        self.query = "data." + path.replace("/", ".") + ".decision"
        # compiled as an entrypoint, not a query: the same plan without the query's own wrapping,
        # ~12% less per decision (bench/README.md, "Policy decision latency")
        self.entrypoint = path.strip("/") + "/decision"
        self._entrypoint_c = self.entrypoint.encode("utf-8")
        self._lock = threading.Lock()  # one interpreter: set_input + query must not interleave
        self._interp = Interpreter()
        self._interp.log_level = LogLevel.NONE  # rego-cpp prints errors to stdout otherwise (our log stream)
        try:
            for name, src in modules.items():
                self._interp.add_module(name, src)
            self._interp.add_data_json(json.dumps(data))
            self._bundle = self._interp.build(None, [self.entrypoint])
        except Exception as e:
            raise PolicyLoadError(f"policy does not compile: {compile_error_text(str(e), modules)}") from None
        if not self._bundle.ok():
            raise PolicyLoadError(f"policy does not compile: {compile_error_text(_bundle_error(self._bundle, self._interp), modules)}")
        if probe:
            try:
                decision = self.evaluate(PROBE_INPUT)
            except PolicyEvalError as e:
                raise PolicyLoadError(f"policy does not decide: {e}") from None
            if (not isinstance(decision, dict) or not isinstance(decision.get("allow"), bool)
                    or not isinstance(decision.get("reasons"), list)):
                raise PolicyLoadError(f"{self.query} is not {{allow: bool, reasons: [...]}} for a probe input")

    @classmethod
    def load(cls, directory: Path, path: str) -> EmbeddedPolicy:
        files = read_policy_dir(directory)
        return cls(files.modules, files.data, path, files.revision, directory=directory)

    def reload(self) -> EmbeddedPolicy:
        """A new engine from the same directory; PolicyLoadError (keep this one) if it is bad."""
        if self.directory is None:
            raise PolicyLoadError("this policy was not loaded from a directory")
        return type(self).load(self.directory, self.path)

    async def decide(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        decision = self.evaluate(input_doc)
        if not isinstance(decision, dict):
            raise PolicyEvalError("policy decision is not an object")
        return decision

    def evaluate(self, input_doc: dict[str, Any]) -> Any:
        """The value of the decision document for this input (PolicyEvalError if undefined/error)."""
        term = to_rego_input(input_doc)
        try:
            with self._lock:
                # the input stays alive until the query's output has been read (regopy's rule)
                if _SET_INPUT(self._interp._impl, term) != 0:
                    raise PolicyEvalError("policy evaluation failed: " + _short(rego_get_error(self._interp._impl)))
                out = _QUERY_ENTRYPOINT(self._interp._impl, self._bundle._impl, self._entrypoint_c)
                if not out:
                    raise PolicyEvalError("policy evaluation failed: " + _short(rego_get_error(self._interp._impl)))
                try:
                    if not _OUTPUT_OK(out):
                        raise PolicyEvalError("policy evaluation failed: " + _error_text(out))
                    return _decision_value(_OUTPUT_NODE(out))
                finally:
                    _FREE_OUTPUT(out)
        finally:
            _FREE_INPUT(term)


_ERROR_RE = re.compile(r"\(error \d+:(?P<file>[^|\n]+)\|(?P<off>\d+)\|\d+\s*\(errormsg \d+:(?P<msg>[^\n]*?)\)\s*\n")


def compile_error_text(text: str, modules: dict[str, str]) -> str:
    """rego-cpp's error (an AST dump) as `file:line: message; ...`."""
    found = []
    for m in _ERROR_RE.finditer(text):
        src = modules.get(m.group("file"), "")
        line = src[: int(m.group("off"))].count("\n") + 1 if src else 0
        found.append(f"{m.group('file')}:{line}: {m.group('msg').strip()}" if line else f"{m.group('file')}: {m.group('msg').strip()}")
    if found:
        return "; ".join(dict.fromkeys(found))[:1000]
    return " ".join(text.split())[:300]


# Every call made per decision goes through a PyDLL: it keeps the GIL instead of releasing and
# retaking it (regopy's CDLL does that on each of the hundreds of calls of one decision, and under
# load every release lets another thread in: ~20% more CPU per decision with a busy audit thread).
# A decision runs on the event loop, which waits for it anyway; other threads wait at most as long.
# The input calls are function objects of their own without argument types: ctypes then passes a
# pointer object, bytes and C ints straight through instead of converting each argument (about a
# tenth of the conversion time). 64-bit integers and doubles are wrapped explicitly.
_RAW = ctypes.PyDLL(rego._name)
_TYPED = ctypes.PyDLL(rego._name)  # a second handle: its function objects carry regopy's argument types


def _raw(name: str, restype: Any = ctypes.c_uint32) -> Any:
    f = getattr(_RAW, name)
    f.restype = restype
    return f


def _typed(name: str) -> Any:
    """rego-cpp's `name` with regopy's declared result and argument types, keeping the GIL."""
    src, f = getattr(rego, name), getattr(_TYPED, name)
    f.restype, f.argtypes = src.restype, src.argtypes
    return f


_NEW_INPUT, _FREE_INPUT = _typed("regoNewInput"), _typed("regoFreeInput")
_SET_INPUT, _QUERY_ENTRYPOINT = _typed("regoSetInput"), _typed("regoBundleQueryEntrypoint")
_OUTPUT_OK, _OUTPUT_NODE, _FREE_OUTPUT = _typed("regoOutputOk"), _typed("regoOutputNode"), _typed("regoFreeOutput")
rego_free_input = _FREE_INPUT  # frees what to_rego_input returns
_IN_INT, _IN_FLOAT, _IN_STR = _raw("regoInputInt"), _raw("regoInputFloat"), _raw("regoInputString")
_IN_BOOL, _IN_NULL, _IN_ITEM = _raw("regoInputBoolean"), _raw("regoInputNull"), _raw("regoInputObjectItem")
_IN_OBJ, _IN_ARR = _raw("regoInputObject"), _raw("regoInputArray")
_IN_VALIDATE, _IN_SIZE = _raw("regoInputValidate"), _raw("regoInputSize")
_C_INT64, _C_DOUBLE, _C_PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
_MAX_DEPTH = 200


def to_rego_input(value: Any) -> int:
    """A rego-cpp input term for a JSON value (dict/list/str/int/float/bool/None), built with
    rego-cpp's stack calls (regopy's `Input` does the same, about twice as slowly). A string
    holding NUL is refused: C strings would end there, and the policy must see the value the
    upstream gets. The caller frees the term with `rego_free_input`.

    This is most of what a decision costs for a large bundle (every value is one or more calls
    into rego-cpp), so the walk is written for speed: strings, the most common values, are pushed
    inline; a call's status is checked once at the end (rego-cpp's input status is sticky: after
    a failed call every later call fails, and validation reports it), plus the stack holding
    exactly the one value."""
    term = _NEW_INPUT()
    if not term:
        raise PolicyEvalError("cannot create a policy input")
    try:
        handle = _C_PTR(term)
        _push(handle, value, 0)
        if _IN_VALIDATE(handle) != 0 or _IN_SIZE(handle) != 1:
            raise PolicyEvalError("cannot create a policy input")
    except BaseException:
        _FREE_INPUT(term)
        raise
    return term


def _push(term: Any, val: Any, depth: int) -> None:
    t = type(val)
    if t is str:
        if "\x00" in val:
            raise PolicyEvalError("the policy input holds a NUL character")
        _IN_STR(term, val.encode("utf-8"))
    elif t is dict:
        _push_dict(term, val, depth)
    elif t is list or t is tuple:
        _push_list(term, val, depth)
    else:
        _push_scalar(term, val, t)


def _push_dict(term: Any, obj: dict[Any, Any], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise PolicyEvalError("the policy input is nested too deeply")
    depth += 1
    push_str, item = _IN_STR, _IN_ITEM
    for k, v in obj.items():
        if type(k) is not str:
            raise PolicyEvalError("the policy input has a non-string key")
        if "\x00" in k:
            raise PolicyEvalError("the policy input holds a NUL character")
        push_str(term, k.encode("utf-8"))
        t = type(v)
        if t is str:
            if "\x00" in v:
                raise PolicyEvalError("the policy input holds a NUL character")
            push_str(term, v.encode("utf-8"))
        elif t is dict:
            _push_dict(term, v, depth)
        elif t is list or t is tuple:
            _push_list(term, v, depth)
        else:
            _push_scalar(term, v, t)
        item(term)
    if _IN_OBJ(term, len(obj)) != 0:
        raise PolicyEvalError("cannot create a policy input")


def _push_list(term: Any, arr: list[Any] | tuple[Any, ...], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise PolicyEvalError("the policy input is nested too deeply")
    depth += 1
    push_str = _IN_STR
    for v in arr:
        t = type(v)
        if t is str:
            if "\x00" in v:
                raise PolicyEvalError("the policy input holds a NUL character")
            push_str(term, v.encode("utf-8"))
        elif t is dict:
            _push_dict(term, v, depth)
        elif t is list or t is tuple:
            _push_list(term, v, depth)
        else:
            _push_scalar(term, v, t)
    if _IN_ARR(term, len(arr)) != 0:
        raise PolicyEvalError("cannot create a policy input")


def _push_scalar(term: Any, val: Any, t: type) -> None:
    if t is bool:
        _IN_BOOL(term, 1 if val else 0)
    elif val is None:
        _IN_NULL(term)
    elif t is int:
        if not -(2**63) <= val < 2**63:
            raise PolicyEvalError("the policy input holds an integer out of range")
        _IN_INT(term, _C_INT64(val))
    elif t is float:
        if not math.isfinite(val):
            raise PolicyEvalError("the policy input holds a non-finite number")
        _IN_FLOAT(term, _C_DOUBLE(val))
    else:
        raise PolicyEvalError(f"the policy input holds a {t.__name__}")


def _short(text: str) -> str:
    return " ".join(text.split())[:300] or "(no error text)"


def _bundle_error(bundle: Any, interp: Any = None) -> str:
    """The messages of a failed build: `message at `source``; ... (rego-cpp's error nodes)."""
    found: list[str] = []
    try:
        root = rego_bundle_node(bundle._impl)
        for i in range(rego_node_size(root) if root else 0):
            err = rego_node_get(root, i)
            if rego.regoNodeType(err) != NodeKind.Error:
                continue
            snippet = " ".join(rego_node_value(err).split())[:120]
            for j in range(rego_node_size(err)):
                part = rego_node_get(err, j)
                if rego.regoNodeType(part) == NodeKind.ErrorMessage:
                    found.append(f"{rego_node_value(part).strip()} at `{snippet}`")
    except Exception:
        pass
    if not found and interp is not None:
        try:
            found.append(rego_get_error(interp._impl))
        except Exception:
            pass
    return "; ".join(x for x in found if x) or "(the engine gave no error text)"


def _error_text(out: Any) -> str:
    try:
        return rego_output_string(out)[:300]
    except Exception:
        return "(no error text)"


_NODE_TYPE, _NODE_SIZE, _NODE_GET = _typed("regoNodeType"), _typed("regoNodeSize"), _typed("regoNodeGet")
_NODE_JSON, _NODE_JSON_SIZE = _typed("regoNodeJSON"), _typed("regoNodeJSONSize")
_K_TERM, _K_SCALAR, _K_OBJECT, _K_ITEM = int(NodeKind.Term), int(NodeKind.Scalar), int(NodeKind.Object), int(NodeKind.ObjectItem)
_K_ARRAY, _K_SET, _K_STRING, _K_TRUE = int(NodeKind.Array), int(NodeKind.Set), int(NodeKind.String), int(NodeKind.True_)
_K_FALSE, _K_NULL, _K_INT, _K_FLOAT = int(NodeKind.False_), int(NodeKind.Null), int(NodeKind.Int), int(NodeKind.Float)
_K_RESULTS, _K_TERMS, _K_UNDEFINED = int(NodeKind.Results), int(NodeKind.Terms), int(NodeKind.Undefined)
_TEXT = threading.local()  # a reusable buffer per thread for node texts (most fit in it)


def _node_text(node: Any) -> str:
    """rego-cpp's JSON text of a node (for a string: its quoted, unescaped text)."""
    buf = getattr(_TEXT, "buf", None)
    if buf is None:
        buf = _TEXT.buf = ctypes.create_string_buffer(1024)
    if _NODE_JSON(node, buf, 1024) != 0:  # longer than the buffer: ask for the size
        size = _NODE_JSON_SIZE(node)
        buf = ctypes.create_string_buffer(size)
        if _NODE_JSON(node, buf, size) != 0:
            raise PolicyEvalError("cannot read the policy decision")
    return buf.value.decode("utf-8")


def _decision_value(root: Any) -> Any:
    """Results -> one Result -> Terms -> the value. Anything else is undefined or ambiguous."""
    kind = _NODE_TYPE(root)
    if kind == _K_UNDEFINED:
        raise PolicyEvalError("policy decision undefined")
    if kind != _K_RESULTS or _NODE_SIZE(root) != 1:
        raise PolicyEvalError("policy decision undefined or ambiguous")
    result = _NODE_GET(root, 0)
    for i in range(_NODE_SIZE(result)):
        child = _NODE_GET(result, i)
        if _NODE_TYPE(child) == _K_TERMS:
            if _NODE_SIZE(child) != 1:
                raise PolicyEvalError("policy decision undefined or ambiguous")
            return _node_value(_NODE_GET(child, 0), 0)
    raise PolicyEvalError("policy decision undefined")


def _node_value(node: Any, depth: int) -> Any:
    if depth > 64:
        raise PolicyEvalError("policy decision nested too deeply")
    kind = _NODE_TYPE(node)
    if kind == _K_STRING:
        # rego-cpp keeps a string as its quoted, unescaped text: drop the quotes, keep the rest
        text = _node_text(node)
        if len(text) < 2 or text[0] != '"' or text[-1] != '"':
            raise PolicyEvalError("unexpected policy string node")
        return text[1:-1]
    if kind == _K_OBJECT:
        obj: dict[str, Any] = {}
        for i in range(_NODE_SIZE(node)):
            item = _NODE_GET(node, i)
            if _NODE_TYPE(item) != _K_ITEM or _NODE_SIZE(item) != 2:
                raise PolicyEvalError("unexpected policy result node")
            key = _node_value(_NODE_GET(item, 0), depth + 1)
            if not isinstance(key, str) or key in obj:
                raise PolicyEvalError("policy decision has a non-string or repeated key")
            obj[key] = _node_value(_NODE_GET(item, 1), depth + 1)
        return obj
    if kind == _K_ARRAY or kind == _K_SET:
        return [_node_value(_NODE_GET(node, i), depth + 1) for i in range(_NODE_SIZE(node))]
    if kind == _K_TRUE:
        return True
    if kind == _K_FALSE:
        return False
    if kind == _K_NULL:
        return None
    if kind == _K_TERM or kind == _K_SCALAR:
        if _NODE_SIZE(node) != 1:
            raise PolicyEvalError("unexpected policy result node")
        return _node_value(_NODE_GET(node, 0), depth + 1)
    if kind == _K_INT:
        return int(_node_text(node))
    if kind == _K_FLOAT:
        return float(_node_text(node))
    raise PolicyEvalError(f"unexpected policy result node kind {kind}")


def _read(f: Path, rel: str) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyLoadError(f"policy file {rel}: {e}") from None


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
