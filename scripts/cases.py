"""The golden cases shared by scripts/lf_reference.py and tests/fixtures/lf/cases.json."""
import json
import os

TEMPLATES = ["default", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama2", "llama3", "mistral",
             "gemma", "phi", "empty", "phi4", "glm4", "yi", "gemma2", "gemma3", "baichuan2"]
CASES = {}
for t in TEMPLATES:
    CASES[f"{t}_sft"] = dict(stage="sft", template=t, dataset="alpaca_en_demo,glaive_toolcall_en_demo",
                             max_samples=12, cutoff_len=384)
    CASES[f"{t}_rm"] = dict(stage="rm", template=t, dataset="dpo_en_demo", max_samples=8, cutoff_len=256)
    CASES[f"{t}_kto"] = dict(stage="kto", template=t, dataset="kto_en_demo", max_samples=8, cutoff_len=256)
# LLaMA-Factory's gemma3 template has gemma's text slots but an image plugin that refuses to run
# without a processor (our demo tokenizer has none): its text cases are checked against LLaMA-Factory's
# gemma ids ("reference": the case whose fixture they must equal).
for kind in ("sft", "rm", "kto"):
    CASES[f"gemma3_{kind}"]["reference"] = f"gemma_{kind}"
# Images: LLaMA-Factory's qwen2_vl plugin on mllm_demo (image tokens from each image's size), run with the
# processor folder tests/fixtures/qwen2-vl-processor ("model", scripts/make_vl_processor.py); default and
# small pixel budgets.
for kind, extra in [("sft", {}), ("sft_small_images", dict(image_max_pixels=64 * 64, image_min_pixels=16 * 16))]:
    CASES[f"qwen2_vl_{kind}"] = dict(stage="sft", template="qwen2_vl", dataset="mllm_demo", cutoff_len=1024,
                                     model="qwen2-vl-processor", **extra)
# LLaVA: each image becomes 576 <image> tokens whatever its size (tests/fixtures/llava-processor).
for kind, extra in [("sft", {}), ("sft_small_images", dict(image_max_pixels=64 * 64, image_min_pixels=16 * 16))]:
    CASES[f"llava_{kind}"] = dict(stage="sft", template="llava", dataset="mllm_demo", cutoff_len=2048,
                                  model="llava-processor", **extra)
CASES["qwen_pt_packed"] = dict(stage="pt", template="qwen", dataset="c4_demo", max_samples=6, cutoff_len=128)
CASES["llama3_pt"] = dict(stage="pt", template="llama3", dataset="c4_demo", max_samples=6, cutoff_len=128,
                          packing=False)
CASES["pt_no_template"] = dict(stage="pt", dataset="wiki_demo", max_samples=2, cutoff_len=512)
CASES["qwen_sft_mask_history"] = dict(stage="sft", template="qwen", dataset="glaive_toolcall_en_demo",
                                      max_samples=12, cutoff_len=200, mask_history=True)
CASES["qwen3_sft_mask_history"] = dict(stage="sft", template="qwen3", dataset="glaive_toolcall_en_demo",
                                       max_samples=12, cutoff_len=200, mask_history=True)
CASES["qwen3_sft_nothinking"] = dict(stage="sft", template="qwen3", dataset="glaive_toolcall_en_demo",
                                     max_samples=12, cutoff_len=300, enable_thinking=False)
CASES["llama3_sft_train_on_prompt"] = dict(stage="sft", template="llama3", dataset="identity,alpaca_en_demo",
                                           max_samples=10, cutoff_len=128, train_on_prompt=True)
CASES["chatml_sft_packing"] = dict(stage="sft", template="chatml", dataset="alpaca_en_demo", max_samples=20,
                                   cutoff_len=256, packing=True)
CASES["chatml_sft_neat_packing"] = dict(stage="sft", template="chatml", dataset="alpaca_en_demo", max_samples=20,
                                        cutoff_len=256, neat_packing=True)
CASES["mistral_sft_toolformat_qwen"] = dict(stage="sft", template="mistral", tool_format="qwen",
                                            dataset="glaive_toolcall_en_demo", max_samples=6, cutoff_len=512,
                                            default_system="Be brief.")
CASES["qwen_predict"] = dict(stage="sft", template="qwen", eval_dataset="alpaca_en_demo,identity", max_samples=6,
                             cutoff_len=128, do_train=False, do_predict=True, predict_with_generate=True)
CASES["jinja_sft"] = dict(stage="sft", dataset="alpaca_en_demo,glaive_toolcall_en_demo", max_samples=8,
                          cutoff_len=256)

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lf", "cases.json")
    with open(out, "w") as fh:
        json.dump(CASES, fh, indent=1)
