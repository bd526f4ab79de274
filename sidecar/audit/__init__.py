"""Tamper-evident audit trail: HMAC-chained JSON Lines with group commit."""

from .checkpoints import print_checkpoint
from .files import chain_files
from .record import AuditUnavailable, derive_key, pseudonym
from .show import format_record, show_records
from .verify import VerifyResult, verify_files
from .writer import AuditStats, AuditWriter

__all__ = [
    "AuditStats",
    "AuditUnavailable",
    "AuditWriter",
    "VerifyResult",
    "chain_files",
    "derive_key",
    "format_record",
    "print_checkpoint",
    "pseudonym",
    "show_records",
    "verify_files",
]
