"""Real, unmodified FHIR clients through the sidecar, in front of real upstreams (issue #7, items 1–2).

Clients: PyPI `fhirclient` and `fhirpy` (sync, and async with its `aiohttp_config={"proxy": …}`) in
reverse mode (FHIR base = the sidecar) and forward mode (FHIR base = the EHR, `HTTP_PROXY` = the
sidecar; aiohttp ignores the environment, so async fhirpy gets the proxy option), and the npm
library `fhir-kit-client` (tests/real/fhirkit_scenario.mjs) in reverse mode: it ignores proxy
settings on Node 20.

Upstreams: `sekmet-fhir` (a real FHIR R4 server, FastAPI + SQLite, in its own virtualenv, see
tests/sekmet.py), base path `/fhir`; and the bundled sandbox EHR, base path `/fhir/R4`.

Every scenario: create (Patient, 5 Observations), update, search with paging followed through the
library (`Bundle.link` must name the base the app uses: the sidecar in reverse mode), delete, a
transaction, and a write outside the client's scopes that surfaces as the library's normal FHIR
error carrying our OperationOutcome (403, `forbidden`).

Proof that each request went *through* the sidecar, not around it: the X-Correlation-ID the
library received (captured with the library's own response hooks; async fhirpy hides responses, so
it sends its own id through the library's `extra_headers`) must appear (1) in the sidecar's audit
file with the right kind (`read`, `intent` + `outcome`, `deny`) and client, and (2) in the
upstream's own log (sekmet's traffic table / the sandbox's request log) with no `X-API-Key` —
the sidecar strips it, a request that went around the sidecar would still carry it. A denied write's
id must never reach the upstream. `test_the_witness_catches_a_client_that_goes_around_the_sidecar`
shows the check is not vacuous.

Slow first run: the sekmet virtualenv (tests/.venvs/sekmet, PyPI) and `npm ci` into
tests/real/node_modules are created on first use and cached (both git-ignored).
"""

from __future__ import annotations

import abc

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.audit.verify import verify_files
from sidecar.sandbox import SandboxServer
from tests.harness import AUDIT_KEY, SidecarProcess, make_config, sha
from tests.sekmet import PROXY_VARS, VENV, VENVS, file_lock, sekmet_fixture, unavailable  # noqa: F401  (fixture `sekmet`)

# First use creates the sekmet virtualenv (PyPI) and runs `npm ci`: give that room, keep it tight after.
_COLD = not (VENV / ".installed").is_file() or not (Path(__file__).parent / "real" / "node_modules").is_dir()
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900 if _COLD else 180)]

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "real"
CLIENT_ID = "real-app"
API_KEY = "real-client-key-7f3a9c"
SCOPES = ["system/Observation.cruds", "system/Patient.cruds"]  # Condition is outside: the denied write
N_OBS, PAGE = 5, 2
PAGES = -(-N_OBS // PAGE)
TX_PATIENT = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


# ---------------------------------------------------------------------------------------------
# what a scenario reports, whatever the library


@dataclass
class Exchange:
    step: str
    method: str
    url: str | None  # as the library sent it (None where the library hides it)
    status: int | None  # None where the library hides it
    corr: str | None  # X-Correlation-ID received, or the one the library was told to send


@dataclass
class Denied:
    error_type: str
    status: int | None
    outcome: dict[str, Any]
    corr: str | None


@dataclass
class Result:
    patient_id: str = ""
    obs_ids: list[str] = field(default_factory=list)
    updated: dict[str, Any] = field(default_factory=dict)
    pages: list[dict[str, Any]] = field(default_factory=list)  # {links: [(rel, url)], fullUrls: [...]}
    found_ids: list[str] = field(default_factory=list)  # every resource id the library's paging yielded
    tx: dict[str, Any] = field(default_factory=dict)
    denied: Denied | None = None
    exchanges: list[Exchange] = field(default_factory=list)


def patient_body(run: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": "RealClient", "given": [run]}]}


def obs_body(patient_id: str, i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "heart rate"},
            "subject": {"reference": f"Patient/{patient_id}"}, "valueQuantity": {"value": 60 + i, "unit": "/min"}}


def tx_body(run: str) -> dict[str, Any]:
    obs = obs_body("x", 99)
    obs["subject"] = {"reference": TX_PATIENT}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": TX_PATIENT, "resource": {**patient_body(run), "name": [{"family": "RealClientTx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
    ]}


