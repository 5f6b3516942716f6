//! The parts of the decoder, each holding the weights it computes with, found once when the
//! model is built: [`Linear`] (weight, bias, LoRA / DoRA layer) and [`DecoderLayer`] (norms in
//! each family's layout, separate or fused q/k/v projections, attention with (partial,
//! interleaved) RoPE, grouped KV heads, sliding windows and soft-capping, then the MLP of
//! [`super::mlp`]). Only differentiable ops or our CustomOps with a backward are used. Which
//! weights a pass uses — the trained ones with adapters, or the reference as loaded — is the
//! explicit [`Weights`] argument.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::config::{Activation, ModelConfig};
use super::mlp::{Mlp, Routing};
use super::quant::{quant_linear, QuantWeight};
use super::weights::WeightSource;

pub(crate) const MASK_VALUE: f64 = -1e9;

/// A model tensor: frozen (`var` is none) or trainable. `tensor` always holds the weight as
/// loaded, which is what the reference model computes with.
#[derive(Clone)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
}

impl Param {
    pub fn frozen(tensor: Tensor) -> Self {
        Self { tensor, var: None }
    }

    /// The current value: the trained copy when there is one.
    pub fn t(&self) -> &Tensor {
        self.var
            .as_ref()
            .map(Var::as_tensor)
            .unwrap_or(&self.tensor)
    }

    /// The tensor to compute with in `dtype`, and whether it trains. A trained weight of a
    /// half-precision model is kept in f32 and enters the computation cast, so the cast's
    /// backward hands the f32 master its gradient.
    pub(crate) fn value(&self, weights: Weights, dtype: DType) -> Result<(Tensor, bool)> {
        Ok(match (&self.var, weights) {
            (Some(v), Weights::Policy) => (v.as_tensor().to_dtype(dtype)?, true),
            _ => (self.tensor.clone(), false),
        })
    }
}

/// Which weights a forward pass computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The trained weights and adapters.
    Policy,
    /// The base weights as loaded, adapters off: the frozen reference model of DPO, KTO and
    /// PPO without a second copy in memory.
    Reference,
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

/// A linear module's weight: a tensor (frozen or trained), or a frozen quantized one (QLoRA).
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Param),
    Quantized(Arc<QuantWeight>),
    /// A frozen weight kept only as its bf16 packings for AMX tiles (the CPU's `bf16` in a LoRA
    /// run: [`crate::model::Model::keep_frozen_in_bf16`]); its value is the weight rounded to
    /// bf16.
    Bf16(Arc<crate::ops::Bf16Weight>),
}

impl LinearWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            LinearWeight::Dense(p) => p.tensor.dims2()?,
            LinearWeight::Quantized(q) => (q.rows, q.cols),
            LinearWeight::Bf16(w) => w.dims(),
        })
    }

    /// The weight as a tensor in `dtype` (dequantized when quantized): merging, DoRA's norm.
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(p) => Ok(p.t().detach().to_dtype(dtype)?),
            LinearWeight::Quantized(q) => q.dequantize(dtype),
            LinearWeight::Bf16(w) => Ok(w.to_dense(dtype)?),
        }
    }

    pub fn dense(&self) -> Option<&Param> {
        match self {
            LinearWeight::Dense(p) => Some(p),
            LinearWeight::Quantized(_) | LinearWeight::Bf16(_) => None,
        }
    }

    pub fn dense_mut(&mut self) -> Option<&mut Param> {
        match self {
            LinearWeight::Dense(p) => Some(p),
            LinearWeight::Quantized(_) | LinearWeight::Bf16(_) => None,
        }
    }
}

/// A linear module by its Hugging Face name (`model.layers.0.self_attn.q_proj`).
#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub weight: LinearWeight,
    pub bias: Option<Param>,
    pub lora: Option<LoraLayer>,
    /// Sees every input of this module while set (GPTQ's calibration).
    pub observer: Option<Arc<InputSums>>,
    /// The frozen dense weight packed in bf16, made on first use while the CPU's bf16 products
    /// are on (`ops::use_bf16_products`).
    pub bf16: std::sync::OnceLock<Arc<crate::ops::Bf16Weight>>,
}

