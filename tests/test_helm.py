"""The Helm chart (helm/fhir-sidecar): rendered offline with the Helm v4 engine of
helm-python-sdk, linted strictly, every manifest validated against the Kubernetes 1.30 schemas
(kubernetes-validate, strict), and asserted on as objects. The interception rules of sidecar mode
are proven in network namespaces: the init container's own script, applied with its own
capabilities, makes the app's UID reach a stand-in EHR only through the sidecar.

Needs (test extras) helm-python-sdk and kubernetes-validate; the netns proof needs root and the
Debian packages iproute2, iptables and util-linux (setpriv). Missing: skip, unless CI is set (fail).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import pytest
import yaml

import sidecar

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fhir-sidecar"
EXAMPLES = CHART / "examples"
NETPROBE = Path(__file__).resolve().parent / "helm" / "netprobe.py"
KUBE_VERSION = "1.30.0"

pytestmark = pytest.mark.helm


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} is not installed (PyPI: {package}, in the test extras)"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg, allow_module_level=True)


helm = _need("helm_python", "helm-python-sdk")
kv_utils = _need("kubernetes_validate.utils", "kubernetes-validate")

# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

def merge(base: dict, over: dict) -> dict:
    """Values overlay as Helm does it: maps merge, anything else replaces, None removes the key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def example(mode: str) -> dict:
    return yaml.safe_load((EXAMPLES / f"{mode}.yaml").read_text())


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(str(CHART)) as c:
        yield c


def render(chart, values: dict, *, name: str = "rel", namespace: str = "clinic") -> list[dict]:
    out = chart.render(values, name=name, namespace=namespace)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(o for o in yaml.safe_load_all(text) if o)
    return objs


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def workload(objs: list[dict]) -> dict:
    found = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1
    return found[0]


def pod_spec(objs: list[dict]) -> dict:
    return workload(objs)["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict, name: str) -> dict:
    found = [c for c in all_containers(spec) if c["name"] == name]
    assert len(found) == 1, f"container {name}: {[c['name'] for c in all_containers(spec)]}"
    return found[0]


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def sidecar_config(objs: list[dict]) -> dict:
    return yaml.safe_load(one(objs, "ConfigMap", "rel-fhir-sidecar-config")["data"]["config.yaml"])


# ---------------------------------------------------------------------------------------------
# scenarios: each mode and option
# ---------------------------------------------------------------------------------------------

VAULT_K8S = {
    "config": {"vault": {"url": "https://vault.example.org:8200", "auth": "kubernetes", "role": "fhir-sidecar"},
               "audit": {"key": "vault:secret/data/fhir-sidecar#audit_key"}},
    "networkPolicy": {"egress": {"vault": {"cidrs": ["192.0.2.20/32"], "ports": [8200]}}},
}
REDIS = {
    "config": {"state": {"store": "redis://fhir-sidecar@redis.redis.svc:6379/0",
                         "password": "file:/var/run/secrets/fhir-sidecar/redis-password"}},
    "networkPolicy": {"egress": {"redis": {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}],
                                           "ports": [6379]}}},
}

# name -> (values, features that once were refused by `fhir-sidecar check`; all are accepted now)
SCENARIOS: dict[str, tuple[dict, set[str]]] = {
    "sidecar": (example("sidecar"), set()),
    "sidecar-opa-vault-redis-3-replicas": (
        merge(merge(merge(example("sidecar"), VAULT_K8S), REDIS), {"replicas": 3, "opa": {"enabled": True}}),
        {"opa", "vault", "state"}),
    "sidecar-no-pvc-legacy-classic-configmap-killswitch": (
        merge(example("sidecar"), {"persistence": {"enabled": False}, "interception": {"backend": "legacy"},
                                   "sidecar": {"native": False}, "killSwitch": {"source": "configMap"},
                                   "serviceMonitor": {"enabled": True}}),
        set()),
    "reverse": (example("reverse"), set()),
    "reverse-opa-2-replicas": (merge(example("reverse"), {"opa": {"enabled": True}, "replicas": 2}), {"opa"}),
    "forward": (example("forward"), set()),
    "forward-ca-secret-vault": (merge(merge(example("forward"), VAULT_K8S), {"ca": {"existingSecret": "scribe-ca"}}),
                                {"vault"}),
    "gateway": (example("gateway"), {"state"}),
    "gateway-reverse-tls-opa-1-replica": (
        merge(example("gateway"), {"replicas": 1, "opa": {"enabled": True},
                                   "gateway": {"listenMode": "reverse", "tls": {"existingSecret": "gw-tls"}},
                                   "ca": {"existingSecret": ""}, "serviceMonitor": {"enabled": True},
                                   "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
                                   "config": {"state": None}}),
        {"tls", "opa"}),
    "gateway-forward-sqlite-no-pvc": (
        merge(example("gateway"), {"replicas": 1, "persistence": {"enabled": False},
                                   "config": {"state": None}}),
        set()),
}


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    return {name: render(chart, values) for name, (values, _) in SCENARIOS.items()}


