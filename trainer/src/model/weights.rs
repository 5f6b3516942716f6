//! Reading model weights: `model.safetensors`, or shards listed in `model.safetensors.index.json`
//! (or PyTorch's `pytorch_model.bin` and its index, for checkpoints that ship only those),
//! and the sources a model takes its tensors from while it is built (memory-mapped files, or
//! tensors in memory), quantizing linear weights on the way in for QLoRA.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::layers::{LinearWeight, Param};
use super::quant::{QuantFormat, QuantWeight};

/// A model folder's weight files, checked to exist.
pub struct WeightFiles {
    pub format: WeightFormat,
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` zip archives (`pytorch_model.bin`), as older checkpoints ship (Baichuan 2):
    /// read by parsing the pickle for tensor locations only, no code runs.
    Pytorch,
}

/// The shards listed in an index file's `weight_map`, each checked to exist.
fn indexed(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
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
            bail!(
                "model folder {} is incomplete: shard {} listed in {} is missing",
                dir.display(),
                f.display(),
                index.display()
            );
        }
    }
    Ok(files)
}

/// The weight files of a model folder: `model.safetensors` or its index, else PyTorch's
/// `pytorch_model.bin` or its index.
pub fn weight_files(dir: &Path) -> Result<WeightFiles> {
    for (single, index, format) in [
        (
            "model.safetensors",
            "model.safetensors.index.json",
            WeightFormat::Safetensors,
        ),
        (
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            WeightFormat::Pytorch,
        ),
    ] {
        let paths = if dir.join(single).exists() {
            vec![dir.join(single)]
        } else if dir.join(index).exists() {
            indexed(dir, &dir.join(index))?
        } else {
            continue;
        };
        return Ok(WeightFiles { format, paths });
    }
    bail!(
        "model folder {} is incomplete: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json",
        dir.display()
    )
}

/// Opened weight files: safetensors memory-mapped, PyTorch archives indexed by tensor name.
pub(crate) enum OpenFiles {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pytorch {
        files: Vec<candle_core::pickle::PthTensors>,
        file_of: HashMap<String, usize>,
    },
}

impl OpenFiles {
    pub(crate) fn open(dir: &Path) -> Result<(Self, Vec<String>)> {
        let WeightFiles { format, paths } = weight_files(dir)?;
        let cannot =
            |e: candle_core::Error| anyhow!("cannot read the weights of {}: {e}", dir.display());
        Ok(match format {
            WeightFormat::Safetensors => {
                // SAFETY: the files are mapped read-only and not modified while the model loads.
                let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths) }
                    .map_err(cannot)?;
                let names = files.tensors().into_iter().map(|(n, _)| n).collect();
                (Self::Safetensors(files), names)
            }
            WeightFormat::Pytorch => {
                let mut files = Vec::new();
                let mut file_of = HashMap::new();
                for (i, p) in paths.iter().enumerate() {
                    let f = candle_core::pickle::PthTensors::new(p, None).map_err(|e| {
                        anyhow!("cannot read the PyTorch weights {}: {e}", p.display())
                    })?;
                    for name in f.tensor_infos().keys() {
                        file_of.insert(name.clone(), i);
                    }
                    files.push(f);
                }
                let names = file_of.keys().cloned().collect();
                (Self::Pytorch { files, file_of }, names)
            }
        })
    }

    pub(crate) fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = match self {
            Self::Safetensors(f) => f.load(name, device),
            Self::Pytorch { files, file_of } => {
                let f = &files[*file_of.get(name).ok_or_else(|| missing(name))?];
                f.get(name)
                    .and_then(|t| {
                        t.ok_or_else(|| candle_core::Error::Msg("not in the file".into()))
                    })
                    .and_then(|t| t.to_device(device))
            }
        };
        t.map_err(|e| anyhow!("cannot read tensor `{name}`: {e}"))
    }
}

/// How a checkpoint names the tensors the model calls `model.*` / `lm_head.*` (its language
/// model) and `vision_tower.*` (LLaVA's CLIP tower).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointLayout {
    /// Names as the model calls them.
    #[default]
    Plain,
    /// LLaVA: `language_model.model.*`, `language_model.lm_head.*`,
    /// `vision_tower.vision_model.*`, `multi_modal_projector.*` (the Hub's llava-hf files);
    /// transformers 4.52+'s `model.language_model.*`, `model.vision_tower.*`, `lm_head.*` and
    /// transformers 5's `vision_tower.*` without `vision_model.` are read too.
    Llava,
    /// Qwen2-VL / Qwen2.5-VL: `model.*`, `visual.*`, `lm_head.*` on disk (as the Hub's files and
    /// transformers save them); transformers 4.52+'s `model.language_model.*`, `model.visual.*`
    /// are read too.
    Qwen2Vl,
}

impl CheckpointLayout {
    /// The model's name for the checkpoint tensor `file` (or a module path of transformers'
    /// model, as PEFT adapters name them).
    pub fn internal(self, file: &str) -> String {
        match self {
            Self::Plain => file.to_string(),
            Self::Qwen2Vl => {
                if let Some(rest) = file.strip_prefix("model.language_model.") {
                    format!("model.{rest}")
                } else if let Some(rest) = file.strip_prefix("model.visual.") {
                    format!("visual.{rest}")
                } else {
                    file.to_string()
                }
            }
            Self::Llava => {
                let mut n = file;
                for inner in ["language_model.", "vision_tower.", "multi_modal_projector."] {
                    if let Some(rest) = n.strip_prefix("model.") {
                        if rest.starts_with(inner) {
                            n = rest;
                        }
                    }
                }
                if let Some(rest) = n.strip_prefix("language_model.") {
                    if rest.starts_with("model.") || rest.starts_with("lm_head.") {
                        rest.to_string()
                    } else {
                        format!("model.{rest}")
                    }
                } else if let Some(rest) = n.strip_prefix("vision_tower.vision_model.") {
                    format!("vision_tower.{rest}")
                } else {
                    n.to_string()
                }
            }
        }
    }

    /// The name a checkpoint written by us gives the model's tensor `internal` (the Hub's
    /// layout, which transformers 4 and 5 both read).
    pub fn file(self, internal: &str) -> String {
        match self {
            Self::Plain | Self::Qwen2Vl => internal.to_string(),
            Self::Llava => {
                if internal.starts_with("model.") || internal.starts_with("lm_head.") {
                    format!("language_model.{internal}")
                } else if let Some(rest) = internal.strip_prefix("vision_tower.") {
                    format!("vision_tower.vision_model.{rest}")
                } else {
                    internal.to_string()
                }
            }
        }
    }
}

impl CheckpointLayout {
    /// The path of the model's module `internal` in transformers' model (4.52 and later, and 5),
    /// which names the keys of PEFT adapters: a vision-language model's language model sits
    /// under `model.language_model.`.
    pub fn module_path(self, internal: &str) -> String {
        match self {
            Self::Plain => internal.to_string(),
            Self::Llava | Self::Qwen2Vl => match internal.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None if internal.starts_with("multi_modal_projector.") => {
                    format!("model.{internal}")
                }
                None => match internal.strip_prefix("visual.") {
                    Some(rest) => format!("model.visual.{rest}"),
                    None => internal.to_string(),
                },
            },
        }
    }

    /// The names an adapter may give the module `internal`: transformers' module path first,
    /// then the checkpoint's and the model's own names (adapters of older transformers, and
    /// ours before module paths).
    pub fn module_aliases(self, internal: &str) -> Vec<String> {
        let mut out = vec![self.module_path(internal)];
        for n in [self.file(internal), internal.to_string()] {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    }
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

/// The weight files of a model folder: each tensor is read (and converted, or quantized) when
/// taken, so loading never holds more than the model plus one tensor.
pub(crate) struct FileSource {
    files: OpenFiles,
    /// The tensors not yet taken: the model's name → the file's.
    left: std::collections::BTreeMap<String, String>,
    dtype: DType,
    device: Device,
    quant: Option<QuantFormat>,
    /// A GPTQ checkpoint: its linear weights are read packed (`qweight`, `qzeros`, …).
    gptq: Option<super::quant::gptq::GptqCheckpoint>,
}

impl FileSource {
    pub fn open(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<QuantFormat>,
        layout: CheckpointLayout,
        gptq: Option<super::quant::gptq::GptqCheckpoint>,
    ) -> Result<Self> {
        let (files, names) = OpenFiles::open(dir)?;
        let left = names
            .into_iter()
            .map(|n| (layout.internal(&n), n))
            .collect();
        Ok(Self {
            files,
            left,
            dtype,
            device: device.clone(),
            quant,
            gptq,
        })
    }

    fn read(&mut self, name: &str) -> Result<Tensor> {
        let file = self.left.remove(name).ok_or_else(|| missing(name))?;
        self.files.load(&file, &self.device)
    }
}

impl WeightSource for FileSource {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.read(name)?.to_dtype(self.dtype)?)
    }

    fn take_linear(&mut self, name: &str) -> Result<LinearWeight> {
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let packed = format!("{base}.qweight");
        if let (Some(g), true) = (self.gptq, self.left.contains_key(&packed)) {
            let qweight = self.read(&packed)?;
            let qzeros = self.read(&format!("{base}.qzeros"))?;
            let scales = self.read(&format!("{base}.scales"))?;
            let g_idx_name = format!("{base}.g_idx");
            let g_idx = if self.left.contains_key(&g_idx_name) {
                Some(self.read(&g_idx_name)?)
            } else {
                None
            };
            let q = super::quant::gptq::Quantized::from_tensors(
                g.bits,
                &qweight,
                &qzeros,
                &scales,
                g_idx.as_ref(),
                g.zeros_minus_one,
                base,
            )?;
            return Ok(LinearWeight::Quantized(
                super::quant::QuantWeight::from_gptq(q, g.group_size, &self.device),
            ));
        }
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
        std::mem::take(&mut self.left)
            .into_iter()
            .map(|(n, file)| {
                let t = self.files.load(&file, &self.device)?;
                Ok((n, t.to_dtype(self.dtype)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::CheckpointLayout::Llava;

    #[test]
    fn llava_names_read_from_every_layout_and_write_the_hubs() {
        for (file, internal) in [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
            ),
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
            ),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
            (
                "vision_tower.vision_model.pre_layrnorm.bias",
                "vision_tower.pre_layrnorm.bias",
            ),
            (
                "model.vision_tower.vision_model.pre_layrnorm.bias",
                "vision_tower.pre_layrnorm.bias",
            ),
            (
                "vision_tower.pre_layrnorm.bias",
                "vision_tower.pre_layrnorm.bias",
            ),
            (
                "model.multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
        ] {
            assert_eq!(Llava.internal(file), internal, "{file}");
        }
        assert_eq!(
            Llava.file("model.norm.weight"),
            "language_model.model.norm.weight"
        );
        assert_eq!(
            Llava.file("lm_head.weight"),
            "language_model.lm_head.weight"
        );
        assert_eq!(
            Llava.file("vision_tower.embeddings.class_embedding"),
            "vision_tower.vision_model.embeddings.class_embedding"
        );
    }
}
