"""Prior state: read the current version before an update, patch or delete.

The stored version is handed to the checks and the policy as `current`; a JSON Patch is applied
to it so `resource` is the *result*; the write is then forwarded with `If-Match` on the version
read, so nothing can change in between (the upstream's 412 passes through). An app's own
`If-Match` that differs from the version read is answered 412 here: a stale update never
becomes a lost update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonpatch

from sidecar.errors import Refusal, unavailable
from sidecar.fhir import jsonbody
from sidecar.upstream_fast import FastUpstreamClient

MAX_CURRENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Prior:
    current: dict[str, Any] | None    # None: the resource does not exist (404/410)
    etag: str | None                  # the version read, as an ETag (W/"n")
    result: dict[str, Any] | None = None   # PATCH: the patched resource


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The first value of a response header (names compared case-insensitively)."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _etag(tag: str | None, current: dict[str, Any] | None) -> str | None:
    if tag:
        return tag
    vid = (current or {}).get("meta", {}).get("versionId")
    return f'W/"{vid}"' if isinstance(vid, str) and vid else None


def same_version(a: str, b: str) -> bool:
    """Compare ETags the way FHIR servers do for If-Match: weak and strong forms of one version match."""
    def norm(t: str) -> str:
        t = t.strip()
        return t[2:] if t.startswith("W/") else t
    return norm(a) == norm(b)


def apply_json_patch(current: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    try:
        result = jsonpatch.JsonPatch(ops).apply(current, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError):
        raise Refusal(422, "JSON Patch cannot be applied to the current version", "processing") from None
    if not isinstance(result, dict):
        raise Refusal(422, "JSON Patch result is not a resource", "processing")
    if result.get("resourceType") != current.get("resourceType") or result.get("id") != current.get("id"):
        raise Refusal(422, "JSON Patch may not change resourceType or id", "processing")
    return result


class PriorStateReader:
    """Reads through the sidecar's own upstream client (sidecar/upstream_fast.py: the same TLS trust
    and pins as the write that follows; an answer over its size limit is refused, never cut)."""

    def __init__(self, upstream_base: str, *, verify: Any = True, timeout_s: float = 30.0,
                 client: FastUpstreamClient | None = None, pins: frozenset[str] = frozenset()) -> None:
        self._base = upstream_base.rstrip("/")
        self._client = client or FastUpstreamClient(verify=verify, timeout_s=timeout_s, pins=pins)

    async def close(self) -> None:
        await self._client.close()

    async def read(self, resource_type: str, rid: str, *, correlation_id: str,
                   authorization: str | None = None) -> Prior:
        headers = [("accept", "application/fhir+json"), ("x-correlation-id", correlation_id),
                   ("accept-encoding", "identity")]
        if authorization:
            headers.append(("authorization", authorization))
        try:
            resp = await self._client.send("GET", f"{self._base}/{resource_type}/{rid}", headers, b"")
        except Exception:  # transport errors, a pin mismatch, an oversized answer alike: nothing to decide on
            raise unavailable("current version could not be read from the EHR") from None
        if resp.status in (404, 410):
            return Prior(None, None)
        if resp.status in (429, 503):
            # the EHR asks for quiet: pass its answer on (with Retry-After), never a false 403
            retry = _header(resp.headers, "retry-after")
            raise Refusal(resp.status, "the EHR asked to back off while the current version was read",
                          "throttled" if resp.status == 429 else "transient",
                          (("Retry-After", retry),) if retry else (), decision="error")
        if resp.status != 200:
            raise Refusal(502 if resp.status >= 500 else 403,
                          f"current version could not be read (EHR answered {resp.status})",
                          "transient" if resp.status >= 500 else "forbidden")
        try:
            # asked for identity; a server that compresses anyway is decoded with the same bound
            body = jsonbody.decode_content(resp.body, _header(resp.headers, "content-encoding"), MAX_CURRENT_BYTES)
            current = jsonbody.parse_json(body)
        except jsonbody.BodyError:
            raise Refusal(502, "current version is not readable JSON", "transient") from None
        if current.get("resourceType") != resource_type or current.get("id") != rid:
            raise Refusal(502, "EHR returned another resource than the one asked for", "transient")
        return Prior(current, _etag(_header(resp.headers, "etag"), current))


def check_if_match(sent: str | None, prior: Prior) -> None:
    if sent is None:
        return
    if prior.current is None or prior.etag is None or not same_version(sent, prior.etag):
        raise Refusal(412, "If-Match does not match the current version", "conflict")
