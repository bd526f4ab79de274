"""Make the replay example: a synthetic recording, the changed config, and the replay's report.

    .venv/bin/python examples/replay/make_sample.py

writes, next to this file:

- `sample.flows`      a recording (mitmproxy flow format, encrypted) of 13 synthetic requests, each
                      decided live by the real pipeline under `examples/demo.yaml` (plus a client
                      `retired-app` that has since been removed), with the starter policy in
                      `policies/` and a stand-in EHR for the stored versions (no network);
- `lost-scope.yaml`   `examples/demo.yaml` where demo-writer lost `system/Condition.crus`
                      (and `retired-app` is gone);
- `report.txt`        the report of replaying `sample.flows` under `lost-scope.yaml`.

The recording key is derived (HKDF, purpose "recording") from the env var FHIR_SIDECAR_RECORDING_KEY,
whose demo value, used when it is not set, is public:

    FHIR_SIDECAR_RECORDING_KEY=demo-recording-key-not-a-secret-0123456789

The same report from the CLI:

    FHIR_SIDECAR_RECORDING_KEY=demo-recording-key-not-a-secret-0123456789 \\
      fhir-sidecar replay examples/replay/sample.flows --config examples/replay/lost-scope.yaml \\
      --key env:FHIR_SIDECAR_RECORDING_KEY

Every value in the sample is synthetic (names, identifiers, keys). The recorded times are fixed
(one a minute from 2026-01-15T09:00Z) so the report is stable; no decision here depends on time.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.config import parse_config  # noqa: E402
from sidecar.pipeline import Pipeline  # noqa: E402
from sidecar.prior import Prior  # noqa: E402
from sidecar.recording import Recorder, RecordingConfig, record_decision, recording_key_from_secret  # noqa: E402
from sidecar.replay import format_report, replay  # noqa: E402
from sidecar.request import RawRequest  # noqa: E402
from sidecar.runtime import build_runtime  # noqa: E402

KEY_ENV = "FHIR_SIDECAR_RECORDING_KEY"
DEMO_KEY = "demo-recording-key-not-a-secret-0123456789"
WRITER, READER, RETIRED = "demo-writer-key", "demo-reader-key", "retired-app-key"   # public demo values
T0 = datetime(2026, 1, 15, 9, 0, 0, tzinfo=timezone.utc)
PATIENT = {"reference": "Patient/example-1", "display": "Synthetic Sample Patient"}

STORED = {   # the stand-in EHR's stored versions (prior state)
    ("Condition", "cond-1"): {"resourceType": "Condition", "id": "cond-1", "meta": {"versionId": "2"},
                              "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": "synthetic"},
                              "subject": PATIENT},
    ("Observation", "obs-1"): {"resourceType": "Observation", "id": "obs-1", "meta": {"versionId": "4"},
                               "status": "preliminary", "code": {"text": "heart rate"}, "subject": PATIENT},
    ("Observation", "obs-2"): {"resourceType": "Observation", "id": "obs-2", "meta": {"versionId": "1"},
                               "status": "final", "code": {"text": "heart rate"}, "subject": PATIENT},
}


class StandInEhr:
    async def read(self, rtype: str, rid: str, **_: Any) -> Prior:
        cur = copy.deepcopy(STORED.get((rtype, rid)))
        return Prior(cur, f'W/"{cur["meta"]["versionId"]}"' if cur else None)


def req(method: str, path: str, key: str | None, body: Any = None, ctype: str = "application/fhir+json",
        **headers: str) -> RawRequest:
    h = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if key:
        h.append(("x-api-key", key))
    raw = b""
    if body is not None:
        raw = json.dumps(body).encode()
        h.append(("content-type", ctype))
    return RawRequest(method, f"/fhir/R4{path}".encode(), tuple(h), raw, host="127.0.0.1:8080")


def observation(status: str = "final", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": status, "subject": PATIENT,
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "valueQuantity": {"value": 72, "unit": "/min"}, **extra}


def condition(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"text": "synthetic finding"}, "subject": PATIENT, **extra}


REQUESTS = [
    req("POST", "/Observation", WRITER, observation()),
    req("POST", "/Condition", WRITER, condition()),
    req("PUT", "/Condition/cond-1", WRITER, condition(id="cond-1"), if_match='W/"2"'),
    req("GET", "/Condition?patient=example-1", WRITER),
    req("GET", "/Patient/example-1", READER),
    req("POST", "/Observation", READER, observation()),
    req("POST", "/MedicationRequest", WRITER, {"resourceType": "MedicationRequest", "status": "active",
                                              "intent": "order", "subject": PATIENT,
                                              "medicationCodeableConcept": {"text": "synthetic"}}),
    req("PATCH", "/Observation/obs-1", WRITER, [{"op": "replace", "path": "/status", "value": "final"}],
        "application/json-patch+json", if_match='W/"4"'),
    req("DELETE", "/Observation/obs-2", WRITER),
    req("GET", "/Observation?patient=example-1", None),
    req("GET", "/metadata", None),
    req("POST", "/Observation", WRITER, {"resourceType": "Observation", "status": "not-a-status"}),
    req("POST", "/Observation", RETIRED, observation()),
]


def demo_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text(encoding="utf-8"))


def live_config(state: Path) -> dict[str, Any]:
    """demo.yaml as it was when the sample was recorded: with a client that has since been removed."""
    data = demo_config()
    data["clients"].append({"id": "retired-app", "auth": "api-key",
                            "api_key_sha256": hashlib.sha256(RETIRED.encode()).hexdigest(),
                            "scopes": ["system/Observation.c"], "tenant": "demo-clinic"})
    data["audit"]["path"] = str(state / "audit.jsonl")          # scratch: this run's audit chain
    data["killswitch"]["file"] = str(state / "killswitch")
    data["state"] = {"store": f"sqlite:{state / 'state.db'}"}
    return data


def lost_scope_config() -> dict[str, Any]:
    data = demo_config()
    writer = next(c for c in data["clients"] if c["id"] == "demo-writer")
    writer["scopes"] = [s for s in writer["scopes"] if s != "system/Condition.crus"]
    data["policy"]["dir"] = "../../policies"                    # relative to examples/replay/
    data["audit"]["path"] = "../.demo-state/audit.jsonl"
    data["killswitch"]["file"] = "../.demo-state/killswitch"
    return data


async def record(flows: Path, key: bytes, state: Path) -> None:
    cfg = parse_config(live_config(state), source="demo.yaml + retired-app")
    rt = await build_runtime(cfg, ROOT / "examples")
    rt = replace(rt, prior=StandInEhr())
    pipe = Pipeline(rt)
    # the stored version a decision saw, also when it refused (what the wiring keeps in Decision.prior)
    seen: dict[str, Prior] = {}
    read = pipe.prior_state

    async def prior_state(r: Any, cls: Any, who: Any) -> Prior | None:
        p = await read(r, cls, who)
        if p is not None:
            seen[r.correlation_id] = p
        return p

    pipe.prior_state = prior_state  # type: ignore[method-assign]
    recorder = Recorder(RecordingConfig(path=str(flows)), key, HERE)
    try:
        for i, raw in enumerate(REQUESTS):
            corr = f"sample-{i:04d}"
            d = await pipe.decide(raw, corr, "")
            if d.prior is None and corr in seen:
                d = replace(d, prior=seen[corr])
            status = d.refusal.status if d.refusal else {"POST": 201, "DELETE": 204}.get(raw.method, 200)
            record_decision(recorder, raw, d, status, T0 + timedelta(minutes=i))
    finally:
        await recorder.close()
        await rt.audit.close()
        await rt.svc.close()


def main() -> int:
    secret = os.environ.get(KEY_ENV) or DEMO_KEY
    key = recording_key_from_secret(secret.encode())
    os.environ.setdefault("FHIR_SIDECAR_AUDIT_KEY", "sample-scratch-audit-key-0123456789abcdef")
    os.environ.setdefault("FHIR_SIDECAR_ADMIN_TOKEN", "sample-scratch-admin-token")
    flows = HERE / "sample.flows"
    flows.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fhir-sidecar-sample-") as state:
        asyncio.run(record(flows, key, Path(state)))
    changed = HERE / "lost-scope.yaml"
    changed.write_text(
        "# Generated by make_sample.py: examples/demo.yaml where demo-writer lost system/Condition.crus.\n"
        "# Replay the sample under it (see make_sample.py for the key):\n"
        "#   fhir-sidecar replay examples/replay/sample.flows --config examples/replay/lost-scope.yaml "
        "--key env:FHIR_SIDECAR_RECORDING_KEY\n"
        + yaml.safe_dump(lost_scope_config(), sort_keys=False), encoding="utf-8")
    os.chdir(ROOT)   # the report names the recording by its path from the repository root
    report = replay(Path("examples/replay/sample.flows"), parse_config(lost_scope_config(), source=str(changed)),
                    key=key, base_dir=HERE)
    text = format_report(report)
    (HERE / "report.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
