"""Upstream protection shared by every replica through the state store.

`Breaker`: after `threshold` consecutive failures (5xx other than 501, timeouts, connection
errors) the circuit opens and requests are answered 503 by the sidecar for `cooldown_s`. Then
exactly one request (the probe) is let through (half-open); its success closes the circuit,
its failure reopens it. A probe that never reports (its sidecar died) is replaced after
`probe_timeout_s`. Late answers of requests sent before the circuit opened change nothing.

`Backoff`: after an upstream 429/503 with Retry-After, further writes are held (answered by the
sidecar with the upstream's status and the remaining Retry-After) until that time passes;
the hold is capped at `max_hold_s` so a wrong header cannot stop writes for days.

Times are wall-clock seconds (`clock`), compared across replicas: keep hosts NTP-synced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable

from sidecar.errors import Refusal
from sidecar.state.base import StateStore, StateUnavailable, retry_after_s

_STATE_TTL_S = 86_400.0  # refreshed on every transition; an idle closed breaker may lapse (= closed)


def is_failure(status: int | None) -> bool:
    """What counts against the breaker: no answer (timeout, reset) or a server error."""
    return status is None or (status >= 500 and status != 501)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date -> seconds from now (None: absent/invalid)."""
    if value is None:
        return None
    v = value.strip()
    if v.isdigit():
        return float(int(v))
    try:
        return max(0.0, parsedate_to_datetime(v).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class BreakerState:
    state: str          # "closed" | "open" | "half-open"
    failures: int = 0   # consecutive failures while closed
    until: float = 0.0  # open: end of the cool-down; half-open: the probe's deadline

    def encode(self) -> bytes:
        return json.dumps({"s": self.state, "n": self.failures, "u": self.until}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> "BreakerState":
        if raw is None:
            return cls("closed")
        try:
            d = json.loads(raw)
            if d["s"] not in ("closed", "open", "half-open"):
                raise ValueError(d["s"])
            return cls(d["s"], int(d["n"]), float(d["u"]))
        except (ValueError, KeyError, TypeError) as e:
            raise StateUnavailable("unreadable breaker state") from e


class Breaker:
    def __init__(self, store: StateStore, name: str = "upstream", *, threshold: int = 5,
                 cooldown_s: float = 30.0, probe_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        if threshold < 1:
            raise ValueError("breaker threshold must be >= 1")
        self.store = store
        self.key = f"breaker:{name}"
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s  # >= the upstream timeout, or probes overlap
        self._clock = clock

    async def state(self) -> BreakerState:
        return BreakerState.decode(await self.store.get(self.key))

    async def admit(self) -> bool:
        """Before forwarding. Returns True when this request is the half-open probe (pass it
        back to `record`); raises a 503 Refusal while the circuit is open or a probe is out."""
        for _ in range(4):
            raw = await self.store.get(self.key)
            st = BreakerState.decode(raw)
            now = self._clock()
            if st.state == "closed":
                return False
            if now < st.until:
                what = "open" if st.state == "open" else "half-open (a probe request is in flight)"
                raise Refusal(503, f"upstream circuit breaker {what}", "transient",
                              (("Retry-After", str(retry_after_s(min(st.until - now, self.cooldown_s)))),),
                              decision="error")
            # Cool-down over (or the last probe never reported): whoever swaps first is the probe.
            probe = BreakerState("half-open", 0, now + self.probe_timeout_s)
            if await self.store.cas(self.key, raw, probe.encode(), _STATE_TTL_S):
                return True
        raise StateUnavailable("breaker state keeps changing")

    async def record(self, status: int | None, *, probe: bool = False) -> None:
        """After the upstream answered (`status`) or failed (`None`)."""
        failed = is_failure(status)
        for _ in range(4):
            raw = await self.store.get(self.key)
            st = BreakerState.decode(raw)
            now = self._clock()
            if st.state == "closed":
                if not failed and st.failures == 0:
                    return  # the common case costs one read, no write
                n = st.failures + 1 if failed else 0
                if n >= self.threshold:
                    new = BreakerState("open", n, now + self.cooldown_s)
                else:
                    new = BreakerState("closed", n)
            elif st.state == "half-open" and probe:
                new = BreakerState("open", st.failures, now + self.cooldown_s) if failed else BreakerState("closed")
            else:
                return  # open, or half-open and not the probe: only the probe decides
            if await self.store.cas(self.key, raw, new.encode(), _STATE_TTL_S):
                return
        raise StateUnavailable("breaker state keeps changing")


class Backoff:
    def __init__(self, store: StateStore, name: str = "upstream", *, max_hold_s: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.key = f"backoff:{name}"
        self.max_hold_s = max_hold_s
        self._clock = clock

    async def record(self, status: int, retry_after: str | None) -> float | None:
        """After an upstream answer: a 429/503 with a usable Retry-After starts (or extends)
        the hold. Returns the hold in seconds, None when nothing was held."""
        if status not in (429, 503):
            return None
        now = self._clock()
        secs = parse_retry_after(retry_after, now)
        if secs is None or secs <= 0:
            return None
        secs = min(secs, self.max_hold_s)
        until = now + secs
        new = json.dumps({"status": status, "u": until}, separators=(",", ":")).encode()
        for _ in range(4):
            raw = await self.store.get(self.key)
            if raw is not None and self._decode(raw)[1] >= until:
                return secs  # a longer hold is already in place: keep it
            if await self.store.cas(self.key, raw, new, secs + 1.0):
                return secs
        raise StateUnavailable("back-off state keeps changing")

    async def check(self, is_write: bool) -> None:
        """Before forwarding a write: raises the upstream's status + Retry-After while held."""
        if not is_write:
            return
        raw = await self.store.get(self.key)
        if raw is None:
            return
        status, until = self._decode(raw)
        left = until - self._clock()
        if left <= 0:
            return
        code = "throttled" if status == 429 else "transient"
        raise Refusal(status, "upstream asked to back off: write held until its Retry-After passes", code,
                      (("Retry-After", str(retry_after_s(left))),), decision="error")

    @staticmethod
    def _decode(raw: bytes) -> tuple[int, float]:
        try:
            d = json.loads(raw)
            status = int(d["status"])
            return (status if status in (429, 503) else 503), float(d["u"])
        except (ValueError, KeyError, TypeError) as e:
            raise StateUnavailable("unreadable back-off state") from e
