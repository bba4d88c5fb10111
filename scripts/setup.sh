#!/usr/bin/env bash
# Installs what building Chartlog needs on a fresh Debian machine: clang and libclang for the
# RocksDB bindings, cmake and the OpenSSL, SASL, zlib and curl headers for librdkafka, and
# Java and Maven for the local Kafka broker of the tests. Idempotent: does nothing when
# everything is present.
set -euo pipefail

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
# librdkafka, built from source by the rdkafka crate, links OpenSSL, Cyrus SASL, zlib and curl.
# The local Kafka broker of the tests (compose/kafka.sh) runs on Java 17, fetched with Maven.
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
for package in libssl-dev libsasl2-dev zlib1g-dev libcurl4-openssl-dev; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
    missing+=(libclang-dev)
fi
if ((${#missing[@]} > 0)); then
    echo "setup: installing ${missing[*]}" >&2
    sudo_cmd=()
    if [[ $(id -u) -ne 0 ]]; then
        sudo_cmd=(sudo)
    fi
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
