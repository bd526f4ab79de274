"""Two per-flow costs of mitmproxy that the sidecar's own Master does not need (bench/README.md,
"Where the time goes"), removed without changing what any hook sees or how an addon error is handled:

- `AddonManager.trigger_event` enters a `contextlib` context manager (`safecall`) for every addon
  of the chain for every event, whether the addon has the hook or not: ~7% of a read's CPU. Ours
  does the same walk (children included, chain order, the same `Addon error` log line, AddonHalt
  stops, OptionsError propagates) with a plain try/except, and builds the hook's arguments once.
  It is installed on one Master's AddonManager instance, never on the class.
- `http.MessageData.__post_init__` type-checks every field of every request and response parsed,
  a check mitmproxy itself runs only under `__debug__` (not with `python -O`): ~5% of a read's CPU.
  mitmproxy builds these objects from its own parser; the sidecar builds its answers through
  `Response.make`, whose arguments are typed by construction and tested.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from typing import Any

from mitmproxy import exceptions, http
from mitmproxy.addonmanager import AddonManager, cut_traceback, traverse

_addon_log = logging.getLogger("mitmproxy.addonmanager")  # the logger safecall writes to


async def _trigger_event(self: AddonManager, event: Any) -> None:
    """AddonManager.trigger_event without a context manager per addon (module docstring)."""
    name = event.name
    args: list[Any] | None = None
    for top in self.chain:
        try:
            for a in traverse([top]):
                func = getattr(a, name, None)
                if not func:
                    continue
                if not callable(func):
                    if isinstance(func, types.ModuleType):
                        continue  # mitmproxy skips a module imported under a hook's name too
                    raise exceptions.AddonManagerError(f"Addon handler {name} ({a}) not callable")
                if args is None:
                    args = event.args()
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:
            etype, value, tb = sys.exc_info()
            tb = cut_traceback(tb, "_trigger_event")
            _addon_log.error(f"Addon error: {value}", exc_info=(etype, value, tb))


def lean_hook_dispatch(manager: AddonManager) -> bool:
    """Install the lean trigger_event on this manager; False (stock kept) if it does not look
    like the AddonManager this was written against."""
    if not (isinstance(getattr(manager, "chain", None), list) and callable(getattr(manager, "trigger_event", None))):
        return False
    manager.trigger_event = types.MethodType(_trigger_event, manager)  # type: ignore[method-assign]
    return True


def _no_field_check(self: Any) -> None:
    return None


def skip_message_typecheck() -> bool:
    """Replace MessageData's debug-only field type check with nothing (process-wide)."""
    post_init = getattr(http.MessageData, "__post_init__", None)
    if post_init is None or post_init is _no_field_check:
        return post_init is _no_field_check
    http.MessageData.__post_init__ = _no_field_check  # type: ignore[attr-defined]
    return True
