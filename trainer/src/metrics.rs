//! Generation metrics exactly as LLaMA-Factory's `ComputeSimilarity`: character-level BLEU-4
//! (NLTK `sentence_bleu`, smoothing method 3) and ROUGE-1/2/L F-scores (`rouge_chinese`) over
//! jieba word segmentation, each ×100 and rounded to 4 decimals per example.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use jieba_rs::Jieba;

fn jieba() -> &'static Jieba {
    static J: OnceLock<Jieba> = OnceLock::new();
    J.get_or_init(Jieba::new)
}

fn round4(x: f64) -> f64 {
    (x * 10000.0).round() / 10000.0
}

fn ngram_counts<T: std::hash::Hash + Eq + Clone>(s: &[T], n: usize) -> HashMap<Vec<T>, usize> {
    let mut m = HashMap::new();
    if s.len() >= n {
        for w in s.windows(n) {
            *m.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    m
}

/// NLTK `sentence_bleu([reference], hypothesis, smoothing_function=method3)` over characters.
pub fn bleu4(pred: &str, label: &str) -> f64 {
    let hyp: Vec<char> = pred.chars().collect();
    let reference: Vec<char> = label.chars().collect();
    let mut nums = [0usize; 4];
    let mut dens = [0usize; 4];
    for n in 1..=4 {
        let h = ngram_counts(&hyp, n);
        let r = ngram_counts(&reference, n);
        nums[n - 1] = h
            .iter()
            .map(|(g, c)| (*c).min(*r.get(g).unwrap_or(&0)))
            .sum();
        dens[n - 1] = h.values().sum::<usize>().max(1);
    }
    if nums[0] == 0 {
        return 0.0;
    }
    let mut incvnt = 1;
    let mut log_sum = 0.0;
    for i in 0..4 {
        let p = if nums[i] == 0 {
            let v = 1.0 / (2f64.powi(incvnt) * dens[i] as f64);
            incvnt += 1;
            v
        } else {
            nums[i] as f64 / dens[i] as f64
        };
        log_sum += 0.25 * p.ln();
    }
    let (c, r) = (hyp.len() as f64, reference.len() as f64);
    let bp = if c > r {
        1.0
    } else if c == 0.0 {
        0.0
    } else {
        (1.0 - r / c).exp()
    };
    bp * log_sum.exp()
}

/// jieba's words joined by spaces, as `ComputeSimilarity` hands them to `rouge_chinese`.
fn joined_words(text: &str) -> String {
    jieba()
        .cut(text, true)
        .iter()
        .map(|t| t.word)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `rouge_chinese`'s `Rouge.cut_sent`: a line break after `。！？?` (unless a closing quote
/// follows), after six dots and after two `…`, and after a closing quote that ends a sentence;
/// trailing whitespace dropped, then split at line breaks. Each pattern is one `re.sub` pass,
/// left to right, matches not overlapping.
fn cut_sent(para: &str) -> Vec<String> {
    const ENDS: [char; 4] = ['。', '！', '？', '?'];
    const QUOTES: [char; 2] = ['”', '’'];
    let pass = |text: &str, width: usize, matches: &dyn Fn(&[char]) -> bool| -> String {
        let c: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len() + 8);
        let mut i = 0;
        while i < c.len() {
            if i + width <= c.len() && matches(&c[i..i + width]) {
                out.extend(&c[i..i + width - 1]);
                out.push('\n');
                out.push(c[i + width - 1]);
                i += width;
            } else {
                out.push(c[i]);
                i += 1;
            }
        }
        out
    };
    let s = pass(para, 2, &|w| {
        ENDS.contains(&w[0]) && !QUOTES.contains(&w[1])
    });
    let s = pass(&s, 7, &|w| {
        w[..6].iter().all(|&c| c == '.') && !QUOTES.contains(&w[6])
    });
    let s = pass(&s, 3, &|w| {
        w[0] == '…' && w[1] == '…' && !QUOTES.contains(&w[2])
    });
    let s = pass(&s, 3, &|w| {
        ENDS.contains(&w[0]) && QUOTES.contains(&w[1]) && !ENDS.contains(&w[2]) && w[2] != '，'
    });
    s.trim_end().split('\n').map(str::to_string).collect()
}

/// The words `rouge_chinese` scores: each non-empty piece of [`cut_sent`] with its whitespace
/// collapsed, split at spaces and flattened (a piece of only whitespace gives one empty word,
/// as it does there).
fn words(text: &str) -> Vec<String> {
    cut_sent(&joined_words(text))
        .into_iter()
        .filter(|piece| !piece.is_empty())
        .flat_map(|piece| {
            let sentence = piece.split_whitespace().collect::<Vec<_>>().join(" ");
            sentence.split(' ').map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

fn f1(overlap: usize, hyp: usize, reference: usize) -> f64 {
    let p = if hyp == 0 {
        0.0
    } else {
        overlap as f64 / hyp as f64
    };
    let r = if reference == 0 {
        0.0
    } else {
        overlap as f64 / reference as f64
    };
    2.0 * ((p * r) / (p + r + 1e-8))
}

fn rouge_n(h: &[String], r: &[String], n: usize) -> f64 {
    let set = |s: &[String]| -> HashSet<Vec<String>> {
        if s.len() >= n {
            s.windows(n).map(<[String]>::to_vec).collect()
        } else {
            HashSet::new()
        }
    };
    let (hs, rs) = (set(h), set(r));
    f1(hs.intersection(&rs).count(), hs.len(), rs.len())
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// (ROUGE-1, ROUGE-2, ROUGE-L) F-scores in [0, 1].
pub fn rouge(pred: &str, label: &str) -> (f64, f64, f64) {
    // `ComputeSimilarity` scores 0 when either side has no word at all.
    let blank = |t: &str| joined_words(t).split_whitespace().next().is_none();
    if blank(pred) || blank(label) {
        return (0.0, 0.0, 0.0);
    }
    let (h, r) = (words(pred), words(label));
    let l = lcs(&r, &h);
    let (p_l, r_l) = (l as f64 / h.len() as f64, l as f64 / r.len() as f64);
    (
        rouge_n(&h, &r, 1),
        rouge_n(&h, &r, 2),
        2.0 * ((p_l * r_l) / (p_l + r_l + 1e-8)),
    )
}

/// Per-example scores as LLaMA-Factory records them: ×100, rounded to 4 decimals.
pub fn similarity(pred: &str, label: &str) -> [(&'static str, f64); 4] {
    let (r1, r2, rl) = rouge(pred, label);
    [
        ("rouge-1", round4(r1 * 100.0)),
        ("rouge-2", round4(r2 * 100.0)),
        ("rouge-l", round4(rl * 100.0)),
        ("bleu-4", round4(bleu4(pred, label) * 100.0)),
    ]
}

/// Arithmetic mean; 0 for an empty slice (a window that logged nothing).
pub fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from LLaMA-Factory 0.9.5's ComputeSimilarity (jieba 0.42.1, nltk 3.10.4,
    /// rouge-chinese 1.0.3) on the same pairs, printed by `scripts/metrics_reference.py`.
    #[test]
    fn matches_llamafactory_scores() {
        let cases: &[(&str, &str, [f64; 4])] = &[
            (
                "The cat sat on the mat.",
                "The cat is sitting on the mat.",
                [80.0, 61.5385, 80.0, 60.0938],
            ),
            (
                "我喜欢吃苹果和香蕉。",
                "我很喜欢吃香蕉。",
                [76.9231, 36.3636, 76.9231, 27.3012],
            ),
            (
                "A banana is yellow.",
                "A banana is yellow.",
                [100.0, 100.0, 100.0, 100.0],
            ),
            ("", "nothing predicted", [0.0, 0.0, 0.0, 0.0]),
            ("完全不同的句子", "The answer is 42", [0.0, 0.0, 0.0, 0.0]),
            (
                "你好，世界！今天天气很好。",
                "你好世界，今天天气不错！",
                [71.4286, 0.0, 42.8571, 27.6294],
            ),
            (
                "1 2 3 4 5",
                "1 2 3 4 5 6 7 8 9",
                [71.4286, 66.6667, 71.4286, 41.1112],
            ),
            // Several sentences (rouge_chinese cuts them first).
            (
                "The cat sat on the mat. Then it slept. Was it tired? Yes! It was.",
                "A cat sat on a mat. It slept after that. Was it tired? Very much so.",
                [62.8571, 36.8421, 60.0, 60.7583],
            ),
            (
                "今天天气很好。我们去公园散步吧！你觉得怎么样？",
                "今天天气不错。我们去散步吧。你觉得呢？",
                [72.0, 33.3333, 69.2308, 30.3367],
            ),
            (
                "我喜欢Python。It is easy to learn! 你呢？还有Rust吗？",
                "我也喜欢Python。It is fun to learn. 你喜欢Rust吗？",
                [77.4194, 45.1613, 72.7273, 64.5262],
            ),
            (
                "第一行\n第二行。\n第三行很长很长。",
                "第一行\n第三行很长。",
                [80.0, 40.0, 66.6667, 50.1047],
            ),
            (
                "等一下……好的......然后呢？结束了。",
                "等一下……然后呢？好的。",
                [85.7143, 57.1429, 69.5652, 31.6426],
            ),
            (
                "他说：“你好。”然后走了。",
                "他说：“你好！”然后离开了。",
                [85.7143, 60.0, 81.8182, 48.7649],
            ),
        ];
        let mut wrong = Vec::new();
        for (pred, label, want) in cases {
            let got: Vec<f64> = similarity(pred, label).iter().map(|(_, v)| *v).collect();
            if got != want.to_vec() {
                wrong.push(format!("{pred} / {label}: {got:?} vs {want:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
