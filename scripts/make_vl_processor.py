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

# tests/fixtures/llava-processor: the demo tokenizer plus LLaVA's <image> token, LLaVA-1.5's CLIP image processor
# (shortest side 336, 336×336 center crop) and processor settings (patch 14, `default` strategy, one extra token:
# the class token), and a tiny llava config.json whose CLIP tower reads 336-pixel images (576 image tokens).
from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor  # noqa: E402

LOUT = os.path.join(REPO, "tests", "fixtures", "llava-processor")
ltok = AutoTokenizer.from_pretrained(os.path.join(REPO, "tests", "fixtures", "demo-tokenizer"))
ltok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_additional_special_tokens=False)
image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
LlavaProcessor(image_processor=image_processor, tokenizer=ltok, patch_size=14, vision_feature_select_strategy="default",
               num_additional_image_tokens=1).save_pretrained(LOUT)
image_id = ltok.convert_tokens_to_ids("<image>")
LlavaConfig(text_config=dict(model_type="llama", vocab_size=len(ltok), hidden_size=64, intermediate_size=96,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, image_size=336, patch_size=14),
            image_token_index=image_id).save_pretrained(LOUT)
print(LOUT, image_id, len(ltok))
