"""`audit show`: a readable, filterable view of audit files.

This is a viewer, not a verifier: unreadable or torn lines are skipped (run
`audit verify` for a verdict). Records hold no PHI by construction (ids are
pseudonyms), but values are still escaped so a crafted value cannot inject
terminal control sequences or fake extra lines into the view.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from .record import loads_line, utc_timestamp


def _bound(value: datetime | str | None) -> str | None:
    """A time bound in the records' own `ts` format, so strings compare."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)   # naive means UTC, like the records
    return utc_timestamp(value)


def _kinds(kind: str | Collection[str] | None) -> frozenset[str] | None:
    if kind is None:
        return None
    if isinstance(kind, str):
        return frozenset(k.strip() for k in kind.split(",") if k.strip())
    return frozenset(kind)


def show_records(paths: Iterable[str], *, correlation_id: str | None = None,
                 client_id: str | None = None, kind: str | Collection[str] | None = None,
                 decision: str | None = None, since: datetime | str | None = None,
                 until: datetime | str | None = None) -> Iterator[dict[str, Any]]:
    """Records of `paths` (in the order given, e.g. `chain_files(path)`) that
    match every filter given. `kind` takes one kind, "a,b" or a collection;
    `decision` matches the `decision` or the `outcome` field (so "deny" and
    "unknown" both work); `since` is inclusive, `until` exclusive (ISO 8601
    strings or datetimes; naive means UTC)."""
    kinds, lo, hi = _kinds(kind), _bound(since), _bound(until)
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    continue                  # torn tail
                try:
                    rec = loads_line(raw[:-1])
                except ValueError:
                    continue
                if correlation_id is not None and rec.get("correlation_id") != correlation_id:
                    continue
                if client_id is not None and rec.get("client_id") != client_id:
                    continue
                if kinds is not None and rec.get("kind") not in kinds:
                    continue
                if decision is not None and decision not in (rec.get("decision"), rec.get("outcome")):
                    continue
                ts = rec.get("ts")
                if lo is not None or hi is not None:
                    if not isinstance(ts, str):
                        continue
                    if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
                        continue
                yield rec


def _clean(value: Any) -> str:
    """One token of the line: control characters escaped, never raw."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_record(r: dict[str, Any]) -> str:
    """ts, chain#seq, kind, client, interaction, type, decision/outcome, status,
    correlation id, reasons: one line, fixed columns, "-" where unknown."""
    verdict = r.get("outcome") or r.get("decision")
    if r.get("kind") == "checkpoint" and r.get("checkpoint_seq") is not None:
        verdict = f"covers#{r['checkpoint_seq']}"
    cols = [
        f"{_clean(r.get('ts')):<24}",
        f"{_clean(r.get('chain'))}#{_clean(r.get('seq')):<7}",
        f"{_clean(r.get('kind')):<10}",
        f"client={_clean(r.get('client_id'))}",
        f"{_clean(r.get('interaction')):<18}",
        f"{_clean(r.get('resource_type')):<20}",
        f"{_clean(verdict):<9}",
        f"status={_clean(r.get('upstream_status'))}",
        f"cid={_clean(r.get('correlation_id'))}",
    ]
    reasons = r.get("reasons")
    if isinstance(reasons, list) and reasons:
        cols.append("reasons=" + "; ".join(_clean(x) for x in reasons))
    return " ".join(cols)
