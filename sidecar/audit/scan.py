"""Start-up scan: find a chain's tip and the intents that never got an outcome.

The scan walks records newest first: the active file, then the rotated files
(newest first), so a chain continues even if the process died between the
rename and the creation of a new active file. Finding the tip is strict (a
damaged tip would fork the chain); collecting unanswered intents is lenient
(it only adds information) and bounded to the chain's last `limit` records.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Mapping

from .files import reverse_lines
from .record import ZERO_HASH, AuditUnavailable, check_record, hash_ok, loads_line

# Copied from an unanswered intent onto its `unknown` outcome: ids and
# vocabulary only, all already validated when the intent was written.
UNKNOWN_COPY_FIELDS = (
    "correlation_id", "client_id", "user", "tenant", "source", "method", "interaction",
    "resource_type", "resource_id", "patient", "idempotency_key",
)
UNKNOWN_REASON = "no outcome recorded before restart"


@dataclass
class ScanResult:
    seq: int = 0
    prev: str = ZERO_HASH
    key_id: str | None = None          # key id of the tip (key rotation is noted in-chain)
    torn: bytes | None = None          # unterminated bytes at the end of the active file
    unanswered: list[dict[str, Any]] = field(default_factory=list)  # intents, oldest first


def _acknowledges(later: Mapping[str, Any] | None, raw: bytes) -> bool:
    """Is `later` the admin record the writer wrote right after torn bytes `raw`?"""
    return (later is not None and later.get("kind") == "admin"
            and isinstance(later.get("reasons"), list) and "torn-tail" in later["reasons"]
            and later.get("torn_sha256") == hashlib.sha256(raw).hexdigest())


def _lines(fd: int, path: str, rotated: list[str],
           result: ScanResult) -> Generator[tuple[str, bytes], None, None]:
    """(path, line) newest first across the active file and the rotated files.
    An empty line marks a file boundary (the acknowledgement look-ahead resets)."""
    lines = reverse_lines(fd, os.fstat(fd).st_size)
    result.torn = next(lines) or None
    for raw in lines:
        yield path, raw
    for old in reversed(rotated):
        yield old, b""
        rfd = os.open(old, os.O_RDONLY | os.O_CLOEXEC)
        try:
            lines = reverse_lines(rfd, os.fstat(rfd).st_size)
            if next(lines):
                # Rotation renames only fully written, fsync'd files.
                raise AuditUnavailable(f"{old}: rotated audit file ends in a torn line; "
                                       f"refusing to continue (run verify and repair)")
            for raw in lines:
                yield old, raw
        finally:
            os.close(rfd)


def scan(fd: int, path: str, chain: str, keys: Mapping[str, bytes], *,
         rotated: list[str], limit: int) -> ScanResult:
    result = ScanResult()
    stream = _lines(fd, path, rotated, result)
    try:
        _scan(stream, chain, keys, limit, result)
    finally:
        stream.close()                        # closes a rotated file left open mid-walk
    return result


def _scan(stream: Iterator[tuple[str, bytes]], chain: str, keys: Mapping[str, bytes],
          limit: int, result: ScanResult) -> None:
    later: dict[str, Any] | None = None       # the line after `raw` in file order
    tip: dict[str, Any] | None = None
    for where, raw in stream:
        if not raw:
            later = None
            continue
        if _acknowledges(later, raw):
            later = None                      # an earlier crash, already acknowledged
            continue
        try:
            rec = loads_line(raw)
        except ValueError:
            raise AuditUnavailable(
                f"{where}: unparseable line before the end of chain {chain!r}; "
                f"refusing to continue (run verify and repair)") from None
        if rec.get("chain") != chain:
            later = rec
            continue
        _check_tip(where, chain, keys, rec)
        tip = rec
        break
    if tip is None:
        return
    result.seq, result.prev, result.key_id = tip["seq"], tip["hash"], tip["key_id"]
    if limit > 0:
        result.unanswered = _unanswered(tip, stream, chain, limit)


def _check_tip(where: str, chain: str, keys: Mapping[str, bytes], rec: dict[str, Any]) -> None:
    try:
        check_record(rec)
    except ValueError as exc:
        raise AuditUnavailable(f"{where}: last record of chain {chain!r} is malformed ({exc}); "
                               f"refusing to fork the chain") from None
    key = keys.get(rec["key_id"])
    if key is None:
        raise AuditUnavailable(f"{where}: last record of chain {chain!r} uses key id "
                               f"{rec['key_id']!r} which is not configured; refusing to fork the chain")
    if not hash_ok(key, rec):
        raise AuditUnavailable(f"{where}: last record of chain {chain!r} (seq {rec['seq']}) "
                               f"fails its HMAC; refusing to fork the chain")


def _unanswered(tip: dict[str, Any], stream: Iterator[tuple[str, bytes]], chain: str,
                limit: int) -> list[dict[str, Any]]:
    """Intents of the chain's last `limit` records with no later outcome of the
    same correlation id. Walking backwards, an outcome is owed to the nearest
    earlier intent with its id (clients may reuse a correlation id)."""
    answered: Counter[str] = Counter()
    found: list[dict[str, Any]] = []

    def visit(rec: dict[str, Any]) -> None:
        cid = rec.get("correlation_id")
        if not isinstance(cid, str):
            return
        if rec.get("kind") == "outcome":
            answered[cid] += 1
        elif rec.get("kind") == "intent":
            if answered[cid]:
                answered[cid] -= 1
            else:
                found.append(rec)

    visit(tip)
    seen = 1
    for _, raw in stream:
        if seen >= limit:
            break
        if not raw:
            continue
        try:
            rec = loads_line(raw)
        except ValueError:
            continue                          # verify's business, not ours
        if rec.get("chain") == chain:
            seen += 1
            visit(rec)
    found.reverse()
    return found


def unknown_outcome_fields(intent: Mapping[str, Any]) -> dict[str, Any]:
    """The `outcome: unknown` record an auditor sees for a write whose result
    the crashed process never recorded."""
    fields: dict[str, Any] = {"kind": "outcome"}
    fields.update({k: intent[k] for k in UNKNOWN_COPY_FIELDS if k in intent})
    fields.update(outcome="unknown", reasons=[UNKNOWN_REASON])
    return fields
