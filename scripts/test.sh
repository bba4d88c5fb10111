#!/usr/bin/env bash
# Runs the whole test suite: formatting and lints, then every unit and end-to-end test
# against real RocksDB. Installs missing build packages first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
bash scripts/setup.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
