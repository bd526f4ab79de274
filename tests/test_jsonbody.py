"""Tests for sidecar.fhir.jsonbody: bounded decoding and strict JSON/form parsing."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from sidecar.fhir.jsonbody import MAX_DEPTH, BodyError, decode_content, parse_form, parse_json

CANARY = "CANARY-7f3a"


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# --------------------------------------------------------------------------
# decode_content
# --------------------------------------------------------------------------

BODY = b'{"resourceType":"Patient","id":"p1"}'


@pytest.mark.parametrize("encoding,raw", [
    (None, BODY),
    ("", BODY),
    ("identity", BODY),
    ("IDENTITY", BODY),
    ("gzip", gzip.compress(BODY)),
    ("GZip", gzip.compress(BODY)),
    ("x-gzip", gzip.compress(BODY)),
    (" gzip ", gzip.compress(BODY)),
    ("deflate", zlib.compress(BODY)),  # RFC 9110: zlib-wrapped
    ("deflate", _raw_deflate(BODY)),  # what some clients send
])
def test_decode_ok(encoding: str | None, raw: bytes) -> None:
    assert decode_content(raw, encoding, 1000) == BODY


@pytest.mark.parametrize("encoding", [
    "br", "zstd", "compress", "x-compress", "gzip, gzip", "gzip,deflate", "identity, gzip",
    "bogus", "gzip;q=1", "*",
])
def test_decode_unsupported(encoding: str) -> None:
    with pytest.raises(BodyError) as ei:
        decode_content(gzip.compress(BODY), encoding, 1000)
    assert (ei.value.status, ei.value.code) == (415, "not-supported")


@pytest.mark.parametrize("encoding,raw", [
    ("gzip", b"not gzip at all"),
    ("gzip", gzip.compress(BODY)[:-6]),  # truncated
    ("gzip", gzip.compress(BODY)[:10]),
    ("gzip", b""),
    ("gzip", gzip.compress(BODY) + b"trailing"),
    ("gzip", gzip.compress(BODY) + gzip.compress(BODY)),  # 2nd member: refused
    ("x-gzip", bytes(reversed(gzip.compress(BODY)))),
    ("deflate", zlib.compress(BODY)[:-3]),
    ("deflate", b"\xff\xff\xff\xff"),
    ("deflate", b""),
])
def test_decode_corrupt(encoding: str, raw: bytes) -> None:
    with pytest.raises(BodyError) as ei:
        decode_content(raw, encoding, 1000)
    assert (ei.value.status, ei.value.code) == (400, "invalid")


@pytest.mark.parametrize("encoding,compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", _raw_deflate),
])
def test_decompression_bomb(encoding: str, compress: object) -> None:
    bomb = compress(b"\0" * (50 * 1024 * 1024))  # type: ignore[operator]
    assert len(bomb) < 100_000
    with pytest.raises(BodyError) as ei:
        decode_content(bomb, encoding, 1024 * 1024)
    assert (ei.value.status, ei.value.code) == (413, "too-costly")


def test_bomb_does_not_allocate_it_all() -> None:
    import tracemalloc

    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024))
    tracemalloc.start()
    try:
        with pytest.raises(BodyError):
            decode_content(bomb, "gzip", 64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize("size,limit,ok", [(100, 100, True), (101, 100, False)])
def test_limit_boundary(size: int, limit: int, ok: bool) -> None:
    data = b"a" * size
    for enc, raw in ((None, data), ("gzip", gzip.compress(data)), ("deflate", zlib.compress(data))):
        if ok:
            assert decode_content(raw, enc, limit) == data
        else:
            with pytest.raises(BodyError) as ei:
                decode_content(raw, enc, limit)
            assert ei.value.status == 413


# --------------------------------------------------------------------------
# parse_json
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"a":1,"a":2}',
    '{"a":1,"b":{"c":1,"c":1}}',
    '{"a":[{"x":1},{"y":1,"y":2}]}',
    '[{"op":"add","op":"remove","path":"/a"}]',
    '{"a":1,"\\u0061":2}',  # same key after unescaping
])
def test_duplicate_keys(text: str) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json(text.encode(), allow_array=True)
    assert (ei.value.status, ei.value.code) == (400, "invalid")
    assert "duplicate" in str(ei.value)


@pytest.mark.parametrize("text", [
    '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":[1,NaN]}', '{"a":1e400}', '{"a":-1e400}',
    '{"a":nan}', '{"a":inf}',
])
def test_non_finite(text: str) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json(text.encode())
    assert ei.value.status == 400


@pytest.mark.parametrize("data", [
    b'\xef\xbb\xbf{"a":1}',  # BOM
    b'{"a":"\xff"}',  # invalid UTF-8
    b'{"a":"\xc3"}',  # truncated sequence
    b'{"a":"\xed\xa0\x80"}',  # UTF-8-encoded surrogate
    b'{"a":"\xc0\xaf"}',  # overlong
    b'\xff\xfe{\x00}\x00',  # UTF-16
    '{"a":"\\ud800"}'.encode(),  # lone high surrogate escape
    '{"a":"\\udc00x"}'.encode(),  # lone low surrogate escape
    '{"\\ud800":1}'.encode(),  # in a key
    '{"a":["ok","\\uDBFF"]}'.encode(),  # in an array
    '{"a":"\\udc00\\ud800"}'.encode(),  # reversed pair
])
def test_encoding_problems(data: bytes) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json(data)
    assert ei.value.status == 400


def test_valid_surrogate_pair_and_unicode() -> None:
    assert parse_json('{"a":"\\ud83d\\ude00","b":"é😀"}'.encode()) == {"a": "😀", "b": "é😀"}
    assert parse_json(b'{"a":"\\\\ud800"}') == {"a": "\\ud800"}  # escaped backslash, not a surrogate


@pytest.mark.parametrize("text,allow_array,code", [
    ("[]", False, "structure"),
    ('[{"a":1}]', False, "structure"),
    ('"x"', False, "structure"),
    ("1", False, "structure"),
    ("null", False, "structure"),
    ("true", True, "structure"),
    ('"x"', True, "structure"),
    ("", False, "invalid"),
    ("   ", False, "invalid"),
    ('{"a":1} x', False, "invalid"),
    ('{"a":1}{}', False, "invalid"),
    ('{"a":1},', False, "invalid"),
    ("{'a':1}", False, "invalid"),
    ('{"a":1,}', False, "invalid"),
    ('{"a":01}', False, "invalid"),
    ('{"a":"tab\tin string"}', False, "invalid"),
    ('{"a":"\\x41"}', False, "invalid"),
    ('{"a":1', False, "invalid"),
    ('{"a":' + "1" * 5000 + "}", False, "invalid"),  # over int digit limit
])
def test_bad_documents(text: str, allow_array: bool, code: str) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json(text.encode(), allow_array=allow_array)
    assert (ei.value.status, ei.value.code) == (400, code)


@pytest.mark.parametrize("text,allow_array,expected", [
    ('{"a":1}', False, {"a": 1}),
    (' \n{"a":[1,2.5,true,false,null,"s",{}]}\n ', False, {"a": [1, 2.5, True, False, None, "s", {}]}),
    ("[]", True, []),
    ('[{"op":"remove","path":"/a"}]', True, [{"op": "remove", "path": "/a"}]),
    ('{"a":1}', True, {"a": 1}),
])
def test_good_documents(text: str, allow_array: bool, expected: object) -> None:
    assert parse_json(text.encode(), allow_array=allow_array) == expected


@pytest.mark.parametrize("depth,ok", [(MAX_DEPTH, True), (MAX_DEPTH + 1, False), (5000, False), (200_000, False)])
@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_depth(depth: int, ok: bool, opener: str, closer: str) -> None:
    # Wrapped in an object so that the top level is always acceptable.
    text = '{"x":' + opener * (depth - 1) + "1" + closer * (depth - 1) + "}"
    if ok:
        parse_json(text.encode())
    else:
        with pytest.raises(BodyError) as ei:
            parse_json(text.encode())
        assert ei.value.status == 400


def test_depth_ignores_brackets_in_strings() -> None:
    text = json.dumps({"a": "[" * 500 + "{" * 500, "b": ["\\\"[[[", "]]]"]})
    assert parse_json(text.encode())["a"].startswith("[[[")


def test_depth_unterminated_garbage() -> None:
    # Malformed input whose bracket count is unreliable must still not escape as RecursionError.
    text = '{"a":"' + "[" * 3000 + "\\"
    with pytest.raises(BodyError):
        parse_json(text.encode())
    with pytest.raises(BodyError):
        parse_json(('{"a":' + "[" * 3000 + '"x').encode())


@pytest.mark.parametrize("text", [
    '{"a":"%s","a":1}', '{"a":"%s"} trailing', '{"a":NaN,"b":"%s"}', '["%s"]', '{"%s":1,"%s":2}',
    '{"a":"%s\\ud800"}',
])
def test_messages_do_not_echo_content(text: str) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json(text.replace("%s", CANARY).encode())
    assert CANARY not in str(ei.value)


def test_typical_observation_roundtrip() -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 6.3, "unit": "mmol/l"}}
    assert parse_json(json.dumps(obs).encode()) == obs


# --------------------------------------------------------------------------
# parse_form
# --------------------------------------------------------------------------

@pytest.mark.parametrize("data,expected", [
    (b"", []),
    (b"name=smith", [("name", "smith")]),
    (b"name=smith&name=jones", [("name", "smith"), ("name", "jones")]),
    (b"name=&given=a", [("name", ""), ("given", "a")]),
    (b"name=J%C3%BCrgen+M", [("name", "Jürgen M")]),
    (b"code=http%3A%2F%2Floinc.org%7C1234-5", [("code", "http://loinc.org|1234-5")]),
    (b"_count=10&_sort=-date", [("_count", "10"), ("_sort", "-date")]),
])
def test_form_ok(data: bytes, expected: list[tuple[str, str]]) -> None:
    assert parse_form(data) == expected


@pytest.mark.parametrize("data", [
    b"name",  # no '='
    b"a=1&&b=2",
    b"=x",
    b"name=%FF",  # not UTF-8
    b"name=%ED%A0%80",  # encoded surrogate
    b"name=J\xc3\xbcrgen",  # raw non-ASCII
    b"name=a%00b",  # NUL
    b"name=a%0Ab",  # newline
    b"na%0Ame=a",
    b"&".join(b"a=1" for _ in range(1001)),
])
def test_form_bad(data: bytes) -> None:
    with pytest.raises(BodyError) as ei:
        parse_form(data)
    assert (ei.value.status, ei.value.code) == (400, "invalid")


# ---------------------------------------------------------------------------------------------
# The fast depth check agrees with the exact one
# ---------------------------------------------------------------------------------------------

def _random_json(rng: "random.Random", depth: int) -> object:
    chars = ['"', "\\", "[", "]", "{", "}", "a", ":", ",", "é", "\u2028", "\\\\", '\\"']
    r = rng.random()
    if depth > 0 and r < 0.35:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    if depth > 0 and r < 0.7:
        return {"".join(rng.choice(chars) for _ in range(rng.randint(0, 4))): _random_json(rng, depth - 1)
                for _ in range(rng.randint(0, 3))}
    if r < 0.9:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 6)))
    return rng.choice([1, 2.5, None, True])


def test_fast_depth_check_is_exact_on_json_texts() -> None:
    import random

    from sidecar.fhir.jsonbody import _depth_within, _max_depth

    rng = random.Random(20261125)
    for _ in range(3000):
        text = json.dumps(_random_json(rng, rng.randint(0, 12)), ensure_ascii=rng.random() < 0.5)
        exact = _max_depth(text)
        for limit in (1, 2, 3, 5, 8, 13):
            assert _depth_within(text.encode(), limit) == (exact <= limit), (limit, text)


@pytest.mark.parametrize("text", [
    '{"a":' + "[" * 150 + "]" * 150 + "}",                       # deep, well-formed
    '{"a":' + "[" * 150 + "]" * 149 + "}",                       # deep, unbalanced
    '{"a":' + "[" * 60 + '"' + "]" * 60 + "}",                   # an unterminated string
    '{"a":"' + "]" * 60 + '","b":' + "[" * 99 + "]" * 99 + "}",  # brackets in a string, 100 deep
    '{"a":"\\\\","b":' + "[" * 99 + "]" * 99 + "}",              # an escaped backslash before a quote
    '{"a":"\\"[[[[","b":' + "{" * 120 + "}" * 120 + "}",         # an escaped quote, then deep
    '{"a":' + "[" * 70 + "}" * 70 + "}",                         # mismatched kinds (not JSON)
    '{"a" "b":' + "[" * 101 + "]" * 101 + "}",                   # not JSON, and 102 deep
])
def test_depth_answers_match_the_exact_measure(text: str) -> None:
    from sidecar.fhir.jsonbody import _max_depth

    deep = _max_depth(text) > MAX_DEPTH
    try:
        parse_json(text.encode())
    except BodyError as e:
        assert ("nested deeper" in str(e)) == deep
    else:
        assert not deep


def test_a_large_well_formed_body_is_not_scanned_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.fhir.jsonbody as jb

    calls = []
    monkeypatch.setattr(jb, "_max_depth", lambda text: calls.append(1) or 0)
    doc = {"resourceType": "Bundle", "entry": [{"resource": {"a": [{"b": {"c": [1, "]]]"]}}]}} for _ in range(500)]}
    assert parse_json(json.dumps(doc).encode()) == doc
    assert calls == []
