"""Patient compartment checks for ``patient/`` SMART scopes. Pure: no I/O.

A client whose grant comes from a ``patient/`` scope may only touch the launch context patient's
compartment (SMART App Launch; FHIR R4 CompartmentDefinition/patient). This module answers three
questions, each fail-closed:

- ``patient_references``: which references in a resource point at a Patient, and which Patient?
  Anything we cannot pin to one plain Patient id on the upstream server (conditional references,
  contained Patients, Patients created in the same transaction, other servers, identifier-only
  references, unresolvable ``urn:`` references, malformed ones) becomes a *marker*: a string
  starting with ``?`` that can never equal a context id (ids match ``[A-Za-z0-9\\-.]{1,64}``).
- ``check_patient_context``: may a patient-context client write this resource? Every Patient
  reference must be the context patient, and the resource must be in the compartment through one
  of the elements the compartment definition names (table ``PATIENT_COMPARTMENT``).
- ``search_confined``: is this search provably limited to the context patient's compartment?

Types absent from ``PATIENT_COMPARTMENT`` can be neither written nor searched by a patient-context
client (refused, never guessed). The table is a compact subset of R4's definition; extend it from
https://hl7.org/fhir/R4/compartmentdefinition-patient.html together with the element each search
parameter's expression names (https://hl7.org/fhir/R4/searchparameter-registry.html).

Reasons (``CompartmentViolation.reason``) are fixed phrases; they may name an element path such as
``Observation.performer[0]`` but never an id or any other value from the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

__all__ = [
    "CONDITIONAL", "CONTAINED", "IDENTIFIER_ONLY", "INCLUDE_SAFE_ELEMENTS", "MALFORMED", "MARKERS",
    "NEW_IN_TRANSACTION", "OTHER_SERVER", "PATIENT_COMPARTMENT", "TYPE_MISMATCH", "UNRESOLVED",
    "CompartmentViolation", "check_patient_context", "is_valid_id", "patient_references",
    "search_confined", "transaction_fullurl_map",
]

# --- data ------------------------------------------------------------------------------------------

# resource type -> {search parameter: element path (relative to the resource)} for the parameters
# that put a resource of that type into a Patient's compartment. From the R4 (4.0.1) Patient
# CompartmentDefinition; each path is the element the parameter's R4 expression reads (e.g.
# Condition `patient` = `Condition.subject.where(resolve() is Patient)` -> "subject").
# Entries marked `+patient` are NOT in the compartment definition: they are the type's `patient`
# search parameter (`subject.where(resolve() is Patient)`), a Patient-only alias of `subject`, added
# because it is how apps usually search (``Observation?patient=123``).
PATIENT_COMPARTMENT: dict[str, dict[str, str]] = {
    "AdverseEvent": {"subject": "subject"},
    "AllergyIntolerance": {"patient": "patient", "recorder": "recorder", "asserter": "asserter"},
    "Basic": {"patient": "subject", "author": "author"},
    "CarePlan": {"patient": "subject", "performer": "activity.detail.performer"},
    "CareTeam": {"patient": "subject", "participant": "participant.member"},
    "ClinicalImpression": {"subject": "subject", "patient": "subject"},                     # +patient
    "Communication": {"subject": "subject", "sender": "sender", "recipient": "recipient",
                      "patient": "subject"},                                                # +patient
    "CommunicationRequest": {"subject": "subject", "sender": "sender", "recipient": "recipient",
                             "requester": "requester", "patient": "subject"},               # +patient
    "Composition": {"subject": "subject", "author": "author", "attester": "attester.party",
                    "patient": "subject"},                                                  # +patient
    "Condition": {"patient": "subject", "asserter": "asserter"},
    "Consent": {"patient": "patient"},
    "Coverage": {"policy-holder": "policyHolder", "subscriber": "subscriber",
                 "beneficiary": "beneficiary", "payor": "payor"},
    "DetectedIssue": {"patient": "patient"},
    "DeviceRequest": {"subject": "subject", "performer": "performer", "patient": "subject"},  # +patient
    "DiagnosticReport": {"subject": "subject", "patient": "subject"},                       # +patient
    "DocumentReference": {"subject": "subject", "author": "author", "patient": "subject"},  # +patient
    "Encounter": {"patient": "subject"},
    "EpisodeOfCare": {"patient": "patient"},
    "FamilyMemberHistory": {"patient": "patient"},
    "Flag": {"patient": "subject"},
    "Goal": {"patient": "subject"},
    "ImagingStudy": {"patient": "subject"},
    "Immunization": {"patient": "patient"},
    "List": {"subject": "subject", "source": "source", "patient": "subject"},               # +patient
    "MedicationAdministration": {"patient": "subject", "performer": "performer.actor", "subject": "subject"},
    "MedicationDispense": {"subject": "subject", "patient": "subject", "receiver": "receiver"},
    "MedicationRequest": {"subject": "subject", "patient": "subject"},                      # +patient
    "MedicationStatement": {"subject": "subject", "patient": "subject"},                    # +patient
    "NutritionOrder": {"patient": "patient"},
    "Observation": {"subject": "subject", "performer": "performer", "patient": "subject"},  # +patient
    "Patient": {"link": "link.other"},
    "Procedure": {"patient": "subject", "performer": "performer.actor"},
    "Provenance": {"patient": "target"},
    "QuestionnaireResponse": {"subject": "subject", "author": "author", "patient": "subject"},  # +patient
    "RelatedPerson": {"patient": "patient"},
    "RiskAssessment": {"subject": "subject", "patient": "subject"},                         # +patient
    "ServiceRequest": {"subject": "subject", "performer": "performer", "patient": "subject"},  # +patient
    "Specimen": {"subject": "subject", "patient": "subject"},                               # +patient
    "VisionPrescription": {"patient": "patient"},
}
# Elements that hold at most one Reference in every R4 type above: an `_include` through a parameter
# pinned to the context patient on one of these can only bring back the context patient.
INCLUDE_SAFE_ELEMENTS: frozenset[str] = frozenset({"subject", "patient"})
# `_`-parameters a confined search may carry: they filter, page or shape the result, never widen it.
_SAFE_UNDERSCORE = frozenset({
    "_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_text", "_content",
    "_count", "_sort", "_total", "_summary", "_elements", "_format", "_pretty",
})

# Markers: never equal to a valid id (ids cannot contain '?').
CONDITIONAL = "?conditional"
CONTAINED = "?contained"
NEW_IN_TRANSACTION = "?new-in-transaction"
OTHER_SERVER = "?other-server"
IDENTIFIER_ONLY = "?identifier-only"
UNRESOLVED = "?unresolved"
MALFORMED = "?malformed"
TYPE_MISMATCH = "?type-mismatch"
_PHRASES: dict[str, str] = {
    CONDITIONAL: "is a conditional Patient reference",
    CONTAINED: "references a contained Patient",
    NEW_IN_TRANSACTION: "references a Patient created in this transaction",
    OTHER_SERVER: "references a Patient on another server",
    IDENTIFIER_ONLY: "identifies a Patient by identifier only",
    UNRESOLVED: "is a reference that cannot be resolved",
    MALFORMED: "is a malformed Patient reference",
    TYPE_MISMATCH: "declares type Patient but does not reference one",
}
MARKERS: frozenset[str] = frozenset(_PHRASES)

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_KEY_RE = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}")
_INDEX_RE = re.compile(r"\[\d+\]")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


class CompartmentViolation(Exception):
    """The request leaves the context patient's compartment. ``reason`` is safe to log and show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


