"""`fhir-sidecar approvals list|show|approve|reject|hash-password`: the review queue from a shell.

Everything goes through the running sidecar's admin API (`admin.host:port`; a wildcard bind is
reached on 127.0.0.1), authenticated as a reviewer with HTTP Basic:

    --reviewer ID            or env FHIR_SIDECAR_REVIEWER
    password                 env FHIR_SIDECAR_REVIEWER_PASSWORD, else prompted (never a flag:
                             flags show in `ps` and shell history)

`list` without a reviewer uses the admin token (`admin.token`) for the PHI-free listing.
Exit codes: 0 done, 1 refused by the API (the message says why), 2 config / unreachable.

Wiring (sidecar/cli.py): `from sidecar.approvals.cli import add_parser` then `add_parser(sub)` in
`build_parser()`; `main()` already maps ConfigError to exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

ENV_REVIEWER = "FHIR_SIDECAR_REVIEWER"
ENV_PASSWORD = "FHIR_SIDECAR_REVIEWER_PASSWORD"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    ap = sub.add_parser("approvals", help="the human review queue (through the admin API)")
    asub = ap.add_subparsers(dest="approvals_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config")
        p.add_argument("--reviewer", help=f"reviewer id (or env {ENV_REVIEWER}); password from env {ENV_PASSWORD} or a prompt")
        p.add_argument("--admin-url", help="override the admin API base URL (default: from the config)")
        p.add_argument("--json", action="store_true", help="print the API's JSON")
        p.set_defaults(fn=cmd_approvals)

    ls = asub.add_parser("list", help="held writes (default: pending)")
    ls.add_argument("--status", default="pending", help="pending|approved|released|rejected|expired|failed|all")
    ls.add_argument("--client")
    ls.add_argument("--type", dest="resource_type")
    common(ls)
    for name, text in (("show", "one held write, readable"), ("approve", "approve (and release) a held write")):
        p = asub.add_parser(name, help=text)
        p.add_argument("id")
        common(p)
    rj = asub.add_parser("reject", help="reject a held write (a reason is required)")
    rj.add_argument("id")
    rj.add_argument("--reason", required=True, help="kept encrypted with the item; never audited or sent to the app")
    common(rj)
    hp = asub.add_parser("hash-password", help="print a password_hash for approvals.reviewers (reads the password)")
    hp.set_defaults(fn=cmd_hash_password)
    return ap


@dataclass
class ApiClient:
    base_url: str
    reviewer: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 30.0

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> tuple[int, Any]:
        import httpx

        if self.reviewer:
            auth: Any = (self.reviewer, self.password or "")
            headers = {}
        else:
            auth, headers = None, ({"authorization": f"Bearer {self.token}"} if self.token else {})
        try:
            r = httpx.request(method, self.base_url.rstrip("/") + path, json=payload, auth=auth, headers=headers,
                              timeout=self.timeout_s, trust_env=False)
        except httpx.HTTPError as e:
            from sidecar.config import ConfigError

            raise ConfigError(f"the sidecar's admin API is not reachable ({type(e).__name__})") from None
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"error": f"unexpected answer ({r.status_code})"}


def client_from_args(args: argparse.Namespace, *, need_reviewer: bool) -> ApiClient:
    from sidecar.config import CONFIG_ENV, ConfigError, config_path, load_config
    from sidecar.secretrefs import resolve

    reviewer = args.reviewer or os.environ.get(ENV_REVIEWER)
    if need_reviewer and not reviewer:
        raise ConfigError(f"a reviewer is needed: --reviewer ID or env {ENV_REVIEWER}")
    base, token = args.admin_url, None
    if base is None or args.config or os.environ.get(CONFIG_ENV):
        path = config_path(args.config)
        cfg = load_config(path)
        if base is None:
            host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "::", "") else cfg.admin.host
            base = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.admin.port}"
        if not reviewer and cfg.admin.token:  # the operator listing
            token = resolve(cfg.admin.token, base_dir=path.parent.resolve()).reveal()
    password = None
    if reviewer:
        password = os.environ.get(ENV_PASSWORD)
        if password is None:
            if not sys.stdin.isatty():
                raise ConfigError(f"no password: set {ENV_PASSWORD} or run on a terminal")
            password = getpass.getpass(f"password for reviewer {reviewer}: ")
    return ApiClient(base, reviewer, password, token)


def _ago(ts: float) -> str:
    s = int(max(0, time.time() - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_list(items: list[dict[str, Any]]) -> str:
    if not items:
        return "(no held writes)"
    head = f"{'ID':<22}  {'HELD':>8}  {'TYPE':<22} {'INTERACTION':<18} {'CLIENT':<20} {'APPR':<5} STATUS"
    lines = [head]
    for it in items:
        lines.append(f"{it['id']:<22}  {_ago(it['created']):>8}  {it.get('type') or '-'!s:<22} "
                     f"{it['interaction']:<18} {it['client']:<20} {str(it['approvals']) + '/' + str(it['required']):<5} "
                     f"{it['status']}")
    return "\n".join(lines)


def format_item(d: dict[str, Any]) -> str:
    from sidecar.approvals.render import rows

    out = [f"{d['id']}  {d['status'].upper()}  {d.get('type') or ''} {d['interaction']}",
           f"  client       {d['client']}",
           f"  request      {d['method']} {d['path']}",
           (f"  held         {_ago(d['created'])} ago; approvals {len(d['approvals'])} of {d['required']}"
            f" (roles: {', '.join(d['roles'])})")]
    for r in d.get("reasons") or []:
        out.append(f"  why held     {r}")
    for a in d.get("approvals") or []:
        out.append(f"  approved by  {a['reviewer']}")
    if d.get("rejection"):
        out.append(f"  rejected by  {d['rejection']['reviewer']}: {d['rejection']['reason']}")
    if d.get("outcome"):
        oc = d["outcome"]
        out.append(f"  outcome      {oc.get('status')} {oc.get('location') or ''}".rstrip())
    if d.get("diff"):
        out.append("  changes:")
        for c in d["diff"]:
            out.append(f"    {c['change']:<9} {c['path']}: {c['old'] if c['old'] is not None else ''}"
                       f" -> {c['new'] if c['new'] is not None else ''}")
    shown = d.get("proposed") if d.get("proposed") is not None else d.get("current")
    if shown is not None:
        out.append("  resource:")
        rs, cut = rows(shown, limit=400)
        for r in rs:
            out.append("    " + "  " * r.depth + (f"{r.label}: {r.value}" if r.value is not None else f"{r.label}"))
        if cut:
            out.append("    …")
    return "\n".join(out)


def cmd_approvals(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from urllib.parse import urlencode

    out = out or sys.stdout
    action = args.approvals_command
    api = client_from_args(args, need_reviewer=action != "list")
    if action == "list":
        q = {k: v for k, v in (("status", None if args.status == "all" else args.status), ("client", args.client),
                                ("type", args.resource_type)) if v}
        status, body = api.call("GET", "/admin/approvals" + (f"?{urlencode(q)}" if q else ""))
        text = format_list(body.get("items", [])) if status == 200 and not args.json else None
    elif action == "show":
        status, body = api.call("GET", f"/admin/approvals/{args.id}")
        text = format_item(body) if status == 200 and not args.json else None
    elif action == "approve":
        status, body = api.call("POST", f"/admin/approvals/{args.id}/approve", {})
        text = f"{args.id}: {body.get('status')} ({body.get('approvals')} of {body.get('required')} approvals)" \
            if status == 200 and not args.json else None
    else:
        status, body = api.call("POST", f"/admin/approvals/{args.id}/reject", {"reason": args.reason})
        text = f"{args.id}: {body.get('status')}" if status == 200 and not args.json else None
    if status != 200:
        print(f"fhir-sidecar: {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    print(text if text is not None else json.dumps(body, indent=2), file=out)
    return 0


def cmd_hash_password(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from sidecar.approvals.passwords import hash_password

    if sys.stdin.isatty():
        pw = getpass.getpass("new reviewer password: ")
        if getpass.getpass("again: ") != pw:
            print("fhir-sidecar: the passwords differ", file=sys.stderr)
            return 1
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if len(pw) < 12:
        print("fhir-sidecar: use at least 12 characters", file=sys.stderr)
        return 1
    print(hash_password(pw), file=out or sys.stdout)
    return 0