CONDITION = {"resourceType": "Condition", "code": {"text": "must never reach the EHR"},
             "subject": {"reference": "Patient/p1"}}


class Recorder:
    """A `requests` response hook (the library's own hook mechanism): what each exchange got back."""

    def __init__(self) -> None:
        self.step = "?"
        self.exchanges: list[Exchange] = []
        self.bundles: list[dict[str, Any]] = []

    def hook(self, r: Any, *args: Any, **kwargs: Any) -> Any:
        self.exchanges.append(Exchange(self.step, r.request.method, r.request.url, r.status_code,
                                       r.headers.get("X-Correlation-ID")))
        if r.request.method == "GET" and self.step == "search":
            with contextlib.suppress(ValueError):
                body = r.json()
                if body.get("resourceType") == "Bundle":
                    self.bundles.append(body)
        return r


def pages_from_bundles(bundles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"links": [(lk.get("relation"), lk.get("url")) for lk in b.get("link", [])],
             "fullUrls": [e.get("fullUrl") for e in b.get("entry", [])]} for b in bundles]


# ---------------------------------------------------------------------------------------------
# the Python libraries, used as an app would use them


def run_fhirclient(base: str, run: str, proxy: str | None) -> Result:
    from fhirclient import client as fc  # type: ignore[import-untyped]
    from fhirclient.models.bundle import Bundle  # type: ignore[import-untyped]
    from fhirclient.models.condition import Condition  # type: ignore[import-untyped]
    from fhirclient.models.observation import Observation  # type: ignore[import-untyped]
    from fhirclient.models.patient import Patient  # type: ignore[import-untyped]
    from fhirclient.server import FHIRPermissionDeniedException  # type: ignore[import-untyped]

    smart = fc.FHIRClient(settings={"app_id": "fhir-sidecar-real-client-test", "api_base": base})
    srv = smart.server
    srv.session.headers["X-API-Key"] = API_KEY  # the library's requests.Session
    rec = Recorder()
    srv.session.hooks["response"].append(rec.hook)
    res = Result()

    rec.step = "create"
    res.patient_id = Patient(patient_body(run)).create(srv)["id"]
    for i in range(N_OBS):
        res.obs_ids.append(Observation(obs_body(res.patient_id, i)).create(srv)["id"])

    rec.step = "update"
    obs = Observation.read(res.obs_ids[-1], srv)
    obs.status = "amended"
    res.updated = obs.update(srv)

    rec.step = "search"
    search = Observation.where({"subject": f"Patient/{res.patient_id}", "_count": str(PAGE)})
    bundles = list(search.perform_iter(srv))  # follows Bundle.link next (checked against the origin)
    res.pages = [{"links": [(lk.relation, lk.url) for lk in b.link or []],
                  "fullUrls": [e.fullUrl for e in b.entry or []]} for b in bundles]
    res.found_ids = [e.resource.id for b in bundles for e in b.entry or []]

    rec.step = "delete"
    obs.delete(srv)

    rec.step = "transaction"
    res.tx = Bundle(tx_body(run)).create(srv)

    rec.step = "denied"
    try:
        Condition(CONDITION).create(srv)
    except FHIRPermissionDeniedException as exc:
        res.denied = Denied(type(exc).__name__, exc.response.status_code, exc.response.json(),
                            exc.response.headers.get("X-Correlation-ID"))
    res.exchanges = rec.exchanges
    return res


