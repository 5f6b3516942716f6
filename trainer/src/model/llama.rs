use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::ModelConfig;
use crate::data::IGNORE_INDEX;

/// A model tensor: frozen (`var` is none) or trainable.
#[derive(Clone)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
}

impl Param {
    pub fn t(&self) -> &Tensor {
        self.var
            .as_ref()
            .map(Var::as_tensor)
            .unwrap_or(&self.tensor)
    }
}

/// `y = W x + scale · B A dropout(x)`, optionally DoRA-rescaled per output row.
#[derive(Clone)]
pub struct LoraLayer {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA magnitude (one per output feature).
    pub magnitude: Option<Var>,
    /// Treat DoRA's weight norm as a constant in backward, as PEFT does (DoRA paper §4.3);
    /// off, gradients are those of the exact function.
    pub detach_norm: bool,
}

/// One example for [`Batch::pad`]: ids, labels and optional positions.
pub type RowRef<'a> = (&'a [u32], &'a [i64], Option<&'a [u32]>);

/// One padded batch, flattened row-major (`B × T`).
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Position of each token (restarting per packed sub-sequence).
    pub positions: Vec<u32>,
    /// Packed sub-sequence of each token (neat packing); tokens attend within their segment only.
    pub segments: Option<Vec<u32>>,
    /// Unpadded length of each row.
    pub lens: Vec<usize>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// Right-pads examples into one batch; positions count from 0 unless given.
    pub fn pad(rows: &[RowRef], pad_id: u32) -> Self {
        let seq = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let mut b = Batch {
            input_ids: Vec::with_capacity(rows.len() * seq),
            labels: Vec::with_capacity(rows.len() * seq),
            positions: Vec::with_capacity(rows.len() * seq),
            segments: None,
            lens: rows.iter().map(|r| r.0.len()).collect(),
            batch: rows.len(),
            seq,
        };
        for (ids, labels, pos) in rows {
            let n = ids.len();
            b.input_ids.extend_from_slice(ids);
            b.input_ids.extend(std::iter::repeat_n(pad_id, seq - n));
            b.labels.extend_from_slice(labels);
            b.labels
                .extend(std::iter::repeat_n(IGNORE_INDEX, seq - labels.len()));
            match pos {
                Some(p) => b.positions.extend_from_slice(p),
                None => b.positions.extend(0..n as u32),
            }
            b.positions.extend(n as u32..seq as u32);
        }
        b
    }

    /// Tokens that carry loss after the causal shift.
    pub fn num_targets(&self) -> usize {
        (0..self.batch)
            .map(|b| {
                (1..self.seq)
                    .filter(|&t| self.labels[b * self.seq + t] != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub params: BTreeMap<String, Param>,
    /// LoRA layers by module name (`model.layers.0.self_attn.q_proj`).
    pub lora: BTreeMap<String, LoraLayer>,
    /// Reference mode: the base weights as loaded, LoRA off (the frozen reference model of
    /// DPO/KTO without a second copy in memory).
    pub reference: std::sync::atomic::AtomicBool,
    /// Gradient checkpointing: training passes keep only each decoder layer's input and
    /// recompute the layer during backward (`gradient_checkpointing: true`).
    pub checkpointing: bool,
    /// Where the recomputed layers leave their trainable tensors' gradients; see
    /// [`Model::backward`].
    grad_sink: crate::ops::GradSink,
    pub dtype: DType,
    pub device: Device,
}

const MASK_VALUE: f64 = -1e9;

/// Softmax over the last dim from differentiable ops; the max is detached, which is exact
/// because softmax does not depend on it.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::ops::fused_for(x) {
        return Ok(crate::ops::rms_norm(x, w, eps)?);
    }
    in_f32(x, |x| {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?)
    })?
    .broadcast_mul(w)
    .map_err(Into::into)
}

