"""The fast canonical-JSON path for audit hashes equals the RFC 8785 library on every record shape."""

from __future__ import annotations

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.audit.record import canonical_json

keys = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
           | st.lists(st.text(max_size=10), max_size=4))


@settings(max_examples=3000, deadline=None)
@given(st.dictionaries(keys, scalars, max_size=12))
def test_fast_path_equals_rfc8785(record):
    try:
        expected = rfc8785.dumps(record)
    except rfc8785.CanonicalizationError as e:  # out of JCS's domain: the fast path must refuse too
        with pytest.raises(type(e)):
            canonical_json(record)
        return
    assert canonical_json(record) == expected


def test_typical_record():
    rec = {"v": 1, "chain": "main", "seq": 12, "ts": "2026-11-25T13:00:00.123Z", "prev": "0" * 64, "key_id": "k1",
           "kind": "outcome", "latency_ms": 1.25, "upstream_status": 201, "reasons": ["a", "b"], "user": None,
           "zero": 0.0, "tiny": 0.00001, "big": 1e21}
    assert canonical_json(rec) == rfc8785.dumps(rec)