def run_fhirpy_sync(base: str, run: str, proxy: str | None) -> Result:
    from fhirpy import SyncFHIRClient
    from fhirpy.base.exceptions import ForbiddenError

    rec = Recorder()
    client = SyncFHIRClient(base, extra_headers={"X-API-Key": API_KEY},
                            requests_config={"hooks": {"response": [rec.hook]}, "timeout": 30})
    res = Result()

    rec.step = "create"
    patient = client.resource("Patient", **patient_body(run))
    patient.save()
    res.patient_id = patient.id
    observations = []
    for i in range(N_OBS):
        obs = client.resource("Observation", **obs_body(patient.id, i))
        obs.save()
        observations.append(obs)
    res.obs_ids = [o.id for o in observations]

    rec.step = "update"
    last = observations[-1]
    last["status"] = "amended"
    last.save()
    res.updated = last.serialize()

    rec.step = "search"
    found = list(client.resources("Observation").search(subject=f"Patient/{patient.id}").limit(PAGE))
    res.found_ids = [r.id for r in found]
    res.pages = pages_from_bundles(rec.bundles)

    rec.step = "delete"
    last.delete()

    rec.step = "transaction"
    res.tx = dict(client.execute("/", method="post", data=tx_body(run)))

    rec.step = "denied"
    try:
        client.resource("Condition", **CONDITION).save()
    except ForbiddenError as exc:
        res.denied = Denied(type(exc).__name__, rec.exchanges[-1].status, json.loads(exc.args[0]),
                            rec.exchanges[-1].corr)
    res.exchanges = rec.exchanges
    return res


def run_fhirpy_async(base: str, run: str, proxy: str | None) -> Result:
    """aiohttp: no env proxies, responses hidden. Proxy via `aiohttp_config`; our own correlation ids
    via the library's `extra_headers`, one per step, then looked up in the audit and upstream logs."""
    from fhirpy import AsyncFHIRClient
    from fhirpy.base.exceptions import ForbiddenError

    headers = {"X-API-Key": API_KEY}
    client = AsyncFHIRClient(base, extra_headers=dict(headers), aiohttp_config={"proxy": proxy} if proxy else {})
    res = Result()

    def step(name: str, method: str, times: int = 1) -> str:
        corr = f"fpa-{run}-{name}"
        client.extra_headers = {**headers, "X-Correlation-ID": corr}
        res.exchanges.extend(Exchange(name, method, None, None, corr) for _ in range(times))
        return corr

    async def scenario() -> None:
        step("create-patient", "POST")
        patient = client.resource("Patient", **patient_body(run))
        await patient.save()
        res.patient_id = patient.id
        observations = []
        for i in range(N_OBS):
            step(f"create-obs-{i}", "POST")
            obs = client.resource("Observation", **obs_body(patient.id, i))
            await obs.save()
            observations.append(obs)
        res.obs_ids = [o.id for o in observations]

        step("update", "PUT")
        last = observations[-1]
        last["status"] = "amended"
        await last.save()
        res.updated = last.serialize()

        search = client.resources("Observation").search(subject=f"Patient/{patient.id}").limit(PAGE)
        step("first-page", "GET")
        res.pages = pages_from_bundles([await search.fetch_raw()])
        step("paging", "GET", times=PAGES)  # the library follows `next` itself (and refuses foreign URLs)
        res.found_ids = [r.id async for r in search]

        step("delete", "DELETE")
        await last.delete()

        step("transaction", "POST")
        res.tx = dict(await client.execute("/", method="post", data=tx_body(run)))

        corr = step("denied", "POST")
        try:
            await client.resource("Condition", **CONDITION).save()
        except ForbiddenError as exc:
            res.denied = Denied(type(exc).__name__, 403, json.loads(exc.args[0]), corr)

    asyncio.run(scenario())
    return res


PY_CLIENTS: dict[str, Callable[[str, str, str | None], Result]] = {
    "fhirclient": run_fhirclient, "fhirpy-sync": run_fhirpy_sync, "fhirpy-async": run_fhirpy_async}


# ---------------------------------------------------------------------------------------------
# upstreams and sidecars


class Upstream(abc.ABC):
    name: str
    base_url: str

    @abc.abstractmethod
    def saw(self, corr: str, expect: int) -> list[dict[str, Any]]:
        """Every request carrying `corr` the upstream received: [{method, headers (lower-case)}]."""

    @abc.abstractmethod
    def paths(self) -> list[str]:
        """Every request path the upstream received."""


