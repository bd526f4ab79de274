"""The `engine: opa` path: decisions from an OPA server's Data API (opa-python-client, async).

`POST {opa_url}/v1/data/<policy.path>/decision` with `{"input": ...}`. Anything but a defined
`{"allow": bool, "reasons": [...]}` result within `timeout_ms` raises `PolicyEvalError`, which
the pipeline answers with 503 (fail closed). No retries: a retry would only spend the budget.

`revision` is the hash of the local policy directory when one is given (the same value the
embedded engine reports for it, so audit records line up), else "opa:<url>" until
`sync_revision()` has hashed the server's `/v1/policies`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from opa_client.opa_async import AsyncOpaClient

from sidecar.policy.embedded import PolicyEvalError, PolicyLoadError, policy_revision

__all__ = ["OpaPolicy"]


class OpaPolicy:
    engine = "opa"

    def __init__(self, opa_url: str, path: str, *, timeout_ms: int = 200, directory: Path | None = None,
                 token: str | None = None) -> None:
        parts = urlsplit(opa_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyLoadError(f"policy.opa_url {opa_url!r} is not an http(s) URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise PolicyLoadError("policy.opa_url must be scheme://host[:port] (no path, query or credentials)")
        if not 0 < timeout_ms <= 60_000:
            raise PolicyLoadError("policy.timeout_ms must be within 1..60000")
        self.opa_url = f"{parts.scheme}://{parts.netloc}"
        self.path = path.strip("/")
        self.query = "data." + self.path.replace("/", ".") + ".decision"
        self.timeout_s = timeout_ms / 1000
        self.directory = directory
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = parts.scheme == "https"
        self._token = token
        self.revision = policy_revision(directory) if directory is not None else f"opa:{self.opa_url}"
        self._client: AsyncOpaClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def load(cls, opa_url: str, path: str, *, timeout_ms: int = 200, directory: Path | None = None,
             token: str | None = None) -> OpaPolicy:
        return cls(opa_url, path, timeout_ms=timeout_ms, directory=directory, token=token)

    def reload(self) -> OpaPolicy:
        """A new engine with the same settings (re-hashes the local policy directory)."""
        return type(self)(self.opa_url, self.path, timeout_ms=round(self.timeout_s * 1000),
                          directory=self.directory, token=self._token)

    async def decide(self, input_doc: dict[str, Any]) -> dict[str, Any]:
        client = await self._client_for_loop()
        package, _, rule = ("/" + self.path + "/decision").rpartition("/")
        try:
            body = await asyncio.wait_for(
                client.query_rule(input_data=input_doc, package_path=package.strip("/"), rule_name=rule),
                timeout=self.timeout_s,
            )
        except TimeoutError:
            raise PolicyEvalError(f"OPA did not answer within {round(self.timeout_s * 1000)} ms") from None
        except Exception as e:  # connection refused, HTTP error status, bad JSON, ...
            raise PolicyEvalError(f"OPA request failed: {type(e).__name__}") from None
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyEvalError(f"{self.query} is undefined on OPA")
        decision = body["result"]
        if (not isinstance(decision, dict) or not isinstance(decision.get("allow"), bool)
                or not isinstance(decision.get("reasons", []), list)):
            raise PolicyEvalError(f"{self.query} is not {{allow: bool, reasons: [...]}}")
        return decision

    async def sync_revision(self) -> str:
        """Without a local directory: the revision becomes a hash of the server's policies."""
        if self.directory is not None:
            return self.revision
        client = await self._client_for_loop()

        async def fetch() -> Any:
            async with client._request("GET", f"{client.root_url}/policies") as response:
                response.raise_for_status()
                return await response.json()

        try:
            body = await asyncio.wait_for(fetch(), timeout=max(self.timeout_s, 2.0))
        except Exception as e:
            raise PolicyEvalError(f"OPA /v1/policies failed: {type(e).__name__}") from None
        modules = sorted((str(p.get("id")), str(p.get("raw"))) for p in body.get("result", []) if isinstance(p, dict))
        digest = hashlib.sha256(json.dumps(modules).encode()).hexdigest()[:16]
        self.revision = f"opa:{digest}"
        return self.revision

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close_connection()
            self._client = None

    async def _client_for_loop(self) -> AsyncOpaClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            client = AsyncOpaClient(host=self._host, port=self._port, ssl=self._ssl, token=self._token,
                                    retries=0, timeout=max(math.ceil(self.timeout_s * 1000) / 1000, 0.001))
            await client._init_session()
            self._client, self._loop = client, loop
        return self._client