/// f32 for bf16/f16, else `d` itself: where a half-precision model keeps what must not lose
/// precision (trained tensors and their updates, norms, attention probabilities, the loss).
fn f32_if_half(d: DType) -> DType {
    match d {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// `f(x)` computed in f32 when `x` is bf16/f16, as Hugging Face does for norms and attention
/// probabilities: their sums lose too much in an 8- or 11-bit mantissa.
fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    Ok(f(&x.to_dtype(f32_if_half(x.dtype()))?)?.to_dtype(x.dtype())?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

impl Model {
    /// Loads a Hugging Face model folder with every weight frozen.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let weights = super::weights::load_weights(dir, dtype, device)?;
        Self::from_weights(cfg, weights, dtype, device)
    }

    pub fn from_weights(
        cfg: ModelConfig,
        weights: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut params = BTreeMap::new();
        for (name, tensor) in weights {
            params.insert(name, Param { tensor, var: None });
        }
        let model = Self {
            cfg,
            params,
            lora: BTreeMap::new(),
            reference: std::sync::atomic::AtomicBool::new(false),
            checkpointing: false,
            grad_sink: Default::default(),
            dtype,
            device: device.clone(),
        };
        for name in model.expected_params() {
            if !model.params.contains_key(&name) {
                bail!("weights are incomplete: tensor `{name}` is missing");
            }
        }
        Ok(model)
    }

    /// The names of every weight the architecture reads.
    pub fn expected_params(&self) -> Vec<String> {
        let c = &self.cfg;
        let mut names = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".to_string(),
        ];
        if !c.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for m in self.linear_modules() {
                names.push(format!("{p}.{m}.weight"));
            }
            if c.qkv_bias {
                for m in ["q_proj", "k_proj", "v_proj"] {
                    names.push(format!("{p}.self_attn.{m}.bias"));
                }
            }
            if c.o_bias {
                names.push(format!("{p}.self_attn.o_proj.bias"));
            }
            names.push(format!("{p}.input_layernorm.weight"));
            names.push(format!("{p}.post_attention_layernorm.weight"));
            if c.qk_norm {
                names.push(format!("{p}.self_attn.q_norm.weight"));
                names.push(format!("{p}.self_attn.k_norm.weight"));
            }
        }
        names
    }

    /// Linear modules inside a decoder layer, relative to the layer.
    pub fn linear_modules(&self) -> [&'static str; 7] {
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    }

    fn in_reference(&self) -> bool {
        self.reference.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The weight to compute with and whether it trains (never in reference mode). A trained
    /// weight of a half-precision model is kept in f32 (see [`Model::trainable_dtype`]) and
    /// enters the computation cast, so the cast's backward hands the f32 master its gradient.
    fn weight(&self, p: &Param) -> Result<(Tensor, bool)> {
        Ok(match &p.var {
            Some(v) if !self.in_reference() => (v.as_tensor().to_dtype(self.dtype)?, true),
            _ => (p.tensor.clone(), false),
        })
    }

    /// The dtype trainable tensors are kept in: f32 when the model computes in bf16/f16
    /// (updates of 1e-4 relative vanish in bf16's 8-bit mantissa), else the model's own.
    /// Log-probabilities and losses use it too.
    pub fn trainable_dtype(&self) -> DType {
        f32_if_half(self.dtype)
    }

    pub fn param(&self, name: &str) -> Result<Tensor> {
        let p = self
            .params
            .get(name)
            .ok_or_else(|| anyhow!("missing weight `{name}`"))?;
        Ok(self.weight(p)?.0)
    }

    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let name = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let p = self
            .params
            .get(name)
            .ok_or_else(|| anyhow!("missing weight `{name}`"))?;
        Ok(match self.weight(p)? {
            (w, true) => h.matmul(&w.t()?)?,
            (w, false) => crate::ops::frozen_linear(h, &w)?,
        })
    }

    /// `x (N, in) → (N, out)` through a linear module and its LoRA layer, if any.
    pub fn linear(&self, module: &str, x: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let p = self
            .params
            .get(&format!("{module}.weight"))
            .ok_or_else(|| anyhow!("missing weight `{module}.weight`"))?;
        let (w, trainable) = self.weight(p)?;
        let mut y = if trainable {
            x.matmul(&w.t()?)?
        } else {
            crate::ops::frozen_linear(x, &w)?
        };
        if let Some(lora) = self.lora.get(module).filter(|_| !self.in_reference()) {
            let xd = match rng {
                Some(rng) if lora.dropout > 0.0 => dropout(x, lora.dropout, rng)?,
                _ => x.clone(),
            };
            // The scale goes on B (out × r), not on the (tokens × out) product: one pass fewer.
            let (a, b) = (
                lora.a.as_tensor().to_dtype(self.dtype)?,
                lora.b.as_tensor().to_dtype(self.dtype)?,
            );
            let delta = xd.matmul(&a.t()?)?.matmul(&(&b * lora.scale)?.t()?)?;
            y = match &lora.magnitude {
                None => (y + delta)?,
                Some(m) => {
                    // DoRA: (W + sBA) rescaled row-wise to the learned magnitude; the norm is
                    // detached as in PEFT.
                    let merged = (&w + (b.matmul(&a)? * lora.scale)?)?;
                    let mut norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?.squeeze(1)?;
                    if lora.detach_norm {
                        norm = norm.detach();
                    }
                    let factor = m.as_tensor().to_dtype(self.dtype)?.broadcast_div(&norm)?;
                    (y + delta)?.broadcast_mul(&factor)?
                }
            };
        }
        if let Some(b) = self.params.get(&format!("{module}.bias")) {
            y = y.broadcast_add(&self.weight(b)?.0)?;
        }
        Ok(y)
    }

    fn rope_tables(&self, positions: &[u32], batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let inv = self.cfg.inv_freq();
        let half = inv.len();
        let d = half * 2;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            for _ in 0..2 {
                for f in &inv {
                    let a = p as f64 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape = (batch, 1, seq, d);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    fn attention_mask(&self, b: &Batch) -> Result<Tensor> {
        let (bs, t) = (b.batch, b.seq);
        let mut m = vec![0f64; bs * t * t];
        for r in 0..bs {
            for i in 0..t {
                for j in 0..t {
                    let mut blocked = j > i;
                    if let Some(seg) = &b.segments {
                        blocked |= seg[r * t + i] != seg[r * t + j];
                    }
                    if blocked {
                        m[(r * t + i) * t + j] = MASK_VALUE;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (bs, 1, t, t), &self.device)?.to_dtype(self.dtype)?)
    }

    /// One decoder layer over `x (B·n, hidden)`. With a cache, keys and values are appended to
    /// those of earlier tokens (decoding); without, the pass is self-contained (training).
    fn layer(
        &self,
        l: usize,
        x: Tensor,
        pass: &mut Pass,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (bs, n) = (pass.batch, pass.n);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let p = format!("model.layers.{l}");
        let h = rms_norm(
            &x,
            &self.param(&format!("{p}.input_layernorm.weight"))?,
            c.rms_norm_eps,
        )?;
        let heads = |name: &str, count: usize, rng: Option<&mut ChaCha8Rng>| -> Result<Tensor> {
            let y = self
                .linear(&format!("{p}.self_attn.{name}_proj"), &h, rng)?
                .reshape((bs, n, count, hd))?;
            let y = if c.qk_norm && name != "v" {
                rms_norm(
                    &y,
                    &self.param(&format!("{p}.self_attn.{name}_norm.weight"))?,
                    c.rms_norm_eps,
                )?
            } else {
                y
            };
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let q = heads("q", nh, rng.as_deref_mut())?;
        let k = heads("k", nkv, rng.as_deref_mut())?;
        let v = heads("v", nkv, rng.as_deref_mut())?;
        let rope = |x: &Tensor| -> Result<Tensor> {
            if crate::ops::fused_for(x) {
                return Ok(crate::ops::rope(x, &pass.cos, &pass.sin)?);
            }
            Ok((x.broadcast_mul(&pass.cos)? + rotate_half(x)?.broadcast_mul(&pass.sin)?)?)
        };
        let q = rope(&q)?;
        let mut k = rope(&k)?;
        let mut v = v;
        if let Some(cache) = pass.cache.as_deref_mut() {
            if let Some(Some((pk, pv))) = cache.layers.get(l) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            if cache.layers.len() <= l {
                cache.layers.resize(l + 1, None);
            }
            cache.layers[l] = Some((k.clone(), v.clone()));
        }
        let total = k.dim(2)?;
        // GQA without copying K and V per query head: the `rep` query heads of a kv head are
        // stacked along the sequence axis, `(B, nkv, rep·n, hd)`, so one product per kv head
        // serves them all (and the backward needs no sum over copies).
        let rep = nh / nkv;
        let q = q.reshape((bs, nkv, rep * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?)?.reshape((bs, nh, n, total))?;
        let probs = if crate::ops::fused_for(&scores) {
            crate::ops::masked_softmax(&scores, &pass.mask, scale)?
        } else {
            in_f32(&(scores * scale)?.broadcast_add(&pass.mask)?, softmax)?
        };
        let attn = probs
            .reshape((bs, nkv, rep * n, total))?
            .matmul(&v)?
            .reshape((bs, nh, n, hd))?
            .transpose(1, 2)?
            .reshape((bs * n, nh * hd))?;
        let x = (x + self.linear(&format!("{p}.self_attn.o_proj"), &attn, rng.as_deref_mut())?)?;
        let h = rms_norm(
            &x,
            &self.param(&format!("{p}.post_attention_layernorm.weight"))?,
            c.rms_norm_eps,
        )?;
        let gate = self.linear(&format!("{p}.mlp.gate_proj"), &h, rng.as_deref_mut())?;
        let up = self.linear(&format!("{p}.mlp.up_proj"), &h, rng.as_deref_mut())?;
        let act = if crate::ops::fused_for(&gate) {
            crate::ops::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        let down = self.linear(&format!("{p}.mlp.down_proj"), &act, rng)?;
        Ok((x + down)?)
    }

    /// Final hidden states, `(B·T, hidden)`. `rng` turns on dropout (training).
    pub fn hidden(&self, b: &Batch, mut rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let ids = Tensor::from_slice(&b.input_ids, b.batch * b.seq, &self.device)?;
        let mut x = self
            .param("model.embed_tokens.weight")?
            .index_select(&ids, 0)?;
        let (cos, sin) = self.rope_tables(&b.positions, b.batch, b.seq)?;
        let mut pass = Pass {
            batch: b.batch,
            n: b.seq,
            cos,
            sin,
            mask: self.attention_mask(b)?,
            cache: None,
        };
        for l in 0..self.cfg.num_hidden_layers {
            x = if self.checkpointing && !self.in_reference() {
                self.checkpointed_layer(l, x, &pass, rng.as_deref_mut())?
            } else {
                self.layer(l, x, &mut pass, rng.as_deref_mut())?
            };
        }
        rms_norm(&x, &self.param("model.norm.weight")?, self.cfg.rms_norm_eps)
    }

    /// [`Model::layer`] without keeping its activations: the output joins the graph through a
    /// checkpoint node whose backward runs the layer again from its saved input (with the same
    /// dropout draws) and hands the layer's trainable gradients to the sink.
    fn checkpointed_layer(
        &self,
        l: usize,
        x: Tensor,
        pass: &Pass,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let view = std::sync::Arc::new(self.layer_view(l));
        let trainable: Vec<Tensor> = view
            .trainable()
            .into_iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let mut fresh = pass.fresh();
        let Some(anchor) = trainable.first().cloned() else {
            // Nothing in this layer trains: its graph only carries `x`'s gradient through.
            return view.layer(l, x, &mut fresh, rng);
        };
        let replay = rng.as_deref().cloned();
        let y0 = view.layer(l, x.detach(), &mut fresh, rng)?.detach();
        let sink = self.grad_sink.clone();
        let recompute = move |x: &Tensor, g: &Tensor| -> candle_core::Result<Tensor> {
            let run = || -> Result<Tensor> {
                let input = Var::from_tensor(&x.detach())?;
                let mut rng = replay.clone();
                let y = view.layer(
                    l,
                    input.as_tensor().clone(),
                    &mut fresh.fresh(),
                    rng.as_mut(),
                )?;
                let store = (y * g)?.sum_all()?.backward()?;
                for t in &trainable {
                    if let Some(gt) = store.get(t) {
                        sink.push(t.clone(), gt.clone());
                    }
                }
                Ok(match store.get(input.as_tensor()) {
                    Some(dx) => dx.clone(),
                    None => input.as_tensor().zeros_like()?,
                })
            };
            run().map_err(|e| candle_core::Error::Msg(format!("checkpointed layer {l}: {e}")))
        };
        Ok(crate::ops::checkpoint(
            &x,
            y0,
            &anchor,
            Box::new(recompute),
        )?)
    }

    /// A model holding only decoder layer `l`'s tensors (shared, not copied).
    fn layer_view(&self, l: usize) -> Model {
        let prefix = format!("model.layers.{l}.");
        Model {
            cfg: self.cfg.clone(),
            params: self
                .params
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            lora: self
                .lora
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            reference: std::sync::atomic::AtomicBool::new(self.in_reference()),
            checkpointing: false,
            grad_sink: Default::default(),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// This model on `device`, computing in `dtype`; what trains keeps training (in
    /// [`Model::trainable_dtype`]). Used to compare devices on the same weights.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Model> {
        let mut weights = std::collections::HashMap::new();
        for (name, p) in &self.params {
            weights.insert(name.clone(), p.t().to_device(device)?.to_dtype(dtype)?);
        }
        let mut m = Model::from_weights(self.cfg.clone(), weights, dtype, device)?;
        let master = m.trainable_dtype();
        let moved = |v: &Var| -> Result<Var> {
            Ok(Var::from_tensor(
                &v.as_tensor().to_device(device)?.to_dtype(master)?,
            )?)
        };
        for (name, p) in &self.params {
            if let Some(v) = &p.var {
                m.params.get_mut(name).expect("same names").var = Some(moved(v)?);
            }
        }
        for (name, l) in &self.lora {
            let layer = LoraLayer {
                a: moved(&l.a)?,
                b: moved(&l.b)?,
                magnitude: l.magnitude.as_ref().map(moved).transpose()?,
                ..l.clone()
            };
            m.lora.insert(name.clone(), layer);
        }
        m.checkpointing = self.checkpointing;
        Ok(m)
    }

    /// `loss.backward()`, with the gradients of checkpointed layers merged in. Training code
    /// calls this rather than `backward()` itself.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.grad_sink.clear();
        let mut store = loss.backward()?;
        self.grad_sink.drain_into(&mut store)?;
        Ok(store)
    }

    /// Next-token logits `(vocab,)` for `new` tokens appended to the sequence in `cache`
    /// (batch 1). Weights should be merged and frozen: nothing here is differentiated.
    pub fn forward_cached(&self, new: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.forward_cached_batch(new, 1, &[0], cache)?.squeeze(0)?)
    }

    /// Batched decoding step: `new` holds `batch` rows of equal length (row-major); row `r`
    /// starts with `pad_left[r]` padding positions that no token attends to, and its positions
    /// count from its first real token. Returns next-token logits `(batch, vocab)`.
    pub fn forward_cached_batch(
        &self,
        new: &[u32],
        batch: usize,
        pad_left: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let n = new.len() / batch;
        let start = cache.len;
        let total = start + n;
        let ids = Tensor::from_slice(new, batch * n, &self.device)?;
        let mut x = self
            .param("model.embed_tokens.weight")?
            .index_select(&ids, 0)?;
        let mut positions = Vec::with_capacity(batch * n);
        let mut m = vec![0f64; batch * n * total];
        for (r, &pad) in pad_left.iter().enumerate().take(batch) {
            for i in 0..n {
                let q = start + i;
                positions.push(q.saturating_sub(pad) as u32);
                for j in 0..total {
                    if j > q || j < pad {
                        m[(r * n + i) * total + j] = MASK_VALUE;
                    }
                }
            }
        }
        let (cos, sin) = self.rope_tables(&positions, batch, n)?;
        let mask = Tensor::from_vec(m, (batch, 1, n, total), &self.device)?.to_dtype(self.dtype)?;
        let mut pass = Pass {
            batch,
            n,
            cos,
            sin,
            mask,
            cache: Some(cache),
        };
        for l in 0..self.cfg.num_hidden_layers {
            x = self.layer(l, x, &mut pass, None)?;
        }
        if let Some(cache) = pass.cache {
            cache.len = total;
        }
        let last = x.reshape((batch, n, ()))?.narrow(1, n - 1, 1)?.squeeze(1)?;
        let h = rms_norm(
            &last,
            &self.param("model.norm.weight")?,
            self.cfg.rms_norm_eps,
        )?;
        self.lm_head(&h)
    }

    /// Logits for every position, `(B, T, vocab)`.
    pub fn logits(&self, b: &Batch) -> Result<Tensor> {
        let h = self.hidden(b, None)?;
        let logits = self.lm_head(&h)?;
        Ok(logits.reshape((b.batch, b.seq, ()))?)
    }

    /// LM-head logits of every position whose next label is trained. Only these rows reach the
    /// LM head: prompt rows cost nothing there.
    pub fn target_logits(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Option<TargetLogits>> {
        Ok(self.target_states(b, rng)?.map(|(_, t)| t))
    }

    /// [`Model::target_logits`] with the final hidden states of those positions `(n, hidden)`
    /// (what a value head reads).
    pub fn target_states(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Option<(Tensor, TargetLogits)>> {
        let h = self.hidden(b, rng)?;
        let (rows, targets) = shifted_targets(b);
        if rows.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let h = h.index_select(&idx, 0)?;
        let logits = self.lm_head(&h)?;
        Ok(Some((
            h,
            TargetLogits {
                logits,
                rows,
                targets,
            },
        )))
    }

    /// Per-sequence sums of the log-probabilities of the labelled tokens `(B,)`, and how many
    /// labelled tokens each sequence has (for length-averaged losses).
    pub fn sequence_logps(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Vec<usize>)> {
        let Some(t) = self.target_logits(b, rng)? else {
            return Ok((
                Tensor::zeros(b.batch, self.trainable_dtype(), &self.device)?,
                vec![0; b.batch],
            ));
        };
        let n = t.targets.len();
        let mut counts = vec![0usize; b.batch];
        let mut member = vec![0f64; b.batch * n];
        for (k, r) in t.rows.iter().enumerate() {
            let seq = *r as usize / b.seq;
            counts[seq] += 1;
            member[seq * n + k] = 1.0;
        }
        let logps = t.token_logps()?;
        let member =
            Tensor::from_vec(member, (b.batch, n), &self.device)?.to_dtype(logps.dtype())?;
        Ok((member.matmul(&logps)?.squeeze(1)?, counts))
    }

    /// Runs `f` on the reference model: the base weights as loaded, LoRA off.
    pub fn with_reference<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        use std::sync::atomic::Ordering;
        self.reference.store(true, Ordering::Relaxed);
        let out = f(self);
        self.reference.store(false, Ordering::Relaxed);
        out
    }

    /// [`Model::sequence_logps`] of the reference model, detached.
    pub fn reference_logps(&self, b: &Batch) -> Result<Tensor> {
        Ok(self
            .with_reference(|m| m.sequence_logps(b, None))?
            .0
            .detach())
    }

    /// Summed token cross-entropy over labels != -100, shifted like Hugging Face (position t
    /// predicts label t+1), and the number of such tokens.
    pub fn loss_sum(&self, b: &Batch, rng: Option<&mut ChaCha8Rng>) -> Result<(Tensor, usize)> {
        let Some(t) = self.target_logits(b, rng)? else {
            return Ok((Tensor::zeros((), self.trainable_dtype(), &self.device)?, 0));
        };
        Ok((t.token_logps()?.sum_all()?.neg()?, t.targets.len()))
    }
}

/// Logits of the labelled positions of a batch: their rows in `B·T` and their target ids.
pub struct TargetLogits {
    /// `(n, vocab)`.
    pub logits: Tensor,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl TargetLogits {
    /// Log-probability of each target token, `(n, 1)`.
    pub fn token_logps(&self) -> Result<Tensor> {
        let n = self.targets.len();
        if crate::ops::fused_for(&self.logits) {
            return Ok(crate::ops::log_softmax_gather(
                &self.logits,
                self.targets.clone(),
            )?);
        }
        let tgt = Tensor::from_slice(&self.targets, (n, 1), self.logits.device())?;
        // Half-precision models get f32 log-probabilities (and so an f32 loss).
        let logits = self.logits.to_dtype(f32_if_half(self.logits.dtype()))?;
        Ok(log_softmax(&logits)?.gather(&tgt, 1)?)
    }
}

/// What one forward pass shares across its layers.
struct Pass<'a> {
    batch: usize,
    /// New tokens per row in this pass.
    n: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    cache: Option<&'a mut KvCache>,
}

impl Pass<'_> {
    /// The same tables without the KV cache (a training pass never has one).
    fn fresh(&self) -> Pass<'static> {
        Pass {
            batch: self.batch,
            n: self.n,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            mask: self.mask.clone(),
            cache: None,
        }
    }
}

/// Keys and values of the tokens seen so far, per layer (after RoPE), for decoding.
#[derive(Default, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}

/// Row index (into `B·T`) and target id of every position whose next label is trained.
pub fn shifted_targets(b: &Batch) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b.batch {
        for t in 0..b.seq.saturating_sub(1) {
            let label = b.labels[r * b.seq + t + 1];
            if label != IGNORE_INDEX {
                rows.push((r * b.seq + t) as u32);
                targets.push(label as u32);
            }
        }
    }
    (rows, targets)
}

fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f64> = (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}
