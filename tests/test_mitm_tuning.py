"""sidecar/mitm_tuning.py: the lean hook dispatch behaves as mitmproxy's own, case by case (the
stock AddonManager runs the same scenario as the witness), and the message type check is gone."""

from __future__ import annotations

import asyncio
import logging
import re
import types
from dataclasses import dataclass
from typing import Any

import pytest
from mitmproxy import exceptions, hooks, http, options
from mitmproxy.master import Master
from mitmproxy.test import tflow

from sidecar.mitm_tuning import lean_hook_dispatch, skip_message_typecheck


@dataclass
class PingHook(hooks.Hook):
    data: list


class Recorder:
    def __init__(self, name: str, calls: list[str], *, fail: type[BaseException] | None = None,
                 asynchronous: bool = False, children: list[Any] | None = None) -> None:
        self.name = name
        self.calls = calls
        self.fail = fail
        if children is not None:
            self.addons = children
        if asynchronous:
            async def ping(data: list) -> None:
                await asyncio.sleep(0)
                self._ping(data)
            self.ping = ping
        else:
            self.ping = self._ping

    def _ping(self, data: list) -> None:
        self.calls.append(self.name)
        data.append(self.name)
        if self.fail is not None:
            raise self.fail("boom " + self.name)


class NoHook:
    name = "nohook"


class ModuleNamed:
    name = "modulenamed"
    ping = types.ModuleType("ping")  # a module imported under a hook's name: skipped


class NotCallable:
    name = "notcallable"
    ping = 42


def _chain(calls: list[str], case: str) -> list[Any]:
    child = Recorder("child", calls)
    chains: dict[str, list[Any]] = {
        "order and children": [Recorder("a", calls), NoHook(), Recorder("b", calls, children=[child]),
                               Recorder("c", calls, asynchronous=True)],
        "error is logged, the next addon still runs": [Recorder("a", calls, fail=ValueError), Recorder("b", calls)],
        "halt stops the chain": [Recorder("a", calls, fail=exceptions.AddonHalt), Recorder("b", calls)],
        "module attribute skipped": [ModuleNamed(), Recorder("a", calls)],
        "non-callable hook is an addon error": [NotCallable(), Recorder("a", calls)],
        "async error is logged": [Recorder("a", calls, fail=KeyError, asynchronous=True), Recorder("b", calls)],
    }
    return chains[case]


CASES = [
    "order and children",
    "error is logged, the next addon still runs",
    "halt stops the chain",
    "module attribute skipped",
    "non-callable hook is an addon error",
    "async error is logged",
]


async def _run(case: str, lean: bool, caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str], list[str]]:
    master = Master(options.Options())
    if lean:
        assert lean_hook_dispatch(master.addons)
    calls: list[str] = []
    for a in _chain(calls, case):
        master.addons.chain.append(a)  # as add() would, without running load/configure hooks
    data: list[str] = []
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
        await master.addons.trigger_event(PingHook(data))
    errors = [re.sub(r" at 0x[0-9a-f]+", "", r.getMessage()) for r in caplog.records if r.name == "mitmproxy.addonmanager"]
    return calls, data, errors


@pytest.mark.parametrize("case", CASES)
async def test_lean_dispatch_matches_mitmproxy(case: str, caplog: pytest.LogCaptureFixture) -> None:
    stock = await _run(case, False, caplog)
    lean = await _run(case, True, caplog)
    assert lean == stock
    if "error" in case:
        assert lean[2] and lean[2][0].startswith("Addon error: ")


async def test_options_error_propagates() -> None:
    master = Master(options.Options())
    lean_hook_dispatch(master.addons)
    calls: list[str] = []
    master.addons.chain.append(Recorder("a", calls, fail=exceptions.OptionsError))
    with pytest.raises(exceptions.OptionsError):
        await master.addons.trigger_event(PingHook([]))


async def test_lean_dispatch_is_per_instance() -> None:
    master, other = Master(options.Options()), Master(options.Options())
    lean_hook_dispatch(master.addons)
    assert master.addons.trigger_event.__func__ is not type(other.addons).trigger_event
    assert other.addons.trigger_event.__func__ is type(other.addons).trigger_event


def test_lean_dispatch_refuses_an_unknown_manager() -> None:
    assert lean_hook_dispatch(types.SimpleNamespace()) is False  # type: ignore[arg-type]


def test_message_typecheck_skipped() -> None:
    assert skip_message_typecheck()
    assert skip_message_typecheck()  # idempotent
    # mitmproxy's check would raise TypeError for a str where bytes belong; the flow still works
    req = tflow.treq()
    data = http.RequestData(**{**req.data.__dict__, "http_version": "HTTP/1.1"})
    assert data.http_version == "HTTP/1.1"