class SekmetUpstream(Upstream):
    name = "sekmet"

    def __init__(self, server: Any) -> None:
        self.server = server
        self.base_url = server.base_url

    def saw(self, corr: str, expect: int) -> list[dict[str, Any]]:
        # sekmet writes its traffic row just after it answered: wait for the expected rows (or, when
        # none are expected, a moment for a late one to show up)
        deadline = time.monotonic() + (3.0 if expect else 0.3)
        while True:
            rows = self.server.traffic(corr)
            if (expect and len(rows) >= expect) or time.monotonic() >= deadline:
                return [{"method": r["method"], "headers": r["req_headers"]} for r in rows]
            time.sleep(0.05)

    def paths(self) -> list[str]:
        return [r["url"] for r in self.server.traffic()]


class SandboxUpstream(Upstream):
    name = "sandbox"

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.base_url = server.base_url

    def saw(self, corr: str, expect: int) -> list[dict[str, Any]]:
        return [{"method": e["method"], "headers": e["headers"]}
                for e in self.server.request_log() if e.get("correlation_id") == corr]

    def paths(self) -> list[str]:
        return [e["path"] for e in self.server.request_log()]


@dataclass
class Stack:
    upstream: Upstream
    mode: str
    sidecar: SidecarProcess

    @property
    def proxy(self) -> str | None:
        return f"http://127.0.0.1:{self.sidecar.port}" if self.mode == "forward" else None

    @property
    def client_base(self) -> str:
        """The FHIR base the app is configured with."""
        if self.mode == "forward":
            return self.upstream.base_url
        return f"http://127.0.0.1:{self.sidecar.port}{urlsplit(self.upstream.base_url).path}"

    @property
    def audit_path(self) -> Path:
        return self.sidecar.cfg_path.parent / "audit.jsonl"

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(x) for x in self.audit_path.read_text().splitlines() if x.startswith("{")]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    s = SandboxServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


