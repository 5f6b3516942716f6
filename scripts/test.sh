#!/usr/bin/env bash
# The whole test suite: unit and integration tests (`cargo test`), then LlamaBoard in a real
# headless Chromium (tests/e2e/board.mjs; needs Debian's `chromium` and Node.js).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
# The browser test needs the bundle; a debug build is enough and builds faster.
scripts/build-web.sh debug
# The data-parallel tests (tests/data_parallel.rs: mpirun, the launcher, a killed rank) need
# Open MPI; CI installs it and must run them.
features=()
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  features=(--features server/mpi)
elif [ "${CI:-}" = true ]; then
  echo "error: CI runs the data-parallel tests: install Open MPI (apt-get install libopenmpi-dev openmpi-bin libclang-dev)" >&2
  exit 1
else
  echo "note: Open MPI not found, the data-parallel tests are skipped (apt-get install libopenmpi-dev openmpi-bin libclang-dev)"
fi
cargo test --workspace --locked "${features[@]}"
(cd tests/e2e && npm ci --no-audit --no-fund --silent)
LLAMAFACTORY_BIN="$target_dir/debug/llamafactory" \
SCREENSHOTS="$target_dir/e2e-screenshots" \
  node tests/e2e/board.mjs
