"""`approvals:` config: DESIGN's `{release_credentials, ttl_s}` plus reviewers, rules and limits.

    approvals:
      release_credentials: vault:secret/data/ehr/release#token   # EHR credential released writes go out under
      ttl_s: 86400                   # a held write not decided within this expires (never released)
      keep_s: 604800                 # decided items stay pollable (status URL) this long
      alert_after_s: 3600            # an item pending longer raises a `review_overdue` alert
      max_pending: 1000              # more pending holds than this: new holds are refused 503
      session_ttl_s: 28800           # reviewer web session lifetime (absolute)
      default_roles: [reviewer]      # roles that may decide an item no rule matches
      rules:                         # first match wins; an empty selector matches everything
        - {resource_types: [MedicationRequest], roles: [pharmacist], four_eyes: true}
      reviewers:
        - id: Practitioner/7         # what `context.approvals` and the audit `reviewer` field carry
          name: Dr. Seven            # shown on the page (optional)
          roles: [reviewer, pharmacist]
          password_hash: "scrypt$16384$8$1$<salt b64>$<hash b64>"   # `fhir-sidecar approvals hash-password`
        - id: ops-1
          roles: [reviewer]
          password_sha256: env:OPS1_PASSWORD_SHA256   # hex sha256 (or a reference to it): high-entropy passwords only
          oidc_sub: "1234-abcd"      # reserved: OIDC bearer login for reviewers (not in this build)

A reviewer id must never equal a client id (`check_reviewers_against_clients`): the requesting
client can never approve its own write, by construction and again at decision time.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from sidecar.secretrefs import check_ref

SecretRef = Annotated[str, AfterValidator(check_ref)]

# No ':' (HTTP Basic user-id), no whitespace; '/' allowed so FHIR references (Practitioner/7) fit.
REVIEWER_ID = r"^[A-Za-z0-9][A-Za-z0-9._@/-]{0,127}$"
ROLE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_REF_PREFIXES = ("env:", "file:", "vault:")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdefABCDEF" for c in s)


class Reviewer(_Model):
    id: str = Field(pattern=REVIEWER_ID, description="reviewer identity (audit `reviewer`, `context.approvals`)")
    name: str | None = Field(None, max_length=128, description="display name on the review page")
    roles: list[Annotated[str, Field(pattern=ROLE)]] = Field(default_factory=lambda: ["reviewer"])
    password_sha256: str | None = Field(
        None, description="hex SHA-256 of a high-entropy password, or a secret reference to it")
    password_hash: str | None = Field(
        None, description="scrypt$N$r$p$salt$hash (see `fhir-sidecar approvals hash-password`), or a secret reference")
    oidc_sub: str | None = Field(None, max_length=255, description="reserved: OIDC subject for bearer login")

    @model_validator(mode="after")
    def _credentials(self) -> Reviewer:
        if self.password_sha256 is not None and self.password_hash is not None:
            raise ValueError(f"reviewer {self.id}: give one of password_sha256 / password_hash, not both")
        if self.password_sha256 is None and self.password_hash is None and self.oidc_sub is None:
            raise ValueError(f"reviewer {self.id}: needs password_hash, password_sha256 or oidc_sub")
        h = self.password_sha256
        if h is not None:
            if h.startswith(_REF_PREFIXES):
                check_ref(h)
            elif not _is_hex64(h):
                raise ValueError(f"reviewer {self.id}: password_sha256 must be 64 hex characters or a secret reference")
        p = self.password_hash
        if p is not None:
            if p.startswith(_REF_PREFIXES):
                check_ref(p)
            else:
                from sidecar.approvals.passwords import parse_scrypt

                try:
                    parse_scrypt(p)
                except ValueError as e:
                    raise ValueError(f"reviewer {self.id}: password_hash: {e}") from None
        if not self.roles:
            raise ValueError(f"reviewer {self.id}: needs at least one role")
        return self


class ReviewRule(_Model):
    """Who may decide which held writes, and whether two distinct reviewers must approve."""

    resource_types: list[str] = Field(default_factory=list, description="empty: any type")
    interactions: list[str] = Field(default_factory=list, description="empty: any interaction")
    clients: list[str] = Field(default_factory=list, description="empty: any client")
    roles: list[Annotated[str, Field(pattern=ROLE)]] = Field(min_length=1, description="any one of these may decide")
    four_eyes: bool = Field(False, description="two distinct reviewers must approve")


class ApprovalsConfig(_Model):
    release_credentials: SecretRef | None = Field(
        None, description="EHR credential released writes are forwarded under (shorthand: Bearer <value>)")
    ttl_s: int = Field(86_400, gt=0, le=30 * 86_400, description="a held write expires undecided after this")
    keep_s: int = Field(7 * 86_400, gt=0, le=90 * 86_400, description="decided items stay pollable this long")
    alert_after_s: int | None = Field(3_600, gt=0, description="alert when an item waits longer (None: never)")
    max_pending: int = Field(1_000, gt=0, le=10_000, description="more pending holds are refused (503)")
    session_ttl_s: int = Field(8 * 3_600, gt=60, le=86_400, description="reviewer web session lifetime")
    release_lease_s: int = Field(300, gt=0, description="an approved write not released within this is retried")
    default_roles: list[Annotated[str, Field(pattern=ROLE)]] = Field(default_factory=lambda: ["reviewer"], min_length=1)
    rules: list[ReviewRule] = Field(default_factory=list)
    reviewers: list[Reviewer] = Field(default_factory=list)
    login_failures: int = Field(10, gt=0, description="failed logins per reviewer before a lock-out")
    lockout_s: int = Field(300, gt=0)

    @model_validator(mode="after")
    def _unique(self) -> ApprovalsConfig:
        ids = [r.id for r in self.reviewers]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"reviewer ids must be unique: {', '.join(dupes)}")
        subs = [r.oidc_sub for r in self.reviewers if r.oidc_sub]
        if len(set(subs)) != len(subs):
            raise ValueError("two reviewers share one oidc_sub")
        return self

    def rule_for(self, resource_type: str | None, interaction: str | None, client_id: str | None) -> ReviewRule:
        for r in self.rules:
            if r.resource_types and resource_type not in r.resource_types:
                continue
            if r.interactions and interaction not in r.interactions:
                continue
            if r.clients and client_id not in r.clients:
                continue
            return r
        return ReviewRule(roles=list(self.default_roles), four_eyes=False)


def check_reviewers_against_clients(cfg: ApprovalsConfig, client_ids: list[str]) -> None:
    """For `Config`'s cross-checks: a reviewer id equal to a client id is refused."""
    clash = sorted({r.id for r in cfg.reviewers} & set(client_ids))
    if clash:
        raise ValueError(f"reviewer ids must not be client ids (a client never approves its own write): {', '.join(clash)}")
