"""Dev-only: LongLoRA's shifted short attention (S²-Attn) as LLaMA-Factory's `model/model_utils/longlora.py` computes it,
for trainer/tests/s2attn.rs. Its patch needs transformers 4.45–4.47:

    pip install transformers==4.47.1 'tokenizers<0.22' --no-deps --target /tmp/tf447
    PYTHONPATH=/tmp/tf447 python scripts/s2attn_reference.py      # writes tests/fixtures/s2attn.json

LLaMA-Factory 0.9.5's `llama_attention_forward` never assigns its `attn_output.reshape(bsz, q_len, …)` before rolling the
shifted heads back, so the roll happens inside each group instead of over the sequence. The fixture holds the logits
of the function as LongLoRA means it (that one line assigned: `fixed`), of the function as shipped (`shipped`), and of
the model in eval mode (full attention), for the tiny Llama fixture in training mode on two rows of 16 tokens, the
second with 5 padding tokens.
"""
import inspect
import json
import os

import torch
import transformers
from llamafactory.model.model_utils import longlora
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

assert transformers.__version__.startswith("4.47"), transformers.__version__
REPO = os.path.join(os.path.dirname(__file__), "..")
source = inspect.getsource(longlora.llama_attention_forward)
bug = "        attn_output.reshape(bsz, q_len, self.num_heads, self.head_dim)\n"
assert bug in source
namespace = dict(vars(longlora))
exec(source.replace(bug, "        attn_output = attn_output.reshape(bsz, q_len, self.num_heads, self.head_dim)\n"),
     namespace)
fixed = namespace["llama_attention_forward"]

model = AutoModelForCausalLM.from_pretrained(os.path.join(REPO, "tests", "fixtures", "models", "llama"),
                                             torch_dtype=torch.float32, attn_implementation="eager")
model.config.group_size_ratio = 0.25
torch.manual_seed(0)
rows = [[int(x) for x in torch.randint(3, 90, (16,))], [int(x) for x in torch.randint(3, 90, (11,))] + [0] * 5]
input_ids = torch.tensor(rows)
attention_mask = torch.tensor([[1] * 16, [1] * 11 + [0] * 5])
out = {"input_ids": rows, "lens": [16, 11]}
with torch.no_grad():
    model.eval()
    out["full"] = model(input_ids=input_ids, attention_mask=attention_mask).logits.flatten().tolist()
    model.train()
    for name, forward in [("fixed", fixed), ("shipped", longlora.llama_attention_forward)]:
        LlamaAttention.forward = forward
        out[name] = model(input_ids=input_ids, attention_mask=attention_mask).logits.flatten().tolist()
with open(os.path.join(REPO, "tests", "fixtures", "s2attn.json"), "w") as fh:
    json.dump(out, fh)
print({k: len(v) for k, v in out.items()})
