"""The request model: plain, immutable values that every stage reads and none mutates.

`RawRequest` is what the adapter copies out of a mitmproxy flow (nothing else in the pipeline
sees mitmproxy). `parse` turns it into a `FhirRequest`; `classify` adds the interaction(s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Query = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RawRequest:
    method: str
    target: bytes                      # the request target as received (origin-form path+query)
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) in order, duplicates kept
    body: bytes                        # raw_content: still content-encoded
    scheme: str = "http"
    authority: str = ""                # non-empty for absolute-form targets
    host: str = ""                     # the Host the app addressed (its view of the sidecar / the EHR)
    client_addr: str = ""
    mode: str = "reverse"
    peer_client: str | None = None     # mTLS: the verified client id, or "!reason" when it failed
    # name -> values, built on the first header_values() call (parse asks for a dozen names)
    _index: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    def header_values(self, name: str) -> list[str]:
        index = self._index
        if index is None:
            index = {}
            for k, v in self.headers:
                vals = index.get(k)
                if vals is None:
                    index[k] = [v]
                else:
                    vals.append(v)
            object.__setattr__(self, "_index", index)
        return list(index.get(name, ()))


@dataclass(frozen=True, slots=True)
class Target:
    """What a FHIR URL (relative to the base) addresses."""

    kind: str                          # base, metadata, discovery, type, instance, vread, history-*, search-*, operation-*, compartment
    resource_type: str | None = None
    id: str | None = None
    vid: str | None = None
    operation: str | None = None
    compartment: tuple[str, str] | None = None
    query: Query = ()
    path: str = "/"                   # base-relative, decoded once

    @property
    def query_names(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.query)


@dataclass(frozen=True, slots=True)
class Requirement:
    """SMART letters a request needs on one resource type ("*" = every type)."""

    resource_type: str
    letters: frozenset[str]


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a batch/transaction, classified like a request of its own."""

    index: int
    method: str
    url: str
    target: Target
    interaction: str
    is_write: bool
    conditional: bool
    resource: dict[str, Any] | None
    requires: tuple[Requirement, ...]
    operation: str | None = None


@dataclass(frozen=True, slots=True)
class FhirRequest:
    method: str                        # effective method (after an accepted override)
    original_method: str
    target: Target
    headers: dict[str, str]            # allowlisted, lower-case names, single values
    content_type: str | None
    body: Any                          # parsed JSON (resource / patch list) or form pairs, or None
    raw_body: bytes                    # the bytes to forward (original, or rewritten base URLs)
    body_rewritten: bool = False
    correlation_id: str = ""
    traceparent: str = ""
    # x-api-key / authorization as presented: for identify only, never forwarded or shown
    credentials: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Classification:
    interaction: str
    is_write: bool
    conditional: bool
    requires: tuple[Requirement, ...]
    operation: str | None = None
    entries: tuple[Entry, ...] = field(default=())
    public: bool = False               # capabilities / discovery: answered without identity

    @property
    def write_operations(self) -> tuple[str, ...]:
        ops = [self.operation] if (self.operation and self.is_write and not self.entries) else []
        ops += [e.operation for e in self.entries if e.operation and e.is_write]
        return tuple(o for o in ops if o)
