"""Dev-only: our GGUF export of the families beyond Llama/Qwen, run by llama.cpp itself.

For Llama, Qwen3 and GLM-4 (byte-level BPE: the demo tokenizer), makes a tiny random bf16 model with transformers, exports it with `llamafactory export … export_format=gguf`, loads the
file with llama.cpp (`llama-cpp-python`) and compares its logits on a token sequence with
transformers' on the same weights. Not run in CI.

    pip install llama-cpp-python   # builds llama.cpp
    python scripts/gguf_family_check.py target/release/llamafactory
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, AutoTokenizer, Glm4Config, LlamaConfig, Qwen3Config

BIN = sys.argv[1]
REPO = os.path.join(os.path.dirname(__file__), "..")
TOK = os.path.join(REPO, "tests", "fixtures", "demo-tokenizer")
COMMON = dict(vocab_size=801, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2,
              tie_word_embeddings=False)
MODELS = {
    "llama": LlamaConfig(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=16),
    "glm4": Glm4Config(**COMMON, head_dim=16, partial_rotary_factor=0.5),
}
IDS = [5, 17, 42, 99, 300, 7, 61, 230, 11, 780, 45, 3]
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif n.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif "embed" in n or "lm_head" in n:
                    p.mul_(25.0)
        src = os.path.join(tmp, name)
        model.to(torch.bfloat16).save_pretrained(src)
        AutoTokenizer.from_pretrained(TOK).save_pretrained(src)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            want = ref(torch.tensor([IDS])).logits[0].numpy()
        out = os.path.join(tmp, f"{name}-gguf")
        cfg_file = os.path.join(tmp, f"{name}.yaml")
        with open(cfg_file, "w") as fh:
            fh.write(f"model_name_or_path: {src}\nexport_dir: {out}\nexport_format: gguf\n"
                     "export_gguf_type: f16\ntemplate: empty\n")
        subprocess.run([BIN, "export", cfg_file], check=True)
        gguf = [f for f in os.listdir(out) if f.endswith(".gguf")][0]
        llm = Llama(os.path.join(out, gguf), logits_all=True, n_ctx=64, verbose=bool(os.environ.get("VERBOSE")))
        llm.eval(IDS)
        got = np.array(llm.scores[: len(IDS)])
        err = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, err)
        print(f"{name}: llama.cpp vs transformers, max relative logit difference {err:.2e}")
print("worst", worst)
sys.exit(0 if worst < 2e-2 else 1)
