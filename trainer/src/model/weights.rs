//! Reading model weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`,
//! and the sources a model takes its tensors from while it is built (memory-mapped files, or
//! tensors in memory), quantizing linear weights on the way in for QLoRA.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::layers::{LinearWeight, Param};
use super::quant::{QuantFormat, QuantWeight};

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

/// Where a model's tensors come from while it is built: each weight taken once by name.
pub(crate) trait WeightSource {
    /// The tensor called `name`, in the model's dtype; an error names a missing one.
    fn take(&mut self, name: &str) -> Result<Tensor>;
    /// A linear layer's weight: quantized when the source quantizes, else dense.
    fn take_linear(&mut self, name: &str) -> Result<LinearWeight>;
    /// The token embedding or the LM head, which stay unquantized and frozen in QLoRA: a source
    /// that quantizes keeps a half-precision checkpoint's table in its own 16 bits (exact, and
    /// half the memory of f32); the model converts what it reads of it.
    fn take_table(&mut self, name: &str) -> Result<Tensor> {
        self.take(name)
    }
    /// The tensors no one took (kept with the model, saved again as they were).
    fn rest(&mut self) -> Result<Vec<(String, Tensor)>>;
}

/// A linear weight quantized to `quant` when its rows fit the format, else dense in `dtype`.
fn quantized_or_dense(t: Tensor, quant: Option<QuantFormat>, dtype: DType) -> Result<LinearWeight> {
    let cols = t.dim(1)?;
    Ok(match quant {
        Some(f) if f.fits(cols) => LinearWeight::Quantized(QuantWeight::quantize(&t, f)?),
        _ => LinearWeight::Dense(Param::frozen(t.to_dtype(dtype)?)),
    })
}

fn missing(name: &str) -> anyhow::Error {
    anyhow!("weights are incomplete: tensor `{name}` is missing")
}

/// Tensors already in memory (tests, benchmarks, moving a model between devices), and linear
/// weights already quantized.
pub(crate) struct MapSource {
    pub map: HashMap<String, Tensor>,
    pub quantized: HashMap<String, Arc<QuantWeight>>,
    /// Quantizes the dense linear weights as they are taken.
    pub quant: Option<QuantFormat>,
}

impl WeightSource for MapSource {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.map.remove(name).ok_or_else(|| missing(name))
    }

    fn take_linear(&mut self, name: &str) -> Result<LinearWeight> {
        if let Some(q) = self.quantized.remove(name) {
            return Ok(LinearWeight::Quantized(q));
        }
        let t = self.take(name)?;
        let dtype = t.dtype();
        quantized_or_dense(t, self.quant, dtype)
    }

    fn rest(&mut self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.map.drain().collect())
    }
}

/// The safetensors files of a model folder, memory-mapped: each tensor is read (and converted,
/// or quantized) when taken, so loading never holds more than the model plus one tensor.
pub(crate) struct FileSource {
    files: candle_core::safetensors::MmapedSafetensors,
    left: std::collections::BTreeSet<String>,
    dtype: DType,
    device: Device,
    quant: Option<QuantFormat>,
}

impl FileSource {
    pub fn open(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<QuantFormat>,
    ) -> Result<Self> {
        let paths = weight_files(dir)?;
        // SAFETY: the files are mapped read-only and not modified while the model loads.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths) }
            .map_err(|e| anyhow!("cannot read the weights of {}: {e}", dir.display()))?;
        let left = files.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            files,
            left,
            dtype,
            device: device.clone(),
            quant,
        })
    }

    fn read(&mut self, name: &str) -> Result<Tensor> {
        if !self.left.remove(name) {
            return Err(missing(name));
        }
        self.files
            .load(name, &self.device)
            .map_err(|e| anyhow!("cannot read tensor `{name}`: {e}"))
    }
}

impl WeightSource for FileSource {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.read(name)?.to_dtype(self.dtype)?)
    }

    fn take_linear(&mut self, name: &str) -> Result<LinearWeight> {
        let t = self.read(name)?;
        quantized_or_dense(t, self.quant, self.dtype)
    }

    fn take_table(&mut self, name: &str) -> Result<Tensor> {
        let t = self.read(name)?;
        let half = matches!(t.dtype(), DType::F16 | DType::BF16);
        Ok(if self.quant.is_some() && half {
            t
        } else {
            t.to_dtype(self.dtype)?
        })
    }

    fn rest(&mut self) -> Result<Vec<(String, Tensor)>> {
        let names: Vec<String> = std::mem::take(&mut self.left).into_iter().collect();
        names
            .into_iter()
            .map(|n| {
                let t = self
                    .files
                    .load(&n, &self.device)
                    .map_err(|e| anyhow!("cannot read tensor `{n}`: {e}"))?;
                Ok((n, t.to_dtype(self.dtype)?))
            })
            .collect()
    }
}
