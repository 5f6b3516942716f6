//! `get_dataset`: the whole path from dataset names to processed train / eval examples, shared
//! by training, `preview-data` and the server's dataset preview.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::converter::{convert, Example};
use super::dataset_info::DatasetInfo;
use super::loader::load_records;
use super::processor::{Features, Processor, ProcessorKind};
use super::template::Template;
use super::Skipped;
use crate::tokenizer::HfTokenizer;
use protocol::args::Stage;
use protocol::TrainArgs;

pub struct DatasetModule {
    pub train: Vec<Features>,
    pub eval: Vec<Features>,
    /// Records left out, each with file, record number and reason.
    pub skipped: Vec<Skipped>,
    pub train_kind: ProcessorKind,
}

/// Reads, samples, truncates and converts the named datasets, concatenated in order.
pub fn load_examples(
    names: &[String],
    args: &TrainArgs,
    skipped: &mut Vec<Skipped>,
) -> Result<Vec<Example>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let dataset_dir = PathBuf::from(&args.dataset_dir);
    let info = DatasetInfo::load(&dataset_dir)?;
    let media_dir = args
        .media_dir
        .as_deref()
        .map(Path::new)
        .unwrap_or(&dataset_dir);
    let mut all = Vec::new();
    for name in names {
        let attr = info.attr(name)?;
        if args.stage.is_pairwise() != attr.ranking {
            bail!(
                "The dataset is not applicable in the current training stage: `{name}` is {} data, stage is `{}`",
                if attr.ranking { "preference (ranking)" } else { "non-preference" },
                args.stage
            );
        }
        let mut records = load_records(&attr, &dataset_dir)?;
        if let Some(n) = attr.num_samples {
            records = sample(records, n, args.seed);
        }
        if let Some(max) = args.max_samples {
            records.truncate(max);
        }
        for rec in &records {
            match convert(rec, &attr, media_dir) {
                Ok(ex) => all.push(ex),
                Err(reason) => skipped.push(Skipped {
                    file: rec.file.to_string(),
                    row: rec.row,
                    reason,
                }),
            }
        }
    }
    Ok(all)
}

/// `num_samples`: a random selection, every record once before any repeats.
fn sample<T: Clone>(records: Vec<T>, n: usize, seed: u64) -> Vec<T> {
    if records.is_empty() {
        return records;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut rng);
    idx.truncate(n);
    while idx.len() < n {
        idx.push(rand::Rng::gen_range(&mut rng, 0..records.len()));
    }
    idx.into_iter().map(|i| records[i].clone()).collect()
}

/// Splits off `val_size` (a fraction below 1, a count otherwise) with the run's seed.
fn split(mut examples: Vec<Example>, val_size: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if val_size <= 1e-6 || examples.is_empty() {
        return (examples, Vec::new());
    }
    let n = examples.len();
    let n_eval = if val_size < 1.0 {
        ((n as f64) * val_size).ceil() as usize
    } else {
        val_size as usize
    }
    .min(n - 1);
    examples.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let eval = examples.split_off(n - n_eval);
    (examples, eval)
}

pub fn get_dataset(
    args: &TrainArgs,
    tok: &HfTokenizer,
    template: &Template,
) -> Result<DatasetModule> {
    // LLaMA-Factory shortens `cutoff_len` by one when packing is asked for explicitly, so a packed
    // row plus its pad is exactly `cutoff_len` long.
    let mut args = args.clone();
    if args.packing == Some(true) || args.neat_packing {
        args.cutoff_len = args.cutoff_len.saturating_sub(1).max(1);
    }
    let args = &args;
    let mut skipped = Vec::new();
    let train_names = TrainArgs::split_list(args.dataset.as_deref());
    let eval_names = TrainArgs::split_list(args.eval_dataset.as_deref());
    let train_examples = load_examples(&train_names, args, &mut skipped)?;
    let mut eval_examples = load_examples(&eval_names, args, &mut skipped)?;
    let (train_examples, split_eval) = split(train_examples, args.val_size, args.seed);
    if eval_examples.is_empty() {
        eval_examples = split_eval;
    }
    // Images: placeholders expanded into the tokens each image becomes (pre-training, like
    // LLaMA-Factory's, reads the text alone).
    let (train_examples, eval_examples) = if args.stage == Stage::Pt {
        (train_examples, eval_examples)
    } else {
        let ctx = if template.mm == super::template::MmPlugin::Base {
            None
        } else {
            Some(super::media::MediaContext::load(&tok.dir, args)?)
        };
        let (train, s) = super::media::expand(train_examples, template, ctx.as_ref())?;
        skipped.extend(s);
        let (eval, s) = super::media::expand(eval_examples, template, ctx.as_ref())?;
        skipped.extend(s);
        (train, eval)
    };
    let train_kind = ProcessorKind::for_stage(args, false);
    let train_proc = Processor {
        kind: train_kind,
        template,
        tok,
        args,
    };
    let (train, s) = train_proc.process_all(&train_examples);
    skipped.extend(s);
    let eval_proc = Processor {
        kind: ProcessorKind::for_stage(args, args.predict_with_generate),
        template,
        tok,
        args,
    };
    let (eval, s) = eval_proc.process_all(&eval_examples);
    skipped.extend(s);
    if !train_names.is_empty() && train.is_empty() {
        if args.stage == Stage::Pt {
            bail!("Cannot find sufficient samples, consider increasing dataset size (pre-training needs at least `cutoff_len` = {} tokens).", args.cutoff_len);
        }
        let first = skipped
            .first()
            .map(|s| format!(" First problem: {s}."))
            .unwrap_or_default();
        bail!("Cannot find valid samples, check `data/README.md` for the data format.{first}");
    }
    Ok(DatasetModule {
        train,
        eval,
        skipped,
        train_kind,
    })
}

/// The tokenizer of `model_name_or_path` with the run's template applied to it.
pub fn load_tokenizer_and_template(
    args: &TrainArgs,
) -> Result<(HfTokenizer, Template, Vec<String>)> {
    let Some(model) = args.model_name_or_path.as_deref() else {
        bail!("`model_name_or_path` is required");
    };
    let dir = crate::hub::resolve_model_dir(model, &args.model_revision)?;
    let mut tok = HfTokenizer::load(&dir)?;
    let (template, warnings) = super::template::get_template_and_fix_tokenizer(&mut tok, args)?;
    Ok((tok, template, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_takes_everything_before_repeating() {
        let s = sample((0..5).collect(), 8, 1);
        assert_eq!(s.len(), 8);
        let mut first: Vec<_> = s[..5].to_vec();
        first.sort();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        assert_eq!(sample((0..5).collect(), 3, 1).len(), 3);
    }
}
