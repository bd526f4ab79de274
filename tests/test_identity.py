"""identify: which configured client sent the request (pure; no network)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from sidecar.config import parse_config
from sidecar.errors import WWW_AUTHENTICATE, Refusal
from sidecar.identity import ANONYMOUS, Identities, Principal

WRITER_KEY = "writer-key-1"
READER_KEY = "reader-key-1"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(*clients: dict):
    return parse_config({
        "upstream": {"url": "https://ehr.example.org/fhir/R4"},
        "audit": {"key": "env:FHIR_SIDECAR_AUDIT_KEY"},
        "identity": {"jwks": "file:jwks.json", "issuer": "https://auth.example.org", "audience": "https://ehr.example.org/fhir/R4"},
        "clients": list(clients),
    })


API_CLIENTS = (
    {"id": "writer", "auth": "api-key", "api_key_sha256": sha(WRITER_KEY), "scopes": ["system/Observation.cu"],
     "tenant": "clinic-a", "operations": ["$merge"], "conditional_writes": True},
    {"id": "reader", "auth": "api-key", "api_key_sha256": "env:READER_KEY_SHA256", "scopes": ["system/*.rs"],
     "enforce": False},
    {"id": "scribe", "auth": "bearer", "scopes": ["patient/Observation.c"]},
)


@pytest.fixture(scope="module")
def ids() -> Identities:
    # secret references are resolved before Identities is built: here, the reader's hash
    hashes = {"writer": sha(WRITER_KEY), "reader": sha(READER_KEY)}
    return Identities(config(*API_CLIENTS), hashes)


@pytest.fixture(scope="module")
def single() -> Identities:
    return Identities(config({"id": "the-app", "auth": "single", "scopes": ["system/Observation.crus"]}), {})


def refused(identities: Identities, headers: dict, public: bool = False) -> Refusal:
    with pytest.raises(Refusal) as info:
        asyncio.run(identities.identify(headers, public=public))
    return info.value


def challenge(r: Refusal) -> str:
    values = [v for k, v in r.headers if k.lower() == "www-authenticate"]
    assert len(values) == 1
    return values[0]


@pytest.mark.parametrize(
    ("headers", "public", "client_id"),
    [
        ({"x-api-key": WRITER_KEY}, False, "writer"),
        ({"x-api-key": READER_KEY}, False, "reader"),
        ({"x-api-key": WRITER_KEY}, True, "writer"),  # a public request with a key is still that client
        ({}, True, None),
    ],
)
def test_identified(ids: Identities, headers: dict, public: bool, client_id: str | None) -> None:
    assert asyncio.run(ids.identify(headers, public=public)).client_id == client_id


def test_principal_carries_the_client_settings(ids: Identities) -> None:
    p = asyncio.run(ids.identify({"x-api-key": WRITER_KEY}, public=False))
    assert (p.auth, p.tenant, p.enforce, p.operations, p.conditional_writes, p.contexts) == (
        "api-key", "clinic-a", True, frozenset({"$merge"}), True, ("system",))
    assert p.scopes.grants("Observation", "cu") and not p.scopes.grants("Observation", "d")
    r = asyncio.run(ids.identify({"x-api-key": READER_KEY}, public=False))
    assert (r.enforce, r.operations, r.conditional_writes) == (False, frozenset(), False)


def test_anonymous_only_for_public(ids: Identities) -> None:
    p = asyncio.run(ids.identify({}, public=True))
    assert p is ANONYMOUS and p.client_id is None and len(p.scopes) == 0


REFUSED = [
    # id, headers, public, reason, token_sent
    ("missing", {}, False, "no credentials", False),
    ("bad-key", {"x-api-key": "wrong"}, False, "unknown API key", False),
    ("bad-key-public", {"x-api-key": "wrong"}, True, "unknown API key", False),
    ("empty-key", {"x-api-key": ""}, False, "unknown API key", False),
    ("key-case-matters", {"x-api-key": WRITER_KEY.upper()}, False, "unknown API key", False),
    ("key-with-space", {"x-api-key": WRITER_KEY + " "}, False, "unknown API key", False),
    ("hash-is-not-the-key", {"x-api-key": sha(WRITER_KEY)}, False, "unknown API key", False),
    ("bearer-unverifiable", {"authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}, False,
     "the token cannot be verified", True),
    ("bearer-unverifiable-public", {"authorization": "Bearer x"}, True, "the token cannot be verified", True),
    ("basic-auth", {"authorization": "Basic d3JpdGVyOmtleQ=="}, False, "the token cannot be verified", True),
    ("two-credentials", {"x-api-key": WRITER_KEY, "authorization": "Bearer x"}, False,
     "two different credentials in one request", True),
    ("two-credentials-public", {"x-api-key": WRITER_KEY, "authorization": "Bearer x"}, True,
     "two different credentials in one request", True),
]


@pytest.mark.parametrize(("headers", "public", "reason", "token_sent"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_refused(ids: Identities, headers: dict, public: bool, reason: str, token_sent: bool) -> None:
    r = refused(ids, headers, public)
    assert (r.status, r.code, r.reason) == (401, "login", reason)
    expected = WWW_AUTHENTICATE + (', error="invalid_token"' if token_sent else "")
    assert challenge(r) == expected
    assert challenge(r).startswith('Bearer realm="fhir-sidecar"')
    for v in headers.values():
        if v:
            assert v not in r.reason


@pytest.mark.parametrize(
    ("headers", "public", "expected"),
    [
        ({}, False, "the-app"),
        ({}, True, "the-app"),
    ],
)
def test_single_client(single: Identities, headers: dict, public: bool, expected: str) -> None:
    p = asyncio.run(single.identify(headers, public=public))
    assert (p.client_id, p.auth) == (expected, "single")
    assert p.scopes.grants("Observation", "crus")


@pytest.mark.parametrize(
    ("headers", "token_sent"),
    [
        ({"x-api-key": WRITER_KEY}, False),     # no api-key clients: every key is unknown
        ({"authorization": "Bearer x"}, True),  # a credential presented must verify, even for `single`
        ({"x-api-key": "k", "authorization": "Bearer x"}, True),
    ],
)
def test_single_client_presented_credentials_must_verify(single: Identities, headers: dict, token_sent: bool) -> None:
    r = refused(single, headers)
    assert r.status == 401
    assert ('error="invalid_token"' in challenge(r)) is token_sent


def test_bearer_clients_are_not_identified_in_this_build(ids: Identities) -> None:
    r = refused(ids, {"authorization": "Bearer scribe-token"})
    assert r.status == 401 and 'error="invalid_token"' in challenge(r)


def test_a_key_shared_by_two_clients_identifies_neither() -> None:
    """Config refuses two literal equal hashes; references resolved to the same hash are ambiguous too."""
    cfg = config({"id": "a", "auth": "api-key", "api_key_sha256": "env:A_SHA"},
                 {"id": "b", "auth": "api-key", "api_key_sha256": "env:B_SHA"})
    shared = Identities(cfg, {"a": sha("same"), "b": sha("same")})
    r = refused(shared, {"x-api-key": "same"})
    assert (r.status, r.reason) == (401, "ambiguous API key")


def test_principal_is_immutable(ids: Identities) -> None:
    p = asyncio.run(ids.identify({"x-api-key": WRITER_KEY}, public=False))
    assert isinstance(p, Principal)
    with pytest.raises(AttributeError):
        p.client_id = "other"  # type: ignore[misc]
