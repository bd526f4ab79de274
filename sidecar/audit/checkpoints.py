"""Off-host checkpoint copies: shipped as stdout lines, read back by verify.

The writer's `on_checkpoint` hook gets each checkpoint record once it is
durable; `print_checkpoint` writes it to stdout as one JSON line, where the
log shipper that already collects the sidecar's logs keeps a copy off the
host. An attacker who later cuts the tail of the audit file cannot also cut
that copy, so `audit verify --checkpoints FILE` detects the cut.

The FILE is whatever the shipper stored: the sidecar's log lines with the
checkpoint lines among them, possibly prefixed (CRI: `<ts> stdout F <line>`)
or wrapped (Docker json-file: `{"log": "<line>\\n", ...}`). Lines that are not
checkpoints are skipped; a line that names a checkpoint but cannot be read is
an error, never silently skipped.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Mapping, TextIO

from .record import dumps_line, loads_line

_MARK = b'"kind":"checkpoint"'
_lock = threading.Lock()   # one line per write, even with logging on other threads


def print_checkpoint(record: Mapping[str, Any], stream: TextIO | None = None) -> None:
    """`on_checkpoint` hook: the record, verbatim, as one JSON line on stdout.
    Written directly, not through logging: the log redactor would (rightly)
    drop the hash fields, and verify needs them byte for byte."""
    if record.get("kind") != "checkpoint":
        return
    out = stream if stream is not None else sys.stdout
    line = dumps_line(record).decode("utf-8")
    with _lock:
        out.write(line)
        out.flush()


def parse_checkpoint_line(raw: bytes) -> dict[str, Any] | None:
    """The checkpoint record in one stored log line, or None if the line is
    something else. Raises ValueError if it looks like a checkpoint but is
    not readable (truncated, garbled)."""
    start = raw.find(b"{")
    if start < 0:
        return None
    body = raw[start:].strip()
    try:
        obj = loads_line(body)
    except ValueError:
        if _MARK in body.replace(b" ", b""):
            raise ValueError("unreadable checkpoint line") from None
        return None
    if obj.get("kind") != "checkpoint" and isinstance(obj.get("log"), str):
        try:   # Docker json-file wrapping
            inner = loads_line(obj["log"].strip().encode("utf-8"))
        except (ValueError, json.JSONDecodeError):
            return None
        obj = inner
    return obj if obj.get("kind") == "checkpoint" else None
