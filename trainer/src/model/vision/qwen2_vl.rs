//! The vision towers of Qwen2-VL and Qwen2.5-VL: flattened `14×14×2` patches embedded by one
//! linear map (the checkpoint's Conv3d, whose kernel equals its stride), 2-D rotary attention
//! (height and width angles side by side), blocks, and the merger that turns each 2×2 window of
//! patches into one language-model embedding.
//! - Qwen2-VL: LayerNorm blocks with a QuickGELU MLP, full attention within each image, a
//!   LayerNorm merger.
//! - Qwen2.5-VL: RMSNorm blocks with a SwiGLU MLP; attention within windows of
//!   `window_size` pixels (the patches reordered window by window, the order undone after the
//!   merger) except in the `fullatt_block_indexes` blocks; an RMSNorm merger.
//!
//! Composed from differentiable candle ops, so the merger (the multi-modal projector) can train.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::{VisionConfig, VisionKind};
use crate::model::layers::{f32_if_half, Param, Weights};
use crate::model::weights::WeightSource;

/// A linear map with an optional bias, its weight `(out, in)`.
#[derive(Clone)]
pub(super) struct Dense {
    pub(super) w: Param,
    pub(super) b: Option<Param>,
}

impl Dense {
    pub(super) fn new(name: &str, bias: bool, src: &mut dyn WeightSource) -> Result<Self> {
        Ok(Self {
            w: Param::frozen(src.take(&format!("{name}.weight"))?),
            b: bias
                .then(|| src.take(&format!("{name}.bias")).map(Param::frozen))
                .transpose()?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, weights: Weights, dtype: DType) -> Result<Tensor> {
        let y = x.matmul(&self.w.value(weights, dtype)?.0.to_dtype(dtype)?.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(&b.value(weights, dtype)?.0.to_dtype(dtype)?)?,
            None => y,
        })
    }

    pub(super) fn params<'a>(&'a self, name: &str, out: &mut Vec<(String, &'a Param)>) {
        out.push((format!("{name}.weight"), &self.w));
        if let Some(b) = &self.b {
            out.push((format!("{name}.bias"), b));
        }
    }

    pub(super) fn params_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, &'a mut Param)>) {
        out.push((format!("{name}.weight"), &mut self.w));
        if let Some(b) = &mut self.b {
            out.push((format!("{name}.bias"), b));
        }
    }
}

/// LayerNorm (weight and bias; Qwen2-VL) or RMSNorm (weight; Qwen2.5-VL), eps 1e-6, computed in
/// f32 for a half-precision model.
#[derive(Clone)]
struct Norm(Dense);

impl Norm {
    fn new(name: &str, kind: VisionKind, src: &mut dyn WeightSource) -> Result<Self> {
        Ok(Self(Dense::new(name, kind == VisionKind::Qwen2Vl, src)?))
    }

    fn forward(&self, x: &Tensor, weights: Weights) -> Result<Tensor> {
        norm(&self.0, x, weights, 1e-6)
    }
}

/// LayerNorm over the last dimension when `d` has a bias, else RMSNorm, with `d`'s weight (and
/// bias), computed in f32 for a half-precision model.
pub(super) fn norm(d: &Dense, x: &Tensor, weights: Weights, eps: f64) -> Result<Tensor> {
    {
        let dtype = x.dtype();
        let cd = f32_if_half(dtype);
        let x = x.to_dtype(cd)?;
        let w = d.w.value(weights, cd)?.0.to_dtype(cd)?;
        let y = match &d.b {
            Some(b) => {
                let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered
                    .broadcast_div(&(var + eps)?.sqrt()?)?
                    .broadcast_mul(&w)?
                    .broadcast_add(&b.value(weights, cd)?.0.to_dtype(cd)?)?
            }
            None => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(&w)?
            }
        };
        Ok(y.to_dtype(dtype)?)
    }
}

/// A block's MLP.
#[derive(Clone)]
enum Ffn {
    /// `fc2(quick_gelu(fc1(x)))` (Qwen2-VL).
    QuickGelu { fc1: Dense, fc2: Dense },
    /// `down(silu(gate(x)) · up(x))`, with biases (Qwen2.5-VL).
    SwiGlu { gate: Dense, up: Dense, down: Dense },
}

