"""One reading of a policy decision, shared by the live pipeline and offline replay.

An engine error, a timeout or a decision of the wrong shape is a 503: never an allow.
"""

from __future__ import annotations

from typing import Any

from sidecar.errors import unavailable


async def verdict(policy: Any, doc: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
    """(allow, reason text for a denial, the whole decision)."""
    try:
        decision = await policy.decide(doc)
    except Exception:
        raise unavailable("policy engine unavailable") from None
    if not isinstance(decision, dict):
        raise unavailable("policy decision undefined")
    allow, reasons = decision.get("allow"), decision.get("reasons") or []
    if not isinstance(allow, bool) or not isinstance(reasons, list):
        raise unavailable("policy decision undefined")
    text = "; ".join(str(r) for r in reasons[:5])[:500] or "denied by policy"
    return allow, text, decision
