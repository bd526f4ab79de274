"""Secret references: `env:NAME`, `file:PATH`, `vault:PATH#field`.

Secret-bearing config values are references, never inline values, so a config file can be
committed and shown. Resolution happens once at start-up (or on reload); a failure is a
config error, never a silent empty secret.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

_REF = re.compile(r"^(env|file|vault):(.+)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VAULT = re.compile(r"^[A-Za-z0-9_./-]+#[A-Za-z0-9_.-]+$")

VaultReader = Callable[[str, str], str]


class SecretError(ValueError):
    """A reference that is malformed or cannot be resolved. Never holds the secret."""


class Secret:
    """A resolved secret value whose repr and str never show it."""

    __slots__ = ("_value", "ref")

    def __init__(self, value: str, ref: str) -> None:
        self._value = value
        self.ref = ref

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.ref!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:  # pragma: no cover - identity semantics suffice
        return self is other

    __hash__ = object.__hash__


def check_ref(ref: str) -> str:
    """Validate the *shape* of a reference (no resolution): used by the config models."""
    m = _REF.match(ref)
    if not m:
        raise ValueError(
            "must be a secret reference `env:NAME`, `file:PATH` or `vault:PATH#field`, never an inline value"
        )
    kind, rest = m.groups()
    if kind == "env" and not _ENV_NAME.match(rest):
        raise ValueError(f"`env:` needs an environment variable name, got {rest!r}")
    if kind == "vault" and not _VAULT.match(rest):
        raise ValueError("`vault:` needs PATH#field, e.g. vault:secret/data/ehr/lab#token")
    return ref


def resolve(ref: str, *, base_dir: Path | None = None, vault: VaultReader | None = None) -> Secret:
    """Resolve a reference to its value. `file:` paths are relative to the config file's folder."""
    check_ref(ref)
    kind, rest = ref.split(":", 1)
    if kind == "env":
        value = os.environ.get(rest)
        if value is None or value == "":
            raise SecretError(f"{ref}: environment variable {rest} is not set")
    elif kind == "file":
        path = Path(rest)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise SecretError(f"{ref}: cannot read file ({e.strerror or type(e).__name__})") from None
        if not value:
            raise SecretError(f"{ref}: file is empty")
    else:
        if vault is None:
            raise SecretError(f"{ref}: a vault reference needs the `vault` section configured")
        path_part, field = rest.split("#", 1)
        try:
            value = vault(path_part, field)
        except SecretError:
            raise
        except Exception as e:  # never chain: the cause may carry the secret or the token
            raise SecretError(f"{ref}: vault read failed ({type(e).__name__})") from None
    return Secret(value, ref)