/// `Σ x xᵀ` over the rows of every input a linear module sees: GPTQ's Hessian.
#[derive(Default)]
pub struct InputSums {
    sum: std::sync::Mutex<Option<Tensor>>,
}

impl InputSums {
    fn add(&self, x: &Tensor) -> Result<()> {
        let x = x.detach().to_dtype(DType::F32)?;
        let xtx = x.t()?.matmul(&x)?;
        let mut g = self.sum.lock().expect("input sums");
        *g = Some(match g.take() {
            Some(s) => (s + xtx)?,
            None => xtx,
        });
        Ok(())
    }

    /// The sum; `None` when no input came.
    pub fn take(&self) -> Option<Tensor> {
        self.sum.lock().expect("input sums").take()
    }
}

impl Linear {
    pub(crate) fn new(name: String, bias: bool, src: &mut dyn WeightSource) -> Result<Self> {
        Ok(Self {
            weight: src.take_linear(&format!("{name}.weight"))?,
            bias: if bias {
                Some(Param::frozen(src.take(&format!("{name}.bias"))?))
            } else {
                None
            },
            lora: None,
            observer: None,
            bf16: std::sync::OnceLock::new(),
            name,
        })
    }

    /// The frozen weight `w` packed in bf16 when the CPU's bf16 products are on and `x` is an
    /// f32 CPU tensor (packed on first use, then kept).
    fn bf16_weight(&self, w: &Tensor, x: &Tensor) -> Result<Option<Arc<crate::ops::Bf16Weight>>> {
        if !crate::ops::bf16_products() || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        if let Some(p) = self.bf16.get() {
            return Ok(Some(p.clone()));
        }
        let packed = Arc::new(crate::ops::Bf16Weight::new(w)?);
        Ok(Some(self.bf16.get_or_init(|| packed).clone()))
    }

    /// `x (N, in) → (N, out)` through the weight and, with the policy's weights, the LoRA layer.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        dtype: DType,
    ) -> Result<Tensor> {
        if let Some(o) = &self.observer {
            o.add(x)?;
        }
        // Plain LoRA on a frozen dense weight: one graph node (see `ops::lora_linear`).
        if let Some(lora) = self
            .lora
            .as_ref()
            .filter(|l| weights == Weights::Policy && l.magnitude.is_none() && x.rank() == 2)
        {
            let frozen = match &self.weight {
                LinearWeight::Dense(p) => match p.value(weights, dtype)? {
                    (_, true) => None,
                    (w, false) => Some(match self.bf16_weight(&w, x)? {
                        Some(packed) => crate::ops::Frozen::Bf16(packed),
                        None => crate::ops::Frozen::Dense(w),
                    }),
                },
                LinearWeight::Bf16(packed) => Some(crate::ops::Frozen::Bf16(packed.clone())),
                LinearWeight::Quantized(_) => None,
            };
            if let Some(frozen) = frozen {
                let mask = match rng {
                    Some(rng) if lora.dropout > 0.0 => Some(dropout_mask(x, lora.dropout, rng)?),
                    _ => None,
                };
                let (a, b) = (
                    lora.a.as_tensor().to_dtype(dtype)?,
                    lora.b.as_tensor().to_dtype(dtype)?,
                );
                let mut y = crate::ops::lora_linear(x, frozen, &a, &b, lora.scale, mask)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(&b.value(weights, dtype)?.0)?;
                }
                return Ok(y);
            }
        }
        let (mut y, w) = match &self.weight {
            LinearWeight::Dense(p) => {
                let (w, trainable) = p.value(weights, dtype)?;
                let y = if trainable {
                    x.matmul(&w.t()?)?
                } else if let Some(packed) = self.bf16_weight(&w, x)? {
                    crate::ops::bf16_linear(x, &packed)?
                } else {
                    crate::ops::frozen_linear(x, &w)?
                };
                (y, Some(w))
            }
            LinearWeight::Quantized(q) => (quant_linear(x, q)?, None),
            LinearWeight::Bf16(w) => (crate::ops::bf16_linear(x, w)?, None),
        };
        if let Some(lora) = self.lora.as_ref().filter(|_| weights == Weights::Policy) {
            let xd = match rng {
                Some(rng) if lora.dropout > 0.0 => dropout(x, lora.dropout, rng)?,
                _ => x.clone(),
            };
            // The scale goes on B (out × r), not on the (tokens × out) product: one pass fewer.
            let (a, b) = (
                lora.a.as_tensor().to_dtype(dtype)?,
                lora.b.as_tensor().to_dtype(dtype)?,
            );
            let delta = xd.matmul(&a.t()?)?.matmul(&(&b * lora.scale)?.t()?)?;
            y = match &lora.magnitude {
                None => (y + delta)?,
                Some(m) => {
                    // DoRA: (W + sBA) rescaled row-wise to the learned magnitude; the norm is
                    // detached as in PEFT (on a quantized base always: it is computed a tile
                    // at a time, outside the graph).
                    let delta_w = (b.matmul(&a)? * lora.scale)?;
                    let w = match (w, &self.weight) {
                        (None, LinearWeight::Bf16(packed)) => Some(packed.to_dense(dtype)?),
                        (w, _) => w,
                    };
                    let norm = match (&w, &self.weight) {
                        (Some(w), _) => {
                            let norm = (w + &delta_w)?.sqr()?.sum_keepdim(1)?.sqrt()?.squeeze(1)?;
                            if lora.detach_norm {
                                norm.detach()
                            } else {
                                norm
                            }
                        }
                        (None, LinearWeight::Quantized(q)) => {
                            if !lora.detach_norm {
                                anyhow::bail!("{}: DoRA on a quantized weight keeps its norm detached (as PEFT does)", self.name);
                            }
                            q.row_norms(Some(&delta_w), dtype)?
                        }
                        (None, LinearWeight::Dense(_) | LinearWeight::Bf16(_)) => {
                            unreachable!("a dense weight has a value")
                        }
                    };
                    let factor = m.as_tensor().to_dtype(dtype)?.broadcast_div(&norm)?;
                    (y + delta)?.broadcast_mul(&factor)?
                }
            };
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.value(weights, dtype)?.0)?;
        }
        Ok(y)
    }
}

