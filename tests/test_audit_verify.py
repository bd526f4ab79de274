from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from sidecar.audit import AuditWriter, verify_files

SECRETS = {"k1": b"1" * 32, "k2": b"2" * 32}


async def write_log(path: Path, n: int, *, key_id: str = "k1", chain: str = "main",
                    checkpoint_every: int = 1000) -> list[dict]:
    """n caller records (+ the closing checkpoint); returns the shipped checkpoints."""
    shipped: list[dict] = []
    # unknown_scan_records=0: these logs are intents only, and tests count lines exactly
    w = AuditWriter(path, SECRETS, key_id, chain, checkpoint_every=checkpoint_every,
                    on_checkpoint=shipped.append, unknown_scan_records=0)
    await w.start()
    for i in range(n):
        await w.append({"kind": "intent", "correlation_id": f"c{i}", "method": "PUT",
                        "reasons": ["ok"], "latency_ms": i + 0.5})
    await w.close()
    return shipped


def flip_byte(data: bytes, line: int) -> bytes:
    lines = data.split(b"\n")
    target = lines[line]
    i = target.index(b'"correlation_id":"c') + len(b'"correlation_id":"')
    lines[line] = target[:i] + b"X" + target[i + 1:]
    return b"\n".join(lines)


def delete_line(data: bytes, line: int) -> bytes:
    lines = data.split(b"\n")
    del lines[line]
    return b"\n".join(lines)


def swap_lines(data: bytes, a: int, b: int) -> bytes:
    lines = data.split(b"\n")
    lines[a], lines[b] = lines[b], lines[a]
    return b"\n".join(lines)


def garble_line(data: bytes, line: int) -> bytes:
    lines = data.split(b"\n")
    lines[line] = lines[line][:20]
    return b"\n".join(lines)


def drop_newline(data: bytes) -> bytes:
    return data[:-1]


def tear_last(data: bytes) -> bytes:
    return data[:-30]


# (mutation of a 10-record log, expected code, expected first_bad_seq)
CASES: list[tuple[str, Callable[[bytes], bytes], int, int | None]] = [
    ("clean", lambda d: d, 0, None),
    ("byte-flipped", lambda d: flip_byte(d, 4), 1, 5),
    ("first-record-flipped", lambda d: flip_byte(d, 0), 1, 1),
    ("line-deleted", lambda d: delete_line(d, 3), 1, 4),
    ("lines-swapped", lambda d: swap_lines(d, 5, 6), 1, 6),
    ("unparseable-middle", lambda d: garble_line(d, 2), 1, 3),
    ("duplicated-line", lambda d: d.replace(d.split(b"\n")[2] + b"\n",
                                            (d.split(b"\n")[2] + b"\n") * 2), 1, 4),
    ("torn-last-line", tear_last, 2, 11),
    ("last-newline-missing", drop_newline, 2, 11),
    ("first-record-deleted", lambda d: delete_line(d, 0), 1, 1),
]


@pytest.mark.parametrize("name, mutate, code, seq", CASES, ids=[c[0] for c in CASES])
async def test_verify_detects(tmp_path: Path, name: str, mutate: Callable[[bytes], bytes],
                              code: int, seq: int | None) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 10)
    path.write_bytes(mutate(path.read_bytes()))
    result = verify_files([str(path)], {"k1": SECRETS["k1"]})
    assert (result.code, result.first_bad_seq) == (code, seq), result.message
    assert result.chain == (None if code == 0 else "main")
    assert "c4" not in result.message             # no record contents in messages


async def test_tail_cut_detected_only_with_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    shipped = await write_log(path, 25, checkpoint_every=10)
    cps = tmp_path / "checkpoints.jsonl"
    cps.write_text("".join(json.dumps(c) + "\n" for c in shipped))
    assert verify_files([str(path)], SECRETS, str(cps)).code == 0

    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:15]) + b"\n")     # a clean cut: chain still links
    assert verify_files([str(path)], SECRETS).code == 0
    result = verify_files([str(path)], SECRETS, str(cps))
    assert (result.code, result.first_bad_seq, result.chain) == (1, 16, "main")


async def test_checkpoint_with_other_hash_is_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    shipped = await write_log(path, 5)
    forged = dict(shipped[-1], checkpoint_hash="f" * 64)
    cps = tmp_path / "checkpoints.jsonl"
    cps.write_text(json.dumps(forged) + "\n")
    result = verify_files([str(path)], SECRETS, str(cps))
    assert (result.code, result.first_bad_seq) == (1, 5)


async def test_unusable_checkpoints_file_is_not_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 2)
    cps = tmp_path / "checkpoints.jsonl"
    cps.write_text("not json\n")
    assert verify_files([str(path)], SECRETS, str(cps)).code == 1


async def test_key_rotation_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 3, key_id="k1")
    await write_log(path, 3, key_id="k2")
    key_ids = [json.loads(x)["key_id"] for x in path.read_bytes().splitlines()]
    assert key_ids == ["k1"] * 4 + ["k2"] * 5          # + the admin key-rotation record
    admin = json.loads(path.read_bytes().splitlines()[4])
    assert admin["kind"] == "admin" and admin["reasons"] == ["key-rotation", "previous key_id k1"]
    assert verify_files([str(path)], SECRETS).code == 0
    result = verify_files([str(path)], {"k2": SECRETS["k2"]})   # retired key missing
    assert (result.code, result.first_bad_seq) == (1, 1) and "unknown key id" in result.message


async def test_rotated_files_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 10)
    lines = path.read_bytes().split(b"\n")
    old, new = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2"
    old.write_bytes(b"\n".join(lines[:6]) + b"\n")
    new.write_bytes(b"\n".join(lines[6:]))
    assert verify_files([str(old), str(new)], SECRETS).code == 0
    result = verify_files([str(new), str(old)], SECRETS)          # wrong order
    assert (result.code, result.first_bad_seq) == (1, 1)
    assert verify_files([str(new)], SECRETS).code == 1            # history missing


async def test_multiple_chains_are_independent(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 3, chain="a")
    await write_log(path, 3, chain="b")
    await write_log(path, 2, chain="a")
    assert verify_files([str(path)], SECRETS).code == 0
    data = path.read_bytes().split(b"\n")
    del data[5]                                                   # chain b, seq 2
    path.write_bytes(b"\n".join(data))
    result = verify_files([str(path)], SECRETS)
    assert (result.code, result.chain, result.first_bad_seq) == (1, "b", 2)


async def test_torn_tail_in_a_non_last_file_is_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 4)
    lines = path.read_bytes().split(b"\n")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:10])
    new.write_bytes(b"\n".join(lines[3:]))
    assert verify_files([str(old), str(new)], SECRETS).code == 1


async def test_acknowledgement_must_match_torn_bytes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"v":1,"cha')
    w = AuditWriter(path, SECRETS, "k1")
    await w.start()
    await w.close()
    assert verify_files([str(path)], SECRETS).code == 0
    data = path.read_bytes().replace(b'{"v":1,"cha\n', b'{"v":1,"chX\n')
    path.write_bytes(data)
    assert verify_files([str(path)], SECRETS).code == 1


def test_no_paths_is_an_error() -> None:
    with pytest.raises(ValueError):
        verify_files([], SECRETS)
