//! "Did you mean …?": the closest known key or value to a mistyped one.

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment), since
/// `stf` for `sft` is the typo people make.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
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
        assert_eq!(closest("stf", ["pt", "sft", "rm"]), Some("sft"));
    }
}
