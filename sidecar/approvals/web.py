"""The reviewer web page on the admin listener, under `/review/`: server-rendered HTML, a little JS.

    GET  /review/                      the queue (filters: status, client, type) -- no PHI in URLs
    GET  /review/login, POST           sign in (reviewer id + password; hashed in the config)
    POST /review/logout
    GET  /review/items/{id}            one held write: request, proposed resource as an element
                                       table, diff against the current version, approve / reject
    POST /review/items/{id}/approve    CSRF token required
    POST /review/items/{id}/reject     CSRF token + reason required
    GET  /review/static/review.css|js

Session cookie `__Host-fsr_session` (HttpOnly; Secure; SameSite=Strict; Path=/): browsers accept
Secure cookies on http://127.0.0.1 and http://localhost (potentially trustworthy origins); any
other plain-http origin drops them, so off-loopback the page needs TLS in front (it then simply
cannot log in without it: fail closed). Every POST carries the session's CSRF token (login: a
double-submit nonce cookie), and a cross-site `Sec-Fetch-Site` or foreign `Origin` is refused.
Responses carry a strict CSP (no inline script or style), `X-Frame-Options: DENY`, `no-store`.

`handle(method, target, headers, body) -> (status, headers, body)`; `admin_handler()` adapts it
to `AdminServer` (payload `(body, content type, headers)`, see the package README).
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from sidecar.approvals.assets import CSS, JS
from sidecar.approvals.auth import Locked, ReviewerAuth, Session
from sidecar.approvals.render import diff, parse_body, proposed_resource, rows
from sidecar.approvals.service import ApprovalService, Hooks, ReviewError, status_line
from sidecar.approvals.store import STATUSES, Item, valid_id
from sidecar.logs import get_logger
from sidecar.state.base import StateUnavailable

log = get_logger("sidecar.approvals.web")
PREFIX = "/review"
SESSION_COOKIE = "__Host-fsr_session"
LOGIN_COOKIE = "__Host-fsr_login"
HTML_TYPE = "text/html; charset=utf-8"
SECURITY_HEADERS = (
    ("Content-Security-Policy", ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                                 "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),  # not no-referrer: Chromium then sends `Origin: null` on our POSTs
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
FLASH = {
    "approved": ("ok", "Approved. The write is being released."),
    "released": ("ok", "Approved and released: the EHR accepted the write."),
    "failed": ("bad", "Approved, but the release failed: see the outcome below."),
    "partial": ("info", "Your approval is recorded. A second reviewer must approve too."),
    "rejected": ("ok", "Rejected. Nothing was written; the app is told."),
    "loggedout": ("info", "You are signed out."),
    "session": ("info", "Your session ended: please sign in again."),
}
Response = tuple[int, list[tuple[str, str]], bytes]


def h(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k and k not in out:
            out[k] = v
    return out


def _cookie(name: str, value: str, max_age: int) -> tuple[str, str]:
    return ("Set-Cookie", f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict")


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _redirect(location: str, *extra: tuple[str, str]) -> Response:
    return 303, [("Location", location), ("Content-Type", "text/plain; charset=utf-8"), *SECURITY_HEADERS, *extra], b""


class ReviewWeb:
    def __init__(self, service: ApprovalService, auth: ReviewerAuth, hooks: Hooks, *, title: str = "fhir-sidecar review",
                 clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.auth = auth
        self.hooks = hooks
        self.title = title
        self._clock = clock

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def admin_handler(self) -> Callable[..., Any]:
        """For AdminServer (patched to take a 3-tuple payload): (status, (body, ctype, headers))."""
        async def handler(method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
            return self.as_admin_payload(await self.handle(method, target, headers, body))

        return handler

    @staticmethod
    def as_admin_payload(resp: Response) -> tuple[int, Any]:
        status, headers, body = resp
        ctype = next((v for k, v in headers if k.lower() == "content-type"), HTML_TYPE)
        return status, (body, ctype, tuple((k, v) for k, v in headers if k.lower() != "content-type"))

    # -- dispatch ---------------------------------------------------------------------------------

    async def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        try:
            return await self._route(method, target, headers, body)
        except StateUnavailable:
            return self._page(503, "Unavailable", self._flash("bad", "The review queue is unavailable right now "
                                                                     "(state store). Try again shortly."))
        except Exception as e:
            log.error("review page failed", error_type=type(e).__name__)
            return self._page(500, "Error", self._flash("bad", "Something went wrong."))

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query, max_num_fields=20)
        q = {k: v[0] for k, v in query.items() if v}
        if path == PREFIX:
            return _redirect(PREFIX + "/")
        if path == f"{PREFIX}/static/review.css" and method == "GET":
            return 200, [("Content-Type", "text/css; charset=utf-8"), *SECURITY_HEADERS], CSS.encode()
        if path == f"{PREFIX}/static/review.js" and method == "GET":
            return 200, [("Content-Type", "text/javascript; charset=utf-8"), *SECURITY_HEADERS], JS.encode()
        if path == f"{PREFIX}/login":
            if method == "GET":
                return self._login_page(200, q.get("m"))
            if method == "POST":
                return await self._login(headers, body)
            return self._page(405, "Not allowed", self._flash("bad", "Method not allowed."))
        token = _cookies(headers).get(SESSION_COOKIE)
        session = await self.auth.session(token)
        if method == "POST" and not _same_origin(headers):
            return self._page(403, "Refused", self._flash("bad", "Cross-site request refused."), session)
        if session is None:
            if method == "GET":
                return _redirect(f"{PREFIX}/login")
            return _redirect(f"{PREFIX}/login?m=session")
        if method == "POST":
            form = _form(headers, body)
            if form is None or not secrets.compare_digest(form.get("csrf", ""), session.csrf):
                return self._page(403, "Refused", self._flash(
                    "bad", "This form expired or did not come from this page (CSRF check). Reload and try again."),
                    session)
            if path == f"{PREFIX}/logout":
                await self.auth.end_session(token)
                return _redirect(f"{PREFIX}/login?m=loggedout", _cookie(SESSION_COOKIE, "", 0))
            seg = path[len(PREFIX) + 1:].split("/")
            if len(seg) == 3 and seg[0] == "items" and valid_id(seg[1]) and seg[2] in ("approve", "reject"):
                return await self._decide(seg[1], seg[2], session, form)
            return self._page(404, "Not found", self._flash("bad", "Not found."), session)
        if method != "GET":
            return self._page(405, "Not allowed", self._flash("bad", "Method not allowed."), session)
        if path == f"{PREFIX}/":
            return await self._queue(session, q)
        seg = path[len(PREFIX) + 1:].split("/")
        if len(seg) == 2 and seg[0] == "items" and valid_id(seg[1]):
            return await self._detail(seg[1], session, q.get("m"))
        return self._page(404, "Not found", self._flash("bad", "Not found."), session)

    # -- login ------------------------------------------------------------------------------------

    def _login_page(self, status: int, msg: str | None = None, error: str | None = None) -> Response:
        nonce = secrets.token_urlsafe(24)
        flash = self._flash("bad", error) if error else (self._flash(*FLASH[msg]) if msg in FLASH else "")
        body = f"""<div class="login card">
