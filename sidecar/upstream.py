"""The sidecar's own upstream client for writes: timeouts that work, and honest outcomes.

mitmproxy has no upstream read timeout, and answers an unreachable or untrusted EHR with its
own HTML 502. Writes therefore leave through this client (httpx, keep-alive pool, the same TLS
trust): a connect failure means nothing was sent (the write `failed`); a timeout or a broken
answer after the request went out means the outcome is `unknown` (504), and a write is never
retried. Reads stay on mitmproxy's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hashlib

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade"})


class NotSent(Exception):
    """The EHR could not be reached (or its certificate was not trusted): nothing was sent."""


class OutcomeUnknown(Exception):
    """The request may have reached the EHR, but no complete answer came back in time."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def spki_sha256(cert_der: bytes) -> str:
    """hex SHA-256 of a certificate's SubjectPublicKeyInfo (the pin format of upstream.spki_sha256)."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


class PinMismatch(Exception):
    pass


def pin_checker(pins: frozenset[str]) -> Any:
    """An httpcore trace hook: after the TLS handshake and *before* a byte of the request is sent,
    the EHR's certificate must carry one of the pinned keys; otherwise the connection is dropped."""
    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.start_tls.complete":
            stream = info.get("return_value")
            ssl_obj = stream.get_extra_info("ssl_object") if stream is not None else None
            der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
            if not der or spki_sha256(der) not in pins:
                raise PinMismatch("EHR certificate key is not pinned")
    return trace


class UpstreamClient:
    def __init__(self, *, verify: Any = True, timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 pins: frozenset[str] = frozenset()) -> None:
        self._extensions = {"trace": pin_checker(pins)} if pins else {}
        self._client = httpx.AsyncClient(
            verify=verify, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
            limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=30),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        try:
            req = self._client.build_request(method, url, headers=headers, content=body or None,
                                             extensions=self._extensions)
            resp = await self._client.send(req, stream=True)
        except PinMismatch as e:
            raise NotSent(str(e)) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
            raise NotSent(type(e).__name__) from None
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise OutcomeUnknown(type(e).__name__) from None
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_raw():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise OutcomeUnknown("response too large")
                chunks.append(chunk)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise OutcomeUnknown(type(e).__name__) from None
        finally:
            await resp.aclose()
        out = tuple((k, v) for k, v in resp.headers.multi_items() if k.lower() not in HOP_BY_HOP)
        return Answer(resp.status_code, out, b"".join(chunks))
