/// Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
pub fn closest<'a, I: IntoIterator<Item = &'a str>>(word: &str, candidates: I) -> Option<&'a str> {
    let (best, d) = candidates
        .into_iter()
        .map(|c| (c, distance(word, c)))
        .min_by_key(|(_, d)| *d)?;
    (d <= (word.len() / 3).max(2)).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_keys_only() {
        let keys = ["learning_rate", "lora_rank", "cutoff_len"];
        assert_eq!(closest("lerning_rate", keys), Some("learning_rate"));
        assert_eq!(closest("cutof_len", keys), Some("cutoff_len"));
        assert_eq!(closest("banana", keys), None);
    }
}
