//! Reading model weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The safetensors files of a model folder, checked to exist.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no `weight_map`", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.exists() {
                bail!("model folder {} is incomplete: shard {} listed in model.safetensors.index.json is missing", dir.display(), f.display());
            }
        }
        return Ok(files);
    }
    if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        bail!("{} has only PyTorch .bin weights; convert them to safetensors (e.g. with `transformers` save_pretrained(safe_serialization=True))", dir.display());
    }
    bail!(
        "model folder {} is incomplete: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// All tensors of a model folder, converted to `dtype`.
pub fn load_weights(dir: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| anyhow!("cannot read weights {}: {e}", file.display()))?;
        for (name, t) in tensors {
            out.insert(name, t.to_dtype(dtype)?);
        }
    }
    Ok(out)
}
