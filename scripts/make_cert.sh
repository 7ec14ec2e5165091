#!/usr/bin/env bash
# A self-signed TLS certificate for Traefik, for a test machine or a host without a public CA yet.
# It is its own CA, so clients trust it by pointing at cert.pem (curl --cacert, httpx verify=...).
# Usage: make_cert.sh DOMAIN [OUTDIR]   (OUTDIR defaults to traefik/certs; writes cert.pem, key.pem)
set -euo pipefail

DOMAIN="${1:?usage: make_cert.sh DOMAIN [OUTDIR]}"
OUTDIR="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/traefik/certs}"
DAYS="${CERT_DAYS:-825}"  # browsers reject longer-lived leaf certificates

command -v openssl >/dev/null || { echo "[make-cert] ERROR: openssl is not installed" >&2; exit 1; }
mkdir -p "$OUTDIR"

san="DNS:$DOMAIN,DNS:localhost,IP:127.0.0.1"
# An IP literal given as DOMAIN must be an IP SAN, or clients never match it.
if [[ "$DOMAIN" =~ ^[0-9.]+$ || "$DOMAIN" == *:* ]]; then
    san="IP:$DOMAIN,DNS:localhost,IP:127.0.0.1"
fi

# Write to temporary names first so a failed run never leaves a key without its certificate.
umask 077
openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days "$DAYS" \
    -subj "/CN=$DOMAIN" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,digitalSignature,keyCertSign" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$OUTDIR/key.pem.partial" -out "$OUTDIR/cert.pem.partial" 2>/dev/null
chmod 644 "$OUTDIR/cert.pem.partial"
mv "$OUTDIR/key.pem.partial" "$OUTDIR/key.pem"
mv "$OUTDIR/cert.pem.partial" "$OUTDIR/cert.pem"
echo "[make-cert] wrote $OUTDIR/cert.pem and $OUTDIR/key.pem for $DOMAIN (+ localhost, 127.0.0.1)" >&2