class Stacks:
    """stacks(upstream, mode): one sidecar per (upstream, mode), started on first use, kept for the module."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.request, self.tmp_path_factory = request, tmp_path_factory
        self.made: dict[tuple[str, str], Stack] = {}

    def __call__(self, upstream_name: str, mode: str) -> Stack:
        key = (upstream_name, mode)
        if key not in self.made:
            up: Upstream = (SekmetUpstream(self.request.getfixturevalue("sekmet")) if upstream_name == "sekmet"
                            else SandboxUpstream(self.request.getfixturevalue("sandbox")))
            tmp = self.tmp_path_factory.mktemp(f"sidecar-{upstream_name}-{mode}")
            listen = {"mode": mode, "confdir": str(tmp / "mitm")} if mode == "forward" else {"mode": mode}
            # policy off: the Rego library is tested elsewhere; the scope ceiling stays real
            cfg = make_config(tmp, up.base_url, listen=listen, policy={"engine": "off"}, clients=[
                {"id": CLIENT_ID, "auth": "api-key", "api_key_sha256": sha(API_KEY), "scopes": SCOPES}])
            with _no_proxy_env():  # the sidecar process inherits the environment
                self.made[key] = Stack(up, mode, SidecarProcess(cfg, tmp).start())
        return self.made[key]


@pytest.fixture(scope="module")
def stacks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    made = Stacks(request, tmp_path_factory)
    yield made
    for st in made.made.values():
        st.sidecar.stop()


@contextlib.contextmanager
def _no_proxy_env() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower() in PROXY_VARS}
    try:
        yield
    finally:
        os.environ.update(saved)


def client_env(monkeypatch: pytest.MonkeyPatch, stack: Stack) -> None:
    """Only what an operator sets for an unmodified app: HTTP_PROXY in forward mode, nothing in reverse."""
    for k in list(os.environ):
        if k.lower() in PROXY_VARS:
            monkeypatch.delenv(k)
    if stack.proxy:  # the EHR is plain http here, so HTTP_PROXY is the variable that applies
        monkeypatch.setenv("HTTP_PROXY", stack.proxy)
        monkeypatch.setenv("http_proxy", stack.proxy)


# ---------------------------------------------------------------------------------------------
# the checks


def interaction(e: Exchange) -> str:
    """What the sidecar must have classified this exchange as (DESIGN's interaction table)."""
    if e.step.startswith("denied"):
        return "create"  # of a Condition, outside the scopes
    if e.method == "GET":
        return "search-type" if e.step in ("search", "search-page", "first-page", "paging") else "read"
    if e.method == "POST":
        return "transaction" if e.step.startswith("transaction") else "create"
    return {"PUT": "update", "DELETE": "delete", "PATCH": "patch"}[e.method]


def assert_through_sidecar(stack: Stack, exchanges: list[Exchange], timeout: float = 5.0) -> None:
    """Each exchange's correlation id is in the sidecar's audit (right kind, our client) and, unless
    denied, in the upstream's own log without the api key; a denied one never reached the upstream."""
    assert exchanges
    missing = [e for e in exchanges if not e.corr]
    assert not missing, f"no X-Correlation-ID (did not come through the sidecar?): {missing}"
    by_corr: dict[str, list[Exchange]] = {}
    for e in exchanges:
        by_corr.setdefault(e.corr or "", []).append(e)

    def expected(ex: list[Exchange]) -> Counter[str]:
        want: Counter[str] = Counter()
        for e in ex:
            if e.step.startswith("denied"):
                want["deny"] += 1
            elif e.method in WRITE_METHODS:
                want["intent"] += 1
                want["outcome"] += 1
            else:
                want["read"] += 1
        return want

    deadline = time.monotonic() + timeout  # outcome/read records follow the response
    while True:
        audit = stack.audit()
        problems = []
        for corr, ex in by_corr.items():
            recs = [r for r in audit if r.get("correlation_id") == corr]
            got = Counter(r["kind"] for r in recs)
            if got != expected(ex):
                problems.append((corr, [e.step for e in ex], dict(expected(ex)), dict(got)))
        if not problems or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert not problems, f"audit does not match what the client did (corr, steps, expected, got): {problems}"

    for corr, ex in by_corr.items():
        recs = [r for r in audit if r.get("correlation_id") == corr]
        assert {r["client_id"] for r in recs} == {CLIENT_ID}, recs
        assert {r.get("interaction") for r in recs} == {interaction(ex[0])}, (ex[0], recs)
        if ex[0].step.startswith("denied"):
            assert [r.get("resource_type") for r in recs] == ["Condition"], recs
        for e, r in zip(ex, [r for r in recs if r["kind"] in ("outcome",)], strict=False):
            if e.status is not None:
                assert r["upstream_status"] == e.status, (e, r)
        denied = ex[0].step.startswith("denied")
        seen = stack.upstream.saw(corr, 0 if denied else len(ex))
        if denied:
            assert seen == [], f"a denied write reached the upstream: {corr} {seen}"
            continue
        # the app's requests, plus for update/patch/delete the sidecar's own prior-state read (a GET
        # under the same correlation id)
        method = ex[0].method
        same = [s for s in seen if s["method"] == method]
        extra = [s for s in seen if s["method"] != method]
        assert len(same) == len(ex), f"{stack.upstream.name} saw {len(same)} {method} with {corr}, expected {len(ex)}"
        assert all(s["method"] == "GET" for s in extra) and (not extra or method in ("PUT", "PATCH", "DELETE")), seen
        for s in seen:
            headers = s["headers"]
            assert "x-api-key" not in headers, "a request reached the upstream with the app's api key: not via the sidecar"
            assert headers.get("x-correlation-id") == corr
        for s in same:  # the forwarded request itself carries a W3C traceparent
            assert s["headers"].get("traceparent", "").startswith("00-"), s


def assert_scenario(stack: Stack, res: Result, *, library_urls: bool = True) -> None:
    base = stack.client_base
    # create
    assert res.patient_id and len(res.obs_ids) == N_OBS and len(set(res.obs_ids)) == N_OBS
    # update
    assert res.updated["id"] == res.obs_ids[-1]
    assert res.updated["status"] == "amended" and res.updated["meta"]["versionId"] == "2"
    # search with paging, followed by the library
    assert sorted(res.found_ids) == sorted(res.obs_ids)
    assert res.pages
    for page in res.pages:
        assert any(rel == "self" for rel, _ in page["links"]), page
        for rel, url in page["links"]:
            assert url.startswith(base + "/"), f"Bundle.link {rel} {url} does not point at {base}"
        for full in page["fullUrls"]:
            assert full.startswith(base + "/Observation/"), full
    if len(res.pages) > 1:
        assert len(res.pages) == PAGES
    assert any(rel == "next" for rel, _ in res.pages[0]["links"])
    if stack.mode == "reverse":
        blob = json.dumps(res.pages) + json.dumps(res.tx)
        assert stack.upstream.base_url not in blob, "the upstream's base leaked to the app"
    # delete (after the search: the updated Observation)
    deletes = [e for e in res.exchanges if e.method == "DELETE"]
    assert len(deletes) == 1 and deletes[0].status in (None, 200, 202, 204), deletes
    # transaction
    assert res.tx["type"] == "transaction-response"
    entries = res.tx["entry"]
    assert len(entries) == 2 and all(e["response"]["status"].startswith("201") for e in entries), entries
    for e in entries:
        assert e["response"]["location"].startswith(base + "/"), e["response"]["location"]
    new_patient = entries[0]["response"]["location"][len(base) + 1:].split("/_history")[0]
    assert new_patient.startswith("Patient/")
    if entries[1].get("resource"):
        assert entries[1]["resource"]["subject"]["reference"].endswith(new_patient)
    # denied write: the library's normal error, our OperationOutcome
    assert res.denied is not None, "the write outside the scopes did not raise"
    assert res.denied.status == 403
    assert res.denied.outcome["resourceType"] == "OperationOutcome"
    assert res.denied.outcome["issue"][0]["code"] == "forbidden"
    assert res.denied.corr and res.denied.corr in res.denied.outcome["issue"][0]["diagnostics"]
    # every request went to the address the app was configured with
    if library_urls:
        host = urlsplit(base).netloc
        assert all(urlsplit(e.url or "").netloc == host for e in res.exchanges), res.exchanges
    assert_through_sidecar(stack, res.exchanges)
    assert not any("/Condition" in p for p in stack.upstream.paths()), "a Condition write reached the upstream"


# ---------------------------------------------------------------------------------------------
# tests


def need_python_clients() -> None:
    missing = [m for m in ("fhirclient", "fhirpy") if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: pip install -e '.[test]'")


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("upstream", ["sekmet", "sandbox"])
@pytest.mark.parametrize("library", list(PY_CLIENTS))
def test_python_client(library: str, upstream: str, mode: str, stacks: Stacks, monkeypatch: pytest.MonkeyPatch) -> None:
    need_python_clients()
    stack = stacks(upstream, mode)
    client_env(monkeypatch, stack)
    res = PY_CLIENTS[library](stack.client_base, uuid.uuid4().hex[:8], stack.proxy)
    assert_scenario(stack, res, library_urls=library != "fhirpy-async")
    assert res.denied is not None
    assert res.denied.error_type == {"fhirclient": "FHIRPermissionDeniedException"}.get(library, "ForbiddenError")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """`npm ci` into tests/real/node_modules on first use (SLOW once: needs the npm registry)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        unavailable("Node.js >= 20 and npm are needed for the fhir-kit-client scenario")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    m = re.match(r"v(\d+)\.", version)
    if not m or int(m.group(1)) < 20:
        unavailable(f"fhir-kit-client 2.x needs Node.js >= 20, found {version or 'none'}")
    lock = REAL / "package-lock.json"
    stamp = REAL / "node_modules" / ".fhir-sidecar-lock.sha256"
    wanted = hashlib.sha256(lock.read_bytes() + (REAL / "package.json").read_bytes()).hexdigest()
    with file_lock(VENVS / "fhirkit-npm.lock"):  # tests/.venvs/ is git-ignored; node_modules is replaced by npm ci
        if not (stamp.is_file() and stamp.read_text().strip() == wanted):
            started = time.monotonic()
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=REAL,
                                  capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                unavailable(f"`npm ci` in {REAL} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
            stamp.write_text(wanted + "\n")
            print(f"[test_real_clients] npm ci in {time.monotonic() - started:.1f}s (first use only)")
    return REAL / "node_modules"


@pytest.mark.parametrize("upstream", ["sekmet", "sandbox"])
def test_fhir_kit_client_reverse(upstream: str, stacks: Stacks, node_modules: Path) -> None:
    stack = stacks(upstream, "reverse")
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env.pop("NODE_OPTIONS", None)
    run = uuid.uuid4().hex[:8]
    done = subprocess.run(["node", str(REAL / "fhirkit_scenario.mjs"), stack.client_base, API_KEY, run],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REAL, check=False)
    assert done.stdout.strip(), f"no output (exit {done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and out["ok"], out.get("error") or done.stderr[-2000:]
    assert out["library"] == "fhir-kit-client" and out["run"] == run

    created = [e for e in out["exchanges"] if e["step"] == "create-observation"]
    res = Result(
        patient_id=out["patient_id"],
        obs_ids=[e["location"].split("/Observation/")[1].split("/")[0] for e in created],
        updated={"id": out["updated"]["id"], "status": out["updated"]["status"],
                 "meta": {"versionId": out["updated"]["versionId"]}},
        pages=[{"links": [(lk["relation"], lk["url"]) for lk in p["links"]], "fullUrls": p["fullUrls"]}
               for p in out["pages"]],
        found_ids=[i for p in out["pages"] for i in p["ids"]],
        tx={"type": out["transaction"]["type"],
            "entry": [{"response": {"status": e["status"], "location": e["location"]}} for e in out["transaction"]["entries"]]},
        exchanges=[Exchange(e["step"].replace("denied-create", "denied"), e["method"], e["url"], e["status"],
                            e["correlation_id"]) for e in out["exchanges"]],
    )
    d = out["denied"]
    assert d["thrown"], "fhir-kit-client did not throw on the denied write"
    assert d["message"].startswith("HTTP 403"), d["message"]
    res.denied = Denied("Error", d["status"], d["data"], d["correlation_id"])
    for e in created:
        assert e["location"].startswith(stack.client_base + "/Observation/")
    assert len(res.pages) == PAGES
    assert_scenario(stack, res)
    # the Observation created inside the transaction points at the Patient created with it (when the
    # server returns the resources: sekmet does, the sandbox answers with `response` only)
    tx_entries = out["transaction"]["entries"]
    if upstream == "sekmet":
        assert tx_entries[1]["subject"] == tx_entries[0]["location"][len(stack.client_base) + 1:].split("/_history")[0]


def test_the_witness_catches_a_client_that_goes_around_the_sidecar(stacks: Stacks, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: an app in 'forward mode' that ignores the proxy talks to sekmet directly, even
    sending its own X-Correlation-ID; `assert_through_sidecar` must refuse it."""
    need_python_clients()
    stack = stacks("sekmet", "forward")
    for k in list(os.environ):
        if k.lower() in PROXY_VARS:
            monkeypatch.delenv(k)  # no HTTP_PROXY: the request goes around the sidecar
    from fhirclient import client as fc  # type: ignore[import-untyped]
    from fhirclient.models.patient import Patient  # type: ignore[import-untyped]

    corr = f"bypass-{uuid.uuid4().hex[:12]}"
    srv = fc.FHIRClient(settings={"app_id": "bypass", "api_base": stack.client_base}).server
    srv.session.headers.update({"X-API-Key": API_KEY, "X-Correlation-ID": corr})
    rec = Recorder()
    srv.session.hooks["response"].append(rec.hook)
    Patient(patient_body("bypass")).create(srv)
    assert rec.exchanges[0].corr is None  # sekmet itself does not send X-Correlation-ID
    with pytest.raises(AssertionError, match="X-Correlation-ID"):
        assert_through_sidecar(stack, rec.exchanges, timeout=0.2)
    rec.exchanges[0].corr = corr  # even with the id the app chose, the audit never saw it
    with pytest.raises(AssertionError, match="audit does not match"):
        assert_through_sidecar(stack, rec.exchanges, timeout=0.5)
    # and sekmet's own log shows the app's api key arrived: exactly what the sidecar never lets through
    assert stack.upstream.saw(corr, 1)[0]["headers"].get("x-api-key") == API_KEY


def test_audit_chains_verify(stacks: Stacks) -> None:
    """After every scenario above (this runs last in the module), each sidecar's HMAC chain is intact."""
    if not stacks.made:
        stacks("sandbox", "reverse")
    for key, stack in stacks.made.items():
        result = verify_files([str(stack.audit_path)], {"k1": AUDIT_KEY.encode()})
        assert result.code == 0, (key, result.message)
