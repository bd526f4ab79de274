"""`fhir-sidecar demo`: the sandbox EHR, the sidecar in front of it, the example policy.

Zero config: ports are the demo's defaults, the audit key and admin token are minted for this
run, and state lives in a fresh temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from pathlib import Path

import yaml

from sidecar.config import parse_config
from sidecar.logs import configure_logging

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_CONFIG = EXAMPLES / "demo.yaml"


def demo_banner(sidecar: str, upstream: str, admin: str, state: str) -> str:
    base = f"{sidecar}/fhir/R4"
    obs = ('{"resourceType":"Observation","status":"final",'
           '"code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"valueQuantity":{"value":72,"unit":"/min"}}')
    med = '{"resourceType":"MedicationRequest","status":"active","intent":"order","subject":{"reference":"Patient/1"},"medicationCodeableConcept":{"text":"x"}}'
    return f"""
fhir-sidecar demo
  sandbox EHR (upstream) : {upstream}
  sidecar (point apps at): {base}
  admin                  : {admin}/healthz  {admin}/readyz
  audit trail            : {state}/audit.jsonl

An allowed write (demo-writer may create Observations):
  curl -si -X POST {base}/Observation -H 'X-API-Key: demo-writer-key' \\
       -H 'Content-Type: application/fhir+json' -d '{obs}'

A denied write (403: the reader has no 'c' scope; nothing reaches the EHR):
  curl -si -X POST {base}/Observation -H 'X-API-Key: demo-reader-key' \\
       -H 'Content-Type: application/fhir+json' -d '{obs}'

A denied write (403: MedicationRequest is outside demo-writer's scopes):
  curl -si -X POST {base}/MedicationRequest -H 'X-API-Key: demo-writer-key' \\
       -H 'Content-Type: application/fhir+json' -d '{med}'

A read:
  curl -si '{base}/Observation?_count=5' -H 'X-API-Key: demo-reader-key'

Kill switch (every request then answers 503):
  touch {state}/killswitch        # engage;  rm it (or write 'off' into it) to release

Ctrl-C stops the demo.
"""


def run_demo(port: int = 8080, admin_port: int = 9090) -> int:
    from sidecar.proxy import Sidecar
    from sidecar.sandbox import SandboxServer

    configure_logging("info")
    state = Path(tempfile.mkdtemp(prefix="fhir-sidecar-demo-"))
    os.environ.setdefault("FHIR_SIDECAR_AUDIT_KEY", secrets.token_urlsafe(32))
    os.environ.setdefault("FHIR_SIDECAR_ADMIN_TOKEN", secrets.token_urlsafe(24))
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    try:
        data = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
        data["upstream"]["url"] = sandbox.base_url
        data["listen"]["port"] = port
        data["admin"]["port"] = admin_port
        data["audit"]["path"] = str(state / "audit.jsonl")
        data["killswitch"]["file"] = str(state / "killswitch")
        data["state"] = {"store": f"sqlite:{state / 'state.db'}"}
        cfg = parse_config(data, source=str(DEMO_CONFIG))
        print(demo_banner(f"http://127.0.0.1:{port}", sandbox.base_url, f"http://127.0.0.1:{admin_port}", str(state)),
              flush=True)
        return asyncio.run(Sidecar(cfg, None, base_dir=EXAMPLES).run())
    finally:
        sandbox.stop()
