"""Dev-only: the BLEU-4 / ROUGE values that `trainer/src/metrics.rs`'s test expects, computed
by LLaMA-Factory's own `ComputeSimilarity` (the `predict_with_generate` metrics) on the same
prediction / label pairs.

    python scripts/metrics_reference.py

Needs `pip install llamafactory==0.9.5 jieba nltk rouge-chinese` (with torch and transformers;
not used in CI or at run time). Prints one `(pred, label, [rouge-1, rouge-2, rouge-l, bleu-4])`
line per pair, in the test's order.
"""
import numpy as np
from transformers import EvalPrediction

from llamafactory.train.sft.metric import ComputeSimilarity

PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("我喜欢吃苹果和香蕉。", "我很喜欢吃香蕉。"),
    ("A banana is yellow.", "A banana is yellow."),
    ("", "nothing predicted"),
    ("完全不同的句子", "The answer is 42"),
    ("你好，世界！今天天气很好。", "你好世界，今天天气不错！"),
    ("1 2 3 4 5", "1 2 3 4 5 6 7 8 9"),
    # Several sentences: rouge_chinese cuts them (Rouge.cut_sent) before scoring.
    ("The cat sat on the mat. Then it slept. Was it tired? Yes! It was.",
     "A cat sat on a mat. It slept after that. Was it tired? Very much so."),
    ("今天天气很好。我们去公园散步吧！你觉得怎么样？", "今天天气不错。我们去散步吧。你觉得呢？"),
    ("我喜欢Python。It is easy to learn! 你呢？还有Rust吗？", "我也喜欢Python。It is fun to learn. 你喜欢Rust吗？"),
    ("第一行\n第二行。\n第三行很长很长。", "第一行\n第三行很长。"),
    ("等一下……好的......然后呢？结束了。", "等一下……然后呢？好的。"),
    ("他说：“你好。”然后走了。", "他说：“你好！”然后离开了。"),
]


class TextTokenizer:
    """Token i of a row is the text of pair i: decoding gives the strings back unchanged."""

    pad_token_id = -1

    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.texts[row[0]] for row in ids]


if __name__ == "__main__":
    for pred, label in PAIRS:
        texts = [pred, label]
        metric = ComputeSimilarity(tokenizer=TextTokenizer(texts))
        scores = metric(EvalPrediction(predictions=np.array([[0]]), label_ids=np.array([[1]])))
        print((pred, label, [scores[k] for k in ["rouge-1", "rouge-2", "rouge-l", "bleu-4"]]))
