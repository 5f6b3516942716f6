"""Dev-only: tests/fixtures/qwen2-vl-processor, the processor folder LLaMA-Factory's qwen2_vl cases run with
(scripts/lf_reference.py): the demo tokenizer plus Qwen2-VL's vision tokens, transformers'
Qwen2VLImageProcessor defaults (preprocessor_config.json), and a tiny qwen2_vl config.json (so
AutoProcessor finds Qwen2VLProcessor).

    python scripts/make_vl_processor.py
"""
import os

from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLImageProcessor

REPO = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(REPO, "tests", "fixtures", "qwen2-vl-processor")
tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "tests", "fixtures", "demo-tokenizer"))
tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                      "<|video_pad|>"]}, replace_additional_special_tokens=False)
tok.save_pretrained(OUT)
Qwen2VLImageProcessor().save_pretrained(OUT)
ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
Qwen2VLConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]
              ).save_pretrained(OUT)
print(OUT, ids, len(tok))
