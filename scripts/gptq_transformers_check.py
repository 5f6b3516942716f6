"""Dev-only: a GPTQ export of ours loads in transformers (through GPTQModel's CPU kernels) as the same model our
loader reads. Run from the repository root with a release or debug `llamafactory` built:

    pip install gptqmodel            # with BUILD_CUDA_EXT=0 on a machine without CUDA
    python scripts/gptq_transformers_check.py target/debug/llamafactory

It builds the demo model (its MLP widened to 384), exports it with `export_quantization_bit: 4` (calibration: demo_pt), then exports that GPTQ
folder again without quantization (our loader's dequantized weights, float32), and compares: every quantized module's
weight as GPTQModel dequantizes it against ours, and the logits of transformers' GPTQ model against those of the
dequantized copy.
"""
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

bin_path = os.path.abspath(sys.argv[1])
repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
work = tempfile.mkdtemp()


def run(*args):
    subprocess.run([bin_path, *args], cwd=work, check=True)


run("demo", "--out", "model", "--dataset-dir", os.path.join(repo, "data"))
# GPTQModel's CPU kernels need widths in multiples of 16 (the demo MLP has 344): the same model with 384.
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
cfg = LlamaConfig.from_pretrained(os.path.join(work, "model"))
cfg.intermediate_size = 384
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(os.path.join(work, "model"))
with open(os.path.join(work, "gptq.yaml"), "w") as f:
    f.write(f"model_name_or_path: model\ntemplate: default\nexport_dir: gptq\nexport_quantization_bit: 4\n"
            f"export_quantization_dataset: demo_pt\ndataset_dir: {repo}/data\nexport_quantization_nsamples: 32\n"
            f"export_quantization_maxlen: 8\n")
with open(os.path.join(work, "dense.yaml"), "w") as f:
    f.write("model_name_or_path: gptq\ntemplate: default\nexport_dir: dense\ninfer_dtype: float32\n")
run("export", "gptq.yaml")
run("export", "dense.yaml")

quantized = AutoModelForCausalLM.from_pretrained(os.path.join(work, "gptq"), device_map="cpu", dtype=torch.float16)
dense = AutoModelForCausalLM.from_pretrained(os.path.join(work, "dense"), dtype=torch.float32)
ours = dict(dense.named_parameters())
worst = 0.0
count = 0
for name, module in quantized.named_modules():
    if hasattr(module, "dequantize_weight"):
        # GPTQModel returns (in, out).
        theirs = module.dequantize_weight().float().t()
        mine = ours[name + ".weight"].float()
        worst = max(worst, (theirs - mine).abs().max().item())
        count += 1
print(f"{count} quantized modules; largest weight difference between GPTQModel's and our dequantization: {worst:.3g}")
assert count > 0 and worst < 1e-3
ids = torch.tensor([[1, 17, 42, 99, 256, 7, 300, 12, 5, 64]])
try:
    with torch.no_grad():
        a = quantized(ids).logits.float()
        b = dense(ids).logits.float()
    print(f"logits: largest difference {(a - b).abs().max().item():.3g} (scale {b.abs().max().item():.3g})")
except RuntimeError as e:  # GPTQModel's CPU kernels want widths in multiples of 16 (the demo MLP has 344)
    print(f"transformers' forward did not run on this shape: {e}")
