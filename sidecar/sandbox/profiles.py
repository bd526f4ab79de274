"""EHR behaviour profiles for the sandbox: small, declarative data, one dict per profile.

Real EHRs differ in ways a write-back proxy must survive: the status of a version conflict
(412 or 409), weak or strong ETags, charts locked by another user, closed encounters,
merged patients, rate limits, slow answers, timeouts, bursts of 5xx and servers that honour
method overrides. Each profile below switches on a few of these behaviours; everything not
named keeps the plain sandbox's behaviour (``default``).

Keys (all optional):

- ``description``: one line for ``--list-profiles``.
- ``extends``: a profile name (or list of names) whose keys this one starts from.
- ``conflict_status``: status for an ``If-Match`` that does not match (412, or 409 like
  Oracle Health).
- ``etag``: ``"weak"`` (``W/"3"``, the default) or ``"strong"`` (``"3"``, and ``If-Match`` is
  compared strongly, RFC 9110: a weak validator never matches).
- ``require_if_match``: a status (e.g. 428) for update/patch/delete without ``If-Match``.
- ``locked_patients`` + ``locked_status`` (423 or 409): writes to a locked patient or to any
  resource that references it (stored or written version) are refused.
- ``closed_encounters`` + ``closed_status`` (422): writes to a closed Encounter or whose
  resource references one are refused.
- ``merged_patients`` (``{old_id: new_id}``) + ``merged_status`` (422): the old Patient is
  seeded inactive with ``link`` ``replaced-by`` the new one (and the new one ``replaces`` it);
  writes to the old id or referencing it are refused.
- ``rate_limit``: ``{requests, window_s, retry_after}``: more than ``requests`` FHIR requests
  in a fixed window of ``window_s`` seconds are answered 429 with ``Retry-After``, unexecuted.
- ``bursts``: ``{every, length, status, retry_after}``: of every ``every`` FHIR requests the
  last ``length`` are answered ``status`` (5xx) without being executed.
- ``faults``: initial fault configuration (see ``faults.py``): slow answers (``delay_ms``),
  timeouts (``hang``, optionally for some ``methods``).
- ``method_override``: names honoured as the effective method of a POST:
  ``x-http-method-override``, ``x-method-override`` (headers) and ``_method`` (query or form
  body). A proxy in front must classify them first (and strip them).
- ``concurrent_writer``: after every successful read of a resource, another (simulated)
  user stores a new version of it, so a write conditioned on the version read conflicts.
- ``seed``: resources stored at start (and after ``reset``), each with ``resourceType``/``id``.

The sandbox never imports the rest of ``sidecar``: this module is data plus validation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .faults import Faults

_PATIENT_NAME = [{"family": "Sandbox", "given": ["Synthetic"]}]

PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "description": "plain FHIR R4: 412 on version conflicts, weak ETags, nothing locked",
    },
    "oracle": {
        "description": "Oracle Health-like: a version conflict is 409 Conflict; weak ETags",
        "conflict_status": 409,
    },
    "strong-etag": {
        "description": "strong ETags (\"3\"), If-Match compared strongly, 428 without If-Match",
        "etag": "strong",
        "require_if_match": 428,
    },
    "chart-locked": {
        "description": "the chart of Patient/locked-1 is locked by another user: writes 423",
        "locked_patients": ["locked-1"],
        "locked_status": 423,
        "seed": [
            {"resourceType": "Patient", "id": "locked-1", "name": _PATIENT_NAME},
            {"resourceType": "Observation", "id": "locked-obs-1", "status": "final",
             "code": {"text": "heart rate"}, "subject": {"reference": "Patient/locked-1"}},
            {"resourceType": "Patient", "id": "open-1", "name": _PATIENT_NAME},
        ],
    },
    "encounter-closed": {
        "description": "Encounter/enc-closed is finished: writes that reference it are 422",
        "closed_encounters": ["enc-closed"],
        "closed_status": 422,
        "seed": [
            {"resourceType": "Patient", "id": "p1", "name": _PATIENT_NAME},
            {"resourceType": "Encounter", "id": "enc-closed", "status": "finished",
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
             "subject": {"reference": "Patient/p1"}},
            {"resourceType": "Encounter", "id": "enc-open", "status": "in-progress",
             "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
             "subject": {"reference": "Patient/p1"}},
        ],
    },
    "patient-merged": {
        "description": "Patient/old-1 was merged into Patient/new-1: writes to or about old-1 are 422",
        "merged_patients": {"old-1": "new-1"},
        "merged_status": 422,
    },
    "rate-limited": {
        "description": "more than 5 FHIR requests a second: 429 with Retry-After: 1",
        "rate_limit": {"requests": 5, "window_s": 1.0, "retry_after": 1},
    },
    "slow": {
        "description": "every answer is 300 ms late (the request is executed first)",
        "faults": {"delay_ms": 300},
    },
    "timeout": {
        "description": "writes are accepted and never answered (reads work)",
        "faults": {"hang": True, "methods": ["POST", "PUT", "PATCH", "DELETE"]},
    },
    "flaky": {
        "description": "bursts of 5xx: of every 10 FHIR requests the last 3 are 503 (Retry-After: 1)",
        "bursts": {"every": 10, "length": 3, "status": 503, "retry_after": 1},
    },
    "method-override": {
        "description": "honours X-HTTP-Method-Override, X-Method-Override and _method on POST",
        "method_override": ["x-http-method-override", "x-method-override", "_method"],
    },
}

PROFILE_KEYS = frozenset({
    "description", "extends", "conflict_status", "etag", "require_if_match", "locked_patients",
    "locked_status", "closed_encounters", "closed_status", "merged_patients", "merged_status",
    "rate_limit", "bursts", "faults", "method_override", "concurrent_writer", "seed",
})
OVERRIDE_NAMES = frozenset({"x-http-method-override", "x-method-override", "_method"})
_MAX_EXTENDS = 8


@dataclass(frozen=True)
class RateLimit:
    requests: int
    window_s: float
    retry_after: str


@dataclass(frozen=True)
class Bursts:
    every: int
    length: int
    status: int
    retry_after: str | None


@dataclass(frozen=True)
class Profile:
    """A validated profile. Build with ``resolve_profile``."""

    name: str = "default"
    description: str = ""
    conflict_status: int = 412
    strong_etags: bool = False
    require_if_match: int | None = None
    locked_patients: frozenset[str] = frozenset()
    locked_status: int = 423
    closed_encounters: frozenset[str] = frozenset()
    closed_status: int = 422
    merged_patients: Mapping[str, str] = field(default_factory=dict)
    merged_status: int = 422
    rate_limit: RateLimit | None = None
    bursts: Bursts | None = None
    faults: Mapping[str, Any] = field(default_factory=dict)
    method_override: frozenset[str] = frozenset()
    concurrent_writer: bool = False
    seed: tuple[Mapping[str, Any], ...] = ()

    def initial_faults(self) -> Faults:
        return Faults.from_mapping(self.faults)

    def seed_resources(self) -> list[dict[str, Any]]:
        """Copies of the resources to store at start, merged patients included."""
        out = [copy.deepcopy(dict(r)) for r in self.seed]
        for old, new in self.merged_patients.items():
            out.append({"resourceType": "Patient", "id": new, "active": True, "name": _PATIENT_NAME,
                        "link": [{"other": {"reference": f"Patient/{old}"}, "type": "replaces"}]})
            out.append({"resourceType": "Patient", "id": old, "active": False, "name": _PATIENT_NAME,
                        "link": [{"other": {"reference": f"Patient/{new}"}, "type": "replaced-by"}]})
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "conflict_status": self.conflict_status,
            "etag": "strong" if self.strong_etags else "weak",
            "require_if_match": self.require_if_match,
            "locked_patients": sorted(self.locked_patients), "locked_status": self.locked_status,
            "closed_encounters": sorted(self.closed_encounters), "closed_status": self.closed_status,
            "merged_patients": dict(self.merged_patients), "merged_status": self.merged_status,
            "rate_limit": None if self.rate_limit is None else {
                "requests": self.rate_limit.requests, "window_s": self.rate_limit.window_s,
                "retry_after": self.rate_limit.retry_after},
            "bursts": None if self.bursts is None else {
                "every": self.bursts.every, "length": self.bursts.length,
                "status": self.bursts.status, "retry_after": self.bursts.retry_after},
            "faults": dict(self.faults),
            "method_override": sorted(self.method_override),
            "concurrent_writer": self.concurrent_writer,
            "seed": [f"{r['resourceType']}/{r['id']}" for r in self.seed_resources()],
        }


def _status(raw: Mapping[str, Any], key: str, low: int, high: int, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"profile {key!r} must be a status in [{low}, {high}]")
    return value


def _ids(raw: Mapping[str, Any], key: str) -> frozenset[str]:
    value = raw.get(key, [])
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"profile {key!r} must be a list of ids")
    return frozenset(value)


def _retry_after(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"profile {where}.retry_after must be seconds or an HTTP-date")
    return str(value)


def _flatten(spec: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """Resolve ``extends`` (names of PROFILES) into one mapping; later keys win."""
    if depth > _MAX_EXTENDS:
        raise ValueError("profile 'extends' nests too deeply")
    unknown = sorted(set(spec) - PROFILE_KEYS)
    if unknown:
        raise ValueError(f"unknown profile keys {unknown}; known: {sorted(PROFILE_KEYS)}")
    parents = spec.get("extends", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, (list, tuple)):
        raise ValueError("profile 'extends' must be a profile name or a list of names")
    merged: dict[str, Any] = {}
    for parent in parents:
        if parent not in PROFILES:
            raise ValueError(f"unknown profile {parent!r}; known: {sorted(PROFILES)}")
        merged.update(_flatten(PROFILES[parent], depth + 1))
    merged.update({k: v for k, v in spec.items() if k != "extends"})
    if "seed" in spec:  # seeds accumulate
        base_seed = [r for p in parents for r in _flatten(PROFILES[p], depth + 1).get("seed", [])]
        merged["seed"] = base_seed + list(spec["seed"])
    return merged


def build_profile(spec: Mapping[str, Any], name: str = "custom") -> Profile:
    """Validate one profile mapping (``extends`` resolved); raises ValueError."""
    raw = _flatten(spec)
    etag = raw.get("etag", "weak")
    if etag not in ("weak", "strong"):
        raise ValueError("profile 'etag' must be 'weak' or 'strong'")
    merged = raw.get("merged_patients", {})
    if not isinstance(merged, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v and k != v for k, v in merged.items()):
        raise ValueError("profile 'merged_patients' must map old ids to (other) new ids")
    rate = raw.get("rate_limit")
    rate_limit = None
    if rate is not None:
        if not isinstance(rate, Mapping) or set(rate) - {"requests", "window_s", "retry_after"}:
            raise ValueError("profile 'rate_limit' takes requests, window_s, retry_after")
        requests, window = rate.get("requests"), rate.get("window_s", 1.0)
        if isinstance(requests, bool) or not isinstance(requests, int) or requests < 0:
            raise ValueError("profile rate_limit.requests must be a non-negative integer")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= 3600:
            raise ValueError("profile rate_limit.window_s must be in (0, 3600]")
        rate_limit = RateLimit(requests, float(window),
                               _retry_after(rate.get("retry_after", 1), "rate_limit") or "1")
    burst = raw.get("bursts")
    bursts = None
    if burst is not None:
        if not isinstance(burst, Mapping) or set(burst) - {"every", "length", "status", "retry_after"}:
            raise ValueError("profile 'bursts' takes every, length, status, retry_after")
        every, length = burst.get("every"), burst.get("length", 1)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1 or \
                isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= every:
            raise ValueError("profile bursts needs 1 <= every and 0 <= length <= every")
        bursts = Bursts(every, length, _status(burst, "status", 500, 599, 503) or 503,
                        _retry_after(burst.get("retry_after"), "bursts"))
    faults = raw.get("faults", {})
    if not isinstance(faults, Mapping):
        raise ValueError("profile 'faults' must be a mapping")
    Faults.from_mapping(faults)  # validates
    overrides = raw.get("method_override", [])
    if not isinstance(overrides, (list, tuple)) or not set(overrides) <= OVERRIDE_NAMES:
        raise ValueError(f"profile 'method_override' names must be among {sorted(OVERRIDE_NAMES)}")
    seed = raw.get("seed", [])
    if not isinstance(seed, (list, tuple)) or not all(
            isinstance(r, Mapping) and isinstance(r.get("resourceType"), str)
            and isinstance(r.get("id"), str) for r in seed):
        raise ValueError("profile 'seed' must be resources with resourceType and id")
    concurrent = raw.get("concurrent_writer", False)
    if not isinstance(concurrent, bool):
        raise ValueError("profile 'concurrent_writer' must be a boolean")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError("profile 'description' must be a string")
    return Profile(
        name=name,
        description=description,
        conflict_status=_status(raw, "conflict_status", 400, 499, 412) or 412,
        strong_etags=etag == "strong",
        require_if_match=_status(raw, "require_if_match", 400, 499, None),
        locked_patients=_ids(raw, "locked_patients"),
        locked_status=_status(raw, "locked_status", 400, 499, 423) or 423,
        closed_encounters=_ids(raw, "closed_encounters"),
        closed_status=_status(raw, "closed_status", 400, 499, 422) or 422,
        merged_patients=dict(merged),
        merged_status=_status(raw, "merged_status", 400, 499, 422) or 422,
        rate_limit=rate_limit,
        bursts=bursts,
        faults=dict(faults),
        method_override=frozenset(overrides),
        concurrent_writer=concurrent,
        seed=tuple(copy.deepcopy(dict(r)) for r in seed),
    )


def resolve_profile(spec: str | Mapping[str, Any] | Profile | None) -> Profile:
    """A profile from a name (``"oracle"``, or several joined by commas, later ones winning),
    a mapping (``{"extends": "oracle", "concurrent_writer": True}``) or a Profile."""
    if spec is None:
        return build_profile(PROFILES["default"], "default")
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if not names:
            raise ValueError("empty profile name")
        for n in names:
            if n not in PROFILES:
                raise ValueError(f"unknown profile {n!r}; known: {sorted(PROFILES)}")
        if len(names) == 1:
            return build_profile(PROFILES[names[0]], names[0])
        return build_profile({"extends": names}, ",".join(names))
    if isinstance(spec, Mapping):
        body = dict(spec)
        name = body.pop("name", "custom")
        if not isinstance(name, str) or not name:
            raise ValueError("profile 'name' must be a non-empty string")
        return build_profile(body, name)
    raise TypeError("profile must be a name, a mapping or a Profile")