/// What a decoder layer's forward takes from the config, read once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub dtype: DType,
    pub activation: Activation,
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    /// RMSNorm weights are offsets from one (Gemma).
    pub norm_plus_one: bool,
    /// RoPE on interleaved pairs (GLM).
    pub interleaved_rope: bool,
}

impl Dims {
    pub(crate) fn new(c: &ModelConfig, dtype: DType) -> Self {
        Self {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps,
            dtype,
            activation: c.activation,
            attn_scale: c.attn_scale,
            attn_softcap: c.gemma.as_ref().and_then(|g| g.attn_softcap),
            norm_plus_one: c.norm_plus_one(),
            interleaved_rope: c.interleaved_rope,
        }
    }

    /// `x` normalised with the weight `w` (`(1 + w)` for Gemma).
    pub(crate) fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.norm_plus_one {
            return rms_norm(x, &(w + 1.0)?, self.eps);
        }
        rms_norm(x, w, self.eps)
    }
}

/// A norm weight and its name inside the layer (`post_attention_layernorm`); the families put
/// the same names in different places (see [`super::config::NormLayout`]).
#[derive(Clone)]
pub struct Norm {
    pub name: &'static str,
    pub p: Param,
}

/// The attention's input projections: separate (`q_proj`, `k_proj`, `v_proj`) or one fused
/// `qkv_proj` (Phi-3) or `W_pack` (Baichuan) whose output rows are queries, then keys, then
/// values.
// One per decoder layer: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum QkvProj {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_norm: Param,
    pub qkv: QkvProj,
    pub o: Linear,
    /// Per-head RMSNorm of queries and keys (Qwen3, Gemma 3).
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
    /// The norm on the attention output before the residual add (Gemma 2/3, GLM-4).
    pub attn_out_norm: Option<Norm>,
    /// The MLP's input norm.
    pub mlp_norm: Norm,
    /// The norm on the MLP output before the residual add (Gemma 2/3, GLM-4).
    pub mlp_out_norm: Option<Norm>,
    /// The window of a sliding-window attention layer.
    pub sliding_window: Option<usize>,
    pub mlp: Mlp,
    /// Mixture-of-Depths: the router of a routed layer (see [`super::depths`]).
    pub router: Option<super::depths::Router>,
    /// Where the layer's tensors are named: `model.layers.N`, or `model.layers.N.block` in a
    /// routed layer.
    pub prefix: String,
}

