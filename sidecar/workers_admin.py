"""The supervisor's admin listener: one admin API for all workers (see sidecar/workers.py).

`/healthz` is the supervisor's own; `/readyz` asks every worker; `/metrics` merges every
worker's exposition (counters and histograms summed, gauges the maximum: a gauge here is a
state such as `kill_switch_engaged` or a shared count, never a per-process amount);
`/admin/reload` goes to every worker. Anything else is relayed as is to the first live worker:
the admin token is checked there, and what it changes (kill switch, receipts, approvals) lives
in the shared store or flag file, so every worker sees it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

if TYPE_CHECKING:
    from sidecar.workers import Supervisor, _Worker

ASK_TIMEOUT_S = 10.0
MAX_ANSWER = 16 * 1024 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade",
                        "te", "trailer", "proxy-connection"})


async def admin_request(port: int, method: str, target: str, headers: dict[str, str], body: bytes,
                        timeout_s: float = ASK_TIMEOUT_S) -> tuple[int, list[tuple[str, str]], bytes]:
    """One exchange with a worker's admin listener on 127.0.0.1. The answer is read as sent (never
    decoded: its headers are relayed with it) and refused past MAX_ANSWER while it arrives."""
    hdrs = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
            async with client.stream(method, f"http://127.0.0.1:{port}{target}", headers=hdrs, content=body) as r:
                async for chunk in r.aiter_raw():
                    size += len(chunk)
                    if size > MAX_ANSWER:
                        raise ValueError("worker answer too large")
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise OSError(f"worker admin: {type(e).__name__}") from None
    return r.status_code, list(r.headers.multi_items()), b"".join(chunks)


async def handle_admin(sup: Supervisor, method: str, target: str, headers: dict[str, str],
                       body: bytes) -> tuple[int, Any]:
    path = urlsplit(target).path
    workers = sup._workers
    if path == "/healthz" and method == "GET":
        return 200, {"status": "ok", "workers": [_worker_state(w) for w in workers]}
    if path == "/readyz" and method == "GET":
        answers = await asyncio.gather(*(sup._ask(w, "GET", "/readyz", {}, b"") for w in workers))
        problems = []
        for w, (status, _, data) in zip(workers, answers):
            if status != 200:
                problems.append(f"worker {w.slot.index}: " + (_problems(data) or "not answering"))
        if sup._stopping:
            problems.insert(0, "draining")
        return (503 if problems else 200), {"ready": not problems, "problems": problems, "workers": len(workers)}
    if path == "/metrics" and method == "GET":
        answers = await asyncio.gather(*(sup._ask(w, "GET", "/metrics", {}, b"") for w in workers))
        texts = [data.decode() for status, _, data in answers if status == 200]
        up = len(texts)
        extra = (f"# HELP fhir_sidecar_workers_up Workers whose /metrics answered\n"
                 f"# TYPE fhir_sidecar_workers_up gauge\nfhir_sidecar_workers_up {up}\n"
                 f"# HELP fhir_sidecar_worker_restarts_total Workers restarted after they died\n"
                 f"# TYPE fhir_sidecar_worker_restarts_total counter\n"
                 f"fhir_sidecar_worker_restarts_total {sum(w.restarts for w in workers)}\n")
        return 200, ((merge_metrics(texts) + extra).encode(), "text/plain; version=0.0.4; charset=utf-8")
    if path == "/admin/reload" and method == "POST":
        answers = await asyncio.gather(*(sup._ask(w, method, target, headers, body) for w in workers))
        statuses = [status for status, _, _ in answers]
        if any(s == 401 for s in statuses):
            return 401, {"error": "admin token required"}
        ok = all(s == 200 for s in statuses)
        return (200 if ok else 409), {"reloaded": ok, "workers": statuses}
    live = next((w for w in workers if w.alive), None)
    if live is None:
        return 503, {"error": "no worker is running"}
    status, out_headers, data = await sup._ask(live, method, target, headers, body)
    if status == 0:
        return 503, {"error": "worker did not answer"}
    ctype = next((v for k, v in out_headers if k.lower() == "content-type"), "application/octet-stream")
    extra = [(k, v) for k, v in out_headers if k.lower() not in HOP_BY_HOP and k.lower() != "content-type"]
    return status, (data, ctype, extra)


def _worker_state(w: _Worker) -> dict[str, Any]:
    return {"index": w.slot.index, "pid": w.proc.pid if w.proc else None, "alive": w.alive, "restarts": w.restarts}


def _problems(data: bytes) -> str:
    try:
        return "; ".join(json.loads(data).get("problems", []))
    except (ValueError, AttributeError):
        return ""


def merge_metrics(texts: list[str]) -> str:
    """Merge Prometheus text expositions of identical registries: samples with the same name
    and labels are summed (counters, histograms, summaries) or maxed (gauges, info)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    families: OrderedDict[str, tuple[str, str, OrderedDict[tuple, float]]] = OrderedDict()
    for text in texts:
        for fam in text_string_to_metric_families(text):
            kind = fam.type
            _, _, samples = families.setdefault(fam.name, (kind, fam.documentation, OrderedDict()))
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif kind in ("gauge", "info", "stateset", "unknown"):
                    samples[key] = max(samples[key], s.value)
                else:
                    samples[key] += s.value
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        # the parser strips a counter's `_total` and an info's `_info` from the family name
        family = name + {"counter": "_total", "info": "_info"}.get(kind, "")
        exposed = {"info": "gauge", "stateset": "gauge"}.get(kind, kind)
        lines.append(f"# HELP {family} {_escape_help(doc)}")
        lines.append(f"# TYPE {family} {exposed}")
        for (sample_name, labels), value in samples.items():
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            value_text = floatToGoString(value)
            lines.append(f"{sample_name}{{{label_text}}} {value_text}" if labels else f"{sample_name} {value_text}")
    return "\n".join(lines) + ("\n" if lines else "")


def _escape_help(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
