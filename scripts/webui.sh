#!/usr/bin/env bash
# Installs what is missing (the wasm target, wasm-bindgen-cli), builds the server and the browser
# bundle in release mode, then starts LlamaBoard at http://127.0.0.1:7860 with this folder as the
# work dir (the demo model is built on first start). Arguments go to `llamafactory webui`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-web.sh release
# The bundle is built into the binary (server/build.rs picks it up from target/site).
# With Open MPI installed, CPU runs can use several ranks (LlamaBoard's device count).
features=()
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  features=(--features mpi)
fi
cargo build --profile fast-release --locked -p server "${features[@]}"
exec "${CARGO_TARGET_DIR:-target}/fast-release/llamafactory" webui "$@"
