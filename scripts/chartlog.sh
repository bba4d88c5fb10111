#!/usr/bin/env bash
# Builds (if needed) and runs a Chartlog binary: `scripts/chartlog.sh chartlog token ...` or
# `scripts/chartlog.sh chartlog-replay verify ...`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
binary=${1:?usage: scripts/chartlog.sh chartlog|chartlog-replay|chartlog-bench ARGS...}
shift
bash scripts/setup.sh
cargo build --quiet --locked --workspace --bins
cd - >/dev/null
exec "$CARGO_TARGET_DIR/debug/$binary" "$@"
