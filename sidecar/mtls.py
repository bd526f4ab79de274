"""Client-certificate verification for `mtls` clients.

mitmproxy asks for a client certificate but accepts any (its verify callback returns True), so the chain
is verified here: against `identity.client_ca` only, at the validation time of our clock, for TLS client
authentication (RFC 5280 path validation by ``cryptography.x509.verification``, which needs a SAN and an
AKI on the leaf). The TLS handshake itself proved possession of the leaf's private key, so the caller
must pass the certificate the handshake was made with as ``chain_der[0]``.

The client id: the first URI SAN ``urn:fhir-sidecar:client:<id>``, else the first DNS SAN, else the
subject CN. Anything unexpected is ``CertificateRejected`` with a fixed ``reason``.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from sidecar.config import ConfigError

__all__ = ["CLIENT_URI_PREFIX", "CertificateRejected", "ClientCertVerifier"]

CLIENT_URI_PREFIX = "urn:fhir-sidecar:client:"
# The `clients[].id` shape (no leading "." either): an id no client can have is rejected early.
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
MAX_CHAIN = 8
MAX_CERT_BYTES = 16_384


class CertificateRejected(Exception):
    """The certificate proves nothing. ``reason`` is a fixed phrase, safe to log and to return."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientCertVerifier:
    def __init__(self, ca_pem: bytes, *, clock: Callable[[], float] = time.time) -> None:
        try:
            cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ConfigError("identity.client_ca: no PEM certificates found") from None
        self._store = Store(cas)
        self._clock = clock

    def verify(self, chain_der: Sequence[bytes]) -> str:
        """Verify a presented chain (leaf first) and return the client id it proves."""
        reason = "client certificate rejected"
        try:
            return self._verify(chain_der)
        except CertificateRejected as e:
            reason = e.reason
        except Exception:  # noqa: BLE001 - anything unexpected rejects
            pass
        raise CertificateRejected(reason)  # fresh, without a chained library error

    def _verify(self, chain_der: Sequence[bytes]) -> str:
        if not chain_der:
            raise CertificateRejected("no client certificate")
        if len(chain_der) > MAX_CHAIN or any(len(d) > MAX_CERT_BYTES for d in chain_der):
            raise CertificateRejected("client certificate chain too long")
        try:
            certs = [x509.load_der_x509_certificate(bytes(d)) for d in chain_der]
        except ValueError:
            raise CertificateRejected("malformed client certificate") from None
        leaf, intermediates = certs[0], certs[1:]
        now = datetime.datetime.fromtimestamp(self._clock(), tz=datetime.timezone.utc)
        # Checked here too, not only by the path validator: these are the rules this module promises.
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise CertificateRejected("client certificate expired or not yet valid")
        _check_leaf_usage(leaf)
        verifier = PolicyBuilder().store(self._store).time(now).max_chain_depth(MAX_CHAIN).build_client_verifier()
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError:
            raise CertificateRejected("client certificate not trusted") from None
        client_id = _client_id(leaf)
        if client_id is None or not _CLIENT_ID.fullmatch(client_id):
            raise CertificateRejected("client certificate names no valid client id")
        return client_id


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    bc = _ext(leaf, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        # a CA certificate from the chain must never stand in for the client itself
        raise CertificateRejected("client certificate is a CA certificate")
    eku = _ext(leaf, x509.ExtendedKeyUsage)
    # explicit clientAuth required: a certificate without EKU is not "for any purpose" here
    if not isinstance(eku, x509.ExtendedKeyUsage) or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateRejected("client certificate not for TLS client authentication")
    ku = _ext(leaf, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.digital_signature:
        raise CertificateRejected("client certificate not for TLS client authentication")


def _client_id(leaf: x509.Certificate) -> str | None:
    san = _ext(leaf, x509.SubjectAlternativeName)
    if isinstance(san, x509.SubjectAlternativeName):
        ids = [u[len(CLIENT_URI_PREFIX):] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
               if u.startswith(CLIENT_URI_PREFIX)]
        if ids:
            # two different client ids in one certificate: which client is it? (refused, not "the first")
            if len(set(ids)) > 1:
                raise CertificateRejected("client certificate names several clients")
            return ids[0]
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    cn = cns[0].value
    return cn if isinstance(cn, str) else None
