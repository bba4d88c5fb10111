#!/usr/bin/env bash
# Creates a private certificate authority and the TLS keys and certificates that
# docker-compose.yml mounts: one per broker (kafka-1 to kafka-3), one for the topic-creating
# admin client and one for Chartlog. Needs openssl and keytool (from any JDK).
#
# Usage: make-certs.sh [DIR]   (default: the secrets folder next to this script)
#
# It is meant for staging and trials. In production, issue the certificates from your own CA,
# and keep the same file names. Existing files are never overwritten: delete DIR to start again.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly SECRETS_DIR=${1:-$SCRIPT_DIR/secrets}
# Validity of every certificate, in days.
readonly VALIDITY_DAYS=825

die() {
    echo "make-certs.sh: error: $*" >&2
    exit 1
}

command -v openssl >/dev/null || die "openssl not found; install OpenSSL"
command -v keytool >/dev/null || die "keytool not found; install a JDK (Java 17 or newer)"
[[ ! -e $SECRETS_DIR/ca.crt ]] || die "$SECRETS_DIR already contains a CA; delete the folder to create new certificates"

# The containers run as users other than the one running this script, so the files they mount
# are world-readable. The folder itself is private (mode 700), which keeps other users of this
# machine out, while a container can access only the subfolder mounted into it.
mkdir -p "$SECRETS_DIR"
chmod 700 "$SECRETS_DIR"
cd "$SECRETS_DIR"
umask 022

random_password() {
    openssl rand -hex 24
}

# Issues a key and a certificate signed by the CA, for client and server use.
# $1 is the file prefix, $2 the common name and $3 the subjectAltName list.
issue_certificate() {
    local prefix=$1 common_name=$2 alt_names=$3
    openssl req -new -newkey rsa:2048 -nodes -keyout "$prefix.key" -out "$prefix.csr" \
        -subj "/O=Chartlog/CN=$common_name" 2>/dev/null
    openssl x509 -req -in "$prefix.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$VALIDITY_DAYS" -sha256 -out "$prefix.crt" \
        -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$alt_names") \
        2>/dev/null
    rm "$prefix.csr"
}

# Writes the PKCS12 keystore, the PKCS12 truststore and the three password files that the
# apache/kafka image reads from /etc/kafka/secrets. PKCS12 has one password for the store and
# its key, so keystore_creds and key_creds contain the same value.
write_java_stores() {
    local dir=$1 password
    password=$(random_password)
    openssl pkcs12 -export -name kafka -in "$dir/tls.crt" -inkey "$dir/tls.key" \
        -certfile ca.crt -out "$dir/kafka.keystore.p12" -passout "pass:$password"
    local keytool_output
    if ! keytool_output=$(keytool -importcert -noprompt -alias chartlog-ca -file ca.crt \
        -storetype PKCS12 -keystore "$dir/kafka.truststore.p12" -storepass "$password" 2>&1); then
        die "keytool failed to write $dir/kafka.truststore.p12: $keytool_output"
    fi
    printf '%s' "$password" >"$dir/keystore_creds"
    printf '%s' "$password" >"$dir/key_creds"
    printf '%s' "$password" >"$dir/truststore_creds"
    rm "$dir/tls.key" "$dir/tls.crt"
    # openssl writes key material with mode 600 whatever the umask.
    chmod 644 "$dir/kafka.keystore.p12"
}

openssl req -new -x509 -newkey rsa:3072 -nodes -keyout ca.key -out ca.crt \
    -days "$VALIDITY_DAYS" -sha256 -subj "/O=Chartlog/CN=Chartlog Kafka CA" 2>/dev/null
chmod 600 ca.key

for node in 1 2 3; do
    mkdir -p "kafka-$node"
    issue_certificate "kafka-$node/tls" "kafka-$node" "DNS:kafka-$node"
    write_java_stores "kafka-$node"
done

mkdir -p admin
issue_certificate admin/tls chartlog-admin "DNS:chartlog-admin"
write_java_stores admin

# librdkafka, which Chartlog uses, reads PEM files.
mkdir -p chartlog
issue_certificate chartlog/client chartlog "DNS:chartlog"
chmod 644 chartlog/client.key
cp ca.crt chartlog/ca.crt

echo "make-certs.sh: wrote the CA and the certificates to $SECRETS_DIR"
echo "make-certs.sh: ca.key signs new certificates; keep it away from the running services"
