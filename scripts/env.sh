# Sourced by the scripts: one cargo target directory outside the clone, so that a fresh clone
# reuses the compiled dependencies (RocksDB takes about 12 minutes to build on 2 cores).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/chartlog/target}
