"""The sandbox EHR's public face: SandboxServer (lifecycle, witness log, faults).

Every non-control request is logged, before execution, with the exact bytes
received, so tests can prove what reached the upstream.
"""

from __future__ import annotations

import base64
import collections
import copy
import ssl
import threading
import time
from typing import Any

from .engine import Engine, FhirResponse
from .faults import Decision, Faults
from .parse import FhirRequest
from .store import Store
from .transport import SandboxHTTPServer

LOG_LIMIT = 100_000  # oldest entries are dropped beyond this; seq keeps counting


class SandboxServer:
    """An in-memory FHIR R4 server used as the upstream EHR in demos and tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, base_path: str = "/fhir/R4",
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        self._host, self._port = host, port
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._lock = threading.RLock()  # guards store, log and faults
        self._store = Store()
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_LIMIT)
        self._seq = 0
        self._faults = Faults()
        self._stopping = threading.Event()
        self._httpd: SandboxHTTPServer | None = None
        self._bound_port: int | None = None  # kept after stop() so base_url stays meaningful
        self._thread: threading.Thread | None = None
        self._engine = Engine(self._store, self.base_url)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError("sandbox already started")
        context = None
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._tls[0], self._tls[1])
        self._stopping.clear()
        self._httpd = SandboxHTTPServer((self._host, self._port), self, context)
        self._bound_port = int(self._httpd.server_address[1])
        self._engine.base_url = self.base_url  # port is known only after binding
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.02},
                                        name=f"sandbox-ehr:{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # releases hanging handlers
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}{self.base_path}"

    # -- witness and control -------------------------------------------------------
    def request_log(self) -> list[dict[str, Any]]:
        """Copies of the log entries, oldest first.

        Keys: seq, ts (epoch seconds), method, path (raw, no query), query (raw),
        headers (lower-cased; repeats joined with ", "), body_b64 (exact received
        bytes, de-chunked), correlation_id (x-correlation-id or None), action (what
        the sandbox executed, or "fault:<kind>"; "error" = rejected before execution),
        classified (the parser's action even when faulted), route (action judged from
        method + path alone), fault (None, "delay", "hang", "burst", "status"),
        status (response status, None until answered) and, for transaction/batch,
        entries: [{method, url, action}].
        """
        with self._lock:
            return copy.deepcopy(list(self._log))

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def set_faults(self, **faults: Any) -> None:
        """Replace the fault configuration (no arguments clears it); see faults.py."""
        parsed = Faults.from_mapping(faults)
        with self._lock:
            self._faults = parsed

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.as_dict()

    def reset(self) -> None:
        with self._lock:
            self._store.clear()
            self._log.clear()
            self._faults = Faults()

    # -- request path (called by the handler) -----------------------------------------
    def _admit(self, method: str, path: str, query: str, headers: dict[str, str],
               body: bytes, req: FhirRequest) -> tuple[dict[str, Any], Decision]:
        """Log the request and decide on faults, atomically."""
        with self._lock:
            self._seq += 1
            decision = self._faults.take(method)
            entry: dict[str, Any] = {
                "seq": self._seq,
                "ts": time.time(),
                "method": method,
                "path": path,
                "query": query,
                "headers": headers,
                "body_b64": base64.b64encode(body).decode("ascii"),
                "correlation_id": headers.get("x-correlation-id"),
                "action": f"fault:{decision.kind}" if decision.kind else req.action,
                "route": req.route,
                "classified": req.action,
                "fault": decision.kind or ("delay" if decision.delay_s else None),
                "status": None,
            }
            if req.route in ("transaction", "batch"):
                entry["entries"] = [{"method": e.method, "url": e.url, "action": e.action}
                                    for e in req.entries]
            self._log.append(entry)
            return entry, decision

    def _execute(self, req: FhirRequest) -> FhirResponse:
        with self._lock:
            return self._engine.execute(req)

    def _finish(self, entry: dict[str, Any], status: int) -> None:
        with self._lock:
            entry["status"] = status