# ---------------------------------------------------------------------------------------------
# lint, schemas, broken values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", [*SCENARIOS, "chart-defaults"])
def test_strict_lint_passes(scenario):
    values = SCENARIOS[scenario][0] if scenario in SCENARIOS else None
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}", namespace="clinic")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates_against_kubernetes_1_30(rendered, scenario):
    objs = rendered[scenario]
    unschematized = []
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no schema in kubernetes-validate
            unschematized.append(obj)
            continue
        kv_utils.validate(obj, KUBE_VERSION, strict=True)
    for sm in unschematized:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["spec"]["endpoints"][0]["port"] == "admin" and sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_a_string_replica_count_fails(chart):
    values = merge(example("sidecar"), {"replicas": "3"})
    with pytest.raises(helm.HelmValuesError, match="replicas"):
        chart.render(values, name="rel")
    report = helm.lint(str(CHART), values, strict=True)
    assert any("replicas" in e for e in report["errors"])
    # and if a string ever got through, the 1.30 schema check refuses the manifest itself
    dep = copy.deepcopy(workload(render(chart, example("sidecar"))))
    dep["spec"]["replicas"] = "3"
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(dep, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("over, message", [
    ({"mode": "mesh"}, "mode"),
    ({"app": {"uid": 10001}}, "app.uid must differ from sidecar.uid"),
    ({"app": {"uid": 0}}, "uid"),
    ({"opa": {"enabled": True, "uid": 10002}}, "opa.uid must differ"),
    ({"app": {"image": ""}}, "app.image is required"),
    ({"ehr": {"cidrs": []}}, "ehr.cidrs is required"),
    ({"ehr": {"cidrs": ["2001:db8::/64"]}}, "IPv4"),
    ({"secrets": {"existingSecret": ""}}, "admin.token"),
    ({"config": {"listen": {"mode": "reverse"}}}, "config.listen is set by the chart"),
    ({"config": {"audit": {"path": "/tmp/a"}}}, "config.audit.path is set by the chart"),
    ({"config": {"state": {"store": "sqlite:/tmp/x.db"}}}, "sqlite"),
    ({"config": {"vault": {"url": "https://v:8200", "auth": "kubernetes", "role": "r"}}}, "networkPolicy.egress.vault"),
    ({"config": {"policy": {"engine": "opa"}}}, "opa.enabled"),
    ({"config": {"identity": {"jwks": "https://idp.example.org/jwks.json"}}}, "networkPolicy.egress.identity"),
    ({"killSwitch": {"clients": {"nobody": True}}}, "not a client"),
    ({"sidecar": {"env": [{"name": "X", "value": "y"}]}}, "valueFrom"),
    ({"unknownKey": 1}, "unknownKey"),
])
def test_broken_values_fail_with_a_message(chart, over, message):
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError), match=re.escape(message)):
        chart.render(merge(example("sidecar"), over), name="rel")


@pytest.mark.parametrize("over, message", [
    ({"gateway": {"apps": {"namespace": ""}}}, "gateway.apps.namespace is required"),
    ({"ca": {"existingSecret": ""}}, "ca.existingSecret"),
    ({"gateway": {"listenMode": "reverse"}}, "gateway.tls.existingSecret"),
    ({"config": {"state": None}}, "replicas > 1 needs shared state"),
    ({"networkPolicy": {"egress": {"redis": {"to": [], "ports": [6379]}}}}, "networkPolicy.egress.redis"),
])
def test_broken_gateway_values_fail_with_a_message(chart, over, message):
    values = merge(example("gateway"), over)
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name="rel")


# ---------------------------------------------------------------------------------------------
# secrets are references, never values
# ---------------------------------------------------------------------------------------------

CANARY = "CANARY-s3cr3t-" + "9f2c41d7"
SECRET_PATHS = [
    ("admin", "token"), ("audit", "key"), ("audit", "pseudonym_key"), ("vault", "token"),
    ("vault", "secret_id"), ("state", "password"), ("approvals", "release_credentials"),
]


def _with_secret(values: dict, path: tuple, value) -> dict:
    v = copy.deepcopy(values)
    node = v["config"]
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return v


@pytest.mark.parametrize("values", [
    *[_with_secret(example("sidecar"), p, CANARY) for p in SECRET_PATHS],
    _with_secret(example("sidecar"), ("audit", "keys"), {"k1": CANARY}),
    _with_secret(example("sidecar"), ("identity", "introspection"), {"url": "https://idp/introspect", "client_id": "c", "client_secret": CANARY}),
    merge(example("sidecar"), {"config": {"clients": [{"id": "a", "auth": "api-key", "api_key_sha256": "0" * 64, "upstream_credentials": CANARY}]}}),
    merge(example("sidecar"), {"config": {"clients": [{"id": "a", "auth": "api-key", "api_key_sha256": "0" * 64,
                                                       "upstream_credentials": {"type": "basic", "username": "u", "password": CANARY}}]}}),
    merge(example("gateway"), {"config": {"state": {"store": f"redis://fhir-sidecar:{CANARY}@redis:6379/0"}}}),
], ids=[".".join(p) for p in SECRET_PATHS] + ["audit.keys", "introspection", "upstream_credentials", "basic-password", "redis-url"])
def test_a_secret_given_as_a_value_fails_and_is_never_echoed(chart, values):
    with pytest.raises(helm.HelmRenderError) as e:
        chart.render(values, name="rel")
    assert "secret reference" in str(e.value) or "password" in str(e.value)
    assert CANARY not in str(e.value)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_objects_and_secrets_mounted_into_the_sidecar_alone(rendered, scenario):
    objs = rendered[scenario]
    assert not [o for o in objs if o["kind"] == "Secret"], "the chart never creates Secrets: they are references"
    spec = pod_spec(objs)
    secret_vols = {v["name"] for v in spec["volumes"] if "secret" in v or "projected" in v}
    # the Secrets, the CA key (confdir), the audit trail and state (data): the sidecar's alone
    sensitive = secret_vols | {"confdir", "data"}
    for c in all_containers(spec):
        mounted = {m["name"] for m in c.get("volumeMounts", [])} & sensitive
        allowed = {"fhir-sidecar": sensitive, "ca-setup": {"ca-secret", "confdir"}}.get(c["name"], set())
        assert mounted <= allowed, f"{c['name']} mounts {mounted - allowed}"
        if c["name"] == "fhir-sidecar":
            assert all("valueFrom" in e for e in c.get("env", []))


