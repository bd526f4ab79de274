"""sidecar/prior.py: the prior-state read against a scripted EHR on 127.0.0.1, answer by answer."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator

import pytest

from sidecar.errors import Refusal
from sidecar.prior import Prior, PriorStateReader, check_if_match, same_version

OBS = {"resourceType": "Observation", "id": "9", "meta": {"versionId": "3"}, "status": "final"}


class ScriptedEhr:
    """Answers every request with the next scripted (status, headers, body); records the requests."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, list[tuple[str, str]], bytes]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                self.requests.append((lines[0], headers))
                status, extra, body = self.answers.pop(0)
                out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in extra]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def base(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/fhir/R4"


@pytest.fixture
async def ehr() -> AsyncIterator[ScriptedEhr]:
    e = ScriptedEhr()
    e.server = await asyncio.start_server(e._serve, "127.0.0.1", 0)
    yield e
    e.server.close()
    await e.server.wait_closed()


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


async def _read(ehr: ScriptedEhr, *answers: tuple[int, list[tuple[str, str]], bytes], **kw: str) -> Prior:
    ehr.answers.extend(answers)
    reader = PriorStateReader(ehr.base, timeout_s=5)
    try:
        return await reader.read("Observation", "9", correlation_id="corr-1234abcd", **kw)
    finally:
        await reader.close()


async def test_current_version_and_its_etag(ehr: ScriptedEhr) -> None:
    prior = await _read(ehr, (200, [("ETag", 'W/"3"'), ("Content-Type", "application/fhir+json")], _json(OBS)))
    assert prior == Prior(OBS, 'W/"3"')
    line, headers = ehr.requests[0]
    assert line == "GET /fhir/R4/Observation/9 HTTP/1.1"
    assert headers["accept-encoding"] == "identity" and headers["x-correlation-id"] == "corr-1234abcd"
    assert "authorization" not in headers


async def test_authorization_is_sent_when_given(ehr: ScriptedEhr) -> None:
    await _read(ehr, (200, [], _json(OBS)), authorization="Bearer t0ken")
    assert ehr.requests[0][1]["authorization"] == "Bearer t0ken"


async def test_no_etag_falls_back_on_meta_version_id(ehr: ScriptedEhr) -> None:
    assert (await _read(ehr, (200, [], _json(OBS)))).etag == 'W/"3"'
    assert (await _read(ehr, (200, [], _json({**OBS, "meta": {}})))).etag is None


async def test_a_compressed_answer_is_decoded_with_the_bound(ehr: ScriptedEhr) -> None:
    prior = await _read(ehr, (200, [("Content-Encoding", "gzip"), ("ETag", '"3"')], gzip.compress(_json(OBS))))
    assert prior.current == OBS


@pytest.mark.parametrize("status", [404, 410])
async def test_gone_or_missing_is_no_current_version(ehr: ScriptedEhr, status: int) -> None:
    assert await _read(ehr, (status, [], b"")) == Prior(None, None)


@pytest.mark.parametrize(
    ("status", "headers", "body", "want", "retry_after"),
    [
        (429, [("Retry-After", "7")], b"", 429, "7"),
        (503, [], b"", 503, None),
        (500, [], b"", 502, None),
        (403, [], b"", 403, None),
        (401, [], b"", 403, None),
        (200, [], b"not json", 502, None),
        (200, [], b'{"a": 1, "a": 2}', 502, None),  # duplicate keys: the strict parser refuses
        (200, [("Content-Encoding", "br")], _json(OBS), 502, None),
        (200, [], _json({**OBS, "id": "10"}), 502, None),
        (200, [], _json({**OBS, "resourceType": "Patient"}), 502, None),
    ],
)
async def test_refusals(ehr: ScriptedEhr, status: int, headers: list[tuple[str, str]], body: bytes, want: int,
                        retry_after: str | None) -> None:
    with pytest.raises(Refusal) as info:
        await _read(ehr, (status, headers, body))
    assert info.value.status == want
    assert dict(info.value.headers).get("Retry-After") == retry_after


async def test_an_unreachable_ehr_is_503() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens on that port any more
    reader = PriorStateReader(f"http://127.0.0.1:{port}/fhir/R4", timeout_s=2)
    with pytest.raises(Refusal) as info:
        await reader.read("Observation", "9", correlation_id="corr-1234abcd")
    await reader.close()
    assert info.value.status == 503


@pytest.mark.parametrize(("a", "b", "same"), [('W/"3"', '"3"', True), ('"3"', '"3"', True), ('W/"3"', 'W/"4"', False)])
def test_same_version(a: str, b: str, same: bool) -> None:
    assert same_version(a, b) is same


def test_if_match_of_another_version_is_412() -> None:
    check_if_match(None, Prior(OBS, 'W/"3"'))
    check_if_match('W/"3"', Prior(OBS, 'W/"3"'))
    for sent, prior in (('W/"2"', Prior(OBS, 'W/"3"')), ('W/"3"', Prior(None, None))):
        with pytest.raises(Refusal) as info:
            check_if_match(sent, prior)
        assert info.value.status == 412
