"""Validation of FHIR R4 resources (via the fhir.resources R4B models) and of
JSON Patch documents.

Two passes, both fail-closed:

1. A strict JSON-shape walk driven by the model field tables. The pydantic
   models are lax where FHIR JSON is not: they accept ``"5"`` for a decimal,
   ``1`` for a boolean, ``null``, empty arrays/objects/strings, the legacy
   ``fhir_comments`` member, any code for a required binding and any markup in
   ``Narrative.div``. The walk refuses all of these, refuses every nested
   resource (contained, Bundle.entry.resource, Parameters...) whose type is
   not supported (see ``types.py``) and checks narratives against the FHIR
   XHTML rules (txt-1/txt-2).
2. ``model_validate`` of the R4B model class (cardinality, regexes, choice
   types, resource-specific validators; nested resources are validated with
   their own model class).

Error messages name element paths (``Observation.code.coding[0]``) and the
kind of problem, never input values: they may be logged.
"""

from __future__ import annotations

import decimal
import importlib
import json
import re
import types as _pytypes
import typing
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Final, Literal

from pydantic import ValidationError

from sidecar.fhir.types import is_r4_type, is_supported

__all__ = ["FhirValidationError", "validate_resource", "validate_json_patch", "model_class"]

ErrorCode = Literal["structure", "invalid", "not-supported"]
_MAX_REPORTED: Final = 3


class FhirValidationError(ValueError):
    """``code`` is the FHIR issue code; the message holds paths, no values."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# Model classes and their field tables
# --------------------------------------------------------------------------

_classes: dict[str, type] = {}


def model_class(resource_type: str) -> type:
    """The R4B model class for a supported type (imported lazily, cached)."""
    cls = _classes.get(resource_type)
    if cls is None:
        if not is_supported(resource_type):
            raise FhirValidationError("not-supported", "resource type is not supported")
        module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
        cls = getattr(module, resource_type)
        if cls.get_resource_type() != resource_type:  # pragma: no cover - sanity
            raise FhirValidationError("not-supported", "resource type is not supported")
        _classes[resource_type] = cls
    return cls


Kind = Literal["bool", "int", "dec", "str", "id", "xhtml", "complex", "resource", "ext", "other"]


@dataclass(frozen=True, slots=True)
class _Field:
    kind: Kind
    is_list: bool
    sub: type | None = None  # model class for "complex"/"ext"
    enum: frozenset[str] | None = None  # complete required-binding code list


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, _pytypes.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _classify(ann: Any) -> tuple[Kind, bool, type | None]:
    ann = _strip_optional(ann)
    is_list = typing.get_origin(ann) is list
    if is_list:
        ann = _strip_optional(typing.get_args(ann)[0])
    if typing.get_origin(ann) is typing.Annotated:
        base, *meta = typing.get_args(ann)
        markers = {type(m).__name__ for m in meta}
        if "Xhtml" in markers:
            return "xhtml", is_list, None
        if "Id" in markers:  # the model's default length limit is not R4's 64
            return "id", is_list, None
        kind: Kind = {bool: "bool", int: "int", decimal.Decimal: "dec"}.get(base, "str")  # type: ignore[assignment]
        return kind, is_list, None
    if ann is bool:
        return "bool", is_list, None
    get_klass = getattr(ann, "get_model_klass", None)
    if get_klass is not None:
        klass = get_klass()
        if klass.__name__ in ("Resource", "DomainResource"):
            return "resource", is_list, None
        if klass.__name__ == "FHIRPrimitiveExtension":
            return "ext", is_list, klass
        return "complex", is_list, klass
    return "other", is_list, None  # tests assert no model field lands here


_tables: dict[type, dict[str, _Field]] = {}
_NOT_BINDINGS: Final = frozenset({("CapabilityStatement", "format")})  # MIME types


def _fields(cls: type) -> dict[str, _Field]:
    table = _tables.get(cls)
    if table is None:
        table = {}
        for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
            if name == "fhir_comments":  # not R4 JSON
                continue
            kind, is_list, sub = _classify(info.annotation)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            codes = extra.get("enum_values")
            # The generator takes these from the element's short text: "+" marks
            # a truncated list, "etc." an open one; a few are not bindings.
            checkable = isinstance(codes, list) and not {"+", "etc."} & set(codes)
            enum = frozenset(codes) if checkable and (cls.__name__, name) not in _NOT_BINDINGS else None
            table[info.alias or name] = _Field(kind, is_list, sub, enum)
        _tables[cls] = table
    return table


# --------------------------------------------------------------------------
# Pass 1: strict JSON shape
# --------------------------------------------------------------------------

_SAFE_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # R4 id

# An element path is built only when a problem is reported: the walk passes a chain of
# (parent, key-or-index) tuples whose root is a string ("Observation"), so a valid resource costs
# no string formatting (a 1,000-entry Bundle visits ~100,000 elements).


def _key(k: str) -> str:
    return k if _SAFE_KEY.fullmatch(k) else "<key>"


def _render(path: Any) -> str:
    parts: list[str] = []
    while type(path) is tuple:
        path, seg = path
        parts.append(f"[{seg}]" if type(seg) is int else "." + _key(seg))
    return str(path) + "".join(reversed(parts))


class _Problem(Exception):
    def __init__(self, code: ErrorCode, path: Any, what: str) -> None:
        super().__init__(f"{_render(path)}: {what}")
        self.code = code


# FHIR strings are `[ \r\n\t\S]+`: no other control character (a NUL also breaks downstream engines)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_SCALAR_OK: Final = {
    "bool": lambda v: type(v) is bool,
    "int": lambda v: type(v) is int,
    "dec": lambda v: type(v) in (int, float),
    "str": lambda v: type(v) is str and v != "" and _CONTROL.search(v) is None,
    "xhtml": lambda v: type(v) is str and v != "" and _CONTROL.search(v) is None,
    "id": lambda v: type(v) is str and _ID.fullmatch(v) is not None,
}
_NO_NULLS: Final = frozenset({"complex", "resource"})  # array items that are never null
_twin_tables: dict[int, dict[str, _Field]] = {}


def _twin_table(table: dict[str, _Field]) -> dict[str, _Field]:
    """The fields of a primitive's extension twin (`_valueString`): id and extension only."""
    t = _twin_tables.get(id(table))  # tables live as long as the process (cached in _tables)
    if t is None:
        t = _twin_tables[id(table)] = {k: table[k] for k in ("id", "extension") if k in table}
    return t


