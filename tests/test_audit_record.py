from __future__ import annotations

import hashlib
import hmac
import json

import pytest
import rfc8785

from sidecar.audit.record import (
    HMAC_PURPOSE, ZERO_HASH, build_record, check_record, derive_key, dumps_line, hash_ok,
    loads_line, pseudonym, record_hash, utc_timestamp, validate_fields,
)

SECRET = b"s" * 32
KEY = derive_key(SECRET, HMAC_PURPOSE)
P = pseudonym(derive_key(SECRET, "pseudonym"), "Patient", "123")


def _rec(**fields: object) -> dict:
    clean = validate_fields({"kind": "intent", **fields})
    return build_record(clean, chain="main", seq=1, ts="2024-05-01T12:00:00.123Z",
                        prev=ZERO_HASH, key_id="k1", key=KEY)


def test_hash_is_canonical_and_reproducible() -> None:
    rec = _rec(correlation_id="c-1", method="PUT", patient=P, reasons=["ok"], latency_ms=1.5)
    body = {k: v for k, v in rec.items() if k != "hash"}
    expected = hmac.new(KEY, ZERO_HASH.encode() + rfc8785.dumps(body), hashlib.sha256).hexdigest()
    assert rec["hash"] == expected
    # Key order does not matter (JCS), and the stored line round-trips.
    shuffled = dict(reversed(list(body.items())))
    assert record_hash(KEY, ZERO_HASH, shuffled) == expected
    again = loads_line(dumps_line(rec)[:-1])
    assert again == rec and hash_ok(KEY, again)
    check_record(again)
    assert list(rec)[:8] == ["v", "chain", "seq", "ts", "prev", "hash", "key_id", "kind"]


def test_hash_depends_on_prev_key_and_content() -> None:
    rec = _rec(method="PUT")
    assert not hash_ok(derive_key(b"other-secret-xxxxxxxx", HMAC_PURPOSE), rec)
    assert not hash_ok(KEY, {**rec, "method": "POST"})
    assert not hash_ok(KEY, {**rec, "prev": "1" * 64})


def test_pseudonym_stable_and_separated() -> None:
    k1, k2 = derive_key(b"a" * 32, "pseudonym"), derive_key(b"b" * 32, "pseudonym")
    p = pseudonym(k1, "Patient", "123")
    assert p == pseudonym(k1, "Patient", "123")
    assert p.startswith("p:") and len(p) == 34
    assert p != pseudonym(k1, "Observation", "123")
    assert p != pseudonym(k2, "Patient", "123")
    assert p != pseudonym(k1, "Patient", "124")
    # kind/value boundary is unambiguous thanks to the NUL separator
    assert pseudonym(k1, "ab", "c") != pseudonym(k1, "a", "bc")


def test_derive_key_separates_purposes() -> None:
    a = derive_key(SECRET, "audit-hmac")
    assert len(a) == 32 and a == derive_key(SECRET, "audit-hmac")
    assert a != derive_key(SECRET, "pseudonym") and a != SECRET


