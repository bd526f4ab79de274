"""Reviewer passwords: scrypt (hashlib, no extra dependency) or a bare SHA-256 for generated keys.

Format of `password_hash`: `scrypt$N$r$p$<salt, base64>$<hash, base64>` (32-byte hash). Checks are
constant time; scrypt runs off the event loop (`asyncio.to_thread`) because it costs ~50 ms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def parse_scrypt(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ValueError("N, r, p must be integers and salt/hash base64") from None
    if n < 2**10 or n > _MAX_N or n & (n - 1) or not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
        raise ValueError("scrypt parameters out of range (N a power of two in [2^10, 2^20], r <= 32, p <= 16)")
    if len(salt) < 16 or len(digest) < 16:
        raise ValueError("salt and hash must be at least 16 bytes")
    return n, r, p, salt, digest


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=132 * n * r * p + 2**20)


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    if not password:
        raise ValueError("empty password")
    salt = os.urandom(16)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p, 32))}"


def verify_scrypt(password: str, encoded: str) -> bool:
    try:
        n, r, p, salt, digest = parse_scrypt(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


def verify_sha256(password: str, hex_digest: str) -> bool:
    got = hashlib.sha256(password.encode("utf-8")).hexdigest()
    return hmac.compare_digest(got, hex_digest.lower())


# A fixed scrypt hash to check against when the reviewer id is unknown: same cost, no timing oracle.
DUMMY_HASH = "scrypt$16384$8$1$ZmhpciBzaWRlY2FyIGR1bW15$" + _b64(b"\0" * 32)
