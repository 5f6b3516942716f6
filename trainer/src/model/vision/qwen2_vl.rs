//! Qwen2-VL's vision tower: flattened `14×14×2` patches embedded by one linear map (the
//! checkpoint's Conv3d, whose kernel equals its stride), 2-D rotary attention (height and width
//! angles side by side, full attention within each image), LayerNorm blocks with a QuickGELU MLP,
//! and the merger that turns each 2×2 window of patches into one language-model embedding.
//! Composed from differentiable candle ops, so the merger (the multi-modal projector) can train.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::VisionConfig;
use crate::model::layers::{f32_if_half, Param, Weights};
use crate::model::weights::WeightSource;

#[derive(Clone)]
struct Dense {
    w: Param,
    b: Option<Param>,
}

impl Dense {
    fn new(name: &str, bias: bool, src: &mut dyn WeightSource) -> Result<Self> {
        Ok(Self {
            w: Param::frozen(src.take(&format!("{name}.weight"))?),
            b: bias
                .then(|| src.take(&format!("{name}.bias")).map(Param::frozen))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor, weights: Weights, dtype: DType) -> Result<Tensor> {
        let y = x.matmul(&self.w.value(weights, dtype)?.0.to_dtype(dtype)?.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(&b.value(weights, dtype)?.0.to_dtype(dtype)?)?,
            None => y,
        })
    }

    fn params(&self, name: &str) -> Vec<(String, &Param)> {
        let mut out = vec![(format!("{name}.weight"), &self.w)];
        if let Some(b) = &self.b {
            out.push((format!("{name}.bias"), b));
        }
        out
    }

    fn params_mut(&mut self, name: &str) -> Vec<(String, &mut Param)> {
        let mut out = vec![(format!("{name}.weight"), &mut self.w)];
        if let Some(b) = &mut self.b {
            out.push((format!("{name}.bias"), b));
        }
        out
    }
}

/// LayerNorm (eps 1e-6) with weight and bias, computed in f32 for a half-precision model.
#[derive(Clone)]
struct LayerNorm(Dense);

impl LayerNorm {
    fn new(name: &str, src: &mut dyn WeightSource) -> Result<Self> {
        Ok(Self(Dense::new(name, true, src)?))
    }