# --- reference resolution --------------------------------------------------------------------------

def _is_patient_type(value: object) -> bool:
    """Reference.type is a URI relative to http://hl7.org/fhir/StructureDefinition/."""
    return isinstance(value, str) and (
        value == "Patient" or value == "http://hl7.org/fhir/StructureDefinition/Patient")


def _kind(ref: str) -> str:
    """"absolute" (scheme://… or //…), "urn" (scheme: without //) or "relative"; decided by the start
    only: ``Patient?identifier=http://mrn|42`` is a relative conditional reference."""
    if ref.startswith("//"):
        return "absolute"
    m = _SCHEME_RE.match(ref)
    if m is None:
        return "relative"
    return "absolute" if ref.startswith("//", m.end()) else "urn"


def _literal(ref: str, upstream_base: str) -> str | None:
    """A literal (non-urn, non-contained) reference -> Patient id, a marker, or None (not a Patient)."""
    kind = _kind(ref)
    if kind == "urn":
        return UNRESOLVED
    if kind == "absolute":
        base = upstream_base.rstrip("/")
        if base and ref.startswith(base + "/"):
            return _relative(ref[len(base) + 1:])
        path = ref.split("//", 1)[1] if "//" in ref else ref
        path = unquote(path.split("?", 1)[0].split("#", 1)[0])
        if any(seg.lower() == "patient" for seg in path.split("/")):
            return OTHER_SERVER
        return None
    return _relative(ref)


