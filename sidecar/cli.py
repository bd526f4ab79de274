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
    if args.workers != 1:
        raise ConfigError("--workers N > 1 is not available in this build")
    cfg, path = _load(args)
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
    from sidecar.audit.verify import verify_files
    from sidecar.runtime import resolve_secrets

    cfg, path = _load(args)
    secrets = resolve_secrets(cfg, path.parent.resolve())["audit"]
    files = args.files or [str(path.parent.resolve() / cfg.audit.path) if not Path(cfg.audit.path).is_absolute()
                           else cfg.audit.path]
    result = verify_files(files, secrets, args.checkpoints)
    print(json.dumps({"code": result.code, "first_bad_seq": result.first_bad_seq, "chain": result.chain,
                      "message": result.message}))
    return result.code


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


def cmd_sandbox(args: argparse.Namespace) -> int:
    from sidecar.sandbox import main as sandbox_main

    argv = ["--host", "127.0.0.1", "--port", str(args.port)]
    return sandbox_main(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(port=args.port, admin_port=args.admin_port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fhir-sidecar", description="A fail-closed FHIR write-back sidecar.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the proxy and admin listener until SIGTERM")
    r.add_argument("--config")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--log-level", default="info")
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

    po = sub.add_parser("policy", help="policy tools")
    po_sub = po.add_subparsers(dest="policy_command", required=True)
    pe = po_sub.add_parser("eval", help="print the Rego input and the decision for one request (exit 0 allow, 1 deny)")
    pe.add_argument("--config")
    pe.add_argument("--request", required=True, help="JSON: {method, target, headers, body, current?}")
    pe.set_defaults(fn=cmd_policy_eval)

    s = sub.add_parser("sandbox", help="the bundled sandbox EHR alone")
    s.add_argument("--port", type=int, default=8081)
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
