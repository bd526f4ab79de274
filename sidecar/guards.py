"""Guards that need nothing but the request, its classification and the principal.

Each returns nothing when the request may go on and raises a `Refusal` otherwise. Order is
fixed by the pipeline (DESIGN: kill switch, rate limit, idempotency, scopes, validation,
prior state, policy).
"""

from __future__ import annotations

from sidecar.errors import Refusal, bad_request, deny
from sidecar.fhir.types import is_supported
from sidecar.fhir.validate import FhirValidationError, validate_json_patch, validate_resource
from sidecar.identity import Principal
from sidecar.request import Classification, FhirRequest, Requirement


def check_scopes(cls: Classification, who: Principal) -> None:
    """Every requirement must be granted by the client's scopes; write operations must be named.

    A Bundle's refusal names the first entry whose requirement is not granted. A requirement's
    answer depends only on the requirement, the principal and whether the request writes, so each
    distinct one is decided once (a 1,000-entry transaction of Observations has one)."""
    if cls.public:
        return
    decided: set[Requirement] = set()
    for e in cls.entries:
        for req in e.requires:
            if req not in decided:
                _check_requirement(req, cls, who, f"Bundle entry {e.index}: ", e.interaction)
                decided.add(req)
    for req in cls.requires:  # the request's own (a Bundle's are its entries': all decided above)
        if req not in decided:
            _check_requirement(req, cls, who, "", cls.interaction)
            decided.add(req)
    for op in cls.write_operations:
        if op not in who.operations:
            raise deny(f"write operation {op} is not enabled for this client")
    if cls.conditional and not who.conditional_writes:
        raise deny("conditional writes are not enabled for this client")


def _check_requirement(req: Requirement, cls: Classification, who: Principal, where: str, interaction: str) -> None:
    missing = who.scopes.missing(req.resource_type, req.letters, contexts=who.contexts)
    if missing and cls.is_write and _qualified_may_grant(who, req.resource_type, missing):
        return  # decided on the concrete resource (and `current`) once prior state is read
    if missing:
        letters = "".join(sorted(missing, key="cruds".index))
        rtype = "any type" if req.resource_type == "*" else req.resource_type
        raise deny(f"{where}scope does not grant '{letters}' on {rtype} for {interaction}")


def _qualified_may_grant(who: Principal, rtype: str, letters: frozenset[str]) -> bool:
    """A qualified scope of this type may grant these letters, depending on the resource."""
    for letter in letters:
        if not any(sc.qualifiers and sc.context in who.contexts and letter in sc.letters
                   and sc.resource_type in (rtype, "*") for sc in who.scopes):
            return False
    return True


def _validate(resource: object, where: str = "") -> None:
    if not isinstance(resource, dict):
        raise bad_request(f"{where}the body must be a FHIR resource", "structure")
    try:
        validate_resource(resource)
    except FhirValidationError as e:
        status = 403 if e.code == "not-supported" else 400
        raise Refusal(status, f"{where}{e}", e.code) from None


def _patchable(resource_type: str | None, where: str = "") -> None:
    # A patch's result is a resource of the target type: one we cannot validate is refused.
    if not is_supported(resource_type):
        raise Refusal(403, f"{where}resource type is not supported for PATCH", "not-supported")


def check_valid(req: FhirRequest, cls: Classification) -> None:
    """Writes are validated with the R4B models; unsupported types are refused, never passed."""
    if not cls.is_write:
        return
    if cls.entries:
        for e in cls.entries:
            if e.is_write and e.method == "PATCH":
                _patchable(e.target.resource_type, f"Bundle entry {e.index}: ")
        _validate(req.body)  # the Bundle validates its entries' resources too
        return
    if req.method == "PATCH":
        if cls.interaction.startswith("patch"):
            _patchable(req.target.resource_type)
        if isinstance(req.body, list):
            try:
                validate_json_patch(req.body)
            except FhirValidationError as e:
                raise bad_request(str(e), e.code) from None
        else:
            _validate(req.body)
        return
    if req.body is not None:
        _validate(req.body)
    elif req.method in ("POST", "PUT"):
        raise bad_request("a write needs a body")


def validate_result(resource: dict) -> None:
    """A patch result is validated like a written resource."""
    _validate(resource, "patch result: ")
