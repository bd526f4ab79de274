"""The review service: who may decide, four-eyes, exactly-once release under concurrency, the
app's async status answers, outcomes, sweep (alerts, retries, metrics), audit fields, config."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from sidecar.approvals.config import ApprovalsConfig, check_reviewers_against_clients
from sidecar.approvals.metrics import ApprovalMetrics
from sidecar.approvals.service import (
    Held,
    ReviewerIdentity,
    ReviewError,
    hold_request_from,
    idempotency_key_for,
    item_id_from_status_path,
    status_path,
)
from sidecar.audit.record import derive_key, validate_fields
from tests.redis_server import redis_server, store_factory  # noqa: F401  (fixtures)
from tests.test_approvals_support import (
    ALICE,
    BOB,
    CANARY,
    DAVE,
    SECRET,
    Clock,
    make_cfg,
    make_service,
    med_hold,
    obs_update_hold,
)

CAROL = ReviewerIdentity("carol", frozenset({"auditor"}))
BOT_AS_REVIEWER = ReviewerIdentity("refill-bot", frozenset({"reviewer", "pharmacist"}))


async def test_concurrent_approvals_release_exactly_once(store_factory) -> None:
    """Two replicas (two store instances), two reviewers clicking at once, many times over."""
    a, b = make_service(store_factory()), make_service(store_factory())
    for i in range(12):
        held = await a.hold(obs_update_hold(fingerprint=f"{i:064d}"))
        results = await asyncio.gather(a.approve(held.item_id, ALICE), b.approve(held.item_id, BOB),
                                       a.approve(held.item_id, ALICE), return_exceptions=True)
        releases = [r.release for r in results if not isinstance(r, BaseException) and r.release is not None]
        errors = [r for r in results if isinstance(r, ReviewError)]
        assert len(releases) == 1, results
        assert len(errors) == 2 and {e.status for e in errors} == {409}
        assert all(not isinstance(r, BaseException) or isinstance(r, ReviewError) for r in results)
        item = await a.get(held.item_id)
        assert item.status == "approved" and len(item.approvals) == 1


async def test_four_eyes_needs_two_distinct_reviewers_and_releases_once(store_factory) -> None:
    a, b = make_service(store_factory()), make_service(store_factory())
    held = await a.hold(obs_update_hold(resource_type="Condition", fingerprint="4" * 64))
    first = await a.approve(held.item_id, ALICE)
    assert first.release is None and first.status == "pending"
    assert first.audit[0]["reasons"] == ["approval 1 of 2"]
    with pytest.raises(ReviewError) as e:
        await b.approve(held.item_id, ALICE)  # the same reviewer again
    assert e.value.status == 409
    # the second approval, twice concurrently from two replicas: one release
    results = await asyncio.gather(a.approve(held.item_id, BOB), b.approve(held.item_id, BOB), return_exceptions=True)
    rel = [r.release for r in results if not isinstance(r, BaseException) and r.release]
    assert len(rel) == 1 and rel[0].approvals == ("alice", "bob")
    # four-eyes from the policy decision, too (`four_eyes: true` next to `review: true`)
    held2 = await a.hold(med_hold(four_eyes=True))
    assert (await a.approve(held2.item_id, ALICE)).release is None
    assert (await a.approve(held2.item_id, DAVE)).release is not None


async def test_requesting_client_or_user_cannot_approve(store_factory) -> None:
    svc = make_service(store_factory())
    held = await svc.hold(med_hold())
    for action in (lambda: svc.approve(held.item_id, BOT_AS_REVIEWER),
                   lambda: svc.reject(held.item_id, BOT_AS_REVIEWER, "no")):
        with pytest.raises(ReviewError) as e:
            await action()
        assert e.value.status == 403
    # the fhirUser who sent the write cannot review it either
    held2 = await svc.hold(med_hold(fingerprint="u" * 64, principal={"auth": "bearer", "user": "alice", "scopes": []}))
    with pytest.raises(ReviewError) as e:
        await svc.approve(held2.item_id, ALICE)
    assert e.value.status == 403
    assert (await svc.get(held.item_id)).status == "pending"


async def test_reviewer_without_the_role_gets_403(store_factory) -> None:
    svc = make_service(store_factory())
    held = await svc.hold(med_hold())  # MedicationRequest: rule roles [pharmacist]
    for who in (BOB, CAROL):
        with pytest.raises(ReviewError) as e:
            await svc.approve(held.item_id, who)
        assert e.value.status == 403
    with pytest.raises(ReviewError) as e:
        await svc.reject(held.item_id, BOB, "not mine to decide")
    assert e.value.status == 403
    obs = await svc.hold(obs_update_hold())  # default roles [reviewer]
    with pytest.raises(ReviewError):
        await svc.approve(obs.item_id, CAROL)
    assert (await svc.approve(obs.item_id, BOB)).release is not None


async def test_reject_needs_a_reason_kept_out_of_the_audit(store_factory) -> None:
    svc = make_service(store_factory(), pseudonym_key=derive_key(SECRET, "pseudonym"))
    held = await svc.hold(med_hold())
    for bad in ("", "   ", None, "x" * 1001):
        with pytest.raises(ReviewError) as e:
            await svc.reject(held.item_id, ALICE, bad)  # type: ignore[arg-type]
        assert e.value.status == 400
    res = await svc.reject(held.item_id, ALICE, f"dose looks wrong for {CANARY}")
    assert res.status == "rejected" and res.release is None and res.decision_seconds is not None
    rec = res.audit[0]
    assert validate_fields(rec) == rec  # an audit writer accepts it as is
    assert rec["kind"] == "review" and rec["decision"] == "rejected" and rec["reviewer"] == "alice"
    assert rec["review_id"] == held.item_id and rec["client_id"] == "refill-bot"
    assert rec["patient"].startswith("p:") and CANARY not in json.dumps(rec) and "123" not in json.dumps(rec)
    for r in [held.audit] + (await svc.approve((await svc.hold(obs_update_hold())).item_id, BOB)).audit:
        assert validate_fields(r) == r
    with pytest.raises(ReviewError) as e:
        await svc.approve(held.item_id, ALICE)
    assert e.value.status == 409


async def test_release_carries_exactly_the_stored_request(store_factory) -> None:
    svc = make_service(store_factory())
    hr = med_hold()
    held = await svc.hold(hr)
    rel = (await svc.approve(held.item_id, ALICE)).release
    assert rel is not None
    assert (rel.method, rel.target, rel.headers, rel.body) == (hr.method, hr.target, hr.headers, hr.body)
    assert rel.correlation_id == hr.correlation_id and rel.client_id == "refill-bot"
    assert rel.approvals == ("alice",) and rel.idempotency_key == idempotency_key_for(held.item_id)
    raw = dict(rel.raw_headers())
    assert raw["idempotency-key"] == rel.idempotency_key and raw["x-correlation-id"] == hr.correlation_id
    import re

    from sidecar.idempotency import KEY_RE
    assert KEY_RE.fullmatch(rel.idempotency_key) and re.fullmatch(r"[A-Za-z0-9._-]{8,64}", hr.correlation_id)


async def test_held_answers_and_status_polling(store_factory) -> None:
    svc = make_service(store_factory())
    held = await svc.hold(med_hold())
    assert held.status_path == status_path(held.item_id) and item_id_from_status_path(held.status_path) == held.item_id
    assert item_id_from_status_path("/.fhir-sidecar/requests/../x") is None
    r202, r403 = held.refusal(True), held.refusal(False)
    assert (r202.status, r202.code, r202.decision) == (202, "informational", "review")
    assert ("Content-Location", held.status_path) in r202.headers
    assert r403.status == 403 and held.item_id in r403.reason and held.status_path in r403.reason
    # only the requesting client may poll
    assert (await svc.status_response(held.item_id, "ward-app"))[0] == 404
    assert (await svc.status_response(held.item_id, None))[0] == 404
    assert (await svc.status_response("x" * 22, "refill-bot"))[0] == 404
    code, oo = await svc.status_response(held.item_id, "refill-bot")
    assert code == 202 and oo["issue"][0]["code"] == "informational"
    rel = (await svc.approve(held.item_id, ALICE)).release
    assert (await svc.status_response(held.item_id, "refill-bot"))[0] == 202  # approved, release in flight
    assert await svc.record_outcome(held.item_id, 201, "x", token="not-the-token") is None
    item = await svc.record_outcome(held.item_id, 201, "http://sidecar/fhir/R4/MedicationRequest/5/_history/1",
                                    token=rel.token)
    assert item.status == "released"
    assert await svc.record_outcome(held.item_id, 500, None, token=rel.token) is None  # once
    code, bundle = await svc.status_response(held.item_id, "refill-bot")
    assert code == 200 and bundle["resourceType"] == "Bundle" and bundle["type"] == "batch-response"
    assert bundle["entry"] == [{"response": {"status": "201 Created",
                                             "location": "http://sidecar/fhir/R4/MedicationRequest/5/_history/1"}}]
    # rejected, failed upstream, unknown outcome, refused on release
    outcomes = {}
    for i, how in enumerate(("rejected", "failed", "unknown", "refused")):
        h = await svc.hold(obs_update_hold(fingerprint=f"{i}" * 64))
        if how == "rejected":
            await svc.reject(h.item_id, BOB, "no")
        else:
            r = (await svc.approve(h.item_id, BOB)).release
            if how == "refused":
                await svc.release_refused(h.item_id, 403, token=r.token)
            else:
                await svc.record_outcome(h.item_id, 412 if how == "failed" else None, token=r.token)
        code, b = await svc.status_response(h.item_id, "ward-app")
        assert code == 200
        outcomes[how] = b["entry"][0]["response"]
    assert outcomes["rejected"]["status"] == "403 Forbidden" and outcomes["rejected"]["outcome"]["issue"][0]["code"] == "forbidden"
    assert "no" not in outcomes["rejected"]["outcome"]["issue"][0]["diagnostics"].split()  # the reason stays private
    assert outcomes["failed"]["status"] == "412 Precondition Failed"
    assert outcomes["unknown"]["status"] == "504 Gateway Timeout"
    assert outcomes["refused"]["status"] == "403 Forbidden"


async def test_transient_refusal_is_retried_by_the_sweep(store_factory) -> None:
    clock = Clock()
    svc = make_service(store_factory(), clock=clock)
    held = await svc.hold(med_hold())
    rel = (await svc.approve(held.item_id, ALICE)).release
    await svc.release_refused(held.item_id, 503, token=rel.token, retry=True)  # kill switch engaged
    out = await svc.sweep()
    assert [r.item_id for r in out.retry] == [held.item_id] and out.retry[0].token != rel.token
    assert (await svc.sweep()).retry == []  # claimed: not offered twice within the lease
    assert await svc.record_outcome(held.item_id, 201, None, token=rel.token) is None  # the old claim is void
    assert (await svc.record_outcome(held.item_id, 201, None, token=out.retry[0].token)).status == "released"


async def test_repeated_identical_write_gets_the_same_hold(store_factory) -> None:
    svc = make_service(store_factory())
    a = await svc.hold(med_hold())
    b = await svc.hold(med_hold(correlation_id="corr-second-1"))
    assert b.item_id == a.item_id and b.repeat and not a.repeat
    await svc.reject(a.item_id, ALICE, "no")
    c = await svc.hold(med_hold())  # decided: a new hold
    assert c.item_id != a.item_id and not c.repeat
    assert len(await svc.list_items()) == 2


async def test_sweep_alerts_once_metrics_and_listing(store_factory) -> None:
    clock = Clock()
    registry = CollectorRegistry()
    svc = make_service(store_factory(), clock=clock, metrics=ApprovalMetrics(registry))
    a = await svc.hold(med_hold())
    clock.advance(300)
    await svc.hold(obs_update_hold())
    out = await svc.sweep()
    assert out.pending == 2 and out.oldest_pending_s == 300 and out.alerts == []
    clock.advance(301)
    out = await svc.sweep()
    assert [(x.kind, x.client_id) for x in out.alerts] == [("review_overdue", "refill-bot")]
    assert out.alerts[0].to_json()["kind"] == "review_overdue" and CANARY not in json.dumps(out.alerts[0].to_json())
    assert (await svc.sweep()).alerts == []  # once per item
    res = await svc.approve(a.item_id, ALICE)
    assert res.decision_seconds == 601
    await svc.sweep()
    text = generate_latest(registry).decode()
    assert "fhir_sidecar_approvals_pending 1.0" in text and "fhir_sidecar_approvals_held_total 2.0" in text
    assert 'fhir_sidecar_approvals_decisions_total{decision="approved"} 1.0' in text
    assert [r["type"] for r in await svc.list_items(status="pending")] == ["Observation"]
    assert [r["type"] for r in await svc.list_items(client="refill-bot")] == ["MedicationRequest"]


async def test_hold_request_from_pipeline_objects() -> None:
    from sidecar.classify import classify
    from sidecar.identity import Principal
    from sidecar.parse import parse_request
    from sidecar.prior import Prior
    from sidecar.request import RawRequest
    from sidecar.scopes import ScopeSet

    body = json.dumps({"resourceType": "Observation", "id": "9", "status": "final"}).encode()
    raw = RawRequest("PUT", b"/fhir/R4/Observation/9?_pretty=true", (
        ("host", "sidecar:8080"), ("content-type", "application/fhir+json"), ("x-api-key", "secret-key-value"),
        ("prefer", "respond-async, return=minimal"), ("if-match", 'W/"3"'), ("x-correlation-id", "corr-12345678")),
        body)
    req = parse_request(raw, base_path="/fhir/R4", max_body_bytes=1 << 20, correlation="corr-12345678")
    cls = classify(req, upstream_base="https://ehr/fhir/R4")
    who = Principal("ward-app", "api-key", ScopeSet.from_strings(["system/Observation.u"]), tenant="t1")
    hr = hold_request_from(raw, req, cls, who, Prior({"resourceType": "Observation", "id": "9"}, 'W/"3"', None),
                           {"allow": False, "review": True, "four_eyes": True, "reasons": ["needs review"]},
                           policy_revision="rev-9")
    h = dict(hr.headers)
    assert "x-api-key" not in h and "authorization" not in h   # credentials are never stored
    assert h["prefer"] == "return=minimal" and h["if-match"] == 'W/"3"'
    assert hr.target == "/fhir/R4/Observation/9?_pretty=true" and hr.path == "/Observation/9"
    assert (hr.method, hr.interaction, hr.resource_type, hr.resource_id) == ("PUT", "update", "Observation", "9")
    assert hr.body == body and hr.four_eyes and hr.reasons == ("needs review",) and len(hr.fingerprint) == 64
    assert hr.current == {"resourceType": "Observation", "id": "9"} and hr.principal["scopes"] == ["system/Observation.u"]


def test_config_model() -> None:
    cfg = make_cfg()
    assert cfg.rule_for("MedicationRequest", "create", "x").roles == ["pharmacist"]
    assert cfg.rule_for("Condition", "update", "x").four_eyes
    assert cfg.rule_for("Observation", "create", "x").roles == ["reviewer"]
    assert ApprovalsConfig().ttl_s == 86400 and ApprovalsConfig().reviewers == []
    bad = [
        {"unknown": 1},
        {"reviewers": [{"id": "a:b", "password_sha256": "0" * 64}]},
        {"reviewers": [{"id": "a"}]},                                   # no credential
        {"reviewers": [{"id": "a", "password_sha256": "plain-text-password"}]},
        {"reviewers": [{"id": "a", "password_hash": "md5$abc"}]},
        {"reviewers": [{"id": "a", "password_sha256": "0" * 64}, {"id": "a", "password_sha256": "1" * 64}]},
        {"release_credentials": "inline-token"},
        {"rules": [{"roles": []}]},
    ]
    for b in bad:
        with pytest.raises(ValidationError):
            ApprovalsConfig.model_validate(b)
    ok = ApprovalsConfig.model_validate({"release_credentials": "vault:secret/data/ehr/release#token",
                                         "reviewers": [{"id": "Practitioner/7", "password_sha256": "env:P7_SHA"}]})
    assert ok.reviewers[0].id == "Practitioner/7"
    with pytest.raises(ValueError):
        check_reviewers_against_clients(cfg, ["refill-bot", "ward-app"])
    check_reviewers_against_clients(cfg, ["ward-app"])
    assert "reviewers" in ApprovalsConfig.model_json_schema()["properties"]


def test_held_is_a_plain_value() -> None:
    h = Held("x" * 22, status_path("x" * 22), 0.0, False, {})
    assert h.refusal(True).headers == (("Content-Location", "/.fhir-sidecar/requests/" + "x" * 22),)


async def test_release_principal_is_todays_client_with_the_held_scopes(store_factory) -> None:
    from sidecar.approvals.service import release_principal
    from sidecar.config import Client

    svc = make_service(store_factory())
    held = await svc.hold(med_hold(principal={"auth": "api-key", "scopes": ["system/MedicationRequest.c",
                                                                            "system/Observation.c"],
                                              "tenant": "clinic-a", "patient": None, "user": None,
                                              "contexts": ["system"]}))
    rel = (await svc.approve(held.item_id, ALICE)).release
    client = Client(id="refill-bot", auth="api-key", api_key_sha256="0" * 64, tenant="clinic-a",
                    scopes=["system/MedicationRequest.cu"])  # Observation.c revoked since the hold
    who = release_principal(rel, client)
    assert who.client_id == "refill-bot" and who.tenant == "clinic-a"
    assert who.scopes.as_strings() == ("system/MedicationRequest.c",)


async def test_background_sweeper_delivers_records_alerts_and_retries(store_factory) -> None:
    from sidecar.approvals import Approvals, run_sweeper
    from sidecar.approvals.service import Hooks
    from sidecar.approvals.store import QueueFull

    clock = Clock()
    svc = make_service(store_factory(), clock=clock)
    audit, alerts, retried = [], [], []
    hooks = Hooks(audit=audit.append, release=retried.append)
    ap = Approvals(svc, None, None, hooks)  # type: ignore[arg-type]
    stale = await svc.hold(med_hold())
    clock.advance(2000)
    late = await svc.hold(obs_update_hold())
    rel = (await svc.approve(late.item_id, BOB)).release
    clock.advance(1601)  # `stale` past its expiry; `late` approved, never released, lease over, not expired
    stop = asyncio.Event()
    task = asyncio.create_task(run_sweeper(ap, stop, on_alert=alerts.append, interval_s=0.05))
    for _ in range(100):
        if audit and retried:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [(a["decision"], a["review_id"]) for a in audit] == [("expired", stale.item_id)]
    assert [r.item_id for r in retried] == [late.item_id] and retried[0].token != rel.token
    assert alerts == []  # expired before it was reported overdue: nothing waits any more
    r = QueueFull("full").refusal()
    assert r.status == 503 and ("Retry-After", "60") in r.headers
