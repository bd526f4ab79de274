"""A lean upstream client: asyncio streams + HTTP/1.1 (h11's grammar), a drop-in for UpstreamClient.

Same interface and the same honest outcomes as ``sidecar.upstream.UpstreamClient`` (httpx), at a
fraction of its CPU cost per request:

- ``NotSent``: nothing left this process -- bad URL, connect refused or timed out, TLS handshake
  or certificate failure, pinned key mismatch (checked after the handshake, before a byte of the
  request is written), client closed.
- ``OutcomeUnknown``: the request may have reached the EHR -- any failure once writing has
  begun (reset, EOF, malformed answer), no complete answer within ``timeout_s`` of sending, or an
  answer larger than ``MAX_RESPONSE_BYTES``. A write is never retried.

Keep-alive: a small LIFO pool of idle connections per (scheme, host, port). A connection goes
back to the pool only if the exchange ended cleanly (both sides DONE in h11, no stray bytes); it is
reused only if it was last used less than ``keepalive_expiry`` seconds ago (default 4 s: below the
5 s idle timeout of Apache httpd, Node.js, uvicorn, so the server is very unlikely to be closing
it as we write -- the classic stale keep-alive race, which for a write would turn into an
``OutcomeUnknown``), and only if the peer has not closed it or sent anything meanwhile.

Parsing: requests are serialised here, byte for byte as h11 would (the same ABNF regexes, Host first), and
the common answers -- HTTP/1.1, status >= 200 other than 204/304, a single Content-Length or
`Transfer-Encoding: chunked` without trailers, CRLF line ends -- are parsed here with h11's own
regexes. Anything else (1xx, HTTP/1.0, close-delimited or HEAD answers, obs-fold, trailers, an early EOF,
a head over 100 KiB, ...) is handed to h11: everything received so far is replayed into a fresh
``h11.Connection`` that has "sent" the same request, so h11 decides exactly as it always did. One
deliberate difference: a chunk not followed by CRLF is refused (``OutcomeUnknown``, connection
dropped); h11 0.14 skips those two bytes unchecked (CVE-2025-43859), which on a reused connection
could desynchronise answers.

Deliberate differences from the httpx client (see tests/test_upstream_fast.py, parity tests):
- no default request headers: httpx adds ``Accept: */*``, ``Accept-Encoding: gzip, deflate, br,
  zstd``, ``User-Agent: python-httpx/...`` and ``Connection: keep-alive`` when absent; this client
  sends the caller's headers only (so an app that did not ask for a compressed body does not get
  one back verbatim);
- request hop-by-hop headers (HOP_BY_HOP, plus Content-Length and Expect) are dropped, and
  Content-Length is always computed from the body (httpx trusts a caller-supplied one);
- response header values are decoded as latin-1 (byte-exact; the addon re-encodes latin-1),
  httpx decodes them as UTF-8 when they are valid UTF-8; names are lower-case in both;
- ``timeout_s`` is one deadline for the whole exchange after connecting (httpx: per read/write);
- ``verify=False`` (or an SSLContext with CERT_NONE) is refused; ``verify=True`` is the system
  trust store (httpx: certifi); pins with a plain-http URL are ``NotSent`` (httpx ignores them).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import h11

from sidecar.upstream import (
    HOP_BY_HOP,
    MAX_RESPONSE_BYTES,
    Answer,
    NotSent,
    OutcomeUnknown,
    spki_sha256,
)

__all__ = ["Answer", "FastUpstreamClient", "NotSent", "OutcomeUnknown"]

_HOP_BYTES = frozenset(h.encode() for h in HOP_BY_HOP)
_DROP_REQUEST = frozenset(HOP_BY_HOP | {"content-length", "expect"})
_DROP_REQUEST_BYTES = frozenset(h.encode() for h in _DROP_REQUEST)
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})  # Content-Length: 0 even when empty (as httpx)
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")

# h11's ABNF (h11/_abnf.py), compiled as bytes regexes exactly as h11 uses them (fullmatch);
# tests/test_upstream_fast.py holds these strings equal to h11's.
_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = r"[^\x00\s]"
_FIELD_CONTENT = r"{0}+(?:[ \t]+{0}+)*".format(_FIELD_VCHAR)
_FIELD_VALUE = r"({0})?".format(_FIELD_CONTENT)
_HEADER_FIELD = r"(?P<field_name>{0}):[ \t]*(?P<field_value>{1})[ \t]*".format(_TOKEN, _FIELD_VALUE)
_STATUS_LINE = (r"HTTP/(?P<http_version>[0-9]\.[0-9]) (?P<status_code>[0-9]{{3}})"
                r"(?: (?P<reason>([ \t]|{0})*))?".format(_FIELD_VCHAR))
_CHUNK_HEADER = r"(?P<chunk_size>([0-9A-Fa-f]){1,20})(?P<chunk_ext>;.*)?[ \t]*\r\n"
_token_re = re.compile(_TOKEN.encode("ascii"))
_field_value_re = re.compile(_FIELD_VALUE.encode("ascii"))
_header_field_re = re.compile(_HEADER_FIELD.encode("ascii"))
_status_line_re = re.compile(_STATUS_LINE.encode("ascii"))
_chunk_header_re = re.compile(_CHUNK_HEADER.encode("ascii"))
_blank_line_re = re.compile(b"\n\r?\n", re.MULTILINE)  # where h11's ReceiveBuffer ends a head
_digits_re = re.compile(rb"[0-9]+")
_READ_CHUNK = 256 * 1024
_STREAM_LIMIT = 1024 * 1024
_MAX_HEAD = 100 * 1024  # status line + headers (httpcore's h11 limit)
_JOIN_BELOW = 256 * 1024  # bodies below this go out in one write with the head


class _TooLarge(Exception):
    pass


def _escape_byte(m: re.Match[bytes]) -> bytes:
    return b"%%%02X" % m.group()[0]


def _host_header(host: str, port: int, default: int) -> bytes:
    hh = f"[{host}]" if ":" in host else host
    hh = hh if port == default else f"{hh}:{port}"
    return hh.encode("ascii") if hh.isascii() else hh.encode("idna")


def _with_length(out: list[tuple[bytes, bytes]], method: bytes, body: bytes) -> list[tuple[bytes, bytes]]:
    if body:
        out.append((b"Content-Length", str(len(body)).encode()))
    elif method in _BODY_METHODS:
        out.append((b"Content-Length", b"0"))
    return out


def _readable(fd: int) -> bool:
    """Whether the kernel holds unread data or an EOF for an idle socket (httpcore does the same)."""
    if fd < 0:
        return True
    try:
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLPRI)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return True


class _Conn:
    __slots__ = ("reader", "writer", "idle_since", "loop", "fd")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.loop = loop
        sock = writer.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def reusable_idle(self) -> bool:
        """Checked just before reuse: the peer has neither closed nor sent anything since."""
        r = self.reader
        if r.at_eof() or r.exception() is not None or self.writer.transport.is_closing():
            return False
        if getattr(r, "_buffer", b""):  # unsolicited bytes (e.g. a 408 before closing): not ours to read
            return False
        return not _readable(self.fd)

    def abort(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:  # a transport of a loop that is gone
            pass

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            self.abort()


class _Req:
    """One request, validated and serialised (h11's grammar and byte layout): nothing is sent for a bad one."""

    __slots__ = ("method", "target", "headers", "head", "body")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if not _token_re.fullmatch(method):
            raise NotSent("LocalProtocolError: LocalProtocolError")
        for k, v in headers:
            if not _token_re.fullmatch(k) or not _field_value_re.fullmatch(v):
                raise NotSent("LocalProtocolError: LocalProtocolError")  # no detail: it could quote a value
        self.method, self.target, self.headers, self.body = method, target, headers, body
        # h11's write_headers: the Host field first (RFC 7230 5.4), then the others in order
        lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        lines += [b"%s: %s\r\n" % kv for kv in headers if kv[0].lower() == b"host"]
        lines += [b"%s: %s\r\n" % kv for kv in headers if kv[0].lower() != b"host"]
        lines.append(b"\r\n")
        self.head = b"".join(lines)

    def h11_connection(self) -> h11.Connection:
        """A fresh h11 client connection that has sent this request: h11 reads the answer from there."""
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        try:
            h.send(h11.Request(method=self.method, target=self.target, headers=self.headers))
            if self.body:
                h.send_with_data_passthrough(h11.Data(data=self.body))
            h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # cannot happen (same grammar); the request is out: outcome unknown
            raise h11.RemoteProtocolError("request not replayable into h11") from None
        return h


# header line -> (lower-case name, value, the (name, value) str pair the answer keeps or None), bounded
_LINE_CACHE: dict[bytes, tuple[bytes, bytes, tuple[str, str] | None]] = {}


def _parse_head(buf: bytearray, end: int) -> tuple[int, tuple[tuple[str, str], ...], int, bool] | None:
    """(status, headers without hop-by-hop, body length or -1 for chunked, keep-alive) for an answer head
    ending at `end` that this module frames itself; None hands the answer to h11."""
    if buf[end - 4:end] != b"\r\n\r\n":
        return None  # a bare LF ended the head
    lines = bytes(buf[:end - 4]).split(b"\r\n")
    m = _status_line_re.fullmatch(lines[0])
    if m is None or m.group("http_version") != b"1.1":
        return None
    status = int(m.group("status_code"))
    if status < 200 or status in (204, 304):
        return None
    out = []
    cl = te = None
    n_cl = n_te = 0
    keep_alive = True
    cache = _LINE_CACHE
    for line in lines[1:]:
        hit = cache.get(line)
        if hit is None:  # lines repeat from answer to answer (Server, Content-Type, ...): parse each once
            f = _header_field_re.fullmatch(line)
            if f is None:
                return None  # obs-fold, a bare CR, an illegal name or value: h11 decides
            name, value = f.group("field_name").lower(), f.group("field_value")
            hit = (name, value, None if name in _HOP_BYTES else (name.decode("latin-1"), value.decode("latin-1")))
            if len(cache) >= 512:
                cache.clear()
            cache[line] = hit
        name, value, pair = hit
        if name == b"content-length":
            n_cl += 1
            cl = value
        elif name == b"transfer-encoding":
            n_te += 1
            te = value
        elif name == b"connection" and b"close" in [t.strip().lower() for t in value.split(b",")]:
            keep_alive = False
        if pair is not None:
            out.append(pair)
    if n_te == 0 and n_cl == 1 and cl is not None and _digits_re.fullmatch(cl):
        length = int(cl)
        if length > MAX_RESPONSE_BYTES:
            raise _TooLarge()
    elif n_te == 1 and n_cl == 0 and te is not None and te.lower() == b"chunked":
        length = -1
    else:
        return None  # close-delimited, both framings, lists of lengths, other codings: h11 decides
    return status, tuple(out), length, keep_alive


def _ssl_context(verify: Any) -> ssl.SSLContext:
    if verify is True:
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx
    if verify is False or verify is None:
        raise ValueError("verify=False is not allowed: the EHR's certificate is always verified")
    if isinstance(verify, ssl.SSLContext):
        if verify.verify_mode == ssl.CERT_NONE:
            raise ValueError("an SSLContext with verify_mode CERT_NONE is not allowed")
        return verify
    if isinstance(verify, (str, os.PathLike)):  # a CA bundle, as httpx still accepts
        ctx = ssl.create_default_context(cafile=os.fspath(verify))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx
    raise TypeError("verify must be True, an ssl.SSLContext or a CA bundle path")


class FastUpstreamClient:
    """Drop-in for UpstreamClient. Safe for many concurrent sends on one event loop."""

    def __init__(self, *, verify: Any = True, timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 pins: frozenset[str] = frozenset(), max_idle_per_host: int = 32,
                 keepalive_expiry: float = 4.0) -> None:
        if verify is False or verify is None:
            raise ValueError("verify=False is not allowed: the EHR's certificate is always verified")
        if isinstance(verify, ssl.SSLContext) and verify.verify_mode == ssl.CERT_NONE:
            raise ValueError("an SSLContext with verify_mode CERT_NONE is not allowed")
        if not isinstance(verify, (bool, ssl.SSLContext, str, os.PathLike)):
            raise TypeError("verify must be True, an ssl.SSLContext or a CA bundle path")
        self._verify = verify
        # a CA bundle path is read now (a bad path fails here, as with httpx); the system trust store
        # (verify=True) is loaded on first https use: it costs milliseconds and plain http never needs it
        self._ssl: ssl.SSLContext | None = None if verify is True else _ssl_context(verify)
        self._timeout_s = float(timeout_s)
        self._connect_timeout_s = float(min(connect_timeout_s, timeout_s))
        self._pins = frozenset(p.lower() for p in pins)
        self._spki_cache: dict[bytes, str] = {}
        self._max_idle = max(0, int(max_idle_per_host))
        self._expiry = float(keepalive_expiry)
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- public ---------------------------------------------------------------------------------
    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = [c for lst in self._idle.values() for c in lst]
        self._idle.clear()
        loop = asyncio.get_running_loop()
        mine = []
        for c in conns:
            if c.loop is loop:
                c.close()
                mine.append(c.writer.wait_closed())
            else:
                c.abort()
        if mine:
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.gather(*mine, return_exceptions=True)
            except TimeoutError:
                pass

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        if self._closed:
            raise NotSent("client closed")
        scheme, host, port, req = self._request(method, url, headers, body)
        return await self._exchange(scheme, host, port, req)

    async def send_target(self, method: str, scheme: str, host: str, port: int, target: bytes,
                          headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        """`send` for a caller that holds the URL's parts: `target` is the origin-form path+query as bytes,
        `headers` (name, value) bytes; the same validation, framing, Host and hop-by-hop rules."""
        if self._closed:
            raise NotSent("client closed")
        scheme = scheme.lower()
        if scheme not in ("http", "https") or not host or not 0 < port < 65536:
            raise NotSent("UnsupportedProtocol: bad URL")
        tb = target or b"/"
        if _BAD_TARGET.search(tb):
            tb = _BAD_TARGET.sub(_escape_byte, tb)
        try:
            mb = method.encode("ascii")
            out = [(k, v) for k, v in headers if k.lower() not in _DROP_REQUEST_BYTES and k.lower() != b"host"]
            out.insert(0, (b"Host", _host_header(host, port, 443 if scheme == "https" else 80)))
        except UnicodeError as e:
            raise NotSent(f"LocalProtocolError: {type(e).__name__}") from None
        return await self._exchange(scheme, host, port, _Req(mb, tb, _with_length(out, mb, body), body))

    async def _exchange(self, scheme: str, host: str, port: int, req: _Req) -> Answer:
        key = (scheme, host, port)
        conn = self._checkout(key)
        if conn is None:
            conn = await self._connect(scheme, host, port)
        clean = False
        try:
            body = req.body
            try:
                async with asyncio.timeout(self._timeout_s):
                    w = conn.writer
                    if not body:
                        w.write(req.head)
                    elif len(body) < _JOIN_BELOW:
                        w.write(req.head + body)
                    else:
                        w.write(req.head)
                        w.write(body)
                    await w.drain()
                    answer, clean = await self._read_answer(conn, req)
            except TimeoutError:
                raise OutcomeUnknown("ReadTimeout") from None
            except _TooLarge:
                raise OutcomeUnknown("response too large") from None
            except h11.RemoteProtocolError:
                raise OutcomeUnknown("RemoteProtocolError") from None
            except (OSError, EOFError) as e:  # ssl.SSLError is an OSError
                raise OutcomeUnknown(f"ReadError: {type(e).__name__}") from None
            return answer
        finally:
            if clean:
                self._checkin(key, conn)
            else:
                conn.abort()

    # -- request ----------------------------------------------------------------------------------
    def _request(self, method: str, url: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[str, str, int, _Req]:
        try:
            u = urlsplit(url)
            scheme = u.scheme.lower()
            if scheme not in ("http", "https"):
                raise NotSent("UnsupportedProtocol")
            host = u.hostname
            if not host or "@" in u.netloc:
                raise NotSent("UnsupportedProtocol: no host, or credentials in the URL")
            default = 443 if scheme == "https" else 80
            port = u.port or default
        except ValueError:  # bad port, bad IPv6 literal
            raise NotSent("UnsupportedProtocol: bad URL") from None
        target = u.path or "/"
        if u.query:
            target = f"{target}?{u.query}"
        tb = target.encode("utf-8", "surrogateescape")
        if _BAD_TARGET.search(tb):
            tb = _BAD_TARGET.sub(_escape_byte, tb)
        out: list[tuple[bytes, bytes]] = []
        has_host = False
        try:
            for k, v in headers:
                lk = k.lower()
                if lk in _DROP_REQUEST:
                    continue
                if lk == "host":
                    if has_host:
                        continue
                    has_host = True
                out.append((k.encode("ascii"), v.encode("utf-8", "surrogateescape")))
            if not has_host:
                out.insert(0, (b"Host", _host_header(host, port, default)))
            mb = method.encode("ascii")
        except UnicodeError as e:
            raise NotSent(f"LocalProtocolError: {type(e).__name__}") from None
        return scheme, host, port, _Req(mb, tb, _with_length(out, mb, body), body)

    # -- connections ------------------------------------------------------------------------------
    async def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        ctx: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = _ssl_context(self._verify)
            ctx = self._ssl
        elif self._pins:
            raise NotSent("EHR certificate key is pinned: plain http refused")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=host if ctx is not None else None, limit=_STREAM_LIMIT)
        except TimeoutError:
            raise NotSent("ConnectTimeout") from None
        except Exception as e:  # OSError, ssl.SSLError (certificate, handshake), UnicodeError (IDNA)
            raise NotSent(f"ConnectError: {type(e).__name__}") from None
        conn = _Conn(reader, writer, loop)
        if ctx is not None:
            so = writer.get_extra_info("ssl_object")
            if so is None or so.selected_alpn_protocol() not in (None, "http/1.1"):
                conn.abort()
                raise NotSent("ConnectError: the EHR did not agree to HTTP/1.1")
            if self._pins:
                der = so.getpeercert(binary_form=True)
                if not der or self._spki(der) not in self._pins:
                    conn.abort()
                    raise NotSent("EHR certificate key is not pinned")
        return conn

    def _spki(self, der: bytes) -> str:
        v = self._spki_cache.get(der)
        if v is None:
            if len(self._spki_cache) >= 16:
                self._spki_cache.clear()
            v = self._spki_cache[der] = spki_sha256(der)
        return v

    def _checkout(self, key: tuple[str, str, int]) -> _Conn | None:
        lst = self._idle.get(key)
        if not lst:
            return None
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        while lst:
            c = lst.pop()  # most recently used first
            if now - c.idle_since >= self._expiry:
                c.close()
                for old in lst:  # LIFO: every older one has expired too
                    old.close()
                lst.clear()
                return None
            if c.loop is loop and c.reusable_idle():
                return c
            c.abort()
        return None

    def _checkin(self, key: tuple[str, str, int], conn: _Conn) -> None:
        if self._closed or self._max_idle == 0:
            conn.close()
            return
        now = conn.idle_since = time.monotonic()
        lst = self._idle.get(key)
        if lst is None:
            lst = self._idle[key] = []
        while lst and (len(lst) >= self._max_idle or now - lst[0].idle_since >= self._expiry):
            lst.pop(0).close()
        lst.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self._expiry + 0.05, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections past their expiry even when no request comes to notice."""
        self._sweeper = None
        now = time.monotonic()
        left = 0
        for key, lst in list(self._idle.items()):
            keep = []
            for c in lst:
                if now - c.idle_since >= self._expiry:
                    c.close()
                else:
                    keep.append(c)
            if keep:
                self._idle[key] = keep
                left += len(keep)
            else:
                del self._idle[key]
        if left and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._expiry / 2, self._sweep)

    # -- response -------------------------------------------------------------------------------
    async def _read_answer(self, conn: _Conn, req: _Req) -> tuple[Answer, bool]:
        """(the answer, whether the connection may be reused). Everything received is kept in `buf` until
        the answer is complete, so h11 can take over from the first byte whenever the answer is unusual."""
        reader = conn.reader
        buf = bytearray()
        if req.method == b"HEAD":
            return await self._read_h11(conn, req, buf, False)
        while True:  # the head
            data = await reader.read(_READ_CHUNK)
            if not data:  # EOF before a complete head: h11 says what that is
                return await self._read_h11(conn, req, buf, True)
            buf += data
            if buf[0] < 0x21:  # h11 refuses such a first byte without waiting for more
                return await self._read_h11(conn, req, buf, False)
            m = _blank_line_re.search(buf)
            if m is not None:
                break
            if len(buf) > _MAX_HEAD:
                return await self._read_h11(conn, req, buf, False)
        end = m.end()
        parsed = _parse_head(buf, end)
        if parsed is None:
            return await self._read_h11(conn, req, buf, False)
        status, headers, length, keep_alive = parsed
        if length >= 0:  # Content-Length
            need = end + length
            while len(buf) < need:
                data = await reader.read(max(_READ_CHUNK, need - len(buf)))
                if not data:
                    return await self._read_h11(conn, req, buf, True)
                buf += data
            return Answer(status, headers, bytes(buf[end:need])), keep_alive and len(buf) == need
        pos, size, parts = end, 0, []  # chunked
        while True:
            i = buf.find(b"\r\n", pos)
            while i < 0:
                if len(buf) - pos > _MAX_HEAD:
                    return await self._read_h11(conn, req, buf, False)
                data = await reader.read(_READ_CHUNK)
                if not data:
                    return await self._read_h11(conn, req, buf, True)
                buf += data
                i = buf.find(b"\r\n", pos)
            c = _chunk_header_re.fullmatch(buf, pos, i + 2)
            if c is None:
                return await self._read_h11(conn, req, buf, False)
            n = int(c.group("chunk_size"), 16)
            pos = i + 2
            if n == 0:
                break
            size += n
            if size > MAX_RESPONSE_BYTES:
                raise _TooLarge()
            while len(buf) < pos + n + 2:
                data = await reader.read(max(_READ_CHUNK, pos + n + 2 - len(buf)))
                if not data:
                    return await self._read_h11(conn, req, buf, True)
                buf += data
            if buf[pos + n:pos + n + 2] != b"\r\n":
                raise h11.RemoteProtocolError("chunk data not followed by CRLF")  # stricter than h11 0.14
            parts.append((pos, pos + n))
            pos += n + 2
        while len(buf) < pos + 2:
            data = await reader.read(_READ_CHUNK)
            if not data:
                return await self._read_h11(conn, req, buf, True)
            buf += data
        if buf[pos:pos + 2] != b"\r\n":  # a trailer section: h11 reads it
            return await self._read_h11(conn, req, buf, False)
        body = b"".join([buf[a:b] for a, b in parts])
        return Answer(status, headers, body), keep_alive and len(buf) == pos + 2

    async def _read_h11(self, conn: _Conn, req: _Req, received: bytearray, eof: bool) -> tuple[Answer, bool]:
        """h11 reads the answer, starting from its first byte (`received`), then from the socket."""
        h = req.h11_connection()
        if received:
            h.receive_data(bytes(received))
        if eof:
            h.receive_data(b"")
        reader = conn.reader
        head = req.method == b"HEAD"
        status = 0
        out: tuple[tuple[str, str], ...] = ()
        chunks: list[Any] = []
        size = 0
        NEED_DATA, Data, Response, EndOfMessage = h11.NEED_DATA, h11.Data, h11.Response, h11.EndOfMessage
        while True:
            ev = h.next_event()
            if ev is NEED_DATA:
                h.receive_data(await reader.read(_READ_CHUNK))  # b"" = EOF (ends a close-delimited body)
                continue
            if isinstance(ev, Data):
                size += len(ev.data)
                if size > MAX_RESPONSE_BYTES:
                    raise _TooLarge()
                chunks.append(ev.data)
            elif isinstance(ev, Response):
                status = ev.status_code
                hdrs = []
                for k, v in ev.headers:
                    if k in _HOP_BYTES:
                        continue
                    if k == b"content-length" and not head and int(v) > MAX_RESPONSE_BYTES:
                        raise _TooLarge()
                    hdrs.append((k.decode("latin-1"), v.decode("latin-1")))
                out = tuple(hdrs)
            elif isinstance(ev, EndOfMessage):
                clean = h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]
                return Answer(status, out, b"".join(chunks)), clean
            elif isinstance(ev, h11.InformationalResponse):
                continue  # 100 Continue, 103 Early Hints: the final answer follows
            else:  # ConnectionClosed before the end of the answer
                raise h11.RemoteProtocolError("connection closed before the answer was complete")
