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
