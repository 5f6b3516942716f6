"""Dev-only: tiny random models of each supported architecture, with reference logits from
`transformers` (and PEFT adapters), for trainer/tests/model_reference.rs.

    python scripts/make_reference_models.py [NAME ...]   # writes tests/fixtures/models/ (all, or NAME)
    REFERENCE_OUT=DIR ...                                   # writes DIR instead

The committed fixtures are made with transformers 5.24.0 (PEFT 0.18.1), except the mixtures of experts
(mixtral, qwen2_moe, qwen3_moe), made with 4.57.1: transformers 5 fuses each layer's experts into 3-D
parameters and its router is no `nn.Linear`, so PEFT cannot put LoRA on the router and the experts by
module name, which is what these fixtures check. A dev run against transformers 5's own MoE files
(no adapters) is `REFERENCE_OUT=/tmp/v5 python ... mixtral qwen2_moe qwen3_moe` and
`REFERENCE_MODELS=/tmp/v5 cargo test -p trainer --test model_reference` (all but the adapter test pass).

Baichuan 2 has no transformers class (remote code): its fixture is a Llama written in Baichuan 2's layout
(fused `W_pack`, an unnormalized NormHead, bf16 `pytorch_model-*.bin` shards), and its references come from
transformers' Llama with W_pack split into q/k/v and the head's rows normalized (see `baichuan2` below).

The Llama-family fixtures are f32 on disk; the families added later are saved in bf16, as real
checkpoints ship, and their reference logits come from that bf16 file loaded in f32.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, Glm4Config, GlmConfig,
                          LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig,
                          Qwen3Config, Qwen3MoeConfig)

OUT = os.environ.get("REFERENCE_OUT", os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models"))
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
VARIANTS = {
    "llama": LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0),
    "llama3_scaled_tied": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=500000.0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
    "mistral": MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None),
    "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**{**COMMON, "num_key_value_heads": 4}, head_dim=16, tie_word_embeddings=False),
    # Gemma: (1+w) norms, √hidden embedding scale, GeGLU; head_dim ≠ hidden/heads.
    "gemma": GemmaConfig(**COMMON, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    # Gemma 2: sandwich norms, soft-capping small enough to matter at this scale, a 4-token window on
    # layer 0 (the 10-token prompt and 12 generated tokens cross it), query_pre_attn_scalar ≠ head_dim.
    "gemma2": Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True),
    # Gemma 3 (text): q/k norms, local RoPE base on the sliding layer, linear-scaled global RoPE, untied.
    "gemma3_text": Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"], rope_theta=1e6,
                                    rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                    tie_word_embeddings=False),
    # Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary (¾ of each head), LongRoPE whose
    # original length (8) the 10-token prompt crosses (long factors); "prefix_logits", 6 tokens, use the short ones.
    "phi3": Phi3Config(**{**COMMON, "max_position_embeddings": 64}, partial_rotary_factor=0.75,
                       original_max_position_embeddings=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0],
                                     "long_factor": [1.5, 3.0, 8.0]},
                       tie_word_embeddings=False),
    # GLM (glm-4-9b-chat-hf) and GLM-4 (0414, with post-norms): interleaved partial rotary, fused gate_up,
    # biased q/k/v; head_dim ≠ hidden/heads.
    "glm": GlmConfig(**COMMON, head_dim=16, partial_rotary_factor=0.5, tie_word_embeddings=False,
                     pad_token_id=0, eos_token_id=2),
    "glm4": Glm4Config(**COMMON, head_dim=16, partial_rotary_factor=0.5, tie_word_embeddings=False,
                       pad_token_id=0, eos_token_id=2),
    # Mixtures of experts, 4 experts, top 2: Mixtral (renormalised top-k), Qwen2-MoE (shared expert with a
    # sigmoid gate, layer 1 dense via mlp_only_layers), Qwen3-MoE (q/k norms, norm_topk_prob).
    "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False,
                                tie_word_embeddings=False),
    "qwen3_moe": Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                norm_topk_prob=True, tie_word_embeddings=True),
}
BF16 = {"gemma", "gemma2", "gemma3_text", "phi3", "glm", "glm4", "mixtral", "qwen2_moe", "qwen3_moe"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
ONLY = set(sys.argv[1:])
IDS = torch.tensor([[3, 17, 42, 5, 88, 9, 61, 23, 7, 50], [11, 2, 95, 33, 70, 4, 19, 66, 28, 81]])

for name, cfg in VARIANTS.items():
    if ONLY and name not in ONLY:
        continue
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random norms too, so a wrong norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif n.endswith("mlp.gate.weight") or n.endswith("block_sparse_moe.gate.weight"):
                p.mul_(40.0)  # decisive routers: a near-tie must not flip between implementations
    d = os.path.join(OUT, name)
    if name in BF16:
        model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    else:
        model.save_pretrained(d, safe_serialization=True)
    with torch.no_grad():
        base = model(IDS).logits
    expected = {"input_ids": IDS.tolist(), "logits": base.flatten().tolist()}
    if name == "phi3":
        with torch.no_grad():
            expected["prefix_logits"] = model(IDS[:, :6]).logits.flatten().tolist()
    if name in MOE:  # the load-balancing loss on the same rows (no padding)
        with torch.no_grad():
            expected["aux_loss"] = model(IDS, output_router_logits=True).aux_loss.item()
    if name in BF16:  # transformers' own bf16 compute, to bound ours by its rounding
        with torch.no_grad():
            half = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16, attn_implementation="eager")
            expected["bf16_logits"] = half.eval()(IDS).logits.float().flatten().tolist()
    with torch.no_grad():  # greedy decoding: prompt = first row, 12 new tokens, no eos stop
        gen = model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    expected["greedy"] = gen[0, IDS.shape[1]:].tolist()
    for adapter, use_dora in [("lora", False), ("dora", True)]:
        if use_dora and name not in ("llama", "qwen2", "gemma2"):
            continue
        torch.manual_seed(1)
        targets = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                   "glm": ["q_proj", "v_proj", "gate_up_proj", "down_proj"],
                   "glm4": ["q_proj", "k_proj", "o_proj", "gate_up_proj"],
                   "mixtral": ["q_proj", "v_proj", "gate", "w1", "w2"],
                   "qwen2_moe": ["q_proj", "gate", "gate_proj", "down_proj", "shared_expert_gate"],
                   "qwen3_moe": ["q_proj", "o_proj", "gate", "up_proj"]}.get(
            name, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
        peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                              init_lora_weights=False, use_dora=use_dora, task_type="CAUSAL_LM")
        try:
            pm = get_peft_model(AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                                                     attn_implementation="eager"), peft_cfg).eval()
        except ValueError as e:  # transformers 5's fused experts and routers are not nn.Linear modules
            print(f"{name}: no {adapter} adapter with this transformers/PEFT ({e})")
            continue
        with torch.no_grad():
            expected[f"{adapter}_logits"] = pm(IDS).logits.flatten().tolist()
            gen = pm.generate(input_ids=IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=12,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            expected[f"{adapter}_greedy"] = gen[0, IDS.shape[1]:].tolist()
        pm.save_pretrained(os.path.join(d, adapter))
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump(expected, fh)
    print(name, base.shape)


def baichuan2():
    """A tiny Baichuan 2 7B: the references are transformers' LlamaForCausalLM on the same (bf16-rounded)
    weights, with q/k/v = W_pack's row blocks and lm_head = F.normalize(head) (Baichuan 2's NormHead);
    the LoRA adapter (on W_pack, o_proj, gate_proj, down_proj, as PEFT names them) is written as PEFT saves
    one and referenced by merging B·A·alpha/r into the Llama weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=False, rope_theta=10000.0)
    cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in llama.state_dict().items()}
    for k in sd:
        if "norm" in k:
            sd[k] = 1.0 + 0.1 * torch.randn_like(sd[k])
    # Rows of very different lengths, so a missing normalization shows.
    sd["lm_head.weight"] = sd["lm_head.weight"] * (0.5 + 3 * torch.rand(cfg.vocab_size, 1))
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # as the checkpoint stores them
    baichuan = {}
    for k, v in sd.items():
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        if ".self_attn.q_proj." in k:
            p = k.replace("q_proj", "{}")
            baichuan[k.replace("q_proj", "W_pack")] = torch.cat([sd[p.format(x)] for x in ("q_proj", "k_proj", "v_proj")])
        else:
            baichuan[k] = v
    d = os.path.join(OUT, "baichuan2")
    os.makedirs(d, exist_ok=True)
    names = sorted(baichuan)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for f, keys in shards.items():
        torch.save({k: baichuan[k].contiguous() for k in keys}, os.path.join(d, f))
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}, fh, indent=1)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump({"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
                   "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
                   "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                   "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
                   "num_attention_heads": cfg.num_attention_heads, "hidden_act": "silu",
                   "max_position_embeddings": cfg.max_position_embeddings, "model_max_length": 128,
                   "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                   "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "z_loss_weight": 0}, fh, indent=1)

    def reference(state, dtype):
        ref = {k: v.float() for k, v in state.items()}
        ref["lm_head.weight"] = F.normalize(ref["lm_head.weight"])
        m = LlamaForCausalLM(cfg).eval()
        m.load_state_dict({k: v.to(dtype).float() for k, v in ref.items()})
        return m.to(dtype)

    def greedy(m):
        gen = m.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
        return gen[0, IDS.shape[1]:].tolist()

    expected = {"input_ids": IDS.tolist()}
    with torch.no_grad():
        m = reference(sd, torch.float32)
        expected["logits"] = m(IDS).logits.flatten().tolist()
        expected["greedy"] = greedy(m)
        expected["bf16_logits"] = reference(sd, torch.bfloat16)(IDS).logits.float().flatten().tolist()
    # The adapter, as PEFT saves it for Baichuan's module names.
    torch.manual_seed(1)
    targets = ["W_pack", "o_proj", "gate_proj", "down_proj"]
    r, alpha = 4, 8
    lora, merged = {}, {k: v.float().clone() for k, v in sd.items()}
    for layer in range(cfg.num_hidden_layers):
        for t in targets:
            part = "self_attn" if t in ("W_pack", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{part}.{t}"
            w = baichuan[f"{name}.weight"]
            a = 0.1 * torch.randn(r, w.shape[1])
            b = 0.1 * torch.randn(w.shape[0], r)
            lora[f"base_model.model.{name}.lora_A.weight"] = a
            lora[f"base_model.model.{name}.lora_B.weight"] = b
            delta = (alpha / r) * b @ a
            if t == "W_pack":
                h = cfg.hidden_size
                for i, x in enumerate(("q_proj", "k_proj", "v_proj")):
                    merged[f"model.layers.{layer}.self_attn.{x}.weight"] += delta[i * h:(i + 1) * h]
            else:
                merged[f"{name}.weight"] += delta
    ad = os.path.join(d, "lora")
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(ad)
    save_file(lora, os.path.join(ad, "adapter_model.safetensors"))
    with torch.no_grad():
        m = reference(merged, torch.float32)
        expected["lora_logits"] = m(IDS).logits.flatten().tolist()
        expected["lora_greedy"] = greedy(m)
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump(expected, fh)
    print("baichuan2")


if not ONLY or "baichuan2" in ONLY:
    baichuan2()


def qwen2_vl(name="qwen2_vl"):
    """A tiny Qwen2-VL (or Qwen2.5-VL: `name="qwen2_5_vl"`, windows of 2×2 merge units, block 1 full) (transformers' Qwen2VLForConditionalGeneration, saved in bf16): logits of one row
    with two images (tests/fixtures/vision's synthetic PNGs through LLaMA-Factory's regularization and
    transformers' Pillow image processor), image tokens between <|vision_start|> and <|vision_end|>, and of
    a text-only row."""
    from PIL import Image
    from llamafactory.data.mm_plugin import get_mm_plugin
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    try:  # transformers 5: the Pillow processor (its default one resizes with torchvision instead)
        from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
    except ImportError:  # transformers 4: the Pillow one is the default
        from transformers import Qwen2VLImageProcessor

    torch.manual_seed(0)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
                  tie_word_embeddings=False)
    if name == "qwen2_vl":
        cls = Qwen2VLForConditionalGeneration
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_chans=3), **tokens)
    else:
        cls = Qwen2_5_VLForConditionalGeneration
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
            **tokens)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_q" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if n.endswith("weight") else p.copy_(0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "q_proj.weight" in n or "k_proj.weight" in n or "attn.qkv.weight" in n:
                p.mul_(15.0)  # peaked attention, so that every position (M-RoPE, 2-D rotary) matters
    d = os.path.join(OUT, name)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    model = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    vision = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "vision")
    y, x = np.mgrid[0:40, 0:30]
    second = np.stack([(x * 7) % 256, (y * 5 + x) % 256, (y * 9) % 256], -1).astype(np.uint8)
    Image.fromarray(second).save(os.path.join(vision, "second.png"))
    plugin = get_mm_plugin(name="qwen2_vl", image_token="<|image_pad|>", video_token="<|video_pad|>")
    budget = dict(image_max_pixels=48 * 48, image_min_pixels=32 * 32)
    images = plugin._regularize_images([os.path.join(vision, "small.png"), os.path.join(vision, "second.png")],
                                       **budget)["images"]
    out = Qwen2VLImageProcessor()(images=images, return_tensors="pt")
    grids = out["image_grid_thw"]
    ids = [5, 17]
    for g in grids.tolist():
        ids += [152] + [150] * (g[0] * g[1] * g[2] // 4) + [153, 42, 7]
    ids += [99, 3, 61, 23]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        mm_types = (input_ids == 150).int()  # image tokens 1, text 0 (the processor's mm_token_type_ids)
        logits = model(input_ids=input_ids, pixel_values=out["pixel_values"], image_grid_thw=grids,
                       mm_token_type_ids=mm_types).logits
        text = torch.tensor([[5, 17, 42, 7, 99, 3, 61, 23]])
        text_logits = model(input_ids=text).logits
        gen = model.generate(input_ids=input_ids, pixel_values=out["pixel_values"], image_grid_thw=grids,
                             mm_token_type_ids=mm_types, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        # The logits each greedy step chose from, by one full pass (M-RoPE over prompt and answer).
        full_types = (gen == 150).int()
        step_logits = model(input_ids=gen, pixel_values=out["pixel_values"], image_grid_thw=grids,
                            mm_token_type_ids=full_types).logits[0, len(ids) - 1:-1]
    expected = {"input_ids": ids, "images": ["small.png", "second.png"], **budget, "grids": grids.tolist(),
                "logits": logits.flatten().tolist(), "text_ids": text[0].tolist(),
                "text_logits": text_logits.flatten().tolist(), "greedy": gen[0, len(ids):].tolist(),
                "greedy_logits": step_logits.flatten().tolist()}
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump(expected, fh)
    print(name, grids.tolist(), len(ids))


for vl in ("qwen2_vl", "qwen2_5_vl"):
    if not ONLY or vl in ONLY:
        qwen2_vl(vl)


def llava():
    """A tiny LLaVA (transformers' LlavaForConditionalGeneration, saved in bf16): a CLIP tower of 3 layers read at
    `vision_feature_layer` -2 (so the last layer and post_layernorm are unused, as in LLaVA-1.5), 56-pixel images
    (16 patches, the class token dropped: 16 <image> tokens each), a GELU projector, a Llama. Logits of one row with
    two images (tests/fixtures/vision's PNGs through LLaMA-Factory's base regularization and transformers' Pillow
    CLIP processor, shortest side 56 then a 56×56 center crop), of a text-only row, and greedy decoding."""
    from PIL import Image  # noqa: F401
    from llamafactory.data.mm_plugin import get_mm_plugin
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    try:  # transformers 5: the Pillow processor (its default one resizes with torchvision instead)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4: the Pillow one is the default
        from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=16),
        image_token_index=150, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "layrnorm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if n.endswith("weight") else p.copy_(0.1 * torch.randn_like(p))
            elif n.endswith("bias") or "class_embedding" in n:
                p.copy_(0.1 * torch.randn_like(p))
            elif "position_embedding" in n:
                p.copy_(0.5 * torch.randn_like(p))  # positions that matter
            elif "q_proj.weight" in n or "k_proj.weight" in n:
                p.mul_(15.0)  # peaked attention
    d = os.path.join(OUT, "llava")
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor.save_pretrained(d)
    model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    vision = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "vision")
    plugin = get_mm_plugin(name="llava", image_token="<image>")
    budget = dict(image_max_pixels=48 * 48, image_min_pixels=32 * 32)
    images = plugin._regularize_images([os.path.join(vision, "small.png"), os.path.join(vision, "second.png")],
                                       **budget)["images"]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = [5, 17] + [150] * 16 + [42, 7, 150] + [150] * 15 + [99, 3, 61, 23]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        text = torch.tensor([[5, 17, 42, 7, 99, 3, 61, 23]])
        text_logits = model(input_ids=text).logits
        gen = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        step_logits = model(input_ids=gen, pixel_values=pixel_values).logits[0, len(ids) - 1:-1]
    # A PEFT adapter as LLaMA-Factory sets it up for a vision-language model: the language model's modules by
    # full path (so the CLIP tower's like-named q_proj/v_proj stay plain), random B.
    targets = [n for n, _ in model.named_modules()
               if n.startswith("model.language_model.") and n.endswith(("q_proj", "v_proj", "down_proj"))]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))
        lora_logits = peft_model(input_ids=input_ids, pixel_values=pixel_values).logits
    peft_model.save_pretrained(os.path.join(d, "lora"))
    model = peft_model.unload()
    expected = {"input_ids": ids, "images": ["small.png", "second.png"], **budget,
                "lora_logits": lora_logits.flatten().tolist(),
                "pixel_values": pixel_values.flatten().tolist(), "pixel_shape": list(pixel_values.shape),
                "logits": logits.flatten().tolist(), "text_ids": text[0].tolist(),
                "text_logits": text_logits.flatten().tolist(), "greedy": gen[0, len(ids):].tolist(),
                "greedy_logits": step_logits.flatten().tolist()}
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump(expected, fh)
    print("llava", list(pixel_values.shape), len(ids))


if not ONLY or "llava" in ONLY:
    llava()
