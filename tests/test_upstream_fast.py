"""FastUpstreamClient (asyncio + h11): outcomes, keep-alive pool, TLS and pins, and parity with UpstreamClient.

Everything runs against servers on 127.0.0.1 started here: a threaded keep-alive HTTP/1.1 server
(http.server, optionally TLS, counting connections and recording what it received), a raw socket
server for misbehaviour (accept and hang, close mid-answer, record every byte after the TLS
handshake), and the sandbox EHR for the parity scenarios.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.sandbox import SandboxServer
from sidecar.upstream import (
    MAX_RESPONSE_BYTES,
    Answer,
    NotSent,
    OutcomeUnknown,
    UpstreamClient,
    spki_sha256,
)
from sidecar.upstream_fast import FastUpstreamClient
from tests.tlsutil import make_pki

pytestmark = pytest.mark.timeout(60)

# -- servers ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _EchoHTTPServer

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self, status: int, data: bytes, ctype: str = "application/json", extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _any(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        raw_headers = [(k, v) for k, v in self.headers.raw_items()]
        self.server.record(self.command, self.path, raw_headers, body)
        route = self.path.split("?")[0]
        if route == "/echo":
            self._body(200, json.dumps({"method": self.command, "path": self.path, "headers": raw_headers,
                                        "body": body.decode("latin-1")}).encode())
        elif route.startswith("/status/"):
            status = int(route.rsplit("/", 1)[1])
            self._body(status, b"" if status in (204, 304) else b'{"status": "as asked"}')
        elif route == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif route == "/close":  # Connection: close with a Content-Length
            self._body(200, b"bye", "text/plain", [("Connection", "close")])
        elif route == "/close-delimited":  # no length at all: the body ends with the connection
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
        elif route == "/silent-close":  # a keep-alive answer, then the server drops the connection anyway
            self._body(200, b"ok", "text/plain")
            self.close_connection = True
        elif route == "/hop":
            self._body(200, b"hop", "text/plain", [("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"),
                                                   ("Proxy-Connection", "keep-alive"), ("X-Keep", "1"),
                                                   ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        elif route == "/trailing":  # a correct answer followed by bytes nobody asked for
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"okHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")
        elif route == "/big-cl":
            self.send_response(200)
            self.send_header("Content-Length", str(MAX_RESPONSE_BYTES + 1))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
            self.close_connection = True
        elif route == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * (1 << 20)
            try:
                for _ in range(MAX_RESPONSE_BYTES // len(chunk) + 2):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            self.close_connection = True
        elif route == "/midclose":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.wfile.flush()
            self.close_connection = True
        elif route == "/headers-8bit":
            self.send_response(200)
            self.send_header("X-Latin1", "caf\xe9")  # one byte 0xE9
            self.send_header("X-Utf8", "\xe2\x82\xac")  # the UTF-8 bytes of the euro sign
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "/headers-utf8":
            self.send_response(200)
            self.send_header("X-Utf8", "\xe2\x82\xac")  # the UTF-8 bytes of the euro sign, alone
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "/slow":
            time.sleep(0.3)
            self._body(200, b"slow")
        else:
            self._body(404, b"{}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any


class _EchoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ctx = ctx
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = []

    def record(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> None:
        with self.lock:
            self.requests.append((method, path, headers, body))

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        if self.ctx is not None:
            try:
                request.settimeout(10)
                request = self.ctx.wrap_socket(request, server_side=True)
            except OSError:
                return
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            if self.ctx is not None:
                request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class EchoServer:
    def __init__(self, ctx: ssl.SSLContext | None = None) -> None:
        self.httpd = _EchoHTTPServer(ctx)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if ctx else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def connections(self) -> int:
        return self.httpd.connections

    @property
    def requests(self) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
        return self.httpd.requests

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RawServer:
    """Accepts connections (optionally TLS) and hands each to `behaviour(sock, record)`."""

    def __init__(self, behaviour: Callable[[Any, Callable[[str, int], None], threading.Event], None],
                 ctx: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.ctx, self.behaviour = ctx, behaviour
        self.events: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def record(self, what: str, n: int = 0) -> None:
        self.events.append((what, n))

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.record("connect")
        try:
            conn.settimeout(10)
            if self.ctx is not None:
                try:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    self.record("handshake-failed")
                    return
                self.record("handshake-done")
            self.behaviour(conn, self.record, self.stopping)
        except OSError:
            pass
        finally:
            conn.close()

    def wait_for(self, what: str, timeout: float = 5.0) -> list[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e[0] == what]
            if found:
                return found
            time.sleep(0.01)
        raise AssertionError(f"server never saw {what!r}: {self.events}")

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()


def read_all(conn: Any, record: Callable[[str, int], None], stopping: threading.Event) -> None:
    """Count every application byte until the client goes away."""
    total = 0
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            total += len(data)
    except OSError:
        pass
    record("bytes", total)


def read_request_then_hang(conn: Any, record: Callable[[str, int], None], stopping: threading.Event) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
    record("request", len(buf))
    conn.settimeout(0.05)
    while not stopping.is_set():  # never answer; notice when the client gives up
        try:
            if not conn.recv(65536):
                record("client-closed")
                return
        except TimeoutError:
            continue
        except OSError:
            record("client-closed")
            return


def read_request_then_close(conn: Any, record: Callable[[str, int], None], stopping: threading.Event) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
    record("request", len(buf))


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_ctx(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki["cert"]), str(pki["key"]))
    return ctx


def client_ctx(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def server_pin(pki) -> str:
    cert = x509.load_pem_x509_certificate(pki["cert"].read_bytes())
    return spki_sha256(cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture
def echo():
    s = EchoServer()
    yield s
    s.stop()


@pytest.fixture
def tls_echo(pki):
    s = EchoServer(server_ctx(pki))
    yield s
    s.stop()


@pytest.fixture
def raw_servers():
    made: list[RawServer] = []

    def make(behaviour, ctx=None) -> RawServer:
        made.append(RawServer(behaviour, ctx))
        return made[-1]

    yield make
    for s in made:
        s.stop()


@pytest.fixture
async def fast():
    made: list[FastUpstreamClient] = []

    def make(**kw) -> FastUpstreamClient:
        kw.setdefault("timeout_s", 5.0)
        made.append(FastUpstreamClient(**kw))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echoed(a: Answer) -> dict[str, Any]:
    assert a.status == 200, a
    return json.loads(a.body)


def hdr(a: Answer, name: str) -> list[str]:
    return [v for k, v in a.headers if k == name]


# -- the basics -----------------------------------------------------------------------------------


async def test_get_post_put_delete_roundtrip(echo, fast):
    c = fast()
    got = echoed(await c.send("GET", echo.url("/echo?a=1&b=%20x"), [("Accept", "application/fhir+json")], b""))
    assert got["method"] == "GET" and got["path"] == "/echo?a=1&b=%20x" and got["body"] == ""
    names = [k.lower() for k, _ in got["headers"]]
    assert "content-length" not in names  # no body, no framing for a GET
    body = b'{"resourceType": "Observation"}'
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        got = echoed(await c.send(method, echo.url("/echo"), [("Content-Type", "application/fhir+json")], body))
        assert got["method"] == method and got["body"] == body.decode()
        assert ["Content-Length", str(len(body))] in got["headers"]
    a = await c.send("POST", echo.url("/status/201"), [], b"{}")
    assert a.status == 201 and a.body == b'{"status": "as asked"}'
    assert ("content-type", "application/json") in a.headers and ("content-length", "22") in a.headers
    got = echoed(await c.send("POST", echo.url("/echo"), [], b""))
    assert ["Content-Length", "0"] in got["headers"]  # an empty POST still says so (as httpx)
    a = await c.send("HEAD", echo.url("/echo"), [], b"")
    assert a.status == 200 and a.body == b"" and int(hdr(a, "content-length")[0]) > 0
    a = await c.send("GET", echo.url("/nothing"), [], b"")
    assert a.status == 404
    assert echo.connections == 1  # all of it on one keep-alive connection, HEAD included


async def test_request_framing_host_and_hop_by_hop(echo, fast):
    c = fast()
    got = echoed(await c.send("POST", echo.url("/echo"), [
        ("Content-Length", "99"), ("Transfer-Encoding", "chunked"), ("Connection", "close"),
        ("Keep-Alive", "timeout=1"), ("TE", "trailers"), ("Upgrade", "h2c"), ("Proxy-Connection", "x"),
        ("Expect", "100-continue"), ("X-Multi", "1"), ("X-Multi", "2"), ("Authorization", "Bearer t")], b"hello"))
    assert got["headers"] == [["Host", f"127.0.0.1:{echo.port}"], ["X-Multi", "1"], ["X-Multi", "2"],
                              ["Authorization", "Bearer t"], ["Content-Length", "5"]]
    got = echoed(await c.send("GET", echo.url("/echo"), [("host", "ehr.example.org"), ("X-A", "b")], b""))
    assert got["headers"] == [["host", "ehr.example.org"], ["X-A", "b"]]  # the caller's Host, not a second one
    # the connection survived a caller's "Connection: close": it is ours, not the app's
    assert echo.connections == 1


async def test_non_ascii_path_and_header_bytes_pass_as_sent(echo, fast):
    c = fast()
    # mitmproxy hands paths and header values over as UTF-8 with surrogateescape: the bytes go out unchanged
    raw = "caf\udce9".encode("utf-8", "surrogateescape")
    assert raw == b"caf\xe9"
    got = echoed(await c.send("GET", echo.url("/echo?q=caf\udce9 x"), [("X-Name", "caf\udce9")], b""))
    assert got["path"] == "/echo?q=caf%E9%20x"  # not a valid request-target byte: percent-encoded
    rec = echo.requests[-1]
    assert ("X-Name", "caf\xe9") in rec[2]  # http.server decodes header bytes as latin-1


async def test_response_headers_hop_by_hop_removed_and_8bit_values_latin1(echo, fast):
    c = fast()
    a = await c.send("GET", echo.url("/hop"), [], b"")
    names = [k for k, _ in a.headers]
    assert "connection" not in names and "keep-alive" not in names and "proxy-connection" not in names
    assert ("x-keep", "1") in a.headers and hdr(a, "set-cookie") == ["a=1", "b=2"]
    assert all(k == k.lower() for k in names)
    a = await c.send("GET", echo.url("/headers-8bit"), [], b"")
    assert hdr(a, "x-latin1") == ["caf\xe9"] and hdr(a, "x-utf8") == ["\xe2\x82\xac"]
    assert hdr(a, "x-utf8")[0].encode("latin-1") == "€".encode()  # byte-exact for the addon's latin-1


# -- keep-alive and the pool -----------------------------------------------------------------------


async def test_keep_alive_reuse(echo, fast):
    c = fast()
    for i in range(10):
        a = await c.send("POST", echo.url("/echo"), [], b"n%d" % i)
        assert echoed(a)["body"] == f"n{i}"
    assert echo.connections == 1


async def test_chunked_response_and_reuse(echo, fast):
    c = fast()
    a = await c.send("GET", echo.url("/chunked"), [], b"")
    assert a.status == 200 and a.body == b"hello chunked world"
    assert "transfer-encoding" not in [k for k, _ in a.headers]
    await c.send("GET", echo.url("/echo"), [], b"")
    assert echo.connections == 1


async def test_connection_close_answers_are_not_reused(echo, fast):
    c = fast()
    a = await c.send("GET", echo.url("/close"), [], b"")
    assert a.status == 200 and a.body == b"bye"
    a = await c.send("GET", echo.url("/close-delimited"), [], b"")
    assert a.status == 200 and a.body == b"until the end"
    await c.send("GET", echo.url("/echo"), [], b"")
    assert echo.connections == 3


async def test_peer_closed_idle_connection_is_not_reused(echo, fast):
    c = fast()
    assert (await c.send("GET", echo.url("/silent-close"), [], b"")).body == b"ok"
    await asyncio.sleep(0.1)  # the server's FIN arrives while the connection is idle
    a = await c.send("POST", echo.url("/echo"), [], b"fresh")
    assert echoed(a)["body"] == "fresh"
    assert echo.connections == 2


async def test_stray_bytes_after_an_answer_spoil_the_connection(echo, fast):
    c = fast()
    a = await c.send("GET", echo.url("/trailing"), [], b"")
    assert a.status == 200 and a.body == b"ok"
    a = await c.send("POST", echo.url("/echo"), [], b"mine")
    assert echoed(a)["body"] == "mine"  # not the forged answer
    assert echo.connections == 2


async def test_idle_expiry(echo, fast):
    c = fast(keepalive_expiry=0.15)
    await c.send("GET", echo.url("/echo"), [], b"")
    await c.send("GET", echo.url("/echo"), [], b"")
    assert echo.connections == 1
    await asyncio.sleep(0.25)
    await c.send("GET", echo.url("/echo"), [], b"")
    assert echo.connections == 2
    await asyncio.sleep(0.5)  # the sweeper closes it without a request to notice
    assert sum(len(v) for v in c._idle.values()) == 0


async def test_100_concurrent_sends(echo, fast):
    c = fast(max_idle_per_host=32)
    bodies = [b"req-%03d" % i for i in range(100)]
    answers = await asyncio.gather(*(c.send("POST", echo.url("/echo"), [("X-I", str(i))], b)
                                     for i, b in enumerate(bodies)))
    for i, a in enumerate(answers):
        got = echoed(a)
        assert got["body"] == bodies[i].decode() and ["X-I", str(i)] in got["headers"]
    assert len(echo.requests) == 100
    assert 1 <= echo.connections <= 100
    assert len(c._idle[("http", "127.0.0.1", echo.port)]) <= 32
    before = echo.connections
    for _ in range(5):
        await c.send("GET", echo.url("/echo"), [], b"")
    assert echo.connections == before  # served from the pool


# -- outcomes --------------------------------------------------------------------------------------


async def test_connect_refused_is_not_sent(fast):
    c = fast()
    with pytest.raises(NotSent):
        await c.send("POST", f"http://127.0.0.1:{free_port()}/x", [], b"{}")


async def test_bad_urls_are_not_sent(fast):
    c = fast()
    for url in ("ftp://127.0.0.1/x", "http:///x", "http://127.0.0.1:99999/x", "http://u:p@127.0.0.1/x"):
        with pytest.raises(NotSent):
            await c.send("GET", url, [], b"")
    with pytest.raises(NotSent):  # an invalid header never reaches a socket
        await c.send("GET", f"http://127.0.0.1:{free_port()}/x", [("X-Bad", "a\r\nInjected: 1")], b"")


async def test_tls_untrusted_is_not_sent(pki, raw_servers, fast):
    srv = raw_servers(read_all, server_ctx(pki))
    c = fast()  # the system trust store does not know the throwaway CA
    with pytest.raises(NotSent):
        await c.send("POST", f"https://127.0.0.1:{srv.port}/x", [], b"{}")
    await asyncio.to_thread(srv.wait_for, "handshake-failed")
    assert not [e for e in srv.events if e[0] == "bytes"]


async def test_pin_mismatch_is_not_sent_and_nothing_arrives(pki, raw_servers, fast):
    srv = raw_servers(read_all, server_ctx(pki))
    c = fast(verify=client_ctx(pki), pins=frozenset({"00" * 32}))
    with pytest.raises(NotSent, match="not pinned"):
        await c.send("POST", f"https://127.0.0.1:{srv.port}/x", [("X-Secret", "1")], b'{"write": 1}')
    await asyncio.to_thread(srv.wait_for, "handshake-done")
    assert await asyncio.to_thread(srv.wait_for, "bytes") == [("bytes", 0)]  # the handshake completed; no request byte followed


async def test_pin_match_ok_and_tls_reuse(pki, tls_echo, fast):
    c = fast(verify=client_ctx(pki), pins=frozenset({server_pin(pki).upper()}))
    for i in range(3):
        a = await c.send("POST", tls_echo.url("/echo"), [], b"pinned-%d" % i)
        assert echoed(a)["body"] == f"pinned-{i}"
    assert tls_echo.connections == 1


async def test_pins_refuse_plain_http(echo, fast):
    c = fast(pins=frozenset({"00" * 32}))
    with pytest.raises(NotSent):
        await c.send("POST", echo.url("/echo"), [], b"{}")
    assert echo.connections == 0


async def test_ca_bundle_path_is_accepted(pki, tls_echo, fast):
    c = fast(verify=str(pki["ca"]))
    assert echoed(await c.send("GET", tls_echo.url("/echo"), [], b""))["method"] == "GET"


async def test_server_that_hangs_is_outcome_unknown(raw_servers, fast):
    srv = raw_servers(read_request_then_hang)
    c = fast(timeout_s=0.4)
    t0 = time.monotonic()
    with pytest.raises(OutcomeUnknown):
        await c.send("POST", f"http://127.0.0.1:{srv.port}/x", [], b"{}")
    assert 0.35 < time.monotonic() - t0 < 2.0
    await asyncio.to_thread(srv.wait_for, "request")
    await asyncio.to_thread(srv.wait_for, "client-closed")  # the connection was dropped, not pooled


async def test_accept_then_never_read_tls_is_a_connect_timeout(pki, fast):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=8)  # listens, never accepts: no handshake
    try:
        c = fast(verify=client_ctx(pki), connect_timeout_s=0.3)
        with pytest.raises(NotSent, match="ConnectTimeout"):
            await c.send("POST", f"https://127.0.0.1:{lsock.getsockname()[1]}/x", [], b"{}")
    finally:
        lsock.close()


async def test_closed_without_answer_is_outcome_unknown(raw_servers, fast):
    srv = raw_servers(read_request_then_close)
    c = fast()
    with pytest.raises(OutcomeUnknown):
        await c.send("POST", f"http://127.0.0.1:{srv.port}/x", [], b"{}")


async def test_close_mid_response_is_outcome_unknown(echo, fast):
    c = fast()
    with pytest.raises(OutcomeUnknown):
        await c.send("POST", echo.url("/midclose"), [], b"{}")
    assert echoed(await c.send("GET", echo.url("/echo"), [], b""))["method"] == "GET"  # the client carries on


async def test_oversize_is_outcome_unknown(echo, fast):
    c = fast()
    with pytest.raises(OutcomeUnknown, match="too large"):
        await c.send("GET", echo.url("/big-cl"), [], b"")
    with pytest.raises(OutcomeUnknown, match="too large"):
        await c.send("GET", echo.url("/big-chunked"), [], b"")


async def test_slow_answer_within_the_deadline(echo, fast):
    c = fast(timeout_s=2.0)
    assert (await c.send("GET", echo.url("/slow"), [], b"")).body == b"slow"


async def test_cancelled_send_drops_the_connection(raw_servers, fast):
    srv = raw_servers(read_request_then_hang)
    c = fast()
    t = asyncio.ensure_future(c.send("POST", f"http://127.0.0.1:{srv.port}/x", [], b"{}"))
    srv_req = await asyncio.to_thread(srv.wait_for, "request")
    assert srv_req
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await asyncio.to_thread(srv.wait_for, "client-closed")
    assert not c._idle.get(("http", "127.0.0.1", srv.port))


async def test_verify_false_and_insecure_contexts_refused():
    with pytest.raises(ValueError):
        FastUpstreamClient(verify=False)
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError):
        FastUpstreamClient(verify=insecure)
    with pytest.raises(TypeError):
        FastUpstreamClient(verify=42)


async def test_closed_client_is_not_sent(echo):
    c = FastUpstreamClient()
    await c.send("GET", echo.url("/echo"), [], b"")
    await c.close()
    with pytest.raises(NotSent):
        await c.send("GET", echo.url("/echo"), [], b"")


# -- parity with the httpx client ----------------------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
_PORT = re.compile(r"127\.0\.0\.1:\d+")  # each client gets its own sandbox


def _norm(s: str) -> str:
    return _PORT.sub("<host>", _ISO.sub("<ts>", _HTTP_DATE.sub("<date>", _UUID.sub("<id>", s))))


def normalised(a: Answer | Exception) -> Any:
    if isinstance(a, Exception):
        return type(a).__name__
    body = _norm(a.body.decode("utf-8", "replace"))
    try:  # a different id can change the length of a JSON body; compare the parsed shape
        body = json.loads(body)
    except ValueError:
        pass
    return a.status, tuple((k, _norm(v)) for k, v in a.headers if k != "content-length"), body


OBS = {"resourceType": "Observation", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
       "subject": {"reference": "Patient/example"}}
FH = [("Content-Type", "application/fhir+json"), ("Accept", "application/fhir+json")]


async def fhir_scenario(c: Any, base: str) -> list[Answer | Exception]:
    out: list[Answer | Exception] = []

    async def go(method: str, path: str, headers: list[tuple[str, str]] = FH, body: bytes = b"") -> Answer | None:
        try:
            a = await c.send(method, base + path, headers, body)
        except (NotSent, OutcomeUnknown) as e:
            out.append(e)
            return None
        out.append(a)
        return a

    created = await go("POST", "/Observation", body=json.dumps(OBS).encode())
    assert created is not None and created.status == 201, created
    rid = dict(created.headers)["location"].split("/Observation/")[1].split("/")[0]
    await go("GET", f"/Observation/{rid}")
    await go("PUT", f"/Observation/{rid}", FH + [("If-Match", 'W/"1"')],
             json.dumps({**OBS, "id": rid, "status": "amended"}).encode())
    await go("PUT", f"/Observation/{rid}", FH + [("If-Match", 'W/"1"')],
             json.dumps({**OBS, "id": rid}).encode())  # stale version: 409/412
    await go("PATCH", f"/Observation/{rid}", [("Content-Type", "application/json-patch+json"),
                                              ("Accept", "application/fhir+json")],
             json.dumps([{"op": "replace", "path": "/status", "value": "corrected"}]).encode())
    await go("GET", "/Observation?code=8867-4")
    await go("GET", "/metadata")
    await go("POST", "/Observation", body=b"{not json")
    await go("HEAD", f"/Observation/{rid}")
    await go("DELETE", f"/Observation/{rid}")
    await go("GET", f"/Observation/{rid}")
    return out


async def run_both(make_server: Callable[[], Any], scenario: Callable[[Any, Any], Any],
                   **client_kw: Any) -> tuple[list[Any], list[Any]]:
    results = []
    for cls in (UpstreamClient, FastUpstreamClient):
        srv = make_server()
        c = cls(**client_kw)
        try:
            results.append(await scenario(c, srv))
        finally:
            await c.close()
            srv.stop()
    return results[0], results[1]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_parity_fhir_sandbox(pki, tls):
    def sandbox():
        s = SandboxServer("127.0.0.1", 0, **({"tls_cert": str(pki["cert"]), "tls_key": str(pki["key"])} if tls else {}))
        s.start()
        return s

    async def scenario(c, s):
        return await fhir_scenario(c, s.base_url)

    verify = client_ctx(pki) if tls else True
    ref, new = await run_both(sandbox, scenario, verify=verify, timeout_s=5.0)
    assert len(ref) == len(new) == 11
    assert [normalised(a) for a in new] == [normalised(a) for a in ref]


async def test_parity_sandbox_faults():
    async def scenario(c, s):
        out = []
        for faults in ({"status": 503, "retry_after": 7}, {"burst_5xx": 1, "burst_status": 502},
                       {"delay_ms": 150}, {"hang": True}):
            s.set_faults(**faults)
            try:
                out.append(await c.send("POST", s.base_url + "/Observation", FH, json.dumps(OBS).encode()))
            except (NotSent, OutcomeUnknown) as e:
                out.append(e)
        s.set_faults()
        return out

    def sandbox():
        s = SandboxServer("127.0.0.1", 0)
        s.start()
        return s

    ref, new = await run_both(sandbox, scenario, timeout_s=0.6)
    assert [normalised(a) for a in new] == [normalised(a) for a in ref]
    assert [normalised(a) for a in new][-1] == "OutcomeUnknown"
    assert [a.status for a in new[:3]] == [503, 502, 201]


async def test_parity_answer_shapes(echo):
    paths = ["/chunked", "/close", "/close-delimited", "/hop", "/status/204", "/status/422", "/silent-close",
             "/headers-8bit", "/headers-utf8", "/midclose", "/big-cl", "/trailing", "/echo"]

    async def scenario(c, _):
        out = []
        for p in paths:
            try:
                out.append(await c.send("GET", echo.url(p), [("Accept", "*/*"), ("User-Agent", "t")], b""))
            except (NotSent, OutcomeUnknown) as e:
                out.append(e)
            await asyncio.sleep(0.05)  # no stale keep-alive race (after /silent-close) in a parity test
        return out

    class Shared:  # both clients against the same server
        def stop(self) -> None:
            pass

    ref, new = await run_both(Shared, scenario, timeout_s=5.0)
    diffs = {p: (normalised(r), normalised(n)) for p, r, n in zip(paths, ref, new) if normalised(r) != normalised(n)}
    # known differences, both in httpx's disfavour:
    # 1. httpx decodes header values as UTF-8 when all of them are valid UTF-8 ("€"); we keep latin-1,
    #    which is what the addon re-encodes with (byte-exact); with a non-UTF-8 value about, both agree
    # 2. httpx pools a connection with stray bytes after an answer (/trailing) and hands those bytes
    #    to the next request as its answer (a forged 200 "forge"); we drop that connection
    assert sorted(diffs) == ["/echo", "/headers-utf8"], diffs
    assert ("x-utf8", "€") in ref[paths.index("/headers-utf8")].headers
    assert ("x-utf8", "\xe2\x82\xac") in new[paths.index("/headers-utf8")].headers
    assert ref[-1].body == b"forge" and json.loads(new[-1].body)["path"] == "/echo"


async def test_parity_what_the_server_receives(echo):
    sent = [("Content-Type", "application/fhir+json"), ("X-Correlation-Id", "c-1"), ("Authorization", "Bearer x")]

    async def scenario(c, _):
        before = len(echo.requests)
        await c.send("POST", echo.url("/echo?x=1"), sent, b'{"a": 1}')
        await c.send("DELETE", echo.url("/echo"), sent, b"")
        return echo.requests[before:]

    class Shared:
        def stop(self) -> None:
            pass

    ref, new = await run_both(Shared, scenario, timeout_s=5.0)
    for (m1, p1, h1, b1), (m2, p2, h2, b2) in zip(ref, new):
        assert (m1, p1, b1) == (m2, p2, b2)
        d1 = {(k.lower(), v) for k, v in h1}
        d2 = {(k.lower(), v) for k, v in h2}
        assert d2 <= d1
        # httpx's default headers are the only extra: no Accept, Accept-Encoding, User-Agent from us
        assert {k for k, _ in d1 - d2} == {"accept", "accept-encoding", "connection", "user-agent"}


async def test_parity_failures(pki, raw_servers, echo):
    hang = raw_servers(read_request_then_hang)
    closer = raw_servers(read_request_then_close)
    tls_raw = raw_servers(read_all, server_ctx(pki))
    cases = [
        ({}, f"http://127.0.0.1:{free_port()}/x"),
        ({}, f"https://127.0.0.1:{tls_raw.port}/x"),  # untrusted
        ({"verify": client_ctx(pki), "pins": frozenset({"00" * 32})}, f"https://127.0.0.1:{tls_raw.port}/x"),
        ({"timeout_s": 0.3}, f"http://127.0.0.1:{hang.port}/x"),
        ({}, f"http://127.0.0.1:{closer.port}/x"),
        ({}, echo.url("/midclose")),
        ({}, echo.url("/big-chunked")),
    ]
    for kw, url in cases:
        outcomes = []
        for cls in (UpstreamClient, FastUpstreamClient):
            c = cls(**{"timeout_s": 5.0, **kw})
            try:
                await c.send("POST", url, [], b"{}")
                outcomes.append("answered")
            except (NotSent, OutcomeUnknown) as e:
                outcomes.append(type(e).__name__)
            finally:
                await c.close()
        assert outcomes[0] == outcomes[1], (url, outcomes)


# -- the own HTTP/1.1 parser against h11 ------------------------------------------------------------
#
# Requests are serialised and common answers parsed by the client itself (h11's grammar); anything
# unusual is replayed into h11. Each answer shape below is served byte for byte by a raw server and the
# client's result is compared with what h11 alone makes of the same bytes.

import h11  # noqa: E402

from sidecar import upstream_fast  # noqa: E402


def test_grammar_is_h11s():
    from h11 import _abnf
    from h11._receivebuffer import blank_line_regex

    assert upstream_fast._TOKEN == _abnf.token
    assert upstream_fast._FIELD_VALUE == _abnf.field_value
    assert upstream_fast._HEADER_FIELD == _abnf.header_field
    assert upstream_fast._STATUS_LINE == _abnf.status_line
    assert upstream_fast._CHUNK_HEADER == _abnf.chunk_header
    assert upstream_fast._blank_line_re.pattern == blank_line_regex.pattern


def h11_reference(method: bytes, answer: bytes, eof: bool, pieces: int = 1) -> Any:
    """What h11 alone makes of `answer` arriving in `pieces` reads (as the old client did): an Answer, or the
    outcome's class name."""
    h = h11.Connection(h11.CLIENT, max_incomplete_event_size=100 * 1024)
    h.send(h11.Request(method=method, target=b"/x", headers=[(b"Host", b"h")]))
    h.send(h11.EndOfMessage())
    step = max(1, len(answer) // pieces)
    reads = [answer[i:i + step] for i in range(0, len(answer), step)] + ([b""] if eof else [])
    status, headers, chunks = 0, (), []
    try:
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                if not reads:
                    return "OutcomeUnknown"  # the real client would wait until its deadline
                h.receive_data(reads.pop(0))
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers
                                if k.decode() not in upstream_fast.HOP_BY_HOP)
            elif isinstance(ev, h11.Data):
                chunks.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return Answer(status, headers, b"".join(chunks))
            elif isinstance(ev, h11.ConnectionClosed):
                return "OutcomeUnknown"
    except h11.RemoteProtocolError:
        return "OutcomeUnknown"


