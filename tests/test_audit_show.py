"""`audit show` filters and formatting; checkpoints shipped via stdout lines."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import (
    AuditWriter, chain_files, format_record, print_checkpoint, show_records, verify_files,
)

SECRETS = {"k1": b"1" * 32}


async def write(path: Path, **kw: Any) -> list[dict[str, Any]]:
    w = AuditWriter(path, SECRETS, "k1", **kw)
    await w.start()
    out = [
        await w.append({"kind": "intent", "correlation_id": "corr-0001", "client_id": "scribe-app",
                        "method": "PUT", "interaction": "update", "resource_type": "Observation",
                        "decision": "allow"}),
        await w.append({"kind": "outcome", "correlation_id": "corr-0001", "client_id": "scribe-app",
                        "interaction": "update", "resource_type": "Observation",
                        "outcome": "committed", "upstream_status": 200, "latency_ms": 12.5}),
        await w.append({"kind": "deny", "correlation_id": "corr-0002", "client_id": "lab-feed",
                        "method": "DELETE", "interaction": "delete", "resource_type": "Patient",
                        "decision": "deny", "reasons": ["scope: no d on Patient"]}),
        await w.append({"kind": "read", "correlation_id": "corr-0003", "client_id": "scribe-app",
                        "interaction": "read", "resource_type": "Observation", "decision": "allow",
                        "upstream_status": 200}),
    ]
    await w.close()
    return out


async def test_show_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = await write(path, max_bytes=400)          # spread over rotated files
    files = chain_files(path)
    assert len(files) > 1

    def cids(**kw: Any) -> list[str | None]:
        return [r.get("correlation_id") for r in show_records(files, **kw)]

    assert cids(correlation_id="corr-0001") == ["corr-0001", "corr-0001"]
    assert cids(client_id="lab-feed") == ["corr-0002"]
    assert cids(kind="deny") == ["corr-0002"]
    assert cids(kind="deny,read") == ["corr-0002", "corr-0003"]
    assert cids(kind={"intent"}) == ["corr-0001"]
    assert cids(decision="deny") == ["corr-0002"]
    assert cids(decision="committed") == ["corr-0001"]          # matches `outcome` too
    assert cids(client_id="scribe-app", kind="read") == ["corr-0003"]
    assert len(list(show_records(files))) == len([r for f in files for r in
                                                   Path(f).read_bytes().splitlines()])
    # time bounds: since inclusive, until exclusive; strings and datetimes
    t2 = recs[2]["ts"]
    assert all(r["ts"] >= t2 for r in show_records(files, since=t2))
    assert "corr-0002" in cids(since=t2)
    assert all(r["ts"] < t2 for r in show_records(files, until=t2))
    future = datetime(2999, 1, 1, tzinfo=timezone.utc)
    assert cids(since=future) == []
    assert len(cids(until=future)) == len(list(show_records(files)))
    assert cids(since="2000-01-01T00:00:00", kind="deny") == ["corr-0002"]   # naive = UTC


async def test_show_skips_torn_and_garbage_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write(path)
    with open(path, "ab") as f:
        f.write(b"garbage\n" + b'{"kind":"deny","correlation_id":"x"')
    assert [r["kind"] for r in show_records([str(path)], kind="deny")] == ["deny"]


async def test_format_record_is_one_readable_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    recs = await write(path)
    line = format_record(recs[1])
    for part in (recs[1]["ts"], "main#2", "outcome", "client=scribe-app", "update", "Observation",
                 "committed", "status=200", "cid=corr-0001"):
        assert part in line
    deny = format_record(recs[2])
    assert "deny" in deny and "reasons=scope: no d on Patient" in deny and "status=-" in deny
    evil = dict(recs[2], reasons=["a\nfake line\x1b[31m"], client_id="c\r")
    out = format_record(evil)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\\n" in out
    cp = [r for r in show_records([str(path)], kind="checkpoint")]
    assert "covers#4" in format_record(cp[0])


async def test_checkpoints_from_stdout_lines_among_logs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    out = io.StringIO()
    w = AuditWriter(path, SECRETS, "k1", checkpoint_every=5,
                    on_checkpoint=lambda r: print_checkpoint(r, out))
    await w.start()
    for i in range(12):
        await w.append({"kind": "read", "correlation_id": f"c{i}"})
    await w.close()
    cp_lines = out.getvalue().splitlines()
    assert len(cp_lines) == 3 and all(json.loads(x)["kind"] == "checkpoint" for x in cp_lines)

    # what a log shipper stores: log events, CRI-prefixed and Docker-wrapped lines, noise
    log = [json.dumps({"ts": "2024-01-01T00:00:00Z", "level": "info", "event": "listening"}),
           "plain text line with { a brace",
           f"2024-01-01T00:00:01.000Z stdout F {cp_lines[0]}",
           json.dumps({"log": cp_lines[1] + "\n", "stream": "stdout", "time": "2024-01-01T00:00:02Z"}),
           json.dumps({"event": "audit", "kind": "read"}),
           "",
           cp_lines[2]]
    shipped = tmp_path / "stdout.log"
    shipped.write_text("\n".join(log) + "\n")
    result = verify_files([str(path)], SECRETS, str(shipped))
    assert result.code == 0, result.message

    # the copy catches a cut tail
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:8]) + b"\n")
    result = verify_files([str(path)], SECRETS, str(shipped))
    assert (result.code, result.first_bad_seq) == (1, 9)


@pytest.mark.parametrize("content", [
    "only log lines\n" + json.dumps({"event": "x"}) + "\n",
    '{"v":1,"chain":"main","seq":3,"kind":"checkpoint","checkp\n',      # truncated checkpoint
    json.dumps({"kind": "checkpoint", "chain": "main"}) + "\n",          # lacks seq/hash
])
async def test_unusable_checkpoint_copies_are_not_intact(tmp_path: Path, content: str) -> None:
    path = tmp_path / "audit.jsonl"
    await write(path)
    cps = tmp_path / "stdout.log"
    cps.write_text(content)
    assert verify_files([str(path)], SECRETS, str(cps)).code == 1


def test_print_checkpoint_ignores_other_records() -> None:
    out = io.StringIO()
    print_checkpoint({"kind": "read"}, out)
    assert out.getvalue() == ""