# ---------------------------------------------------------------------------------------------
# pod hardening, probes, tokens
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_is_hardened(rendered, scenario):
    values, _ = SCENARIOS[scenario]
    objs = rendered[scenario]
    spec = pod_spec(objs)
    assert spec["automountServiceAccountToken"] is False
    sa = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert sa and all(o["automountServiceAccountToken"] is False for o in sa)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("shareProcessNamespace")
    for c in all_containers(spec):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
        if c["name"] == "interception":
            expected = ["NET_ADMIN"] if values.get("interception", {}).get("backend", "nft") == "nft" else ["NET_ADMIN", "NET_RAW"]
            assert sc["capabilities"]["add"] == expected and sc["runAsUser"] == 0
            assert "restartPolicy" not in c
        else:
            assert "add" not in sc["capabilities"], f"{c['name']} must not add capabilities"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, c["name"]
    uids = {c["name"]: c["securityContext"]["runAsUser"] for c in all_containers(spec)}
    if values["mode"] != "gateway":
        assert uids["app"] != uids["fhir-sidecar"]
        assert values["mode"] != "sidecar" or "interception" in uids
    if "opa" in uids:
        assert uids["opa"] not in (uids["fhir-sidecar"], uids.get("app"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sidecar_probes_drain_and_ordering(rendered, scenario):
    values, _ = SCENARIOS[scenario]
    objs = rendered[scenario]
    spec = pod_spec(objs)
    sc = container(spec, "fhir-sidecar")
    admin_port = {p["name"]: p["containerPort"] for p in sc["ports"]}["admin"]
    assert admin_port == sidecar_config(objs)["admin"]["port"]
    assert sc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sc["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    sleep = sc["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "/bin/sleep"
    assert spec["terminationGracePeriodSeconds"] >= int(sleep[1]) + 30  # preStop + the sidecar's 30 s drain
    native = values["mode"] != "gateway" and values.get("sidecar", {}).get("native", True)
    names = [c["name"] for c in spec.get("initContainers", [])]
    if native:  # a native sidecar: after the interception and CA set-up, before the app
        assert sc.get("restartPolicy") == "Always" and names[-1] == "fhir-sidecar"
        assert names.index("fhir-sidecar") > max((names.index(n) for n in ("interception", "ca-setup") if n in names), default=-1)
    else:
        assert "fhir-sidecar" in [c["name"] for c in spec["containers"]]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_account_token_is_projected_into_the_sidecar_alone(rendered, scenario):
    values, _ = SCENARIOS[scenario]
    spec = pod_spec(rendered[scenario])
    token_vols = {v["name"] for v in spec["volumes"]
                  if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
    vault_k8s = values.get("config", {}).get("vault", {}).get("auth") == "kubernetes"
    assert bool(token_vols) == vault_k8s
    for c in all_containers(spec):
        mounts = [m for m in c.get("volumeMounts", []) if m["name"] in token_vols]
        if c["name"] == "fhir-sidecar" and vault_k8s:
            assert mounts == [{"name": "sa-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}]
        else:
            assert not mounts, c["name"]
    if vault_k8s:
        src = next(v for v in spec["volumes"] if v["name"] == "sa-token")["projected"]["sources"][0]["serviceAccountToken"]
        assert src["audience"] == "vault" and src["expirationSeconds"] <= 3600


# ---------------------------------------------------------------------------------------------
# the sidecar's config
# ---------------------------------------------------------------------------------------------

MODE_LISTEN = {"sidecar": ("transparent", "127.0.0.1"), "reverse": ("reverse", "127.0.0.1"),
               "forward": ("forward", "127.0.0.1")}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_is_accepted_by_fhir_sidecar_check(rendered, scenario, tmp_path):
    values, _ = SCENARIOS[scenario]
    objs = rendered[scenario]
    cfg = sidecar_config(objs)
    mode = values["mode"]
    listen_mode, host = MODE_LISTEN[mode] if mode in MODE_LISTEN else (values["gateway"]["listenMode"], "0.0.0.0")
    assert (cfg["listen"]["mode"], cfg["listen"]["host"]) == (listen_mode, host)
    assert cfg["listen"]["confdir"] == "/var/lib/mitmproxy"  # mitmproxy writes there in every mode
    assert cfg["admin"]["host"] == "0.0.0.0" and cfg["admin"]["token"].startswith(("file:", "env:", "vault:"))
    assert cfg["killswitch"]["file"] in ("/var/lib/fhir-sidecar/killswitch", "/etc/fhir-sidecar/killswitch/killswitch")
    # the policy ConfigMap, written out as the kubelet would, is the policy dir
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "rel-fhir-sidecar-policies"]
    for fname, text in cms[0]["data"].items():
        (policy_dir / fname).write_text(text)
    assert cfg["policy"]["dir"] == "/etc/fhir-sidecar/policies"
    cfg["policy"]["dir"] = str(policy_dir)  # the one path rewritten for this machine
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **{ref[4:]: "dummy-" + "x" * 40 for ref in _refs(cfg) if ref.startswith("env:")}}
    r = subprocess.run([*_fhir_sidecar(), "check", "--config", str(path)], capture_output=True, text=True,
                       timeout=120, env=env, check=False)
    # every feature the chart renders (OPA, Vault, Redis, listen.tls) exists now: accepted outright
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def _refs(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)
    elif isinstance(node, str) and node.startswith(("env:", "file:", "vault:")):
        yield node


def _fhir_sidecar() -> list[str]:
    exe = Path(sys.executable).with_name("fhir-sidecar")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sidecar"]


def test_config_with_the_projects_policies_passes_check(chart, tmp_path):
    """The security team's policies/ shipped with policies.files (as the README shows) compile in `check`."""
    files = {p.name: p.read_text() for p in sorted((ROOT / "policies").iterdir())
             if p.suffix in (".rego", ".json")}
    objs = render(chart, merge(example("reverse"), {"policies": {"files": files}}))
    cm = one(objs, "ConfigMap", "rel-fhir-sidecar-policies")
    assert cm["data"] == files
    (tmp_path / "policies").mkdir()
    for fname, text in cm["data"].items():
        (tmp_path / "policies" / fname).write_text(text)
    cfg = sidecar_config(objs)
    cfg["policy"]["dir"] = str(tmp_path / "policies")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*_fhir_sidecar(), "check", "--config", str(tmp_path / "config.yaml")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def test_config_and_policy_changes_restart_pods_but_the_kill_switch_never_does(chart):
    base = merge(example("sidecar"), {"killSwitch": {"source": "configMap"}})
    objs = render(chart, base)
    annotations = workload(objs)["spec"]["template"]["metadata"]["annotations"]
    assert set(annotations) == {"checksum/config", "checksum/policies"}
    config_text = one(objs, "ConfigMap", "rel-fhir-sidecar-config")["data"]["config.yaml"]
    assert annotations["checksum/config"] == hashlib.sha256(config_text.rstrip("\n").encode()).hexdigest()

    flipped = render(chart, merge(base, {"killSwitch": {"engaged": True, "clients": {"scribe-app": True}}}))
    assert workload(flipped)["spec"]["template"] == workload(objs)["spec"]["template"]
    ks_before = one(objs, "ConfigMap", "rel-fhir-sidecar-killswitch")["data"]
    ks_after = one(flipped, "ConfigMap", "rel-fhir-sidecar-killswitch")["data"]
    assert ks_before == {"killswitch": "off", "client.scribe-app": "off"}
    assert ks_after == {"killswitch": "on", "client.scribe-app": "on"}

    changed = render(chart, merge(base, {"config": {"upstream": {"timeout_s": 10}}}))
    assert workload(changed)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != annotations["checksum/config"]
    policy = render(chart, merge(base, {"policies": {"files": {"p.rego": "package fhir.writeback\n"}}}))
    assert workload(policy)["spec"]["template"]["metadata"]["annotations"]["checksum/policies"] != annotations["checksum/policies"]

    # the ConfigMap's files are the flag files the sidecar reads: <file> and <file>.clients/<id>
    spec = pod_spec(objs)
    vol = next(v for v in spec["volumes"] if v["name"] == "killswitch")
    assert vol["configMap"]["items"] == [{"key": "killswitch", "path": "killswitch"},
                                         {"key": "client.scribe-app", "path": "killswitch.clients/scribe-app"}]
    mount = next(m for m in container(spec, "fhir-sidecar")["volumeMounts"] if m["name"] == "killswitch")
    assert sidecar_config(objs)["killswitch"]["file"] == mount["mountPath"] + "/killswitch"


def test_kill_switch_configmap_files_are_what_the_sidecar_reads(chart, tmp_path):
    """Lay the ConfigMap out as the kubelet does (items, ..data symlinks) and read it with the sidecar's code."""
    from sidecar.killswitch import read_state

    objs = render(chart, merge(example("sidecar"), {"killSwitch": {"source": "configMap", "clients": {"scribe-app": True}}}))
    spec = pod_spec(objs)
    data = one(objs, "ConfigMap", "rel-fhir-sidecar-killswitch")["data"]
    items = next(v for v in spec["volumes"] if v["name"] == "killswitch")["configMap"]["items"]
    mount = tmp_path / "mnt"
    stamp = mount / "..2026_11_25_00_00_00.000000001"
    for item in items:
        (stamp / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (stamp / item["path"]).write_text(data[item["key"]])
    (mount / "..data").symlink_to(stamp.name)
    for top in {item["path"].split("/")[0] for item in items}:
        (mount / top).symlink_to(f"..data/{top}")
    flag = Path(str(mount) + sidecar_config(objs)["killswitch"]["file"].removeprefix("/etc/fhir-sidecar/killswitch"))
    state = read_state(flag)
    assert state.engaged is False and state.clients == frozenset({"scribe-app"})


def test_kill_switch_file_is_on_the_writable_audit_volume_by_default(chart):
    objs = render(chart, example("sidecar"))
    spec = pod_spec(objs)
    mount = next(m for m in container(spec, "fhir-sidecar")["volumeMounts"] if m["name"] == "data")
    assert not mount.get("readOnly")
    assert Path(sidecar_config(objs)["killswitch"]["file"]).parent == Path(mount["mountPath"])
    assert "persistentVolumeClaim" in next(v for v in spec["volumes"] if v["name"] == "data")
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("killswitch")]
    assert set(workload(objs)["spec"]["template"]["metadata"]["annotations"]) == {"checksum/config", "checksum/policies"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_audit_lives_on_a_persistent_volume(rendered, scenario):
    values, _ = SCENARIOS[scenario]
    objs = rendered[scenario]
    w = workload(objs)
    spec = w["spec"]["template"]["spec"]
    replicas = values.get("replicas", 1)
    persistent = values.get("persistence", {}).get("enabled", True)
    mount = next(m for m in container(spec, "fhir-sidecar")["volumeMounts"] if m["name"] == "data")
    assert Path(sidecar_config(objs)["audit"]["path"]).parent == Path(mount["mountPath"])
    if persistent and replicas > 1:
        assert w["kind"] == "StatefulSet"
        assert [t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]] == ["data"]
        assert not [v for v in spec["volumes"] if v["name"] == "data"]
        one(objs, "Service", "rel-fhir-sidecar-headless")
    elif persistent:
        assert w["kind"] == "Deployment" and w["spec"]["strategy"] == {"type": "Recreate"}
        claim = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
        one(objs, "PersistentVolumeClaim", claim)
    else:
        assert w["kind"] == "Deployment"
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "data")


# ---------------------------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------------------------

def test_sidecar_mode_interception_rules_in_the_init_container(chart):
    values = merge(example("sidecar"), {"opa": {"enabled": True},
                                        "app": {"egress": [{"cidr": "10.1.2.0/24", "ports": [5432]}]}})
    objs = render(chart, values)
    spec = pod_spec(objs)
    init = container(spec, "interception")
    assert spec["initContainers"][0]["name"] == "interception"
    env = env_of(init)
    cfg = sidecar_config(objs)
    assert env["SIDECAR_UID"] == str(container(spec, "fhir-sidecar")["securityContext"]["runAsUser"])
    assert env["APP_UID"] == str(container(spec, "app")["securityContext"]["runAsUser"])
    assert env["PROXY_PORT"] == str(cfg["listen"]["port"]) and cfg["listen"] == {
        "mode": "transparent", "host": "127.0.0.1", "port": 8080, "confdir": "/var/lib/mitmproxy"}
    assert env["EHR_DESTINATIONS"] == "203.0.113.10/32:443"
    assert env["PROTECTED_PORTS"].split() == [str(cfg["admin"]["port"]), "8181"]
    assert env["APP_EGRESS"] == "10.1.2.0/24:5432/tcp"
    assert env["DNS_SERVERS"] == "" and env["IPTABLES"] == "iptables-nft"
    script = init["command"][2]
    assert init["command"][:2] == ["/bin/sh", "-c"] and script.startswith("set -eu")
    for rule in ('-m owner --uid-owner "$SIDECAR_UID" -j RETURN',
                 '-j REDIRECT --to-ports "$PROXY_PORT"',
                 '-m owner --uid-owner "$SIDECAR_UID" -j ACCEPT',
                 'out -j REJECT', 'out6 -j REJECT'):
        assert rule in script
    # the app trusts the sidecar CA through the combined bundle, and keeps its EHR URL
    app_env = env_of(container(spec, "app"))
    assert app_env["SSL_CERT_FILE"] == "/etc/fhir-sidecar-ca/ca-bundle.pem"
    assert "HTTPS_PROXY" not in app_env and "FHIR_BASE_URL" not in app_env


def test_reverse_mode_points_the_app_at_loopback_without_interception(chart):
    objs = render(chart, example("reverse"))
    spec = pod_spec(objs)
    assert "interception" not in [c["name"] for c in spec.get("initContainers", [])]
    assert "ca-setup" not in [c["name"] for c in spec.get("initContainers", [])]
    assert env_of(container(spec, "app"))["FHIR_BASE_URL"] == "http://127.0.0.1:8080/fhir/R4"
    values_text = (CHART / "values.yaml").read_text()
    assert "reverse  NON-ENFORCING" in values_text and "forward  NON-ENFORCING" in values_text


@pytest.mark.parametrize("mode", ["sidecar", "reverse", "forward", "gateway"])
def test_install_notes_label_the_non_enforcing_modes(chart, mode):
    notes = chart.render(example(mode), name="rel", namespace="clinic")["fhir-sidecar/templates/NOTES.txt"]
    assert ("NOT ENFORCING" in notes) == (mode in ("reverse", "forward"))
    assert "ENFORCING" in notes and "Kill switch" in notes


def test_forward_mode_gives_the_app_a_proxy_and_a_combined_ca_bundle(chart):
    objs = render(chart, example("forward"))
    spec = pod_spec(objs)
    app_env = env_of(container(spec, "app"))
    assert app_env["HTTPS_PROXY"] == app_env["https_proxy"] == "http://127.0.0.1:8080"
    assert "EHR" not in app_env["NO_PROXY"] and "ehr.example.org" not in app_env["NO_PROXY"]
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        assert app_env[var] == "/etc/fhir-sidecar-ca/ca-bundle.pem"
    setup = env_of(container(spec, "ca-setup"))
    assert setup["BUNDLE_DIR"] == "/etc/fhir-sidecar-ca" and setup["CONFDIR"] == sidecar_config(objs)["listen"]["confdir"]
    app_mounts = {m["name"]: m for m in container(spec, "app")["volumeMounts"]}
    assert app_mounts["ca-bundle"]["readOnly"] is True and "confdir" not in app_mounts
    confdir = next(v for v in spec["volumes"] if v["name"] == "confdir")
    assert confdir["emptyDir"]["medium"] == "Memory"


def test_gateway_mode_service_pdb_and_the_apps_egress_policy(chart):
    objs = render(chart, example("gateway"), namespace="fhir-gateway")
    svc = one(objs, "Service", "rel-fhir-sidecar")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["proxy"]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == workload(objs)["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    spec = pod_spec(objs)
    assert "app" not in [c["name"] for c in all_containers(spec)]
    apps = one(objs, "NetworkPolicy", "rel-fhir-sidecar-apps-egress")
    assert apps["metadata"]["namespace"] == "clinic-apps"
    assert apps["spec"]["policyTypes"] == ["Egress"] and apps["spec"]["podSelector"] == {}
    to_gateway, dns = apps["spec"]["egress"]
    assert to_gateway["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fhir-gateway"}},
                                 "podSelector": {"matchLabels": workload(objs)["spec"]["selector"]["matchLabels"]}}]
    assert to_gateway["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert {p["port"] for p in dns["ports"]} == {53}
    gw = one(objs, "NetworkPolicy", "rel-fhir-sidecar")
    assert gw["spec"]["policyTypes"] == ["Egress", "Ingress"]
    assert gw["spec"]["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clinic-apps"}},
                                                "podSelector": {}}],
                                      "ports": [{"port": 8080, "protocol": "TCP"}]}]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policy_egress_is_the_ehr_dns_and_what_the_config_needs(rendered, scenario):
    values, _ = SCENARIOS[scenario]
    objs = rendered[scenario]
    np = one(objs, "NetworkPolicy", "rel-fhir-sidecar")
    assert np["spec"]["podSelector"]["matchLabels"] == workload(objs)["spec"]["selector"]["matchLabels"]
    assert "Egress" in np["spec"]["policyTypes"]
    rules = np["spec"]["egress"]
    for rule in rules:  # a rule without `to` or `ports` would allow every destination or port
        assert rule.get("to") and rule.get("ports"), rule
    ehr, dns, *rest = rules
    assert ehr == {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    expected = []
    egress = values.get("networkPolicy", {}).get("egress", {})
    for name in sorted(egress):
        d = egress[name]
        if d.get("cidrs") or d.get("to"):
            expected.append({"to": [{"ipBlock": {"cidr": c}} for c in d.get("cidrs", [])] + d.get("to", []),
                             "ports": [{"port": p, "protocol": "TCP"} for p in d["ports"]]})
    assert rest == expected


def test_app_egress_exceptions_reach_the_network_policy(chart):
    objs = render(chart, merge(example("reverse"), {"app": {"egress": [{"cidr": "10.1.2.0/24", "ports": [5432]}]}}))
    rules = one(objs, "NetworkPolicy", "rel-fhir-sidecar")["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}], "ports": [{"port": 5432, "protocol": "TCP"}]} in rules


def test_service_monitor_scrapes_the_admin_port(chart):
    objs = render(chart, merge(example("sidecar"), {"serviceMonitor": {"enabled": True,
                                                                        "bearerTokenSecret": {"name": "s", "key": "k"}}}))
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service", "rel-fhir-sidecar-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["authorization"] == {"type": "Bearer", "credentials": {"name": "s", "key": "k"}}
    assert svc["spec"]["ports"] == [{"name": "admin", "port": 9090, "targetPort": "admin", "protocol": "TCP"}]


# ---------------------------------------------------------------------------------------------
# OPA: loopback, authorization on, no write API
# ---------------------------------------------------------------------------------------------

def test_opa_listens_on_loopback_with_authorization_that_refuses_policy_writes(chart):
    from regopy import Input, Interpreter

    objs = render(chart, merge(example("reverse"), {"opa": {"enabled": True}}))
    spec = pod_spec(objs)
    opa = container(spec, "opa")
    assert "--addr=127.0.0.1:8181" in opa["args"] and "--authorization=basic" in opa["args"]
    assert not [a for a in opa["args"] if a.startswith("--addr=") and not a.startswith("--addr=127.0.0.1:")]
    assert sidecar_config(objs)["policy"] == {"dir": "/etc/fhir-sidecar/policies", "engine": "opa",
                                              "opa_url": "http://127.0.0.1:8181"}
    authz = one(objs, "ConfigMap", "rel-fhir-sidecar-opa-authz")["data"]["authz.rego"]

    def allowed(method: str, path: str) -> bool:
        rego = Interpreter()
        rego.add_module("authz.rego", authz)
        rego.set_input(Input({"method": method, "path": [p for p in path.split("/") if p], "headers": {}}))
        out = rego.query("data.system.authz.allow")
        return str(out) != "undefined" and json.loads(str(out)) == {"expressions": [True]}  # undefined: OPA denies

    assert allowed("POST", "/v1/data/fhir/writeback/decision")
    assert allowed("GET", "/health")
    for method, path in [("PUT", "/v1/policies/evil"), ("DELETE", "/v1/policies/fhir"), ("GET", "/v1/policies"),
                         ("PUT", "/v1/data/fhir_sidecar"), ("PATCH", "/v1/data"), ("POST", "/v1/query"),
                         ("POST", "/"), ("GET", "/v1/data/fhir/writeback"), ("POST", "/v1/data/system/authz"),
                         ("POST", "/v1/data/fhir"), ("GET", "/v1/config"), ("POST", "/v1/compile")]:
        assert not allowed(method, path), (method, path)


# ---------------------------------------------------------------------------------------------
# the ca-setup init container's script
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("from_secret", [False, True], ids=["per-pod-ca", "ca-secret"])
def test_ca_setup_script_builds_confdir_and_a_combined_bundle_without_the_key(chart, tmp_path, from_secret):
    from mitmproxy.certs import CertStore

    values = merge(example("forward"), {"ca": {"existingSecret": "scribe-ca"}} if from_secret else {})
    setup = container(pod_spec(render(chart, values)), "ca-setup")
    env = env_of(setup)
    confdir, bundle_dir = tmp_path / "confdir", tmp_path / "bundle"
    confdir.mkdir()
    bundle_dir.mkdir()
    roots = tmp_path / "roots.pem"
    CertStore.create_store(tmp_path / "roots", "root", 2048)
    roots.write_bytes((tmp_path / "roots" / "root-ca-cert.pem").read_bytes())
    run_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               "CONFDIR": str(confdir), "BUNDLE_DIR": str(bundle_dir), "SYSTEM_CA_FILE": str(roots)}
    assert set(env) == {"CONFDIR", "BUNDLE_DIR", "SYSTEM_CA_FILE"} | ({"CA_SECRET_DIR"} if from_secret else set())
    if from_secret:
        secret = tmp_path / "secret"
        CertStore.create_store(tmp_path / "made", "mitmproxy", 2048)
        pem = (tmp_path / "made" / "mitmproxy-ca.pem").read_text()
        key_end = pem.index("-----END RSA PRIVATE KEY-----") + len("-----END RSA PRIVATE KEY-----\n")
        secret.mkdir()
        (secret / "tls.key").write_text(pem[:key_end])
        (secret / "tls.crt").write_text(pem[key_end:])
        run_env["CA_SECRET_DIR"] = str(secret)
    r = subprocess.run(setup["command"], env=run_env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
    store = CertStore.from_store(confdir, "mitmproxy", 2048)  # mitmproxy loads it (and writes its dhparam)
    bundle = (bundle_dir / "ca-bundle.pem").read_text()
    assert "PRIVATE KEY" not in bundle
    assert bundle.startswith(roots.read_text())
    assert bundle.endswith((confdir / "mitmproxy-ca-cert.pem").read_text())
    if from_secret:
        assert (confdir / "mitmproxy-ca-cert.pem").read_text() == (tmp_path / "secret" / "tls.crt").read_text()
    assert store.default_ca is not None


# ---------------------------------------------------------------------------------------------
# the Dockerfile matches the chart's default image
# ---------------------------------------------------------------------------------------------

def test_dockerfile_matches_the_chart(chart):
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(froms) >= 2, "multi-stage"
    for image, _ in froms:
        base = image if not image.startswith("${") else re.search(r"ARG\s+PYTHON_IMAGE=(\S+)", text).group(1)
        assert re.search(r":\d+\.\d+\.\d+[^:@]*(@sha256:[0-9a-f]{64})?$", base) or base in {s for _, s in froms}, base
    final = text[text.rindex("\nFROM"):]
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|make)\b", final), "no compilers in the final image"
    user = re.findall(r"^USER\s+(\d+):(\d+)", final, re.MULTILINE)
    defaults = chart.values
    assert user == [(str(defaults["sidecar"]["uid"]), str(defaults["sidecar"]["gid"]))]
    assert re.search(r'^ENTRYPOINT \["fhir-sidecar"\]', final, re.MULTILINE)
    for tool in ("iptables", "ca-certificates"):
        assert tool in final
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert chart.metadata["appVersion"] == version
    assert sidecar.__version__ == version  # the version the sidecar logs at start-up
    image = container(pod_spec(render(chart, example("sidecar"))), "fhir-sidecar")["image"]
    assert image == f"{defaults['image']['repository']}:{version}"


# ---------------------------------------------------------------------------------------------
# the proof: the init container's rules in network namespaces
# ---------------------------------------------------------------------------------------------

POD_IP, EHR_IP, ELSEWHERE_IP, DB_IP, DNS_IP = "198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.53"
POD_IP6, EHR_IP6 = "2001:db8:f5::1", "2001:db8:f5::2"
STRANGER_UID = 4242


def _netns_or_skip(backend: str) -> None:
    missing = [b for b in ("ip", "iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy", "setpriv")
               if shutil.which(b) is None]
    if missing:
        msg = f"missing {', '.join(missing)} (Debian packages: iproute2, iptables, util-linux)"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    if os.geteuid() != 0:
        pytest.skip("the netns proof needs root (ip netns, iptables): not root here")
    probe = f"fhsc-probe-{os.getpid()}-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"the kernel refuses network namespaces here ({r.stderr.strip()}): needs CAP_SYS_ADMIN/CAP_NET_ADMIN")
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, f"iptables-{backend}", "-t", "nat", "-L"],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"the kernel refuses iptables-{backend} in a network namespace here: {r.stderr.strip()}")
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


