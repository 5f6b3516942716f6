#!/usr/bin/env bash
# Builds the browser bundle of LlamaBoard into $CARGO_TARGET_DIR/site (default target/site):
# the Leptos app compiled to wasm32 with `hydrate`, then wasm-bindgen's JS glue.
# Usage: scripts/build-web.sh [release|debug]   (release: size-optimized, the default)
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
target_dir="${CARGO_TARGET_DIR:-target}"
# The wasm-bindgen CLI must be exactly the version of the `wasm-bindgen` crate in Cargo.lock.
wbg_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
tools="${LLAMAFACTORY_TOOLS:-$HOME/.cache/llamafactory-tools}"
export PATH="$tools/bin:$HOME/.cargo/bin:$PATH"

if ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
  echo "==> adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$wbg_version" ]; then
  echo "==> building wasm-bindgen-cli $wbg_version from source (once, a few minutes)"
  # Not --locked: its lockfile pins a crate version missing from the index. Without a clippy
  # wrapper (.ci/run lints our crates while building them; not this tool).
  env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS \
    cargo install wasm-bindgen-cli --version "$wbg_version" --root "$tools"
fi

if [ "$profile" = release ]; then
  # Not `--cfg erase_components` (a third smaller): hydration then needs the server built with it too.
  cargo build -p frontend --lib --target wasm32-unknown-unknown --features hydrate --profile wasm-release --locked
  wasm="$target_dir/wasm32-unknown-unknown/wasm-release/frontend.wasm"
else
  cargo build -p frontend --lib --target wasm32-unknown-unknown --features hydrate --locked
  wasm="$target_dir/wasm32-unknown-unknown/debug/frontend.wasm"
fi
site="$target_dir/site"
rm -rf "$site.tmp" && mkdir -p "$site.tmp/pkg"
wasm-bindgen --target web --no-typescript --out-dir "$site.tmp/pkg" --out-name frontend "$wasm"
# Release: shrink with wasm-opt from npm's binaryen package (a wasm build run by node; never
# Debian's binaryen 108, which corrupts wasm-bindgen output). Skipped with a note without node.
if [ "$profile" = release ]; then
  wasm_opt="$tools/binaryen/node_modules/.bin/wasm-opt"
  if [ ! -x "$wasm_opt" ] && command -v npm >/dev/null; then
    echo "==> installing wasm-opt (npm binaryen@132.0.0)"
    mkdir -p "$tools/binaryen" && npm install --prefix "$tools/binaryen" --no-audit --no-fund --silent binaryen@132.0.0
  fi
  if [ -x "$wasm_opt" ]; then
    "$wasm_opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
      "$site.tmp/pkg/frontend_bg.wasm" -o "$site.tmp/pkg/frontend_bg.wasm"
  else
    echo "note: npm not found; the bundle is not shrunk with wasm-opt"
  fi
fi
rm -rf "$site" && mv "$site.tmp" "$site"
raw=$(cat "$site"/pkg/* | wc -c)
gz=$(cat "$site"/pkg/* | gzip -9 | wc -c)
echo "==> browser bundle in $site: $((raw / 1024)) KiB, $((gz / 1024)) KiB gzipped"
