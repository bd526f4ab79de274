"""Fixtures shared by the end-to-end test modules (a module may define its own, wider-scoped one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.sandbox import SandboxServer


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """A fresh sandbox EHR on 127.0.0.1 (a free port) for one test; its request log is the witness."""
    s = SandboxServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()