def _relative(ref: str) -> str | None:
    path, sep, _query = ref.partition("?")
    segs = path.split("/")
    well_formed = (
        "%" not in ref and "\\" not in ref and "#" not in ref
        and all(s not in ("", ".", "..") for s in segs) and _TYPE_RE.fullmatch(segs[0]) is not None
    )
    if not well_formed:
        # The server might normalise what we cannot read: anything that mentions a Patient is refused.
        return MALFORMED if "patient" in unquote(ref).lower() else None
    if segs[0] != "Patient":
        return MALFORMED if segs[0].lower() == "patient" else None
    if sep:
        return CONDITIONAL if len(segs) == 1 else MALFORMED
    if len(segs) == 2 and is_valid_id(segs[1]):
        return segs[1]
    if len(segs) == 4 and segs[2] == "_history" and is_valid_id(segs[1]) and is_valid_id(segs[3]):
        return segs[1]
    return MALFORMED


def _resolve(
    ref: str, *, contained: Mapping[str, str], root: dict, fullurl_map: Mapping[str, str], upstream_base: str,
) -> str | None:
    if ref in fullurl_map:
        target = fullurl_map[ref]
        if not isinstance(target, str):
            return MALFORMED
        if target.startswith("Patient/") and not is_valid_id(target[len("Patient/"):]):
            # "Patient/urn:uuid:…": a Patient this transaction creates (or any other placeholder)
            return NEW_IN_TRANSACTION if target.startswith("Patient/urn:") else MALFORMED
        if _kind(target) == "urn" or target.startswith("#"):
            return UNRESOLVED  # a map value must be a server reference, not another placeholder
        return _literal(target, upstream_base)
    if ref.startswith("#"):
        if ref == "#":  # the containing resource itself
            if root.get("resourceType") != "Patient":
                return None
            rid = root.get("id")
            return rid if is_valid_id(rid) else NEW_IN_TRANSACTION
        rtype = contained.get(ref[1:])
        if rtype is None:
            return UNRESOLVED
        return CONTAINED if rtype == "Patient" else None
    if _kind(ref) == "urn":  # urn:uuid:…, urn:oid:… that this transaction does not define
        return UNRESOLVED
    return _literal(ref, upstream_base)


