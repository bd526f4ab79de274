"""Test helper: a real FHIR R4 server, PyPI `sekmet-fhir` (FastAPI + SQLite), on 127.0.0.1.

    from tests.sekmet import sekmet_fixture  # noqa: F401  (registers the module-scoped `sekmet` fixture)

    def test_x(sekmet):
        sekmet.base_url                      # http://127.0.0.1:PORT/fhir  (base path /fhir)
        sekmet.traffic(correlation_id="…")   # what the server itself logged (headers included)

sekmet lives in its own virtualenv, `tests/.venvs/sekmet` (git-ignored), so its FastAPI/uvicorn
stack never mixes with the sidecar's dependencies. The first use creates it with
`python -m venv` + `pip install sekmet-fhir==…` from PyPI (SLOW: ~10–30 s, once per machine);
later uses only check a stamp file. `SEKMET_BIN=/path/to/sekmet` uses an existing install instead.

Each server gets its own settings file, SQLite database and data dir under a temp dir, listens on
a free loopback port, has its simulator off, and is stopped by PID afterwards. Proxy variables are
removed from its environment. Its built-in traffic log (SQLite table `traffic`: method, url,
request headers with only Authorization/Cookie redacted, status, correlation id taken from
`X-Request-Id` or else `X-Correlation-ID`) is the upstream's own witness of what reached it.

Missing tools never pass silently: under CI (`CI` set) `unavailable()` fails the test; locally it
skips with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import unavailable

__all__ = ["SEKMET_REQUIREMENT", "Sekmet", "ensure_sekmet", "sekmet_fixture", "start_sekmet", "unavailable"]

SEKMET_REQUIREMENT = "sekmet-fhir==0.1.1"
TESTS = Path(__file__).resolve().parent
VENVS = TESTS / ".venvs"
VENV = VENVS / "sekmet"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise installs between concurrent pytest processes (xdist workers, parallel runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_sekmet() -> str:
    """Path of the `sekmet` executable; creates `tests/.venvs/sekmet` on first use (slow, needs PyPI)."""
    override = os.environ.get("SEKMET_BIN")
    if override:
        if not os.access(override, os.X_OK):
            unavailable(f"SEKMET_BIN={override} is not executable")
        return override
    exe = VENV / "bin" / "sekmet"
    stamp = VENV / ".installed"
    wanted = hashlib.sha256(f"{SEKMET_REQUIREMENT}|{sys.version_info[:2]}".encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == wanted and os.access(exe, os.X_OK):
        return str(exe)
    with file_lock(VENVS / "sekmet.lock"):
        if stamp.is_file() and stamp.read_text().strip() == wanted and os.access(exe, os.X_OK):
            return str(exe)
        started = time.monotonic()
        env = _clean_env()
        steps = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
                 [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  SEKMET_REQUIREMENT]]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                unavailable(f"could not install {SEKMET_REQUIREMENT} into {VENV}: {exc!r}")
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
                unavailable(f"could not install {SEKMET_REQUIREMENT} into {VENV} "
                            f"(`{' '.join(cmd[-3:])}` exited {done.returncode}):\n{tail}")
        if not os.access(exe, os.X_OK):
            unavailable(f"{SEKMET_REQUIREMENT} installed but {exe} is missing")
        stamp.write_text(wanted + "\n")
        sys.stderr.write(f"\n[tests.sekmet] created {VENV} with {SEKMET_REQUIREMENT} "
                         f"in {time.monotonic() - started:.1f}s (first use only)\n")
        return str(exe)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in PROXY_VARS and not k.startswith(("SEKMET_", "VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(extra)
    return env


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)  # never through a proxy
    try:
        conn.request("GET", path, headers={"Accept": "application/fhir+json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Sekmet:
    base_url: str
    port: int
    db_path: Path
    log_path: Path
    _proc: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def traffic(self, correlation_id: str | None = None, *, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Inbound requests from sekmet's own traffic log, oldest first.

        Keys: id, ts, method, url (path + query as received), status, correlation_id,
        req_headers (dict, lower-case names as received). The log row is written just after
        the response is sent, so pass `wait_s` to wait for an expected row.
        """
        deadline = time.monotonic() + wait_s
        while True:
            rows = self._traffic(correlation_id)
            if rows or time.monotonic() >= deadline:
                return rows
            time.sleep(0.02)

    def _traffic(self, correlation_id: str | None) -> list[dict[str, Any]]:
        sql = ("SELECT id, ts, method, url, status, correlation_id, req_headers FROM traffic "
               "WHERE direction = 'inbound'")
        args: list[Any] = []
        if correlation_id is not None:
            sql += " AND correlation_id = ?"
            args.append(correlation_id)
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
        finally:
            conn.close()
        out = []
        for row in rows:
            rec = dict(row)
            rec["req_headers"] = {k.lower(): v for k, v in json.loads(rec["req_headers"] or "{}").items()}
            out.append(rec)
        return out

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)


def start_sekmet(tmp: Path, timeout: float = 60.0) -> Sekmet:
    exe = ensure_sekmet()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = tmp / "settings.yaml"
    # JSON is YAML: no yaml import needed here
    settings.write_text(json.dumps({
        "data_dir": str(tmp / "data"),
        "own_private_key_path": str(tmp / "keys" / "sekmet_private.pem"),
        "simulator": {"enabled": False},
        "log_inbound": True,
    }))
    db = tmp / "sekmet.db"
    log_path = tmp / "sekmet.log"
    env = _clean_env(SEKMET_CONFIG=str(settings), SEKMET_BASE_URL=base_url, SEKMET_DB=str(db))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=str(tmp), env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = Sekmet(base_url=base_url, port=port, db_path=db, log_path=log_path, _proc=proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running:
            raise RuntimeError(f"sekmet exited with {proc.returncode} before it was ready:\n{server.log_tail()}")
        try:
            status, body = _get(port, "/fhir/metadata")
            if status == 200 and b'"CapabilityStatement"' in body:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"sekmet did not answer /fhir/metadata within {timeout:.0f}s:\n{server.log_tail()}")


@pytest.fixture(scope="module", name="sekmet")
def sekmet_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = start_sekmet(tmp_path_factory.mktemp("sekmet"))
    try:
        yield server
    finally:
        server.stop()

