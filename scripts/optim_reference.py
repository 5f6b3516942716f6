"""Dev-only: reference optimizer steps for trainer/src/train/optim.rs's tests (GaLore; BAdam and APOLLO when added):
the packages LLaMA-Factory uses, run on fixed gradients.

    python scripts/optim_reference.py      # writes tests/fixtures/optim/galore.json

GaLore: `galore_torch.GaLoreAdamW` with LLaMA-Factory's parameter groups (a bias without decay; two weights with
decay and the GaLore keys), lr 0.01, three steps of seeded gradients, for every `galore_proj_type`, the projection
made on the first step (update interval 200). Also one run whose projection refreshes every step (interval 1).
Epsilon is 1e-3: galore_torch takes its SVDs in f32, so projected components that are zero in exact arithmetic come
out near 1e-7, and with a tiny epsilon Adam's m/(√v+ε) would amplify that rounding noise into the weights.
"""
import json
import os

import torch
from galore_torch import GaLoreAdamW

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "optim")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
shapes = {"w_tall": (6, 4), "w_wide": (3, 8), "bias": (5,)}
init = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
grads = [{k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()} for _ in range(3)]
cases = []
for proj_type, gap in [("std", 200), ("reverse_std", 200), ("right", 200), ("left", 200), ("full", 200), ("std", 1)]:
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = GaLoreAdamW([
        dict(params=[params["bias"]], weight_decay=0.0),
        dict(params=[params["w_tall"], params["w_wide"]], weight_decay=0.01, rank=2, update_proj_gap=gap, scale=0.25,
             proj_type=proj_type),
    ], lr=0.01, betas=(0.9, 0.999), eps=1e-3)
    steps = []
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        steps.append({k: p.detach().flatten().tolist() for k, p in params.items()})
    cases.append({"proj_type": proj_type, "update_interval": gap, "steps": steps})
with open(os.path.join(OUT, "galore.json"), "w") as fh:
    json.dump({"shapes": {k: list(s) for k, s in shapes.items()},
               "init": {k: v.flatten().tolist() for k, v in init.items()},
               "grads": [{k: v.flatten().tolist() for k, v in g.items()} for g in grads],
               "rank": 2, "scale": 0.25, "lr": 0.01, "eps": 1e-3, "weight_decay": 0.01, "cases": cases}, fh)
print(len(cases), "cases")

# BAdam (layer mode), as LLaMA-Factory builds it: torch AdamW over [no-decay group, decay group] wrapped in
# `badam.BlockOptimizer` with the blocks it infers from the names (one per `layers.N.`; embeddings and the head never
# train), a switch every 3 steps, ascending and descending, seven steps of seeded gradients.
from badam import BlockOptimizer  # noqa: E402

names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.bias",
         "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.1.mlp.up_proj.bias", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"]
bshapes = {n: ((4, 3) if n.endswith("proj.weight") or "embed" in n else (3,) if "norm" in n else (4,)) for n in names}
torch.manual_seed(1)
binit = {n: torch.randn(bshapes[n]) for n in names}
bgrads = [{n: torch.randn(bshapes[n]) for n in names} for _ in range(7)]
bcases = []
for mode in ["ascending", "descending"]:
    params = {n: torch.nn.Parameter(binit[n].clone()) for n in names}
    decay = [p for n, p in params.items() if "bias" not in n and "norm" not in n]
    nodecay = [p for n, p in params.items() if "bias" in n or "norm" in n]
    base = torch.optim.AdamW([dict(params=nodecay, weight_decay=0.0), dict(params=decay, weight_decay=0.1)], lr=0.01,
                             betas=(0.9, 0.999), eps=1e-8)
    opt = BlockOptimizer(base_optimizer=base, named_parameters_list=list(params.items()), block_prefix_list=None,
                         switch_block_every=3, start_block=None, switch_mode=mode, verbose=0)
    steps = []
    for g in bgrads:
        for n, p in params.items():
            p.grad = g[n].clone() if p.requires_grad else None
        opt.step()
        steps.append({n: p.detach().flatten().tolist() for n, p in params.items()})
    bcases.append({"switch_mode": mode, "steps": steps})
with open(os.path.join(OUT, "badam.json"), "w") as fh:
    json.dump({"names": names, "shapes": {n: list(s) for n, s in bshapes.items()},
               "init": {n: v.flatten().tolist() for n, v in binit.items()},
               "grads": [{n: v.flatten().tolist() for n, v in g.items()} for g in bgrads],
               "lr": 0.01, "weight_decay": 0.1, "switch_interval": 3, "cases": bcases}, fh)
print(len(bcases), "badam cases")

# APOLLO: `apollo_torch.APOLLOAdamW` with LLaMA-Factory's groups (a bias without decay; two weights with decay and the
# APOLLO keys), the SVD projection (`apollo_proj: svd`, deterministic; its random projection draws from torch's
# generator, which an engine outside torch cannot reproduce), both scale types and three projection sides, three
# steps (the norm-growth limiter acts from the second).
from apollo_torch import APOLLOAdamW  # noqa: E402

acases = []
for proj_type, scale_type in [("std", "channel"), ("std", "tensor"), ("right", "tensor"), ("left", "tensor")]:
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = APOLLOAdamW([
        dict(params=[params["bias"]], weight_decay=0.0),
        dict(params=[params["w_tall"], params["w_wide"]], weight_decay=0.01, rank=2, proj="svd", proj_type=proj_type,
             update_proj_gap=200, scale=4.0, scale_type=scale_type),
    ], lr=0.01, betas=(0.9, 0.999), eps=1e-3)
    steps = []
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        steps.append({k: p.detach().flatten().tolist() for k, p in params.items()})
    acases.append({"proj_type": proj_type, "scale_type": scale_type, "steps": steps})
with open(os.path.join(OUT, "apollo.json"), "w") as fh:
    json.dump({"scale": 4.0, "cases": acases}, fh)
print(len(acases), "apollo cases")
