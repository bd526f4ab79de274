"""Tamper-evident audit trail: HMAC-chained JSON Lines with group commit."""

from .record import derive_key, pseudonym
from .verify import VerifyResult, verify_files
from .writer import AuditUnavailable, AuditWriter

__all__ = [
    "AuditUnavailable",
    "AuditWriter",
    "VerifyResult",
    "derive_key",
    "pseudonym",
    "verify_files",
]
