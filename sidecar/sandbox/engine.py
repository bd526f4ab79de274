"""Executes classified FHIR interactions against the in-memory store.

All methods are called with the server's lock held.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .jsonpatch import apply_patch
from .parse import FhirRequest
from .profiles import Profile, resolve_profile
from .store import FhirError, Json, Store, Version, fhir_instant, outcome

_ETAG_RE = re.compile(r'^(W/)?"(\d+)"$')
DEFAULT_COUNT = 20
MAX_COUNT = 1000
# Accepted but without effect; anything else is ignored unless handling=strict.
_IGNORED_PARAMS = {"_format", "_pretty", "_summary", "_total", "_elements", "_sort"}


@dataclass
class FhirResponse:
    status: int
    body: Json | None = None
    version: Version | None = None  # drives ETag and Last-Modified
    location: str | None = None


def error_response(exc: FhirError) -> FhirResponse:
    return FhirResponse(exc.status, outcome(exc.message, exc.code))


def bundle(kind: str, entries: list[Json], **extra: Any) -> Json:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": fhir_instant(datetime.now(UTC))},
        "type": kind,
        **extra,
        "entry": entries,
    }


class Engine:
    def __init__(self, store: Store, base_url: str, profile: Profile | None = None) -> None:
        self.store = store
        self.base_url = base_url
        self.profile = profile or resolve_profile(None)
        self._handlers: dict[str, Callable[[FhirRequest], FhirResponse]] = {
            "capabilities": self._capabilities,
            "create": self._create,
            "read": self._read,
            "vread": self._vread,
            "history": self._history,
            "update": self._update,
            "patch": self._patch,
            "delete": self._delete,
            "search": self._search,
        }

    def execute(self, req: FhirRequest) -> FhirResponse:
        """Run ``req``; FHIR failures become OperationOutcome responses."""
        try:
            return self.run(req)
        except FhirError as exc:
            return error_response(exc)

    def run(self, req: FhirRequest) -> FhirResponse:
        """Run ``req``; FHIR failures raise FhirError (used by transactions)."""
        if req.error is not None:
            raise req.error
        if req.action in ("transaction", "batch"):
            from .bundles import run_batch, run_transaction  # bundles needs Engine

            runner = run_transaction if req.action == "transaction" else run_batch
            return runner(self, req)
        handler = self._handlers.get(req.action)
        if handler is None:
            raise FhirError(400, f"{req.action} is not supported by the sandbox", "not-supported")
        return handler(req)

    # -- helpers -------------------------------------------------------------
    def location(self, version: Version) -> str:
        return f"{self.base_url}/{version.rtype}/{version.rid}/_history/{version.version_id}"

    def _written(self, status: int, version: Version, prefer: str) -> FhirResponse:
        body: Json | None
        if prefer == "minimal":
            body = None
        elif prefer == "OperationOutcome":
            body = outcome(f"{version.rtype}/{version.rid} stored", "informational",
                           "information")
        else:
            body = version.copy_resource()
        return FhirResponse(status, body, version, self.location(version))

    def _check_if_match(self, if_match: str | None, latest: Version | None) -> None:
        conflict = self.profile.conflict_status
        live = latest is not None and not latest.deleted
        if if_match is None:
            if self.profile.require_if_match is not None and live:
                raise FhirError(self.profile.require_if_match,
                                "this server requires If-Match to change an existing resource",
                                "business-rule")
            return
        if if_match.strip() == "*":
            if not live:
                raise FhirError(412, "If-Match: * but the resource does not exist", "conflict")
            return
        match = _ETAG_RE.match(if_match.strip())
        if match is None:
            raise FhirError(400, f"malformed If-Match {if_match!r}", "invalid")
        weak = match.group(1) is not None
        if self.profile.strong_etags and weak:  # strong comparison: a weak validator never matches
            raise FhirError(conflict, f"If-Match {if_match} is weak; this server compares strongly",
                            "conflict")
        if not live or latest is None or int(match.group(2)) != latest.version_id:
            current = latest.etag if live and latest else "none"
            raise FhirError(conflict, f"If-Match {if_match} does not match current version {current}",
                            "conflict")

    # -- profile business rules (locked charts, closed encounters, merged patients) ---------
    def _refs(self, value: Any, out: set[str]) -> set[str]:
        if isinstance(value, list):
            for item in value:
                self._refs(item, out)
        elif isinstance(value, dict):
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    out.add(self._normalise_ref(item))
                else:
                    self._refs(item, out)
        return out

    def check_write_rules(self, rtype: str, rid: str | None, resource: Json | None) -> None:
        """Refuse a write the profile's EHR would refuse; ``resource`` is the version written
        (or, for a delete, the stored one). The stored version counts too."""
        p = self.profile
        if not (p.locked_patients or p.closed_encounters or p.merged_patients):
            return
        refs: set[str] = set()
        self._refs(resource, refs)
        stored = self.store.latest(rtype, rid) if rid else None
        if stored is not None and not stored.deleted:
            self._refs(stored.resource, refs)
        if rid:
            refs.add(f"{rtype}/{rid}")
        for old, new in p.merged_patients.items():
            if f"Patient/{old}" in refs:
                raise FhirError(p.merged_status, f"Patient/{old} was merged into Patient/{new}",
                                "business-rule")
        for pid in p.locked_patients:
            if f"Patient/{pid}" in refs:
                raise FhirError(p.locked_status, f"the chart of Patient/{pid} is locked", "lock-error")
        new_refs = self._refs(resource, set()) | ({f"{rtype}/{rid}"} if rid else set())
        for eid in p.closed_encounters:
            if f"Encounter/{eid}" in new_refs:
                raise FhirError(p.closed_status, f"Encounter/{eid} is closed", "business-rule")

    def find_if_none_exist(self, rtype: str, criteria: str) -> Version | None:
        params = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
        if not params or any(key != "_id" for key, _ in params):
            raise FhirError(400, "If-None-Exist supports only _id", "not-supported")
        ids = {rid for _, value in params for rid in value.split(",") if rid}
        found = [self.store.latest(rtype, rid) for rid in sorted(ids)]
        live = [v for v in found if v is not None and not v.deleted]
        if len(live) > 1:
            raise FhirError(412, "If-None-Exist matched more than one resource", "duplicate")
        return live[0] if live else None

    # -- interactions ---------------------------------------------------------
    def _capabilities(self, req: FhirRequest) -> FhirResponse:
        interactions = [{"code": c} for c in (
            "read", "vread", "update", "patch", "delete", "history-instance", "create",
            "search-type")]
        common = ["Patient", "Observation", "Encounter", "Condition", "MedicationRequest",
                  "AllergyIntolerance", "Procedure", "DocumentReference", "Practitioner"]
        types = sorted(set(common) | set(self.store.types()))
        return FhirResponse(200, {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": datetime.now(UTC).date().isoformat(),
            "kind": "instance",
            "software": {"name": "fhir-sidecar sandbox EHR"},
            "implementation": {"description": "in-memory test server", "url": self.base_url},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json", "json"],
            "patchFormat": ["application/json-patch+json"],
            "rest": [{
                "mode": "server",
                "resource": [{
                    "type": t, "versioning": "versioned", "readHistory": True,
                    "updateCreate": True, "conditionalCreate": True,
                    "interaction": interactions,
                    "searchParam": [{"name": "_id", "type": "token"}],
                } for t in types],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }],
        })

    def _create(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.resource is not None
        if req.if_none_exist is not None:
            existing = self.find_if_none_exist(req.rtype, req.if_none_exist)
            if existing is not None:
                return FhirResponse(200, existing.copy_resource(), existing,
                                    self.location(existing))
        rid = req.assigned_id or self.store.new_id()
        self.check_write_rules(req.rtype, None, req.resource)
        version = self.store.put(req.rtype, rid, req.resource)
        return self._written(201, version, req.prefer_return)

    def _read(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None
        version = self.store.current(req.rtype, req.rid)
        if self.profile.concurrent_writer:  # another user saves right after our read
            self.store.put(req.rtype, req.rid, version.copy_resource())
        return FhirResponse(200, version.copy_resource(), version)

    def _vread(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None and req.vid is not None
        version = self.store.version(req.rtype, req.rid, req.vid)
        return FhirResponse(200, version.copy_resource(), version)

    def _history(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None
        history = self.store.history(req.rtype, req.rid)
        entries = []
        for version in reversed(history):
            method = "DELETE" if version.deleted else ("POST" if version.version_id == 1
                                                       else "PUT")
            entry: Json = {"fullUrl": f"{self.base_url}/{req.rtype}/{req.rid}"}
            if not version.deleted:
                entry["resource"] = version.copy_resource()
            entry["request"] = {"method": method,
                                "url": req.rtype if method == "POST" else f"{req.rtype}/{req.rid}"}
            entry["response"] = {"status": "200 OK" if version.deleted or version.version_id > 1
                                 else "201 Created",
                                 "etag": version.etag, "lastModified": version.instant}
            entries.append(entry)
        self_url = f"{self.base_url}/{req.rtype}/{req.rid}/_history"
        return FhirResponse(200, bundle("history", entries, total=len(entries),
                                        link=[{"relation": "self", "url": self_url}]))

    def _update(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None and req.resource is not None
        latest = self.store.latest(req.rtype, req.rid)
        self._check_if_match(req.if_match, latest)
        self.check_write_rules(req.rtype, req.rid, req.resource)
        created = latest is None or latest.deleted
        version = self.store.put(req.rtype, req.rid, req.resource)
        return self._written(201 if created else 200, version, req.prefer_return)

    def _patch(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None and req.patch is not None
        latest = self.store.latest(req.rtype, req.rid)
        self._check_if_match(req.if_match, latest)
        current = self.store.current(req.rtype, req.rid)
        patched = apply_patch(current.copy_resource(), req.patch)
        if not isinstance(patched, dict) or patched.get("resourceType") != req.rtype \
                or patched.get("id") != req.rid:
            raise FhirError(422, "patch must not change resourceType or id", "processing")
        self.check_write_rules(req.rtype, req.rid, patched)
        version = self.store.put(req.rtype, req.rid, patched)
        return self._written(200, version, req.prefer_return)

    def _delete(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None and req.rid is not None
        self._check_if_match(req.if_match, self.store.latest(req.rtype, req.rid))
        self.check_write_rules(req.rtype, req.rid, None)
        version = self.store.delete(req.rtype, req.rid)
        body = outcome(f"{req.rtype}/{req.rid} deleted", "informational", "information")
        return FhirResponse(200, body, version)

    # -- search ---------------------------------------------------------------
    def _search(self, req: FhirRequest) -> FhirResponse:
        assert req.rtype is not None
        ids: set[str] | None = None
        count, offset = DEFAULT_COUNT, 0
        refs: list[tuple[str, str]] = []
        applied: list[tuple[str, str]] = []
        for key, value in req.params:
            if key == "_id":
                wanted = {v for v in value.split(",") if v}
                ids = wanted if ids is None else ids & wanted
            elif key in ("_count", "_offset"):
                if not value.isdigit():
                    raise FhirError(400, f"{key} must be a non-negative integer", "invalid")
                if key == "_count":
                    count = min(int(value), MAX_COUNT)
                else:
                    offset = int(value)
                continue
            elif key in ("patient", "subject"):
                refs.append((key, value))
            elif key in _IGNORED_PARAMS:
                continue
            elif req.strict:
                raise FhirError(400, f"unknown search parameter {key!r}", "not-supported")
            else:
                continue
            applied.append((key, value))
        matches = [v for v in self.store.all_current(req.rtype)
                   if (ids is None or v.rid in ids)
                   and all(self._ref_matches(v.resource or {}, k, val) for k, val in refs)]
        page = matches[offset:offset + count]

        def link(relation: str, at: int) -> Json:
            query = urlencode(applied + [("_count", str(count)), ("_offset", str(at))])
            return {"relation": relation, "url": f"{self.base_url}/{req.rtype}?{query}"}

        links = [link("self", offset)]
        if count and offset + count < len(matches):
            links.append(link("next", offset + count))
        if offset > 0 and count:
            links.append(link("previous", max(0, offset - count)))
        entries = [{"fullUrl": f"{self.base_url}/{v.rtype}/{v.rid}",
                    "resource": v.copy_resource(), "search": {"mode": "match"}} for v in page]
        return FhirResponse(200, bundle("searchset", entries, total=len(matches), link=links))

    def _normalise_ref(self, ref: str) -> str:
        if ref.startswith(self.base_url + "/"):
            ref = ref[len(self.base_url) + 1:]
        return ref.split("/_history/", 1)[0]

    def _ref_matches(self, resource: Json, param: str, value: str) -> bool:
        fields = ("patient", "subject") if param == "patient" else ("subject",)
        wanted = self._normalise_ref(value)
        for name in fields:
            items = resource.get(name)
            for item in items if isinstance(items, list) else [items]:
                ref = item.get("reference") if isinstance(item, dict) else None
                if not isinstance(ref, str):
                    continue
                ref = self._normalise_ref(ref)
                if "/" in wanted:
                    if ref == wanted:
                        return True
                elif ref.endswith("/" + wanted) and (param != "patient"
                                                     or ref.startswith("Patient/")):
                    return True
        return False
