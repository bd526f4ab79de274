"""The kill switch: a flag file (global) and one flag file per client.

Engaged while the flag file exists and does not read `off`; a file that exists but cannot be
read counts as engaged (fail closed). The state is re-read at most every `refresh_s` on the
request path (so a change is seen within 1 s with no background task to die), and a
background poll makes sure every change is recorded even without traffic.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sidecar.errors import Refusal, unavailable

_CLIENT_ID_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@dataclass(frozen=True, slots=True)
class KillState:
    engaged: bool
    clients: frozenset[str]


def flag_engaged(path: Path) -> bool:
    try:
        if not path.exists() and not path.is_symlink():
            return False
        with open(path, "rb") as f:
            content = f.read(64)
    except OSError:
        return True  # exists but unreadable (or vanished mid-read: re-checked next refresh)
    return content.split(b"\n", 1)[0].strip().lower() != b"off"


def client_dir(flag_file: Path) -> Path:
    return flag_file.with_name(flag_file.name + ".clients")


def read_state(flag_file: Path) -> KillState:
    engaged = flag_engaged(flag_file)
    clients: set[str] = set()
    d = client_dir(flag_file)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        names = []
    except OSError:
        return KillState(True, frozenset())  # cannot tell which clients: everything stops
    for name in names:
        if name.startswith(".") or not set(name) <= _CLIENT_ID_OK:
            continue
        if flag_engaged(d / name):
            clients.add(name)
    return KillState(engaged, frozenset(clients))


def write_flag(flag_file: Path, on: bool, client: str | None = None, reason: str = "") -> Path:
    """Set a flag (used by the CLI and the admin API). Written atomically, then fsync'd."""
    if client is not None:
        # A leading "." would be skipped by read_state (and ".." would name the parent directory).
        if not client or not set(client) <= _CLIENT_ID_OK or client.startswith("."):
            raise ValueError("client id must match [A-Za-z0-9_-][A-Za-z0-9._-]*")
        path = client_dir(flag_file) / client
    else:
        path = flag_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    body = ("on\n" + (f"reason: {reason}\n" if reason else "")) if on else "off\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself survives a crash: a lost flag would fail open
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KillSwitch:
    def __init__(
        self,
        flag_file: str | os.PathLike,
        scope: str = "all",
        retry_after_s: int = 30,
        *,
        refresh_s: float = 0.2,
        on_change: Callable[[KillState, KillState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: Any = None,
    ) -> None:
        # shared: flags in the state store (Redis) that replicas see; engaged if ANY source says so
        self.shared = shared
        self.flag_file = Path(flag_file)
        self.scope = scope
        self.retry_after_s = retry_after_s
        self._refresh_s = refresh_s
        self._clock = clock
        self._on_change = on_change
        self._checked = float("-inf")
        self._state = read_state(self.flag_file)

    @property
    def state(self) -> KillState:
        now = self._clock()
        if now - self._checked >= self._refresh_s:
            self._checked = now
            new = read_state(self.flag_file)
            if new != self._state:
                old, self._state = self._state, new
                if self._on_change is not None:
                    self._on_change(old, new)
        return self._state

    def refresh(self) -> KillState:
        """Read the flag file now (after this process wrote it: the answer must say what is)."""
        self._checked = float("-inf")
        return self.state

    def check(self, client_id: str | None, is_write: bool) -> Refusal | None:
        st = self.state
        shared = self.shared is not None and self.shared.engaged(client_id)
        if not (shared or st.engaged or (client_id is not None and client_id in st.clients)):
            return None
        if self.scope == "writes" and not is_write:
            return None
        which = "kill switch engaged" if st.engaged else "kill switch engaged for this client"
        return unavailable(which, self.retry_after_s)