class _Walk:
    """One strict walk over a resource. ``twins``: some object below has a key starting with
    ``_value`` (or a value the walk leaves to pydantic), so the model must see the copy made by
    ``_without_value_twins``; without one the resource goes to the model as it is."""

    __slots__ = ("twins",)

    def __init__(self) -> None:
        self.twins = False

    def resource(self, obj: Any, path: Any, contained: bool = False) -> None:
        if type(obj) is not dict:
            raise _Problem("structure", path, "resource must be a JSON object")
        rtype = obj.get("resourceType")
        if type(rtype) is not str:
            raise _Problem("structure", path, "missing resourceType")
        if not is_supported(rtype):
            what = "R4 resource type without faithful validation" if is_r4_type(rtype) else "unknown resource type"
            raise _Problem("not-supported", path, what)
        if contained and ("contained" in obj or "text" in obj):  # dom-2, dom-1
            raise _Problem("invalid", path, "contained resource with contained/text")
        self.element(obj, _fields(model_class(rtype)), path, skip="resourceType")

    def element(self, obj: dict[str, Any], table: dict[str, _Field], path: Any, skip: str | None = None) -> None:
        if not obj:
            raise _Problem("structure", path, "empty object")
        for key, value in obj.items():
            if key == skip:
                continue
            if key.startswith("_value"):
                self.twins = True
            field = table.get(key)
            if field is None:
                if key.startswith("_value") and key[1:] in table and type(value) is dict:
                    # a primitive value[x]'s extension twin (`_valueString`): an Element with id/extension only;
                    # the R4B Extension model has no fields for it, R4 allows it
                    self.element(value, _twin_table(table), (path, key))
                    continue
                raise _Problem("structure", (path, key), "unknown element")
            if not field.is_list:
                self.value(value, field, (path, key), key == "contained")
                continue
            if type(value) is not list or not value:
                raise _Problem("structure", (path, key), "must be a non-empty array")
            here = (path, key)
            no_nulls = field.kind in _NO_NULLS
            for i, item in enumerate(value):
                if item is None:
                    # null only aligns a primitive array with its "_x" twin
                    twin = obj.get(key[1:] if key.startswith("_") else "_" + key)
                    if no_nulls or type(twin) is not list or len(twin) != len(value) or twin[i] is None:
                        raise _Problem("structure", (here, i), "null not allowed")
                    continue
                self.value(item, field, (here, i), key == "contained")

    def value(self, value: Any, field: _Field, path: Any, contained: bool) -> None:
        kind = field.kind
        if kind == "resource":
            self.resource(value, path, contained)
        elif kind == "complex" or kind == "ext":
            if type(value) is not dict:
                raise _Problem("structure", path, "must be a JSON object")
            self.element(value, _fields(field.sub), path)  # type: ignore[arg-type]
        elif kind == "other":
            self.twins = True  # left to pydantic: it gets the copy without twins, as always
        elif not _SCALAR_OK[kind](value):
            raise _Problem("structure", path, "wrong JSON type or empty value")
        elif field.enum is not None and value not in field.enum:
            raise _Problem("invalid", path, "code not in required value set")
        elif kind == "xhtml":
            _check_xhtml(value, path)


