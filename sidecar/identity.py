"""Identify: which configured client sent this request, proven by what it presented.

Every credential presented must verify; two credentials in one request are refused (which
one would the EHR believe?). The client's self-description (tenant headers, tags) is never
used: a client is what its credential proves.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace

from sidecar.config import Client, Config
from sidecar.errors import unauthenticated
from sidecar.scopes import ScopeSet
from sidecar.tokens import InvalidToken, TokenVerifier


@dataclass(frozen=True, slots=True)
class Principal:
    client_id: str | None            # None: anonymous, only for public interactions
    auth: str
    scopes: ScopeSet
    contexts: tuple[str, ...] = ("system",)
    tenant: str | None = None
    enforce: bool = True
    operations: frozenset[str] = frozenset()
    conditional_writes: bool = False
    user: str | None = None
    patient: str | None = None


ANONYMOUS = Principal(None, "none", ScopeSet(()), ())


def principal_for(client: Client) -> Principal:
    return Principal(
        client_id=client.id,
        auth=client.auth,
        scopes=ScopeSet.from_strings(client.scopes),
        contexts=("system",),
        tenant=client.tenant,
        enforce=client.enforce,
        operations=frozenset(client.operations),
        conditional_writes=client.conditional_writes,
    )


class Identities:
    """The client registry, built once per config load (api-key hashes already resolved)."""

    def __init__(self, cfg: Config, api_key_hashes: dict[str, str], tokens: TokenVerifier | None = None) -> None:
        self._tokens = tokens
        self._bearer = {c.id: c for c in cfg.clients if c.auth == "bearer"}
        self._mtls = {c.id: principal_for(c) for c in cfg.clients if c.auth == "mtls"}
        self._api_keys: list[tuple[bytes, Principal]] = []
        self._single: Principal | None = None
        for c in cfg.clients:
            if c.auth == "api-key":
                self._api_keys.append((bytes.fromhex(api_key_hashes[c.id]), principal_for(c)))
            elif c.auth == "single":
                self._single = principal_for(c)

    async def identify(self, headers: dict[str, str], *, public: bool) -> Principal:
        """`headers`: the request's single-valued headers (duplicates were refused by parse)."""
        api_key = headers.get("x-api-key")
        authorization = headers.get("authorization")
        peer = headers.get("mtls")
        if sum(x is not None for x in (api_key, authorization, peer)) > 1:
            raise unauthenticated("two different credentials in one request", token_sent=authorization is not None)
        if peer is not None:
            if peer.startswith("!"):
                raise unauthenticated(peer[1:])
            found_peer = self._mtls.get(peer)
            if found_peer is None:
                raise unauthenticated("client certificate names no configured mtls client")
            return found_peer
        if authorization is not None:
            return await self._bearer_principal(authorization)
        if api_key is not None:
            digest = hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).digest()
            found: list[Principal] = []
            for expected, principal in self._api_keys:
                # compare against every entry: timing does not reveal which one matched
                if hmac.compare_digest(digest, expected):
                    found.append(principal)
            if len(found) != 1:  # none, or a key shared by two clients: which one is it?
                raise unauthenticated("unknown API key" if not found else "ambiguous API key")
            return found[0]
        if self._single is not None:
            return self._single
        if public:
            return ANONYMOUS
        raise unauthenticated("no credentials")

    async def _bearer_principal(self, authorization: str) -> Principal:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or self._tokens is None:
            # a credential we cannot verify is refused, never passed on
            raise unauthenticated("the token cannot be verified", token_sent=True)
        try:
            claims = await self._tokens.verify(token.strip())
        except InvalidToken as e:
            raise unauthenticated(e.reason, token_sent=True) from None
        client = self._bearer.get(claims.client_id)
        if client is None:
            raise unauthenticated("token names no configured bearer client", token_sent=True)
        base = principal_for(client)
        # a token never widens the client's configured ceiling
        scopes = ScopeSet.from_strings(claims.scopes).intersect(base.scopes)
        contexts = ["system"]
        if claims.fhir_user:
            contexts.append("user")
        if claims.patient:
            contexts.append("patient")
        return replace(base, scopes=scopes, contexts=tuple(contexts), user=claims.fhir_user, patient=claims.patient)
