#!/usr/bin/env bash
# Runs the whole test suite: formatting and lints, every unit and end-to-end test against real
# RocksDB, then the end-to-end tests again against a real Apache Kafka broker, which this
# script starts on loopback (compose/kafka.sh) and stops at the end. Installs missing build
# packages first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
bash scripts/setup.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== tests on the embedded log"
cargo test --workspace --locked

echo "== tests on a real Kafka broker"
bash compose/kafka.sh fetch
bash compose/kafka.sh start
trap 'bash compose/kafka.sh stop' EXIT
bash compose/kafka.sh wait --timeout 120
export CHARTLOG_TEST_KAFKA_BOOTSTRAP
CHARTLOG_TEST_KAFKA_BOOTSTRAP=$(bash compose/kafka.sh bootstrap)
CHARTLOG_TEST_LOG=kafka CHARTLOG_TEST_KAFKA_PARTITIONS=3 cargo test --locked --test api --test corpus --test crash
# The fault tests stop and restart the broker, so they run alone, one at a time.
CHARTLOG_TEST_LOG=kafka cargo test --locked --features kafka-tests --test kafka -- --test-threads=1

echo "== replication tests on a three-broker Kafka cluster"
bash compose/kafka.sh stop
bash compose/kafka.sh start --brokers 3
bash compose/kafka.sh wait --timeout 120
CHARTLOG_TEST_KAFKA_BOOTSTRAP=$(bash compose/kafka.sh bootstrap)
CHARTLOG_TEST_LOG=kafka CHARTLOG_TEST_KAFKA_BROKERS=3 cargo test --locked --features kafka-tests --test replication
