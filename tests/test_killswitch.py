"""The kill switch: flag files, per-client flags, scope, refresh and change notification.

Files live in tmp_path; time is a fake clock. Tests may run as root, so "unreadable" is
simulated with a directory at the flag path or a failing `open`, never with chmod.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from sidecar import killswitch as ks
from sidecar.killswitch import KillState, KillSwitch, client_dir, flag_engaged, read_state, write_flag


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


@pytest.fixture
def flag(tmp_path: Path) -> Path:
    return tmp_path / "run" / "killswitch"


def make(path: Path, content: bytes | None) -> None:
    if content is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


# --------------------------------------------------------------------------------------------
# The flag file: absent = off; present = on unless it reads "off"; unreadable = on
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("content", "engaged"),
    [
        (None, False),                       # absent
        (b"", True),                         # present, empty
        (b"on\n", True),
        (b"off", False),
        (b"off\n", False),
        (b"OFF\r\n", False),
        (b"  off  \nreason: done\n", False),
        (b"off please", True),               # anything but exactly "off" engages
        (b"of", True),
        (b"0", True),
        (b"false", True),
        (b"on\noff\n", True),                # only the first line counts
        (b"\noff\n", True),
        (b"\xff\xfe", True),
    ],
)
def test_flag_file(flag: Path, content: bytes | None, engaged: bool) -> None:
    make(flag, content)
    assert flag_engaged(flag) is engaged
    assert read_state(flag) == KillState(engaged, frozenset())


def test_directory_at_flag_path_is_unreadable_so_engaged(flag: Path) -> None:
    flag.mkdir(parents=True)
    assert flag_engaged(flag) is True


def test_dangling_symlink_is_engaged(flag: Path) -> None:
    flag.parent.mkdir(parents=True)
    flag.symlink_to(flag.parent / "missing")
    assert flag_engaged(flag) is True


def test_open_failing_is_engaged(flag: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(flag, b"off\n")
    real_open = builtins.open

    def failing_open(file, *a, **kw):
        if Path(file) == flag:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", failing_open)
    assert flag_engaged(flag) is True


def test_unlistable_client_dir_engages_everything(flag: Path) -> None:
    make(client_dir(flag), b"not a directory")
    assert read_state(flag) == KillState(True, frozenset())


# --------------------------------------------------------------------------------------------
# Per-client flags
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("files", "clients"),
    [
        ({}, set()),
        ({"lab-feed": b""}, {"lab-feed"}),
        ({"lab-feed": b"on\n", "scribe": b"off\n"}, {"lab-feed"}),
        ({"a.b_c-1": b"on"}, {"a.b_c-1"}),
        ({".lab-feed.tmp": b"on"}, set()),       # a write in progress is not a flag
        ({"bad name": b"on"}, set()),            # not a client id
    ],
)
def test_per_client_flags(flag: Path, files: dict[str, bytes], clients: set[str]) -> None:
    d = client_dir(flag)
    d.mkdir(parents=True)
    for name, content in files.items():
        (d / name).write_bytes(content)
    assert read_state(flag) == KillState(False, frozenset(clients))


def test_per_client_flag_directory_is_engaged(flag: Path) -> None:
    (client_dir(flag) / "lab-feed").mkdir(parents=True)
    assert read_state(flag).clients == {"lab-feed"}


# (global engaged, client flags, scope, client, is_write) -> refused?
CHECKS = [
    (False, set(), "all", "lab-feed", True, False),
    (True, set(), "all", "lab-feed", True, True),
    (True, set(), "all", "lab-feed", False, True),
    (True, set(), "all", None, False, True),            # anonymous reads stop too
    (True, set(), "writes", "lab-feed", False, False),  # scope writes: reads go through
    (True, set(), "writes", "lab-feed", True, True),
    (False, {"lab-feed"}, "all", "lab-feed", True, True),
    (False, {"lab-feed"}, "all", "lab-feed", False, True),
    (False, {"lab-feed"}, "all", "scribe", True, False),
    (False, {"lab-feed"}, "all", None, True, False),
    (False, {"lab-feed"}, "writes", "lab-feed", False, False),
    (False, {"lab-feed"}, "writes", "lab-feed", True, True),
]


@pytest.mark.parametrize(("engaged", "clients", "scope", "client", "is_write", "refused"), CHECKS)
def test_check(flag: Path, engaged: bool, clients: set[str], scope: str, client: str | None, is_write: bool,
               refused: bool) -> None:
    if engaged:
        write_flag(flag, True, reason="incident")
    for c in clients:
        write_flag(flag, True, client=c)
    sw = KillSwitch(flag, scope, retry_after_s=42)
    r = sw.check(client, is_write)
    if not refused:
        assert r is None
        return
    assert r is not None
    assert (r.status, r.code, r.headers) == (503, "transient", (("Retry-After", "42"),))
    assert "kill switch" in r.reason
    assert r.reason == ("kill switch engaged" if engaged else "kill switch engaged for this client")


# --------------------------------------------------------------------------------------------
# Refresh: a change is seen within the refresh interval, and reported once
# --------------------------------------------------------------------------------------------

def test_change_noticed_within_refresh_interval(flag: Path) -> None:
    clock = Clock()
    sw = KillSwitch(flag, refresh_s=1.0, clock=clock)
    assert sw.check("app", True) is None
    write_flag(flag, True)
    clock.advance(0.5)
    assert sw.check("app", True) is None          # cached: not yet re-read
    clock.advance(0.5)
    assert sw.check("app", True) is not None      # refresh interval passed: seen
    write_flag(flag, False)
    clock.advance(0.99)
    assert sw.check("app", True) is not None
    clock.advance(0.01)
    assert sw.check("app", True) is None


def test_first_check_reads_the_file(flag: Path) -> None:
    clock = Clock()
    sw = KillSwitch(flag, refresh_s=1.0, clock=clock)
    write_flag(flag, True)  # between construction and the first request
    assert sw.check("app", False) is not None


def test_on_change_called_once_per_change(flag: Path) -> None:
    clock = Clock()
    changes: list[tuple[KillState, KillState]] = []
    sw = KillSwitch(flag, refresh_s=0.2, clock=clock, on_change=lambda old, new: changes.append((old, new)))
    off, on = KillState(False, frozenset()), KillState(True, frozenset())
    for _ in range(5):
        clock.advance(1)
        sw.state
    assert changes == []
    write_flag(flag, True)
    for _ in range(5):
        clock.advance(1)
        sw.state
    assert changes == [(off, on)]
    write_flag(flag, True, client="lab-feed")
    for _ in range(3):
        clock.advance(1)
        sw.state
    with_client = KillState(True, frozenset({"lab-feed"}))
    assert changes == [(off, on), (on, with_client)]
    write_flag(flag, True, reason="same state, new reason")  # content differs, state does not
    clock.advance(1)
    sw.state
    assert len(changes) == 2
    flag.unlink()
    write_flag(flag, False, client="lab-feed")
    clock.advance(1)
    sw.state
    clock.advance(1)
    sw.state
    assert changes[2:] == [(with_client, off)]


def test_no_callback_within_interval(flag: Path) -> None:
    clock = Clock()
    changes: list = []
    sw = KillSwitch(flag, refresh_s=1.0, clock=clock, on_change=lambda o, n: changes.append(n))
    sw.state
    write_flag(flag, True)
    clock.advance(0.3)
    sw.state
    assert changes == []


# --------------------------------------------------------------------------------------------
# write_flag: atomic, fsync'd, client ids checked
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("on", "reason", "content", "engaged"),
    [
        (True, "", "on\n", True),
        (True, "incident 42", "on\nreason: incident 42\n", True),
        (False, "", "off\n", False),
        (False, "ignored", "off\n", False),
    ],
)
def test_write_flag_content(flag: Path, on: bool, reason: str, content: str, engaged: bool) -> None:
    path = write_flag(flag, on, reason=reason)
    assert path == flag and flag.read_text() == content and flag_engaged(flag) is engaged


def test_write_flag_per_client_path(flag: Path) -> None:
    path = write_flag(flag, True, client="lab-feed")
    assert path == client_dir(flag) / "lab-feed"
    assert read_state(flag) == KillState(False, frozenset({"lab-feed"}))


@pytest.mark.parametrize("client", ["", "..", ".", ".hidden", "a/b", "../killswitch", "a b", "é", "a\n"])
def test_write_flag_refuses_bad_client_ids(flag: Path, client: str) -> None:
    with pytest.raises(ValueError):
        write_flag(flag, True, client=client)
    assert not flag.exists()


def test_write_flag_is_atomic(flag: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag path only ever holds a complete old or new file: written aside, fsync'd, renamed."""
    write_flag(flag, False)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        assert flag.read_text() == "off\n"           # old content intact until the rename
        assert Path(src).read_text() == "on\n"        # new content complete before it
        assert Path(src).parent == Path(dst).parent   # same directory: rename is atomic
        real_replace(src, dst)

    monkeypatch.setattr(ks.os, "fsync", fsync)
    monkeypatch.setattr(ks.os, "replace", replace)
    write_flag(flag, True)
    assert events[:2] == ["fsync", "replace"]
    assert "fsync" in events[2:]  # the directory too: the rename survives a crash
    assert flag.read_text() == "on\n"
    assert sorted(p.name for p in flag.parent.iterdir()) == ["killswitch"]


def test_write_flag_failure_leaves_old_state(flag: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_flag(flag, True)

    def replace(src, dst) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ks.os, "replace", replace)
    with pytest.raises(OSError):
        write_flag(flag, False)
    assert flag.read_text() == "on\n" and flag_engaged(flag)
    assert read_state(flag).engaged  # the leftover temp file is not read as a client flag
