"""Dev-only: BAdam's ratio mode as `badam.BlockOptimizerRatio` (badam 1.4) runs it under LLaMA-Factory
(`badam_mode: ratio`), on fixed gradients, for trainer/src/train/badam_ratio.rs's tests.

    python scripts/badam_ratio_reference.py      # writes tests/fixtures/optim/badam_ratio.json

LLaMA-Factory's call: the [no-decay, decay] groups, `update_ratio`, `mask_mode`, `include_embedding=False` (the head
stays frozen too, BlockOptimizerRatio's default), torch AdamW's lr / betas / eps; `switch_every` is not passed, so it is
100 there — here 3, to see the masks move within seven steps. Gradients reach the optimizer through backward (its
sparsifying hook runs on gradient accumulation): each step's loss is Σ p·g, so the gradient is g. Adjacent masks only:
scatter masks come from torch's generator.
"""
import json
import os

import torch
from badam import BlockOptimizerRatio

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "optim")
names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.bias",
         "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
         "model.layers.1.mlp.up_proj.bias", "model.norm.weight", "lm_head.weight"]
shapes = {n: ((4, 3) if n.endswith("up_proj.weight") or "embed" in n or "lm_head" in n else (3, 5) if "down" in n
              else (3,) if "norm" in n else (4,)) for n in names}
torch.manual_seed(2)
init = {n: torch.randn(shapes[n]) for n in names}
grads = [{n: torch.randn(shapes[n]) for n in names} for _ in range(7)]
cases = []
for ratio in [0.3, 0.5]:
    params = {n: torch.nn.Parameter(init[n].clone()) for n in names}
    nodecay = [p for n, p in params.items() if "bias" in n or "norm" in n]
    decay = [p for n, p in params.items() if not ("bias" in n or "norm" in n)]
    opt = BlockOptimizerRatio(param_groups=[dict(params=nodecay, weight_decay=0.0),
                                            dict(params=decay, weight_decay=0.1)],
                              named_parameters_list=list(params.items()), update_ratio=ratio, mask_mode="adjacent",
                              verbose=0, include_embedding=False, switch_every=3, lr=0.01, betas=(0.9, 0.999),
                              eps=1e-8)
    steps = []
    for g in grads:
        for p in params.values():
            p.grad = None
        loss = sum((p * g[n]).sum() for n, p in params.items() if p.requires_grad)
        loss.backward()
        opt.step()
        steps.append({n: p.detach().flatten().tolist() for n, p in params.items()})
    cases.append({"ratio": ratio, "steps": steps})
with open(os.path.join(OUT, "badam_ratio.json"), "w") as fh:
    json.dump({"names": names, "shapes": {n: list(s) for n, s in shapes.items()},
               "init": {n: v.flatten().tolist() for n, v in init.items()},
               "grads": [{n: v.flatten().tolist() for n, v in g.items()} for g in grads],
               "lr": 0.01, "switch_every": 3, "cases": cases}, fh)
print(len(cases), "cases")
