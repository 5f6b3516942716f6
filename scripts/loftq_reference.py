"""Dev-only: PEFT's LoftQ (what LLaMA-Factory's scripts/loftq_init.py runs) on the tiny Llama fixture, for
trainer/tests/loftq.rs.

    python scripts/loftq_reference.py      # writes tests/fixtures/loftq/

PEFT's own normal-float quantizer is used (bitsandbytes' 4-bit path needs a GPU): `is_bnb_4bit_available` is patched
to False. For q_proj and v_proj (rank 4), with `loftq_iter` 1 and 4, 4 bits (and 2 bits, iter 1): the dequantized base
`Q` and the adapter `A`, `B`; plus the quantizer's 4- and 2-bit tables.
"""
import os

import peft.utils.loftq_utils as lu
import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

lu.is_bnb_4bit_available = lambda: False
REPO = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(REPO, "tests", "fixtures", "loftq")
os.makedirs(OUT, exist_ok=True)
out = {"table4": lu.NFQuantizer(num_bits=4, device="cpu").norm_lookup_table.float(),
       "table2": lu.NFQuantizer(num_bits=2, device="cpu").norm_lookup_table.float()}
for bits, iters in [(4, 1), (4, 4), (2, 1)]:
    base = AutoModelForCausalLM.from_pretrained(os.path.join(REPO, "tests", "fixtures", "models", "llama"),
                                                dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights="loftq",
                                            loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters)))
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = f"{bits}bit_iter{iters}.{name.removeprefix('base_model.model.')}"
            out[f"{key}.Q"] = module.base_layer.weight.detach().clone()
            out[f"{key}.A"] = module.lora_A["default"].weight.detach().clone()
            out[f"{key}.B"] = module.lora_B["default"].weight.detach().clone()
save_file(out, os.path.join(OUT, "loftq.safetensors"))
print(len(out), "tensors", out["table4"].tolist())
