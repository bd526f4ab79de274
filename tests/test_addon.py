"""The adapter's own pieces: answers built without mitmproxy's type checks, URL rewriting on them, hooks
switched off when a configuration never needs them, the once-only finish, and the log handler it drops."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from sidecar import addon as addon_mod
from sidecar.addon import META, SidecarAddon, _make_response
from sidecar.pipeline import Decision
from sidecar.upstream import Answer

UP = "http://ehr.internal:8080/fhir/R4"


def make_addon(mode: str = "reverse", mtls: Any = None, pipeline: Any = None) -> SidecarAddon:
    return SidecarAddon(lambda: pipeline, mode=mode, upstream_host="ehr.internal", upstream_port=8080,
                        upstream_scheme="http", upstream_base=UP, base_path="/fhir/R4", writer=None, mtls=mtls)


def test_fast_response_matches_mitmproxys_own() -> None:
    assert addon_mod._FAST_RESPONSE  # mitmproxy 11's dataclasses, as _make_response expects
    fields = [(b"content-type", b"application/fhir+json"), (b"content-length", b"2"), (b"x-a", b"1")]
    fast = _make_response(201, fields, b"{}")
    slow = http.Response(b"HTTP/1.1", 201, b"Created", http.Headers(fields), b"{}", None, 1.0, 1.0)
    for attr in ("http_version", "status_code", "reason", "raw_content", "trailers"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    assert fast.headers.fields == slow.headers.fields
    assert fast.timestamp_start and fast.timestamp_end
    assert bytes(fast.data.headers.fields[0][0]) == b"content-type"
    fast.headers["x-b"] = "2"  # a normal, mutable mitmproxy response
    assert fast.headers["x-b"] == "2"


def test_slow_response_when_mitmproxy_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addon_mod, "_FAST_RESPONSE", False)
    r = _make_response(200, [(b"content-length", b"1")], b"x")
    assert r.status_code == 200 and r.raw_content == b"x" and r.reason == "OK"


def _flow(host: str = "sidecar.local:8443") -> http.HTTPFlow:
    f = tflow.tflow()  # a client connection with TLS established
    assert f.client_conn.tls_established
    f.metadata[addon_mod._HOST] = host
    return f


def test_own_response_rewrites_and_reframes() -> None:
    a = make_addon()
    body = (f'{{"link":[{{"url":"{UP}/Observation?x=1"}}],"fullUrl":"{UP}/Observation/1",'
            f'"esc":"{UP.replace("/", chr(92) + "/")}/Observation/2","exact":"{UP}"}}').encode()
    ans = Answer(200, (("Content-Type", "application/fhir+json"), ("Location", f"{UP}/Observation/1/_history/2"),
                       ("Content-Location", "https://elsewhere.example/x"), ("Content-Length", "999"),
                       ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
                       ("X-Correlation-ID", "upstream-made-up"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")), body)
    d = Decision("corr-12345678", "", 0.0)
    r = a._own_response(_flow(), d, ans)
    ours = "https://sidecar.local:8443/fhir/R4"
    assert r.headers["location"] == f"{ours}/Observation/1/_history/2"
    assert r.headers["content-location"] == "https://elsewhere.example/x"  # not the EHR's: left alone
    assert UP.encode() not in r.raw_content and UP.replace("/", "\\/").encode() not in r.raw_content
    assert f'"{ours}"'.encode() in r.raw_content
    assert r.headers["content-length"] == str(len(r.raw_content))
    assert r.headers.get_all("x-correlation-id") == ["corr-12345678"]
    assert r.headers.get_all("set-cookie") == ["a=1", "b=2"]
    for hop in ("connection", "keep-alive", "transfer-encoding"):
        assert hop not in r.headers


def test_own_response_leaves_encoded_bodies_and_other_modes_alone() -> None:
    body = f'{{"fullUrl":"{UP}/Observation/1"}}'.encode()
    ans = Answer(200, (("Content-Encoding", "gzip"), ("Location", f"{UP}/Observation/1")), body)
    r = make_addon()._own_response(_flow(), Decision("c" * 16, "", 0.0), ans)
    assert r.raw_content == body and r.headers["location"].startswith("https://sidecar.local:8443/")
    r = make_addon("transparent")._own_response(_flow(), Decision("c" * 16, "", 0.0), ans)
    assert r.raw_content == body and r.headers["location"] == f"{UP}/Observation/1"


def test_rewrites_are_cached_per_host_and_bounded() -> None:
    a = make_addon()
    for i in range(300):
        a._rewriter(_flow(host=f"h{i}:1"))
    assert len(a._rewrites) <= 256
    assert a._rewriter(_flow(host="")) is None


def test_hooks_a_configuration_never_needs_are_off() -> None:
    a = make_addon("reverse")
    assert a.http_connect is None and a.tls_established_client is None and a.client_disconnected is None
    f = make_addon("forward")
    assert callable(f.http_connect) and f.tls_established_client is None
    m = make_addon("reverse", mtls=object())
    assert callable(m.tls_established_client) and callable(m.client_disconnected)
    assert callable(a.request) and callable(a.response) and callable(a.error)


class _Pipeline:
    def __init__(self) -> None:
        self.finished: list[Any] = []

    @staticmethod
    def needs_answer(d: Any, status: Any) -> bool:
        return False

    async def finish(self, d: Any, status: Any, raw: Any, **kw: Any) -> None:
        await asyncio.sleep(0)
        self.finished.append((status, kw))


async def test_finish_runs_once_per_exchange() -> None:
    p = _Pipeline()
    a = make_addon(pipeline=p)
    f = _flow()
    f.response = _make_response(200, [(b"content-length", b"0")], b"")
    f.metadata[addon_mod._SENT] = "answered"
    f.metadata[addon_mod._RAW] = SimpleNamespace()
    d = Decision("c" * 16, "", 0.0)
    await asyncio.gather(a._finish_own_write(f, d), a._finish_own_write(f, d))
    await a._finish_own_write(f, d)
    assert p.finished == [(200, {})]


async def test_a_cancelled_read_is_still_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _Pipeline()
    a = make_addon(pipeline=p)
    a.writer = object()
    started = asyncio.Event()

    async def hang(flow: Any, d: Any) -> None:
        started.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(a, "_exchange", hang)
    f = _flow()
    f.metadata[addon_mod._RAW] = SimpleNamespace()
    d = Decision("c" * 16, "", 0.0, classification=SimpleNamespace(is_write=False, interaction="read"))
    task = asyncio.ensure_future(a._send_write(f, d))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*a._pending)
    assert p.finished == [(None, {"outcome": "unknown", "sent": True})]
    assert f.metadata[META + ".sent"] == "unknown"


def test_running_drops_mitmproxys_add_log_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import ctx, log

    class Legacy(log.MitmLogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            raise AssertionError("no record may reach the add_log handler")

    legacy = Legacy()
    legacy.install()
    a = make_addon()
    try:
        monkeypatch.setattr(ctx, "master", SimpleNamespace(_legacy_log_events=legacy,
                                                           addons=SimpleNamespace(chain=[object(), a])),
                            raising=False)
        a.running()
        assert legacy not in logging.getLogger().handlers
        logging.getLogger("sidecar.test").warning("after")
        # an addon that still uses the deprecated hook keeps it
        legacy.install()
        monkeypatch.setattr(ctx.master.addons, "chain", [SimpleNamespace(add_log=lambda e: None), a])
        a.running()
        assert legacy in logging.getLogger().handlers
    finally:
        legacy.uninstall()


async def test_a_write_without_a_key_is_finished_after_its_answer_and_counted_until_then() -> None:
    p = _Pipeline()
    a = make_addon(pipeline=p)
    f = _flow()
    f.response = _make_response(201, [(b"content-length", b"0")], b"")
    f.metadata.update({addon_mod._SENT: "answered", addon_mod._RAW: SimpleNamespace(), addon_mod._OWN: True,
                       addon_mod._COUNTED: True})
    write = SimpleNamespace(is_write=True, interaction="create")
    f.metadata[META] = Decision("c" * 16, "", 0.0, classification=write)
    a.inflight = 1
    await a.response(f)
    assert p.finished == [] and a.inflight == 1  # the answer is out; the bookkeeping is not done yet
    await asyncio.gather(*a._pending)
    assert p.finished == [(201, {})] and a.inflight == 0
    # with an Idempotency-Key the receipt is stored before the answer leaves
    f2 = _flow()
    f2.response = _make_response(201, [(b"content-length", b"0")], b"")
    f2.metadata.update({addon_mod._SENT: "answered", addon_mod._RAW: SimpleNamespace(), addon_mod._OWN: True,
                        addon_mod._COUNTED: True})
    f2.metadata[META] = Decision("c" * 16, "", 0.0, classification=write, reservation=SimpleNamespace(key="k"))
    a.inflight = 1
    await a.response(f2)
    assert p.finished == [(201, {}), (201, {})] and a.inflight == 0 and not a._pending


def test_only_bookkeeping_that_cannot_change_admission_follows_the_answer() -> None:
    write = SimpleNamespace(is_write=True, interaction="create")
    read = SimpleNamespace(is_write=False, interaction="read")
    d = Decision("c" * 16, "", 0.0, classification=write)
    can = SidecarAddon._finish_can_follow
    assert can(d, 201, "answered") and can(d, 200, "answered") and can(d, 412, "answered")
    for status in (429, 500, 502, 503, 504):  # back-off and breaker state first: the next request sees them
        assert not can(d, status, "answered"), status
    assert not can(d, 504, "unknown") and not can(d, 502, "not-sent")
    assert not can(Decision("c" * 16, "", 0.0, classification=write, reservation=SimpleNamespace()), 201, "answered")
    assert not can(Decision("c" * 16, "", 0.0, classification=read), 200, "answered")