    fn forward(&self, x: &Tensor, weights: Weights) -> Result<Tensor> {
        let dtype = x.dtype();
        let cd = f32_if_half(dtype);
        let x = x.to_dtype(cd)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centered.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        let w = self.0.w.value(weights, cd)?.0.to_dtype(cd)?;
        let b = self.0.b.as_ref().expect("LayerNorm has a bias");
        let y = y
            .broadcast_mul(&w)?
            .broadcast_add(&b.value(weights, cd)?.0.to_dtype(cd)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

#[derive(Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Dense,
    proj: Dense,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
}

const BLOCK_PARTS: [&str; 6] = [
    "norm1",
    "attn.qkv",
    "attn.proj",
    "norm2",
    "mlp.fc1",
    "mlp.fc2",
];

/// The vision tower and its merger (`visual.*`).
#[derive(Clone)]
pub struct VisionTower {
    pub cfg: VisionConfig,
    patch_embed: Param,
    blocks: Vec<Block>,
    merger_norm: LayerNorm,
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

impl VisionTower {
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
            .map(|i| {
                let p = |part: &str| format!("visual.blocks.{i}.{part}");
                Ok(Block {
                    norm1: LayerNorm::new(&p("norm1"), src)?,
                    qkv: Dense::new(&p("attn.qkv"), true, src)?,
                    proj: Dense::new(&p("attn.proj"), true, src)?,
                    norm2: LayerNorm::new(&p("norm2"), src)?,
                    fc1: Dense::new(&p("mlp.fc1"), true, src)?,
                    fc2: Dense::new(&p("mlp.fc2"), true, src)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: Param::frozen(conv),
            blocks,
            merger_norm: LayerNorm::new("visual.merger.ln_q", src)?,
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
            let parts = [&b.norm1.0, &b.qkv, &b.proj, &b.norm2.0, &b.fc1, &b.fc2];
            for (part, d) in BLOCK_PARTS.iter().zip(parts) {
                out.extend(d.params(&format!("visual.blocks.{i}.{part}")));
            }
        }
        out.extend(self.merger_params());
        out
    }

    /// The merger's parameters: LLaMA-Factory's multi-modal projector.
    pub fn merger_params(&self) -> Vec<(String, &Param)> {
        let mut out = self.merger_norm.0.params("visual.merger.ln_q");
        out.extend(self.merger_fc1.params("visual.merger.mlp.0"));
        out.extend(self.merger_fc2.params("visual.merger.mlp.2"));
        out
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = vec![(
            "visual.patch_embed.proj.weight".to_string(),
            &mut self.patch_embed,
        )];
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let parts = [
                &mut b.norm1.0,
                &mut b.qkv,
                &mut b.proj,
                &mut b.norm2.0,
                &mut b.fc1,
                &mut b.fc2,
            ];
            for (part, d) in BLOCK_PARTS.iter().zip(parts) {
                out.extend(d.params_mut(&format!("visual.blocks.{i}.{part}")));
            }
        }
        out.extend(self.merger_norm.0.params_mut("visual.merger.ln_q"));
        out.extend(self.merger_fc1.params_mut("visual.merger.mlp.0"));
        out.extend(self.merger_fc2.params_mut("visual.merger.mlp.2"));
        out
    }

    /// Rotary tables `(patches, head_dim)` for the images' grids: each patch's row and column
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
    /// the images' `(t, h, w)` grids → `(patches / merge², out_hidden)`.
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
        let embed = self
            .patch_embed
            .value(weights, dtype)?
            .0
            .to_dtype(dtype)?
            .reshape((c.embed_dim, c.patch_dim()))?;
        let mut x = pixels.to_dtype(dtype)?.matmul(&embed.t()?)?;
        let (cos, sin) = self.rotary_tables(grids, pixels.device())?;
        let scale = (hd as f64).powf(-0.5);
        for b in &self.blocks {
            let h = b.norm1.forward(&x, weights)?;
            let qkv = b.qkv.forward(&h, weights, dtype)?.reshape((n, 3, nh, hd))?;
            let cd = f32_if_half(dtype);
            let f32 =
                |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i, 1)?.squeeze(1)?.to_dtype(cd)?) };
            let (cos, sin) = (cos.to_dtype(cd)?, sin.to_dtype(cd)?);
            let q = rotary(&f32(0)?, &cos, &sin)?.to_dtype(dtype)?;
            let k = rotary(&f32(1)?, &cos, &sin)?.to_dtype(dtype)?;
            let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
            // Full attention within each image.
            let mut outs = Vec::with_capacity(grids.len());
            let mut start = 0;
            for g in grids {
                let len = g.iter().product::<usize>();
                let part = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?)
                };
                let (q, k, v) = (part(&q)?, part(&k)?, part(&v)?);
                let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(cd)?;
                let probs = crate::model::softmax(&scores)?.to_dtype(dtype)?;
                outs.push(probs.matmul(&v)?.transpose(0, 1)?);
                start += len;
            }
            let attn = Tensor::cat(&outs, 0)?.reshape((n, nh * hd))?;
            x = (x + b.proj.forward(&attn, weights, dtype)?)?;
            let h = b.norm2.forward(&x, weights)?;
            let h = b.fc1.forward(&h, weights, dtype)?;
            // QuickGELU: x·σ(1.702·x).
            let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
            x = (x + b.fc2.forward(&h, weights, dtype)?)?;
        }
        let m2 = c.merge_size * c.merge_size;
        let x = self
            .merger_norm
            .forward(&x, weights)?
            .reshape((n / m2, c.embed_dim * m2))?;
        let x = self.merger_fc1.forward(&x, weights, dtype)?.gelu_erf()?;
        self.merger_fc2
            .forward(&x, weights, dtype)
            .map_err(|e| anyhow!("{e}"))
    }
}
