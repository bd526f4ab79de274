"""HTTP/1.1 transport of the sandbox EHR: connection handling, body framing, dispatch.

FHIR requests go under the base path, the (unlogged) control plane under /_sandbox/.
"""

from __future__ import annotations

import json
import select
import socket
import socketserver
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .engine import FhirResponse
from .parse import FhirRequest, fhir_segments, parse_http, split_target
from .store import FhirError, outcome

if TYPE_CHECKING:
    from .server import SandboxServer

CONTROL_PREFIX = "/_sandbox"
MAX_BODY = 16 * 1024 * 1024
FHIR_JSON = "application/fhir+json; charset=utf-8"


class Framing(Exception):
    """The request body could not be delimited; the connection must be closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sandbox: SandboxServer,
                 ssl_context: ssl.SSLContext | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sandbox = sandbox
        self.ssl_context = ssl_context
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls getfqdn(), i.e. DNS; we only talk to localhost.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        if self.ssl_context is not None:
            try:  # handshake in the worker thread so a slow client cannot block accept()
                request.settimeout(10)
                conn = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        with self._conns_lock:
            self._conns.add(conn)
        try:
            _Handler(conn, client_address, self)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            if conn is not request:
                conn.close()

    def close_connections(self) -> None:
        # Shut down (not close) from this thread: wakes handlers blocked in recv.
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "SandboxEHR/0.1"
    timeout = 120  # idle keep-alive connections are eventually closed
    disable_nagle_algorithm = True  # avoid 40 ms delayed-ACK stalls on keep-alive
    wbufsize = -1  # buffered writes; _send flushes once per response
    server: SandboxHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the request log is the record; keep stderr quiet

    def handle_one_request(self) -> None:
        # Like the stdlib version, but every method goes to _dispatch (no 501 for
        # unknown verbs) so the witness sees and logs them too.
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.request_version == "HTTP/0.9":
                self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
                return
            self._dispatch()
            self.wfile.flush()
        except (TimeoutError, ConnectionError, ssl.SSLError):
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        body = json.dumps(outcome(message or HTTPStatus(code).phrase, "structure")).encode()
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # always answer with a status line and headers
        self._send(code, body, FHIR_JSON, {})

    # -- plumbing --------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str | None,
              headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if content_type and body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()  # buffered (wbufsize), so head and body leave in one write
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_fhir(self, res: FhirResponse, extra: dict[str, str] | None = None) -> None:
        headers = dict(extra or {})
        if res.version is not None:
            headers["ETag"] = res.version.etag
            headers["Last-Modified"] = res.version.last_modified
        if res.location:
            headers["Location"] = res.location
        body = b"" if res.body is None else json.dumps(res.body).encode()
        self._send(res.status, body, FHIR_JSON, headers)

    def _header_dict(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return merged

    def _read_body(self) -> bytes:
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if encodings and lengths:
            raise Framing(400, "both Transfer-Encoding and Content-Length")
        if encodings:
            if [e.strip().lower() for e in ",".join(encodings).split(",")] != ["chunked"]:
                raise Framing(501, f"unsupported Transfer-Encoding {encodings!r}")
            return self._read_chunked()
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise Framing(400, f"invalid Content-Length {lengths!r}")
        size = int(lengths[0])
        if size > MAX_BODY:
            raise Framing(413, "body too large")
        body = self.rfile.read(size)
        if len(body) != size:
            raise Framing(400, "body shorter than Content-Length")
        return body

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026).split(b";", 1)[0].strip()
            if not line or any(c not in b"0123456789abcdefABCDEF" for c in line):
                raise Framing(400, "malformed chunk size")
            size = int(line, 16)
            total += size
            if total > MAX_BODY:
                raise Framing(413, "body too large")
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are ignored
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            if self.rfile.read(2) != b"\r\n":
                raise Framing(400, "malformed chunk")

    # -- dispatch --------------------------------------------------------------
    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        path, query = split_target(self.path)
        headers = self._header_dict()
        framing_error: Framing | None = None
        try:
            body = self._read_body()
        except Framing as exc:
            self.close_connection = True
            body, framing_error = b"", exc
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            if framing_error is not None:
                self._send_json(framing_error.status, {"error": str(framing_error)})
            else:
                self._control(path, body)
            return
        method, override, fhir_query = sandbox.effective_method(self.command, headers, query, body)
        if framing_error is not None:
            req = FhirRequest(method, "error",
                              error=FhirError(framing_error.status, str(framing_error),
                                              "structure"))
        else:
            try:
                segs = fhir_segments(path, sandbox.base_path)
            except FhirError as exc:
                req = FhirRequest(method, "error", error=exc)
            else:
                req = parse_http(method, segs, fhir_query, headers, body, sandbox.base_url)
        entry, decision = sandbox._admit(self.command, path, query, headers, body, req,
                                         effective_method=method, override=override)
        if decision.kind == "hang":
            self._hang()
            return
        if decision.kind is not None:
            sandbox._stopping.wait(decision.delay_s)  # stop() cuts delays short
            extra = {"Retry-After": decision.retry_after} if decision.retry_after else {}
            code = "throttled" if decision.kind == "rate_limit" else "transient"
            res = FhirResponse(decision.status,
                               outcome(f"sandbox fault injection ({decision.kind})", code))
            sandbox._finish(entry, res.status)
            self._send_fhir(res, extra)
            return
        res = sandbox._execute(req)
        sandbox._finish(entry, res.status)
        sandbox._stopping.wait(decision.delay_s)  # stop() cuts delays short
        self._send_fhir(res)

    def _hang(self) -> None:
        """Hold the connection without answering until the peer or the server goes away, or
        the faults change (then the connection is closed unanswered)."""
        self.close_connection = True
        stopping = self.server.sandbox._stopping
        epoch = self.server.sandbox._hang_epoch  # changing the faults releases held requests
        sock = self.connection
        while not stopping.is_set() and self.server.sandbox._hang_epoch == epoch:
            try:
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable and not sock.recv(65536):
                    return  # peer closed
            except ssl.SSLWantReadError:
                continue
            except (OSError, ValueError):
                return

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", {})

    def _control(self, path: str, body: bytes) -> None:
        sandbox, method = self.server.sandbox, self.command
        name = path[len(CONTROL_PREFIX):].strip("/")
        if (name, method) == ("log", "GET"):
            self._send_json(200, sandbox.request_log())
        elif (name, method) == ("log", "DELETE"):
            sandbox.clear_log()
            self._send_json(200, {"cleared": "log"})
        elif name == "faults" and method in ("GET", "POST", "DELETE"):
            try:
                if method == "POST":
                    raw = json.loads(body or b"{}")
                    if not isinstance(raw, dict):
                        raise ValueError("faults must be a JSON object")
                    sandbox.set_faults(**raw)
                elif method == "DELETE":
                    sandbox.set_faults()
            except ValueError as exc:
                self._send_json(400, {"error": str(exc)})
                return
            self._send_json(200, sandbox.faults())
        elif (name, method) == ("reset", "POST"):
            sandbox.reset()
            self._send_json(200, {"cleared": "store, log, faults"})
        elif name == "profile" and method in ("GET", "POST"):
            if method == "POST":  # {"profile": "oracle"} or {"profile": {...}}: switch and reset
                try:
                    raw = json.loads(body or b"{}")
                    if not isinstance(raw, dict) or set(raw) - {"profile"}:
                        raise ValueError('body must be {"profile": NAME or MAPPING}')
                    sandbox.set_profile(raw.get("profile"))
                except (ValueError, TypeError) as exc:
                    self._send_json(400, {"error": str(exc)})
                    return
            self._send_json(200, sandbox.profile_info())
        elif (name, method) == ("health", "GET"):
            self._send_json(200, {"status": "ok", "base_url": sandbox.base_url})
        else:
            self._send_json(404, {"error": f"no control endpoint {method} {path}"})
