"""Scopes on concrete resources: qualified v2 scopes and the `patient/` compartment.

Runs after prior state, because a scope check on a write passes only if both the stored
version (`current`) and the result pass: a PUT may not move another patient's resource into
mine, a PATCH may not move one out, a DELETE may not remove another patient's.
"""

from __future__ import annotations

from typing import Any

from sidecar.compartment import (CompartmentViolation, check_patient_context, search_confined,
                                 transaction_fullurl_map)
from sidecar.errors import Refusal, deny
from sidecar.identity import Principal
from sidecar.prior import Prior
from sidecar.request import Classification, Entry, FhirRequest, Requirement, Target

READS = frozenset({"read", "vread", "history-instance"})
SEARCHES = frozenset({"search-type", "search-system", "search-compartment", "history-type", "history-system"})


def _deny_scope(rq: Requirement, what: str) -> None:
    where = "any type" if rq.resource_type == "*" else rq.resource_type
    raise deny(f"scope does not grant '{''.join(sorted(rq.letters, key='cruds'.index))}' on {where} for {what}")


def _check_resources(who: Principal, rq: Requirement, resources: list[dict[str, Any]], interaction: str,
                     rtype: str, rid: str | None, fullurl_map: dict[str, str] | None, upstream_base: str) -> None:
    contexts = [who.scopes.best_context(rq.resource_type, rq.letters, r, available=who.contexts) for r in resources]
    if any(c is None for c in contexts):
        _deny_scope(rq, interaction)
    if "patient" in contexts:
        assert who.patient is not None  # "patient" is only available with a patient claim
        for r in resources:
            try:
                check_patient_context(r, who.patient, resource_type=rtype, resource_id=rid,
                                      fullurl_map=fullurl_map, upstream_base=upstream_base)
            except CompartmentViolation as e:
                raise deny(f"patient context: {e.reason}") from None


def _check_without_resource(who: Principal, rq: Requirement, interaction: str, target: Target,
                            search_query: tuple[tuple[str, str], ...]) -> bool:
    """Returns True when a patient-context read must be confirmed on the response body."""
    ctx = who.scopes.best_context(rq.resource_type, rq.letters, None, available=who.contexts)
    if ctx is None:
        _deny_scope(rq, interaction)
    if ctx != "patient":
        return False
    assert who.patient is not None
    if interaction in SEARCHES:
        if not search_confined(target.resource_type or "*", search_query, who.patient, target.compartment):
            raise deny("patient context: search is not confined to the patient's compartment")
        return False
    if interaction in READS:
        return not (target.resource_type == "Patient" and target.id == who.patient)
    raise deny(f"patient context: {interaction} cannot be confined to the patient")


def check_context(req: FhirRequest, cls: Classification, who: Principal, prior: Prior | None,
                  upstream_base: str) -> bool:
    """Raises a 403 Refusal; returns True when the response must be checked (patient-context read)."""
    if cls.public or not cls.requires:
        return False
    if cls.entries:
        _check_entries(req, cls, who, upstream_base)
        return False
    t = req.target
    query = t.query + (req.body if isinstance(req.body, tuple) else ())
    if cls.is_write:
        new = None
        if not cls.interaction.startswith("delete"):
            new = prior.result if prior is not None and prior.result is not None else req.body
        current = prior.current if prior is not None else None
        resources = [r for r in (new, current) if isinstance(r, dict)]
        if not resources:
            for rq in cls.requires:
                if _check_without_resource(who, rq, cls.interaction, t, query):
                    raise deny("patient context: the resource cannot be checked")
            return False
        for rq in cls.requires:
            _check_resources(who, rq, resources, cls.interaction, t.resource_type or "", t.id, None, upstream_base)
        return False
    return any([_check_without_resource(who, rq, cls.interaction, t, query) for rq in cls.requires])


def _check_entries(req: FhirRequest, cls: Classification, who: Principal, upstream_base: str) -> None:
    fullurls: dict[str, str] | None = None
    if "patient" in who.contexts:
        try:
            fullurls = transaction_fullurl_map(req.body, upstream_base=upstream_base)
        except CompartmentViolation as v:
            raise deny(f"Bundle: {v.reason}") from None
    for e in cls.entries:
        try:
            _check_entry(e, who, upstream_base, fullurls)
        except Refusal as r:
            raise deny(f"Bundle entry {e.index}: {r.reason}") from None


def _check_entry(e: Entry, who: Principal, upstream_base: str, fullurls: dict[str, str] | None) -> None:
    rtype, rid = e.target.resource_type or "", e.target.id
    if e.is_write and e.method == "POST" and e.resource is not None:
        for rq in e.requires:
            _check_resources(who, rq, [e.resource], e.interaction, rtype, rid, fullurls, upstream_base)
        return
    for rq in e.requires:
        # entries have no prior state: a patient-context update, patch or delete inside a Bundle
        # cannot be checked on `current`, so it is refused
        ctx = who.scopes.best_context(rq.resource_type, rq.letters, None, available=who.contexts)
        if e.is_write and (ctx is None or ctx == "patient"):
            if e.resource is None or ctx == "patient":
                _deny_scope(rq, e.interaction) if ctx is None else None
                raise deny("patient context: this entry cannot be checked against the stored version")
            _check_resources(who, rq, [e.resource], e.interaction, rtype, rid, fullurls, upstream_base)
        elif _check_without_resource(who, rq, e.interaction, e.target, e.target.query):
            raise deny("patient context: this entry cannot be checked against the patient")


def read_body_confined(body: bytes, who: Principal, upstream_base: str) -> bool:
    """A patient-context read: every resource in the answer must belong to the context patient."""
    import json

    if who.patient is None:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    resources = [doc]
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        resources = [e.get("resource") for e in doc.get("entry") or [] if isinstance(e, dict) and e.get("resource")]
    for r in resources:
        if not isinstance(r, dict):
            return False
        try:
            check_patient_context(r, who.patient, resource_type=str(r.get("resourceType")), resource_id=r.get("id"),
                                  upstream_base=upstream_base)
        except CompartmentViolation:
            return False
    return True