def _walk_resource(obj: Any, path: str, contained: bool = False) -> bool:
    """The strict walk; True when the model must see the copy without `_value*` twins."""
    w = _Walk()
    w.resource(obj, path, contained)
    return w.twins


# --------------------------------------------------------------------------
# Narrative XHTML (txt-1, txt-2)
# --------------------------------------------------------------------------

_XHTML: Final = json.loads((files("sidecar") / "data" / "xhtml_allowlist.json").read_text("utf-8"))
_NS: Final = "{http://www.w3.org/1999/xhtml}"
_XML_NS: Final = "{http://www.w3.org/XML/1998/namespace}"
_ELEMENTS: Final = frozenset(_XHTML["elements"])
_GLOBAL_ATTRS: Final = frozenset(_XHTML["global_attributes"])
_ELEMENT_ATTRS: Final = {k: frozenset(v) for k, v in _XHTML["element_attributes"].items()}
_URL_ATTRS: Final = frozenset(_XHTML["url_attributes"])
_SCHEMES: Final = frozenset(_XHTML["url_schemes"])
_IMG_DATA: Final = tuple(_XHTML["image_data_prefixes"])
_STYLE_BAD: Final = tuple(_XHTML["style_forbidden"])
_URL_JUNK: Final = re.compile(r"[\x00-\x20\x7f]")
_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def _url_ok(value: str, tag: str, attr: str) -> bool:
    v = _URL_JUNK.sub("", value)  # browsers ignore these inside a scheme
    m = _SCHEME.match(v)
    if m is None:
        return True  # relative reference or #fragment
    if tag == "img" and attr == "src" and v.lower().startswith(_IMG_DATA):
        return True
    return m.group(1).lower() in _SCHEMES


def _check_xhtml(div: str, path: Any) -> None:
    low = div.lower()
    if "<!doctype" in low or "<!entity" in low or "<?" in div:
        raise _Problem("invalid", path, "narrative contains a declaration")
    try:
        root = ET.fromstring(div)
    except ET.ParseError:
        raise _Problem("invalid", path, "narrative is not well-formed XHTML") from None
    if root.tag != _NS + "div":
        raise _Problem("invalid", path, "narrative must be an XHTML div")
    has_content = False
    for el in root.iter():
        tag = el.tag[len(_NS):] if isinstance(el.tag, str) and el.tag.startswith(_NS) else None
        if tag not in _ELEMENTS:
            raise _Problem("invalid", path, "narrative element not allowed")
        allowed = _ELEMENT_ATTRS.get(tag, frozenset())
        for name, value in el.attrib.items():
            name = "xml:" + name[len(_XML_NS):] if name.startswith(_XML_NS) else name
            if name not in _GLOBAL_ATTRS and name not in allowed:
                raise _Problem("invalid", path, "narrative attribute not allowed")
            if name in _URL_ATTRS and not _url_ok(value, tag, name):
                raise _Problem("invalid", path, "narrative URL scheme not allowed")
            if name == "style" and any(b in value.lower() for b in _STYLE_BAD):
                raise _Problem("invalid", path, "narrative style not allowed")
        has_content = has_content or tag == "img" or bool((el.text or "").strip() or (el.tail or "").strip())
    if not has_content:
        raise _Problem("invalid", path, "narrative has no content")


# --------------------------------------------------------------------------
# Pass 2: pydantic, with errors reduced to paths
# --------------------------------------------------------------------------

