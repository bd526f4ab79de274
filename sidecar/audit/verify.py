"""Offline verification of audit files written by AuditWriter.

Exit-code style result: 0 intact, 1 tampered, 2 torn tail not acknowledged.
Messages name files, line numbers, chains and seqs, never record contents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .checkpoints import parse_checkpoint_line
from .files import active_path
from .record import HMAC_PURPOSE, ZERO_HASH, check_record, derive_key, hash_ok, loads_line

INTACT, TAMPERED, TORN = 0, 1, 2


@dataclass(frozen=True)
class VerifyResult:
    code: int            # 0 intact; 1 tampered; 2 torn tail not acknowledged by a later admin record
    first_bad_seq: int | None
    chain: str | None
    message: str         # human-readable, no record contents


class _Tampered(Exception):
    def __init__(self, chain: str | None, seq: int | None, message: str) -> None:
        super().__init__(message)
        self.chain, self.seq, self.message = chain, seq, message


def _acknowledges(next_raw: bytes | None, body: bytes) -> bool:
    """True if the next line is the writer's admin record for torn bytes `body`.
    That admin record is itself verified in chain order right after."""
    if next_raw is None:
        return False
    try:
        nxt = loads_line(next_raw.rstrip(b"\n"))
    except ValueError:
        return False
    reasons = nxt.get("reasons")
    return (nxt.get("kind") == "admin" and isinstance(reasons, list) and "torn-tail" in reasons
            and nxt.get("torn_sha256") == hashlib.sha256(body).hexdigest())


class _Verifier:
    def __init__(self, keys: Mapping[str, bytes], wanted: dict[str, dict[int, str]]) -> None:
        self.keys = keys
        self.wanted = wanted                      # chain -> seq -> hash from checkpoints
        self.tips: dict[str, tuple[int, str]] = {}  # chain -> (seq, hash) verified so far
        self.pos: tuple[str | None, int] = (None, 0)  # last verified record in line order
        self.records = 0
        self.torn_acknowledged = 0
        self.torn: str | None = None              # message for an unacknowledged torn tail

    def _bad(self, claimed: Any) -> tuple[str | None, int]:
        """Where to report a broken line: the claimed chain's next seq if that
        chain is known, else the record after the previous one in the file."""
        if isinstance(claimed, str) and claimed in self.tips:
            return claimed, self.tips[claimed][0] + 1
        chain, seq = self.pos
        if chain is None and isinstance(claimed, str):
            chain = claimed
        return chain, seq + 1

    def feed_file(self, path: str, last_file: bool) -> None:
        with open(path, "rb") as f:
            prev_raw: bytes | None = None
            lineno = 0
            for raw in f:
                if prev_raw is not None:
                    self._line(path, lineno, prev_raw, raw, last_file)
                prev_raw, lineno = raw, lineno + 1
            if prev_raw is not None:
                self._line(path, lineno, prev_raw, None, last_file)

    def _line(self, path: str, lineno: int, raw: bytes, next_raw: bytes | None,
              last_file: bool) -> None:
        where = f"{path}:{lineno}"
        if not raw.endswith(b"\n"):
            chain, seq = self._bad(None)
            if not last_file:
                raise _Tampered(chain, seq, f"{where}: torn line at the end of a file that "
                                            f"is not the last one")
            self.torn = (f"{where}: torn last line ({len(raw)} bytes) not acknowledged "
                         f"by an admin torn-tail record")
            return
        body = raw[:-1]
        if _acknowledges(next_raw, body):
            self.torn_acknowledged += 1
            return
        try:
            rec = loads_line(body)
        except ValueError:
            chain, seq = self._bad(None)
            raise _Tampered(chain, seq, f"{where}: unparseable line") from None
        self._record(where, rec)

    def _record(self, where: str, rec: dict[str, Any]) -> None:
        try:
            check_record(rec)
        except ValueError as exc:
            chain, seq = self._bad(rec.get("chain"))
            raise _Tampered(chain, seq, f"{where}: malformed record ({exc})") from None
        chain, seq = rec["chain"], rec["seq"]
        key = self.keys.get(rec["key_id"])
        if key is None:
            c, s = self._bad(chain)
            raise _Tampered(c, s, f"{where}: unknown key id {rec['key_id']!r}")
        if not hash_ok(key, rec):
            c, s = self._bad(chain)
            raise _Tampered(c, s, f"{where}: HMAC mismatch (record altered)")
        tip_seq, tip_hash = self.tips.get(chain, (0, ZERO_HASH))
        if seq != tip_seq + 1:
            raise _Tampered(chain, tip_seq + 1, f"{where}: chain {chain!r} has seq {seq} "
                                                f"where {tip_seq + 1} was expected")
        if rec["prev"] != tip_hash:
            raise _Tampered(chain, seq, f"{where}: prev link broken at seq {seq}")
        expected = self.wanted.get(chain, {}).get(seq)
        if expected is not None and expected != rec["hash"]:
            raise _Tampered(chain, seq, f"{where}: seq {seq} differs from the checkpoint copy")
        self.tips[chain] = (seq, rec["hash"])
        self.pos = (chain, seq)
        self.records += 1

    def finish(self) -> None:
        # A checkpoint beyond the tip means records were cut from the tail.
        for chain, seqs in sorted(self.wanted.items()):
            tip = self.tips.get(chain, (0, ZERO_HASH))[0]
            beyond = [s for s in seqs if s > tip]
            if beyond:
                raise _Tampered(chain, tip + 1, f"checkpoint names seq {max(beyond)} of chain "
                                                f"{chain!r} but the files end at seq {tip}")


def _load_checkpoints(path: str) -> dict[str, dict[int, str]]:
    """chain -> seq -> hash, from checkpoint records (their own seq/hash and the
    checkpoint_seq/checkpoint_hash they cover) among the log lines of `path`.
    Other lines are skipped; a checkpoint lacking those fields, an unreadable
    one, or a file without any is an error: an unusable off-host copy must not
    read as 'intact'."""
    wanted: dict[str, dict[int, str]] = {}

    def add(chain: Any, seq: Any, digest: Any, lineno: int) -> None:
        if not (isinstance(chain, str) and isinstance(seq, int) and not isinstance(seq, bool)
                and isinstance(digest, str)):
            raise _Tampered(None, None, f"{path}:{lineno}: checkpoint lacks chain/seq/hash")
        seen = wanted.setdefault(chain, {}).setdefault(seq, digest)
        if seen != digest:
            raise _Tampered(chain, seq, f"{path}:{lineno}: checkpoints disagree on seq {seq}")

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                cp = parse_checkpoint_line(raw)
            except ValueError:
                raise _Tampered(None, None, f"{path}:{lineno}: unparseable checkpoint") from None
            if cp is None:
                continue
            add(cp.get("chain"), cp.get("seq"), cp.get("hash"), lineno)
            if "checkpoint_seq" in cp or "checkpoint_hash" in cp:
                add(cp.get("chain"), cp.get("checkpoint_seq"), cp.get("checkpoint_hash"), lineno)
    if not wanted:
        raise _Tampered(None, None, f"{path}: no checkpoint records found")
    return wanted


def verify_files(paths: Sequence[str], secrets: dict[str, bytes],
                 checkpoints: str | None = None) -> VerifyResult:
    """Verify audit files given in rotation order (oldest first; several workers' sets may
    follow each other, each in its own order). OSError from
    reading a file propagates: a missing file is not a verdict."""
    if not paths:
        raise ValueError("no audit files given")
    keys = {kid: derive_key(s, HMAC_PURPOSE) for kid, s in secrets.items()}
    try:
        wanted = _load_checkpoints(checkpoints) if checkpoints is not None else {}
        v = _Verifier(keys, wanted)
        # A torn tail may end only the newest file of its set (each worker has its own set).
        sets = [active_path(p) for p in paths]
        for i, path in enumerate(paths):
            v.feed_file(path, last_file=sets[i] not in sets[i + 1:])
        v.finish()
    except _Tampered as t:
        return VerifyResult(TAMPERED, t.seq, t.chain, t.message)
    if v.torn is not None:
        chain, seq = v._bad(None)
        return VerifyResult(TORN, seq, chain, v.torn)
    summary = f"{v.records} records in {len(v.tips)} chain(s) intact"
    if v.torn_acknowledged:
        summary += f"; {v.torn_acknowledged} acknowledged torn line(s)"
    return VerifyResult(INTACT, None, None, summary)
