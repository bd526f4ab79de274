"""`fhir-sidecar`: the command line. It wires things together and holds no logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from sidecar.audit.writer import AuditUnavailable
from sidecar.config import ConfigError, config_path, json_schema, load_config
from sidecar.secretrefs import SecretError


def _load(args: argparse.Namespace):
    path = config_path(args.config)
    return load_config(path), path


def cmd_run(args: argparse.Namespace) -> int:
    from sidecar.logs import configure_logging
    from sidecar.proxy import Sidecar

    configure_logging(args.log_level)
    cfg, path = _load(args)
    if args.worker is not None:  # started by the supervisor of `--workers N`
        from sidecar.workers import WorkerSlot, die_with_supervisor

        die_with_supervisor()
        slot = WorkerSlot.parse(args.worker, args.admin_fd)
        return asyncio.run(Sidecar(cfg, path, base_dir=path.parent.resolve(), worker=slot,
                                   worker_listen_port=args.listen_port).run())
    if args.workers != 1:
        from sidecar.workers import Supervisor

        return asyncio.run(Supervisor(cfg, path, args.workers, log_level=args.log_level).run())
    return asyncio.run(Sidecar(cfg, path, base_dir=path.parent.resolve()).run())


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.runtime import check_startable, load_policy, resolve_secrets

    cfg, path = _load(args)
    base = path.parent.resolve()
    check_startable(cfg)
    policy = load_policy(cfg, base)
    if args.resolve:
        resolve_secrets(cfg, base)
    print(f"{path}: ok ({len(cfg.clients)} clients, mode {cfg.listen.mode}"
          + (f", policy {policy.revision}" if policy else ", policy off") + ")")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_killswitch(args: argparse.Namespace) -> int:
    from sidecar.killswitch import read_state, write_flag

    cfg, path = _load(args)
    flag = Path(cfg.killswitch.file)
    if not flag.is_absolute():
        flag = path.parent.resolve() / flag
    if args.action in ("on", "off"):
        try:
            write_flag(flag, args.action == "on", args.client, args.reason or "")
        except ValueError as e:
            raise ConfigError(f"killswitch: {e}") from None
    st = read_state(flag)
    print(json.dumps({"engaged": st.engaged, "clients": sorted(st.clients), "scope": cfg.killswitch.scope,
                      "flag_file": str(flag)}))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from sidecar.audit.files import all_chain_files
    from sidecar.audit.verify import verify_files
    from sidecar.runtime import resolve_secrets

    cfg, path = _load(args)
    secrets = resolve_secrets(cfg, path.parent.resolve())["audit"]
    files = args.files or all_chain_files(_audit_path(cfg, path))
    if not files:
        raise ConfigError(f"no audit files at {_audit_path(cfg, path)}")
    result = verify_files(files, secrets, args.checkpoints)
    print(json.dumps({"code": result.code, "first_bad_seq": result.first_bad_seq, "chain": result.chain,
                      "message": result.message}))
    return result.code


def cmd_policy_test(args: argparse.Namespace) -> int:
    from sidecar.policy.testing import run_policy_tests

    report = run_policy_tests(Path(args.dir), verbose=args.verbose)
    print("\n".join(report.lines))
    return 0 if report.ok else 1


def cmd_policy_eval(args: argparse.Namespace) -> int:
    from sidecar.identity import Identities
    from sidecar.policy.offline import evaluate_offline, load_request_file
    from sidecar.runtime import load_policy, resolve_secrets

    cfg, path = _load(args)
    base = path.parent.resolve()
    secrets = resolve_secrets(cfg, base, audit=False)
    raw, current = load_request_file(Path(args.request))
    out = asyncio.run(evaluate_offline(cfg, Identities(cfg, secrets["api_keys"]), load_policy(cfg, base), raw, current))
    print(json.dumps(out, indent=2))
    return 0 if out["decision"].get("allow") else 1


def _audit_path(cfg, path: Path) -> str:
    p = Path(cfg.audit.path)
    return str(p if p.is_absolute() else path.parent.resolve() / p)


def cmd_audit_show(args: argparse.Namespace) -> int:
    from sidecar.audit.files import all_chain_files
    from sidecar.audit.show import format_record, show_records

    files = args.files
    if not files:
        cfg, path = _load(args)
        files = all_chain_files(_audit_path(cfg, path))
    for r in show_records(files, correlation_id=args.correlation_id, client_id=args.client, kind=args.kind,
                          decision=args.decision, since=args.since, until=args.until):
        print(json.dumps(r) if args.json else format_record(r))
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    """CLIs change a running sidecar's state only through its authenticated admin API."""
    import httpx

    from sidecar.secretrefs import resolve

    cfg, cfg_path = _load(args)
    token = resolve(cfg.admin.token, base_dir=cfg_path.parent.resolve()).reveal() if cfg.admin.token else ""
    host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "::") else cfg.admin.host
    try:
        r = httpx.request(method, f"http://{host}:{cfg.admin.port}{path}", json=payload, timeout=10, trust_env=False,
                          headers={"authorization": f"Bearer {token}"})
    except httpx.HTTPError as e:
        raise ConfigError(f"the sidecar's admin API is not reachable ({type(e).__name__})") from None
    return r.status_code, r.json()


