//! LLaVA-1.5's vision side: a CLIP vision transformer (`vision_tower.*`: patches embedded by one
//! linear map — the checkpoint's Conv2d, whose kernel equals its stride — a class token,
//! learned positions, a LayerNorm before the encoder, pre-norm blocks with QuickGELU MLPs) read
//! at `vision_feature_layer` (the second-to-last layer's output for LLaVA-1.5), the class token
//! dropped (`default` strategy), and the two-layer GELU projector (`multi_modal_projector.*`)
//! into the language model's width.
//!
//! Only the layers up to the feature layer are built; the later ones and `post_layernorm`,
//! which LLaVA never reads, stay with the model's other tensors and are saved again as they were.
//! Composed from differentiable candle ops, so the projector (and the tower) can train.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::qwen2_vl::{norm, Dense};
use super::{ClipConfig, VisionConfig};
use crate::model::layers::{Param, Weights};
use crate::model::weights::WeightSource;

#[derive(Clone)]
struct Layer {
    ln1: Dense,
    q: Dense,
    k: Dense,
    v: Dense,
    out: Dense,
    ln2: Dense,
    fc1: Dense,
    fc2: Dense,
}

impl Layer {
    const PARTS: [&'static str; 8] = [
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    ];

    fn new(i: usize, src: &mut dyn WeightSource) -> Result<Self> {
        let mut d = Self::PARTS
            .iter()
            .map(|p| Dense::new(&format!("vision_tower.encoder.layers.{i}.{p}"), true, src))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let mut next = || d.next().expect("eight parts");
        Ok(Self {
            ln1: next(),
            q: next(),
            k: next(),
            v: next(),
            out: next(),
            ln2: next(),
            fc1: next(),
            fc2: next(),
        })
    }

    fn parts(&self) -> [&Dense; 8] {
        [
            &self.ln1, &self.q, &self.k, &self.v, &self.out, &self.ln2, &self.fc1, &self.fc2,
        ]
    }

    fn parts_mut(&mut self) -> [&mut Dense; 8] {
        [
            &mut self.ln1,
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.out,
            &mut self.ln2,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }
}

/// LLaVA's CLIP tower (up to the feature layer) and projector.
#[derive(Clone)]
pub struct ClipTower {
    pub cfg: VisionConfig,
    clip: ClipConfig,
    class_embedding: Param,
    patch_embedding: Param,
    position_embedding: Param,
    pre_norm: Dense,
    layers: Vec<Layer>,
    projector: [Dense; 2],
}

const PROJECTOR: [&str; 2] = [
    "multi_modal_projector.linear_1",
    "multi_modal_projector.linear_2",
];

impl ClipTower {
    pub(crate) fn new(cfg: &VisionConfig, src: &mut dyn WeightSource) -> Result<Self> {
        let Some(clip) = cfg.clip.clone() else {
            bail!("a LLaVA vision config without its CLIP settings");
        };
        let patch = src.take("vision_tower.embeddings.patch_embedding.weight")?;
        if patch.elem_count() != cfg.embed_dim * cfg.patch_dim() {
            bail!(
                "vision_tower.embeddings.patch_embedding.weight has shape {:?}; {} × {} expected",
                patch.dims(),
                cfg.embed_dim,
                cfg.patch_dim()
            );
        }
        let g = clip.grid(cfg.patch_size);
        let position = src.take("vision_tower.embeddings.position_embedding.weight")?;
        if position.dims() != [g * g + 1, cfg.embed_dim] {
            bail!(
                "vision_tower.embeddings.position_embedding.weight has shape {:?}; ({}, {}) expected for {}-pixel images",
                position.dims(),
                g * g + 1,
                cfg.embed_dim,
                clip.image_size
            );
        }
        let run = clip.layers_to_run(cfg.depth)?;
        Ok(Self {
            class_embedding: Param::frozen(src.take("vision_tower.embeddings.class_embedding")?),
            patch_embedding: Param::frozen(patch),
            position_embedding: Param::frozen(position),
            pre_norm: Dense::new("vision_tower.pre_layrnorm", true, src)?,
            layers: (0..run)
                .map(|i| Layer::new(i, src))
                .collect::<Result<_>>()?,
            projector: [
                Dense::new(PROJECTOR[0], clip.projector_bias, src)?,
                Dense::new(PROJECTOR[1], clip.projector_bias, src)?,
            ],
            cfg: cfg.clone(),
            clip,
        })
    }

    fn embedding_names() -> [&'static str; 3] {
        [
            "vision_tower.embeddings.class_embedding",
            "vision_tower.embeddings.patch_embedding.weight",
            "vision_tower.embeddings.position_embedding.weight",
        ]
    }

