"""Dev-only: LLaMA-Factory's block expansion (its `scripts/llama_pro.py`, which is not in the pip package: pass the
path of a LLaMA-Factory checkout's copy) run on tiny fixtures, for trainer/tests/llama_pro.rs.

    python scripts/llama_pro_reference.py /path/to/LLaMA-Factory/scripts/llama_pro.py   # writes tests/fixtures/llama_pro/

The script imports `shard_checkpoint`, which transformers removed in 4.47: a one-shard stand-in is patched in, and the
tokenizer step is skipped (the fixtures have none). Cases: the untied Llama fixture expanded by 1 block (after layer 1)
and the tied Qwen2 fixture by 2 (after each layer).
"""
import importlib.util
import os
import sys
import types

import transformers
import transformers.modeling_utils as mu

mu.shard_checkpoint = lambda state_dict, max_shard_size, weights_name: ({weights_name: dict(state_dict)}, None)
mu.SAFE_WEIGHTS_INDEX_NAME = getattr(mu, "SAFE_WEIGHTS_INDEX_NAME", "model.safetensors.index.json")
mu.WEIGHTS_INDEX_NAME = getattr(mu, "WEIGHTS_INDEX_NAME", "pytorch_model.bin.index.json")


class _NoTokenizer:
    @staticmethod
    def from_pretrained(*_, **__):
        return types.SimpleNamespace(save_pretrained=lambda *_: None)


transformers.AutoTokenizer = _NoTokenizer
sys.modules.setdefault("fire", types.SimpleNamespace(Fire=lambda f: None))
sys.modules.setdefault("tqdm", types.SimpleNamespace(tqdm=lambda x, **_: x))
spec = importlib.util.spec_from_file_location("llama_pro", sys.argv[1])
llama_pro = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llama_pro)

REPO = os.path.join(os.path.dirname(__file__), "..")
for name, n in [("llama", 1), ("qwen2", 2)]:
    out = os.path.join(REPO, "tests", "fixtures", "llama_pro", name)
    os.makedirs(out, exist_ok=True)
    llama_pro.block_expansion(os.path.join(REPO, "tests", "fixtures", "models", name), out, n)
    print(name, sorted(os.listdir(out)))
