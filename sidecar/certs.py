"""`fhir-sidecar certs init`: the forward-mode CA that apps trust for TLS interception.

Written in mitmproxy's confdir layout (`mitmproxy-ca.pem` = key + certificate, 0600;
`mitmproxy-ca-cert.pem` = certificate only), so `listen.confdir` can point at the folder.
The private key never leaves it and `certs/.gitignore` keeps it out of git.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
GITIGNORE = "# private keys never go into git\nmitmproxy-ca.pem\n*.key\n*-key.pem\n*.p12\n"


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def init_ca(folder: Path, *, force: bool = False, days: int = 825) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / "mitmproxy-ca.pem", folder / "mitmproxy-ca-cert.pem"
    if key_path.exists() and not force:
        raise FileExistsError(f"{key_path} exists (use --force to replace it: every app must then trust the new CA)")
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir-sidecar forward-mode CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fhir-sidecar")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write(key_path, key_pem + cert_pem, 0o600)
    _write(cert_path, cert_pem, 0o644)
    gi = folder / ".gitignore"
    if not gi.exists():
        gi.write_text(GITIGNORE)
    combined = folder / "ca-bundle-combined.pem"
    system = next((Path(p) for p in SYSTEM_BUNDLES if Path(p).exists()), None)
    _write(combined, (system.read_bytes() if system else b"") + cert_pem, 0o644)
    return f"""created {key_path} (0600: key + certificate; mitmproxy confdir layout) and {cert_path}
set `listen.confdir: {folder}` for forward/transparent mode. Apps trust the CA like this:
  Python requests / httpx : REQUESTS_CA_BUNDLE={combined}  (or SSL_CERT_FILE={combined})
  Node.js                 : NODE_EXTRA_CA_CERTS={cert_path}
  Java                    : keytool -importcert -alias fhir-sidecar -file {cert_path} -keystore <truststore> -storepass <pw>
  curl / OpenSSL           : SSL_CERT_FILE={combined}   (SSL_CERT_FILE replaces the system store: use the combined bundle)
{combined} = the system roots{'' if system else ' (none found here)'} + the sidecar CA."""