impl DecoderLayer {
    /// Layer `l`'s weights, each taken by name from `src` (which fails on a missing one).
    pub(crate) fn new(l: usize, c: &ModelConfig, src: &mut dyn WeightSource) -> Result<Self> {
        let routed = c.mixture_of_depths && l % 2 == 1;
        let router = routed
            .then(|| super::depths::Router::take(&router_prefix(l), &mut *src))
            .transpose()?;
        let p = if routed {
            format!("model.layers.{l}.block")
        } else {
            format!("model.layers.{l}")
        };
        let mut linear = |m: &str, bias: bool| Linear::new(format!("{p}.{m}"), bias, &mut *src);
        let qkv = if let Some(name) = c.fused_qkv {
            QkvProj::Fused(linear(&format!("self_attn.{name}"), c.qkv_bias)?)
        } else {
            QkvProj::Split {
                q: linear("self_attn.q_proj", c.qkv_bias)?,
                k: linear("self_attn.k_proj", c.qkv_bias)?,
                v: linear("self_attn.v_proj", c.qkv_bias)?,
            }
        };
        let o = linear("self_attn.o_proj", c.o_bias)?;
        let mlp = Mlp::new(l, &p, c, &mut *src)?;
        let mut norm =
            |n: &str| -> Result<Param> { Ok(Param::frozen(src.take(&format!("{p}.{n}"))?)) };
        Ok(Self {
            index: l,
            input_norm: norm("input_layernorm.weight")?,
            q_norm: c
                .qk_norm
                .then(|| norm("self_attn.q_norm.weight"))
                .transpose()?,
            k_norm: c
                .qk_norm
                .then(|| norm("self_attn.k_norm.weight"))
                .transpose()?,
            attn_out_norm: c
                .norms
                .attn_out
                .map(|name| named(name, &mut norm))
                .transpose()?,
            mlp_norm: named(c.norms.mlp_in, &mut norm)?,
            mlp_out_norm: c
                .norms
                .mlp_out
                .map(|name| named(name, &mut norm))
                .transpose()?,
            sliding_window: c.sliding_window[l],
            qkv,
            o,
            mlp,
            router,
            prefix: p,
        })
    }

    /// Makes this a routed layer (Mixture-of-Depths `convert`): its tensors move under
    /// `model.layers.N.block`, next to the new router.
    pub(crate) fn route(&mut self, router: super::depths::Router) {
        let (plain, block) = (
            format!("{}.", self.prefix),
            format!("model.layers.{}.block", self.index),
        );
        for lin in self.linears_mut() {
            lin.name = lin.name.replacen(&plain, &format!("{block}."), 1);
        }
        self.prefix = block;
        self.router = Some(router);
    }

