"""A small RFC 6902 JSON Patch implementation (add/remove/replace/move/copy/test).

Own code rather than a library so the sandbox stays an independent witness.
Malformed patch documents raise 400; operations that cannot be applied raise 422.
"""

from __future__ import annotations

import copy
from typing import Any

from .store import FhirError

_REQUIRED = {
    "add": ("path", "value"),
    "remove": ("path",),
    "replace": ("path", "value"),
    "move": ("from", "path"),
    "copy": ("from", "path"),
    "test": ("path", "value"),
}


def validate_patch(doc: Any) -> list[dict[str, Any]]:
    """Check the shape of a patch document (400 on failure)."""
    if not isinstance(doc, list):
        raise FhirError(400, "JSON Patch document must be an array", "invalid")
    for index, op in enumerate(doc):
        if not isinstance(op, dict) or op.get("op") not in _REQUIRED:
            raise FhirError(400, f"patch[{index}]: unknown or missing 'op'", "invalid")
        for member in _REQUIRED[op["op"]]:
            if member not in op:
                raise FhirError(400, f"patch[{index}]: missing '{member}'", "invalid")
            if member in ("path", "from") and not isinstance(op[member], str):
                raise FhirError(400, f"patch[{index}]: '{member}' must be a string", "invalid")
        _tokens(op["path"])
        if "from" in op:
            _tokens(op["from"])
    return doc


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise FhirError(400, f"invalid JSON pointer {pointer!r}", "invalid")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _fail(message: str) -> FhirError:
    return FhirError(422, message, "processing")


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise _fail(f"invalid array index {token!r}")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise _fail(f"array index {index} out of range")
    return index


def _parent(doc: Any, tokens: list[str]) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise _fail(f"path segment {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_add=False)]
        else:
            raise _fail(f"cannot descend into a scalar at {token!r}")
    return node, tokens[-1]


def _get(doc: Any, pointer: str) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        return doc
    parent, last = _parent(doc, tokens)
    if isinstance(parent, dict):
        if last not in parent:
            raise _fail(f"path {pointer!r} does not exist")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise _fail(f"path {pointer!r} does not exist")


def _remove(doc: Any, pointer: str) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        raise _fail("cannot remove the whole resource")
    parent, last = _parent(doc, tokens)
    if isinstance(parent, dict):
        if last not in parent:
            raise _fail(f"path {pointer!r} does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise _fail(f"path {pointer!r} does not exist")


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _tokens(pointer)
    if not tokens:
        return value
    parent, last = _parent(doc, tokens)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise _fail(f"cannot add below a scalar at {pointer!r}")
    return doc


def _json_equal(a: Any, b: Any) -> bool:
    # Python says True == 1; JSON does not.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b
    )


def apply_patch(resource: dict[str, Any], patch: list[dict[str, Any]]) -> Any:
    """Return a patched deep copy of ``resource``; the input is never modified."""
    doc: Any = copy.deepcopy(resource)
    for op in patch:
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)  # must exist
            if _tokens(path):
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "move":
            if path.startswith(op["from"] + "/"):
                raise _fail("cannot move a value into its own child")
            doc = _add(doc, path, _remove(doc, op["from"]))
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if not _json_equal(_get(doc, path), op["value"]):
                raise _fail(f"test failed at {path!r}")
    return doc
