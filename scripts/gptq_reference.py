"""Dev-only: GPTQ of one linear layer by AutoGPTQ 0.7.1 (the `auto_gptq.quantization.GPTQ` and `Quantizer` optimum
ran for transformers' `GPTQConfig`, and its `QuantLinear.pack`), for trainer/tests/gptq.rs.

The wheel's pure-PyTorch files are used as they are, without its CUDA kernels:

    pip download auto_gptq==0.7.1 --no-deps -d /tmp/agptq && cd /tmp/agptq && unzip -o auto_gptq-0.7.1-*.whl
    PYTHONPATH=/tmp/agptq python scripts/gptq_reference.py     # writes tests/fixtures/gptq/layer.safetensors

A 96×256 weight and 8 calibration samples of 64 correlated inputs; three cases as LLaMA-Factory's export runs them
(`damp_percent` 0.1, `desc_act` false, `sym` true): 4 bits in groups of 128 (its default), 3 bits in groups of 32
(groups that start inside a 128-column block), 2 bits in groups of 128. Written per case: the dequantized weight GPTQ
leaves in the layer, and the packed checkpoint tensors (`qweight`, `qzeros`, `scales`, `g_idx`).
"""
import os

import torch
from safetensors.torch import save_file

torch.cuda.synchronize = lambda *a, **k: None  # AutoGPTQ times itself with it; there is no GPU here
from auto_gptq.quantization import GPTQ  # noqa: E402
from auto_gptq.nn_modules.qlinear.qlinear_cuda_old import QuantLinear  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..")
torch.manual_seed(0)
rows, cols, samples, tokens = 96, 256, 8, 64
weight = torch.randn(rows, cols) * 0.05
x = (torch.randn(samples * tokens, 32) @ torch.randn(32, cols) + 0.1 * torch.randn(samples * tokens, cols)).float()
out = {"weight": weight.clone(), "inputs": x.clone()}
for bits, group in [(4, 128), (3, 32), (2, 128)]:
    layer = torch.nn.Linear(cols, rows, bias=False)
    layer.weight.data = weight.clone()
    g = GPTQ(layer)
    g.quantizer.configure(bits, perchannel=True, sym=True, mse=False)
    for s in range(samples):
        g.add_batch(x[s * tokens:(s + 1) * tokens].unsqueeze(0), None)
    scale, zero, g_idx = g.fasterquant(blocksize=128, percdamp=0.1, group_size=group, actorder=False,
                                       static_groups=False)
    case = f"b{bits}g{group}"
    out[f"{case}.dequantized"] = layer.weight.data.clone()
    q = QuantLinear(bits, group, cols, rows, bias=False)
    layer.weight.data = layer.weight.data.half()
    q.pack(layer, scale.half(), zero, g_idx)
    for name in ["qweight", "qzeros", "scales", "g_idx"]:
        out[f"{case}.{name}"] = getattr(q, name).contiguous()
    print(case, {k: tuple(v.shape) for k, v in out.items() if k.startswith(case)})
save_file(out, os.path.join(REPO, "tests", "fixtures", "gptq", "layer.safetensors"))