    /// The linear modules in PEFT's order: attention inputs, output, then the MLP's.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.qkv {
            QkvProj::Split { q, k, v } => vec![q, k, v],
            QkvProj::Fused(qkv) => vec![qkv],
        };
        out.push(&self.o);
        out.extend(self.mlp.linears());
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        linears_of(&mut self.qkv, &mut self.o, &mut self.mlp)
    }

    /// Every tensor of the layer under its Hugging Face name (quantized weights are not tensors:
    /// see [`Linear::weight`]).
    pub fn params(&self) -> Vec<(String, &Param)> {
        let p = &self.prefix;
        let mut out = vec![(format!("{p}.input_layernorm.weight"), &self.input_norm)];
        for n in [
            self.attn_out_norm.as_ref(),
            Some(&self.mlp_norm),
            self.mlp_out_norm.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            out.push((format!("{p}.{}.weight", n.name), &n.p));
        }
        if let (Some(q), Some(k)) = (&self.q_norm, &self.k_norm) {
            out.push((format!("{p}.self_attn.q_norm.weight"), q));
            out.push((format!("{p}.self_attn.k_norm.weight"), k));
        }
        for lin in self.linears() {
            if let Some(w) = lin.weight.dense() {
                out.push((format!("{}.weight", lin.name), w));
            }
            if let Some(b) = &lin.bias {
                out.push((format!("{}.bias", lin.name), b));
            }
        }
        if let Some(r) = &self.router {
            out.extend(r.params(&router_prefix(self.index)));
        }
        out
    }

    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let p = self.prefix.clone();
        let router_name = router_prefix(self.index);
        let Self {
            input_norm,
            qkv,
            o,
            q_norm,
            k_norm,
            attn_out_norm,
            mlp_norm,
            mlp_out_norm,
            mlp,
            router,
            ..
        } = self;
        let mut out = vec![(format!("{p}.input_layernorm.weight"), input_norm)];
        for n in [
            attn_out_norm.as_mut(),
            Some(mlp_norm),
            mlp_out_norm.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            out.push((format!("{p}.{}.weight", n.name), &mut n.p));
        }
        if let Some(q) = q_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), q));
        }
        if let Some(k) = k_norm {
            out.push((format!("{p}.self_attn.k_norm.weight"), k));
        }
        for lin in linears_of(qkv, o, mlp) {
            if let Some(w) = lin.weight.dense_mut() {
                out.push((format!("{}.weight", lin.name), w));
            }
            if let Some(b) = &mut lin.bias {
                out.push((format!("{}.bias", lin.name), b));
            }
        }
        if let Some(r) = router {
            out.extend(r.params_mut(&router_name));
        }
        out
    }

    /// The layer's trainable tensors (LoRA matrices and trained weights).
    pub(crate) fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push(l.a.as_tensor().clone());
                out.push(l.b.as_tensor().clone());
                if let Some(m) = &l.magnitude {
                    out.push(m.as_tensor().clone());
                }
            }
        }
        for (_, p) in self.params() {
            if let Some(v) = &p.var {
                out.push(v.as_tensor().clone());
            }
        }
        out
    }

    /// The layer over `x (B·n, hidden)`. With a cache, keys and values are appended to those of
    /// earlier tokens (decoding); without, the pass is self-contained (training).
    pub(crate) fn forward(
        &self,
        d: &Dims,
        x: Tensor,
        pass: &mut Pass,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
    ) -> Result<Tensor> {
        match &self.router {
            Some(router) => super::depths::forward(self, router, d, x, pass, rng, weights),
            None => self.block(d, x, pass, rng, weights),
        }
    }

    /// The layer itself, without a router's choice of tokens.
    pub(crate) fn block(
        &self,
        d: &Dims,
        x: Tensor,
        pass: &mut Pass,
        mut rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
    ) -> Result<Tensor> {
        let (bs, n) = (pass.batch, pass.n);
        let (nh, nkv, hd) = (d.heads, d.kv_heads, d.head_dim);
        let w = |p: &Param| -> Result<Tensor> { Ok(p.value(weights, d.dtype)?.0) };
        let norm = |x: &Tensor, p: &Param| -> Result<Tensor> { d.norm(x, &w(p)?) };
        let h = norm(&x, &self.input_norm)?;
        let (cos, sin, mask) = match (self.sliding_window, &pass.local) {
            (Some(_), Some(local)) => (&local.cos, &local.sin, &local.mask),
            _ => (&pass.cos, &pass.sin, &pass.mask),
        };
        let heads = |y: Tensor, norm: Option<&Param>, count: usize| -> Result<Tensor> {
            let y = y.reshape((bs, n, count, hd))?;
            let y = match norm {
                Some(n) => d.norm(&y, &w(n)?)?,
                None => y,
            };
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = match &self.qkv {
            QkvProj::Split { q, k, v } => (
                q.forward(&h, rng.as_deref_mut(), weights, d.dtype)?,
                k.forward(&h, rng.as_deref_mut(), weights, d.dtype)?,
                v.forward(&h, rng.as_deref_mut(), weights, d.dtype)?,
            ),
            QkvProj::Fused(qkv) => {
                let y = qkv.forward(&h, rng.as_deref_mut(), weights, d.dtype)?;
                (
                    y.narrow(1, 0, nh * hd)?,
                    y.narrow(1, nh * hd, nkv * hd)?,
                    y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let q = heads(q, self.q_norm.as_ref(), nh)?;
        let k = heads(k, self.k_norm.as_ref(), nkv)?;
        let v = heads(v, None, nkv)?;
        // Partial rotary (Phi-4-mini): the first `rot` dimensions of each head turn.
        let rot = cos.dim(D::Minus1)?;
        let rope_full = |x: &Tensor| -> Result<Tensor> {
            if crate::ops::fused_for(x) {
                return Ok(crate::ops::rope(x, cos, sin)?);
            }
            Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
        };
        // Interleaved pairs (GLM): the rotary dimensions of q and k are reordered evens-then-odds,
        // which makes each pair a (i, i + rot/2) pair of the usual half rotation. Only q·k is
        // used, and both get the same order, so nothing is put back.
        let deinterleave = d
            .interleaved_rope
            .then(|| {
                let order: Vec<u32> = (0..rot as u32)
                    .step_by(2)
                    .chain((1..rot as u32).step_by(2))
                    .collect();
                Tensor::from_vec(order, rot, cos.device())
            })
            .transpose()?;
        let rope = |x: &Tensor| -> Result<Tensor> {
            if rot == hd && deinterleave.is_none() {
                return rope_full(x);
            }
            let mut part = x.narrow(D::Minus1, 0, rot)?.contiguous()?;
            if let Some(order) = &deinterleave {
                part = part.index_select(order, 3)?;
            }
            let turned = rope_full(&part)?;
            if rot == hd {
                return Ok(turned);
            }
            Ok(
                Tensor::cat(&[&turned, &x.narrow(D::Minus1, rot, hd - rot)?], D::Minus1)?
                    .contiguous()?,
            )
        };
        let q = rope(&q)?;
        let mut k = rope(&k)?;
        let mut v = v;
        if let Some(cache) = pass.cache.as_deref_mut() {
            let l = self.index;
            if let Some(Some((pk, pv))) = cache.layers.get(l) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            if cache.layers.len() <= l {
                cache.layers.resize(l + 1, None);
            }
            cache.layers[l] = Some((k.clone(), v.clone()));
        }
        // S²-Attn: attention within groups of a quarter of the sequence, half of the heads
        // looking at groups shifted by half a group.
        let shifted = if pass.shift {
            Some(ShortGroups::new(n, bs, nkv)?)
        } else {
            None
        };
        let (q, k, v, mask, bs, n) = match &shifted {
            Some(sg) => (
                sg.shift(&q)?,
                sg.shift(&k)?,
                sg.shift(&v)?,
                sg.mask(mask)?,
                bs * sg.groups,
                sg.size,
            ),
            None => (q, k, v, mask.clone(), bs, n),
        };
        let attn = match (&pass.blocks, &shifted) {
            // A padding-free pass: each sequence of the packed row attends within itself.
            (Some(blocks), None) => {
                // The longest sequence's mask: its top-left corner is each shorter one's (a
                // causal mask, windowed or not, depends only on how far back a key is).
                let longest = blocks.iter().max_by_key(|b| b.len);
                let longest =
                    anyhow::Context::context(longest, "a padding-free pass without sequences")?;
                let mask = match (self.sliding_window, &longest.local_mask) {
                    (Some(_), Some(local)) => local,
                    _ => &longest.mask,
                };
                let segments: Vec<_> = blocks.iter().map(|b| (b.start, b.len)).collect();
                attend(d, &q, &k, &v, mask, Some(&segments))?
            }
            _ => attend(d, &q, &k, &v, &mask, None)?,
        };
        let (attn, bs, n) = match &shifted {
            Some(sg) => (sg.unshift(&attn)?, pass.batch, pass.n),
            None => (attn, bs, n),
        };
        let attn = attn.transpose(1, 2)?.reshape((bs * n, nh * hd))?;
        let attn = self
            .o
            .forward(&attn, rng.as_deref_mut(), weights, d.dtype)?;
        let attn = match &self.attn_out_norm {
            Some(n) => norm(&attn, &n.p)?,
            None => attn,
        };
        let x = (x + attn)?;
        let h = norm(&x, &self.mlp_norm.p)?;
        let (down, routing) = self.mlp.forward(&h, rng, weights, d)?;
        if let (Some(routing), Some(sink)) = (routing, pass.routing.as_mut()) {
            sink.push(routing);
        }
        Ok(match &self.mlp_out_norm {
            None => (x + down)?,
            Some(n) => (x + norm(&down, &n.p)?)?,
        })
    }
}

/// Scaled dot-product attention of `q (B, heads, n, hd)` over `k`, `v (B, kv_heads, total, hd)`
/// with an additive `mask` broadcast to `(B, 1, n, total)`; `(B, heads, n, hd)`. With
/// `segments` (a padding-free row: `(start, len)` of each sequence) each sequence attends within
/// itself under `mask`'s top-left corner ([`crate::ops::attention_packed`]).
fn attend(
    d: &Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    segments: Option<&[(usize, usize)]>,
) -> Result<Tensor> {
    let (bs, nh, n, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let q = q.reshape((bs, nkv, rep * n, hd))?;
    let (scale, cap) = (d.attn_scale, d.attn_softcap);
    let o = match segments {
        Some(segs) => crate::ops::attention_packed(&q, k, v, mask, segs, scale, cap, rep)?,
        None => crate::ops::attention(&q, k, v, mask, scale, cap, rep)?,
    };
    Ok(o.reshape((bs, nh, n, hd))?)
}

fn named(name: &'static str, norm: &mut impl FnMut(&str) -> Result<Param>) -> Result<Norm> {
    Ok(Norm {
        name,
        p: norm(&format!("{name}.weight"))?,
    })
}

/// A layer's linear modules from its projection fields, in [`DecoderLayer::linears`] order.
fn linears_of<'a>(
    qkv: &'a mut QkvProj,
    o: &'a mut Linear,
    mlp: &'a mut Mlp,
) -> Vec<&'a mut Linear> {
    let mut out = match qkv {
        QkvProj::Split { q, k, v } => vec![q, k, v],
        QkvProj::Fused(qkv) => vec![qkv],
    };
    out.push(o);
    out.extend(mlp.linears_mut());
    out
}

/// LongLoRA's shifted short attention over a training batch of `batch` rows of `len` tokens
/// (LLaMA-Factory's `model_utils/longlora.py`, group size ratio ¼): the sequence cut into groups
/// of `len / 4` tokens attended to separately, the second half of the heads rolled back by half
/// a group first (so their groups straddle the others') and forward again after; each group's
/// mask is the first group's of a row, as LLaMA-Factory tiles it.
pub(crate) struct ShortGroups {
    pub groups: usize,
    pub size: usize,
    batch: usize,
    len: usize,
}

impl ShortGroups {
    fn new(len: usize, batch: usize, kv_heads: usize) -> Result<Self> {
        let size = len / 4;
        if size == 0 || !len.is_multiple_of(size) {
            anyhow::bail!("shift_attn: q_len {len} should be divisible by group size {size}");
        }
        if !kv_heads.is_multiple_of(2) {
            anyhow::bail!("shift_attn needs an even number of key-value heads ({kv_heads})");
        }
        Ok(Self {
            groups: len / size,
            size,
            batch,
            len,
        })
    }

    /// `x (B, H, len, d)` with its second half of heads rolled left by ⌈size/2⌉, cut into
    /// groups: `(B·groups, H, size, d)`.
    fn shift(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, _, d) = x.dims4()?;
        let x = roll_second_half(x, self.size.div_ceil(2))?;
        Ok(x.reshape((b, h, self.groups, self.size, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * self.groups, h, self.size, d))?)
    }

    /// The groups' outputs `(B·groups, H, size, d)` back in sequence order, the rolled heads
    /// rolled back over the whole sequence: `(B, H, len, d)`.
    fn unshift(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, _, d) = x.dims4()?;
        let (b, n) = (self.batch, self.len);
        let x = x
            .reshape((b, self.groups, h, self.size, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, h, n, d))?;
        roll_second_half(&x, n - self.size.div_ceil(2))
    }

    /// The first group's mask `(B, 1, size, size)` of each row, tiled over the groups in the
    /// order `torch.repeat` gives (group row `r` takes row `r mod B`).
    fn mask(&self, mask: &Tensor) -> Result<Tensor> {
        let first = mask
            .narrow(2, 0, self.size)?
            .narrow(3, 0, self.size)?
            .contiguous()?;
        let rows: Vec<u32> = (0..self.batch * self.groups)
            .map(|r| (r % self.batch) as u32)
            .collect();
        let idx = Tensor::from_vec(rows, self.batch * self.groups, mask.device())?;
        Ok(first.index_select(&idx, 0)?.contiguous()?)
    }
}

