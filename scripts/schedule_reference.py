"""Dev-only: the learning-rate factors of `transformers.get_scheduler` for the schedules the
Train tab offers, as the expectations of `trainer/src/train/schedule.rs`'s tests and of the
scheduler test in `tests/train.rs`.

    python scripts/schedule_reference.py

Needs `pip install torch transformers` (not used in CI or at run time). Extra arguments are
LLaMA-Factory's: `cosine_with_min_lr` gets `min_lr_rate: 0.1` (its web UI), and
`warmup_stable_decay` gets `create_custom_scheduler`'s split (a third of the steps after warmup
stable, the rest decay).
"""
import json

import torch
from transformers import get_scheduler


def factors(name, warmup, total, steps, peak=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    kwargs = {}
    if name == "cosine_with_min_lr":
        kwargs = {"min_lr_rate": 0.1}
    if name == "warmup_stable_decay":
        remaining = total - warmup
        stable = remaining // 3
        kwargs = {"num_stable_steps": stable, "num_decay_steps": remaining - stable}
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


if __name__ == "__main__":
    cases = {
        "cosine_with_restarts (warmup 2, total 10)": factors("cosine_with_restarts", 2, 10, 10),
        "warmup_stable_decay (warmup 2, total 11)": factors("warmup_stable_decay", 2, 11, 11),
    }
    # tests/train.rs trains 6 steps at learning rate 1e-3 with warmup_steps 1; each logged line
    # holds the rate its step used (transformers 5 logs the applied rate).
    for name in ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                 "warmup_stable_decay"]:
        cases[f"{name} (lr 1e-3, warmup 1, total 6), used by steps 1..6"] = \
            factors(name, 1, 6, 6, peak=1e-3)[:-1]
    print(json.dumps(cases, indent=1))
