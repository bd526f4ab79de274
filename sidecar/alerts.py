"""Anomaly alerts: rules over a stream of per-request events, and a webhook.

`AlertEngine.observe(event)` is synchronous, O(1) amortised and allocation
light: it runs on the request path. Rules (all per client, all optional):

- write_volume       more than `max_writes` forwarded writes within `window_s`
- off_hours          a write outside `hours` ("07:00-19:00", local to `timezone`)
- denial_burst       more than `max_denials` denied requests within `window_s`
- upstream_failures  more than `max_upstream_failures` upstream 5xx/timeouts within `window_s`
- unexpected_source  a write from an address outside the client's `sources` CIDRs

An alert of one kind for one client fires at most once per `repeat_s`
(default `window_s`); suppressed repeats are counted. Alerts carry a fixed
phrase, the client id and at most a correlation id: never addresses, ids,
paths or bodies, because they leave the PHI boundary (webhook, logs).

`WebhookSender` posts alerts off the request path: a bounded queue (the
oldest alert is dropped when full, and counted) drained by one task with
exponential backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator

from sidecar.secretrefs import check_ref

__all__ = ["ALERT_KINDS", "Alert", "AlertEngine", "AlertEvent", "AlertsConfig", "ClientAlerts",
           "WebhookConfig", "WebhookSender"]

log = logging.getLogger(__name__)

DETAILS: dict[str, str] = {
    "write_volume": "write volume above the configured limit",
    "off_hours": "write outside the configured hours",
    "denial_burst": "burst of denied requests",
    "upstream_failures": "repeated upstream failures",
    "unexpected_source": "write from a source address not allowed for this client",
}
ALERT_KINDS = frozenset(DETAILS)
_HOURS = r"^([01]\d|2[0-3]):[0-5]\d-(([01]\d|2[0-3]):[0-5]\d|24:00)$"
_REF_PREFIXES = ("env:", "file:", "vault:")

SecretRef = Annotated[str, AfterValidator(check_ref)]


# ------------------------------------------------------------------ config

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_webhook_url(url: str) -> str:
    """https anywhere; plain http only to a loopback address (a local relay)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.username or parts.password:
        raise ValueError("webhook url must not carry credentials: use webhook.token")
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and (host == "localhost" or _is_loopback(host)):
        return url
    raise ValueError("webhook url must be https (http only to a loopback address)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hours_ok(value: str | None) -> str | None:
    if value is not None and value[:5] == value[6:]:
        raise ValueError("hours: start and end must differ")
    return value


class ClientAlerts(_Model):
    max_writes: int | None = Field(None, ge=1, description="overrides alerts.max_writes")
    hours: Annotated[str | None, AfterValidator(_hours_ok)] = Field(None, pattern=_HOURS)
    sources: list[IPvAnyNetwork] | None = Field(
        None, description="CIDRs writes may come from; unset = any address")


class WebhookConfig(_Model):
    url: str = Field(description="https URL (or a secret reference to one)")
    token: SecretRef | None = Field(None, description="sent as Authorization: Bearer")
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_queue: int = Field(1000, ge=1, le=100_000)
    max_attempts: int = Field(6, ge=1, le=20)
    backoff_s: float = Field(1.0, gt=0, le=60)
    max_backoff_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_ref(v) if v.startswith(_REF_PREFIXES) else check_webhook_url(v)


class AlertsConfig(_Model):
    """The config's `alerts:` section."""
    enabled: bool = True
    window_s: float = Field(300.0, gt=0, le=86_400)
    repeat_s: float | None = Field(None, gt=0, description="min gap between equal alerts; default window_s")
    max_writes: int | None = Field(None, ge=1, description="per client per window; unset = off")
    max_denials: int | None = Field(20, ge=1)
    max_upstream_failures: int | None = Field(5, ge=1)
    hours: Annotated[str | None, AfterValidator(_hours_ok)] = Field(None, pattern=_HOURS)
    timezone: str = "UTC"
    clients: dict[str, ClientAlerts] = Field(default_factory=dict)
    webhook: WebhookConfig | None = None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}") from None
        return v


# ------------------------------------------------------------------ events