class Netns:
    """Two namespaces joined by a veth pair: `pod` (the app's pod) and `ehr` (everything outside)."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.pod, self.ehr = f"fhsc-pod-{tag}", f"fhsc-ehr-{tag}"
        self.etc = Path("/etc/netns") / self.pod
        self.procs: list[subprocess.Popen] = []
        # The stand-ins run under throwaway UIDs: give them a script and an interpreter they can
        # reach whatever the permissions of the checkout (stdlib only, so the system Python will do).
        self.dir = Path(tempfile.mkdtemp(prefix="fhsc-netns-"))
        self.dir.chmod(0o755)
        self.script = self.dir / "netprobe.py"
        shutil.copy(NETPROBE, self.script)
        self.script.chmod(0o644)
        self.python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

    def __enter__(self) -> Self:
        try:
            _sh("ip", "netns", "add", self.pod)
            _sh("ip", "netns", "add", self.ehr)
            _sh("ip", "link", "add", "vpod", "netns", self.pod, "type", "veth", "peer", "name", "vehr", "netns", self.ehr)
            for ns, dev, v4, v6 in ((self.pod, "vpod", [POD_IP], POD_IP6),
                                    (self.ehr, "vehr", [EHR_IP, ELSEWHERE_IP, DB_IP, DNS_IP], EHR_IP6)):
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                for a in v4:
                    _sh("ip", "-n", ns, "addr", "add", f"{a}/24", "dev", dev)
                _sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                _sh("ip", "-n", ns, "link", "set", dev, "up")
            # `ip netns exec` shows this file as the pod's /etc/resolv.conf, as the kubelet would
            self.etc.mkdir(parents=True)
            (self.etc / "resolv.conf").write_text(f"nameserver {DNS_IP}\nsearch clinic.svc.cluster.local\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for ns in (self.pod, self.ehr):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def as_uid(self, uid: int) -> list[str]:
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]

    def serve(self, ns: str, prefix: list[str], specs: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *prefix, self.python, "-I", "-S", str(self.script), "serve", *specs],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        assert json.loads(line or "{}").get("ready"), p.stderr.read() if p.poll() is not None else line
        return p

    def probe(self, uid: int, specs: list[str]) -> dict[str, dict]:
        r = subprocess.run(["ip", "netns", "exec", self.pod, *self.as_uid(uid), self.python, "-I", "-S", str(self.script),
                            "probe", *specs], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return {x["probe"]: x for x in json.loads(r.stdout)}


def _log_lines(p: subprocess.Popen) -> list[dict]:
    p.kill()
    out, _ = p.communicate(timeout=10)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_interception_proven_in_network_namespaces(chart, backend):
    _netns_or_skip(backend)
    values = merge(example("sidecar"), {
        "interception": {"backend": backend},
        "ehr": {"cidrs": [f"{EHR_IP}/32"]},
        "opa": {"enabled": True},
        "app": {"egress": [{"cidr": f"{DB_IP}/32", "ports": [5432]}]},
    })
    spec = pod_spec(render(chart, values))
    init = container(spec, "interception")
    env = env_of(init)
    sidecar_uid = int(env["SIDECAR_UID"])
    app_uid = container(spec, "app")["securityContext"]["runAsUser"]
    assert int(env["APP_UID"]) == app_uid and sidecar_uid == container(spec, "fhir-sidecar")["securityContext"]["runAsUser"]
    proxy, (admin, opa) = int(env["PROXY_PORT"]), map(int, env["PROTECTED_PORTS"].split())
    caps = init["securityContext"]["capabilities"]["add"]
    assert init["securityContext"]["allowPrivilegeEscalation"] is False

    t0 = time.monotonic()
    with Netns() as n:
        # the init container: its own command and environment, as root with only its capabilities
        bounding = "-all," + ",".join("+" + c.lower() for c in caps)
        apply = ["ip", "netns", "exec", n.pod, "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
                 "--no-new-privs", *init["command"]]
        run_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
        first = subprocess.run(apply, env=run_env, capture_output=True, text=True, timeout=60, check=False)
        assert first.returncode == 0, first.stderr
        save = ["ip", "netns", "exec", n.pod, env["IPTABLES"] + "-save"]
        rules = subprocess.run(save, capture_output=True, text=True, check=False).stdout
        again = subprocess.run(apply, env=run_env, capture_output=True, text=True, timeout=60, check=False)  # an init re-run
        assert again.returncode == 0, again.stderr
        rules_again = subprocess.run(save, capture_output=True, text=True, check=False).stdout
        strip = lambda s: [line for line in s.splitlines() if not line.startswith(("#", ":"))]
        assert strip(rules_again) == strip(rules), "a re-run of the init container must give the same rules"
        assert f"-d {DNS_IP}/32 -p udp" in rules, "DNS_SERVERS empty: the pod's nameserver from /etc/resolv.conf"

        ehr = n.serve(n.ehr, [], [f"tcp,{EHR_IP},443,ehr", f"tcp,{EHR_IP},9443,ehr-9443", f"tcp,{ELSEWHERE_IP},443,elsewhere",
                                  f"tcp,{DB_IP},5432,app-db", f"tcp,{DB_IP},5433,app-db-5433", f"udp,{DNS_IP},53,dns",
                                  f"udp,{ELSEWHERE_IP},53,other-dns", f"tcp,{EHR_IP6},443,ehr-v6"])
        n.serve(n.pod, n.as_uid(sidecar_uid), [f"orig,127.0.0.1,{proxy},sidecar", f"tcp,0.0.0.0,{admin},admin"])
        n.serve(n.pod, n.as_uid(10003), [f"tcp,127.0.0.1,{opa},opa"])
        n.serve(n.pod, n.as_uid(app_uid), ["tcp,127.0.0.1,7000,app-local"])

        common = [f"tcp,{EHR_IP},443,ehr", f"tcp,{EHR_IP},9443,ehr-9443", f"tcp,{ELSEWHERE_IP},443,elsewhere",
                  f"tcp,{EHR_IP6},443,ehr-v6", f"udp,{DNS_IP},53,dns", f"udp,{ELSEWHERE_IP},53,other-dns",
                  f"tcp,127.0.0.1,{admin},admin-loopback", f"tcp,{POD_IP},{admin},admin-pod-ip", f"tcp,127.0.0.1,{opa},opa",
                  f"tcp,127.0.0.1,{proxy},sidecar-direct", "tcp,127.0.0.1,7000,app-local",
                  f"tcp,{DB_IP},5432,app-db", f"tcp,{DB_IP},5433,app-db-5433"]
        app = n.probe(app_uid, common)
        stranger = n.probe(STRANGER_UID, common)
        side = n.probe(sidecar_uid, common)

        for who, res in (("app", app), ("stranger", stranger)):
            # the EHR address lands at the sidecar, which sees the original destination
            assert res["ehr"].get("answer") == f"sidecar orig={EHR_IP}:443", (who, res["ehr"])
            for refused in ("ehr-9443", "elsewhere", "ehr-v6", "other-dns", "admin-loopback", "admin-pod-ip",
                            "opa", "app-db-5433"):
                assert not res[refused]["ok"], (who, res[refused])
                assert res[refused]["error"] in ("ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM",
                                                 "ECONNRESET"), (who, res[refused])
            assert res["dns"]["ok"] and res["dns"]["answer"].startswith("dns "), (who, res["dns"])
            assert res["sidecar-direct"]["answer"] == f"sidecar orig=127.0.0.1:{proxy}"
            assert res["app-local"]["ok"]
        assert app["app-db"]["ok"] and app["app-db"]["answer"].startswith("app-db ")  # the app UID's own exception
        assert not stranger["app-db"]["ok"]                                            # ... and no one else's

        # the sidecar's UID goes straight to the EHR (not redirected) and is not confined by iptables
        assert side["ehr"]["answer"].startswith(f"ehr peer={POD_IP}:"), side["ehr"]
        for reached in ("ehr-9443", "elsewhere", "ehr-v6", "admin-loopback", "opa", "app-db-5433"):
            assert side[reached]["ok"], side[reached]

        # what the stand-in EHR saw: connections to 443 only ever came from the sidecar's probe
        seen = [e for e in _log_lines(ehr) if e.get("server") == "ehr"]
        assert len(seen) == 1 and seen[0]["peer"] == POD_IP, seen
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("workers", [None, 3])
def test_workers_value_reaches_the_command_line(chart, workers):
    values = example("sidecar")
    if workers is not None:
        values = merge(values, {"sidecar": {"workers": workers}})
    args = container(pod_spec(render(chart, values)), "fhir-sidecar")["args"]
    assert args[args.index("--workers") + 1] == str(workers or 1)
