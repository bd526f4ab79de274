"""Classify: a parsed request -> its FHIR interaction(s) and the SMART letters they need.

The interaction table of DESIGN.md is the data below. A request that matches no row, or whose
body contradicts its URL, is refused: deny by default, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from sidecar.errors import Refusal, bad_request, deny
from sidecar.fhir.types import WRITE_ALLOWED_PARAMS, is_r4_type, operation_is_read_only
from sidecar.parse import parse_path, parse_query, split_target
from sidecar.request import Classification, Entry, FhirRequest, Requirement, Target

# (effective method, URL shape) -> interaction. HEAD is classified as GET.
INTERACTIONS: dict[tuple[str, str], str] = {
    ("GET", "metadata"): "capabilities",
    ("GET", "discovery"): "discovery",
    ("GET", "instance"): "read",
    ("GET", "vread"): "vread",
    ("GET", "history-instance"): "history-instance",
    ("GET", "type"): "search-type",
    ("POST", "search-type-post"): "search-type",
    ("GET", "base"): "search-system",
    ("POST", "search-system-post"): "search-system",
    ("GET", "compartment"): "search-compartment",
    ("GET", "history-type"): "history-type",
    ("GET", "history-system"): "history-system",
    ("POST", "type"): "create",
    ("PUT", "instance"): "update",
    ("PUT", "type"): "update-conditional",
    ("PATCH", "instance"): "patch",
    ("PATCH", "type"): "patch-conditional",
    ("DELETE", "instance"): "delete",
    ("DELETE", "type"): "delete-conditional",
}

# interaction -> (is write, letters on the addressed type). An update may create, so it also
# needs `c` unless an If-Match makes creation impossible (see `_update_letters`).
LETTERS: dict[str, tuple[bool, str]] = {
    "capabilities": (False, ""),
    "discovery": (False, ""),
    "read": (False, "r"),
    "vread": (False, "r"),
    "history-instance": (False, "r"),
    "search-type": (False, "s"),
    "search-system": (False, "s"),
    "search-compartment": (False, "s"),
    "history-type": (False, "s"),
    "history-system": (False, "s"),
    "create": (True, "c"),
    "create-conditional": (True, "cs"),
    "update": (True, "u"),
    "update-conditional": (True, "cus"),
    "patch": (True, "u"),
    "patch-conditional": (True, "us"),
    "delete": (True, "d"),
    "delete-conditional": (True, "ds"),
}
PUBLIC = frozenset({"capabilities", "discovery"})
# Conditional update/patch/delete act on whatever matches: refused unless the client opts in.
GATED_CONDITIONALS = frozenset({"update-conditional", "patch-conditional", "delete-conditional"})

# Query parameters a read of one resource may carry; searches take search parameters.
READ_PARAMS = frozenset({"_format", "_pretty", "_summary", "_elements"})
HISTORY_PARAMS = READ_PARAMS | {"_count", "_since", "_at", "_list", "_page", "_getpages", "_getpagesoffset"}
# `_`-parameters that are search criteria (allowed in a conditional write's query).
CRITERIA_PARAMS = frozenset({"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_list", "_has"})
# Vendor switches that turn a write into something else (cascade, hard delete, expunge ...).
VENDOR_SWITCHES = frozenset({"_cascade", "cascade", "harddelete", "_harddelete", "_expunge", "expunge", "_purge", "purge",
                             "_force", "force", "_tenant", "tenant", "_partition", "partition"})
BUNDLE_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


def _req(rtype: str, letters: str) -> Requirement:
    return Requirement(rtype, frozenset(letters))


def _search_requirements(target: Target, rtype: str) -> list[Requirement]:
    """s on the searched type, plus r on what `_include`/`_revinclude`/chains pull in."""
    reqs = [_req(rtype, "s")]
    for name, value in target.query:
        base = name.split(":", 1)[0]
        if base in ("_include", "_revinclude"):
            parts = value.split(":")
            if value == "*" or len(parts) < 2:
                reqs.append(_req("*", "r"))
            elif base == "_revinclude":
                reqs.append(_req(parts[0] if is_r4_type(parts[0]) else "*", "r"))
            else:
                reqs.append(_req(parts[2] if len(parts) > 2 and is_r4_type(parts[2]) else "*", "r"))
        else:
            tokens = re.split(r"[:.]", name)
            for i, tok in enumerate(tokens):
                if tok == "_has":  # _has:Observation:patient:code=..., nested _has too
                    nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
                    reqs.append(_req(nxt if is_r4_type(nxt) else "*", "s"))
            for link in name.split(".")[:-1]:  # chained search: every link reaches a type
                mod = link.split(":")          # subject:Patient.organization.name=...
                reqs.append(_req(mod[-1] if len(mod) > 1 and is_r4_type(mod[-1]) else "*", "s"))
    return reqs


def _check_write_query(interaction: str, target: Target) -> None:
    names = target.query_names
    lowered = {n.split(":", 1)[0].lower() for n in names}
    if lowered & VENDOR_SWITCHES:
        raise deny("query switch not allowed on a write")
    if interaction in GATED_CONDITIONALS:
        criteria = [n for n in names if n not in WRITE_ALLOWED_PARAMS]
        if not criteria:
            raise deny("a conditional write needs search criteria")
        for n in criteria:
            base = n.split(":", 1)[0]
            if base.startswith("_") and base not in CRITERIA_PARAMS:
                raise deny("query parameter not defined for this write")
    elif names - WRITE_ALLOWED_PARAMS:
        raise deny("query parameter not defined for this write")


def _resource_matches(resource: Any, target: Target, interaction: str) -> dict:
    if not isinstance(resource, dict):
        raise bad_request("the body must be a FHIR resource", "structure")
    rt = resource.get("resourceType")
    if rt != target.resource_type:
        raise bad_request("body resourceType does not match the URL")
    if interaction == "update" and resource.get("id") != target.id:
        raise bad_request("body id does not match the URL id")
    return resource


def classify_one(
    method: str,
    target: Target,
    *,
    body: Any,
    if_none_exist: str | None,
    if_match: str | None,
    graphql_text: str | None = None,
) -> tuple[str, bool, bool, list[Requirement], str | None]:
    """(interaction, is_write, conditional, requirements, operation) for one request or entry."""
    m = "GET" if method == "HEAD" else method
    if target.kind.startswith("operation-"):
        level = target.kind.split("-", 1)[1]
        name = target.operation or ""
        read_only = operation_is_read_only(name, level, target.resource_type, m, graphql_query=graphql_text)
        if not read_only:
            return "operation", True, False, [], name
        if name in ("$everything", "$graphql"):  # both can reach resources of any type
            reqs = [_req("*", "rs")]
        elif level == "instance":
            reqs = [_req(target.resource_type or "*", "r")]
        else:
            reqs = [_req(target.resource_type or "*", "s")]
        return "operation", False, False, reqs, name
    interaction = INTERACTIONS.get((m, target.kind))
    if interaction is None:
        raise deny("request matches no FHIR interaction")
    if if_none_exist is not None:
        if interaction != "create":
            raise deny("If-None-Exist is only defined for create")
        interaction = "create-conditional"
        parse_query(if_none_exist)  # same hardening as a URL query
    if interaction in GATED_CONDITIONALS and not target.query:
        raise deny("request matches no FHIR interaction")
    is_write, letters = LETTERS[interaction]
    rtype = target.resource_type or "*"
    if interaction.startswith("search") or interaction in ("history-type", "history-system"):
        if target.kind in ("base", "search-system-post", "history-system"):
            types = [v for k, v in target.query if k == "_type" for v in v.split(",")]
            reqs = [_req(t, "s") for t in types if is_r4_type(t)] if types else [_req("*", "s")]
            if types and len(reqs) != len(types):
                raise deny("unknown resource type in _type")
            if interaction == "search-system":
                reqs += _search_requirements(target, "*")[1:]
        else:
            reqs = _search_requirements(target, rtype)
        return interaction, False, False, reqs, None
    if interaction in ("read", "vread") and target.query_names - READ_PARAMS:
        raise deny("query parameter not defined for a read")
    if interaction == "history-instance" and target.query_names - HISTORY_PARAMS:
        raise deny("query parameter not defined for history")
    if is_write:
        _check_write_query(interaction, target)
        if interaction in ("create", "create-conditional", "update", "update-conditional"):
            _resource_matches(body, target, interaction)
        if interaction == "update" and not if_match:
            letters += "c"  # without If-Match an update may create the resource
        if interaction.startswith("patch") and body is None:
            raise bad_request("a PATCH needs a body")
    reqs = [_req(rtype, letters)] if letters else []
    return interaction, is_write, interaction in GATED_CONDITIONALS, reqs, None


def _graphql_text(req: FhirRequest) -> str | None:
    """The one GraphQL document of the request; None (=> not read-only) if absent or ambiguous."""
    texts = [v for k, v in req.target.query if k == "query"]
    if isinstance(req.body, dict):
        if not set(req.body) <= {"query", "operationName", "variables"}:
            return None  # e.g. persisted-query extensions: the text is not what runs
        if "query" in req.body:
            texts.append(req.body["query"])
    elif req.body is not None:
        return None
    if len(texts) != 1 or not isinstance(texts[0], str):
        return None  # which document would the server run? refuse to guess
    return texts[0]


def classify(req: FhirRequest, *, upstream_base: str) -> Classification:
    t = req.target
    if t.kind == "base" and req.method == "POST":
        return _classify_bundle(req, upstream_base=upstream_base)
    if req.method == "PATCH" and req.content_type in ("application/fhir+json", "application/json"):
        if not isinstance(req.body, dict) or req.body.get("resourceType") != "Parameters":
            raise bad_request("a FHIRPath Patch body is a Parameters resource")
    if isinstance(req.body, tuple):  # POST _search: the form parameters are the search
        t = replace(t, query=t.query + req.body)
    interaction, is_write, conditional, reqs, op = classify_one(
        req.method, t, body=req.body,
        if_none_exist=req.headers.get("if-none-exist"), if_match=req.headers.get("if-match"),
        graphql_text=_graphql_text(req),
    )
    return Classification(interaction, is_write, conditional, tuple(reqs), op, public=interaction in PUBLIC)


def _entry_target(url: str, upstream_base: str) -> Target:
    if "://" in url or url.startswith("//"):
        if upstream_base and url.startswith(upstream_base + "/"):
            url = url[len(upstream_base) + 1:]
        else:
            raise deny("absolute or other-host URL in a Bundle entry")
    if url.startswith("/"):  # host-absolute to a server resolving it, base-relative to others: refuse
        raise deny("Bundle entry URL must be relative to the base")
    rel = "/" + url
    path, raw_query = split_target(rel.encode("utf-8", "surrogatepass"), "")
    target = parse_path(path, parse_query(raw_query))
    if target.kind in ("base", "metadata", "discovery"):
        raise deny("Bundle entry addresses the base")
    return target


def _classify_bundle(req: FhirRequest, *, upstream_base: str) -> Classification:
    bundle = req.body
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise deny("POST to the base needs a batch or transaction Bundle")
    btype = bundle.get("type")
    if btype not in ("batch", "transaction"):
        raise deny("POST to the base needs a batch or transaction Bundle")
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        raise bad_request("Bundle.entry must be an array", "structure")
    entries: list[Entry] = []
    for i, e in enumerate(raw_entries):
        if not isinstance(e, dict) or not isinstance(e.get("request"), dict):
            raise bad_request(f"Bundle entry {i} has no request", "structure")
        r = e["request"]
        method, url = r.get("method"), r.get("url")
        if not isinstance(method, str) or method not in BUNDLE_METHODS or not isinstance(url, str) or not url:
            raise deny(f"Bundle entry {i}: method or url cannot be classified")
        try:
            target = _entry_target(url, upstream_base)
            ine = r.get("ifNoneExist")
            if ine is not None and not isinstance(ine, str):
                raise bad_request("ifNoneExist must be a string")
            resource = e.get("resource")
            if method == "PATCH" and not (isinstance(resource, dict) and resource.get("resourceType") in ("Parameters", "Binary")):
                raise bad_request("a PATCH entry carries a Parameters or Binary resource")
            if method in ("GET", "HEAD", "DELETE") and resource is not None:
                raise bad_request(f"a {method} entry carries no resource")
            interaction, is_write, conditional, reqs, op = classify_one(
                method, target, body=resource, if_none_exist=ine, if_match=r.get("ifMatch"),
            )
        except Refusal as refusal:
            raise Refusal(refusal.status, f"Bundle entry {i}: {refusal.reason}", refusal.code) from None
        entries.append(Entry(i, method, url, target, interaction, is_write, conditional,
                             resource if isinstance(resource, dict) else None, tuple(reqs), op))
    reqs_all = tuple(r for e in entries for r in e.requires)
    return Classification(
        btype, any(e.is_write for e in entries), any(e.conditional for e in entries), reqs_all,
        None, tuple(entries),
    )
