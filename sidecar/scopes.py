"""SMART App Launch scope grammar (v1 and v2) and scope-set ceilings. Pure: no I/O.

Fail-closed rules:
- malformed resource scopes grant nothing (``parse_scopes`` drops them);
- a scope with v2 qualifiers (``?category=...``) grants nothing until qualifier evaluation exists;
- ``ScopeSet.intersect`` can only narrow: the effective set never grants what either side does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = ["CONTEXTS", "LETTERS", "NON_RESOURCE_SCOPES", "Scope", "ScopeSet", "parse_scope", "parse_scopes"]

CONTEXTS: frozenset[str] = frozenset({"patient", "user", "system"})
LETTERS = "cruds"  # canonical v2 order
NON_RESOURCE_SCOPES: frozenset[str] = frozenset({
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
    "offline_access", "online_access",
})
_V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(LETTERS)}

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_LETTERS_RE = re.compile(r"^c?r?u?d?s?$")
_PARAM_RE = re.compile(r"^[a-z][a-z0-9_:.-]*$")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SHAPE_RE = re.compile(r"^(?P<ctx>[^/]*)/(?P<type>[^.]*)\.(?P<perm>[^?]*)(?:\?(?P<qual>.*))?$", re.S)
# Characters left readable when rendering qualifier values (token/URL system values); "&", "=", "?",
# "%" and whitespace are always percent-encoded so the rendered form re-parses to the same value.
_QUOTE_SAFE = ":/|-._~,"


def _render(context: str, resource_type: str, letters: frozenset[str], qualifiers: tuple[tuple[str, str], ...]) -> str:
    text = f"{context}/{resource_type}.{''.join(c for c in LETTERS if c in letters)}"
    if qualifiers:
        text += "?" + "&".join(f"{p}={quote(v, safe=_QUOTE_SAFE)}" for p, v in qualifiers)
    return text


@dataclass(frozen=True, slots=True)
class Scope:
    context: str
    resource_type: str
    letters: frozenset[str]
    qualifiers: tuple[tuple[str, str], ...]
    raw: str

    def __post_init__(self) -> None:
        # Direct construction must not smuggle in states the parser would reject.
        if self.context not in CONTEXTS:
            raise ValueError(f"scope context must be one of patient, user, system; got {self.context!r}")
        if self.resource_type != "*" and not _TYPE_RE.match(self.resource_type):
            raise ValueError(f"invalid resource type {self.resource_type!r}")
        if not self.letters or not self.letters <= frozenset(LETTERS):
            raise ValueError(f"scope letters must be a non-empty subset of c,r,u,d,s; got {sorted(self.letters)}")

    @property
    def key(self) -> tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]:
        """Identity without ``raw``: ``.read`` and ``.rs`` are the same grant."""
        return (self.context, self.resource_type, self.letters, self.qualifiers)

    def to_v2(self) -> str:
        return _render(self.context, self.resource_type, self.letters, self.qualifiers)


def _parse_letters(perm: str, text: str, has_qualifiers: bool) -> frozenset[str]:
    if perm in _V1:
        if has_qualifiers:
            raise ValueError(f"scope {text!r}: qualifiers need v2 letters (e.g. '.rs?...'), not '.{perm}'")
        return _V1[perm]
    if not perm:
        raise ValueError(f"scope {text!r}: no permissions after '.'; use letters from 'cruds' or read/write/*")
    unknown = sorted(set(perm) - set(LETTERS))
    if unknown:
        raise ValueError(f"scope {text!r}: unknown permission {perm!r}; use letters from 'cruds' or read/write/*")
    if len(set(perm)) != len(perm):
        raise ValueError(f"scope {text!r}: repeated permission letters in {perm!r}")
    if not _LETTERS_RE.match(perm):
        raise ValueError(f"scope {text!r}: letters {perm!r} must appear in the order c,r,u,d,s")
    return frozenset(perm)


def _parse_qualifiers(qual: str, text: str) -> tuple[tuple[str, str], ...]:
    if not qual:
        raise ValueError(f"scope {text!r}: empty qualifier after '?'; remove '?' or add param=value")
    out: list[tuple[str, str]] = []
    for part in qual.split("&"):
        param, sep, value = part.partition("=")
        if not sep or not _PARAM_RE.match(param):
            raise ValueError(f"scope {text!r}: qualifier {part!r} must be param=value with a lower-case param name")
        if not value or "=" in value or "?" in value:
            raise ValueError(f"scope {text!r}: qualifier {param!r} needs one non-empty value (percent-encode '=', '?')")
        if _BAD_PERCENT.search(value):
            raise ValueError(f"scope {text!r}: qualifier {param!r} has a malformed percent-escape")
        out.append((param, unquote(value)))
    return tuple(out)


def parse_scope(text: str) -> Scope:
    """Parse one SMART resource scope; raise ``ValueError`` saying what to fix."""
    if not isinstance(text, str):
        raise ValueError(f"scope must be a string, got {type(text).__name__}")
    if text in NON_RESOURCE_SCOPES or text.startswith("launch/"):
        raise ValueError(f"{text!r} is not a resource scope (identity/launch/refresh scopes grant no data access)")
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"scope {text!r} is empty or contains whitespace; pass one scope per item")
    m = _SHAPE_RE.match(text)
    if m is None:
        raise ValueError(f"scope {text!r} must look like 'system/Observation.rs' (context/Type.permissions)")
    ctx, rtype, perm, qual = m["ctx"], m["type"], m["perm"], m["qual"]
    if ctx not in CONTEXTS:
        raise ValueError(f"scope {text!r}: unknown context {ctx!r}; use patient, user or system")
    if rtype != "*" and not _TYPE_RE.match(rtype):
        raise ValueError(f"scope {text!r}: resource type {rtype!r} must be a FHIR type name like 'Observation' or '*'")
    letters = _parse_letters(perm, text, qual is not None)
    qualifiers = _parse_qualifiers(qual, text) if qual is not None else ()
    return Scope(ctx, rtype, letters, qualifiers, text)


def parse_scopes(
    texts: Iterable[str] | str, *, on_error: Callable[[str, ValueError], None] | None = None
) -> tuple[Scope, ...]:
    """Parse a space-separated string or an iterable; malformed scopes are dropped (optionally reported).

    Non-resource scopes (openid, fhirUser, launch…, offline_access…) are skipped silently. Duplicates
    (same grant, e.g. ``.read`` and ``.rs``) are collapsed, first occurrence wins.
    """
    items = texts.split() if isinstance(texts, str) else list(texts)
    seen: set[tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]] = set()
    out: list[Scope] = []
    for item in items:
        if isinstance(item, str) and (item in NON_RESOURCE_SCOPES or item.startswith("launch/")):
            continue
        try:
            scope = parse_scope(item)
        except ValueError as err:
            if on_error is not None:
                on_error(str(item), err)
            continue
        if scope.key not in seen:
            seen.add(scope.key)
            out.append(scope)
    return tuple(out)


class ScopeSet:
    """An immutable set of parsed scopes answering "is this interaction granted?"."""

    __slots__ = ("_scopes",)

    def __init__(self, scopes: Iterable[Scope]) -> None:
        seen: set[tuple[str, str, frozenset[str], tuple[tuple[str, str], ...]]] = set()
        kept: list[Scope] = []
        for scope in scopes:
            if not isinstance(scope, Scope):
                raise TypeError(f"ScopeSet takes Scope objects, got {type(scope).__name__}")
            if scope.key not in seen:
                seen.add(scope.key)
                kept.append(scope)
        self._scopes: tuple[Scope, ...] = tuple(kept)

    @classmethod
    def from_strings(cls, texts: Iterable[str] | str) -> ScopeSet:
        return cls(parse_scopes(texts))

    def missing(
        self, resource_type: str, letters: Iterable[str], *, contexts: Iterable[str] = ("system",)
    ) -> frozenset[str]:
        """Required letters that no unqualified scope in ``contexts`` grants for ``resource_type``."""
        required = frozenset(letters)
        ctxs = frozenset(contexts) if not isinstance(contexts, str) else frozenset({contexts})
        granted: set[str] = set()
        for s in self._scopes:
            # Qualified scopes are skipped: granting them would ignore their restriction (fail closed).
            if s.qualifiers or s.context not in ctxs:
                continue
            if s.resource_type == resource_type or s.resource_type == "*":
                granted |= s.letters
        return required - granted

    def grants(
        self, resource_type: str, letters: Iterable[str], *, contexts: Iterable[str] = ("system",)
    ) -> bool:
        """True iff every required letter is granted; an empty letter set is always granted."""
        return not self.missing(resource_type, letters, contexts=contexts)

    def intersect(self, ceiling: ScopeSet) -> ScopeSet:
        """Effective scopes = token ∩ client ceiling. Narrowing only: letters ∩, qualifiers ∪, type the more specific."""
        out: list[Scope] = []
        for t in self._scopes:
            for c in ceiling._scopes:
                if t.context != c.context:
                    continue
                if t.resource_type == c.resource_type or c.resource_type == "*":
                    rtype = t.resource_type
                elif t.resource_type == "*":
                    rtype = c.resource_type
                else:
                    continue
                letters = t.letters & c.letters
                if not letters:
                    continue
                quals = t.qualifiers + tuple(q for q in c.qualifiers if q not in t.qualifiers)
                out.append(Scope(t.context, rtype, letters, quals, _render(t.context, rtype, letters, quals)))
        return ScopeSet(out)

    def as_strings(self) -> tuple[str, ...]:
        """Sorted canonical v2 strings: stable across token scope order, for logs and audit."""
        return tuple(sorted({s.to_v2() for s in self._scopes}))

    def __iter__(self) -> Iterator[Scope]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScopeSet) and {s.key for s in self} == {s.key for s in other}

    def __hash__(self) -> int:
        return hash(frozenset(s.key for s in self._scopes))

    def __repr__(self) -> str:
        return f"ScopeSet({list(self.as_strings())!r})"