/// `x (B, H, n, d)` with the second half of its heads rolled `left` positions left along the
/// sequence (`torch.roll(…, -left, dims=seq)`).
fn roll_second_half(x: &Tensor, left: usize) -> Result<Tensor> {
    let (_, h, n, _) = x.dims4()?;
    let (keep, turn) = (x.narrow(1, 0, h / 2)?, x.narrow(1, h / 2, h - h / 2)?);
    let turned = Tensor::cat(
        &[&turn.narrow(2, left, n - left)?, &turn.narrow(2, 0, left)?],
        2,
    )?;
    Ok(Tensor::cat(&[&keep, &turned], 1)?)
}

/// Where a routed layer's router is named (the package's `router.weight_predictor`).
fn router_prefix(l: usize) -> String {
    format!("model.layers.{l}.router.weight_predictor")
}

/// What one forward pass shares across its layers.
pub(crate) struct Pass<'a> {
    pub batch: usize,
    /// New tokens per row in this pass.
    pub n: usize,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
    /// The tables of the sliding-window layers, when the model has them.
    pub local: Option<LocalTables>,
    /// Where sparse layers leave their routing, when a load-balancing loss wants it.
    pub routing: Option<Vec<Routing>>,
    pub cache: Option<&'a mut KvCache>,
    /// LongLoRA's shifted short attention (S²-Attn) in this training pass.
    pub shift: bool,
    /// The share of tokens Mixture-of-Depths layers route through in this pass.
    pub depth_capacity: f64,
    /// A padding-free pass: the batch's sequences concatenated into one row (`batch` 1), each
    /// attending within itself (`mask` and `local.mask` are then unused).
    pub blocks: Option<Vec<Block>>,
}

