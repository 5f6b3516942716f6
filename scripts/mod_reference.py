"""Dev-only: Mixture-of-Depths as the `mixture-of-depth` package (1.2.0, what LLaMA-Factory's `mixture_of_depths`
imports) computes it, for trainer/tests/depths.rs.

LLaMA-Factory 0.9.5's own two paths do not run with the package: `convert` (`apply_mod_to_hf` on a transformers model)
fails under transformers 4.57 (the decoder layer is called with keywords `MoD.forward` takes positionally) and 4.47
(the routed tokens get the whole sequence's rotary tables); `load` calls `AutoMoDModelForCausalLM.from_pretrained` with
keyword arguments only, and the package reads `args[0]`. The package's own `LlamaMoDForCausalLM` (its copy of
transformers' Llama with every odd layer wrapped in `MoD`) runs under transformers 4.47 with SDPA attention: this
script uses it.

    pip install mixture-of-depth==1.2.0 --no-deps
    pip install transformers==4.47.1 'tokenizers<0.22' --no-deps --target /tmp/tf447
    PYTHONPATH=/tmp/tf447 python scripts/mod_reference.py

writes tests/fixtures/models/llama-mod (a tiny routed 4-layer Llama in bf16, as `save_pretrained` saves it) and
tests/fixtures/depths.json: for two rows of 16 tokens, the losses of three training passes (capacity 1, 0.5625,
0.4167), the first pass's gradients (in float64), and the logits in eval mode after them and of a freshly loaded model (capacity
0.125), and greedy decoding with the KV cache.
"""
import json
import os
import shutil

import torch
import transformers
from MoD.modeling.models.LlamaMoD import LlamaMoDForCausalLM
from transformers import LlamaConfig

assert transformers.__version__.startswith("4.47"), transformers.__version__
REPO = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(REPO, "tests", "fixtures", "models", "llama-mod")

config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6,
                     initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                     attn_implementation="sdpa")
torch.manual_seed(0)
model = LlamaMoDForCausalLM(config)
with torch.no_grad():
    for layer in model.model.layers[1::2]:
        layer.router.weight_predictor.weight.normal_(0.0, 1.0)
        layer.router.weight_predictor.bias.normal_(0.0, 0.1)
shutil.rmtree(OUT, ignore_errors=True)
model.to(torch.bfloat16).save_pretrained(OUT)
print(json.load(open(os.path.join(OUT, "config.json")))["architectures"])

def load(dtype=torch.float32):
    return LlamaMoDForCausalLM.from_pretrained(OUT, torch_dtype=dtype, attn_implementation="sdpa")

torch.manual_seed(1)
# Both rows full: with padding the package's SDPA path cuts the 4-D mask to the wrong size.
rows = [[int(x) for x in torch.randint(3, 90, (16,))] for _ in range(2)]
lens = [16, 16]
input_ids = torch.tensor(rows)
position_ids = torch.arange(16).expand(2, 16)  # the package indexes them per row
# `use_cache=False` in the full passes, as LLaMA-Factory trains (`config.use_cache = False`): with a cache, the package
# appends each row's routed keys to one shared cache in turn, so the second row attends to the first row's tokens.
labels = torch.tensor([[t if i < n else -100 for i, t in enumerate(r)] for r, n in zip(rows, lens)])
out = {"input_ids": rows, "lens": lens, "losses": [], "capacities": []}

# Router score gaps: a near tie would make the test depend on rounding.
gaps = []
def watch(module, args, output):
    s = output.detach().sort(dim=-1).values
    gaps.append(float((s[:, 1:] - s[:, :-1]).min()))

# The training passes in float64 (the routers compute in f32 whatever the model's dtype, as the package has it): a
# router's gradient is a sum of large terms that cancel, which f32 leaves accurate to about 1 %.
m = load(torch.float64)
for layer in m.model.layers[1::2]:
    layer.router.register_forward_hook(watch)
m.train()
for step in range(3):
    m.zero_grad()
    loss = m(input_ids=input_ids, position_ids=position_ids, use_cache=False, labels=labels).loss
    out["losses"].append(loss.item())
    out["capacities"].append(m.model.layers[1].capacity)
    if step == 0:
        loss.backward()
        names = ["model.layers.1.router.weight_predictor.weight", "model.layers.1.router.weight_predictor.bias",
                 "model.layers.3.router.weight_predictor.weight", "model.layers.1.block.self_attn.q_proj.weight",
                 "model.layers.3.block.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.embed_tokens.weight"]
        params = dict(m.named_parameters())
        out["grads"] = {n: params[n].grad.flatten().tolist() for n in names}
print("smallest score gap", min(gaps))
assert min(gaps) > 1e-4
with torch.no_grad():
    m.eval().float()
    out["eval_logits"] = m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.flatten().tolist()
    fresh = load().eval()
    out["fresh_logits"] = fresh(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.flatten().tolist()
    prompt = torch.tensor([rows[0][:10]])
    try:
        gen = fresh.generate(prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompt))
        out["prompt"] = rows[0][:10]
        out["greedy"] = gen[0, 10:].tolist()
    except Exception as e:  # recorded so the note can say it
        print("generate fails:", type(e).__name__, e)
with open(os.path.join(REPO, "tests", "fixtures", "depths.json"), "w") as fh:
    json.dump(out, fh)
print(out["losses"], out["capacities"], out.get("greedy"))
