"""Dev-only: tiny SentencePiece models (`tokenizer.model`, as Baichuan 2 and other slow-tokenizer checkpoints
ship them) and the ids SentencePiece itself gives for test strings, for trainer/src/tokenizer tests.

    python scripts/make_spm_fixtures.py /path/to/llamafactory-data   # writes tests/fixtures/spm/

Two models: `baichuan_like` (BPE, identity normalization, no dummy prefix, byte fallback, user-defined
`<reserved_106>`/`<reserved_107>`, digits split) and `llama_like` (BPE, the default nmt_nfkc normalization
with its precompiled charsmap, dummy prefix, extra whitespace removed, byte fallback). Ids come from
`sentencepiece.SentencePieceProcessor.encode`; the slow-tokenizer ids (transformers' `LlamaTokenizer`,
which splits out special tokens first) are recorded too.
"""
import io
import json
import os
import sys

import sentencepiece as spm
from transformers import LlamaTokenizer

DATA = sys.argv[1]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "spm")
os.makedirs(OUT, exist_ok=True)

text = []
for f in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
    for row in json.load(open(os.path.join(DATA, f))):
        text += [row["instruction"], row["output"]]

STRINGS = [
    "Hello world", " leading space", "two  spaces and   three", "trailing ", "数字 12345 and 3.14",
    "你好，世界！今天天气很好。", "emoji 🦙 and ünïcödé", "tabs\tand\nnewlines\n\n",
    "<reserved_106>Hi<reserved_107>", "<s>bos</s> inside", "ＦＵＬＬ　ＷＩＤＴＨ ①②", "",
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。",
]

CONFIGS = {
    "baichuan_like": dict(model_type="bpe", vocab_size=2400, normalization_rule_name="identity",
                          add_dummy_prefix=False, remove_extra_whitespaces=False, byte_fallback=True,
                          split_digits=True, user_defined_symbols=["<reserved_106>", "<reserved_107>"],
                          character_coverage=0.98, max_sentencepiece_length=16),
    "llama_like": dict(model_type="bpe", vocab_size=2400, byte_fallback=True, character_coverage=0.98),
}
for name, kw in CONFIGS.items():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, pad_id=-1, unk_id=0,
                                   bos_id=1, eos_id=2, hard_vocab_limit=False, **kw)
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.model"), "wb") as fh:
        fh.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    slow = LlamaTokenizer(os.path.join(d, "tokenizer.model"), add_bos_token=False, legacy=True)
    cases = [{"text": s, "sp": sp.encode(s), "slow": slow.encode(s, add_special_tokens=False),
              "decoded": sp.decode(sp.encode(s))} for s in STRINGS]
    with open(os.path.join(d, "expected.json"), "w") as fh:
        json.dump({"vocab_size": sp.get_piece_size(), "cases": cases}, fh, ensure_ascii=False, indent=1)
    print(name, sp.get_piece_size())
