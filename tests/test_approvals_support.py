"""Shared helpers for the approvals tests (no tests here): config, seeded holds, a fake clock,
and an admin listener that can send response headers (Set-Cookie, Location)."""

from __future__ import annotations

import json
from typing import Any


from sidecar.approvals.config import ApprovalsConfig
from sidecar.approvals.passwords import hash_password
from sidecar.approvals.service import ApprovalService, HoldRequest, ReviewerIdentity

CANARY = "CANARY-PHI-7f3a9c"          # must never appear in clear in the state store
SECRET = b"an-audit-secret-of-at-least-32-characters!!"
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22", "carol": "carol-password-3",
             "refill-bot": "bot-pretending-1"}
# Small scrypt cost: the tests log in often; production uses the default N=2^14.
HASHES = {k: hash_password(v, n=2**10) for k, v in PASSWORDS.items()}

ALICE = ReviewerIdentity("alice", frozenset({"reviewer", "pharmacist"}), "Alice Reviewer")
BOB = ReviewerIdentity("bob", frozenset({"reviewer"}), "Bob")
DAVE = ReviewerIdentity("dave", frozenset({"reviewer", "pharmacist"}), "Dave")


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make_cfg(**over: Any) -> ApprovalsConfig:
    data: dict[str, Any] = {
        "ttl_s": 3600, "keep_s": 86400, "alert_after_s": 600, "release_lease_s": 60,
        "rules": [{"resource_types": ["MedicationRequest"], "roles": ["pharmacist"]},
                  {"resource_types": ["Condition"], "roles": ["reviewer"], "four_eyes": True}],
        "reviewers": [
            {"id": "alice", "name": "Alice Reviewer", "roles": ["reviewer", "pharmacist"], "password_hash": HASHES["alice"]},
            {"id": "bob", "name": "Bob", "roles": ["reviewer"], "password_hash": HASHES["bob"]},
            {"id": "carol", "roles": ["auditor"], "password_hash": HASHES["carol"]},
            # a reviewer account named like a client: the service still refuses its own writes
            {"id": "refill-bot", "roles": ["reviewer", "pharmacist"], "password_hash": HASHES["refill-bot"]},
        ],
    }
    data.update(over)
    return ApprovalsConfig.model_validate(data)


MED_REQUEST = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/123", "display": f"Jane {CANARY}"},
               "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                         "code": "197361", "display": "Amlodipine 5 MG Oral Tablet"}],
                                             "text": "Amlodipine 5 mg"},
               "dosageInstruction": [{"text": "1 tablet daily", "timing": {"repeat": {"frequency": 1, "period": 1,
                                                                                      "periodUnit": "d"}}}]}
OBS_CURRENT = {"resourceType": "Observation", "id": "9", "meta": {"versionId": "3"}, "status": "preliminary",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
               "subject": {"reference": "Patient/123"}, "valueQuantity": {"value": 88, "unit": "beats/min"}}
OBS_NEW = {**OBS_CURRENT, "status": "final", "valueQuantity": {"value": 92, "unit": "beats/min"},
           "note": [{"text": "rechecked after rest"}]}


def med_hold(**over: Any) -> HoldRequest:
    body = json.dumps(MED_REQUEST).encode()
    kw: dict[str, Any] = dict(
        client_id="refill-bot", correlation_id="corr-" + "a1b2c3d4", method="POST",
        target=f"/fhir/R4/MedicationRequest?_format=json&note={CANARY}", path="/MedicationRequest",
        headers=(("content-type", "application/fhir+json"), ("x-provenance", f'{{"who":"{CANARY}"}}')),
        body=body, interaction="create", resource_type="MedicationRequest", content_type="application/fhir+json",
        fingerprint="fp-" + "0" * 60, principal={"auth": "api-key", "scopes": ["system/MedicationRequest.c"],
                                                "tenant": "clinic-a", "patient": "123", "user": None},
        reasons=("MedicationRequest is a high-impact write and needs review",), policy_revision="rev-1")
    kw.update(over)
    return HoldRequest(**kw)


def obs_update_hold(**over: Any) -> HoldRequest:
    kw: dict[str, Any] = dict(
        client_id="ward-app", correlation_id="corr-obs-00000001", method="PUT", target="/fhir/R4/Observation/9",
        path="/Observation/9", headers=(("content-type", "application/fhir+json"), ("if-match", 'W/"3"')),
        body=json.dumps(OBS_NEW).encode(), interaction="update", resource_type="Observation", resource_id="9",
        content_type="application/fhir+json", fingerprint="fp-obs-" + "1" * 57,
        principal={"auth": "api-key", "scopes": ["system/Observation.u"], "tenant": "clinic-a", "patient": None,
                   "user": None},
        current=OBS_CURRENT, reasons=("Observation writes outside business hours need review",))
    kw.update(over)
    return HoldRequest(**kw)


def make_service(store: Any, cfg: ApprovalsConfig | None = None, clock: Clock | None = None, **kw: Any) -> ApprovalService:
    return ApprovalService.from_secret(store, cfg or make_cfg(), SECRET, clock=clock or Clock(), **kw)


