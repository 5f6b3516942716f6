//! `llamafactory preview-data`: what the data pipeline makes of a config's datasets — the
//! rendered prompts and token ids of the first examples, and the skipped records.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use trainer::data::pipeline::{get_dataset, load_tokenizer_and_template};
use trainer::data::processor::Features;
use trainer::data::IGNORE_INDEX;
use trainer::tokenizer::HfTokenizer;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Json,
    Text,
}

#[derive(Args)]
pub struct PreviewArgs {
    /// LLaMA-Factory training YAML.
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
    /// How many examples to print (0 = all).
    #[arg(long, default_value_t = 3)]
    num: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Show the evaluation set instead of the training set.
    #[arg(long)]
    eval: bool,
}

pub fn run(a: PreviewArgs) -> Result<ExitCode> {
    let (args, warnings) = trainer::config::load_args(&a.config, &a.overrides)?;
    trainer::config::validate(&args)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let (tok, template, warnings) = load_tokenizer_and_template(&args)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let module = get_dataset(&args, &tok, &template)?;
    for s in module.skipped.iter().take(20) {
        eprintln!("warning: skipped {s}");
    }
    let rows = if a.eval { &module.eval } else { &module.train };
    eprintln!(
        "{} {} examples ({} records skipped)",
        rows.len(),
        if a.eval { "eval" } else { "train" },
        module.skipped.len()
    );
    let take = if a.num == 0 {
        rows.len()
    } else {
        a.num.min(rows.len())
    };
    // Images: their grids (vision-language templates).
    let media = (template.mm != trainer::data::template::MmPlugin::Base
        && rows.iter().any(|f| !f.images.is_empty()))
    .then(|| trainer::data::media::MediaContext::load(&tok.dir, &args))
    .transpose()?;
    let mut out = std::io::stdout().lock();
    for (i, f) in rows.iter().take(take).enumerate() {
        match a.format {
            Format::Json => writeln!(out, "{}", serde_json::to_string(f)?)?,
            Format::Text => {
                write_text(&mut out, &tok, i + 1, f)?;
                if let Some(m) = &media {
                    for path in &f.images {
                        let grid = m.image_grid(path).map_err(anyhow::Error::msg)?;
                        writeln!(
                            out,
                            "── image {path}: grid {}×{}×{} patches → {} image tokens",
                            grid[0],
                            grid[1],
                            grid[2],
                            m.tokens_for(grid)
                        )?;
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` with runs of image tokens (Qwen2-VL's `<|image_pad|>`, LLaVA's `<image>`) collapsed.
fn collapse_images(text: &str) -> String {
    collapse_runs(&collapse_runs(text, "<|image_pad|>"), "<image>")
}

/// `text` with each run of `token` written once with its count (`<|image_pad|>×66`).
fn collapse_runs(text: &str, token: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(token) {
        out.push_str(&rest[..i]);
        let mut n = 0;
        rest = &rest[i..];
        while let Some(r) = rest.strip_prefix(token) {
            n += 1;
            rest = r;
        }
        out.push_str(token);
        if n > 1 {
            out.push_str(&format!("×{n}"));
        }
    }
    out.push_str(rest);
    out
}

/// Decoded text with trained spans between ⟦ and ⟧, so people see what the loss covers.
fn marked(tok: &HfTokenizer, ids: &[u32], labels: Option<&[i64]>) -> String {
    let Some(labels) = labels else {
        return collapse_images(&tok.decode(ids, false));
    };
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let trained = labels.get(start).is_some_and(|&l| l != IGNORE_INDEX);
        let mut end = start;
        while end < ids.len() && labels.get(end).is_some_and(|&l| l != IGNORE_INDEX) == trained {
            end += 1;
        }
        let text = collapse_images(&tok.decode(&ids[start..end], false));
        if trained {
            out += &format!("⟦{text}⟧");
        } else {
            out += &text;
        }
        start = end;
    }
    out
}

fn write_text(out: &mut impl Write, tok: &HfTokenizer, n: usize, f: &Features) -> Result<()> {
    let trained = |l: &Option<Vec<i64>>| {
        l.as_ref()
            .map(|l| l.iter().filter(|&&x| x != IGNORE_INDEX).count())
    };
    if let (Some(ci), Some(ri)) = (&f.chosen_input_ids, &f.rejected_input_ids) {
        writeln!(out, "━━ example {n} (pairwise) ━━")?;
        writeln!(
            out,
            "── chosen ({} tokens, {} trained):",
            ci.len(),
            trained(&f.chosen_labels).unwrap_or(0)
        )?;
        writeln!(out, "{}", marked(tok, ci, f.chosen_labels.as_deref()))?;
        writeln!(
            out,
            "── rejected ({} tokens, {} trained):",
            ri.len(),
            trained(&f.rejected_labels).unwrap_or(0)
        )?;
        writeln!(out, "{}", marked(tok, ri, f.rejected_labels.as_deref()))?;
        return Ok(());
    }
    let ids = f.input_ids.as_deref().unwrap_or_default();
    let tag = match f.kto_tags {
        Some(true) => ", desirable",
        Some(false) => ", undesirable",
        None => "",
    };
    let count = trained(&f.labels)
        .map(|t| format!(", {t} trained"))
        .unwrap_or_default();
    writeln!(out, "━━ example {n} ({} tokens{count}{tag}) ━━", ids.len())?;
    writeln!(out, "{}", marked(tok, ids, f.labels.as_deref()))?;
    if let Some(kl) = &f.kl_input_ids {
        writeln!(out, "── KL pair ({} tokens):", kl.len())?;
        writeln!(out, "{}", marked(tok, kl, f.kl_labels.as_deref()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_token_runs_are_written_once_with_their_count() {
        let t =
            "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>x<|image_pad|>";
        assert_eq!(
            super::collapse_runs(t, "<|image_pad|>"),
            "<|vision_start|><|image_pad|>×3<|vision_end|>x<|image_pad|>"
        );
    }
}
