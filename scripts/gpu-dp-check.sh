#!/usr/bin/env bash
# Data parallelism on GPUs (NCCL): on a machine with two or more NVIDIA GPUs, trains the demo
# model's SFT run on 2 ranks (`--nproc-per-node 2`, 2 examples per rank) and in one process with
# the doubled batch (4), and compares the loss and the adapters (≤ 1e-5 relative per tensor in
# bf16-free f32 training; the CPU/MPI test in CI holds 1e-6). On a one-GPU machine it runs the
# same training with world size 1 and says so. Needs what scripts/gpu-check.sh needs (nvcc, Rust).
#   scripts/gpu-dp-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/gpu}"
cargo build --profile fast-release -p server --features cuda
bin="$CARGO_TARGET_DIR/fast-release/llamafactory"
work=$(mktemp -d)
"$bin" demo --out "$work/model" --dataset-dir data >/dev/null
cat >"$work/cfg.yaml" <<YAML
model_name_or_path: $work/model
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
dataset: demo_sft
dataset_dir: $PWD/data
template: qwen
cutoff_len: 64
max_samples: 33
num_train_epochs: 2
gradient_accumulation_steps: 2
logging_steps: 1
save_strategy: "no"
learning_rate: 1.0e-3
report_to: none
YAML
if [ "$gpus" -lt 2 ]; then
  echo "gpu-dp-check: $gpus GPU(s) here: running with world size 1 (no NCCL exchange is exercised)"
  "$bin" train "$work/cfg.yaml" output_dir="$work/one" per_device_train_batch_size=4
  exit 0
fi
"$bin" train "$work/cfg.yaml" output_dir="$work/one" per_device_train_batch_size=4
"$bin" train "$work/cfg.yaml" output_dir="$work/two" per_device_train_batch_size=2 --nproc-per-node 2
python3 - "$work" <<'PY'
import json, math, struct, sys, array
work = sys.argv[1]
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]; a = array.array("f"); a.frombytes(b[8 + n + s:8 + n + e]); out[k] = a
    return out
a, b = load(f"{work}/one/adapter_model.safetensors"), load(f"{work}/two/adapter_model.safetensors")
worst = max(math.sqrt(sum((x - y) ** 2 for x, y in zip(a[k], b[k])) / max(sum(x * x for x in a[k]), 1e-30)) for k in a)
la = json.load(open(f"{work}/one/all_results.json"))["train_loss"]
lb = json.load(open(f"{work}/two/all_results.json"))["train_loss"]
print(f"train_loss one process {la:.8f} vs 2 ranks {lb:.8f}; adapters differ by {worst:.2e} (relative, worst tensor)")
sys.exit(0 if worst <= 1e-5 and abs(la - lb) <= 1e-5 * abs(la) else 1)
PY
