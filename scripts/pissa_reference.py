"""Dev-only: PEFT's PiSSA on the tiny Llama fixture, for trainer/tests/pissa.rs.

    python scripts/pissa_reference.py      # writes tests/fixtures/pissa/

init.safetensors: for each adapted module (q_proj, v_proj; r 4, alpha 8, `init_lora_weights="pissa"`, exact SVD) the
initial `A`, `B` and the residual base weight. Then the conversion LLaMA-Factory runs for `pissa_convert`: the
initial adapter saved with `init_lora_weights=True` (pissa_init/), A and B moved as training would
(trained.safetensors), and PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)` output
(converted/).
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

REPO = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(REPO, "tests", "fixtures", "pissa")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_pretrained(os.path.join(REPO, "tests", "fixtures", "models", "llama"),
                                            dtype=torch.float32)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                        init_lora_weights="pissa"))
init = {}
for name, module in model.named_modules():
    if hasattr(module, "lora_A") and "default" in module.lora_A:
        key = name.removeprefix("base_model.model.")
        init[f"{key}.A"] = module.lora_A["default"].weight.detach().clone()
        init[f"{key}.B"] = module.lora_B["default"].weight.detach().clone()
        init[f"{key}.residual"] = module.base_layer.weight.detach().clone()
save_file(init, os.path.join(OUT, "init.safetensors"))
model.peft_config["default"].init_lora_weights = True
model.save_pretrained(os.path.join(OUT, "pissa_init"))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.add_(0.05 * torch.randn_like(p))
trained = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
save_file(trained, os.path.join(OUT, "trained.safetensors"))
model.save_pretrained(os.path.join(OUT, "converted"),
                      path_initial_model_for_weight_conversion=os.path.join(OUT, "pissa_init"))
print(sorted(init)[:3], sorted(trained)[:2], os.listdir(os.path.join(OUT, "converted")))
