"""Refusals: every status the sidecar answers itself, and the one OperationOutcome builder.

A stage that refuses a request returns (or raises) a `Refusal`; the adapter turns it into a
response with `outcome_response`. Reasons are fixed phrases chosen by the sidecar (never an
echo of request content), so they are safe to log and audit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# status -> (FHIR issue code, severity) defaults; tables over branches.
_DEFAULT_CODE: dict[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    502: "transient",
    503: "transient",
    504: "timeout",
}

WWW_AUTHENTICATE = 'Bearer realm="fhir-sidecar"'


@dataclass(frozen=True)
class Refusal(Exception):
    """The sidecar answers the request itself; nothing goes upstream."""

    status: int
    reason: str
    code: str = ""
    headers: tuple[tuple[str, str], ...] = field(default=())
    decision: str = "deny"

    def __post_init__(self) -> None:
        if not self.code:
            object.__setattr__(self, "code", _DEFAULT_CODE.get(self.status, "exception"))

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def deny(reason: str) -> Refusal:
    return Refusal(403, reason)


def bad_request(reason: str, code: str = "invalid") -> Refusal:
    return Refusal(400, reason, code)


def unauthenticated(reason: str, token_sent: bool = False) -> Refusal:
    challenge = WWW_AUTHENTICATE + (', error="invalid_token"' if token_sent else "")
    return Refusal(401, reason, "login", (("WWW-Authenticate", challenge),))


def unavailable(reason: str, retry_after_s: int | None = None) -> Refusal:
    headers = (("Retry-After", str(retry_after_s)),) if retry_after_s is not None else ()
    return Refusal(503, reason, "transient", headers, decision="error")


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_body(refusal: Refusal, correlation_id: str) -> bytes:
    diag = f"{refusal.reason} (correlation id {correlation_id})"
    severity = "information" if refusal.status < 300 else "error"
    return json.dumps(operation_outcome(refusal.code, diag, severity), separators=(",", ":")).encode()
