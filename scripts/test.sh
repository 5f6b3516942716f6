#!/usr/bin/env bash
# The whole test suite: unit and integration tests (`cargo test`), then LlamaBoard in a real
# headless Chromium (tests/e2e/board.mjs; needs Debian's `chromium` and Node.js).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
# The browser test needs the bundle; a debug build is enough and builds faster.
scripts/build-web.sh debug
cargo test --workspace --locked
(cd tests/e2e && npm ci --no-audit --no-fund --silent)
LLAMAFACTORY_BIN="$target_dir/debug/llamafactory" \
SCREENSHOTS="$target_dir/e2e-screenshots" \
  node tests/e2e/board.mjs
