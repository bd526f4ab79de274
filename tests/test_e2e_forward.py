"""Forward mode (HTTPS_PROXY) and upstream TLS: only the EHR is reachable, its certificate is verified."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from sidecar.sandbox import SandboxServer
from tests.harness import WRITER_KEY, SidecarProcess, free_port, make_config, request
from tests.tlsutil import make_pki

pytestmark = pytest.mark.e2e
OBS = json.dumps({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}).encode()
WH = {"X-API-Key": WRITER_KEY, "Content-Type": "application/fhir+json"}


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_sandbox(pki):
    s = SandboxServer("127.0.0.1", 0, tls_cert=str(pki["cert"]), tls_key=str(pki["key"]))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def plain_sandbox():
    s = SandboxServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def connect(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return s.recv(4096)


def test_forward_mode_https_interception_to_the_ehr_only(tmp_path, pki, tls_sandbox):
    cfg = make_config(tmp_path, tls_sandbox.base_url,
                      upstream={"url": tls_sandbox.base_url, "ca_bundle": str(pki["ca"])},
                      listen={"mode": "forward", "confdir": str(tmp_path / "mitm")})
    sc = SidecarProcess(cfg, tmp_path).start()
    try:
        proxy = f"http://127.0.0.1:{sc.port}"
        sidecar_ca = tmp_path / "mitm" / "mitmproxy-ca-cert.pem"
        with httpx.Client(proxy=proxy, verify=str(sidecar_ca), timeout=10) as client:
            r = client.post(f"{tls_sandbox.base_url}/Observation", content=OBS, headers=WH)
            assert r.status_code == 201, r.text
            assert r.headers["x-correlation-id"]
            denied = client.post(f"{tls_sandbox.base_url}/MedicationRequest", content=b"{}", headers=WH)
            assert denied.status_code in (400, 403)
        log = tls_sandbox.request_log()
        assert [e["action"] for e in log] == ["create"]
        assert log[0]["correlation_id"] == r.headers["x-correlation-id"]
        # anything but the EHR is refused, CONNECT included, and never tunnelled
        other = free_port()
        assert connect(sc.port, f"127.0.0.1:{other}").startswith(b"HTTP/1.1 403")
        status, _, _ = request(sc.port, "GET", f"http://127.0.0.1:{other}/fhir/R4/metadata")
        assert status == 403
    finally:
        sc.stop()


def test_forward_mode_plain_http_other_host_refused(tmp_path, plain_sandbox):
    cfg = make_config(tmp_path, plain_sandbox.base_url, listen={"mode": "forward", "confdir": str(tmp_path / "mitm")})
    sc = SidecarProcess(cfg, tmp_path).start()
    try:
        status, _, _ = request(sc.port, "POST", f"{plain_sandbox.base_url}/Observation", OBS, WH)
        assert status == 201
        status, _, data = request(sc.port, "GET", f"http://127.0.0.1:{free_port()}/fhir/R4/metadata")
        assert status == 403 and b"not the EHR" in data
        assert [e["action"] for e in plain_sandbox.request_log()] == ["create"]
    finally:
        sc.stop()


def test_untrusted_ehr_certificate_is_a_502_never_an_insecure_fallback(tmp_path, tls_sandbox):
    cfg = make_config(tmp_path, tls_sandbox.base_url)  # no ca_bundle: the test CA is not trusted
    sc = SidecarProcess(cfg, tmp_path).start()
    try:
        status, _, _ = request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)
        assert status == 502
        assert tls_sandbox.request_log() == []
    finally:
        sc.stop()


def test_reverse_mode_to_a_trusted_https_ehr(tmp_path, pki, tls_sandbox):
    cfg = make_config(tmp_path, tls_sandbox.base_url, upstream={"url": tls_sandbox.base_url, "ca_bundle": str(pki["ca"])})
    sc = SidecarProcess(cfg, tmp_path).start()
    try:
        status, headers, _ = request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)
        assert status == 201
        assert headers["location"].startswith(f"http://127.0.0.1:{sc.port}/fhir/R4/")
    finally:
        sc.stop()


def test_spki_pins_checked_before_anything_is_sent(tmp_path, pki, tls_sandbox):
    from cryptography import x509 as _x509

    from sidecar.upstream import spki_sha256

    der = _x509.load_pem_x509_certificate(pki["cert"].read_bytes()).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    good = spki_sha256(der)
    for pins, expect in (([good], 201), (["0" * 64], 502)):
        d = tmp_path / expect.__str__()
        d.mkdir()
        cfg = make_config(d, tls_sandbox.base_url, policy={"engine": "off"},
                          upstream={"url": tls_sandbox.base_url, "ca_bundle": str(pki["ca"]), "spki_sha256": pins})
        sc = SidecarProcess(cfg, d).start()
        try:
            tls_sandbox.clear_log()
            assert request(sc.port, "POST", "/fhir/R4/Observation", OBS, WH)[0] == expect
            read = request(sc.port, "GET", "/fhir/R4/Observation?_count=1", None, {"X-API-Key": "reader-key-1"})[0]
            assert read == (200 if expect == 201 else 502)
            if expect == 502:
                assert tls_sandbox.request_log() == []  # a wrong key: not a byte of any request went out
        finally:
            sc.stop()
