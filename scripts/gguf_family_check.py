"""Dev-only: our GGUF export of every family, run by llama.cpp itself.

For each family, makes a tiny random bf16 model with transformers, exports it with
`llamafactory export … export_format=gguf`, loads the file with llama.cpp (`llama-cpp-python`) and
compares its logits on a token sequence with transformers' on the same weights. The byte-level BPE
families use the demo tokenizer; Gemma, Phi-3, Mixtral and Baichuan 2 a SentencePiece
`tokenizer.model` (tests/fixtures/spm), whose ids in llama.cpp are compared with SentencePiece's too.
Baichuan 2 (remote code) is written in its own layout from a Llama, referenced by that Llama with the
head normalized. Not run in CI.

    pip install llama-cpp-python   # builds llama.cpp
    python scripts/gguf_family_check.py target/release/llamafactory [FAMILY ...]
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from llama_cpp import Llama
import json
import shutil

import sentencepiece as spm
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig, GemmaConfig,
                          Glm4Config, LlamaConfig, LlamaForCausalLM, MixtralConfig, Phi3Config, Qwen2MoeConfig,
                          Qwen3Config, Qwen3MoeConfig)

BIN = sys.argv[1]
ONLY = set(sys.argv[2:])  # optional family names
REPO = os.path.join(os.path.dirname(__file__), "..")
TOK = os.path.join(REPO, "tests", "fixtures", "demo-tokenizer")
COMMON = dict(vocab_size=801, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2,
              tie_word_embeddings=False)
DATA = os.environ.get("LLAMAFACTORY_DATA", os.path.join(REPO, "..", "shared", "compat", "llamafactory-data"))
BAICHUAN_SPM = os.path.join(REPO, "tests", "fixtures", "spm", "baichuan_like", "tokenizer.model")
S = dict(COMMON, vocab_size=2400, bos_token_id=1, eos_token_id=2)  # the SentencePiece fixture's vocabulary
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
MODELS = {
    "llama": LlamaConfig(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=16),
    "glm4": Glm4Config(**COMMON, head_dim=16, partial_rotary_factor=0.5),
    "gemma": GemmaConfig(**{**S, "tie_word_embeddings": True}, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    # llama.cpp's fixed choices: attention scale head_dim^-0.5, Gemma 3's five local layers in six.
    "gemma2": Gemma2Config(**{**S, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3_text": Gemma3TextConfig(**{**S, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16,
                                    sliding_window=4, rope_theta=1e6, rope_local_base_freq=10000.0,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # LongRoPE beyond the original 8 positions (llama.cpp takes the long factors when n_ctx exceeds it).
    "phi3": Phi3Config(**{**S, "max_position_embeddings": 64}, partial_rotary_factor=0.75,
                       original_max_position_embeddings=8,
                       rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 2.5, 3.0, 3.5],
                                     "long_factor": [1.5, 3.0, 8.0, 9.0, 10.0, 12.0]}),
    "mixtral": MixtralConfig(**S, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=80, norm_topk_prob=False),
    "qwen3_moe": Qwen3MoeConfig(**COMMON, **MOE, head_dim=16, norm_topk_prob=True),
    # llama.cpp runs Baichuan at the 7B shape: 32 layers.
    "baichuan": LlamaConfig(**{**S, "num_hidden_layers": 32, "num_key_value_heads": 4}),
}
SENTENCEPIECE = {"gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "baichuan"}
TEXTS = ["Hello world", "two  spaces and a 🦙", "你好，世界", "The quick brown fox 12345"]


def baichuan_folder(model, src):
    """Baichuan 2's layout (W_pack, unnormalized NormHead, config) from a Llama; returns the reference
    Llama (head rows normalized, as NormHead does)."""
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = (sd["lm_head.weight"].float() * (0.5 + 3 * torch.rand(sd["lm_head.weight"].shape[0], 1))
                            ).to(torch.bfloat16)
    out = {}
    for k, v in sd.items():
        if ".k_proj." in k or ".v_proj." in k:
            continue
        if ".q_proj." in k:
            out[k.replace("q_proj", "W_pack")] = torch.cat([sd[k.replace("q_proj", x)]
                                                           for x in ("q_proj", "k_proj", "v_proj")])
        else:
            out[k] = v
    os.makedirs(src, exist_ok=True)
    torch.save(out, os.path.join(src, "pytorch_model.bin"))
    c = model.config
    json.dump({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "vocab_size": c.vocab_size,
               "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
               "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
               "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, open(os.path.join(src, "config.json"), "w"))
    ref = LlamaForCausalLM(c).eval()
    sd = {k: v.float() for k, v in sd.items()}
    sd["lm_head.weight"] = F.normalize(sd["lm_head.weight"])
    ref.load_state_dict(sd)
    return ref
IDS = [5, 17, 42, 99, 300, 7, 61, 230, 11, 780, 45, 3]
worst = 0.0
with tempfile.TemporaryDirectory() as tmp:
    # A Llama 2 / Gemma style SentencePiece model: identity normalization, dummy prefix, byte fallback.
    text = [r[k] for f in ("alpaca_en_demo.json", "alpaca_zh_demo.json")
            for r in json.load(open(os.path.join(DATA, f))) for k in ("instruction", "output")]
    SPM = os.path.join(tmp, "tokenizer.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=SPM[:-6], model_type="bpe",
                                   vocab_size=2400, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, byte_fallback=True, character_coverage=0.98,
                                   pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    for name, cfg in MODELS.items():
        if ONLY and name not in ONLY:
            continue
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
                elif n.endswith("mlp.gate.weight") or n.endswith("block_sparse_moe.gate.weight"):
                    p.mul_(40.0)  # decisive routers: a near-tie must not flip between implementations
        src = os.path.join(tmp, name)
        if name == "baichuan":
            ref = baichuan_folder(model, src)
        else:
            model.to(torch.bfloat16).save_pretrained(src)
            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
        if name in SENTENCEPIECE:
            shutil.copy(BAICHUAN_SPM if name == "baichuan" else SPM, src)
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False},
                      open(os.path.join(src, "tokenizer_config.json"), "w"))
        else:
            AutoTokenizer.from_pretrained(TOK).save_pretrained(src)
        with torch.no_grad():
            want = ref(torch.tensor([IDS])).logits[0].numpy()
        # (Not "phi3": llama.cpp sets Phi-3 token attributes by general.name, which needs Phi-3's own
        # special tokens in the vocabulary.)
        out = os.path.join(tmp, f"{name.replace('phi3', 'p3')}-gguf")
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
        if name in SENTENCEPIECE:
            sp = spm.SentencePieceProcessor(model_file=BAICHUAN_SPM if name == "baichuan" else SPM)
            for text in TEXTS:
                ours = llm.tokenize(text.encode(), add_bos=False, special=False)
                if ours != sp.encode(text):
                    print(f"  tokenizer differs on {text!r}: llama.cpp {ours}, sentencepiece {sp.encode(text)}")
                    worst = 1.0
print("worst", worst)
sys.exit(0 if worst < 2e-2 else 1)
