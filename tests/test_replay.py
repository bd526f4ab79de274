"""Replay (sidecar.replay): recorded live decisions re-decided offline under a new config.

The live decisions come from the real `Pipeline` (prior state from a stand-in EHR reader), are
recorded with `record_decision` (the adapter's call) and replayed under changed configs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import sidecar.policy.input as policy_input
from sidecar.config import parse_config
from sidecar.errors import unavailable
from sidecar.identity import Principal
from sidecar.pipeline import Decision, Pipeline
from sidecar.prior import Prior
from sidecar.recording import (
    Recorder,
    RecordingConfig,
    RecordingKeyError,
    read_recording,
    record_decision,
    recording_key_from_secret,
)
from sidecar.replay import format_report, replay, replay_async
from sidecar.request import RawRequest
from sidecar.runtime import build_runtime
from sidecar.scopes import ScopeSet

AUDIT_SECRET = "replay-test-audit-key-0123456789abcdefgh"
KEY = recording_key_from_secret(AUDIT_SECRET.encode())
W_KEY, R_KEY = "writer-key-replay-1", "reader-key-replay-1"
CANARY = "Ophelia Canary-Replay"
MRN = "MRN-77120931"
T_DAY = datetime(2026, 5, 6, 10, 15, 0, tzinfo=timezone.utc)
T_NIGHT = datetime(2026, 5, 6, 23, 30, 0, tzinfo=timezone.utc)

POLICY = """package fhir.writeback

import rego.v1

denies contains msg if {
	input.request.resource_type in data.replay_test.denied_types
	msg := concat("", [input.request.resource_type, " writes are denied"])
}

denies contains "the stored version is final" if {
	data.replay_test.lock_final == true
	input.current.status == "final"
}

denies contains "no CarePlan writes after 22:00 UTC" if {
	input.request.resource_type == "CarePlan"
	substring(input.context.time, 11, 2) >= "22"
}

decision := {"allow": false, "reasons": sort([m | some m in denies]), "review": false} if {
	count(denies) > 0
} else := {"allow": false, "reasons": ["needs a second look"], "review": true} if {
	input.request.resource_type in data.replay_test.review_types
} else := {"allow": true, "reasons": [], "review": false}
"""
DATA = {"replay_test": {"denied_types": [], "review_types": ["MedicationRequest"], "lock_final": True}}


def jwk() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    d = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    return d | {"kid": "k1", "use": "sig"}


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def write_policy(d: Path, data: dict) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "p.rego").write_text(POLICY)
    (d / "data.json").write_text(json.dumps(data))
    return str(d)


def config_dict(tmp: Path) -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:9/fhir/R4"},
        "identity": {"jwks": f"file:{tmp / 'jwks.json'}", "issuer": "https://auth.invalid", "audience": "https://ehr.invalid"},
        "clients": [
            {"id": "writer", "auth": "api-key", "api_key_sha256": sha(W_KEY), "tenant": "t1",
             "scopes": ["system/Observation.cruds", "system/Condition.cru", "system/MedicationRequest.c",
                        "system/CarePlan.c", "system/Patient.rs"]},
            {"id": "reader", "auth": "api-key", "api_key_sha256": sha(R_KEY), "scopes": ["system/*.rs"]},
            {"id": "smart", "auth": "bearer", "scopes": ["patient/Observation.rs", "patient/Patient.rs"]},
        ],
        "policy": {"engine": "embedded", "dir": write_policy(tmp / "policy", DATA)},
        "audit": {"key": "env:REPLAY_TEST_AUDIT_KEY", "path": str(tmp / "audit.jsonl")},
        "killswitch": {"file": str(tmp / "killswitch")},
        "state": {"store": f"sqlite:{tmp / 'state.db'}"},
    }


class StoredVersions:
    """The EHR's stored versions, as the prior-state reader would return them."""

    STORE = {
        "9": {"resourceType": "Observation", "id": "9", "status": "preliminary", "meta": {"versionId": "3"},
              "code": {"text": "pulse"}},
        "10": {"resourceType": "Observation", "id": "10", "status": "final", "meta": {"versionId": "7"},
               "code": {"text": "pulse"}, "note": [{"text": f"reviewed with {CANARY}"}]},
    }

    async def read(self, rtype: str, rid: str, **_: Any) -> Prior:
        cur = copy.deepcopy(self.STORE.get(rid))
        return Prior(cur, f'W/"{cur["meta"]["versionId"]}"' if cur else None)