@dataclass(frozen=True, slots=True)
class AlertEvent:
    ts: float                          # epoch seconds
    client_id: str | None              # verified client id; None if unidentified
    source_ip: str | None              # peer address (a port suffix is tolerated)
    is_write: bool
    decision: str                      # allow | deny | error | review | replay
    upstream_status: int | None = None
    upstream_failed: bool = False      # connect error / timeout: no status
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str
    client_id: str | None
    detail: str                        # a fixed phrase from DETAILS
    ts: float
    correlation_id: str | None = None
    count: int | None = None           # events in the window that tripped the rule
    window_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Webhook payload: no PHI (kind, client, time, correlation id)."""
        ts = datetime.fromtimestamp(self.ts, timezone.utc).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"source": "fhir-sidecar", "kind": self.kind, "client_id": self.client_id,
                               "detail": self.detail, "ts": ts.replace("+00:00", "Z")}
        if self.correlation_id:
            out["correlation_ids"] = [self.correlation_id]
        if self.count is not None:
            out.update(count=self.count, window_s=self.window_s)
        return out

    def audit_fields(self) -> dict[str, Any]:
        """Fields for `AuditWriter.append` (kind `alert`)."""
        return {"kind": "alert", "client_id": self.client_id, "correlation_id": self.correlation_id,
                "reasons": [self.kind, self.detail]}

    def log_fields(self) -> dict[str, Any]:
        """Keyword arguments for a structlog event (all in logs.SAFE_KEYS)."""
        return {"reason_code": self.kind, "client_id": self.client_id,
                "correlation_id": self.correlation_id, "count": self.count}


# ------------------------------------------------------------------ engine

def _parse_hours(spec: str) -> tuple[int, int]:
    a, b = spec.split("-")
    return int(a[:2]) * 60 + int(a[3:]), int(b[:2]) * 60 + int(b[3:])


def _address(raw: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not raw:
        return None
    text = raw.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::\d+)?|(\d+\.\d+\.\d+\.\d+):\d+", text)
    if m:
        text = m.group(1) or m.group(2)
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped            # ::ffff:10.0.0.1 is 10.0.0.1
    return addr


class _Window:
    """Timestamps of the last `limit + 1` events: enough to know if more than
    `limit` fell within the window, and bounded whatever the traffic."""

    __slots__ = ("times",)

    def __init__(self, limit: int) -> None:
        self.times: deque[float] = deque(maxlen=limit + 1)

    def add(self, ts: float, window_s: float) -> int:
        self.times.append(ts)
        while self.times and self.times[0] <= ts - window_s:
            self.times.popleft()
        return len(self.times)


class AlertEngine:
    def __init__(self, config: AlertsConfig, clients: Iterable[str] | None = None) -> None:
        """`clients`: the configured client ids; others are folded into None so a
        forged id can neither grow the state nor appear in an alert."""
        self._cfg = config
        self._known = frozenset(clients) if clients is not None else None
        self._tz = ZoneInfo(config.timezone)
        self._repeat = config.repeat_s if config.repeat_s is not None else config.window_s
        self._windows: dict[tuple[str, str | None], _Window] = {}
        self._last: dict[tuple[str, str | None], float] = {}
        self._shared: Any = None  # SharedAlertWindows once shared
        self.suppressed = 0

    def observe(self, e: AlertEvent) -> list[Alert]:
        """The alerts this event raises now. Shared (see `share`): [] now, and the alerts are
        decided on the shared windows in the background and handed to the emitter."""
        actions = self._actions(e)
        if not actions:
            return []
        if self._shared is not None:
            self._shared.submit(e, actions)
            return []
        out: list[Alert] = []
        for kind, client, limit in actions:
            if limit is None:
                self._fire(kind, client, e, None, out)
            else:
                self._count(kind, client, e, limit, out)
        return out

    def share(self, store: Any, emit: Callable[[Alert], Awaitable[None]]) -> Any:
        """Count windows and suppress repeats in the state store, so N workers raise the
        alerts one process would (`run --workers N`). The caller runs and stops the task."""
        from sidecar.alert_windows import SharedAlertWindows

        self._shared = SharedAlertWindows(self, store, emit)
        return self._shared

    def _actions(self, e: AlertEvent) -> list[tuple[str, str | None, int | None]]:
        """(kind, client, window limit or None for a one-off) for every rule this event feeds."""
        cfg = self._cfg
        if not cfg.enabled:
            return []
        client = e.client_id if self._known is None or e.client_id in self._known else None
        per = cfg.clients.get(client) if client is not None else None
        out: list[tuple[str, str | None, int | None]] = []
        if e.is_write:
            limit = per.max_writes if per is not None and per.max_writes is not None else cfg.max_writes
            if limit is not None and e.decision == "allow":
                out.append(("write_volume", client, limit))
            hours = per.hours if per is not None and per.hours is not None else cfg.hours
            if hours is not None and not self._inside(hours, e.ts):
                out.append(("off_hours", client, None))
            if per is not None and per.sources is not None:
                addr = _address(e.source_ip)
                if addr is None or not any(addr in net for net in per.sources):
                    out.append(("unexpected_source", client, None))
        if e.decision == "deny" and cfg.max_denials is not None:
            out.append(("denial_burst", client, cfg.max_denials))
        failed = e.upstream_failed or (e.upstream_status is not None and e.upstream_status >= 500)
        if failed and cfg.max_upstream_failures is not None:
            out.append(("upstream_failures", client, cfg.max_upstream_failures))
        return out

    def _inside(self, spec: str, ts: float) -> bool:
        start, end = _parse_hours(spec)
        local = datetime.fromtimestamp(ts, self._tz)
        minute = local.hour * 60 + local.minute
        return start <= minute < end if start < end else (minute >= start or minute < end)

    def _count(self, kind: str, client: str | None, e: AlertEvent, limit: int, out: list[Alert]) -> None:
        win = self._windows.get((kind, client))
        if win is None or win.times.maxlen != limit + 1:
            win = self._windows[(kind, client)] = _Window(limit)
        n = win.add(e.ts, self._cfg.window_s)
        if n > limit:
            self._fire(kind, client, e, n, out)

    def _fire(self, kind: str, client: str | None, e: AlertEvent, count: int | None,
              out: list[Alert]) -> None:
        last = self._last.get((kind, client))
        if last is not None and 0 <= e.ts - last < self._repeat:
            self.suppressed += 1
            return
        self._last[(kind, client)] = e.ts
        out.append(self._alert(kind, client, e, count))

    def _alert(self, kind: str, client: str | None, e: AlertEvent, count: int | None) -> Alert:
        return Alert(kind, client, DETAILS[kind], e.ts, e.correlation_id, count,
                     self._cfg.window_s if count is not None else None)


# ------------------------------------------------------------------ webhook

class WebhookSender:
    """Posts alert JSON to one URL from a background task; never blocks or
    raises into the caller. Retries transport errors, 429 and 5xx with
    exponential backoff (jittered: delay * (0.5 + rand()/2)), honouring a
    numeric Retry-After; gives up on other 4xx and after `max_attempts`."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 5.0,
                 max_queue: int = 1000, max_attempts: int = 6, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._url = check_webhook_url(url)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout, self._transport = timeout_s, transport
        self._max_attempts, self._backoff, self._max_backoff = max_attempts, backoff_s, max_backoff_s
        self._sleep, self._rand = sleep, rand
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queue = max_queue
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._busy = False              # a payload is being delivered (not in the queue)
        self.sent = self.dropped = self.failed = 0

    @classmethod
    def from_config(cls, cfg: WebhookConfig, *, url: str | None = None, token: str | None = None,
                    **kw: Any) -> WebhookSender:
        """`url`/`token`: the resolved values when the config holds references."""
        return cls(url or cfg.url, token=token, timeout_s=cfg.timeout_s, max_queue=cfg.max_queue,
                   max_attempts=cfg.max_attempts, backoff_s=cfg.backoff_s,
                   max_backoff_s=cfg.max_backoff_s, **kw)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, alert: Alert) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()       # the newest alerts say most about now
            self.dropped += 1
        self._queue.append(alert.to_json())
        self._wake.set()

    async def start(self) -> None:
        # trust_env=False: no proxy from the environment (the sidecar may be it).
        self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False,
                                         follow_redirects=False, transport=self._transport)
        self._task = asyncio.create_task(self._run(), name="alert-webhook")

    async def close(self, drain_s: float = 5.0) -> None:
        """Give queued alerts up to `drain_s` to go out, then stop."""
        if self._task is not None:
            loop = asyncio.get_running_loop()
            end = loop.time() + drain_s
            while (self._queue or self._busy) and loop.time() < end and not self._task.done():
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            payload = self._queue.popleft()
            self._busy = True
            try:
                await self._deliver(payload)
            finally:
                self._busy = False

    async def _deliver(self, payload: dict[str, Any]) -> None:
        assert self._client is not None
        for attempt in range(self._max_attempts):
            retry_after: float | None = None
            try:
                resp = await self._client.post(self._url, json=payload, headers=self._headers)
            except httpx.HTTPError as exc:
                log.warning("alert webhook attempt %d failed (%s)", attempt + 1, type(exc).__name__)
            else:
                if resp.is_success:
                    self.sent += 1
                    return
                if resp.status_code != 429 and resp.status_code < 500:
                    log.warning("alert webhook refused the alert (status %d)", resp.status_code)
                    break
                log.warning("alert webhook attempt %d failed (status %d)", attempt + 1, resp.status_code)
                ra = resp.headers.get("Retry-After", "")
                retry_after = float(ra) if ra.isdigit() else None
            if attempt + 1 < self._max_attempts:
                delay = min(self._max_backoff, self._backoff * 2 ** attempt) * (0.5 + self._rand() / 2)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self._max_backoff))
                await self._sleep(delay)
        self.failed += 1
