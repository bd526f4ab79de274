set -eu
# fhir-sidecar CA setup, run by the `ca-setup` init container (the sidecar's UID, no capabilities).
#
# mitmproxy's confdir (CONFDIR, a memory-backed emptyDir only the sidecar mounts) gets the CA:
# from the kubernetes.io/tls Secret mounted at CA_SECRET_DIR when there is one, or a fresh CA made
# here, whose key never leaves the pod. When BUNDLE_DIR is set, the app's combined bundle is
# written there: the system roots (SYSTEM_CA_FILE) + the sidecar CA certificate, because
# SSL_CERT_FILE replaces the system store instead of adding to it. The bundle holds no key.

umask 077
if [ -n "${CA_SECRET_DIR:-}" ] && [ -f "$CA_SECRET_DIR/tls.key" ]; then
  cat "$CA_SECRET_DIR/tls.key" "$CA_SECRET_DIR/tls.crt" > "$CONFDIR/mitmproxy-ca.pem"
  cat "$CA_SECRET_DIR/tls.crt" > "$CONFDIR/mitmproxy-ca-cert.pem"
else
  python -c 'import sys, pathlib
from mitmproxy.certs import CertStore
CertStore.create_store(pathlib.Path(sys.argv[1]), "mitmproxy", 2048,
                       organization="fhir-sidecar", cn="fhir-sidecar pod CA")' "$CONFDIR"
fi

if [ -n "${BUNDLE_DIR:-}" ]; then
  umask 022
  cat "$SYSTEM_CA_FILE" "$CONFDIR/mitmproxy-ca-cert.pem" > "$BUNDLE_DIR/ca-bundle.pem.tmp"
  mv "$BUNDLE_DIR/ca-bundle.pem.tmp" "$BUNDLE_DIR/ca-bundle.pem"
fi
echo "fhir-sidecar CA ready in $CONFDIR"
