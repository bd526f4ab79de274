"""The kill switch's shared source: flags in the state store, seen by every replica.

`killswitch` (global) and `killswitch:<client>`; a flag is engaged while it is set and does not
read `off` (the flag file's rule). The request path is synchronous (`KillSwitch.check`), so a
background task calls `refresh()` every `refresh_s` and the check reads the cached view. Fail
closed: while the store cannot be read, or the view is older than `stale_s` (the poll task
died or hangs), everything counts as engaged.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from sidecar.state.base import StateStore, StateUnavailable

GLOBAL = "killswitch"


def flag_name(client_id: str | None) -> str:
    return GLOBAL if client_id is None else f"{GLOBAL}:{client_id}"


def is_engaged(value: str | None) -> bool:
    return value is not None and value.split("\n", 1)[0].strip().lower() != "off"


async def set_killswitch(store: StateStore, on: bool, client_id: str | None = None, reason: str = "") -> None:
    """For `fhir-sidecar killswitch on|off` and the admin API. No TTL: it never lapses."""
    await store.set_flag(flag_name(client_id), ("on\n" + (f"reason: {reason}\n" if reason else "")) if on else None)


class SharedKillFlags:
    def __init__(self, store: StateStore, clients: Iterable[str], *, stale_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clients = tuple(clients)
        self.stale_s = stale_s
        self._clock = clock
        self._at = float("-inf")        # never refreshed: engaged until the first good read
        self._global = True
        self._engaged: frozenset[str] = frozenset()

    async def refresh(self) -> bool:
        """Read all flags; False (and engaged until a good read) when the store is unavailable."""
        try:
            glob = is_engaged(await self.store.get_flag(GLOBAL))
            engaged = frozenset([c for c in self.clients if is_engaged(await self.store.get_flag(flag_name(c)))])
        except StateUnavailable:
            self._at = float("-inf")
            return False
        self._global, self._engaged, self._at = glob, engaged, self._clock()
        return True

    @property
    def fresh(self) -> bool:
        return self._clock() - self._at <= self.stale_s

    def engaged(self, client_id: str | None) -> bool:
        if not self.fresh:
            return True
        return self._global or (client_id is not None and client_id in self._engaged)
