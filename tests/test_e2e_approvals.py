"""Issue 8 end to end: a write the policy sends to review is held, approved once, released once."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from sidecar.sandbox import SandboxServer
from tests.harness import WRITER_KEY, SidecarProcess, make_config, request

pytestmark = pytest.mark.e2e
BASE = "/fhir/R4"
MED = json.dumps({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                  "subject": {"reference": "Patient/p1"}, "medicationCodeableConcept": {"text": "amoxicillin"}}).encode()
REVIEW_POLICY = """package fhir.writeback

import rego.v1

default decision := {"allow": false, "reasons": ["no rule allows this write"]}

# high-impact: a MedicationRequest needs a human before it reaches the chart
decision := {"allow": false, "review": true, "reasons": ["MedicationRequest needs review"]} if {
	input.request.resource_type == "MedicationRequest"
	count(input.context.approvals) == 0
}

decision := {"allow": true, "reasons": []} if {
	input.request.resource_type == "MedicationRequest"
	count(input.context.approvals) > 0
}
"""


@pytest.fixture
def env(tmp_path):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    pol = tmp_path / "policy"
    pol.mkdir()
    (pol / "review.rego").write_text(REVIEW_POLICY)
    cfg = make_config(tmp_path, sandbox.base_url, policy={"engine": "embedded", "dir": str(pol), "path": "fhir/writeback"},
                      approvals={"reviewers": [{"id": "Practitioner/7", "roles": ["reviewer"],
                                                "password_sha256": hashlib.sha256(b"rev-password-1").hexdigest()}]})
    cfg["clients"][0]["scopes"].append("system/MedicationRequest.c")
    sc = SidecarProcess(cfg, tmp_path).start()
    yield sc, sandbox
    sc.stop()
    sandbox.stop()


def reviewer(password: str = "rev-password-1") -> dict[str, str]:
    token = base64.b64encode(f"Practitioner/7:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


def test_hold_approve_release_exactly_once_and_poll(env):
    sc, sandbox = env
    h = {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json"}
    status, headers, data = request(sc.port, "POST", f"{BASE}/MedicationRequest", MED, {**h, "Prefer": "respond-async"})
    assert status == 202, data
    loc = headers["content-location"]
    assert loc.startswith("/.fhir-sidecar/requests/")
    status, _, data = request(sc.port, "POST", f"{BASE}/MedicationRequest", MED, h)
    assert status == 403 and b"held for review" in data  # never a false success
    assert sandbox.request_log() == []
    item = loc.rsplit("/", 1)[1]
    assert request(sc.port, "GET", loc, None, {"X-API-Key": WRITER_KEY})[0] == 202
    assert request(sc.port, "GET", loc, None, {"X-API-Key": "reader-key-1"})[0] == 404  # only the requester polls
    # the requesting client cannot approve; a wrong password cannot either
    assert request(sc.admin_port, "POST", f"/admin/approvals/{item}/approve", b"{}", {"X-API-Key": WRITER_KEY})[0] in (401, 403)
    assert request(sc.admin_port, "POST", f"/admin/approvals/{item}/approve", b"{}", reviewer("wrong"))[0] in (401, 403)
    status, _, data = request(sc.admin_port, "POST", f"/admin/approvals/{item}/approve", b"{}", reviewer())
    assert status == 200, data
    creates = [e for e in sandbox.request_log() if e["action"] == "create"]
    assert len(creates) == 1
    assert request(sc.admin_port, "POST", f"/admin/approvals/{item}/approve", b"{}", reviewer())[0] == 409
    assert len([e for e in sandbox.request_log() if e["action"] == "create"]) == 1  # a double click writes once
    status, _, data = request(sc.port, "GET", loc, None, {"X-API-Key": WRITER_KEY})
    assert status == 200, data
    bundle = json.loads(data)
    assert bundle["type"] == "batch-response"
    entry = bundle["entry"][0]["response"]
    assert entry["status"].startswith("201") and entry["location"].startswith("MedicationRequest/")
    audit = [json.loads(x) for x in (sc.cfg_path.parent / "audit.jsonl").read_text().splitlines() if x.startswith("{")]
    intents = [r for r in audit if r["kind"] == "intent" and r.get("review_id") == item]
    assert len(intents) == 1 and intents[0]["reviewer"] == "Practitioner/7" and intents[0]["client_id"] == "demo-writer"
    reviews = {r.get("decision") for r in audit if r["kind"] == "review"}
    assert {"held", "approved"} <= reviews
    store_bytes = b"".join(p.read_bytes() for p in sc.cfg_path.parent.glob("state.db*"))
    assert b"amoxicillin" not in store_bytes  # held bodies are encrypted at rest


def test_reviewer_web_page_approves_and_rejects_on_the_running_sidecar(env):
    import re

    import httpx

    sc, sandbox = env
    h = {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json", "Prefer": "respond-async"}
    locs = [request(sc.port, "POST", f"{BASE}/MedicationRequest", MED.replace(b"amoxicillin", name), h)[1]["content-location"]
            for name in (b"drug-one", b"drug-two")]
    ids = [loc.rsplit("/", 1)[1] for loc in locs]
    origin = f"http://127.0.0.1:{sc.admin_port}"

    class Browser(httpx.Client):
        """Keeps `Secure` cookies on http://127.0.0.1 the way Chromium does (httpx would drop them)."""

        jar: dict[str, str] = {}

        def request(self, method, url, **kw):
            kw["headers"] = {**(kw.get("headers") or {}),
                             "cookie": "; ".join(f"{k}={v}" for k, v in self.jar.items())}
            r = super().request(method, url, **kw)
            for raw in r.headers.get_list("set-cookie"):
                name, _, rest = raw.partition("=")
                self.jar[name] = rest.split(";", 1)[0]
            return r

    with Browser(base_url=origin, headers={"Origin": origin}, follow_redirects=False, timeout=10) as web:
        page = web.get("/review/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = web.post("/review/login", data={"csrf": csrf, "reviewer": "Practitioner/7", "password": "rev-password-1"})
        assert r.status_code in (302, 303), r.text
        queue = web.get("/review/").text
        assert all(i in queue for i in ids) and "drug-one" not in r.headers.get("location", "")
        detail = web.get(f"/review/items/{ids[0]}")
        assert detail.status_code == 200 and "drug-one" in detail.text  # the proposed resource, readable
        token = re.search(r'name="csrf" value="([^"]+)"', detail.text).group(1)
        assert web.post(f"/review/items/{ids[0]}/approve", data={}).status_code in (400, 403)  # no CSRF token
        assert sandbox.request_log() == []
        r = web.post(f"/review/items/{ids[0]}/approve", data={"csrf": token})
        assert r.status_code in (200, 302, 303)
        r = web.post(f"/review/items/{ids[1]}/reject", data={"csrf": token, "reason": "wrong dose"})
        assert r.status_code in (200, 302, 303)
    creates = [e for e in sandbox.request_log() if e["action"] == "create"]
    assert len(creates) == 1 and b"drug-one" in base64.b64decode(creates[0]["body_b64"])
    ok = json.loads(request(sc.port, "GET", locs[0], None, {"X-API-Key": WRITER_KEY})[2])
    assert ok["entry"][0]["response"]["status"].startswith("201")
    status, _, data = request(sc.port, "GET", locs[1], None, {"X-API-Key": WRITER_KEY})
    rejected = json.loads(data)
    assert rejected["entry"][0]["response"]["status"].startswith("403") and b"wrong dose" not in data
