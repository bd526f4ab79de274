"""Stand-ins for the netns proof of the chart's interception rules (stdlib only).

    netprobe.py serve SPEC...   listen on each SPEC; print READY; log one JSON line per accepted
                                connection or datagram; serve until killed
    netprobe.py probe SPEC...   connect to each SPEC in turn; print one JSON list of results

SPEC is `proto,host,port,name`. proto is tcp, udp or orig (a TCP listener that answers with the
original destination of a REDIRECTed connection, read with SO_ORIGINAL_DST, like the sidecar's
transparent mode). A server answers `name peer=IP:PORT` (or `name orig=IP:PORT`) and closes.
For probes the name is a label only.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80
TIMEOUT_S = 2.0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _log(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _serve_tcp(sock: socket.socket, name: str, orig: bool) -> None:
    while True:
        conn, peer = sock.accept()
        with conn:
            if orig:
                raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                port, addr = struct.unpack("!2xH4s8x", raw)
                answer = f"{name} orig={socket.inet_ntoa(addr)}:{port}"
            else:
                answer = f"{name} peer={peer[0]}:{peer[1]}"
            _log({"server": name, "peer": peer[0], "answer": answer})
            conn.sendall(answer.encode())


def _serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        _, peer = sock.recvfrom(512)
        answer = f"{name} peer={peer[0]}:{peer[1]}"
        _log({"server": name, "peer": peer[0], "answer": answer})
        sock.sendto(answer.encode(), peer)


def serve(specs: list[str]) -> None:
    threads = []
    for spec in specs:
        proto, host, port, name = spec.split(",")
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        sock = socket.socket(_family(host), kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        if proto == "udp":
            target, args = _serve_udp, (sock, name)
        else:
            sock.listen(16)
            target, args = _serve_tcp, (sock, name, proto == "orig")
        threads.append(threading.Thread(target=target, args=args, daemon=True))
    for t in threads:
        t.start()
    _log({"ready": True})
    threading.Event().wait()


def probe_one(spec: str) -> dict:
    proto, host, port, label = spec.split(",")
    result: dict = {"probe": label, "proto": proto, "dest": f"{host}:{port}"}
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    try:
        with socket.socket(_family(host), kind) as s:
            s.settimeout(TIMEOUT_S)
            s.connect((host, int(port)))
            if proto == "udp":
                s.send(b"query")
            data = s.recv(512)
        result.update(ok=True, answer=data.decode())
    except OSError as e:
        code = errno.errorcode.get(e.errno, "") if e.errno else ""
        result.update(ok=False, error=code or type(e).__name__)
    return result


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(argv[1:])
        return 0
    if len(argv) >= 2 and argv[0] == "probe":
        print(json.dumps([probe_one(spec) for spec in argv[1:]]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
