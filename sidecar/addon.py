"""The mitmproxy adapter: flow -> `RawRequest` -> pipeline -> flow. Thin on purpose.

mitmproxy logs an exception raised in a hook and lets the flow continue upstream. So each hook
here catches everything, and the request hook goes further: it sets a 503 *before* it does
anything and removes it only when the pipeline said "forward". Any path out of the hook that
is not that one leaves the 503 in place.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
import time
import uuid
from dataclasses import replace
from typing import Callable

from typing import Any

from mitmproxy import http, tls
from mitmproxy.net.http import status_codes
from OpenSSL import crypto

from sidecar.context_guard import read_body_confined
from sidecar.errors import Refusal, deny, outcome_body, unavailable
from sidecar.idempotency import Receipt
from sidecar.logs import get_fast_logger, get_logger
from sidecar.mtls import CertificateRejected, ClientCertVerifier
from sidecar.parse import correlation_id, traceparent
from sidecar.pipeline import Decision, Pipeline
from sidecar.recording import record_decision
from sidecar.request import RawRequest
from sidecar.upstream import NotSent, OutcomeUnknown

log = get_logger("sidecar.request")
request_log = get_fast_logger("sidecar.request")  # the one line per request: same processors, no stdlib detour
META = "fhir_sidecar"
STATUS_PREFIX = b"/.fhir-sidecar/requests/"
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade")
_HOP_SET = frozenset(HOP_BY_HOP)
# flow.metadata keys
_COUNTED, _HOST, _RAW, _WHEN, _CORR = META + ".counted", META + ".host", META + ".raw", META + ".when", META + ".corr"
_OWN, _SENT, _ORPHAN, _REWRITTEN, _FINISHED = (META + ".own-write", META + ".sent", META + ".orphan", META + ".rewritten",
                                               META + ".finished")
_UPSTREAM_STATUS = META + ".upstream-status"  # set when the sidecar replaced the EHR's answer
_LOCATIONS = ("location", "content-location")


def _fast_response_ok() -> bool:
    """`_make_response` fills mitmproxy's dataclasses directly (their __post_init__ type check costs ~20 µs
    a response); only while they look exactly like the ones it was written for (mitmproxy 11)."""
    try:
        import dataclasses

        names = {f.name for f in dataclasses.fields(http.ResponseData)}
        probe = http.Response.make(200, b"", [])
        return names == {"http_version", "status_code", "reason", "headers", "content", "trailers",
                         "timestamp_start", "timestamp_end"} and set(vars(probe)) == {"data"}
    except Exception:
        return False


_FAST_RESPONSE = _fast_response_ok()


def _make_response(status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> http.Response:
    """A response with exactly these header fields and body (the caller has set Content-Length)."""
    now = time.time()
    reason = status_codes.RESPONSES.get(status, "").encode()
    if not _FAST_RESPONSE:
        return http.Response(b"HTTP/1.1", status, reason, http.Headers(fields), body, None, now, now)
    data = object.__new__(http.ResponseData)
    data.http_version, data.status_code, data.reason = b"HTTP/1.1", status, reason
    data.headers, data.content, data.trailers = http.Headers(fields), body, None
    data.timestamp_start = data.timestamp_end = now
    resp = object.__new__(http.Response)
    resp.data = data
    return resp


def refusal_response(refusal: Refusal, correlation: str) -> http.Response:
    headers = [(b"content-type", b"application/fhir+json"), (b"x-correlation-id", correlation.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers]
    return http.Response.make(refusal.status, outcome_body(refusal, correlation), headers)


def upstream_headers(d: Decision, upstream: tuple[str, int, str], client_ip: str | None) -> list[tuple[bytes, bytes]]:
    """The only headers that go upstream: the allowlist, ours, and the credential that applies."""
    req = d.request
    assert req is not None
    headers = dict(req.headers)
    if d.principal is not None and d.principal.auth == "bearer" and "authorization" in req.credentials:
        # a SMART app keeps its own verified token, so the EHR enforces what it reads too
        headers["authorization"] = req.credentials["authorization"]
    if d.authorization is not None:
        headers["authorization"] = d.authorization  # the EHR credential; the app's was never forwarded
    if d.prior is not None and d.prior.etag is not None:
        headers["if-match"] = d.prior.etag  # nothing may change between the check and the write
    fields: list[tuple[bytes, bytes]] = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    host, port, scheme = upstream
    default_port = 443 if scheme == "https" else 80
    fields.append((b"host", (host if port == default_port else f"{host}:{port}").encode()))
    fields.append((b"x-correlation-id", d.correlation_id.encode()))
    fields.append((b"traceparent", d.traceparent.encode()))
    fields.append((b"accept-encoding", b"identity"))  # plain responses: URLs can be rewritten
    if client_ip:
        fields.append((b"x-forwarded-for", client_ip.encode()))
    if req.raw_body:
        fields.append((b"content-length", str(len(req.raw_body)).encode()))
    return fields


def replay_response(receipt: Receipt, correlation: str) -> http.Response:
    """A repeated write answered from its receipt: the original status, nothing forwarded."""
    headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in receipt.response_headers()]
    headers.append((b"x-correlation-id", correlation.encode()))
    return http.Response.make(receipt.status, receipt.body or b"", headers)


def raw_request(flow: http.HTTPFlow, mode: str, peer: str | None = None) -> RawRequest:
    r = flow.request
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in r.headers.fields)
    meta = flow.metadata.get(_HOST)
    return RawRequest(
        method=r.data.method.decode("ascii", "replace"),  # as sent: `Request.method` upper-cases
        target=r.data.path,
        headers=headers,
        body=r.raw_content or b"",
        scheme="https" if flow.client_conn.tls_established else "http",
        authority=r.data.authority.decode("latin-1") if (mode == "reverse" and r.http_version.startswith("HTTP/1")) else "",
        host=meta or "",
        client_addr=flow.client_conn.peername[0] if flow.client_conn.peername else "",
        mode=mode,
        peer_client=peer,
    )


class SidecarAddon:
    """`pipeline_ref` returns the current pipeline: a reload swaps it between requests."""

    def __init__(self, pipeline_ref: Callable[[], Pipeline], *, mode: str, upstream_host: str,
                 upstream_port: int, upstream_scheme: str, upstream_base: str, base_path: str,
                 writer: Any = None, require_tls: bool = False,
                 mtls: ClientCertVerifier | None = None) -> None:
        self._pipeline = pipeline_ref
        self.writer = writer
        # the lean client's bytes-level entry point (no URL to re-parse, no header re-encoding)
        self._send_target = getattr(writer, "send_target", None)
        self.require_tls = require_tls
        self.mtls = mtls
        self.review_polls = True  # GET /.fhir-sidecar/requests/{id} (held writes)
        self.recorder: Any = None  # sidecar.recording.Recorder when `recording:` is configured
        self._peer_ids: dict[str, str] = {}   # client connection id -> verified mTLS client id
        self.mode = mode
        self.upstream = (upstream_host, upstream_port, upstream_scheme)
        self.upstream_base = upstream_base
        self.base_path = base_path
        self.inflight = 0
        self.draining = False
        self._rewrites: dict[tuple[bool, str], tuple[str, tuple[tuple[bytes, bytes], ...]]] = {}
        self._pending: set[asyncio.Task[None]] = set()  # finishes running after their answer left
        # Hooks this configuration never needs are switched off on the instance (mitmproxy skips a hook
        # whose attribute is None): no per-connection call for them.
        if mtls is None:
            self.tls_established_client = None  # type: ignore[assignment]
            self.client_disconnected = None  # type: ignore[assignment]
        if mode != "forward":
            self.http_connect = None  # type: ignore[assignment]  # CONNECT exists only in forward mode

    # -- hooks ---------------------------------------------------------------------------------

    def running(self) -> None:
        """mitmproxy's Master puts a handler on the root logger that turns every log record into the
        deprecated `add_log` hook: it formats the record (unredacted, in memory), wakes the event loop
        through its self-pipe (a syscall per line) and runs an addon round. None of the sidecar's addons
        implements `add_log`, so that handler only costs; it is removed (our redacting handler stays)."""
        try:
            from mitmproxy import ctx
            from mitmproxy.addonmanager import traverse

            master = ctx.master
            legacy = getattr(master, "_legacy_log_events", None)
            if legacy is None or any(getattr(a, "add_log", None) is not None for a in traverse(master.addons.chain)):
                return
            legacy.uninstall()
        except Exception as e:  # only a cost: never a reason to stop
            log.warning("could not remove mitmproxy's add_log handler", error_type=type(e).__name__)

    def tls_established_client(self, data: tls.TlsData) -> None:
        """mTLS: mitmproxy asks for a client certificate but does not verify it; we do, once per
        connection, from the handshake's own peer certificate (not mitmproxy's parsed list)."""
        if self.mtls is None:
            return
        conn_id = data.context.client.id
        try:
            ssl_conn = data.ssl_conn
            leaf = ssl_conn.get_peer_certificate() if ssl_conn is not None else None
            if leaf is None:
                return  # no certificate presented: other credentials may follow
            chain = [leaf] + [c for c in (ssl_conn.get_peer_cert_chain() or [])]
            der = [crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain]
            self._peer_ids[conn_id] = self.mtls.verify(der)
        except CertificateRejected as e:
            self._peer_ids[conn_id] = "!" + e.reason  # a presented certificate that fails: 401 later
        except Exception as e:
            self._peer_ids[conn_id] = "!client certificate could not be verified"
            log.error("mtls verification failed", error_type=type(e).__name__)

    def client_disconnected(self, client: Any) -> None:
        self._peer_ids.pop(getattr(client, "id", None), None)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Forward mode: CONNECT only to the EHR; anything else is refused, never tunnelled."""
        try:
            host, port, _ = self.upstream
            if flow.request.host.lower() != host.lower() or flow.request.port != port:
                corr = str(uuid.uuid4())
                flow.response = refusal_response(deny("destination is not the EHR"), corr)
                log.warning("connect refused", correlation_id=corr, status=403, decision="deny")
        except BaseException:
            flow.response = http.Response.make(503, b"", {"content-type": "text/plain"})
            raise

    async def request(self, flow: http.HTTPFlow) -> None:
        corr = "unknown-correlation"
        forwarding = False
        try:
            self.inflight += 1
            md = flow.metadata
            md[_COUNTED] = True
            # the Host the app addressed (keep_host_header): response URLs are rewritten to it
            md[_HOST] = flow.request.host_header or ""
            peer = self._peer_ids.get(flow.client_conn.id) if self._peer_ids else None
            raw = raw_request(flow, self.mode, peer)
            md[_RAW] = raw
            corr = correlation_id(raw)
            if self.review_polls and raw.method == "GET" and raw.target.startswith(STATUS_PREFIX):
                await self._answer_poll(flow, raw, corr)
                return
            if self.draining:
                decision = Decision(corr, "", time.monotonic(), unavailable("sidecar is shutting down", 1))
            elif self.require_tls and not flow.client_conn.tls_established:
                decision = Decision(corr, "", time.monotonic(), deny("this listener requires TLS"))
            elif self.mode == "forward" and not self._is_upstream(flow):
                decision = Decision(corr, "", time.monotonic(), deny("destination is not the EHR"))
            elif self.mode == "transparent" and not flow.client_conn.tls_established and self.upstream[2] == "https":
                # the app spoke plain HTTP to an HTTPS EHR address: never downgrade, never guess
                decision = Decision(corr, "", time.monotonic(), deny("plain HTTP to the EHR refused"))
            else:
                if self.recorder is not None:  # the recording's timestamp; nothing else reads it
                    md[_WHEN] = datetime.now(timezone.utc)
                decision = await self._pipeline().decide(raw, corr, traceparent(raw))
            md[META] = decision
            if decision.refusal is not None:
                flow.response = refusal_response(decision.refusal, corr)
                return
            if decision.replay is not None:
                flow.response = replay_response(decision.replay, corr)
                return
            self._prepare_upstream(flow, decision)
            if self.writer is not None:
                # requests leave through the sidecar's own client: timeouts (504), pins checked before
                # a byte is sent, honest outcomes; mitmproxy serves the apps' side
                await self._send_write(flow, decision)
                return
            forwarding = True  # the one way out that lets mitmproxy forward
        except BaseException as e:
            flow.response = refusal_response(unavailable("internal error; nothing was forwarded"), corr)
            log.error("request hook failed", correlation_id=corr, error_type=type(e).__name__, status=503)
            if not isinstance(e, Exception):
                raise
        finally:
            # whatever happened above, a flow without an answer here would go upstream: fail closed
            if not forwarding and flow.response is None:
                flow.response = refusal_response(unavailable("internal error; nothing was forwarded"), corr)

    async def response(self, flow: http.HTTPFlow) -> None:
        try:
            md = flow.metadata
            d: Decision | None = md.get(META)
            resp = flow.response
            if resp is None:
                return
            corr = d.correlation_id if d else md.get(_CORR, "")
            forwarded = d is not None and d.forward  # before a refusal of the answer below turns it off
            if d is not None and d.forward and d.confine_patient and d.principal is not None:
                # a read under patient/ scopes: the answer must belong to the context patient
                ok = resp.status_code != 200 or (
                    "content-encoding" not in resp.headers
                    and read_body_confined(resp.raw_content or b"", d.principal, self.upstream_base))
                if not ok:
                    md[_UPSTREAM_STATUS] = resp.status_code  # the EHR's answer, for the breaker and the record
                    flow.response = resp = refusal_response(deny("patient context: the resource belongs to another patient"), corr)
                    d = replace(d, refusal=deny("patient context: the resource belongs to another patient"))
                    md[META] = d
            if d is not None and forwarded:
                if md.get(_OWN):
                    # our own exchange: its answer already carries the correlation id and rewritten URLs
                    # (or is our 502/504, which carries the id and has no upstream URL in it)
                    if self._finish_can_follow(d, resp.status_code, md.get(_SENT)):
                        self._finish_after_answer(flow, d)
                        return
                    await self._finish_own_write(flow, d)
                    return
                if corr:
                    resp.headers["x-correlation-id"] = corr
                if self.mode == "reverse" and not md.get(_REWRITTEN):
                    self._rewrite_urls(flow)
                await self._finish_answered(flow, d, resp)
            self._log(d, resp.status_code)
            self._record(flow, d, resp.status_code)
        except Exception as e:
            # The request already went upstream: the app gets the upstream's true answer (a false
            # failure would invite a duplicate write); the failure is logged loudly.
            log.error("response hook failed", error_type=type(e).__name__)
        finally:
            self._done(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        try:
            d: Decision | None = flow.metadata.get(META)
            msg = flow.error.msg if flow.error else ""
            client_side = msg.startswith("Client disconnected")
            log.warning("flow error", error_type=msg[:80], correlation_id=d.correlation_id if d else None)
            if d is None or not d.forward:
                return
            if flow.metadata.get(_OWN):
                if _SENT in flow.metadata:
                    await self._finish_own_write(flow, d)  # answered, but the app left before the answer
                else:
                    flow.metadata[_ORPHAN] = True  # the exchange still runs and records itself
                return
            # a read mitmproxy forwarded: only a failure on the EHR's side counts against the breaker
            await self._pipeline().finish(d, None, self._raw(flow), outcome="unknown", sent=True,
                                          upstream_failed=not client_side)
            self._log(d, 499 if client_side else 502)
            self._record(flow, d, 499 if client_side else 502)
        except Exception as e:
            log.error("error hook failed", error_type=type(e).__name__)
        finally:
            self._done(flow)

    # -- helpers -------------------------------------------------------------------------------

    async def _send_write(self, flow: http.HTTPFlow, d: Decision) -> None:
        """The request leaves through our client. A write is shielded: if the app disconnects (and
        mitmproxy cancelled this hook), the exchange with the EHR still completes and its outcome is
        recorded. A read is awaited directly (a task per read costs ~8 µs); should its hook be cancelled,
        the exchange is dropped and the `read` record says the outcome is unknown."""
        flow.metadata[_OWN] = True
        if d.classification is None or d.classification.is_write:
            await asyncio.shield(asyncio.ensure_future(self._exchange(flow, d)))
            return
        try:
            await self._exchange(flow, d)
        except asyncio.CancelledError:
            if _SENT not in flow.metadata:
                flow.metadata[_SENT] = "unknown"
                task = asyncio.ensure_future(self._finish_own_write(flow, d))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            raise

    async def _exchange(self, flow: http.HTTPFlow, d: Decision) -> None:
        assert self.writer is not None
        r = flow.request
        host, port, scheme = self.upstream
        try:
            if self._send_target is not None:
                # the fields _prepare_upstream set; the client drops Host/Content-Length and sets its own
                ans = await self._send_target(r.method, scheme, host, port, r.data.path, list(r.headers.fields),
                                              r.raw_content or b"")
            else:
                url = f"{scheme}://{host}:{port}{r.path}"
                headers = [(k, v) for k, v in r.headers.items(multi=True) if k.lower() not in ("host", "content-length")]
                ans = await self.writer.send(r.method, url, headers, r.raw_content or b"")
        except NotSent as e:
            log.warning("upstream not reached", correlation_id=d.correlation_id, error_type=str(e)[:60])
            flow.metadata[_SENT] = "not-sent"
            flow.response = refusal_response(Refusal(502, "the EHR could not be reached; nothing was sent", "transient"),
                                             d.correlation_id)
        except OutcomeUnknown as e:
            log.warning("upstream outcome unknown", correlation_id=d.correlation_id, error_type=str(e)[:60])
            flow.metadata[_SENT] = "unknown"
            write = d.classification is not None and d.classification.is_write
            reason = ("the EHR did not answer in time: the outcome is unknown; do not retry without reconciling "
                      "(an Idempotency-Key stays reserved)") if write else "the EHR did not answer in time"
            flow.response = refusal_response(Refusal(504, reason, "timeout"), d.correlation_id)
        else:
            flow.metadata[_SENT] = "answered"
            # before any receipt is cut from it, also for an app that left
            flow.response = self._own_response(flow, d, ans)
            if self.mode == "reverse":
                flow.metadata[_REWRITTEN] = True
        if flow.metadata.get(_ORPHAN):
            await self._finish_own_write(flow, d)

    def _own_response(self, flow: http.HTTPFlow, d: Decision, ans: Any) -> http.Response:
        """The app's answer from the EHR's: hop-by-hop fields dropped, in reverse mode the EHR's URLs in
        Location / Content-Location / the body pointed at the sidecar, our Content-Length and
        X-Correlation-ID."""
        body = ans.body
        rw = self._rewriter(flow) if self.mode == "reverse" else None
        up = self.upstream_base
        fields: list[tuple[bytes, bytes]] = []
        encoded = False
        for k, v in ans.headers:
            k = k.lower()
            if k == "content-length" or k == "x-correlation-id" or k in _HOP_SET:
                continue
            if k == "content-encoding":
                encoded = True
            elif rw is not None and k in _LOCATIONS and (v == up or v.startswith(up + "/")):
                v = rw[0] + v[len(up):]
            fields.append((k.encode(), v.encode("latin-1")))
        if rw is not None and body and not encoded:
            new = body
            for a, b in rw[1]:
                new = new.replace(a, b)
            body = new
        fields.append((b"content-length", str(len(body)).encode()))
        if d.correlation_id:
            fields.append((b"x-correlation-id", d.correlation_id.encode()))
        return _make_response(ans.status, fields, body)

    def _rewriter(self, flow: http.HTTPFlow) -> tuple[str, tuple[tuple[bytes, bytes], ...]] | None:
        """(the sidecar's base as the app addressed it, the body replacements), per Host: computed once."""
        host = flow.metadata.get(_HOST)
        if not host:
            return None
        key = (flow.client_conn.tls_established, host)
        rw = self._rewrites.get(key)
        if rw is None:
            ours = f"{'https' if key[0] else 'http'}://{host}{self.base_path}"
            up = self.upstream_base
            pairs = []
            for a, b in ((up, ours), (up.replace("/", "\\/"), ours.replace("/", "\\/"))):
                pairs += [(f'"{a}/'.encode(), f'"{b}/'.encode()), (f'"{a}"'.encode(), f'"{b}"'.encode())]
            rw = (ours, tuple(pairs))
            if len(self._rewrites) >= 256:  # Host is the app's to choose: bounded
                self._rewrites.clear()
            self._rewrites[key] = rw
        return rw

    @staticmethod
    def _finish_can_follow(d: Decision, status: int, sent: str | None) -> bool:
        """Whether a write's bookkeeping may run after its answer has left: only when it cannot change how
        the next request is admitted -- no Idempotency-Key receipt (an immediate retry must be replayed, not
        told "in flight"), and an answer that is neither a back-off (429/503 + Retry-After) nor a failure the
        breaker counts (5xx), nor our own 502/504."""
        return (d.reservation is None and d.classification is not None and d.classification.is_write
                and sent == "answered" and status < 500 and status != 429)

    def _finish_after_answer(self, flow: http.HTTPFlow, d: Decision) -> None:
        """A write's answer leaves now and its bookkeeping (the `outcome` record -- written without fsync
        either way --, the breaker's success, metrics, alerts, the log line) runs right after it, off the
        app's latency (see `_finish_can_follow`). The request stays counted in flight until that is done,
        so a drain still waits for its outcome record."""
        counted = bool(flow.metadata.pop(_COUNTED, False))
        task = asyncio.ensure_future(self._finish_later(flow, d, counted))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish_later(self, flow: http.HTTPFlow, d: Decision, counted: bool) -> None:
        try:
            await self._finish_own_write(flow, d)
        except Exception as e:
            log.error("response hook failed", error_type=type(e).__name__)
        finally:
            if counted:
                self.inflight -= 1

    async def _finish_own_write(self, flow: http.HTTPFlow, d: Decision) -> None:
        md = flow.metadata
        if md.get(_FINISHED):
            return  # exactly once per exchange (response, error and a cancelled read may all get here)
        md[_FINISHED] = True
        sent, resp = md.get(_SENT), flow.response
        pipeline = self._pipeline()
        if sent in ("not-sent", "unknown") or resp is None:
            await pipeline.finish(d, None, self._raw(flow), outcome="failed" if sent == "not-sent" else "unknown",
                                  sent=sent != "not-sent")
            self._log(d, 502 if sent == "not-sent" else 504)
            self._record(flow, d, 502 if sent == "not-sent" else 504)
            return
        await self._finish_answered(flow, d, resp)
        self._log(d, resp.status_code)
        self._record(flow, d, resp.status_code)

    async def _finish_answered(self, flow: http.HTTPFlow, d: Decision, resp: http.Response) -> None:
        """The pipeline's after-answer steps on the EHR's status (not a refusal the sidecar put in its
        place); the answer's headers and body are copied out only when a receipt or Retry-After needs them."""
        status = flow.metadata.get(_UPSTREAM_STATUS, resp.status_code)
        pipeline = self._pipeline()
        if pipeline.needs_answer(d, status):
            await pipeline.finish(d, status, self._raw(flow),
                                  headers=tuple((k, v) for k, v in resp.headers.items(multi=True)),
                                  body=resp.raw_content or b"")
        else:
            await pipeline.finish(d, status, self._raw(flow))

    async def _answer_poll(self, flow: http.HTTPFlow, raw: RawRequest, corr: str) -> None:
        """FHIR's asynchronous pattern for held writes: 202 while pending, then the outcome."""
        from sidecar.approvals.service import item_id_from_status_path

        item_id = item_id_from_status_path(raw.target.decode("ascii", "replace").split("?", 1)[0])
        if item_id is None:
            flow.response = refusal_response(deny("unknown status URL"), corr)
            return
        try:
            status, body = await self._pipeline().poll(raw, corr, item_id)
        except Refusal as r:
            flow.response = refusal_response(r, corr)
            return
        headers = [(b"content-type", b"application/fhir+json"), (b"x-correlation-id", corr.encode())]
        if status == 202:
            headers.append((b"retry-after", b"10"))
        flow.response = http.Response.make(status, json.dumps(body).encode(), headers)

    def _record(self, flow: http.HTTPFlow, d: Decision | None, status: int) -> None:
        if self.recorder is not None and d is not None:
            record_decision(self.recorder, flow.metadata.get(_RAW), d, status, flow.metadata.get(_WHEN))

    def _raw(self, flow: http.HTTPFlow) -> RawRequest:
        raw = flow.metadata.get(_RAW)
        return raw if raw is not None else raw_request(flow, self.mode)

    def _done(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(_COUNTED, False):
            self.inflight -= 1

    def _is_upstream(self, flow: http.HTTPFlow) -> bool:
        host, port, scheme = self.upstream
        r = flow.request
        return r.host.lower() == host.lower() and r.port == port and r.scheme == scheme

    def _prepare_upstream(self, flow: http.HTTPFlow, d: Decision) -> None:
        req = d.request
        assert req is not None
        r = flow.request
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        fields = upstream_headers(d, self.upstream, peer)
        r.headers.fields = tuple(fields)  # replace in place: a new Headers object costs type checks
        r.method = req.method  # always: the classified method is the one that leaves
        if self.mode == "transparent":
            # iptables sent us whatever the app addressed: the only place we ever connect is the EHR
            host, port, scheme = self.upstream
            r.scheme, r.host, r.port = scheme, host, port
        if (r.raw_content or b"") != req.raw_body:
            r.raw_content = req.raw_body

    def _rewrite_urls(self, flow: http.HTTPFlow) -> None:
        """Upstream URLs in the answer point at the sidecar, so apps never learn a way around."""
        resp = flow.response
        assert resp is not None
        rw = self._rewriter(flow)
        if rw is None:
            return
        ours = rw[0]
        up = self.upstream_base
        for name in _LOCATIONS:
            v = resp.headers.get(name)
            if v and (v == up or v.startswith(up + "/")):
                resp.headers[name] = ours + v[len(up):]
        body = resp.raw_content
        if body and "content-encoding" not in resp.headers:
            new = body
            for a, b in rw[1]:
                new = new.replace(a, b)
            if new is not body and new != body:
                resp.raw_content = new
                resp.headers["content-length"] = str(len(new))
        for h in HOP_BY_HOP[1:3]:
            resp.headers.pop(h, None)

    def _log(self, d: Decision | None, status: int) -> None:
        if d is None or not request_log.is_enabled_for(logging.INFO):
            return
        ev = {
            "correlation_id": d.correlation_id,
            "traceparent": d.traceparent or None,
            "status": status,
            "latency_ms": round((time.monotonic() - d.started) * 1000, 2),
            "decision": "allow" if d.forward else d.refusal.decision if d.refusal else "error",
        }
        if d.classification is not None:
            ev["interaction"] = d.classification.interaction
        if d.request is not None and d.request.target.resource_type:
            ev["resource_type"] = d.request.target.resource_type
        if d.principal is not None and d.principal.client_id:
            ev["client_id"] = d.principal.client_id
        if d.refusal is not None:
            ev["reasons"] = [d.refusal.reason]
        request_log.info("request", **ev)
