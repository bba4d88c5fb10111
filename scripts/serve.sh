#!/usr/bin/env bash
# Builds and starts the server on the embedded default. Arguments go to `chartlog serve`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
bash scripts/setup.sh
cargo build --locked --bin chartlog
exec "$CARGO_TARGET_DIR/debug/chartlog" serve "$@"
