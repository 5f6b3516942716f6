//! The vision side of vision-language models: the config (`vision_config` and the token ids that
//! place images in the text), and the towers that turn pixel patches into language-model
//! embeddings ([`qwen2_vl`]; [`clip`], LLaVA's CLIP tower and projector), behind one
//! [`VisionTower`].

pub mod clip;
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
    /// LLaVA-1.5: a CLIP vision transformer (class token, learned positions), the features of
    /// one of its layers through a two-layer GELU projector.
    Llava,
}

impl VisionKind {
    /// The part the tensor `name` of a model with this tower belongs to; `None` for the
    /// language model's tensors.
    pub fn part(self, name: &str) -> Option<VisionPart> {
        let (tower, projector) = match self {
            Self::Qwen2Vl | Self::Qwen25Vl => ("visual.", "visual.merger."),
            Self::Llava => ("vision_tower.", "multi_modal_projector."),
        };
        if name.starts_with(projector) {
            Some(VisionPart::Projector)
        } else if name.starts_with(tower) {
            Some(VisionPart::Tower)
        } else {
            None
        }
    }
}

/// What LLaVA's CLIP tower adds to [`VisionConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Side of the square image the learned positions cover, in pixels.
    pub image_size: usize,
    pub layer_norm_eps: f64,
    /// `vision_feature_layer`: the hidden state the projector reads (negative: from the end;
    /// `-1` is the last layer's output, `0` the embeddings).
    pub feature_layer: i64,
    /// `vision_feature_select_strategy: full` keeps the class token's feature; `default` drops it.
    pub keep_cls: bool,
    /// `multimodal_projector_bias`.
    pub projector_bias: bool,
}

impl ClipConfig {
    /// Patches a side.
    pub fn grid(&self, patch_size: usize) -> usize {
        self.image_size / patch_size
    }

    /// How many encoder layers run to reach `feature_layer` of a `depth`-layer tower.
    pub fn layers_to_run(&self, depth: usize) -> Result<usize> {
        let index = if self.feature_layer < 0 {
            depth as i64 + 1 + self.feature_layer
        } else {
            self.feature_layer
        };
        if index < 0 || index > depth as i64 {
            bail!(
                "`vision_feature_layer: {}` is outside the tower's {depth} layers",
                self.feature_layer
            );
        }
        Ok(index as usize)
    }
}

/// `vision_config` and the image token id.
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
    /// LLaVA's CLIP settings.
    pub clip: Option<ClipConfig>,
}

impl VisionConfig {
    /// Reads the vision side of a `qwen2_vl` config (flat, as the Hub's checkpoints have it, or
    /// with the text model under `text_config`, as transformers 5 writes it).
    pub fn from_json(v: &Map<String, Value>, model_type: &str, file: &Path) -> Result<Self> {
        let kind = match model_type {
            "qwen2_vl" => VisionKind::Qwen2Vl,
            "qwen2_5_vl" => VisionKind::Qwen25Vl,
            "llava" => return Self::llava(v, file),
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
            VisionKind::Qwen25Vl | VisionKind::Llava => int("hidden_size", 1280),
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
            clip: None,
        })
    }

    /// LLaVA's `vision_config` (a CLIP vision model; missing keys take `CLIPVisionConfig`'s
    /// defaults, a missing `vision_config` LLaVA-1.5's CLIP ViT-L/14-336) and its projector keys.
    fn llava(v: &Map<String, Value>, file: &Path) -> Result<Self> {
        let given = v.get("vision_config").and_then(Value::as_object);
        if let Some(t) = given
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
        {
            if t != "clip_vision_model" {
                bail!(
                    "{}: LLaVA with a `{t}` vision tower is not supported (CLIP, `clip_vision_model`, is)",
                    file.display()
                );
            }
        }
        let vl15 = [
            ("hidden_size", 1024),
            ("intermediate_size", 4096),
            ("num_hidden_layers", 24),
            ("num_attention_heads", 16),
            ("image_size", 336),
            ("patch_size", 14),
        ];
        let clip_default = [
            ("hidden_size", 768),
            ("intermediate_size", 3072),
            ("num_hidden_layers", 12),
            ("num_attention_heads", 12),
            ("image_size", 224),
            ("patch_size", 32),
        ];
        let int = |k: &str| -> usize {
            let defaults = if given.is_some() {
                &clip_default
            } else {
                &vl15
            };
            given
                .and_then(|c| c.get(k))
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .or_else(|| defaults.iter().find(|(n, _)| *n == k).map(|(_, d)| *d))
                .unwrap_or(0)
        };
        let act = given
            .and_then(|c| c.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            bail!(
                "{}: `vision_config.hidden_act: {act}` is not supported (CLIP's is quick_gelu)",
                file.display()
            );
        }
        let projector_act = v
            .get("projector_hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if projector_act != "gelu" {
            bail!(
                "{}: `projector_hidden_act: {projector_act}` is not supported (LLaVA's is gelu)",
                file.display()
            );
        }
        let feature_layer = match v.get("vision_feature_layer") {
            None => -2,
            Some(x) => x.as_i64().ok_or_else(|| {
                anyhow!(
                    "{}: `vision_feature_layer: {x}` is not supported (one layer, a number, is; several layers concatenated are not)",
                    file.display()
                )
            })?,
        };
        let keep_cls = match v
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or("default")
        {
            "default" => false,
            "full" => true,
            other => bail!(
                "{}: `vision_feature_select_strategy: {other}` must be `default` or `full`",
                file.display()
            ),
        };
        let (embed_dim, num_heads) = (int("hidden_size"), int("num_attention_heads"));
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            bail!(
                "{}: `vision_config`: hidden_size {embed_dim} must split into {num_heads} heads",
                file.display()
            );
        }
        let clip = ClipConfig {
            image_size: int("image_size"),
            layer_norm_eps: given
                .and_then(|c| c.get("layer_norm_eps"))
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            feature_layer,
            keep_cls,
            projector_bias: v
                .get("multimodal_projector_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        };
        let depth = int("num_hidden_layers");
        clip.layers_to_run(depth)
            .map_err(|e| anyhow!("{}: {e}", file.display()))?;
        Ok(Self {
            kind: VisionKind::Llava,
            depth,
            embed_dim,
            num_heads,
            patch_size: int("patch_size"),
            temporal_patch_size: 1,
            merge_size: 1,
            in_channels: given
                .and_then(|c| c.get("num_channels"))
                .and_then(Value::as_u64)
                .map_or(3, |x| x as usize),
            rope_theta: 0.0,
            image_token_id: v
                .get("image_token_index")
                .or_else(|| v.get("image_token_id"))
                .and_then(Value::as_u64)
                .map_or(32000, |x| x as u32),
            window_size: 0,
            fullatt_blocks: Vec::new(),
            clip: Some(clip),
        })
    }

    /// Image tokens per image for a LLaVA tower (patches, plus the class token with the `full`
    /// strategy); `None` for Qwen2-VL, whose count depends on the image.
    pub fn fixed_image_tokens(&self) -> Option<usize> {
        let c = self.clip.as_ref()?;
        let g = c.grid(self.patch_size);
        Some(g * g + usize::from(c.keep_cls))
    }

    /// Values in one flattened patch: channels × frames × patch × patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
}