impl Ffn {
    fn forward(&self, x: &Tensor, weights: Weights, dtype: DType) -> Result<Tensor> {
        match self {
            Ffn::QuickGelu { fc1, fc2 } => {
                let h = fc1.forward(x, weights, dtype)?;
                // QuickGELU: x·σ(1.702·x).
                let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
                fc2.forward(&h, weights, dtype)
            }
            Ffn::SwiGlu { gate, up, down } => {
                let g = gate.forward(x, weights, dtype)?;
                let g = (&g * candle_nn::ops::sigmoid(&g)?)?;
                let h = (g * up.forward(x, weights, dtype)?)?;
                down.forward(&h, weights, dtype)
            }
        }
    }

    fn parts(&self) -> Vec<(&'static str, &Dense)> {
        match self {
            Ffn::QuickGelu { fc1, fc2 } => vec![("mlp.fc1", fc1), ("mlp.fc2", fc2)],
            Ffn::SwiGlu { gate, up, down } => vec![
                ("mlp.gate_proj", gate),
                ("mlp.up_proj", up),
                ("mlp.down_proj", down),
            ],
        }
    }

    fn parts_mut(&mut self) -> Vec<(&'static str, &mut Dense)> {
        match self {
            Ffn::QuickGelu { fc1, fc2 } => vec![("mlp.fc1", fc1), ("mlp.fc2", fc2)],
            Ffn::SwiGlu { gate, up, down } => vec![
                ("mlp.gate_proj", gate),
                ("mlp.up_proj", up),
                ("mlp.down_proj", down),
            ],
        }
    }
}

#[derive(Clone)]
struct Block {
    norm1: Norm,
    qkv: Dense,
    proj: Dense,
    norm2: Norm,
    ffn: Ffn,
}

impl Block {
    fn new(i: usize, c: &VisionConfig, src: &mut dyn WeightSource) -> Result<Self> {
        let p = |part: &str| format!("visual.blocks.{i}.{part}");
        Ok(Block {
            norm1: Norm::new(&p("norm1"), c.kind, src)?,
            qkv: Dense::new(&p("attn.qkv"), true, src)?,
            proj: Dense::new(&p("attn.proj"), true, src)?,
            norm2: Norm::new(&p("norm2"), c.kind, src)?,
            ffn: match c.kind {
                VisionKind::Qwen2Vl => Ffn::QuickGelu {
                    fc1: Dense::new(&p("mlp.fc1"), true, src)?,
                    fc2: Dense::new(&p("mlp.fc2"), true, src)?,
                },
                VisionKind::Qwen25Vl | VisionKind::Llava => Ffn::SwiGlu {
                    gate: Dense::new(&p("mlp.gate_proj"), true, src)?,
                    up: Dense::new(&p("mlp.up_proj"), true, src)?,
                    down: Dense::new(&p("mlp.down_proj"), true, src)?,
                },
            },
        })
    }

    fn parts(&self) -> Vec<(&'static str, &Dense)> {
        let mut v = vec![
            ("norm1", &self.norm1.0),
            ("attn.qkv", &self.qkv),
            ("attn.proj", &self.proj),
            ("norm2", &self.norm2.0),
        ];
        v.extend(self.ffn.parts());
        v
    }

    fn parts_mut(&mut self) -> Vec<(&'static str, &mut Dense)> {
        let mut v = vec![
            ("norm1", &mut self.norm1.0),
            ("attn.qkv", &mut self.qkv),
            ("attn.proj", &mut self.proj),
            ("norm2", &mut self.norm2.0),
        ];
        v.extend(self.ffn.parts_mut());
        v
    }
}

/// The vision tower and its merger (`visual.*`).
#[derive(Clone)]
pub struct QwenTower {
    pub cfg: VisionConfig,
    patch_embed: Param,
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Dense,
    merger_fc2: Dense,
}

/// Rotate-half rotary: `x·cos + rotate_half(x)·sin` over the last dimension.
fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (a, b) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// Qwen2.5-VL's windows: the order of the merge units (2×2 patch groups) window by window, and
/// each window's length in patches.
fn windows(c: &VisionConfig, grids: &[[usize; 3]]) -> (Vec<u32>, Vec<usize>) {
    let m = c.merge_size;
    let ws = (c.window_size / m / c.patch_size).max(1);
    let (mut order, mut lens) = (Vec::new(), Vec::new());
    let mut base = 0usize;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / m, w / m);
        for ti in 0..t {
            for wh in 0..lh.div_ceil(ws) {
                for ww in 0..lw.div_ceil(ws) {
                    let mut n = 0;
                    for r in wh * ws..((wh + 1) * ws).min(lh) {
                        for col in ww * ws..((ww + 1) * ws).min(lw) {
                            order.push((base + ti * lh * lw + r * lw + col) as u32);
                            n += 1;
                        }
                    }
                    if n > 0 {
                        lens.push(n * m * m);
                    }
                }
            }
        }
        base += t * lh * lw;
    }
    (order, lens)
}