def _walk(node: Any, path: str) -> Iterator[tuple[Any, dict]]:
    """Every JSON object below ``node`` with its element path, in document order (no recursion limit).

    The path is a chain ``(parent, key or index)`` whose root is ``path``; ``_path`` renders it.
    Only the paths of references are ever shown, so none is formatted while walking."""
    containers = (dict, list)
    stack: list[tuple[Any, Any]] = [(node, path)]
    while stack:
        value, where = stack.pop()
        children: list[tuple[Any, Any]] = []
        if isinstance(value, dict):
            yield where, value
            for key, child in value.items():
                if isinstance(child, list):
                    here = (where, key)
                    for i, item in enumerate(child):
                        if isinstance(item, containers):
                            children.append((item, (here, i)))
                elif isinstance(child, dict):
                    children.append((child, (where, key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, containers):
                    children.append((item, (where, i)))
        if children:
            children.reverse()
            stack += children


def _path(where: Any) -> str:
    """``Observation.performer[0]``: keys that are not plain element names show as ``?``."""
    parts: list[str] = []
    while type(where) is tuple:
        where, seg = where
        if type(seg) is int:
            parts.append(f"[{seg}]")
        else:
            parts.append("." + (seg if isinstance(seg, str) and _KEY_RE.fullmatch(seg) else "?"))
    return str(where) + "".join(reversed(parts))


def patient_references(
    resource: dict, *, fullurl_map: Mapping[str, str] | None = None, upstream_base: str = "",
) -> list[tuple[str, str]]:
    """Every reference anywhere in ``resource`` that points (or may point) at a Patient.

    Returns ``(element path, patient id or marker)`` in document order; paths look like
    ``Observation.performer[0]`` and name the Reference element. Looked at: every ``reference``
    string at any depth (contained resources, extensions, backbone elements), and identifier-only
    references (no ``reference``, ``type`` Patient, an ``identifier``).

    Resolution: ``fullurl_map`` first (a transaction's ``fullUrl`` -> ``"Patient/<id>"``,
    ``"Patient?<criteria>"`` or ``"Patient/urn:uuid:…"`` for a Patient it creates; see
    ``transaction_fullurl_map``), then ``#id`` against this resource's ``contained``, then
    ``{upstream_base}/…`` as relative, then relative ``Patient/<id>[/_history/<vid>]``.
    Not Patient references (ignored): references whose type is another resource type, e.g.
    ``subject: Group/1`` — note a policy may still require a Patient subject; ``check_patient_context``
    requires a compartment element to name the context patient.
    """
    if not isinstance(resource, dict):
        return [("Resource", MALFORMED)]
    fmap = fullurl_map or {}
    contained: dict[str, str] = {}
    for c in resource.get("contained") or ():
        if isinstance(c, dict) and isinstance(c.get("id"), str):
            rt = c.get("resourceType")
            # two contained resources with one id: which one would the server link? assume a Patient
            contained[c["id"]] = "Patient" if c["id"] in contained else (rt if isinstance(rt, str) else "?")
    rtype = resource.get("resourceType")
    top = rtype if isinstance(rtype, str) and _TYPE_RE.fullmatch(rtype) else "Resource"
    out: list[tuple[str, str]] = []
    for where, obj in _walk(resource, top):
        declared_patient = _is_patient_type(obj.get("type"))
        if "reference" in obj and isinstance(obj["reference"], dict):
            pass  # an element named `reference` of type Reference (Consent.provision.data): walked below
        elif "reference" in obj:
            ref = obj["reference"]
            if not isinstance(ref, str):
                out.append((_path(where), MALFORMED))
                continue
            got = _resolve(ref, contained=contained, root=resource, fullurl_map=fmap, upstream_base=upstream_base)
            if got is None and declared_patient:
                got = TYPE_MISMATCH
            if got is not None:
                out.append((_path(where), got))
        elif declared_patient and "identifier" in obj and type(where) is tuple:  # not the resource itself
            out.append((_path(where), IDENTIFIER_ONLY))
    return out


# --- writes ----------------------------------------------------------------------------------------

def _violation_for(path: str, value: str) -> CompartmentViolation:
    phrase = _PHRASES.get(value, "references a patient other than the context patient")
    return CompartmentViolation(f"{path} {phrase}")


def check_patient_context(
    resource: dict,
    context_patient: str,
    *,
    resource_type: str,
    resource_id: str | None,
    fullurl_map: Mapping[str, str] | None = None,
    upstream_base: str = "",
) -> None:
    """Raise ``CompartmentViolation`` unless ``resource`` stays in ``context_patient``'s compartment.

    Rules (all must hold):
    - ``context_patient`` is a valid id and ``resource.resourceType == resource_type``;
    - every Patient reference (``patient_references``) is exactly the context patient;
    - a ``Patient`` resource is the context patient itself: its id (``resource_id``, else the body's
      ``id``) equals the context, so a patient-context client never creates a Patient;
    - any other type is in ``PATIENT_COMPARTMENT`` and one of its compartment elements (e.g.
      Observation.subject or .performer) references the context patient.

    For update / patch / delete call it on the stored ``current`` too (and for delete only on
    ``current``): otherwise a client could move another patient's record into its own compartment.
    """
    if not is_valid_id(context_patient):
        raise CompartmentViolation("no valid patient context")
    if not isinstance(resource, dict) or resource.get("resourceType") != resource_type:
        raise CompartmentViolation("resourceType does not match the request")
    refs = patient_references(resource, fullurl_map=fullurl_map, upstream_base=upstream_base)
    for path, pid in refs:
        if pid != context_patient:
            raise _violation_for(path, pid)
    if resource_type == "Patient":
        body_id = resource.get("id")
        rid = resource_id if resource_id is not None else body_id
        if rid != context_patient or (body_id is not None and body_id != rid):
            raise CompartmentViolation("a patient-context client may only write its own Patient resource")
        return
    links = PATIENT_COMPARTMENT.get(resource_type)
    if links is None:
        raise CompartmentViolation("resource type is not in the patient compartment table")
    wanted = {f"{resource_type}.{elem}" for elem in links.values()}
    if not any(_INDEX_RE.sub("", path) in wanted for path, _pid in refs):
        raise CompartmentViolation("resource does not reference the context patient in a compartment element")


def transaction_fullurl_map(bundle: dict, *, upstream_base: str = "") -> dict[str, str]:
    """``fullUrl -> "Type/<id>" | "Type?<criteria>" | "Type/<fullUrl>"`` for a batch/transaction Bundle.

    - ``PUT/PATCH Type/id`` -> ``Type/id``; ``PUT/PATCH Type?crit`` -> ``Type?crit``;
    - ``POST Type`` -> ``Type/<fullUrl>`` (a resource created in this transaction, e.g.
      ``Patient/urn:uuid:…``); with ``ifNoneExist`` -> ``Type?<ifNoneExist>`` (existing or new);
    - GET/HEAD/DELETE entries are not mapped (a reference to them resolves to nothing: a marker).
    Raises ``CompartmentViolation`` for duplicate fullUrls, a fullUrl on another server, or an
    absolute same-server fullUrl that disagrees with the entry's ``request.url``.
    """
    base = upstream_base.rstrip("/")
    out: dict[str, str] = {}
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for i, e in enumerate(entries if isinstance(entries, list) else ()):
        if not isinstance(e, dict) or not isinstance(e.get("fullUrl"), str):
            continue
        full = e["fullUrl"]
        where = f"Bundle.entry[{i}].fullUrl"
        if full in out:
            raise CompartmentViolation(f"{where} is not unique")
        req = e.get("request") if isinstance(e.get("request"), dict) else {}
        method, url = req.get("method"), req.get("url")
        if not isinstance(url, str) or method not in ("POST", "PUT", "PATCH"):
            continue
        if base and url.startswith(base + "/"):
            url = url[len(base) + 1:]
        if method == "POST":
            ine = req.get("ifNoneExist")
            target = f"{url}?{ine}" if isinstance(ine, str) else f"{url}/{full}"
        else:
            target = url
        if _kind(full) == "absolute":
            if not (base and full.startswith(base + "/")):
                raise CompartmentViolation(f"{where} is on another server")
            if method == "POST" or full[len(base) + 1:] != target:
                raise CompartmentViolation(f"{where} does not match the entry's request.url")
        out[full] = target
    return out


# --- searches --------------------------------------------------------------------------------------

def _pinned(param: str, value: str, ctx: str) -> bool:
    if param in ("patient", "_id") and value == ctx:
        return True
    return param != "_id" and value == f"Patient/{ctx}"


def search_confined(
    target_resource_type: str,
    query: Sequence[tuple[str, str]],
    context_patient: str,
    compartment: tuple[str, str] | None,
) -> bool:
    """True iff the search provably returns only the context patient's compartment.

    ``query`` is every search parameter (URL query plus the form body of ``POST _search``).
    Confined: ``Patient/<ctx>/<Type>`` (compartment), ``<Type>?patient=<ctx>``,
    ``<Type>?<param>=Patient/<ctx>`` for a compartment parameter of the type, ``Patient?_id=<ctx>``.
    Every occurrence of a linking parameter (any case) must be exactly pinned: one value, no comma,
    no modifier (``:missing``, ``:Patient``, ``:identifier`` …). Also refused: types not in
    ``PATIENT_COMPARTMENT``, system/``*`` searches, chains (``a.b=``), ``_has``, ``_query``,
    ``_filter``, ``_type`` and any ``_``-parameter not in the filter allowlist; ``_include`` unless it
    follows a pinned ``subject``/``patient`` element of the searched type; ``_revinclude`` unless the
    search is ``Patient?_id=<ctx>`` and it names a compartment parameter of a table type;
    ``:iterate`` of either. Search parameters unknown to the server may be ignored by a lenient
    one: every parameter used to confine is a defined R4 parameter of the type.
    """
    if not is_valid_id(context_patient):
        return False
    links = PATIENT_COMPARTMENT.get(target_resource_type)
    if links is None:
        return False
    confining = {"_id"} if target_resource_type == "Patient" else set(links)
    linking = set(links) | confining
    lower_linking = {p.lower(): p for p in linking}
    pinned: set[str] = set()
    includes: list[str] = []
    revincludes: list[str] = []
    for name, value in query:
        base, _, modifier = name.partition(":")
        if "." in name:
            return False  # chained (or reverse-chained) parameter
        if base in ("_include", "_revinclude"):
            if modifier:
                return False  # :iterate / :recurse reach beyond the first hop
            (includes if base == "_include" else revincludes).append(value)
            continue
        if base.lower() in lower_linking:
            if modifier or base not in linking or not _pinned(base, value, context_patient):
                return False
            if base in confining:
                pinned.add(base)
            continue
        if base.startswith("_") and base not in _SAFE_UNDERSCORE:
            return False
    if compartment is not None:
        if compartment != ("Patient", context_patient):
            return False
        if target_resource_type != "Patient":
            pinned.add("")  # the compartment itself confines (a Patient type still needs _id)
    if not pinned:
        return False
    for value in includes:
        parts = value.split(":")
        if len(parts) not in (2, 3) or parts[0] != target_resource_type:
            return False
        if len(parts) == 3 and parts[2] != "Patient":
            return False
        if parts[1] not in pinned or links.get(parts[1]) not in INCLUDE_SAFE_ELEMENTS:
            return False
    for value in revincludes:
        parts = value.split(":")
        if target_resource_type != "Patient" or "_id" not in pinned:
            return False
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "Patient"):
            return False
        if parts[0] == "Patient" or parts[1] not in PATIENT_COMPARTMENT.get(parts[0], {}):
            return False
    return True