def obs(status: str = "final", rid: str | None = None) -> bytes:
    r: dict[str, Any] = {"resourceType": "Observation", "status": status, "code": {"text": "pulse"},
                         "identifier": [{"value": MRN}], "note": [{"text": CANARY}]}
    if rid:
        r["id"] = rid
    return json.dumps(r).encode()


def res(rtype: str, **extra: Any) -> bytes:
    base = {"Condition": {"clinicalStatus": {"coding": [{"code": "active"}]}, "subject": {"reference": "Patient/1"},
                          "code": {"text": CANARY}},
            "MedicationRequest": {"status": "active", "intent": "order", "subject": {"reference": "Patient/1"},
                                  "medicationCodeableConcept": {"text": "aspirin"}},
            "CarePlan": {"status": "active", "intent": "plan", "subject": {"reference": "Patient/1"}}}[rtype]
    return json.dumps({"resourceType": rtype, **base, **extra}).encode()


def req(method: str, target: str, key: str | None = W_KEY, body: bytes = b"", **headers: str) -> RawRequest:
    h = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if key:
        h.append(("x-api-key", key))
    if body:
        h.append(("content-type", "application/fhir+json"))
    return RawRequest(method, target.encode(), tuple(h), body, host="127.0.0.1:8080")


# index -> what the live sidecar decided (asserted below, so the scenario cannot drift)
LIVE = [
    ("create Observation", req("POST", "/fhir/R4/Observation", body=obs()), T_DAY, "allow"),
    ("create Observation 2", req("POST", "/fhir/R4/Observation", body=obs("preliminary")), T_DAY, "allow"),
    ("search Observation", req("GET", f"/fhir/R4/Observation?identifier={MRN}"), T_DAY, "allow"),
    ("reader read Patient", req("GET", "/fhir/R4/Patient/1", R_KEY), T_DAY, "allow"),
    ("reader create", req("POST", "/fhir/R4/Observation", R_KEY, obs()), T_DAY, "deny"),
    ("update preliminary", req("PUT", "/fhir/R4/Observation/9", body=obs("final", "9"), if_match='W/"3"'), T_DAY, "allow"),
    ("update final", req("PUT", "/fhir/R4/Observation/10", body=obs("amended", "10")), T_DAY, "deny"),
    ("create MedicationRequest", req("POST", "/fhir/R4/MedicationRequest", body=res("MedicationRequest")), T_DAY, "review"),
    ("create Condition", req("POST", "/fhir/R4/Condition", body=res("Condition")), T_DAY, "allow"),
    ("no credentials", req("POST", "/fhir/R4/Observation", None, obs()), T_DAY, "deny"),
    ("metadata", req("GET", "/fhir/R4/metadata", None), T_DAY, "allow"),
    ("CarePlan by day", req("POST", "/fhir/R4/CarePlan", body=res("CarePlan")), T_DAY, "allow"),
    ("CarePlan at night", req("POST", "/fhir/R4/CarePlan", body=res("CarePlan")), T_NIGHT, "deny"),
]


