"""The admin listener: `/healthz`, `/readyz`, and the admin API behind `admin.token`.

A tiny HTTP/1.1 server on h11 (already a mitmproxy dependency) in the proxy's event loop.
The API is JSON; every mutating call needs `Authorization: Bearer <admin.token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

import h11

from sidecar.logs import get_logger

log = get_logger("sidecar.admin")
Handler = Callable[[str, str, dict[str, str], bytes], Awaitable[tuple[int, Any]]]
MAX_BODY = 64 * 1024


class AdminServer:
    def __init__(self, host: str, port: int, handler: Handler, *, sock_fd: int | None = None) -> None:
        self.host, self.port = host, port
        self._handler = handler
        self._sock_fd = sock_fd  # a listening socket inherited from the supervisor (--workers)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self._sock_fd is not None:
            import socket

            sock = socket.socket(fileno=self._sock_fd)
            self._server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        try:
            while True:
                req, body = await self._read_request(conn, reader)
                if req is None:
                    break
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
                target = req.target.decode("ascii", "replace")
                try:
                    status, payload = await self._handler(req.method.decode(), target, headers, body)
                except Exception as e:  # the admin API answers, it never crashes the listener
                    log.error("admin handler failed", error_type=type(e).__name__)
                    status, payload = 500, {"error": "internal error"}
                extra: list[tuple[str, str]] = []
                if isinstance(payload, tuple):  # (body, content type[, extra headers])
                    data, ctype, *rest = payload
                    extra = list(rest[0]) if rest else []
                elif isinstance(payload, bytes):
                    data, ctype = payload, "text/plain; version=0.0.4"
                else:
                    data, ctype = json.dumps(payload).encode(), "application/json"
                hdrs = [("content-type", ctype), ("content-length", str(len(data))), *extra]
                if not any(k.lower() == "cache-control" for k, _ in extra):
                    hdrs.append(("cache-control", "no-store"))
                writer.write(conn.send(h11.Response(status_code=status, headers=hdrs)))
                writer.write(conn.send(h11.Data(data=data)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request | None, bytes]:
        req: h11.Request | None = None
        body = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return None, b""
                continue
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise ValueError("admin body too large")
            elif isinstance(ev, h11.EndOfMessage):
                return req, body
            elif isinstance(ev, h11.ConnectionClosed):
                return None, b""


def bearer_ok(headers: dict[str, str], token: str | None) -> bool:
    if not token:
        return False
    got = headers.get("authorization", "")
    if not got.startswith("Bearer "):
        return False
    return hmac.compare_digest(got[7:].encode(), token.encode())
