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
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from .engine import Engine, FhirResponse
from .faults import Decision, Faults
from .parse import FhirRequest
from .profiles import Profile, resolve_profile
from .store import Store
from .transport import SandboxHTTPServer

LOG_LIMIT = 100_000  # oldest entries are dropped beyond this; seq keeps counting


class SandboxServer:
    """An in-memory FHIR R4 server used as the upstream EHR in demos and tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, base_path: str = "/fhir/R4",
                 tls_cert: str | None = None, tls_key: str | None = None,
                 profile: str | Mapping[str, Any] | Profile | None = None) -> None:
        """``profile``: an EHR behaviour profile by name (``"oracle"``; several joined by
        commas), a mapping (``{"extends": "oracle", "concurrent_writer": True}``) or a
        Profile; see ``profiles.py``. None is the plain ``default``."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        self.profile = resolve_profile(profile)
        self._host, self._port = host, port
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self._tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self._lock = threading.RLock()  # guards store, log and faults
        self._store = Store(strong_etags=self.profile.strong_etags)
        self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_LIMIT)
        self._seq = 0
        self._faults = self.profile.initial_faults()
        self._hang_epoch = 0  # bumped when faults change: requests held by `hang` are released
        self._window: collections.deque[float] = collections.deque()  # rate limit (profile)
        self._fhir_count = 0  # FHIR requests admitted, for periodic bursts (profile)
        self._stopping = threading.Event()
        self._httpd: SandboxHTTPServer | None = None
        self._bound_port: int | None = None  # kept after stop() so base_url stays meaningful
        self._thread: threading.Thread | None = None
        self._engine = Engine(self._store, self.base_url, self.profile)
        self._seed()

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
        effective_method (what the sandbox executed as: ``method`` unless a profile honours
        method overrides), override (the header or ``_method`` honoured, else None),
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
            self._hang_epoch += 1

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.as_dict()

    def profile_info(self) -> dict[str, Any]:
        return self.profile.as_dict()

    def set_profile(self, profile: str | Mapping[str, Any] | Profile | None) -> None:
        """Switch to another profile and reset (store, log, faults) as if started with it."""
        resolved = resolve_profile(profile)  # raises ValueError before anything changes
        with self._lock:
            self.profile = resolved
            self._store.strong_etags = resolved.strong_etags
            self._engine.profile = resolved
            self.reset()

    def reset(self) -> None:
        """Back to the start: empty log, the profile's seed resources and initial faults."""
        with self._lock:
            self._store.clear()
            self._log.clear()
            self._faults = self.profile.initial_faults()
            self._hang_epoch += 1
            self._window.clear()
            self._fhir_count = 0
            self._seed()

    def _seed(self) -> None:
        with self._lock:
            for resource in self.profile.seed_resources():
                self._store.put(resource["resourceType"], resource["id"], resource)

    def effective_method(self, method: str, headers: dict[str, str], query: str,
                         body: bytes) -> tuple[str, str | None, str]:
        """(method to execute, override source or None, query without ``_method``).

        Only a profile with ``method_override`` honours anything, and only on POST, like the
        frameworks that implement these conventions. Headers win over ``_method``."""
        names = self.profile.method_override
        if method != "POST" or not names:
            return method, None, query
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = "&".join(p for p in query.split("&") if p.split("=", 1)[0] != "_method") if query else query
        candidates: list[tuple[str, str]] = []
        for name in ("x-http-method-override", "x-method-override"):
            if name in names and headers.get(name):
                candidates.append((name, headers[name].split(",")[0]))
        if "_method" in names:
            candidates += [("_method", v) for k, v in pairs if k == "_method"]
            if headers.get("content-type", "").split(";")[0].strip().lower() == \
                    "application/x-www-form-urlencoded":
                try:
                    form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
                except UnicodeDecodeError:
                    form = []
                candidates += [("_method", v) for k, v in form if k == "_method"]
        for source, value in candidates:
            wanted = value.strip().upper()
            if wanted in ("GET", "HEAD", "PUT", "PATCH", "DELETE", "POST"):
                return wanted, source, kept if source == "_method" else query
        return method, None, query

    def _profile_decision(self) -> Decision | None:
        """Rate limit, then periodic bursts (call under the lock, once per FHIR request)."""
        now = time.monotonic()
        rate = self.profile.rate_limit
        if rate is not None:
            while self._window and now - self._window[0] >= rate.window_s:
                self._window.popleft()
            if len(self._window) >= rate.requests:
                return Decision("rate_limit", 0.0, 429, rate.retry_after)
            self._window.append(now)
        bursts = self.profile.bursts
        if bursts is not None:
            self._fhir_count += 1
            if (self._fhir_count - 1) % bursts.every >= bursts.every - bursts.length:
                return Decision("burst", 0.0, bursts.status, bursts.retry_after)
        return None

    # -- request path (called by the handler) -----------------------------------------
    def _admit(self, method: str, path: str, query: str, headers: dict[str, str],
               body: bytes, req: FhirRequest, *, effective_method: str | None = None,
               override: str | None = None) -> tuple[dict[str, Any], Decision]:
        """Log the request and decide on faults, atomically."""
        with self._lock:
            self._seq += 1
            decision = self._profile_decision() or self._faults.take(effective_method or method)
            entry: dict[str, Any] = {
                "seq": self._seq,
                "ts": time.time(),
                "method": method,
                "effective_method": effective_method or method,
                "override": override,
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