class _FixedClock(datetime):
    at: datetime = T_DAY

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return cls.at


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run the scenario through the real pipeline once; record every decision."""
    import asyncio

    tmp = tmp_path_factory.mktemp("replay")
    mp = pytest.MonkeyPatch()
    mp.setenv("REPLAY_TEST_AUDIT_KEY", AUDIT_SECRET)
    mp.setattr(policy_input, "datetime", _FixedClock)  # the live policy's `context.time`
    raw_cfg = config_dict(tmp)
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk()]}))
    cfg = parse_config(raw_cfg)

    async def live() -> list[Decision]:
        rt = await build_runtime(cfg, tmp)
        rt = replace(rt, prior=StoredVersions())
        pipe = Pipeline(rt)
        # The stored version a decision saw, also when it refused (the wiring carries it in
        # `Decision.prior`; see the report: `guard` hands the prior it read back to `decide`).
        seen: dict[str, Prior] = {}
        read = pipe.prior_state

        async def prior_state(r, cls, who):
            p = await read(r, cls, who)
            if p is not None:
                seen[r.correlation_id] = p
            return p

        pipe.prior_state = prior_state  # type: ignore[method-assign]
        rec = Recorder(RecordingConfig(path="live.flows"), KEY, tmp)
        out = []
        try:
            for i, (_, raw, when, _) in enumerate(LIVE):
                _FixedClock.at = when
                d = await pipe.decide(raw, f"corr-{i:04d}-replay", "")
                if d.prior is None and d.correlation_id in seen:
                    d = replace(d, prior=seen[d.correlation_id])
                status = d.refusal.status if d.refusal else (201 if raw.method == "POST" else 200)
                record_decision(rec, raw, d, status, when)
                out.append(d)
        finally:
            await rec.close()
            await rt.audit.close()
            await rt.svc.close()
        return out

    decisions = asyncio.run(live())
    mp.undo()
    got = ["allow" if d.refusal is None else d.refusal.decision for d in decisions]
    assert got == [x[3] for x in LIVE], list(zip([x[0] for x in LIVE], got, [d.refusal for d in decisions]))
    return {"tmp": tmp, "cfg": raw_cfg, "flows": tmp / "live.flows"}


def run(world, mutate=None, *, policy_data: dict | None = None, **kw):
    c = copy.deepcopy(world["cfg"])
    if policy_data is not None:
        pdir = Path(world["tmp"]) / f"policy-{abs(hash(json.dumps(policy_data, sort_keys=True)))}"
        c["policy"]["dir"] = write_policy(pdir, policy_data)
    if mutate:
        mutate(c)
    return replay(world["flows"], parse_config(c), key=KEY, base_dir=world["tmp"], **kw)


def client(c: dict, cid: str) -> dict:
    return next(x for x in c["clients"] if x["id"] == cid)


def test_unchanged_config_changes_nothing(world):
    report = run(world)
    assert report.total == len(LIVE)
    assert report.changes == [] and report.undecidable == [] and report.not_compared == []
    assert not report.strict_failed
    assert report.reason_changes == []
    assert report.counts == {"allow": 8, "deny": 4, "review": 1, "error": 0, "undecidable": 0}
    assert report.live_counts == {"allow": 8, "deny": 4, "review": 1}
    assert report.policy_revision


def test_recorded_current_and_time_reach_the_policy(world):
    seen: list[dict] = []

    class Spy:
        revision = "spy"

        async def decide(self, doc: dict) -> dict:
            seen.append(doc)
            return {"allow": True, "reasons": []}

    run(world, policy=Spy())
    by_path = {d["request"]["path"]: d for d in seen}
    assert by_path["/Observation/9"]["current"] == StoredVersions.STORE["9"]
    assert by_path["/Observation/10"]["current"]["status"] == "final"
    assert sorted(d["context"]["time"] for d in seen if d["request"]["resource_type"] == "CarePlan") == [
        "2026-05-06T10:15:00Z", "2026-05-06T23:30:00Z"]
    assert all(d["client"]["id"] == "writer" and d["client"]["tenant"] == "t1" for d in seen)


def test_a_client_that_lost_a_scope(world):
    def lose_create(c):
        client(c, "writer")["scopes"][0] = "system/Observation.ruds"

    report = run(world, lose_create)
    assert [c.index for c in report.changes] == [0, 1]
    for c in report.changes:
        assert c.old.decision == "allow" and c.new.decision == "deny" and c.new.status == 403
        assert c.new.reasons == ("scope does not grant 'c' on Observation for create",)
        assert (c.method, c.interaction, c.resource_type, c.client_id) == ("POST", "create", "Observation", "writer")
        assert c.correlation_id == f"corr-{c.index:04d}-replay"
    # an update without If-Match may create, so it needs 'c' too: still denied, now for the scope
    assert [(c.index, c.old.reasons, c.new.reasons) for c in report.reason_changes] == [
        (6, ("policy: the stored version is final",), ("scope does not grant 'c' on Observation for update",))]
    assert report.strict_failed
    assert report.counts["deny"] == 6


def test_a_policy_that_now_denies_a_type(world):
    report = run(world, policy_data={"replay_test": dict(DATA["replay_test"], denied_types=["Condition"])})
    assert [(c.index, c.old.decision, c.new.decision, c.new.reasons) for c in report.changes] == [
        (8, "allow", "deny", ("policy: Condition writes are denied",))]


def test_current_dependent_decisions_follow_the_recorded_current(world):
    report = run(world, policy_data={"replay_test": dict(DATA["replay_test"], lock_final=False)})
    # only the update of the stored *final* version (recorded `current`) changes
    assert [(c.index, c.old.decision, c.new.decision) for c in report.changes] == [(6, "deny", "allow")]
    assert report.changes[0].old.reasons == ("policy: the stored version is final",)


def test_review_and_time_dependent_decisions_replay_as_recorded(world):
    report = run(world, policy_data={"replay_test": dict(DATA["replay_test"], review_types=[])})
    assert [(c.index, c.old.decision, c.new.decision) for c in report.changes] == [(7, "review", "allow")]


def test_unknown_client_is_undecidable(world):
    def drop_reader(c):
        c["clients"] = [x for x in c["clients"] if x["id"] != "reader"]

    report = run(world, drop_reader)
    assert [u.index for u in report.undecidable] == [3, 4]
    assert report.undecidable[0].new.reasons == ("client reader is not in the config",)
    assert report.counts["undecidable"] == 2 and report.changes == []
    assert report.strict_failed

    def reader_now_bearer(c):
        client(c, "reader").update(auth="bearer", api_key_sha256=None)
        del client(c, "reader")["api_key_sha256"]

    report = run(world, reader_now_bearer)
    assert "now authenticates with bearer" in report.undecidable[0].new.reasons[0]


def test_a_widened_ceiling_is_replayed_for_api_key_clients(world):
    def reader_writes(c):
        client(c, "reader")["scopes"] = ["system/*.rs", "system/Observation.c"]

    report = run(world, reader_writes)
    assert [(c.index, c.new.decision) for c in report.changes] == [(4, "allow")]


def test_report_text_and_json_hold_no_phi(world):
    def lose_create(c):
        client(c, "writer")["scopes"][0] = "system/Observation.ruds"

    report = run(world, lose_create)
    text, js = format_report(report), report.to_json()
    assert "changed decisions (2)" in text and "same decision, other reasons (1)" in text and "scope does not grant 'c' on Observation for create" in text
    assert "strict: FAIL" in text
    doc = json.loads(js)
    assert doc["changed"] == 2 and doc["strict_failed"] is True and doc["counts"]["deny"] == 6
    assert doc["changes"][0]["old"]["decision"] == "allow" and doc["changes"][0]["new"]["status"] == 403
    for secret in (CANARY, MRN, W_KEY, R_KEY, "pulse", AUDIT_SECRET):
        assert secret not in text and secret not in js
    assert "strict: ok" in format_report(run(world))


async def test_runtime_refusals_are_not_compared_and_errors_are_counted(tmp_path, world):
    path = tmp_path / "rt.flows"
    rec = Recorder(RecordingConfig(path=str(path)), KEY, tmp_path)
    who = Principal("writer", "api-key", ScopeSet.from_strings(["system/Observation.cruds"]))
    raw = req("POST", "/fhir/R4/Observation", body=obs())
    killed = Decision("corr-kill-0001", "", 0.0, unavailable("kill switch engaged", 30), principal=who)
    record_decision(rec, raw, killed, 503, T_DAY)
    await rec.close()
    c = copy.deepcopy(world["cfg"])
    report = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert report.changes == [] and len(report.not_compared) == 1 and not report.strict_failed
    assert report.not_compared[0].new.decision == "allow" and report.live_counts == {"error": 1}

    class Broken:
        revision = "broken"

        async def decide(self, doc: dict) -> dict:
            raise RuntimeError("engine down")

    report = await replay_async(world["flows"], parse_config(c), key=KEY, base_dir=world["tmp"], policy=Broken())
    errs = [x for x in report.changes if x.new.decision == "error"]
    assert errs and all(x.new.reasons == ("policy engine unavailable",) and x.new.status == 503 for x in errs)
    assert report.counts["error"] == len(errs)


async def test_bearer_identity_is_mapped_onto_todays_ceiling(tmp_path, world):
    path = tmp_path / "smart.flows"
    rec = Recorder(RecordingConfig(path=str(path)), KEY, tmp_path)
    # the token granted patient/Observation.rs (∩ the ceiling then), in patient 1's context
    who = Principal("smart", "bearer", ScopeSet.from_strings(["patient/Observation.rs"]), ("system", "patient"),
                    patient="1", user="Practitioner/7")
    raw = req("GET", "/fhir/R4/Observation?patient=1", None, authorization="Bearer tok")
    rec.record(raw=raw, decision_summary={"decision": "allow", "interaction": "search-type", "write": False,
                                          "resource_type": "Observation"}, principal=who, current=None, when=T_DAY,
               status=200)
    other = req("GET", "/fhir/R4/Observation?patient=2", None, authorization="Bearer tok")
    rec.record(raw=other, decision_summary={"decision": "deny", "interaction": "search-type", "write": False,
                                            "resource_type": "Observation", "status": 403,
                                            "reasons": [("patient context: search is not confined to the "
                                                         "patient's compartment")]},
               principal=who, current=None, when=T_DAY, status=403)
    await rec.close()
    assert dict(next(read_recording(path, KEY)).raw.headers)["authorization"] == "[stripped]"

    c = copy.deepcopy(world["cfg"])
    same = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert same.counts["allow"] == 1 and same.counts["deny"] == 1
    assert same.changes == same.reason_changes == [] and not same.strict_failed
    # a widened ceiling does not widen what the token granted
    client(c, "smart")["scopes"] = ["patient/*.cruds"]
    wide = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert wide.counts == same.counts
    # a narrowed ceiling does
    client(c, "smart")["scopes"] = ["patient/Observation.r"]
    narrow = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert [(x.index, x.new.decision, x.new.reasons) for x in narrow.changes] == [
        (0, "deny", ("scope does not grant 's' on Observation for search-type",))]
    assert [x.index for x in narrow.reason_changes] == [1]


def test_wrong_key_is_a_clear_error(world):
    with pytest.raises(RecordingKeyError, match="wrong key"):
        replay(world["flows"], parse_config(copy.deepcopy(world["cfg"])),
               key=recording_key_from_secret(b"not-the-recording-secret-0123456789"), base_dir=world["tmp"])


async def test_a_write_refused_before_prior_state_cannot_be_decided_later(tmp_path, world):
    """Live, the reader's update was refused on scopes before `current` was read: once a new config
    lets it past the scopes, deciding it would need the stored version nobody recorded."""
    path = tmp_path / "early.flows"
    rec = Recorder(RecordingConfig(path=str(path)), KEY, tmp_path)
    who = Principal("reader", "api-key", ScopeSet.from_strings(["system/*.rs"]))
    rec.record(raw=req("PUT", "/fhir/R4/Observation/9", R_KEY, obs("final", "9")),
               decision_summary={"decision": "deny", "status": 403, "interaction": "update", "write": True,
                                 "reasons": ["scope does not grant 'cu' on Observation for update"]},
               principal=who, current=None, when=T_DAY, status=403)
    await rec.close()
    c = copy.deepcopy(world["cfg"])
    same = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert same.changes == same.undecidable == [] and same.counts["deny"] == 1
    client(c, "reader")["scopes"] = ["system/*.cruds"]
    wider = await replay_async(path, parse_config(c), key=KEY, base_dir=world["tmp"])
    assert [u.new.reasons for u in wider.undecidable] == [("the stored version (current) was not recorded for this request",)]
    assert wider.strict_failed
