"""Command line entry point: ``python -m sidecar.sandbox`` / ``fhir-sidecar sandbox``."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from .profiles import PROFILES, resolve_profile
from .server import SandboxServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.sandbox",
        description="In-memory FHIR R4 sandbox EHR (synthetic data only).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    parser.add_argument("--base-path", default="/fhir/R4", help="FHIR base path (default /fhir/R4)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--profile", default="default", metavar="NAME",
                        help="EHR behaviour profile (several joined by commas): "
                             + ", ".join(sorted(PROFILES)) + " (default: default)")
    parser.add_argument("--list-profiles", action="store_true",
                        help="print the profiles with a one-line description and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; prints the base URL on the first stdout line."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_profiles:
        for name in sorted(PROFILES):
            print(f"{name:18} {PROFILES[name].get('description', '')}")
        return 0
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key must be given together")
    try:
        profile = resolve_profile(args.profile)
    except ValueError as exc:
        parser.error(f"--profile: {exc}")
    server = SandboxServer(args.host, args.port, args.base_path, args.tls_cert, args.tls_key,
                           profile=profile)
    try:
        server.start()
    except OSError as exc:
        parser.exit(2, f"sandbox: cannot listen on {args.host}:{args.port}: {exc}\n")
    print(server.base_url, flush=True)

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal() needs the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
