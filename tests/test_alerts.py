"""Anomaly alert rules (each fires / does not), dedupe, config, and the webhook sender."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from sidecar.alerts import (
    ALERT_KINDS, Alert, AlertEngine, AlertEvent, AlertsConfig, WebhookConfig, WebhookSender,
)
from sidecar.audit.record import validate_fields
from sidecar.logs import SAFE_KEYS

BERLIN = ZoneInfo("Europe/Berlin")
NOON = datetime(2024, 6, 3, 12, 0, tzinfo=BERLIN).timestamp()       # a Monday, 12:00 local


def ev(ts: float = NOON, client: str | None = "scribe-app", *, write: bool = True,
       decision: str = "allow", ip: str | None = "10.1.2.3", status: int | None = 201,
       failed: bool = False, cid: str | None = "corr-1") -> AlertEvent:
    return AlertEvent(ts=ts, client_id=client, source_ip=ip, is_write=write, decision=decision,
                      upstream_status=status, upstream_failed=failed, correlation_id=cid)


def engine(**cfg: Any) -> AlertEngine:
    cfg.setdefault("timezone", "Europe/Berlin")
    return AlertEngine(AlertsConfig.model_validate(cfg), clients=["scribe-app", "lab-feed"])


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind for a in alerts]


# ------------------------------------------------------------------ rules

def test_write_volume() -> None:
    e = engine(max_writes=3, window_s=60)
    assert [kinds(e.observe(ev(NOON + i))) for i in range(3)] == [[], [], []]
    fired = e.observe(ev(NOON + 3))
    assert kinds(fired) == ["write_volume"] and fired[0].count == 4 and fired[0].window_s == 60
    assert fired[0].client_id == "scribe-app" and fired[0].correlation_id == "corr-1"
    # spread out over more than the window: never more than 3 in any 60 s
    e = engine(max_writes=3, window_s=60)
    assert all(e.observe(ev(NOON + 25 * i)) == [] for i in range(20))
    # reads, denied writes and other clients do not count
    e = engine(max_writes=1, window_s=60, max_denials=None)
    assert e.observe(ev(write=False)) == [] and e.observe(ev(write=False)) == []
    assert e.observe(ev(decision="deny")) == [] and e.observe(ev(decision="deny")) == []
    assert e.observe(ev()) == [] and e.observe(ev(client="lab-feed")) == []
    assert kinds(e.observe(ev())) == ["write_volume"]


def test_write_volume_per_client_override() -> None:
    e = engine(max_writes=100, clients={"lab-feed": {"max_writes": 1}})
    assert e.observe(ev(client="lab-feed")) == []
    assert kinds(e.observe(ev(client="lab-feed"))) == ["write_volume"]
    assert e.observe(ev()) == [] and e.observe(ev()) == []


def test_off_hours() -> None:
    e = engine(hours="07:00-19:00")
    at = lambda h, m=0: datetime(2024, 6, 3, h, m, tzinfo=BERLIN).timestamp()  # noqa: E731
    assert e.observe(ev(at(7, 0))) == [] and e.observe(ev(at(18, 59))) == []
    assert e.observe(ev(at(6, 59), write=False)) == []                # reads are not checked
    assert kinds(e.observe(ev(at(19, 0)))) == ["off_hours"]           # end is exclusive
    # the timezone matters: 12:00 UTC is 14:00 in Berlin (summer), 05:00 in Los Angeles
    utc_noon = datetime(2024, 6, 3, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    assert engine(hours="07:00-19:00").observe(ev(utc_noon)) == []
    la = engine(hours="07:00-19:00", timezone="America/Los_Angeles")
    assert kinds(la.observe(ev(utc_noon))) == ["off_hours"]


def test_off_hours_overnight_window_and_client_override() -> None:
    e = engine(hours="07:00-19:00", clients={"lab-feed": {"hours": "22:00-06:00"}})
    night = datetime(2024, 6, 3, 23, 30, tzinfo=BERLIN).timestamp()
    assert e.observe(ev(night, client="lab-feed")) == []
    assert kinds(e.observe(ev(NOON, client="lab-feed"))) == ["off_hours"]
    assert kinds(e.observe(ev(night))) == ["off_hours"]


def test_denial_burst() -> None:
    e = engine(max_denials=3, window_s=10)
    for i in range(3):
        assert e.observe(ev(NOON + i, decision="deny", write=False)) == []
    assert kinds(e.observe(ev(NOON + 3, decision="deny", write=False))) == ["denial_burst"]
    e = engine(max_denials=3, window_s=10)
    assert all(e.observe(ev(NOON + 4 * i, decision="deny")) == [] for i in range(10))
    e = engine(max_denials=1)
    assert e.observe(ev(decision="error")) == [] and e.observe(ev(decision="error")) == []
    # unidentified callers (401s) are one bucket: a credential-stuffing burst is seen
    e = engine(max_denials=2)
    out = [e.observe(ev(client=None, decision="deny")) for _ in range(3)]
    assert kinds(out[2]) == ["denial_burst"] and out[2][0].client_id is None


def test_upstream_failures() -> None:
    e = engine(max_upstream_failures=2, window_s=30)
    assert e.observe(ev(status=503)) == [] and e.observe(ev(status=None, failed=True)) == []
    assert kinds(e.observe(ev(status=500))) == ["upstream_failures"]
    e = engine(max_upstream_failures=2, window_s=30)
    for status in (200, 201, 404, 409, 429, 412):
        assert e.observe(ev(status=status)) == []
    assert all(e.observe(ev(NOON + 31 * i, status=502)) == [] for i in range(5))


def test_unexpected_source() -> None:
    e = engine(clients={"scribe-app": {"sources": ["10.0.0.0/8", "fd00::/8"]}})
    for ip in ("10.1.2.3", "10.1.2.3:51234", "::ffff:10.9.9.9", "[fd00::1]:443", "fd00::2"):
        assert e.observe(ev(ip=ip)) == [], ip
    assert e.observe(ev(ip="192.168.1.1", write=False)) == []        # reads are not checked
    assert e.observe(ev(ip="192.168.1.1", client="lab-feed")) == []  # no sources configured
    for ip in ("192.168.1.1", None, "not-an-ip", "[::1]:80"):
        fresh = engine(clients={"scribe-app": {"sources": ["10.0.0.0/8"]}})
        assert kinds(fresh.observe(ev(ip=ip))) == ["unexpected_source"], ip


# ------------------------------------------------------------------ dedupe, folding, output

def test_repeated_alerts_are_rate_limited() -> None:
    e = engine(max_writes=1, window_s=60)
    e.observe(ev(NOON))
    fired = [kinds(e.observe(ev(NOON + i))) for i in range(1, 50)]
    assert fired[0] == ["write_volume"] and all(f == [] for f in fired[1:])
    assert e.suppressed == 48
    assert kinds(e.observe(ev(client="lab-feed"))) == []              # its own counter
    assert kinds(e.observe(ev(NOON + 61))) == ["write_volume"]         # next window: again
    e = engine(hours="07:00-19:00", repeat_s=5)
    night = datetime(2024, 6, 3, 23, 0, tzinfo=BERLIN).timestamp()
    assert kinds(e.observe(ev(night))) == ["off_hours"]
    assert e.observe(ev(night + 4)) == []
    assert kinds(e.observe(ev(night + 5))) == ["off_hours"]


def test_unknown_client_ids_are_folded() -> None:
    e = engine(max_denials=1)
    e.observe(ev(client="forged-1", decision="deny"))
    out = e.observe(ev(client="forged-2", decision="deny"))
    assert kinds(out) == ["denial_burst"] and out[0].client_id is None


def test_disabled_engine_is_silent() -> None:
    e = engine(enabled=False, max_writes=1, hours="07:00-08:00")
    assert all(e.observe(ev()) == [] for _ in range(5))


def test_alert_outputs_carry_no_phi() -> None:
    e = engine(clients={"scribe-app": {"sources": ["10.0.0.0/8"]}})
    [a] = e.observe(ev(ip="203.0.113.7", cid="corr-xyz"))
    payload = a.to_json()
    assert set(payload) <= {"source", "kind", "client_id", "detail", "ts", "correlation_ids",
                            "count", "window_s"}
    assert "203.0.113.7" not in json.dumps(payload)
    assert payload["ts"].endswith("Z") and payload["correlation_ids"] == ["corr-xyz"]
    assert validate_fields(a.audit_fields())["reasons"] == ["unexpected_source", a.detail]
    assert set(k for k, v in a.log_fields().items()) <= SAFE_KEYS
    assert a.kind in ALERT_KINDS


@pytest.mark.parametrize("bad", [
    {"hours": "7-19"}, {"hours": "07:00-07:00"}, {"hours": "25:00-26:00"},
    {"timezone": "Mars/Olympus"}, {"window_s": 0}, {"max_writes": 0}, {"surprise": 1},
    {"clients": {"a": {"sources": ["10.0.0.1/8"]}}}, {"clients": {"a": {"typo": 1}}},
    {"webhook": {"url": "http://alerts.example.org/hook"}},
    {"webhook": {"url": "https://user:pw@alerts.example.org/hook"}},
    {"webhook": {"url": "ftp://127.0.0.1/x"}},
    {"webhook": {"url": "https://a.example.org", "token": "inline-secret"}},
])
def test_config_refuses(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AlertsConfig.model_validate(bad)


def test_config_accepts() -> None:
    cfg = AlertsConfig.model_validate({
        "window_s": 60, "max_writes": 500, "hours": "07:00-19:00", "timezone": "Europe/Berlin",
        "clients": {"scribe-app": {"sources": ["10.0.0.0/8", "::1"], "hours": "00:00-24:00"}},
        "webhook": {"url": "https://alerts.example.org/hook", "token": "env:ALERT_TOKEN"}})
    assert cfg.webhook is not None and cfg.webhook.token == "env:ALERT_TOKEN"
    assert AlertsConfig.model_validate({"webhook": {"url": "vault:secret/data/hooks#url"}})
    assert AlertsConfig.model_validate({"webhook": {"url": "http://127.0.0.1:8080/x"}})
    AlertsConfig.model_json_schema()                       # `config schema` must still work


# ------------------------------------------------------------------ webhook

class Hook:
    """A local 127.0.0.1 webhook that answers `fail_status` to the first `fail` posts."""

    def __init__(self, fail: int = 0, fail_status: int = 503, retry_after: str | None = None) -> None:
        self.fail, self.fail_status, self.retry_after = fail, fail_status, retry_after
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.calls = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.calls += 1
                if hook.calls <= hook.fail:
                    self.send_response(hook.fail_status)
                    if hook.retry_after:
                        self.send_header("Retry-After", hook.retry_after)
                else:
                    hook.received.append(json.loads(body))
                    hook.headers.append(dict(self.headers))
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_factory() -> Iterator[Any]:
    made: list[Hook] = []

    def make(**kw: Any) -> Hook:
        made.append(Hook(**kw))
        return made[-1]

    yield make
    for h in made:
        h.stop()


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def alert(i: int = 0) -> Alert:
    return Alert("denial_burst", "scribe-app", "burst of denied requests", NOON + i, f"corr-{i}", 21, 300)


async def test_webhook_retries_with_exponential_backoff(hook_factory: Any) -> None:
    hook = hook_factory(fail=3)
    sleeps = Sleeps()
    s = WebhookSender(hook.url, token="t0ken", backoff_s=0.5, max_backoff_s=1.5, max_attempts=6,
                      sleep=sleeps, rand=lambda: 1.0)
    await s.start()
    s.submit(alert())
    await wait_for(lambda: s.sent == 1)
    await s.close()
    assert hook.calls == 4 and sleeps.delays == [0.5, 1.0, 1.5]           # doubled, capped
    assert hook.received == [alert().to_json()]
    assert hook.headers[0]["Authorization"] == "Bearer t0ken"
    assert (s.sent, s.failed, s.dropped) == (1, 0, 0)


async def test_webhook_jitter_and_retry_after(hook_factory: Any) -> None:
    hook = hook_factory(fail=1, fail_status=429, retry_after="7")
    sleeps = Sleeps()
    s = WebhookSender(hook.url, backoff_s=1.0, max_backoff_s=10, sleep=sleeps, rand=lambda: 0.0)
    await s.start()
    s.submit(alert())
    await wait_for(lambda: s.sent == 1)
    await s.close()
    assert sleeps.delays == [7.0]                   # max(jittered 0.5, Retry-After 7)


async def test_webhook_gives_up(hook_factory: Any) -> None:
    hook = hook_factory(fail=100)
    sleeps = Sleeps()
    s = WebhookSender(hook.url, max_attempts=3, backoff_s=0.1, sleep=sleeps, rand=lambda: 1.0)
    await s.start()
    s.submit(alert(1))
    s.submit(alert(2))
    await wait_for(lambda: s.failed == 2)
    await s.close()
    assert hook.calls == 6 and sleeps.delays == [0.1, 0.2] * 2
    refusing = hook_factory(fail=100, fail_status=400)                   # permanent: no retry
    s = WebhookSender(refusing.url, sleep=sleeps, rand=lambda: 1.0)
    await s.start()
    s.submit(alert())
    await wait_for(lambda: s.failed == 1)
    await s.close()
    assert refusing.calls == 1


async def test_webhook_connection_refused_is_retried() -> None:
    sleeps = Sleeps()
    s = WebhookSender("http://127.0.0.1:9/hook", max_attempts=2, backoff_s=0.01, sleep=sleeps,
                      rand=lambda: 1.0)
    await s.start()
    s.submit(alert())
    await wait_for(lambda: s.failed == 1)
    await s.close()
    assert sleeps.delays == [0.01]


async def test_webhook_queue_is_bounded_drop_oldest(hook_factory: Any) -> None:
    hook = hook_factory(fail=1)
    sleeps = Sleeps()
    sleeps.gate = asyncio.Event()                  # the first delivery hangs in its backoff
    s = WebhookSender(hook.url, max_queue=3, sleep=sleeps, rand=lambda: 1.0)
    await s.start()
    s.submit(alert(0))
    await wait_for(lambda: len(sleeps.delays) == 1)
    for i in range(1, 11):
        s.submit(alert(i))
    assert s.pending == 3 and s.dropped == 7
    sleeps.gate.set()
    await wait_for(lambda: s.sent == 4)
    await s.close()
    assert [r["correlation_ids"][0] for r in hook.received] == ["corr-0", "corr-8", "corr-9", "corr-10"]


async def test_submit_never_blocks_and_close_drains(hook_factory: Any) -> None:
    hook = hook_factory()
    s = WebhookSender.from_config(WebhookConfig(url=hook.url, max_queue=50))
    s.submit(alert(0))                              # before start: just queued
    await s.start()
    for i in range(1, 20):
        s.submit(alert(i))
    await s.close(drain_s=5)
    assert s.sent == 20 and len(hook.received) == 20


def test_sender_refuses_plain_http_off_loopback() -> None:
    with pytest.raises(ValueError):
        WebhookSender("http://alerts.example.org/hook")
