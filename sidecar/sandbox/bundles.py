"""Transaction (all-or-nothing, urn:uuid resolution) and batch processing."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from .engine import Engine, FhirResponse, bundle, error_response
from .parse import FhirRequest
from .store import FhirError, Json, outcome

# FHIR's processing order for transactions: deletes, creates, updates, reads.
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_URN_PREFIXES = ("urn:uuid:", "urn:oid:")


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _response_entry(req: FhirRequest, res: FhirResponse) -> Json:
    response: Json = {"status": status_line(res.status)}
    if res.location:
        response["location"] = res.location
    if res.version is not None:
        response["etag"] = res.version.etag
        response["lastModified"] = res.version.instant
    entry: Json = {}
    if res.status >= 400:
        response["outcome"] = res.body
    elif req.method in ("GET", "HEAD") and res.body is not None:
        entry["resource"] = res.body
    entry["response"] = response
    return entry


def run_batch(engine: Engine, req: FhirRequest) -> FhirResponse:
    """Every entry independently; failures are reported per entry."""
    entries = [_response_entry(entry, engine.execute(entry)) for entry in req.entries]
    return FhirResponse(200, bundle("batch-response", entries))


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    """Copy ``value`` with urn:uuid/urn:oid references replaced by Type/id."""
    if isinstance(value, list):
        return [_rewrite(item, mapping) for item in value]
    if not isinstance(value, dict):
        return value
    result = {key: _rewrite(item, mapping) for key, item in value.items()}
    ref = result.get("reference")
    if isinstance(ref, str) and ref.startswith(_URN_PREFIXES):
        if ref not in mapping:
            raise FhirError(400, f"reference {ref!r} does not match any entry fullUrl", "invalid")
        result["reference"] = mapping[ref]
    return result


def _assign_ids(engine: Engine, entries: list[FhirRequest]) -> dict[str, str]:
    """Pre-assign create ids so that references can point at them."""
    mapping: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(entries):
        if entry.action == "create":
            assert entry.rtype is not None
            existing = (engine.find_if_none_exist(entry.rtype, entry.if_none_exist)
                        if entry.if_none_exist is not None else None)
            rid = existing.rid if existing else engine.store.new_id()
            entry.assigned_id = None if existing else rid
        elif entry.action in ("update", "patch", "delete"):
            assert entry.rid is not None
            rid = entry.rid
        else:
            continue
        key = (entry.rtype or "", rid)
        if key in seen:
            raise FhirError(400, f"entry[{index}]: {key[0]}/{key[1]} is written twice", "invalid")
        seen.add(key)
        if entry.full_url and entry.full_url.startswith(_URN_PREFIXES):
            mapping[entry.full_url] = f"{entry.rtype}/{rid}"
    return mapping


def run_transaction(engine: Engine, req: FhirRequest) -> FhirResponse:
    """All entries or none: any failure restores the store snapshot."""
    snapshot = engine.store.snapshot()
    entries = req.entries
    try:
        for index, entry in enumerate(entries):
            if entry.error is not None:
                raise FhirError(entry.error.status, f"entry[{index}]: {entry.error.message}",
                                entry.error.code)
        mapping = _assign_ids(engine, entries)
        for entry in entries:
            if entry.resource is not None:
                entry.resource = _rewrite(entry.resource, mapping)
        results: list[FhirResponse | None] = [None] * len(entries)
        for index in sorted(range(len(entries)), key=lambda i: _ORDER.get(entries[i].method, 9)):
            try:
                results[index] = engine.run(entries[index])
            except FhirError as exc:
                where = f"entry[{index}] ({entries[index].method} {entries[index].url})"
                raise FhirError(exc.status, f"{where}: {exc.message}", exc.code) from None
    except FhirError as exc:
        engine.store.restore(snapshot)
        failed = error_response(exc)
        assert failed.body is not None
        failed.body = outcome(f"transaction rolled back: {exc.message}", exc.code)
        return failed
    response_entries = []
    for entry, result in zip(entries, results, strict=True):
        assert result is not None
        response_entries.append(_response_entry(entry, result))
    return FhirResponse(200, bundle("transaction-response", response_entries))