_ERROR_KINDS: Final = (
    (("missing",), "required element missing"),
    (("extra_forbidden",), "unknown element"),
    (("_type", "_parsing"), "wrong type"),
    (("too_short", "too_long"), "wrong length"),
    (("less_than", "greater_than", "multiple_of"), "out of range"),
)


def _describe(err_type: str) -> str:
    for needles, text in _ERROR_KINDS:
        if any(n in err_type for n in needles):
            return text
    return "invalid value"


def _loc_path(root: str, loc: tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        if type(part) is int:
            out += f"[{part}]"
        elif isinstance(part, str) and _SAFE_KEY.fullmatch(part) and part != "resource_type":
            out += "." + part
        # other segments are pydantic internals (union tags etc.)
    return out


def _pydantic_message(root: str, errors: list[tuple[tuple[Any, ...], str]]) -> str:
    parts = [f"{_loc_path(root, loc)}: {_describe(kind)}" for loc, kind in errors[:_MAX_REPORTED]]
    return "invalid resource: " + "; ".join(parts)


def _errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    return [(prefix + tuple(err.get("loc", ())), str(err.get("type", "")))
            for err in exc.errors(include_url=False, include_context=False, include_input=False)]


_orders: dict[type, dict[str, int]] = {}


def _field_order(cls: type) -> dict[str, int]:
    """Field name (and alias) -> position: the order in which pydantic reports errors."""
    order = _orders.get(cls)
    if order is None:
        order = {}
        for i, (name, info) in enumerate(cls.model_fields.items()):  # type: ignore[attr-defined]
            order[name] = i
            if info.alias:
                order[info.alias] = i
        _orders[cls] = order
    return order


def _model_errors(rtype: str, resource: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """The model's errors for one resource (locs relative to it), at least the first _MAX_REPORTED.

    A Bundle is validated as its shell (entries without their resources) plus each entry's resource
    with its own model class, one after the other: exactly what the Bundle model does for
    `entry[i].resource` (look the class up by resourceType, `model_validate`), but without keeping
    the models of every entry alive at once (a 1,000-entry Bundle held ~15,000 of them, and the
    garbage collector walked them again and again) and without the model's per-entry class import.
    Every entry is still validated: nothing is skipped except after the request is already refused.
    """
    cls: Any = model_class(rtype)
    entries = resource.get("entry") if rtype == "Bundle" else None
    if type(entries) is not list:
        try:
            cls.model_validate(resource)
        except ValidationError as e:
            return _errors(e)
        return []
    split = [type(e) is dict and type(e.get("resource")) is dict for e in entries]
    shell = {**resource, "entry": [{k: v for k, v in e.items() if k != "resource"} if s else e
                                   for e, s in zip(entries, split)]}
    errors: list[tuple[tuple[Any, ...], str]] = []
    try:
        cls.model_validate(shell)
    except ValidationError as e:
        errors = _errors(e)
    found = 0
    shell_errors = len(errors)
    for i, entry in enumerate(entries):
        if not split[i]:
            continue
        inner = entry["resource"]
        sub = _model_errors(inner.get("resourceType"), inner)
        if sub:
            errors += [(("entry", i, "resource") + loc, kind) for loc, kind in sub]
            found += len(sub)
            if found >= _MAX_REPORTED:
                break  # refused: later entries can only add errors past the ones reported
    if found:
        # The Bundle model's own after-validator (required `type`, fhir_core's
        # `validate_after_model_construction`) runs only when every field, entries included, is
        # valid: report its errors only then, as the whole-Bundle model does.
        errors = [err for k, err in enumerate(errors) if k >= shell_errors or not _after_validator(err)]
    if errors:
        top, in_entry = _field_order(cls), _field_order(_bundle_entry_class())
        far = len(top) + 1

        def order(err: tuple[tuple[Any, ...], str]) -> tuple[int, int, int]:
            loc = err[0]
            where = top.get(loc[0], far) if loc and isinstance(loc[0], str) else -1
            if len(loc) >= 2 and loc[0] == "entry" and type(loc[1]) is int:
                sub_at = in_entry.get(loc[2], far) if len(loc) >= 3 and isinstance(loc[2], str) else -1
                return where, loc[1], sub_at
            return where, -1, -1

        errors.sort(key=order)  # stable: the order the whole-Bundle model would report them in
    return errors


def _after_validator(err: tuple[tuple[Any, ...], str]) -> bool:
    """An error of a model's after-validator on its own fields (not of a field's validation)."""
    loc, kind = err
    return loc == () or (len(loc) == 1 and kind == "model_field_validation.missing")


def _bundle_entry_class() -> type:
    from fhir.resources.R4B.bundle import BundleEntry

    return BundleEntry


def _without_value_twins(node: Any) -> Any:
    """The R4B Extension model has no `_value[x]` fields (R4 allows them, and the walk above has
    checked them as Elements): the model sees a copy without them. Copies only when present."""
    if type(node) is dict:
        if any(k.startswith("_value") for k in node):
            node = {k: v for k, v in node.items() if not k.startswith("_value")}
        changed = {}
        for k, v in node.items():
            if type(v) in (dict, list):
                nv = _without_value_twins(v)
                if nv is not v:
                    changed[k] = nv
        return {**node, **changed} if changed else node
    if type(node) is list:
        out = [_without_value_twins(v) for v in node]
        return out if any(a is not b for a, b in zip(out, node)) else node
    return node


def validate_resource(resource: dict[str, Any]) -> None:
    """Raise FhirValidationError unless ``resource`` is a valid resource of a
    supported R4 type. Nested resources are validated with their own types."""
    rtype = resource.get("resourceType") if type(resource) is dict else None
    root = rtype if is_supported(rtype) else "Resource"  # never echo an unknown name
    try:
        twins = _walk_resource(resource, root)
    except _Problem as p:
        raise FhirValidationError(p.code, str(p)) from None
    except RecursionError:  # unreachable for parse_json output (depth <= 100)
        raise FhirValidationError("structure", "resource nested too deeply") from None
    except FhirValidationError:
        raise
    except Exception:  # e.g. a model module failing to import: refuse
        raise FhirValidationError("invalid", "invalid resource: validation failed") from None
    try:
        errors = _model_errors(root, _without_value_twins(resource) if twins else resource)
    except Exception:  # a model bug must not let the resource through
        raise FhirValidationError("invalid", "invalid resource: validation failed") from None
    if errors:
        raise FhirValidationError("invalid", _pydantic_message(root, errors))


# --------------------------------------------------------------------------
# JSON Patch (RFC 6902), as used by FHIR PATCH
# --------------------------------------------------------------------------

MAX_PATCH_OPS: Final = 1000
_POINTER: Final = re.compile(r"(?:/(?:[^~/]|~[01])*)*")  # RFC 6901
_PATCH_MEMBERS: Final = {
    "add": frozenset({"op", "path", "value"}),
    "remove": frozenset({"op", "path"}),
    "replace": frozenset({"op", "path", "value"}),
    "move": frozenset({"op", "path", "from"}),
    "copy": frozenset({"op", "path", "from"}),
    "test": frozenset({"op", "path", "value"}),
}


def validate_json_patch(ops: list[Any]) -> None:
    """Each operation: an object whose ``op`` is one of the six RFC 6902 ops,
    ``path`` (and ``from`` for move/copy) a JSON Pointer string, ``value``
    present for add/replace/test, and no other members. An empty patch is
    refused: it would create a new version without a change."""
    if type(ops) is not list or not ops:
        raise FhirValidationError("structure", "JSON Patch must be a non-empty array")
    if len(ops) > MAX_PATCH_OPS:
        raise FhirValidationError("invalid", f"JSON Patch has more than {MAX_PATCH_OPS} operations")
    for i, op in enumerate(ops):
        where = f"patch[{i}]"
        if type(op) is not dict:
            raise FhirValidationError("structure", f"{where}: operation must be an object")
        members = _PATCH_MEMBERS.get(op.get("op")) if type(op.get("op")) is str else None
        if members is None:
            raise FhirValidationError("invalid", f"{where}.op: unknown or missing operation")
        if not set(op) <= members:
            raise FhirValidationError("structure", f"{where}: unknown member")
        for name in sorted(members - {"op", "value"}):
            ptr = op.get(name)
            if type(ptr) is not str or _POINTER.fullmatch(ptr) is None:
                raise FhirValidationError("invalid", f"{where}.{name}: must be a JSON Pointer")
        if "value" in members and "value" not in op:
            raise FhirValidationError("structure", f"{where}.value: required")
