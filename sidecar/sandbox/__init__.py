"""Sandbox EHR: an in-memory FHIR R4 server and independent witness for tests.

It must never import from the rest of the ``sidecar`` package: it parses
requests with its own code so its request log can testify to what actually
reached the upstream.
"""

from .cli import main
from .profiles import PROFILES, Profile, resolve_profile
from .server import SandboxServer

__all__ = ["PROFILES", "Profile", "SandboxServer", "main", "resolve_profile"]
