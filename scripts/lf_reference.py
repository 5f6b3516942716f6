"""Dev-only: writes LLaMA-Factory's processed token ids for the golden data tests.

Runs LLaMA-Factory's own pipeline (template + processors) on its demo data with our demo
tokenizer and saves one JSON line per processed example to tests/fixtures/lf/<case>.jsonl,
plus <case>.tokens.json with the tokenizer's special-token state after `fix_special_tokens`.

    python scripts/lf_reference.py MODEL_DIR DATA_DIR [CASE ...]

Needs `pip install llamafactory` (not used in CI or at run time).
"""
import datetime as _dt
import json
import os
import sys
import tempfile

import llamafactory.data.tool_utils as tool_utils


class _FixedDate(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 11, 28)


tool_utils.datetime = _FixedDate  # the llama3 tool prompt embeds today's date

import llamafactory.data.template as lf_template  # noqa: E402

# LLaMA-Factory dropped the baichuan2 template after 0.9.2; registered here exactly as 0.9.2 has it
# (`register_template(name="baichuan2", ...)` in its data/template.py), so its cases run through the
# current release's processors like every other template.
if "baichuan2" not in lf_template.TEMPLATES:
    lf_template.register_template(
        name="baichuan2",
        format_user=lf_template.StringFormatter(slots=["<reserved_106>{{content}}<reserved_107>"]),
        efficient_eos=True,
    )

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.hparams import get_train_args  # noqa: E402
from llamafactory.model import load_tokenizer  # noqa: E402

from cases import CASES  # noqa: E402

MODEL, DATA = sys.argv[1], sys.argv[2]
ONLY = set(sys.argv[3:])  # optional case names
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lf")
COLUMNS = ["input_ids", "attention_mask", "position_ids", "labels", "chosen_input_ids", "chosen_attention_mask",
           "chosen_labels", "rejected_input_ids", "rejected_attention_mask", "rejected_labels", "kl_input_ids",
           "kl_attention_mask", "kl_labels", "kto_tags"]

for name, case in CASES.items():
    if (ONLY and name not in ONLY) or "reference" in case:
        continue
    case = dict(case)
    model = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", case.pop("model")) if "model" in case else MODEL
    args = dict(model_name_or_path=model, dataset_dir=DATA, output_dir=tempfile.mkdtemp(), overwrite_output_dir=True,
                do_train=True, finetuning_type="lora", report_to="none", preprocessing_num_workers=None)
    args.update(case)
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tok_module = load_tokenizer(model_args)
    tokenizer = tok_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    stage = {"dpo": "rm"}.get(finetuning_args.stage, finetuning_args.stage)
    module = get_dataset(template, model_args, data_args, training_args, stage=stage, **tok_module)
    split = "eval_dataset" if case.get("do_predict") else "train_dataset"
    rows = module[split]
    with open(os.path.join(OUT, f"{name}.jsonl"), "w") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in COLUMNS if k in row}) + "\n")
    with open(os.path.join(OUT, f"{name}.tokens.json"), "w") as fh:
        json.dump({"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id, "len": len(tokenizer)}, fh)
    print(name, len(rows))
