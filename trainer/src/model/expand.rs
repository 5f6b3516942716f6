//! LLaMA Pro's block expansion (`llamafactory expand-model`, LLaMA-Factory's
//! `scripts/llama_pro.py`): after every `num_layers / num_expand` decoder layers, a copy of the
//! last one is inserted whose attention output (`o_proj`) and MLP output (`down_proj`) are zero,
//! so the expanded model computes exactly what the original does. Training with
//! `use_llama_pro: true` then updates the inserted blocks only ([`Model::llama_pro_layers`]).
//!
//! [`Model::llama_pro_layers`]: super::Model::llama_pro_layers

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use super::weights::OpenFiles;
use crate::files::{write_json, write_sharded};

/// Files besides the weights that go with the expanded model.
pub(crate) const COPIED: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// What [`expand_model`] wrote.
pub struct Expanded {
    pub files: Vec<PathBuf>,
    /// For each layer of the new model, the original layer it came from and whether it is an
    /// inserted block.
    pub layers: Vec<(usize, bool)>,
}

/// Writes `src` expanded by `num_expand` blocks to `out` (shards of at most `shard_bytes`).
pub fn expand_model(
    src: &Path,
    out: &Path,
    num_expand: usize,
    shard_bytes: u64,
) -> Result<Expanded> {
    let cfg_path = src.join("config.json");
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let n = cfg["num_hidden_layers"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: `num_hidden_layers` is missing", cfg_path.display()))?
        as usize;
    if num_expand == 0 || !n.is_multiple_of(num_expand) {
        bail!("`num_layers` {n} should be divisible by `num_expand` {num_expand}");
    }
    for per_layer in ["mlp_only_layers", "text_config", "vision_config"] {
        if !cfg[per_layer].is_null() {
            bail!(
                "{}: block expansion of a model with `{per_layer}` is not supported (a decoder-only model whose layers are all alike is)",
                cfg_path.display()
            );
        }
    }
    let split = n / num_expand;
    let mut layers = Vec::with_capacity(n + num_expand);
    for i in 0..n {
        layers.push((i, false));
        if (i + 1) % split == 0 {
            layers.push((i, true));
        }
    }
    let (files, names) = OpenFiles::open(src)?;
    let device = Device::Cpu;
    let of_layer = |name: &str| -> Option<(usize, String)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (i, tail) = rest.split_once('.')?;
        Some((i.parse().ok()?, tail.to_string()))
    };
    let mut by_layer: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for name in &names {
        match of_layer(name) {
            Some((i, tail)) => by_layer.entry(i).or_default().push((name.clone(), tail)),
            None => {
                tensors.insert(name.clone(), files.load(name, &device)?);
            }
        }
    }
    for (new, &(old, inserted)) in layers.iter().enumerate() {
        for (name, tail) in by_layer.get(&old).into_iter().flatten() {
            let t = files.load(name, &device)?;
            let zero = inserted && (tail.contains("down_proj") || tail.contains("o_proj"));
            let t = if zero { t.zeros_like()? } else { t };
            tensors.insert(format!("model.layers.{new}.{tail}"), t);
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut written = write_sharded(out, &tensors, shard_bytes)?;
    cfg["num_hidden_layers"] = Value::from(n + num_expand);
    // Per-layer attention types (transformers 5 writes them for every model) follow their
    // layers; LLaMA-Factory's script leaves the old list, which no longer covers every layer.
    if let Some(types) = cfg["layer_types"].as_array().cloned() {
        if types.len() != n {
            bail!(
                "{}: `layer_types` has {} entries for {n} layers",
                cfg_path.display(),
                types.len()
            );
        }
        cfg["layer_types"] = layers.iter().map(|&(old, _)| types[old].clone()).collect();
    }
    write_json(&out.join("config.json"), &cfg)?;
    written.push(out.join("config.json"));
    for f in COPIED {
        let from = src.join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f))
                .with_context(|| format!("cannot copy {}", from.display()))?;
            written.push(out.join(f));
        }
    }
    Ok(Expanded {
        files: written,
        layers,
    })
}
