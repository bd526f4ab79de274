"""A test-only OPA Data API server: the real OPA engine (Go, v1.20 via `opa_bindings`) behind
`POST /v1/data/{path}` on 127.0.0.1, so `engine: opa` (OpaPolicy) is tested against OPA itself.

Only what the sidecar uses is served: `POST /v1/data/<path>` (`{"input": ...}` -> `{"result": ...}`,
or `{}` when undefined, as OPA answers), `GET /v1/policies` (id + raw), `GET /health`.
Fault knobs for tests: `delay_s` (answer late), `status` (answer with this HTTP status).

The bindings are an individual's package installed on its own, for tests only:
    pip install --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
`go_engine_unavailable()` says why they cannot be used here (None when they can).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sidecar.policy.embedded import read_policy_dir

INSTALL = "pip install --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4"


def go_engine_unavailable() -> str | None:
    """None if the Go OPA engine loads and evaluates; else the reason, for an explicit skip."""
    try:
        import opa_bindings
    except Exception as e:  # ImportError, or the shared library failing to load
        return f"Go OPA bindings (opa-golib-python-bindings) cannot be imported: {e!r}; install with `{INSTALL}`"
    try:
        engine = opa_bindings.OpaEngine()
        engine.add_policy("probe.rego", "package probe\n\nimport rego.v1\n\nx := 1\n")
        if engine.eval_document("probe.x") != 1:
            return "Go OPA bindings load but evaluate wrongly"
        engine.close()
    except Exception as e:
        return f"Go OPA bindings cannot evaluate here: {e!r}"
    return None


def go_engine(directory: Path, *, include_tests: bool = True) -> Any:
    """An OpaEngine holding every module (tests too, like `opa run policies/`) and the data."""
    import opa_bindings

    files = read_policy_dir(directory, include_tests=include_tests)
    engine = opa_bindings.OpaEngine()
    for name, src in files.modules.items():
        engine.add_policy(name, src)
    engine.add_data(files.data)
    return engine, files


class OpaDataServer:
    def __init__(self, directory: Path) -> None:
        self.engine, self.files = go_engine(directory)
        self.delay_s = 0.0
        self.status: int | None = None
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/health":
                    self._answer(200, {})
                elif path == "/v1/policies":
                    self._answer(200, {"result": [{"id": k, "raw": v} for k, v in sorted(server.files.modules.items())]})
                else:
                    self._answer(404, {"code": "resource_not_found", "message": path})

            def do_POST(self) -> None:
                server.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                if server.delay_s:
                    time.sleep(server.delay_s)
                if server.status is not None:
                    self._answer(server.status, {"code": "internal_error", "message": "fault injected"})
                    return
                path = self.path.split("?", 1)[0]
                if not path.startswith("/v1/data/"):
                    self._answer(404, {"code": "resource_not_found", "message": path})
                    return
                try:
                    doc = json.loads(raw or b"{}")
                except ValueError:
                    self._answer(400, {"code": "invalid_parameter", "message": "body is not JSON"})
                    return
                ref = path[len("/v1/data/"):].strip("/").replace("/", ".")
                try:
                    with server._lock:
                        value = server.engine.eval_document(ref, doc.get("input"))
                except Exception as e:
                    if type(e).__name__ == "OpaUndefinedError":
                        self._answer(200, {})  # OPA: an undefined document has no "result"
                    else:
                        self._answer(500, {"code": "internal_error", "message": str(e)[:500]})
                    return
                self._answer(200, {"result": value})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> OpaDataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        try:
            self.engine.close()
        except Exception:
            pass
