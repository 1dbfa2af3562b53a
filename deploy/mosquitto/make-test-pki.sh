#!/bin/sh
# Make a throw-away CA and a server certificate for a test broker (not for production).
#   sh make-test-pki.sh OUTDIR [HOSTNAME]
# Writes ca.crt ca.key server.crt server.key into OUTDIR. The server certificate is
# valid for HOSTNAME (default localhost), localhost and 127.0.0.1.
set -eu
out=${1:?usage: $0 OUTDIR [HOSTNAME]}
host=${2:-localhost}
days=${DAYS:-365}
mkdir -p "$out"; cd "$out"
printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$host" > server.ext
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=fedge test CA" -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=$host" -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" -sha256 -extfile server.ext -out server.crt
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "wrote $out/ca.crt $out/ca.key $out/server.crt $out/server.key"