/// Which part of a vision-language model a tensor belongs to (for the freezing keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionPart {
    /// The vision encoder.
    Tower,
    /// The multi-modal projector (Qwen2-VL's merger, LLaVA's `multi_modal_projector`).
    Projector,
}

/// A model's vision tower and projector.
#[derive(Clone)]
pub enum VisionTower {
    Qwen(qwen2_vl::QwenTower),
    Clip(clip::ClipTower),
}

impl VisionTower {
    /// The tower `cfg` describes, its weights taken from `src`.
    pub(crate) fn new(
        cfg: &VisionConfig,
        src: &mut dyn crate::model::weights::WeightSource,
    ) -> Result<Self> {
        Ok(match cfg.kind {
            VisionKind::Llava => Self::Clip(clip::ClipTower::new(cfg, src)?),
            VisionKind::Qwen2Vl | VisionKind::Qwen25Vl => {
                Self::Qwen(qwen2_vl::QwenTower::new(cfg, src)?)
            }
        })
    }

    pub fn cfg(&self) -> &VisionConfig {
        match self {
            Self::Qwen(t) => &t.cfg,
            Self::Clip(t) => &t.cfg,
        }
    }

    /// `(name, param)` of the tower and projector, as the checkpoint names them.
    pub fn params(&self) -> Vec<(String, &crate::model::layers::Param)> {
        match self {
            Self::Qwen(t) => t.params(),
            Self::Clip(t) => t.params(),
        }
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut crate::model::layers::Param)> {
        match self {
            Self::Qwen(t) => t.params_mut(),
            Self::Clip(t) => t.params_mut(),
        }
    }

    /// The images' embeddings for the language model, `(image tokens, hidden)` in order.
    pub fn forward(
        &self,
        pixels: &candle_core::Tensor,
        grids: &[[usize; 3]],
        weights: crate::model::layers::Weights,
    ) -> Result<candle_core::Tensor> {
        match self {
            Self::Qwen(t) => t.forward(pixels, grids, weights),
            Self::Clip(t) => t.forward(pixels, grids, weights),
        }
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

/// LLaVA's language model config: `text_config` over the top level, its missing keys taking
/// the defaults of its family's transformers config (the Hub's llava-1.5 files list only what
/// differs from `LlamaConfig`), and its `model_type`.
pub fn llava_text_config(
    v: Map<String, Value>,
    file: &Path,
) -> Result<(Map<String, Value>, String)> {
    let text_type = v
        .get("text_config")
        .and_then(|t| t.get("model_type"))
        .and_then(Value::as_str)
        .unwrap_or("llama")
        .to_string();
    let mut out = flatten_text_config(v);
    let defaults: &[(&str, Value)] = match text_type.as_str() {
        "llama" => &[
            ("vocab_size", Value::from(32000)),
            ("hidden_size", Value::from(4096)),
            ("intermediate_size", Value::from(11008)),
            ("num_hidden_layers", Value::from(32)),
            ("num_attention_heads", Value::from(32)),
            ("max_position_embeddings", Value::from(2048)),
            ("rms_norm_eps", Value::from(1e-6)),
        ],
        _ => &[],
    };
    for (k, d) in defaults {
        out.entry(k.to_string()).or_insert_with(|| d.clone());
    }
    if !out.contains_key("hidden_size") {
        bail!("{}: `text_config.hidden_size` is missing", file.display());
    }
    Ok((out, text_type))
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
            clip: None,
        }
    }
}
