#!/usr/bin/env bash
# One short run on a machine with an NVIDIA GPU, the CUDA toolkit (nvcc) and Rust: builds the
# CUDA binary, checks logits, loss and LoRA gradients on the GPU against the CPU (f32 and
# bf16), then times LoRA training of a 0.5B-class shape (tokens/s, MFU) and decoding.
#   scripts/gpu-check.sh                      # 0.5B shape, batch 4 × 512, bf16, 10 steps
#   scripts/gpu-check.sh --batch 8 --seq 1024 # any `llamafactory bench device` option
# Budget: the build is the long part (candle's CUDA kernels, a few minutes on 16 cores); the
# checks and timings take about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null; then
  echo "gpu-check: nvcc not found; install the CUDA toolkit or put its bin/ on PATH" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  # candle's kernels are compiled for this architecture (e.g. 90 for H100/H200).
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
fi
# cudarc (candle's CUDA binding) names the toolkits it knows; a newer one builds against the
# newest bindings it has, which the driver API keeps compatible.
release="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
read -r major minor <<<"$release"
if [ -z "${CUDARC_CUDA_VERSION:-}" ] && { [ "$major" -gt 13 ] || { [ "$major" -eq 13 ] && [ "$minor" -gt 4 ]; }; }; then
  export CUDARC_CUDA_VERSION=13040
fi
nvcc --version | tail -1

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/gpu}"
start=$(date +%s)
cargo build --profile fast-release -p server --features cuda
echo "build: $(( $(date +%s) - start )) s"
"$CARGO_TARGET_DIR/fast-release/llamafactory" env
"$CARGO_TARGET_DIR/fast-release/llamafactory" bench device --config 0.5b --steps 10 "$@"
