"""listen.tls and mTLS clients end to end: the sidecar serves TLS and verifies client chains itself."""

from __future__ import annotations

import datetime
import json
import ssl
import http.client

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.sandbox import SandboxServer
from tests.harness import SidecarProcess, make_config, request
from tests.tlsutil import make_pki

pytestmark = pytest.mark.e2e
OBS = json.dumps({"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}).encode()


def client_pki(folder, client_id: str):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test clients CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:fhir-sidecar:client:{client_id}")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "client-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return folder


@pytest.fixture
def env(tmp_path):
    sandbox = SandboxServer("127.0.0.1", 0)
    sandbox.start()
    server = make_pki(tmp_path / "server")
    good = client_pki(tmp_path / "clients", "lab-mtls")
    other = client_pki(tmp_path / "other", "lab-mtls")
    cfg = make_config(tmp_path, sandbox.base_url, policy={"engine": "off"},
                      listen={"tls": {"cert": f"file:{server['cert']}", "key": f"file:{server['key']}"}},
                      identity={"client_ca": f"file:{good / 'ca.pem'}"},
                      clients=[{"id": "lab-mtls", "auth": "mtls", "scopes": ["system/Observation.c"]}])
    sc = SidecarProcess(cfg, tmp_path).start()
    yield sc, sandbox, server, good, other
    sc.stop()
    sandbox.stop()


def https(sc, server, cert_dir=None):
    ctx = ssl.create_default_context(cafile=str(server["ca"]))
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "client.pem"), str(cert_dir / "client-key.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", sc.port, context=ctx, timeout=10)
    conn.request("POST", "/fhir/R4/Observation", body=OBS, headers={"Content-Type": "application/fhir+json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_mtls_client_identified_by_its_verified_certificate(env):
    sc, sandbox, server, good, other = env
    assert https(sc, server, good)[0] == 201
    assert https(sc, server, None)[0] == 401            # no certificate, no other credential
    assert https(sc, server, other)[0] == 401           # same client id, untrusted CA
    status, _, data = request(sc.port, "POST", "/fhir/R4/Observation", OBS, {"Content-Type": "application/fhir+json"})
    assert status == 403 and b"TLS" in data             # plain HTTP on a TLS listener
    assert [e["action"] for e in sandbox.request_log()] == ["create"]
