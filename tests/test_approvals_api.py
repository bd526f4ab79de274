"""The interfaces over HTTP on 127.0.0.1: the JSON admin API, the CLI against it, and the review
page's security (sessions, cookie flags, CSRF, origin checks, roles, escaping) without a browser."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.admin import AdminServer

from sidecar.approvals import Approvals, build_approvals
from sidecar.approvals.cli import add_parser, cmd_approvals
from sidecar.approvals.service import Hooks, Release
from sidecar.audit.record import validate_fields
from sidecar.state import SqliteStore
from tests.test_approvals_support import (
    PASSWORDS,
    SECRET,
    make_cfg,
    med_hold,
    obs_update_hold,
)

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
LOCATION = "http://127.0.0.1:8080/fhir/R4/Observation/9/_history/4"


class Env:
    def __init__(self, approvals: Approvals, port: int, audit: list[dict], released: list[Release]) -> None:
        self.approvals, self.port, self.audit, self.released = approvals, port, audit, released
        self.svc = approvals.service
        self.base = f"http://127.0.0.1:{port}"


async def start_env(tmp_path: Path, **cfg_over: Any) -> tuple[Env, Any, SqliteStore]:
    store = SqliteStore(tmp_path / "state.db")
    audit: list[dict] = []
    released: list[Release] = []
    box: dict[str, Approvals] = {}

    async def release(rel: Release) -> None:  # stands in for the pipeline's release path
        released.append(rel)
        await box["a"].service.record_outcome(rel.item_id, 201, LOCATION, token=rel.token)

    approvals = build_approvals(store, make_cfg(**cfg_over), secret=SECRET, admin_token=ADMIN_TOKEN,
                                hooks=Hooks(audit=audit.append, release=release))
    box["a"] = approvals

    async def handler(method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        got = await approvals.admin(method, target, headers, body)
        return got if got is not None else (404, {"error": "not found"})

    srv = AdminServer("127.0.0.1", 0, handler)
    await srv.start()
    return Env(approvals, srv.port, audit, released), srv, store


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e, srv, store = await start_env(tmp_path, login_failures=3)
    try:
        yield e
    finally:
        await srv.stop()
        await store.close()


def basic(user: str, password: str | None = None) -> dict[str, str]:
    pw = PASSWORDS[user] if password is None else password
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


# ---------------------------------------------------------------------------------------- API

async def test_api_authentication_and_roles(env: Env) -> None:
    med = await env.svc.hold(med_hold())
    async with httpx.AsyncClient(base_url=env.base, trust_env=False, timeout=10) as c:
        for m, p in (("GET", "/admin/approvals"), ("GET", f"/admin/approvals/{med.item_id}"),
                     ("POST", f"/admin/approvals/{med.item_id}/approve")):
            assert (await c.request(m, p)).status_code == 401
            assert (await c.request(m, p, headers=basic("alice", "wrong-password"))).status_code in (401, 429)
        bearer = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        r = await c.get("/admin/approvals", headers=bearer)   # operators may list (no PHI) ...
        assert r.status_code == 200 and [i["id"] for i in r.json()["items"]] == [med.item_id]
        assert "Patient" not in r.text
        for m, p in (("GET", f"/admin/approvals/{med.item_id}"), ("POST", f"/admin/approvals/{med.item_id}/approve")):
            assert (await c.request(m, p, headers=bearer)).status_code == 401   # ... never read or decide
        r = await c.post(f"/admin/approvals/{med.item_id}/approve", headers=basic("bob"))
        assert r.status_code == 403 and "role" in r.json()["error"]
        r = await c.post(f"/admin/approvals/{med.item_id}/approve", headers=basic("refill-bot"))
        assert r.status_code == 403 and "own write" in r.json()["error"]
        assert (await c.get("/admin/approvals/" + "A" * 22, headers=basic("alice"))).status_code == 404
        assert (await c.get("/admin/approvals/../../x", headers=basic("alice"))).status_code == 404
        assert (await c.get("/admin/approvals?status=bogus", headers=basic("alice"))).status_code == 400
    assert env.released == [] and (await env.svc.get(med.item_id)).status == "pending"


async def test_api_show_approve_reject(env: Env) -> None:
    obs = await env.svc.hold(obs_update_hold())
    med = await env.svc.hold(med_hold())
    async with httpx.AsyncClient(base_url=env.base, trust_env=False, timeout=10) as c:
        d = (await c.get(f"/admin/approvals/{obs.item_id}", headers=basic("bob"))).json()
        assert d["status"] == "pending" and d["body"]["status"] == "final" and d["current"]["status"] == "preliminary"
        assert {x["path"]: x["change"] for x in d["diff"]}["status"] == "changed"
        assert {x["path"]: x["change"] for x in d["diff"]}["note[0].text"] == "added"
        both = await asyncio.gather(*(c.post(f"/admin/approvals/{obs.item_id}/approve", headers=basic(u))
                                      for u in ("bob", "alice")))
        assert sorted(r.status_code for r in both) == [200, 409]
        ok = next(r for r in both if r.status_code == 200).json()
        assert ok["status"] == "released" and ok["outcome"]["location"] == LOCATION
        assert len(env.released) == 1 and env.released[0].item_id == obs.item_id
        r = await c.post(f"/admin/approvals/{med.item_id}/reject", headers=basic("alice"), json={})
        assert r.status_code == 400
        r = await c.post(f"/admin/approvals/{med.item_id}/reject", headers=basic("alice"), content=b"not json")
        assert r.status_code == 400
        r = await c.post(f"/admin/approvals/{med.item_id}/reject", headers=basic("alice"),
                         json={"reason": "duplicate of an existing order"})
        assert r.status_code == 200 and r.json()["status"] == "rejected"
        assert (await c.post(f"/admin/approvals/{med.item_id}/approve", headers=basic("alice"))).status_code == 409
    decisions = [(a["decision"], a["reviewer"]) for a in env.audit]
    assert sorted(decisions) == [("approved", "alice"), ("rejected", "alice")] or \
        sorted(decisions) == [("approved", "bob"), ("rejected", "alice")]
    assert all(validate_fields(a) == a for a in env.audit)
    assert "duplicate" not in json.dumps(env.audit)


async def test_api_lockout_after_failed_logins(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.base, trust_env=False, timeout=10) as c:
        codes = [(await c.get("/admin/approvals", headers=basic("alice", "nope"))).status_code for _ in range(5)]
        assert codes[:3] == [401, 401, 401] and codes[-1] == 429
        # locked: even the right password is refused for now; another reviewer is unaffected
        assert (await c.get("/admin/approvals", headers=basic("alice"))).status_code == 429
        assert (await c.get("/admin/approvals", headers=basic("bob"))).status_code == 200


# ---------------------------------------------------------------------------------------- CLI

def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["approvals", *argv])


async def test_cli_over_the_admin_api(env: Env, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    obs = await env.svc.hold(obs_update_hold())
    med = await env.svc.hold(med_hold())
    monkeypatch.setenv("FHIR_SIDECAR_REVIEWER_PASSWORD", PASSWORDS["alice"])
    monkeypatch.delenv("FHIR_SIDECAR_CONFIG", raising=False)

    async def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        code = await asyncio.to_thread(cmd_approvals, _args(*argv, "--admin-url", env.base, "--reviewer", "alice"), out)
        return code, out.getvalue()

    code, text = await run("list")
    assert code == 0 and obs.item_id in text and med.item_id in text and "MedicationRequest" in text
    code, text = await run("show", obs.item_id)
    assert code == 0 and "changes:" in text and "status: preliminary -> final" in text.replace("changed   ", "")
    code, text = await run("approve", obs.item_id)
    assert code == 0 and "released" in text
    code, text = await run("reject", med.item_id, "--reason", "wrong dose")
    assert code == 0 and "rejected" in text
    code, _ = await run("approve", med.item_id)
    assert code == 1 and "409" in capsys.readouterr().err
    code, text = await run("list", "--status", "all", "--json")
    assert code == 0 and {i["status"] for i in json.loads(text)["items"]} == {"released", "rejected"}


# ---------------------------------------------------------------------------------------- web

def _set_cookies(r: httpx.Response) -> dict[str, str]:
    return {v.split("=", 1)[0]: v for v in r.headers.get_list("set-cookie")}


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


class Browserless:
    """Keeps the cookies by hand (httpx rightly withholds Secure cookies over http)."""

    def __init__(self, c: httpx.AsyncClient) -> None:
        self.c, self.jar = c, {}

    def _hdrs(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"cookie": "; ".join(f"{k}={v}" for k, v in self.jar.items())} if self.jar else {}
        return {**h, **(extra or {})}

    def _keep(self, r: httpx.Response) -> httpx.Response:
        for name, header in _set_cookies(r).items():
            value = header.split(";", 1)[0].split("=", 1)[1]
            if "Max-Age=0" in header:
                self.jar.pop(name, None)
            else:
                self.jar[name] = value
        return r

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return self._keep(await self.c.get(path, headers=self._hdrs(kw.pop("headers", None)), **kw))

    async def post(self, path: str, data: dict[str, str], headers: dict[str, str] | None = None) -> httpx.Response:
        return self._keep(await self.c.post(path, data=data, headers=self._hdrs(headers)))

    async def login(self, user: str) -> None:
        r = await self.get("/review/login")
        r = await self.post("/review/login", {"csrf": _csrf(r.text), "reviewer": user, "password": PASSWORDS[user]})
        assert r.status_code == 303 and r.headers["location"] == "/review/", r.text


async def test_web_login_cookies_and_headers(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.base, trust_env=False, timeout=10) as c:
        b = Browserless(c)
        r = await b.get("/review/")
        assert r.status_code == 303 and r.headers["location"] == "/review/login"
        r = await b.get("/review/login")
        assert r.status_code == 200
        for name, v in (("Content-Security-Policy", "script-src 'self'"), ("X-Frame-Options", "DENY"),
                        ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")):
            assert v in r.headers[name]
        assert r.headers.get_list("cache-control") == ["no-store"]
        login_cookie = _set_cookies(r)["__Host-fsr_login"]
        assert all(f in login_cookie for f in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"))
        csrf = _csrf(r.text)
        # no / wrong login CSRF, foreign origin, wrong password
        r = await b.post("/review/login", {"reviewer": "alice", "password": PASSWORDS["alice"]})
        assert r.status_code == 403
        r = await b.post("/review/login", {"csrf": csrf, "reviewer": "alice", "password": PASSWORDS["alice"]},
                         headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        r = await b.get("/review/login")
        r = await b.post("/review/login", {"csrf": _csrf(r.text), "reviewer": "alice", "password": "wrong"})
        assert r.status_code == 401 and "wrong password" in r.text and "__Host-fsr_session" not in b.jar
        r = await b.get("/review/login")
        r = await b.post("/review/login", {"csrf": _csrf(r.text), "reviewer": "alice", "password": PASSWORDS["alice"]})
        assert r.status_code == 303
        session = _set_cookies(r)["__Host-fsr_session"]
        assert all(f in session for f in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"))
        token = b.jar["__Host-fsr_session"]
        assert token not in json.dumps([await env.svc.holds.store.get("appr:index")], default=str)
        r = await b.get("/review/")
        assert r.status_code == 200 and "Review queue" in r.text and "Alice Reviewer" in r.text
        # static assets for the CSP: no inline script or style anywhere
        assert "<style" not in r.text and re.search(r"<script>(?!</script>)", r.text) is None
        assert (await b.get("/review/static/review.css")).headers["content-type"].startswith("text/css")
        # sign out: the session is gone server-side too
        r = await b.post("/review/logout", {"csrf": _csrf(r.text)})
        assert r.status_code == 303
        r = await c.get("/review/", headers={"cookie": f"__Host-fsr_session={token}"})
        assert r.status_code == 303


async def test_web_csrf_origin_roles_and_escaping(env: Env) -> None:
    obs = await env.svc.hold(obs_update_hold(body=json.dumps(
        {"resourceType": "Observation", "status": "final", "note": [{"text": "<script>alert(1)</script>"}]}).encode()))
    med = await env.svc.hold(med_hold())
    async with httpx.AsyncClient(base_url=env.base, trust_env=False, timeout=10) as c:
        b = Browserless(c)
        await b.login("bob")
        page = await b.get(f"/review/items/{obs.item_id}")
        assert page.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "<script>alert(1)" not in page.text
        csrf = _csrf(page.text)
        url = f"/review/items/{obs.item_id}/approve"
        assert (await b.post(url, {})).status_code == 403                                  # no CSRF token
        assert (await b.post(url, {"csrf": "forged"})).status_code == 403                  # wrong token
        assert (await b.post(url, {"csrf": csrf}, {"origin": "http://evil.example"})).status_code == 403
        assert (await b.post(url, {"csrf": csrf}, {"sec-fetch-site": "cross-site"})).status_code == 403
        r = await c.post(url, data={"csrf": csrf})                                          # no session cookie
        assert r.status_code == 303 and r.headers["location"].startswith("/review/login")
        assert env.released == [] and (await env.svc.get(obs.item_id)).status == "pending"
        # bob lacks the pharmacist role for MedicationRequest: view only, and a POST is refused 403
        r = await b.get(f"/review/items/{med.item_id}")
        assert "view it only" in r.text and 'id="approve"' not in r.text
        r = await b.post(f"/review/items/{med.item_id}/approve", {"csrf": csrf})
        assert r.status_code == 403 and "role" in r.text
        r = await b.post(f"/review/items/{med.item_id}/reject", {"csrf": csrf, "reason": "x"})
        assert r.status_code == 403
        # a rejection without a reason is refused (the page's `required` is not the only guard)
        r = await b.post(f"/review/items/{obs.item_id}/reject", {"csrf": csrf, "reason": " "})
        assert r.status_code == 400
        r = await b.post(url, {"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == f"/review/items/{obs.item_id}?m=released"
        assert len(env.released) == 1
        r = await b.get(r.headers["location"])
        assert "Approved and released" in r.text and LOCATION in r.text
        assert (await b.get("/review/items/" + "Z" * 22)).status_code == 404
        assert (await b.get("/review/?status=released")).text.count("data-href") == 1


async def test_admin_server_passes_extra_response_headers() -> None:
    """The reviewer page sets cookies: a (body, type, headers) payload reaches the wire as is."""
    import httpx

    async def probe(method, target, headers, body):
        return 200, (b"ok", "text/plain", (("X-Probe", "1"), ("Cache-Control", "private")))

    srv = AdminServer("127.0.0.1", 0, probe)
    await srv.start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as c:
            r = await c.get(f"http://127.0.0.1:{srv.port}/probe")
    finally:
        await srv.stop()
    assert r.headers["x-probe"] == "1" and r.headers["cache-control"] == "private"
