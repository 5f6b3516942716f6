"""Dev-only: a randomly initialised model of SmolLM-135M's shape (Llama, hidden 576, 30 layers,
9 heads / 3 KV heads, MLP 1536, a 49,152-entry tied vocabulary), bf16 on disk as real
checkpoints ship, for `llamafactory bench e2e` runs at a real vocabulary size.

The tokenizer is copied from a model folder given on the command line (the demo model's: build it
with `llamafactory demo --out DIR`); it uses the first ids of the vocabulary only, which is
enough for speed and memory: the LM head and the loss cost what the model's vocabulary costs.

    python scripts/make_bench_model.py --tokenizer-from models/demo --out /tmp/smol135m
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-from", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    src_cfg = json.loads((a.tokenizer_from / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=src_cfg.get("bos_token_id"),
        eos_token_id=src_cfg.get("eos_token_id"),
        pad_token_id=src_cfg.get("pad_token_id"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        src = a.tokenizer_from / f
        if src.exists():
            shutil.copy(src, a.out / f)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.out}: {n / 1e6:.1f}M parameters, vocabulary {cfg.vocab_size}")


if __name__ == "__main__":
    main()