<h1>Sign in to review</h1>{flash}
<form method="post" action="{PREFIX}/login" autocomplete="off">
<input type="hidden" name="csrf" value="{h(nonce)}">
<label for="reviewer">Reviewer id</label><input type="text" id="reviewer" name="reviewer" required autofocus maxlength="128">
<label for="password">Password</label><input type="password" id="password" name="password" required maxlength="1024">
<button class="btn plain" id="sign-in" type="submit">Sign in</button>
</form></div>"""
        st, hdrs, data = self._page(status, "Sign in", body, None)
        hdrs.append(_cookie(LOGIN_COOKIE, nonce, 900))
        return st, hdrs, data

    async def _login(self, headers: dict[str, str], body: bytes) -> Response:
        if not _same_origin(headers):
            return self._login_page(403, error="Cross-site sign-in refused.")
        form = _form(headers, body)
        nonce = _cookies(headers).get(LOGIN_COOKIE, "")
        if form is None or not nonce or not secrets.compare_digest(form.get("csrf", ""), nonce):
            return self._login_page(403, error="The sign-in form expired (CSRF check). Please try again.")
        try:
            who = await self.auth.login(form.get("reviewer", "").strip(), form.get("password", ""))
        except Locked:
            return self._login_page(429, error="Too many failed attempts for this reviewer. Try again later.")
        if who is None:
            return self._login_page(401, error="Unknown reviewer or wrong password.")
        token, _ = await self.auth.new_session(who)
        return _redirect(f"{PREFIX}/", _cookie(SESSION_COOKIE, token, self.auth.cfg.session_ttl_s),
                         _cookie(LOGIN_COOKIE, "", 0))

    # -- queue ------------------------------------------------------------------------------------

    async def _queue(self, session: Session, q: dict[str, str]) -> Response:
        status = q.get("status", "pending")
        status = status if status in STATUSES or status == "all" else "pending"
        everything = await self.service.list_items()
        rows_ = [r for r in everything
                 if (status == "all" or r["status"] == status)
                 and (not q.get("client") or r["client"] == q["client"])
                 and (not q.get("type") or r["type"] == q["type"])]
        now = self._clock()
        pending = [r for r in everything if r["status"] == "pending"]
        oldest = max((now - r["created"] for r in pending), default=0.0)
        limit = self.service.cfg.alert_after_s
        overdue = sum(1 for r in pending if limit is not None and now - r["created"] > limit)

        def select(name: str, label: str, options: list[tuple[str, str]], current: str) -> str:
            opts = "".join(f'<option value="{h(v)}"{" selected" if v == current else ""}>{h(t)}</option>'
                           for v, t in options)
            return f'<label>{h(label)}<select name="{h(name)}" id="f-{h(name)}">{opts}</select></label>'

        clients = sorted({r["client"] for r in everything if r["client"]})
        types = sorted({r["type"] for r in everything if r["type"]})
        filters = (f'<form class="filters" method="get" action="{PREFIX}/">'
                   + select("status", "Status", [(s, s) for s in STATUSES] + [("all", "all")], status)
                   + select("client", "Client", [("", "any")] + [(c, c) for c in clients], q.get("client", ""))
                   + select("type", "Resource type", [("", "any")] + [(t, t) for t in types], q.get("type", ""))
                   + '<button class="btn plain" type="submit">Filter</button></form>')
        stats = (f'<div class="stats"><div class="stat"><span class="muted">Pending</span><b id="pending-count">{len(pending)}</b></div>'
                 f'<div class="stat"><span class="muted">Oldest waiting</span><b>{h(_span(oldest)) if pending else "–"}</b></div>'
                 f'<div class="stat"><span class="muted">Overdue</span><b>{overdue}</b></div></div>')
        if rows_:
            trs = []
            for r in sorted(rows_, key=lambda r: r["created"]):
                href = f"{PREFIX}/items/{r['id']}"
                trs.append(
                    f'<tr data-href="{h(href)}" data-id="{h(r["id"])}"><td><a href="{h(href)}">{h(_span(now - r["created"]))} ago</a>'
                    f'<div class="muted">{h(_when(r["created"]))}</div></td>'
                    f'<td><b>{h(r["type"] or "–")}</b></td><td>{h(r["interaction"])}</td><td>{h(r["client"])}</td>'
                    f'<td>{r["approvals"]} of {r["required"]}</td>'
                    f'<td>{h("in " + _span(r["expires"] - now) if r["status"] == "pending" else "")}</td>'
                    f'<td><span class="badge {h(r["status"])}">{h(r["status"])}</span></td></tr>')
            table = ('<table class="queue" id="queue"><thead><tr><th>Held</th><th>Type</th><th>Interaction</th>'
                     '<th>Client</th><th>Approvals</th><th>Expires</th><th>Status</th></tr></thead><tbody>'
                     + "".join(trs) + "</tbody></table>")
        else:
            table = '<div class="empty" id="queue-empty">Nothing here. Held writes appear as soon as the policy holds one.</div>'
        body = f'<h1>Review queue</h1>{stats}<div class="card">{filters}{table}</div>'
        return self._page(200, "Review queue", body, session)

    # -- one item ---------------------------------------------------------------------------------

    async def _detail(self, item_id: str, session: Session, msg: str | None, *, status: int = 200,
                      error: str | None = None) -> Response:
        item = await self.service.get(item_id)
        if item is None:
            return self._page(404, "Not found", self._flash("bad", "No such held write (it may have been removed "
                                                                   "after its retention time)."), session)
        flash = self._flash("bad", error) if error else (self._flash(*FLASH[msg]) if msg in FLASH else "")
        return self._page(status, f"{item.resource_type or 'Write'} held for review",
                          flash + self._item_html(item, session), session)

    def _item_html(self, item: Item, session: Session) -> str:
        now = self._clock()
        body = parse_body(item)
        prop = proposed_resource(item, body)
        approvers = ", ".join(item.approvers) or "none yet"
        reasons = "".join(f"<li>{h(r)}</li>" for r in item.reasons) or "<li class=muted>none given</li>"
        meta = [
            ("Client", h(item.client_id)),
            ("Request", f"<code>{h(item.method)} {h(item.path)}</code>"),
            ("Interaction", h(item.interaction)),
            ("Held", f"{h(_when(item.created))} <span class=muted>({h(_span(now - item.created))} ago)</span>"),
        ]
        if item.status == "pending":
            meta.append(("Expires", f"{h(_when(item.expires))} <span class=muted>(in {h(_span(item.expires - now))})</span>"))
        meta += [
            ("Approvals", f"{len(item.approvals)} of {item.required} <span class=muted>({h(approvers)})</span>"),
            ("May decide", h(", ".join(item.roles)) + " <span class=muted>(roles)</span>"),
            ("Why held", f'<ul class="reasons">{reasons}</ul>'),
            ("Correlation id", f"<code>{h(item.correlation_id)}</code>"),
        ]
        dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta)
        head = (f'<p><a href="{PREFIX}/">&larr; Back to the queue</a></p>'
                f'<h1>{h(item.resource_type or "Write")} <span class="muted">{h(item.interaction)}</span>'
                f' <span class="badge {h(item.status)}" id="item-status">{h(item.status)}</span></h1>')
        request = f'<section class="card"><h2>Request</h2><dl class="meta">{dl}</dl></section>'
        actions = f'<section class="card actions" id="actions">{self._actions_html(item, session)}</section>'
        parts = [head, f'<div class="grid">{request}{actions}</div>']
        if item.current is not None and prop is not None:
            changes = diff(item.current, prop)
            n = sum(1 for c in changes if c.kind != "unchanged")
            trs = "".join(
                f'<tr class="{c.kind}"><td>{h(c.path)}</td><td><span class="tag {c.kind}">{c.kind}</span></td>'
                f'<td class="old">{h(c.old) if c.old is not None else ""}</td>'
                f'<td class="new">{h(c.new) if c.new is not None else ""}</td></tr>' for c in changes)
            parts.append(
                f'<section class="card"><h2>Changes against the current version <span class="muted">({n} changed)</span></h2>'
                f'<label class="toggle"><input type="checkbox" id="show-unchanged"> show unchanged elements</label>'
                f'<table class="diff hide-unchanged" id="diff"><thead><tr><th>Element</th><th></th><th>Current</th>'
                f'<th>Proposed</th></tr></thead><tbody>{trs}</tbody></table></section>')
        if isinstance(body, list) and item.method == "PATCH":
            ops = "".join(f"<tr><td>{h(o.get('op'))}</td><td><code>{h(o.get('path'))}</code></td>"
                          f"<td class=v>{h(json.dumps(o.get('value')) if 'value' in o else o.get('from', ''))}</td></tr>"
                          for o in body if isinstance(o, dict))
            parts.append(f'<section class="card"><h2>JSON Patch</h2><table class="tree"><thead><tr><th>Op</th><th>Path</th>'
                         f'<th>Value</th></tr></thead><tbody>{ops}</tbody></table></section>')
        shown, title = (prop, f"Proposed {h(item.resource_type or 'resource')}") if prop is not None else \
            (item.current, f"{h(item.resource_type or 'Resource')} to be deleted")
        if shown is not None:
            rs, cut = rows(shown)
            trs = "".join(
                f'<tr class="{"group" if r.value is None else "leaf"}"><td class="k d{min(r.depth, 10)}">{h(r.label)}</td>'
                f'<td class="v">{h(r.value) if r.value is not None else ""}</td></tr>' for r in rs)
            note = '<p class="hint">Long resource: only the first elements are shown.</p>' if cut else ""
            parts.append(f'<section class="card"><h2>{title}</h2>{note}<table class="tree" id="resource"><tbody>{trs}'
                         f'</tbody></table></section>')
        elif item.body:
            parts.append('<section class="card"><h2>Body</h2><p class="hint">The body is not JSON; '
                         f'{len(item.body)} bytes of {h(item.content_type)}.</p></section>')
        if body is not None:
            raw = json.dumps(body, indent=2, ensure_ascii=False)[:200_000]
            parts.append(f'<details class="card"><summary>Raw request body (JSON)</summary><pre class="raw">{h(raw)}</pre></details>')
        return "".join(parts)

    def _actions_html(self, item: Item, session: Session) -> str:
        who = session.reviewer
        if item.status != "pending":
            return "<h2>Decision</h2>" + self._decision_html(item)
        if who.id == item.client_id or (item.principal.get("user") and who.id == item.principal.get("user")):
            return "<h2>Decision</h2><p>You sent this write: another reviewer must decide it.</p>"
        if not set(item.roles) & set(who.roles):
            return (f"<h2>Decision</h2><p>Deciding this write needs one of the roles <b>{h(', '.join(item.roles))}</b>; "
                    "you can view it only.</p>")
        if who.id in item.approvers:
            return ("<h2>Decision</h2><p>You approved this write. It needs a second reviewer "
                    f"({len(item.approvals)} of {item.required}).</p>")
        csrf = f'<input type="hidden" name="csrf" value="{h(session.csrf)}">'
        second = (f'<p class="hint">Four-eyes: {item.required} distinct reviewers must approve '
                  f'({len(item.approvals)} so far).</p>' if item.required > 1 else "")
        return (f'<h2>Decision</h2>{second}'
                f'<form method="post" action="{PREFIX}/items/{h(item.id)}/approve">{csrf}'
                f'<p class="hint">Approving sends exactly this write to the EHR under the release credentials, '
                f'after the sidecar re-checks kill switch, scopes and policy.</p>'
                f'<button class="btn approve" id="approve" type="submit">Approve and release</button></form>'
                f'<form method="post" action="{PREFIX}/items/{h(item.id)}/reject">{csrf}'
                f'<label for="reason"><b>Reason for rejecting</b> <span class="muted">(required; kept encrypted, '
                f'not sent to the app)</span></label>'
                f'<textarea id="reason" name="reason" required maxlength="1000"></textarea>'
                f'<p class="hint" id="reason-count"></p>'
                f'<button class="btn reject" id="reject" type="submit">Reject</button></form>')

    def _decision_html(self, item: Item) -> str:
        approvals = "".join(f"<li>approved by <b>{h(r)}</b> at {h(_when(t))}</li>" for r, t in item.approvals)
        if item.status == "rejected" and item.rejection:
            rj = item.rejection
            return (f'<p>Rejected by <b>{h(rj.get("reviewer"))}</b> at {h(_when(rj.get("at")))}.</p>'
                    f'<p class="hint">Reason</p><p id="rejection-reason">{h(rj.get("reason"))}</p>')
        if item.status == "expired":
            return "<p>Expired without a decision. Nothing was written.</p>" + (f"<ul>{approvals}</ul>" if approvals else "")
        oc = item.outcome or {}
        out = f"<ul>{approvals}</ul>"
        if item.status == "approved":
            return out + "<p>Approved: the release is in progress.</p>"
        if item.status == "released":
            loc = f' <code id="location">{h(oc.get("location"))}</code>' if oc.get("location") else ""
            return out + f'<p>Released: the EHR answered <b id="upstream-status">{h(status_line(oc.get("status")))}</b>.{loc}</p>'
        if oc.get("refused"):
            return out + f'<p>The sidecar refused the release ({h(oc.get("status"))}) when re-checking it.</p>'
        if oc.get("status") is None:
            return out + "<p>The EHR did not answer: the outcome is unknown (no retry without reconciliation).</p>"
        return out + f'<p>The EHR refused the write: <b id="upstream-status">{h(status_line(oc.get("status")))}</b>.</p>'

    async def _decide(self, item_id: str, action: str, session: Session, form: dict[str, str]) -> Response:
        try:
            if action == "approve":
                res = await self.service.approve(item_id, session.reviewer)
            else:
                res = await self.service.reject(item_id, session.reviewer, form.get("reason", ""))
        except ReviewError as e:
            await self.hooks.apply(e)
            if e.status == 404:
                return self._page(404, "Not found", self._flash("bad", "No such held write."), session)
            return await self._detail(item_id, session, None, status=e.status, error=e.reason[:1].upper() + e.reason[1:] + ".")
        await self.hooks.apply(res)
        item = await self.service.get(item_id) or res.item
        msg = {"pending": "partial", "approved": "approved", "released": "released", "failed": "failed",
               "rejected": "rejected"}.get(item.status, "approved")
        return _redirect(f"{PREFIX}/items/{item_id}?" + urlencode({"m": msg}))

    # -- page frame ----------------------------------------------------------------------------------

    @staticmethod
    def _flash(kind: str, text: str) -> str:
        return f'<div class="flash {h(kind)}" role="status" id="flash">{h(text)}</div>'

    def _page(self, status: int, title: str, body: str, session: Session | None = None) -> Response:
        who = ""
        if session is not None:
            name = session.reviewer.name or session.reviewer.id
            who = (f'<span class="who">Signed in as <b id="reviewer-name">{h(name)}</b></span>'
                   f'<form method="post" action="{PREFIX}/logout"><input type="hidden" name="csrf" value="{h(session.csrf)}">'
                   f'<button type="submit" id="sign-out">Sign out</button></form>')
        doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
               f'<meta name="viewport" content="width=device-width, initial-scale=1">'
               f'<title>{h(title)} · {h(self.title)}</title>'
               f'<link rel="stylesheet" href="{PREFIX}/static/review.css">'
               f'<script src="{PREFIX}/static/review.js" defer></script></head><body>'
               f'<header class="top"><span class="brand"><a href="{PREFIX}/">{h(self.title)}</a></span>{who}</header>'
               f'<main>{body}</main></body></html>')
        return status, [("Content-Type", HTML_TYPE), *SECURITY_HEADERS], doc.encode("utf-8")


def _same_origin(headers: dict[str, str]) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == headers.get("host", "")


def _form(headers: dict[str, str], body: bytes) -> dict[str, str] | None:
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[0] for k, v in parsed.items() if v}