def cmd_receipts(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    if args.action == "resolve" and not (args.committed or args.failed):
        raise ConfigError("receipts resolve needs --committed or --failed")
    if args.action == "show":
        status, out = _admin_call(args, "GET", "/admin/receipts?" + urlencode({"client": args.client, "key": args.key}))
    else:
        status, out = _admin_call(args, "POST", "/admin/receipts/resolve", {
            "client": args.client, "key": args.key, "committed": args.committed, "location": args.location})
    print(json.dumps(out))
    return 0 if status == 200 else 1


def cmd_certs_init(args: argparse.Namespace) -> int:
    from sidecar.certs import init_ca

    try:
        print(init_ca(Path(args.dir), force=args.force))
    except FileExistsError as e:
        raise ConfigError(str(e)) from None
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from sidecar.recording import RecordingError, recording_key
    from sidecar.replay import format_report, replay

    cfg, path = _load(args)
    base = path.parent.resolve()
    try:
        key = recording_key(cfg, base, key_ref=args.key)
        report = replay(Path(args.flows), cfg, key=key, base_dir=base)
    except RecordingError as e:
        print(f"fhir-sidecar: {e}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else format_report(report))
    return 1 if args.strict and report.strict_failed else 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from sidecar.sandbox import main as sandbox_main

    argv = ["--host", "127.0.0.1", "--port", str(args.port)]
    if args.profile:
        argv += ["--profile", args.profile]
    return sandbox_main(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(port=args.port, admin_port=args.admin_port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fhir-sidecar", description="A fail-closed FHIR write-back sidecar.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the proxy and admin listener until SIGTERM")
    r.add_argument("--config")
    r.add_argument("--workers", type=int, default=1,
                   help="proxy processes sharing the listening port (SO_REUSEPORT), under one supervisor")
    r.add_argument("--log-level", default="info")
    # internal: how the supervisor starts a worker
    r.add_argument("--worker", help=argparse.SUPPRESS)
    r.add_argument("--listen-port", type=int, help=argparse.SUPPRESS)
    r.add_argument("--admin-fd", type=int, help=argparse.SUPPRESS)
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("demo", help="sandbox EHR + sidecar + example policy on loopback")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--admin-port", type=int, default=9090)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("check", help="validate config and compile policies")
    c.add_argument("--config")
    c.add_argument("--resolve", action="store_true", help="also resolve secret references")
    c.set_defaults(fn=cmd_check)

    cs = sub.add_parser("config", help="config tools")
    cs_sub = cs.add_subparsers(dest="config_command", required=True)
    cs_sub.add_parser("schema", help="print the config's JSON Schema").set_defaults(fn=cmd_schema)

    k = sub.add_parser("killswitch", help="engage / release / show the kill switch")
    k.add_argument("action", choices=["on", "off", "status"])
    k.add_argument("--config")
    k.add_argument("--client")
    k.add_argument("--reason")
    k.set_defaults(fn=cmd_killswitch)

    a = sub.add_parser("audit", help="audit trail tools")
    a_sub = a.add_subparsers(dest="audit_command", required=True)
    v = a_sub.add_parser("verify", help="verify chains and HMACs (exit 0 intact, 1 tampered, 2 torn tail)")
    v.add_argument("--config")
    v.add_argument("--checkpoints")
    v.add_argument("files", nargs="*")
    v.set_defaults(fn=cmd_audit_verify)

    sh = a_sub.add_parser("show", help="readable, filterable view of audit records")
    sh.add_argument("--config")
    sh.add_argument("--correlation-id")
    sh.add_argument("--client")
    sh.add_argument("--kind", help="e.g. intent or deny,read")
    sh.add_argument("--decision", help="allow, deny, error, replay, or an outcome: committed, failed, unknown")
    sh.add_argument("--since", help="ISO 8601, inclusive")
    sh.add_argument("--until", help="ISO 8601, exclusive")
    sh.add_argument("--json", action="store_true")
    sh.add_argument("files", nargs="*")
    sh.set_defaults(fn=cmd_audit_show)

    rc = sub.add_parser("receipts", help="idempotency receipts (through the running sidecar's admin API)")
    rc.add_argument("action", choices=["resolve", "show"])
    rc.add_argument("key")
    rc.add_argument("--client", required=True, help="keys are scoped per client")
    rc.add_argument("--config")
    outcome = rc.add_mutually_exclusive_group()
    outcome.add_argument("--committed", action="store_true", help="the write reached the chart")
    outcome.add_argument("--failed", action="store_true", help="the write did not happen: free the key")
    rc.add_argument("--location", help="with --committed: the resource's URL, if known")
    rc.set_defaults(fn=cmd_receipts)

    ce = sub.add_parser("certs", help="trust anchors")
    ce_sub = ce.add_subparsers(dest="certs_command", required=True)
    ci = ce_sub.add_parser("init", help="create the forward-mode CA (key 0600, never committed)")
    ci.add_argument("--dir", default="certs")
    ci.add_argument("--force", action="store_true")
    ci.set_defaults(fn=cmd_certs_init)

    po = sub.add_parser("policy", help="policy tools")
    po_sub = po.add_subparsers(dest="policy_command", required=True)
    pt = po_sub.add_parser("test", help="run the *_test.rego `test_` rules with the embedded engine (like `opa test`)")
    pt.add_argument("dir", nargs="?", default="policies")
    pt.add_argument("-v", "--verbose", action="store_true")
    pt.set_defaults(fn=cmd_policy_test)
    pe = po_sub.add_parser("eval", help="print the Rego input and the decision for one request (exit 0 allow, 1 deny)")
    pe.add_argument("--config")
    pe.add_argument("--request", required=True, help="JSON: {method, target, headers, body, current?}")
    pe.set_defaults(fn=cmd_policy_eval)

    from sidecar.approvals.cli import add_parser as add_approvals

    add_approvals(sub)

    rp = sub.add_parser("replay", help="re-decide recorded flows offline under a (new) config; report changes")
    rp.add_argument("flows")
    rp.add_argument("--config")
    rp.add_argument("--strict", action="store_true", help="exit 1 on any changed or undecidable decision")
    rp.add_argument("--key", help="secret reference of the recording key (default: recording.key or the audit key)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_replay)

    s = sub.add_parser("sandbox", help="the bundled sandbox EHR alone")
    s.add_argument("--port", type=int, default=8081)
    s.add_argument("--profile", help="an EHR profile (e.g. oracle, chart-locked, rate-limited); comma-joined combine")
    s.set_defaults(fn=cmd_sandbox)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, SecretError, AuditUnavailable) as e:
        print(f"fhir-sidecar: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