/// Rows of `x (units·m², …)` reordered unit by unit (`order` indexes units of `m²` rows).
fn permute_units(x: &Tensor, order: &Tensor, m2: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let mut grouped = vec![dims[0] / m2, m2];
    grouped.extend_from_slice(&dims[1..]);
    Ok(x.reshape(grouped)?.index_select(order, 0)?.reshape(dims)?)
}

impl QwenTower {
    /// The tower's weights from `visual.*`.
    pub(crate) fn new(cfg: &VisionConfig, src: &mut dyn WeightSource) -> Result<Self> {
        let conv = src.take("visual.patch_embed.proj.weight")?;
        if conv.elem_count() != cfg.embed_dim * cfg.patch_dim() {
            bail!(
                "visual.patch_embed.proj.weight has shape {:?}; {} × {} expected",
                conv.dims(),
                cfg.embed_dim,
                cfg.patch_dim()
            );
        }
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(i, cfg, src))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: Param::frozen(conv),
            blocks,
            merger_norm: Norm::new("visual.merger.ln_q", cfg.kind, src)?,
            merger_fc1: Dense::new("visual.merger.mlp.0", true, src)?,
            merger_fc2: Dense::new("visual.merger.mlp.2", true, src)?,
        })
    }

    /// `(name, param)` of the tower, as the checkpoint names and shapes them (the patch
    /// embedding stays a Conv3d kernel and is flattened where it is used).
    pub fn params(&self) -> Vec<(String, &Param)> {
        let mut out = vec![(
            "visual.patch_embed.proj.weight".to_string(),
            &self.patch_embed,
        )];
        for (i, b) in self.blocks.iter().enumerate() {
            for (part, d) in b.parts() {
                d.params(&format!("visual.blocks.{i}.{part}"), &mut out);
            }
        }
        self.merger_norm.0.params("visual.merger.ln_q", &mut out);
        self.merger_fc1.params("visual.merger.mlp.0", &mut out);
        self.merger_fc2.params("visual.merger.mlp.2", &mut out);
        out
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = vec![(
            "visual.patch_embed.proj.weight".to_string(),
            &mut self.patch_embed,
        )];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (part, d) in b.parts_mut() {
                d.params_mut(&format!("visual.blocks.{i}.{part}"), &mut out);
            }
        }
        self.merger_norm
            .0
            .params_mut("visual.merger.ln_q", &mut out);
        self.merger_fc1.params_mut("visual.merger.mlp.0", &mut out);
        self.merger_fc2.params_mut("visual.merger.mlp.2", &mut out);
        out
    }

    /// Rotary tables `(patches, 1, head_dim)` for the images' grids: each patch's row and column
    /// angles side by side, patches in merge-window order.
    fn rotary_tables(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let quarter = hd / 4;
        let inv: Vec<f64> = (0..quarter)
            .map(|i| 1.0 / self.cfg.rope_theta.powf((2 * i) as f64 / (hd / 2) as f64))
            .collect();
        let m = self.cfg.merge_size;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (row, col) = ((bh * m + mh) as f64, (bw * m + mw) as f64);
                                let angles: Vec<f64> = inv
                                    .iter()
                                    .map(|f| row * f)
                                    .chain(inv.iter().map(|f| col * f))
                                    .collect();
                                for _ in 0..2 {
                                    cos.extend(angles.iter().map(|a| a.cos() as f32));
                                    sin.extend(angles.iter().map(|a| a.sin() as f32));
                                }
                            }
                        }
                    }
                }
            }
        }
        let n = cos.len() / hd;
        Ok((
            Tensor::from_vec(cos, (n, 1, hd), device)?,
            Tensor::from_vec(sin, (n, 1, hd), device)?,
        ))
    }

    /// The images' embeddings for the language model: `pixel_values (patches, patch_dim)` with
    /// the images' `(t, h, w)` grids → `(patches / merge², language-model hidden)`.
    pub fn forward(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        weights: Weights,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let dtype = self.patch_embed.tensor.dtype();
        let n: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
        if pixels.dims() != [n, c.patch_dim()] {
            bail!(
                "pixel values have shape {:?}; the image grids need ({n}, {})",
                pixels.dims(),
                c.patch_dim()
            );
        }
        let (nh, hd) = (c.num_heads, c.head_dim());
        let m2 = c.merge_size * c.merge_size;
        let embed = self
            .patch_embed
            .value(weights, dtype)?
            .0
            .to_dtype(dtype)?
            .reshape((c.embed_dim, c.patch_dim()))?;
        let mut x = pixels.to_dtype(dtype)?.matmul(&embed.t()?)?;
        let (mut cos, mut sin) = self.rotary_tables(grids, pixels.device())?;
        let images: Vec<usize> = grids.iter().map(|g| g.iter().product()).collect();
        // Qwen2.5-VL: patches window by window (rotary tables too), windows for most blocks.
        let windowed = (c.kind == VisionKind::Qwen25Vl)
            .then(|| -> Result<_> {
                let (order, lens) = windows(c, grids);
                let order = Tensor::from_vec(order, n / m2, pixels.device())?;
                Ok((order, lens))
            })
            .transpose()?;
        if let Some((order, _)) = &windowed {
            x = permute_units(&x, order, m2)?;
            cos = permute_units(&cos, order, m2)?;
            sin = permute_units(&sin, order, m2)?;
        }
        let scale = (hd as f64).powf(-0.5);
        let cd = f32_if_half(dtype);
        let (cos, sin) = (cos.to_dtype(cd)?, sin.to_dtype(cd)?);
        for (i, b) in self.blocks.iter().enumerate() {
            let segments = match &windowed {
                Some((_, lens)) if !c.fullatt_blocks.contains(&i) => lens,
                _ => &images,
            };
            let h = b.norm1.forward(&x, weights)?;
            let qkv = b.qkv.forward(&h, weights, dtype)?.reshape((n, 3, nh, hd))?;
            let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i, 1)?.squeeze(1)?) };
            let q = rotary(&part(0)?.to_dtype(cd)?, &cos, &sin)?.to_dtype(dtype)?;
            let k = rotary(&part(1)?.to_dtype(cd)?, &cos, &sin)?.to_dtype(dtype)?;
            let v = part(2)?;
            // Full attention within each segment (an image, or a window).
            let mut outs = Vec::with_capacity(segments.len());
            let mut start = 0;
            for &len in segments {
                let seg = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?)
                };
                let (q, k, v) = (seg(&q)?, seg(&k)?, seg(&v)?);
                let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(cd)?;
                let probs = crate::model::softmax(&scores)?.to_dtype(dtype)?;
                outs.push(probs.matmul(&v)?.transpose(0, 1)?);
                start += len;
            }
            let attn = Tensor::cat(&outs, 0)?.reshape((n, nh * hd))?;
            x = (x + b.proj.forward(&attn, weights, dtype)?)?;
            let h = b.norm2.forward(&x, weights)?;
            x = (x + b.ffn.forward(&h, weights, dtype)?)?;
        }
        let x = self
            .merger_norm
            .forward(&x, weights)?
            .reshape((n / m2, c.embed_dim * m2))?;
        let x = self.merger_fc1.forward(&x, weights, dtype)?.gelu_erf()?;
        let x = self.merger_fc2.forward(&x, weights, dtype)?;
        match &windowed {
            None => Ok(x),
            Some((order, _)) => {
                // Back to the images' own order.
                let order: Vec<u32> = order.to_vec1()?;
                let mut back = vec![0u32; order.len()];
                for (pos, &unit) in order.iter().enumerate() {
                    back[unit as usize] = pos as u32;
                }
                let back = Tensor::from_vec(back, order.len(), x.device())?;
                x.index_select(&back, 0).map_err(|e| anyhow!("{e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_transformers_window_index() {
        // transformers' get_vision_window_index for grid (1, 8, 12), window 112 px (4 merge units),
        // merge 2, patch 14: the 4×6 merge units in windows of 4×4 (then 4×2).
        let mut c = super::super::tests_support::config(VisionKind::Qwen25Vl);
        c.window_size = 112;
        let (order, lens) = windows(&c, &[[1, 8, 12]]);
        assert_eq!(lens, vec![64, 32]);
        assert_eq!(
            order,
            [
                0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22,
                23
            ]
        );
    }
}