    pub fn params(&self) -> Vec<(String, &Param)> {
        let [c, p, pos] = Self::embedding_names();
        let mut out = vec![
            (c.to_string(), &self.class_embedding),
            (p.to_string(), &self.patch_embedding),
            (pos.to_string(), &self.position_embedding),
        ];
        self.pre_norm.params("vision_tower.pre_layrnorm", &mut out);
        for (i, l) in self.layers.iter().enumerate() {
            for (part, d) in Layer::PARTS.iter().zip(l.parts()) {
                d.params(&format!("vision_tower.encoder.layers.{i}.{part}"), &mut out);
            }
        }
        for (name, d) in PROJECTOR.iter().zip(&self.projector) {
            d.params(name, &mut out);
        }
        out
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let [c, p, pos] = Self::embedding_names();
        let mut out = vec![
            (c.to_string(), &mut self.class_embedding),
            (p.to_string(), &mut self.patch_embedding),
            (pos.to_string(), &mut self.position_embedding),
        ];
        self.pre_norm
            .params_mut("vision_tower.pre_layrnorm", &mut out);
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (part, d) in Layer::PARTS.iter().zip(l.parts_mut()) {
                d.params_mut(&format!("vision_tower.encoder.layers.{i}.{part}"), &mut out);
            }
        }
        for (name, d) in PROJECTOR.iter().zip(&mut self.projector) {
            d.params_mut(name, &mut out);
        }
        out
    }

    /// The images' embeddings for the language model: `pixels (images·patches, patch_dim)` →
    /// `(images·tokens, language-model hidden)`, each image's tokens in order.
    pub fn forward(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        weights: Weights,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let g = self.clip.grid(c.patch_size);
        if let Some(bad) = grids.iter().find(|gr| **gr != [1, g, g]) {
            bail!(
                "an image of {:?} patches; LLaVA's tower reads {g}×{g} ({} pixels a side)",
                bad,
                self.clip.image_size
            );
        }
        let (images, patches, d) = (grids.len(), g * g, c.embed_dim);
        if pixels.dims() != [images * patches, c.patch_dim()] {
            bail!(
                "pixel values have shape {:?}; {images} images need ({}, {})",
                pixels.dims(),
                images * patches,
                c.patch_dim()
            );
        }
        let dtype = self.patch_embedding.tensor.dtype();
        let value =
            |p: &Param| -> Result<Tensor> { Ok(p.value(weights, dtype)?.0.to_dtype(dtype)?) };
        let embed = value(&self.patch_embedding)?.reshape((d, c.patch_dim()))?;
        let x = pixels
            .to_dtype(dtype)?
            .matmul(&embed.t()?)?
            .reshape((images, patches, d))?;
        let cls = value(&self.class_embedding)?
            .reshape((1, 1, d))?
            .broadcast_as((images, 1, d))?;
        let t = patches + 1;
        let x = Tensor::cat(&[&cls, &x], 1)?
            .broadcast_add(&value(&self.position_embedding)?)?
            .reshape((images * t, d))?;
        let eps = self.clip.layer_norm_eps;
        let mut x = norm(&self.pre_norm, &x, weights, eps)?;
        let (nh, hd) = (c.num_heads, c.head_dim());
        let scale = (hd as f64).powf(-0.5);
        let cd = crate::model::layers::f32_if_half(dtype);
        for l in &self.layers {
            let h = norm(&l.ln1, &x, weights, eps)?;
            let heads = |y: Tensor| -> Result<Tensor> {
                Ok(y.reshape((images, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = heads((l.q.forward(&h, weights, dtype)? * scale)?)?;
            let k = heads(l.k.forward(&h, weights, dtype)?)?;
            let v = heads(l.v.forward(&h, weights, dtype)?)?;
            let scores = q.matmul(&k.t()?)?.to_dtype(cd)?;
            let probs = crate::model::softmax(&scores)?.to_dtype(dtype)?;
            let attn = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((images * t, nh * hd))?;
            x = (x + l.out.forward(&attn, weights, dtype)?)?;
            let h = norm(&l.ln2, &x, weights, eps)?;
            let h = l.fc1.forward(&h, weights, dtype)?;
            // QuickGELU: x·σ(1.702·x).
            let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
            x = (x + l.fc2.forward(&h, weights, dtype)?)?;
        }
        let x = x.reshape((images, t, d))?;
        let x = if self.clip.keep_cls {
            x
        } else {
            x.narrow(1, 1, patches)?
        };
        let tokens = x.dim(1)?;
        let x = x.reshape((images * tokens, d))?;
        let x = self.projector[0].forward(&x, weights, dtype)?.gelu_erf()?;
        self.projector[1].forward(&x, weights, dtype)
    }
}
