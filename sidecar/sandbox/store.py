"""In-memory, versioned resource store of the sandbox EHR.

Deliberately self-contained: the sandbox is an independent witness and must not
share parsing or model code with the sidecar it is used to test.
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

Json = dict[str, Any]


class FhirError(Exception):
    """A FHIR-level failure that is answered with an OperationOutcome."""

    def __init__(self, status: int, message: str, code: str = "processing") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def outcome(message: str, code: str = "processing", severity: str = "error") -> Json:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": message}],
    }


def fhir_instant(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Version:
    """One entry in a resource's history; ``resource is None`` marks a delete."""

    rtype: str
    rid: str
    version_id: int
    when: datetime
    resource: Json | None
    strong: bool = False  # strong ETags ("3") instead of weak ones (W/"3"): a profile choice

    @property
    def deleted(self) -> bool:
        return self.resource is None

    @property
    def etag(self) -> str:
        return f'"{self.version_id}"' if self.strong else f'W/"{self.version_id}"'

    @property
    def last_modified(self) -> str:
        """HTTP-date for the Last-Modified header."""
        return format_datetime(self.when, usegmt=True)

    @property
    def instant(self) -> str:
        return fhir_instant(self.when)

    def copy_resource(self) -> Json:
        # Callers get private copies so they can never mutate stored history.
        assert self.resource is not None
        return copy.deepcopy(self.resource)


class Store:
    """Resource histories keyed by (type, id), in creation order.

    Not thread-safe on its own: the server holds one lock around store and log.
    """

    def __init__(self, strong_etags: bool = False) -> None:
        self._items: dict[tuple[str, str], list[Version]] = {}
        self.strong_etags = strong_etags

    # -- transactions --------------------------------------------------------
    def snapshot(self) -> dict[tuple[str, str], list[Version]]:
        # Versions are immutable and resources are copied on write, so a
        # shallow copy of the history lists is enough to roll back.
        return {key: list(history) for key, history in self._items.items()}

    def restore(self, snap: dict[tuple[str, str], list[Version]]) -> None:
        self._items = snap

    def clear(self) -> None:
        self._items.clear()

    # -- queries -------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def latest(self, rtype: str, rid: str) -> Version | None:
        """Newest version including delete markers, or None if never existed."""
        history = self._items.get((rtype, rid))
        return history[-1] if history else None

    def current(self, rtype: str, rid: str) -> Version:
        latest = self.latest(rtype, rid)
        if latest is None:
            raise FhirError(404, f"{rtype}/{rid} is not known", "not-found")
        if latest.deleted:
            raise FhirError(410, f"{rtype}/{rid} has been deleted", "deleted")
        return latest

    def history(self, rtype: str, rid: str) -> list[Version]:
        history = self._items.get((rtype, rid))
        if not history:
            raise FhirError(404, f"{rtype}/{rid} is not known", "not-found")
        return list(history)

    def version(self, rtype: str, rid: str, vid: int) -> Version:
        for item in self.history(rtype, rid):
            if item.version_id == vid:
                if item.deleted:
                    raise FhirError(410, f"{rtype}/{rid}/_history/{vid} is a delete", "deleted")
                return item
        raise FhirError(404, f"{rtype}/{rid}/_history/{vid} is not known", "not-found")

    def all_current(self, rtype: str) -> list[Version]:
        return [
            history[-1]
            for (item_type, _), history in self._items.items()
            if item_type == rtype and history and not history[-1].deleted
        ]

    def types(self) -> list[str]:
        return sorted({rtype for rtype, _ in self._items})

    # -- writes --------------------------------------------------------------
    def put(self, rtype: str, rid: str, resource: Json) -> Version:
        """Store ``resource`` as the next version, stamping id and meta."""
        previous = self.latest(rtype, rid)
        version_id = previous.version_id + 1 if previous else 1
        when = datetime.now(UTC)
        stored = copy.deepcopy(resource)
        stored["resourceType"] = rtype
        stored["id"] = rid
        raw_meta = stored.get("meta")
        meta = dict(raw_meta) if isinstance(raw_meta, dict) else {}
        meta["versionId"] = str(version_id)
        meta["lastUpdated"] = fhir_instant(when)
        stored["meta"] = meta
        version = Version(rtype, rid, version_id, when, stored, self.strong_etags)
        self._items.setdefault((rtype, rid), []).append(version)
        return version

    def delete(self, rtype: str, rid: str) -> Version:
        """Append a delete marker; deleting an already deleted resource is a no-op."""
        latest = self.latest(rtype, rid)
        if latest is None:
            raise FhirError(404, f"{rtype}/{rid} is not known", "not-found")
        if latest.deleted:
            return latest
        version = Version(rtype, rid, latest.version_id + 1, datetime.now(UTC), None,
                          self.strong_etags)
        self._items[(rtype, rid)].append(version)
        return version
