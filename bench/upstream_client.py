"""Micro-benchmark: client CPU per POST, httpx UpstreamClient vs FastUpstreamClient (asyncio streams, its own
HTTP/1.1 serialiser and parser, h11 for the unusual answers).

    .venv/bin/python bench/upstream_client.py [--requests 2000] [--rounds 3] [--no-tls]

A minimal keep-alive HTTP/1.1 server (asyncio, fixed 201 answer shaped like an EHR's) runs in a
*separate process* on 127.0.0.1, so the process CPU time measured here (time.process_time) is the
client's alone: CPU µs per request = process CPU seconds / requests. Each figure is the median of
`--rounds` rounds after a warm-up; concurrency 1 and 8 (8 tasks sending back to back). The TLS rows
use a throwaway CA (tests/tlsutil.make_pki) and keep-alive, so handshakes are amortised away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OBS = json.dumps({
    "resourceType": "Observation", "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
    "subject": {"reference": "Patient/example"}, "effectiveDateTime": "2026-05-01T10:00:00Z",
    "valueQuantity": {"value": 72, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
    "note": [{"text": "x" * 600}],
}).encode()
HEADERS = [("Content-Type", "application/fhir+json"), ("Accept", "application/fhir+json"),
           ("User-Agent", "bench-app/1.0"), ("X-Correlation-Id", "0f8e6c1a-bench"),
           ("Authorization", "Bearer " + "t" * 40), ("Prefer", "return=representation")]


# -- the server (its own process) ------------------------------------------------------------------

def _answer() -> bytes:
    body = json.dumps({"resourceType": "Observation", "id": "123", "meta": {"versionId": "1",
                       "lastUpdated": "2026-05-01T10:00:00Z"}, "status": "final"}).encode()
    head = ("HTTP/1.1 201 Created\r\nServer: bench-ehr\r\nDate: Fri, 01 May 2026 10:00:00 GMT\r\n"
            "Content-Type: application/fhir+json; charset=utf-8\r\n"
            "Location: http://127.0.0.1/fhir/R4/Observation/123/_history/1\r\nETag: W/\"1\"\r\n"
            "Last-Modified: Fri, 01 May 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class _Server(asyncio.Protocol):
    ANSWER = _answer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            cl = 0
            for line in self.buf[:i].split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    cl = int(v)
            end = i + 4 + cl
            if len(self.buf) < end:
                return
            self.buf = self.buf[end:]
            self.t.write(self.ANSWER)


async def _serve(cert: str | None, key: str | None) -> None:
    ctx = None
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    srv = await asyncio.get_running_loop().create_server(_Server, "127.0.0.1", 0, ssl=ctx, backlog=256)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent goes away


# -- the client side -------------------------------------------------------------------------------

async def _round(client, url: str, n: int, concurrency: int) -> tuple[float, float]:
    per = n // concurrency

    async def worker() -> None:
        for _ in range(per):
            a = await client.send("POST", url, HEADERS, OBS)
            assert a.status == 201, a

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    done = per * concurrency
    return cpu / done * 1e6, done / wall


async def _measure(cls, url: str, verify, n: int, rounds: int, concurrency: int) -> tuple[float, float]:
    client = cls(verify=verify, timeout_s=30.0)
    try:
        await _round(client, url, max(200, n // 10), concurrency)  # warm-up: connections, caches
        results = [await _round(client, url, n, concurrency) for _ in range(rounds)]
    finally:
        await client.close()
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def _start_server(cert: str | None = None, key: str | None = None) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, __file__, "--serve"] + (["--cert", cert, "--key", key] if cert else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-tls", action="store_true")
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.cert, args.key))
        return

    from sidecar.upstream import UpstreamClient
    from sidecar.upstream_fast import FastUpstreamClient
    from tests.tlsutil import make_pki

    setups = [("http", None, None)]
    tmp = tempfile.TemporaryDirectory()
    if not args.no_tls:
        pki = make_pki(Path(tmp.name))
        setups.append(("https", pki, ssl.create_default_context(cafile=str(pki["ca"]))))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.requests} POSTs x {args.rounds} rounds "
          f"(median); {len(OBS)} B body; client process CPU only")
    print(f"{'scheme':6} {'conc':>4} {'client':22} {'CPU µs/req':>11} {'req/s':>8}")
    try:
        for scheme, pki, verify in setups:
            proc, port = _start_server(str(pki["cert"]) if pki else None, str(pki["key"]) if pki else None)
            url = f"{scheme}://127.0.0.1:{port}/fhir/R4/Observation"
            try:
                for conc in (1, 8):
                    rows = {}
                    for cls in (UpstreamClient, FastUpstreamClient):
                        cpu, rps = asyncio.run(_measure(cls, url, verify if verify else True, args.requests,
                                                        args.rounds, conc))
                        rows[cls.__name__] = cpu
                        print(f"{scheme:6} {conc:>4} {cls.__name__ + (' (httpx)' if cls is UpstreamClient else ''):22} "
                              f"{cpu:>11.0f} {rps:>8.0f}", flush=True)
                    print(f"{'':6} {'':>4} {'-> ratio':22} {rows['UpstreamClient'] / rows['FastUpstreamClient']:>10.1f}x")
            finally:
                proc.stdin.close()
                proc.wait(timeout=10)
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