@pytest.mark.parametrize("fields, match", [
    ({"kind": "intent", "body": "x"}, "unknown audit field"),
    ({"kind": "intent", "note": "free text"}, "unknown audit field"),
    ({"kind": "intent", "seq": 5}, "assigned by the writer"),
    ({"kind": "intent", "hash": "0" * 64}, "assigned by the writer"),
    ({"kind": "intent", "torn_sha256": "0" * 64}, "unknown audit field"),   # admin only
    ({"kind": "admin", "checkpoint_seq": 1}, "unknown audit field"),        # checkpoint only
    ({"kind": "bogus"}, "kind"),
    ({}, "kind"),
    ({"kind": "intent", "patient": "Patient/123"}, "pseudonym"),
    ({"kind": "intent", "resource_id": "123"}, "pseudonym"),
    ({"kind": "outcome", "outcome": "maybe"}, "outcome"),
    ({"kind": "intent", "reasons": "one"}, "reasons"),
    ({"kind": "intent", "reasons": [1]}, "reasons"),
    ({"kind": "intent", "upstream_status": "200"}, "upstream_status"),
    ({"kind": "intent", "upstream_status": True}, "upstream_status"),
    ({"kind": "intent", "latency_ms": float("nan")}, "latency_ms"),
    ({"kind": "intent", "user": "x" * 5000}, "user"),
    ({"kind": "intent", "user": 5}, "user"),
])
def test_invalid_fields_rejected(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_fields(fields)


def test_error_messages_do_not_echo_values() -> None:
    with pytest.raises(ValueError) as ei:
        validate_fields({"kind": "intent", "patient": "Patient/SECRET-MRN-42"})
    assert "SECRET-MRN-42" not in str(ei.value)


def test_valid_fields_normalised() -> None:
    out = validate_fields({"kind": "admin", "reasons": ("torn-tail",), "torn_sha256": "a" * 64,
                           "user": None, "upstream_status": 200})
    assert out == {"kind": "admin", "reasons": ["torn-tail"], "upstream_status": 200,
                   "torn_sha256": "a" * 64}


@pytest.mark.parametrize("mutate", [
    lambda r: r.update(v=2),
    lambda r: r.update(seq=0),
    lambda r: r.update(seq=True),
    lambda r: r.update(ts="2024-05-01 12:00:00"),
    lambda r: r.update(prev="x"),
    lambda r: r.update(user=None),
    lambda r: r.update(extra="x"),
    lambda r: r.pop("key_id"),
])
def test_check_record_rejects_malformed(mutate) -> None:
    rec = _rec(user="u")
    mutate(rec)
    with pytest.raises(ValueError):
        check_record(rec)


@pytest.mark.parametrize("raw", [b'{"a":1,"a":2}', b"[1]", b"{", b'{"a":NaN}', b"\xff"])
def test_loads_line_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        loads_line(raw)


def test_line_cannot_be_broken_by_values() -> None:
    line = dumps_line(_rec(user="a\nb\r\u2028"))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert json.loads(line)["user"] == "a\nb\r\u2028"


def test_timestamp_format() -> None:
    ts = utc_timestamp()
    assert len(ts) == 24 and ts.endswith("Z") and ts[19] == "."


def test_timestamp_now_is_the_wall_clock_in_milliseconds() -> None:
    import re
    import time
    from datetime import datetime, timezone

    for _ in range(3):  # the second's text is cached: across a second boundary too
        before = datetime.now(timezone.utc).replace(microsecond=0)
        ts = utc_timestamp()
        after = datetime.now(timezone.utc)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", ts)
        parsed = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert before <= parsed <= after
        time.sleep(0.4)


def test_prekeyed_mac_seals_the_same() -> None:
    clean = validate_fields({"kind": "read", "correlation_id": "c-1", "reasons": ["ok"], "latency_ms": 2.0,
                             "upstream_status": 200, "client_id": "caf\u00e9-app"})
    args = dict(chain="main", seq=7, ts="2024-05-01T12:00:00.123Z", prev="a" * 64, key_id="k1", key=KEY)
    plain = build_record(clean, **args)
    mac = hmac.new(KEY, digestmod=hashlib.sha256)
    assert build_record(clean, **args, mac=mac) == plain == build_record(clean, **args, mac=mac)
    assert hash_ok(KEY, plain)


def test_canonical_json_leaves_lone_surrogates_to_the_library() -> None:
    from sidecar.audit.record import canonical_json

    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json({"a": "x\ud800y"})
    assert canonical_json({"a": "caf\u00e9 \u2028 \x7f \x01"}) == rfc8785.dumps({"a": "caf\u00e9 \u2028 \x7f \x01"})


def test_validate_fields_order_and_kinds() -> None:
    from sidecar.audit.record import CALLER_FIELDS, KIND_EXTRA_FIELDS, KINDS

    everything = {n: "x" for n in CALLER_FIELDS}
    everything.update(resource_id=P, patient=P, reasons=["r"], outcome="committed", upstream_status=200,
                      latency_ms=1)
    for kind in sorted(KINDS):
        extras = {n: (1 if n == "checkpoint_seq" else "0" * 64) for n in KIND_EXTRA_FIELDS.get(kind, ())}
        got = validate_fields({**dict(reversed(list({**everything, **extras}.items()))), "kind": kind})
        assert list(got) == ["kind", *CALLER_FIELDS, *KIND_EXTRA_FIELDS.get(kind, ())]
    with pytest.raises(ValueError, match="unknown audit field"):
        validate_fields({"kind": "read", "checkpoint_seq": 1})
