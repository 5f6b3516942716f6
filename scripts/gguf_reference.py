"""Dev-only: GGUF files written by llama.cpp's own `gguf` Python package, for the GGUF-as-base
tests (`trainer/tests/gguf_base.rs`), and each one's dequantized twin in safetensors.

    python scripts/gguf_reference.py

Needs `pip install gguf numpy safetensors` (not used in CI or at run time). From the tiny
`tests/fixtures/models/{qwen2,llama}` checkpoints it writes `tests/fixtures/gguf/<name>.gguf`
(Q8_0 and Q4_0 linear weights, F32 norms and embeddings, llama.cpp's names, the interleaved
q/k rows of the llama architecture, a byte-level BPE tokenizer in `tokenizer.ggml.*`) and
`tests/fixtures/gguf/<name>-twin/` (config.json and model.safetensors holding what
`gguf.quants.dequantize` makes of every tensor, back under Hugging Face names and row order).
"""
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/gguf"

NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    layer, rest = hf[len("model.layers."):].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def permute(w, heads):  # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(name, arch):
    src = ROOT / "tests/fixtures/models" / name
    cfg = json.loads((src / "config.json").read_text())
    weights = {k: v.astype(np.float32) for k, v in load_file(src / "model.safetensors").items()}
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    w = gguf.GGUFWriter(OUT / f"{name}.gguf", arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    # A byte-level BPE vocabulary of the model's size: the first byte symbols and one merge.
    vocab = cfg["vocab_size"]
    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0x17F)]
    tokens = symbols[: vocab - 3] + [symbols[0] + symbols[1], "<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch != "llama" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges([f"{tokens[0]} {tokens[1]}"])
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    twin = {}
    for i, (hf, t) in enumerate(sorted(weights.items())):
        g = gguf_name(hf)
        if arch == "llama" and g.endswith("attn_q.weight"):
            t = permute(t, heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            t = permute(t, kv)
        if t.ndim == 2 and ".layers." in hf:
            qtype = Q.Q8_0 if i % 2 else Q.Q4_0
            data = gguf.quants.quantize(t, qtype)
            back = gguf.quants.dequantize(data, qtype)
            w.add_tensor(g, data, raw_dtype=qtype)
        else:
            back = t
            w.add_tensor(g, t)
        if arch == "llama" and g.endswith("attn_q.weight"):
            back = unpermute(back, heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            back = unpermute(back, kv)
        twin[hf] = np.ascontiguousarray(back, dtype=np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    twin_dir = OUT / f"{name}-twin"
    shutil.rmtree(twin_dir, ignore_errors=True)
    twin_dir.mkdir(parents=True)
    save_file(twin, twin_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", twin_dir / "config.json")
    print(f"wrote {OUT / (name + '.gguf')} and {twin_dir}")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    convert("qwen2", "qwen2")
    convert("llama", "llama")
