"""End-to-end harness: a sandbox EHR and a real sidecar on 127.0.0.1, free ports, stopped after.

`SidecarThread` runs the real `Sidecar` (embedded mitmproxy + admin listener) in a thread of
this process, so a test can also patch a pipeline stage; `SidecarProcess` runs the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from sidecar.config import parse_config
from sidecar.proxy import Sidecar

ROOT = Path(__file__).resolve().parent.parent
AUDIT_KEY = "test-audit-key-0123456789-abcdefghijklmnop"
WRITER_KEY, READER_KEY, OPS_KEY, SHADOW_KEY = "writer-key-1", "reader-key-1", "ops-key-1", "shadow-key-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def make_config(tmp: Path, upstream_url: str, **over: Any) -> dict[str, Any]:
    os.environ["FHIR_SIDECAR_AUDIT_KEY"] = AUDIT_KEY
    os.environ["FHIR_SIDECAR_ADMIN_TOKEN"] = "test-admin-token"
    cfg: dict[str, Any] = {
        "upstream": {"url": upstream_url, "timeout_s": 10},
        "listen": {"host": "127.0.0.1", "port": free_port(), "mode": "reverse"},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": "env:FHIR_SIDECAR_ADMIN_TOKEN"},
        "fhir": {"max_body_bytes": 64 * 1024},
        "clients": [
            {"id": "demo-writer", "auth": "api-key", "api_key_sha256": sha(WRITER_KEY), "tenant": "t1",
             "scopes": ["system/Observation.cruds", "system/Patient.rs", "system/Condition.cu"]},
            {"id": "demo-reader", "auth": "api-key", "api_key_sha256": sha(READER_KEY),
             "scopes": ["system/*.rs"]},
            {"id": "scribe-app", "auth": "api-key", "api_key_sha256": sha(OPS_KEY),
             "scopes": ["system/Observation.cruds"], "operations": ["$meta-add"], "conditional_writes": True},
            # not in the policy's data: the policy denies it, shadow mode only reports that
            {"id": "shadow-app", "auth": "api-key", "api_key_sha256": sha(SHADOW_KEY), "enforce": False,
             "scopes": ["system/Observation.c"]},
        ],
        "policy": {"engine": "embedded", "dir": str(ROOT / "policies"), "path": "fhir/writeback"},
        "killswitch": {"file": str(tmp / "killswitch"), "scope": "all", "retry_after_s": 7},
        "audit": {"path": str(tmp / "audit.jsonl"), "key": "env:FHIR_SIDECAR_AUDIT_KEY"},
        "state": {"store": f"sqlite:{tmp / 'state.db'}"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def wait_ready(admin_port: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, _ = request(admin_port, "GET", "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("sidecar did not become ready")


class SidecarThread:
    def __init__(self, cfg: dict[str, Any], tmp: Path, fsync: Any = None) -> None:
        self.cfg_dict = cfg
        self.cfg = parse_config(cfg)
        self.sidecar = Sidecar(self.cfg, None, base_dir=tmp, install_signals=False, fsync=fsync)
        self.port = self.cfg.listen.port
        self.admin_port = self.cfg.admin.port
        self.audit_path = Path(cfg["audit"]["path"])
        self.killswitch_file = Path(cfg["killswitch"]["file"])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.sidecar.run())
        except BaseException as e:  # surfaced by start()
            self.error = e
        finally:
            loop.close()

    def start(self) -> "SidecarThread":
        self._thread.start()
        try:
            wait_ready(self.admin_port)
        except TimeoutError:
            raise RuntimeError(f"sidecar failed to start: {self.error!r}") from self.error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.sidecar.drain(), self._loop)
            self._thread.join(timeout=20)

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip().startswith("{")]


class SidecarProcess:
    """`fhir-sidecar run --config FILE` as a child process (signals, CLI, stdout)."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, args: tuple[str, ...] = ()) -> None:
        self.cfg_path = tmp / "sidecar.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.port = cfg["listen"]["port"]
        self.admin_port = cfg["admin"]["port"]
        self.stdout_path = tmp / "sidecar.stdout"
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "--config", str(self.cfg_path), *args],
                                     stdout=self._out, stderr=subprocess.STDOUT, cwd=str(tmp))

    def start(self) -> "SidecarProcess":
        try:
            wait_ready(self.admin_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("sidecar process failed to start:\n" + self.stdout_path.read_text()[-3000:])
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def request(port: int, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def raw_exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes (odd targets, duplicate headers) and parse the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def unavailable(reason: str) -> NoReturn:
    """A tool or data these tests need is missing: fail under CI, skip (with the reason) elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: a missing tool is a failure, never a silent skip)", pytrace=False)
    pytest.skip(reason)
