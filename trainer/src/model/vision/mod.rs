//! The vision side of vision-language models: the config (`vision_config` and the token ids that
//! place images in the text), and the towers that turn pixel patches into language-model
//! embeddings ([`qwen2_vl`]).

pub mod qwen2_vl;

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

/// Which vision tower a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionKind {
    /// Qwen2-VL: LayerNorm blocks with a QuickGELU MLP, full attention within each image, a
    /// LayerNorm + two-layer GELU merger of 2×2 patches.
    Qwen2Vl,
    /// Qwen2.5-VL: RMSNorm blocks with a SwiGLU MLP, window attention but in the full-attention
    /// blocks, an RMSNorm merger.
    Qwen25Vl,
}

/// `vision_config` and the image token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub kind: VisionKind,
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub in_channels: usize,
    /// Rotary base of the vision attention.
    pub rope_theta: f64,
    pub image_token_id: u32,
    /// Qwen2.5-VL: the attention window in pixels, and the blocks that attend over the whole
    /// image. (The MLP and merger widths come from the weights.)
    pub window_size: usize,
    pub fullatt_blocks: Vec<usize>,
}

impl VisionConfig {
    /// Reads the vision side of a `qwen2_vl` config (flat, as the Hub's checkpoints have it, or
    /// with the text model under `text_config`, as transformers 5 writes it).
    pub fn from_json(v: &Map<String, Value>, model_type: &str, file: &Path) -> Result<Self> {
        let kind = match model_type {
            "qwen2_vl" => VisionKind::Qwen2Vl,
            "qwen2_5_vl" => VisionKind::Qwen25Vl,
            other => bail!("{}: `{other}` has no vision tower here", file.display()),
        };
        let vc = v
            .get("vision_config")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: `vision_config` is missing", file.display()))?;
        let int = |k: &str, d: usize| vc.get(k).and_then(Value::as_u64).map_or(d, |x| x as usize);
        let token = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as u32);
        let want_act = if kind == VisionKind::Qwen2Vl {
            "quick_gelu"
        } else {
            "silu"
        };
        let act = vc
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or(want_act);
        if act != want_act {
            bail!(
                "{}: `vision_config.hidden_act: {act}` is not supported (this family's is {want_act})",
                file.display()
            );
        }
        // The tower's width: Qwen2-VL's `embed_dim` (its `hidden_size` is the language model's),
        // Qwen2.5-VL's `hidden_size`.
        let embed_dim = match kind {
            VisionKind::Qwen2Vl => int("embed_dim", 1280),
            VisionKind::Qwen25Vl => int("hidden_size", 1280),
        };
        let num_heads = int("num_heads", 16);
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads * 4) {
            bail!(
                "{}: `vision_config`: embed_dim {embed_dim} must split into {num_heads} heads of a multiple of 4",
                file.display()
            );
        }
        Ok(Self {
            kind,
            depth: int("depth", 32),
            embed_dim,
            num_heads,
            patch_size: int("patch_size", 14),
            temporal_patch_size: int("temporal_patch_size", 2),
            merge_size: int("spatial_merge_size", 2),
            in_channels: vc
                .get("in_channels")
                .or_else(|| vc.get("in_chans"))
                .and_then(Value::as_u64)
                .map_or(3, |x| x as usize),
            rope_theta: vc
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            image_token_id: token("image_token_id")
                .ok_or_else(|| anyhow!("{}: `image_token_id` is missing", file.display()))?,
            window_size: int("window_size", 112),
            fullatt_blocks: super::config::usize_list(vc.get("fullatt_block_indexes"))
                .unwrap_or_else(|| {
                    if kind == VisionKind::Qwen25Vl {
                        vec![7, 15, 23, 31]
                    } else {
                        Vec::new()
                    }
                }),
        })
    }

    /// Values in one flattened patch: channels × frames × patch × patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
}

/// A vision-language config with the text model's keys where the text decoder reads them: the
/// entries of `text_config` (transformers 5) over the top level (the Hub's flat files).
pub fn flatten_text_config(mut v: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(text)) = v.get("text_config").cloned() {
        for (k, x) in text {
            if k != "model_type" {
                v.insert(k, x);
            }
        }
    }
    v
}

/// M-RoPE's split of the rotary half-dimensions between time, height and width
/// (`mrope_section`, in `rope_scaling` or `rope_parameters`).
pub fn mrope_section(v: &Map<String, Value>, file: &Path) -> Result<Option<[usize; 3]>> {
    let Some(s) = ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|k| v.get(*k))
        .find_map(|r| r.get("mrope_section"))
    else {
        return Ok(None);
    };
    let s: Vec<usize> = s
        .as_array()
        .filter(|a| a.len() == 3)
        .ok_or_else(|| anyhow!("{}: `mrope_section` must be three numbers", file.display()))?
        .iter()
        .map(|x| x.as_u64().unwrap_or(0) as usize)
        .collect();
    Ok(Some([s[0], s[1], s[2]]))
}

/// Qwen2-VL's M-RoPE positions of one row (`get_rope_index`): text tokens count up on all three
/// axes; the tokens of an image (a run of `image_token_id`) take `(t, start + row, start + col)`
/// over its merged grid, and the text after it continues from `start + max(rows, cols)`.
pub fn mrope_positions(
    ids: &[u32],
    grids: &[[usize; 3]],
    image_token_id: u32,
    merge: usize,
) -> Result<Vec<[u32; 3]>> {
    let mut out = Vec::with_capacity(ids.len());
    let mut next = 0u32;
    let mut images = grids.iter();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = *images
            .next()
            .ok_or_else(|| anyhow!("more images in the tokens than image grids"))?;
        let (h, w) = (h / merge, w / merge);
        let n = t * h * w;
        if i + n > ids.len() || ids[i..i + n].iter().any(|&x| x != image_token_id) {
            bail!("an image of {n} tokens does not fit its run of image tokens");
        }
        for ti in 0..t {
            for r in 0..h {
                for c in 0..w {
                    out.push([next + ti as u32, next + r as u32, next + c as u32]);
                }
            }
        }
        next += h.max(w) as u32;
        i += n;
    }
    if images.next().is_some() {
        bail!("more image grids than images in the tokens");
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A small vision config of `kind`.
    pub fn config(kind: VisionKind) -> VisionConfig {
        VisionConfig {
            kind,
            depth: 2,
            embed_dim: 32,
            num_heads: 2,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            in_channels: 3,
            rope_theta: 10_000.0,
            image_token_id: 1,
            window_size: 112,
            fullatt_blocks: vec![1],
        }
    }
}