/// One sequence of a padding-free pass.
#[derive(Clone)]
pub(crate) struct Block {
    /// Its first token in the packed row, and its length.
    pub start: usize,
    pub len: usize,
    /// Its causal mask `(1, 1, len, len)`, and that of the sliding-window layers.
    pub mask: Tensor,
    pub local_mask: Option<Tensor>,
}

/// RoPE tables and the attention mask of sliding-window layers.
#[derive(Clone)]
pub(crate) struct LocalTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

impl Pass<'_> {
    /// The same tables without the KV cache (a training pass never has one).
    pub(crate) fn fresh(&self) -> Pass<'static> {
        Pass {
            batch: self.batch,
            n: self.n,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            mask: self.mask.clone(),
            local: self.local.clone(),
            routing: None,
            cache: None,
            shift: self.shift,
            depth_capacity: self.depth_capacity,
            blocks: self.blocks.clone(),
        }
    }
}

/// Keys and values of the tokens seen so far, per layer (after RoPE), for decoding.
#[derive(Default, Clone)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
    /// M-RoPE after a prompt with images: later tokens sit this far from their cache index
    /// (the prompt's largest position + 1 − its length, negative when images made it compact).
    pub mrope_delta: i64,
    /// Mixture-of-Depths: per routed layer, per row, whether each cached token went through it.
    pub routed: std::collections::BTreeMap<usize, Vec<Vec<bool>>>,
}

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

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
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
pub(crate) fn f32_if_half(d: DType) -> DType {
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

fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    Ok((x * dropout_mask(x, p, rng)?)?)
}

/// Dropout's mask for `x`: 0 with probability `p`, else `1 / (1 − p)`.
fn dropout_mask(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f64> = (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}
