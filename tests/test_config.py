"""Config: the YAML contract, validated once (pure; no network)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.config import Config, ConfigError, config_path, json_schema, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.yaml"
HEX = hashlib.sha256(b"key").hexdigest()

MINIMAL = {
    "upstream": {"url": "https://ehr.example.org/fhir/R4"},
    "audit": {"key": "env:FHIR_SIDECAR_AUDIT_KEY"},
    "clients": [{"id": "lab", "auth": "api-key", "api_key_sha256": HEX, "scopes": ["system/Observation.c"]}],
}


def with_(**changes) -> dict:
    """MINIMAL with dotted-path changes: with_(**{"audit.key": "x"}); a value of ... deletes."""
    data = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def client(**kw) -> dict:
    return {"id": "lab", "auth": "api-key", "api_key_sha256": HEX, **kw}


def test_demo_example_loads() -> None:
    cfg = load_config(DEMO)
    assert isinstance(cfg, Config)
    assert cfg.upstream.base_path == "/fhir/R4" and cfg.listen.is_loopback
    assert {c.id for c in cfg.clients} == {"demo-writer", "demo-reader"}
    writer = cfg.client("demo-writer")
    assert writer is not None and writer.api_key_sha256 == hashlib.sha256(b"demo-writer-key").hexdigest()
    assert cfg.client("demo-reader").api_key_sha256 == hashlib.sha256(b"demo-reader-key").hexdigest()
    assert cfg.client("nobody") is None


def test_minimal_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.mode) == ("127.0.0.1", 8080, "reverse")
    assert cfg.fhir.max_body_bytes == 5 * 1024 * 1024
    assert cfg.killswitch.scope == "all" and cfg.audit.reads_fail_open is False
    assert cfg.clients[0].enforce is True and cfg.clients[0].operations == []
    assert cfg.clients[0].conditional_writes is False
    assert cfg.audit.key_refs() == ({"k1": "env:FHIR_SIDECAR_AUDIT_KEY"}, "k1")


VALID = [
    ("secret-refs", with_(**{"audit.key": "file:/run/secrets/audit", "admin.token": "vault:secret/data/a#token"})),
    ("key-rotation", with_(**{"audit.key": ..., "audit.keys": {"k1": "env:K1", "k2": "env:K2"},
                              "audit.active": "k2"})),
    ("api-key-hash-ref", with_(**{"clients.0.api_key_sha256": "env:LAB_KEY_SHA256"})),
    ("api-key-hash-upper-hex", with_(**{"clients.0.api_key_sha256": HEX.upper()})),
    ("single-alone", with_(clients=[{"id": "app", "auth": "single", "scopes": ["system/*.rs"]}])),
    ("single-on-localhost", with_(clients=[{"id": "app", "auth": "single"}], **{"listen.host": "localhost"})),
    ("v1-and-v2-scopes", with_(**{"clients.0.scopes": ["system/Observation.read", "patient/*.cruds",
                                                      "user/Encounter.rs?category=inpatient"]})),
    ("operations", with_(**{"clients.0.operations": ["$merge", "$process-message"]})),
    ("upstream-credentials-ref", with_(**{"clients.0.upstream_credentials": "vault:secret/data/ehr/lab#token"})),
    ("upstream-credentials-basic", with_(**{"clients.0.upstream_credentials": {
        "type": "basic", "username": "lab", "password": "env:LAB_PW"}})),
    ("state-redis-user-no-password", with_(**{"state.store": "redis://user@127.0.0.1:6379/0",
                                              "state.password": "env:REDIS_PW"})),
    ("off-loopback-with-tls", with_(**{"listen.host": "0.0.0.0", "listen.tls": {"cert": "file:c.pem",
                                                                                "key": "file:k.pem"}})),
]


@pytest.mark.parametrize("data", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_valid(data: dict) -> None:
    parse_config(data)


INVALID = [
    # id, data, text the error must contain (where the problem is)
    ("unknown-top-level-key", with_(bogus=1), "bogus"),
    ("unknown-nested-key", with_(**{"listen.hots": "0.0.0.0"}), "listen.hots"),
    ("unknown-client-key", with_(**{"clients.0.scope": ["system/Observation.c"]}), "clients.0.scope"),
    ("typo-in-killswitch", with_(**{"killswitch.scop": "writes"}), "killswitch.scop"),
    ("inline-audit-key", with_(**{"audit.key": "plaintext"}), "audit.key"),
    ("inline-audit-key-long", with_(**{"audit.key": "x" * 40}), "audit.key"),
    ("inline-admin-token", with_(**{"admin.token": "s3cret"}), "admin.token"),
    ("inline-upstream-credentials", with_(**{"clients.0.upstream_credentials": "Bearer abc"}),
     "clients.0.upstream_credentials"),
    ("inline-basic-password", with_(**{"clients.0.upstream_credentials": {
        "type": "basic", "username": "u", "password": "hunter2"}}), "password"),
    ("inline-state-password", with_(**{"state.store": "redis://user:hunter2@127.0.0.1:6379/0"}), "state"),
    ("bad-env-ref", with_(**{"audit.key": "env:1BAD"}), "audit.key"),
    ("bad-vault-ref", with_(**{"audit.key": "vault:secret/data/audit"}), "audit.key"),
    ("no-audit-key", with_(**{"audit.key": ...}), "audit"),
    ("both-audit-key-and-keys", with_(**{"audit.keys": {"k1": "env:K1"}, "audit.active": "k1"}), "audit"),
    ("audit-active-unknown", with_(**{"audit.key": ..., "audit.keys": {"k1": "env:K1"}, "audit.active": "k2"}),
     "audit.active"),
    ("single-with-two-clients", with_(clients=[{"id": "app", "auth": "single"}, client(id="lab")]), "single"),
    ("single-off-loopback", with_(clients=[{"id": "app", "auth": "single"}],
                                  **{"listen.host": "0.0.0.0", "listen.tls": {"cert": "file:c", "key": "file:k"}}),
     "single"),
    ("bad-scope-letters", with_(**{"clients.0.scopes": ["system/Observation.x"]}), "system/Observation.x"),
    ("bad-scope-order", with_(**{"clients.0.scopes": ["system/Observation.rc"]}), "system/Observation.rc"),
    ("bad-scope-context", with_(**{"clients.0.scopes": ["admin/Observation.r"]}), "admin/Observation.r"),
    ("bad-scope-shape", with_(**{"clients.0.scopes": ["Observation.read"]}), "Observation.read"),
    ("non-resource-scope", with_(**{"clients.0.scopes": ["openid"]}), "openid"),
    ("scope-with-space", with_(**{"clients.0.scopes": ["system/Observation.c system/Patient.r"]}), "scope"),
    ("api-key-hash-not-hex", with_(**{"clients.0.api_key_sha256": "z" * 64}), "api_key_sha256"),
    ("api-key-hash-short", with_(**{"clients.0.api_key_sha256": HEX[:63]}), "api_key_sha256"),
    ("api-key-hash-is-the-key", with_(**{"clients.0.api_key_sha256": "demo-writer-key"}), "api_key_sha256"),
    ("api-key-hash-bad-ref", with_(**{"clients.0.api_key_sha256": "vault:no-field"}), "clients.0"),
    ("api-key-without-hash", with_(**{"clients.0.api_key_sha256": ...}), "api_key_sha256"),
    ("hash-on-non-api-key-client", with_(clients=[{"id": "s", "auth": "bearer", "api_key_sha256": HEX}]),
     "api_key_sha256"),
    ("shared-api-key-hash", with_(clients=[client(id="a"), client(id="b", api_key_sha256=HEX.upper())]),
     "api_key_sha256"),
    ("duplicate-client-ids", with_(clients=[client(id="a"), client(id="a", api_key_sha256="env:X")]), "unique"),
    ("no-clients", with_(clients=[]), "clients"),
    ("client-id-with-slash", with_(**{"clients.0.id": "a/b"}), "clients.0.id"),
    ("client-id-dot-dot", with_(**{"clients.0.id": ".."}), "clients.0.id"),
    ("client-id-leading-dot", with_(**{"clients.0.id": ".hidden"}), "clients.0.id"),
    ("unknown-auth", with_(**{"clients.0.auth": "password"}), "clients.0.auth"),
    ("operation-without-dollar", with_(**{"clients.0.operations": ["merge"]}), "merge"),
    ("upstream-not-http", with_(**{"upstream.url": "ftp://ehr.example.org/fhir"}), "upstream"),
    ("upstream-relative", with_(**{"upstream.url": "/fhir/R4"}), "upstream"),
    ("upstream-with-credentials", with_(**{"upstream.url": "https://u:p@ehr.example.org/fhir"}), "upstream"),
    ("upstream-with-query", with_(**{"upstream.url": "https://ehr.example.org/fhir?x=1"}), "upstream"),
    ("no-upstream", with_(upstream=...), "upstream"),
    ("fhir-version", with_(**{"fhir.version": "R5"}), "fhir.version"),
    ("max-body-zero", with_(**{"fhir.max_body_bytes": 0}), "fhir.max_body_bytes"),
    ("listen-mode", with_(**{"listen.mode": "tunnel"}), "listen.mode"),
    ("listen-port", with_(**{"listen.port": 70000}), "listen.port"),
    ("off-loopback-without-tls", with_(**{"listen.host": "0.0.0.0"}), "listen.tls"),
    ("admin-off-loopback-without-token", with_(**{"admin.host": "0.0.0.0"}), "admin.token"),
    ("killswitch-scope", with_(**{"killswitch.scope": "reads"}), "killswitch.scope"),
    ("policy-path", with_(**{"policy.path": "fhir/../x"}), "policy.path"),
    ("policy-engine", with_(**{"policy.engine": "allow-all"}), "policy.engine"),
    ("enforce-not-bool", with_(**{"clients.0.enforce": "maybe"}), "clients.0.enforce"),
]


@pytest.mark.parametrize(("data", "text"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid(data: dict, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert text in str(info.value)


def test_error_never_echoes_an_inline_secret() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_(**{"audit.key": "hunter2-very-secret-audit-key-value"}))
    assert "hunter2" not in str(info.value)


def test_every_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_(bogus=1, **{"audit.key": "plaintext", "clients.0.scopes": ["x"]}))
    text = str(info.value)
    assert "bogus" in text and "audit.key" in text and "clients.0" in text


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("upstream: [", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("", "top level must be a mapping"),
        ("upstream: {url: https://e/fhir}\nclients: []\naudit: {key: env:K}\nextra: 1\n", "extra"),
    ],
)
def test_load_config_errors(tmp_path: Path, content: str, text: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert text in str(info.value) and str(p) in str(info.value)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIR_SIDECAR_CONFIG", raising=False)
    with pytest.raises(ConfigError):
        config_path(None)
    assert config_path("a.yaml") == Path("a.yaml")
    monkeypatch.setenv("FHIR_SIDECAR_CONFIG", "/etc/x.yaml")
    assert config_path(None) == Path("/etc/x.yaml")


def test_config_is_immutable() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(Exception):
        cfg.upstream.url = "https://evil.example/fhir"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# `fhir-sidecar config schema`
# --------------------------------------------------------------------------------------------

def test_json_schema_is_generated_from_the_models() -> None:
    schema = json_schema()
    json.dumps(schema)
    assert schema["type"] == "object"
    assert set(schema["required"]) >= {"upstream", "clients", "audit"}
    assert set(schema["properties"]) == set(Config.model_fields)
    defs = schema["$defs"]
    assert defs["Client"]["additionalProperties"] is False  # unknown keys are an error
    assert {"bearer", "api-key", "mtls", "single"} <= set(json.dumps(defs["Client"]["properties"]["auth"]).split('"'))


def test_config_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(json_schema()))
