"""Fault injection for the sandbox EHR (applies to FHIR requests only).

Keys (all optional; ``set_faults`` replaces the whole configuration):

- ``delay_ms``: execute the request, then sleep this long before answering, so a
  client that times out leaves the write committed (the ambiguous case).
- ``hang``: accept the request, execute nothing, never answer; the connection
  is held until the client closes it or the server stops.
- ``status`` (+ ``retry_after``): answer every request with this status and an
  OperationOutcome without executing it; ``Retry-After`` is sent when given.
- ``burst_5xx``: the next N requests are answered with ``burst_status``
  (default 503, plus ``Retry-After`` when given) without being executed.
- ``methods``: restrict all of the above to these HTTP methods.

Precedence when several apply: hang, then burst, then status; delay adds to any.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FAULT_KEYS = ("delay_ms", "hang", "status", "retry_after", "burst_5xx", "burst_status",
              "methods")


def _int(raw: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"fault {key!r} must be an integer in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class Decision:
    """What to do with one request; ``kind`` None means execute normally."""

    kind: str | None = None  # "hang" | "burst" | "status"
    delay_s: float = 0.0
    status: int = 0
    retry_after: str | None = None


@dataclass
class Faults:
    delay_ms: int = 0
    hang: bool = False
    status: int | None = None
    retry_after: str | None = None
    burst_5xx: int = 0
    burst_status: int = 503
    methods: frozenset[str] | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Faults:
        """Validate a fault configuration; raises ValueError on bad input."""
        unknown = sorted(set(raw) - set(FAULT_KEYS))
        if unknown:
            raise ValueError(f"unknown fault keys {unknown}; known: {list(FAULT_KEYS)}")
        hang = raw.get("hang", False)
        if not isinstance(hang, bool):
            raise ValueError("fault 'hang' must be a boolean")
        retry_after = raw.get("retry_after")
        if retry_after is not None:
            if isinstance(retry_after, bool) or not isinstance(retry_after, (int, str)):
                raise ValueError("fault 'retry_after' must be seconds or an HTTP-date")
            retry_after = str(retry_after)
        methods = raw.get("methods")
        if methods is not None:
            if not isinstance(methods, (list, tuple, set, frozenset)) or not all(
                    isinstance(m, str) for m in methods):
                raise ValueError("fault 'methods' must be a list of method names")
            methods = frozenset(m.upper() for m in methods)
        return cls(
            delay_ms=_int(raw, "delay_ms", 0, 600_000) or 0,
            hang=hang,
            status=_int(raw, "status", 200, 599),
            retry_after=retry_after,
            burst_5xx=_int(raw, "burst_5xx", 0, 1_000_000) or 0,
            burst_status=_int(raw, "burst_status", 400, 599) or 503,
            methods=methods,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "delay_ms": self.delay_ms, "hang": self.hang, "status": self.status,
            "retry_after": self.retry_after, "burst_5xx": self.burst_5xx,
            "burst_status": self.burst_status,
            "methods": sorted(self.methods) if self.methods is not None else None,
        }

    def take(self, method: str) -> Decision:
        """Decide for one request; consumes one burst slot (call under the lock)."""
        if self.methods is not None and method.upper() not in self.methods:
            return Decision()
        delay = self.delay_ms / 1000.0
        if self.hang:
            return Decision("hang", delay)
        if self.burst_5xx > 0:
            self.burst_5xx -= 1
            return Decision("burst", delay, self.burst_status, self.retry_after)
        if self.status is not None:
            return Decision("status", delay, self.status, self.retry_after)
        return Decision(None, delay)
