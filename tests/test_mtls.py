"""mtls: client-certificate chains verified against the client CA (keys generated per test session)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.config import ConfigError
from sidecar.mtls import CertificateRejected, ClientCertVerifier

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)


@dataclass
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str | tuple[str, ...] | None) -> x509.Name:
    cns = (cn,) if isinstance(cn, str) else cn or ()
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cns])


def make_cert(cn: str | tuple[str, ...] | None, issuer: Issuer | None = None, *, ca: bool = False,
              san: list[x509.GeneralName] | None = None,
              eku: tuple[x509.ObjectIdentifier, ...] | None = CLIENT_AUTH, digital_signature: bool = True,
              valid: tuple[dt.timedelta, dt.timedelta] = (dt.timedelta(days=-1), dt.timedelta(days=30))) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issuer.key if issuer else key
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer.cert.subject if issuer else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW + valid[0]).not_valid_after(NOW + valid[1])
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=digital_signature, key_cert_sign=ca, crl_sign=ca,
                                      content_commitment=False, key_encipherment=False, data_encipherment=False,
                                      key_agreement=not digital_signature, encipher_only=False, decipher_only=False),
                        critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if eku is not None and not ca:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Issuer(b.sign(signer, hashes.SHA256()), key)


def der(*certs: Issuer) -> list[bytes]:
    return [c.cert.public_bytes(serialization.Encoding.DER) for c in certs]


@pytest.fixture(scope="module")
def pki() -> dict[str, Issuer]:
    root = make_cert("client root CA", ca=True, valid=(dt.timedelta(days=-10), dt.timedelta(days=3650)))
    inter = make_cert("client intermediate CA", root, ca=True, valid=(dt.timedelta(days=-10), dt.timedelta(days=365)))
    other_root = make_cert("some other CA", ca=True, valid=(dt.timedelta(days=-10), dt.timedelta(days=3650)))
    return {"root": root, "inter": inter, "other": other_root,
            "other_inter": make_cert("client intermediate CA", other_root, ca=True)}


@pytest.fixture(scope="module")
def verifier(pki: dict[str, Issuer]) -> ClientCertVerifier:
    pem = pki["root"].cert.public_bytes(serialization.Encoding.PEM)
    return ClientCertVerifier(pem, clock=NOW.timestamp)


DNS = x509.DNSName
URI = x509.UniformResourceIdentifier


def ME(client_id: str) -> x509.UniformResourceIdentifier:  # noqa: N802 - reads like DNS(...) and URI(...)
    """A SAN naming a sidecar client: urn:fhir-sidecar:client:<id>."""
    return x509.UniformResourceIdentifier("urn:fhir-sidecar:client:" + client_id)


# (name, leaf kwargs, expected client id)
GOOD: list[tuple[str, dict[str, Any], str]] = [
    ("uri SAN", {"cn": "ignored-cn", "san": [DNS("ignored.example"), ME("lab-app")]}, "lab-app"),
    ("uri SAN wins over other URIs", {"cn": "x", "san": [URI("https://app.example"), ME("a.b_c-1")]},
     "a.b_c-1"),
    ("same uri twice", {"cn": "x", "san": [ME("app"), ME("app")]}, "app"),
    ("first DNS SAN", {"cn": "ignored-cn", "san": [DNS("scribe.example.org"), DNS("second.example.org")]},
     "scribe.example.org"),
    ("DNS SAN when the URI is not ours", {"cn": "x", "san": [URI("https://app.example/"), DNS("app2")]}, "app2"),
    # cryptography's client policy requires a SAN: a CN-only id needs a SAN without URI/DNS names
    ("subject CN", {"cn": "billing", "san": [x509.IPAddress(ipaddress.ip_address("10.0.0.7"))]}, "billing"),
    ("CN with e-mail SAN", {"cn": "scheduler", "san": [x509.RFC822Name("ops@example.org")]}, "scheduler"),
    ("EKU with serverAuth and clientAuth",
     {"cn": "x", "san": [DNS("multi")], "eku": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)},
     "multi"),
]


@pytest.mark.parametrize(("name", "kw", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_good_chain_yields_client_id(pki, verifier, name, kw, expected) -> None:
    leaf = make_cert(kw.pop("cn"), pki["inter"], **kw)
    assert verifier.verify(der(leaf, pki["inter"])) == expected


def test_leaf_signed_directly_by_the_root(pki, verifier) -> None:
    leaf = make_cert("x", pki["root"], san=[ME("direct")])
    assert verifier.verify(der(leaf)) == "direct"


def _leaf(**kw: Any) -> Callable[[dict[str, Issuer]], list[bytes]]:
    cn = kw.pop("cn", "x")
    issuer = kw.pop("issuer", "inter")
    return lambda pki: der(make_cert(cn, pki[issuer], **kw), pki[issuer])


# (name, chain builder, expected reason)
BAD: list[tuple[str, Callable[[dict[str, Issuer]], list[bytes]], str]] = [
    ("expired leaf", _leaf(san=[DNS("app")], valid=(dt.timedelta(days=-30), dt.timedelta(days=-1))),
     "client certificate expired or not yet valid"),
    ("leaf not yet valid", _leaf(san=[DNS("app")], valid=(dt.timedelta(days=1), dt.timedelta(days=30))),
     "client certificate expired or not yet valid"),
    ("wrong CA", _leaf(san=[DNS("app")], issuer="other_inter"), "client certificate not trusted"),
    ("self-signed leaf", lambda pki: der(make_cert("app", san=[DNS("app")])), "client certificate not trusted"),
    ("missing intermediate", lambda pki: der(make_cert("x", pki["inter"], san=[DNS("app")])),
     "client certificate not trusted"),
    ("serverAuth-only leaf", _leaf(san=[DNS("app")], eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
     "client certificate not for TLS client authentication"),
    ("no EKU", _leaf(san=[DNS("app")], eku=None), "client certificate not for TLS client authentication"),
    ("KU without digitalSignature", _leaf(san=[DNS("app")], digital_signature=False),
     "client certificate not for TLS client authentication"),
    ("no SAN (CN only)", _leaf(cn="app"), "client certificate not trusted"),
    ("CA certificate as leaf", lambda pki: der(pki["inter"], pki["root"]), "client certificate is a CA certificate"),
    ("malformed id in URI SAN", _leaf(san=[ME("../etc/passwd")]),
     "client certificate names no valid client id"),
    ("empty id in URI SAN", _leaf(san=[ME("")]), "client certificate names no valid client id"),
    ("id too long", _leaf(san=[ME("" + "a" * 65)]),
     "client certificate names no valid client id"),
    ("leading dot", _leaf(san=[DNS(".hidden")]), "client certificate names no valid client id"),
    ("wildcard DNS", _leaf(san=[DNS("*.example.org")]), "client certificate names no valid client id"),
    ("CN with spaces", _leaf(cn="lab app", san=[x509.RFC822Name("a@example.org")]),
     "client certificate names no valid client id"),
    ("two CNs and no usable SAN", _leaf(cn=("app-a", "app-b"), san=[x509.RFC822Name("a@example.org")]),
     "client certificate names no valid client id"),
    # an empty subject needs a critical SAN (RFC 5280): the path validator refuses it first
    ("empty subject", _leaf(cn=None, san=[x509.RFC822Name("a@example.org")]), "client certificate not trusted"),
    ("two different client URIs", _leaf(san=[ME("a"), ME("b")]),
     "client certificate names several clients"),
    ("empty chain", lambda pki: [], "no client certificate"),
    ("garbage DER", lambda pki: [b"\x30\x03\x02\x01\x01"], "malformed client certificate"),
    ("too many certificates", lambda pki: der(pki["inter"]) * 9, "client certificate chain too long"),
]


@pytest.mark.parametrize(("name", "build", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_chain_rejected(pki, verifier, name, build, reason) -> None:
    with pytest.raises(CertificateRejected) as ei:
        verifier.verify(build(pki))
    assert ei.value.reason == reason
    assert str(ei.value) == reason
    assert ei.value.__cause__ is None and ei.value.__context__ is None


def test_intermediate_expired_later_than_clock(pki) -> None:
    """Validation uses the injected clock for the whole chain, not the wall clock."""
    leaf = make_cert("x", pki["inter"], san=[DNS("app")])
    pem = pki["root"].cert.public_bytes(serialization.Encoding.PEM)
    late = ClientCertVerifier(pem, clock=(NOW + dt.timedelta(days=400)).timestamp)
    with pytest.raises(CertificateRejected):
        late.verify(der(leaf, pki["inter"]))


def test_ca_bundle_with_several_roots(pki) -> None:
    pem = b"".join(pki[n].cert.public_bytes(serialization.Encoding.PEM) for n in ("other", "root"))
    v = ClientCertVerifier(pem, clock=NOW.timestamp)
    leaf = make_cert("x", pki["other_inter"], san=[DNS("from-other")])
    assert v.verify(der(leaf, pki["other_inter"])) == "from-other"


BAD_PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("pem", [b"", b"not a certificate", BAD_PEM])
def test_unusable_ca_bundle_is_a_config_error(pem: bytes) -> None:
    with pytest.raises(ConfigError):
        ClientCertVerifier(pem)