def serve_bytes(answer: bytes, pieces: int = 1, close: bool = False):
    """A raw server behaviour: read one request head, send `answer` (in `pieces` writes), then keep the
    connection open (or close it)."""
    def behaviour(conn: Any, record: Callable[[str, int], None], stopping: threading.Event) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        step = max(1, len(answer) // pieces)
        for i in range(0, len(answer), step):
            conn.sendall(answer[i:i + step])
            if pieces > 1:
                time.sleep(0.01)
        if close:
            return
        conn.settimeout(0.05)
        while not stopping.is_set():
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return
    return behaviour


CL_BODY = b'{"resourceType":"Observation","id":"1"}'
SHAPES: dict[str, tuple[bytes, bool]] = {  # name -> (answer bytes, server closes after sending)
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(CL_BODY), CL_BODY), False),
    "no-reason": (b"HTTP/1.1 201\r\nLocation: http://x/Observation/2\r\nContent-Length: 2\r\n\r\nok", False),
    "empty-value-and-ows": (b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Ows: \t a b \t\r\nContent-Length: 0\r\n\r\n", False),
    "8bit-values": (b"HTTP/1.1 200 OK\r\nX-L: caf\xe9\r\nContent-Length: 1\r\n\r\nx", False),
    "hop-by-hop": (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Keep: 1\r\n"
                   b"Content-Length: 1\r\n\r\nx", False),
    "connection-close": (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 3\r\n\r\nbye", True),
    "chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1A;ext=1 \r\n"
                + b"z" * 26 + b"\r\n0\r\n\r\n", False),
    "chunked-mixed-case": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False),
    "chunked-trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
                         False),
    "bare-lf-head": (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", False),
    "bare-lf-inside": (b"HTTP/1.1 200 OK\r\nA: 1\nContent-Length: 2\r\n\r\nok", False),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok", False),
    "http-1.0-close-delimited": (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", True),
    "close-delimited-1.1": (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", True),
    "204": (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False),
    "304": (b"HTTP/1.1 304 Not Modified\r\nETag: W/\"1\"\r\n\r\n", False),
    "100-then-201": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", False),
    "duplicate-equal-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", False),
    "length-list": (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", False),
    "conflicting-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!", False),
    "length-and-chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"2\r\nok\r\n0\r\n\r\n", False),
    "gzip-coding": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", True),
    "bad-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nx", False),
    "bad-status-line": (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", False),
    "illegal-header-name": (b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 0\r\n\r\n", False),
    "nul-in-value": (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n", False),
    "leading-space-byte": (b" HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    "eof-mid-head": (b"HTTP/1.1 200 OK\r\nContent-Le", True),
    "eof-mid-body": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly", True),
    "eof-mid-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", True),
    "bad-chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", False),
    "big-head": (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * (110 * 1024) + b"\r\nContent-Length: 0\r\n\r\n",
                 False),
}


@pytest.mark.parametrize("pieces", [1, 7], ids=["one-write", "trickled"])
@pytest.mark.parametrize("name", sorted(SHAPES))
async def test_answers_parse_as_h11_does(raw_servers, fast, name, pieces):
    answer, close = SHAPES[name]
    srv = raw_servers(serve_bytes(answer, pieces, close))
    c = fast(timeout_s=1.0)
    try:
        got: Any = await c.send("GET", f"http://127.0.0.1:{srv.port}/x", [], b"")
    except (NotSent, OutcomeUnknown) as e:
        got = type(e).__name__
    assert got == h11_reference(b"GET", answer, close, pieces), name


async def test_chunk_data_must_end_with_crlf(raw_servers, fast):
    """h11 0.14 skips the two bytes after a chunk unchecked; a reused connection could then be out of step.
    Here that answer is an unknown outcome and its connection is dropped."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n"
    srv = raw_servers(serve_bytes(answer))
    c = fast(timeout_s=1.0)
    with pytest.raises(OutcomeUnknown):
        await c.send("GET", f"http://127.0.0.1:{srv.port}/x", [], b"")
    assert not c._idle.get(("http", "127.0.0.1", srv.port))


async def test_head_answers_have_no_body(echo, fast):
    c = fast()
    a = await c.send("HEAD", echo.url("/status/200"), [], b"")
    assert a.status == 200 and a.body == b"" and hdr(a, "content-length")
    again = await c.send("GET", echo.url("/echo"), [], b"")  # the connection is still in step
    assert echoed(again)["method"] == "GET" and echo.connections == 1


@pytest.mark.parametrize("headers", [
    [("Content-Type", "application/fhir+json"), ("X-Empty", ""), ("Authorization", "Bearer abc")],
    [("host", "other.example:81"), ("Accept", "*/*"), ("Host", "ignored")],
    [("X-8bit", "caf\udce9"), ("If-Match", 'W/"3"')],
])
@pytest.mark.parametrize("method,body", [("GET", b""), ("POST", b'{"a": 1}'), ("PUT", b"")])
def test_request_bytes_are_h11s(headers, method, body):
    c = FastUpstreamClient()
    _, _, _, req = c._request(method, "http://127.0.0.1:8080/fhir/Observation?a=1", headers, body)
    h = h11.Connection(h11.CLIENT)
    expected = h.send(h11.Request(method=req.method, target=req.target, headers=req.headers))
    assert req.head == expected
    assert req.head.startswith(b"%s /fhir/Observation?a=1 HTTP/1.1\r\n" % method.encode())
    assert req.head.split(b"\r\n")[1].lower().startswith(b"host: ")  # Host first, exactly once
    assert req.head.lower().count(b"\r\nhost: ") == 1


@pytest.mark.parametrize("name,value", [("X-Bad", "a\r\nX-Injected: 1"), ("X-Bad", "a\nb"), ("X-Bad", "a\x00b"),
                                        ("X-Bad", " leading"), ("X-Bad", "trailing "), ("Bad Name", "v"),
                                        ("X-Bad", "a\x0bb"), ("", "v")])
async def test_illegal_request_headers_are_not_sent(raw_servers, fast, name, value):
    srv = raw_servers(read_all)
    c = fast()
    with pytest.raises(NotSent):
        await c.send("POST", f"http://127.0.0.1:{srv.port}/x", [(name, value)], b"{}")
    with pytest.raises(NotSent):
        await c.send_target("POST", "http", "127.0.0.1", srv.port, b"/x",
                            [(name.encode(), value.encode("utf-8", "surrogateescape"))], b"{}")
    assert srv.events == []  # not even a connection


async def test_send_target_puts_the_same_bytes_on_the_wire(echo, fast):
    c = fast()
    via_url = echoed(await c.send("POST", echo.url("/echo?x=1"), [("Content-Type", "application/fhir+json"),
                                                                  ("Host", "h"), ("Content-Length", "99"),
                                                                  ("Connection", "close")], b'{"a": 1}'))
    via_parts = echoed(await c.send_target("POST", "http", "127.0.0.1", echo.port, b"/echo?x=1",
                                           [(b"content-type", b"application/fhir+json"), (b"host", b"h"),
                                            (b"content-length", b"99"), (b"connection", b"close")], b'{"a": 1}'))
    # the caller's Host is kept by send() and replaced by send_target() (the adapter's is the app's Host)
    assert [k.lower() for k, _ in via_url["headers"]] == [k.lower() for k, _ in via_parts["headers"]]
    assert ["host", f"127.0.0.1:{echo.port}"] in [[k.lower(), v] for k, v in via_parts["headers"]]
    assert (via_url["method"], via_url["path"], via_url["body"]) == (via_parts["method"], via_parts["path"],
                                                                     via_parts["body"])
    assert echo.connections == 1


async def test_send_target_refuses_bad_parts(fast):
    c = fast()
    for scheme, host, port in (("ftp", "127.0.0.1", 80), ("http", "", 80), ("http", "127.0.0.1", 0)):
        with pytest.raises(NotSent):
            await c.send_target("GET", scheme, host, port, b"/", [], b"")
    with pytest.raises(NotSent):
        await c.send_target("G T", "http", "127.0.0.1", 9, b"/", [], b"")
