//! A decoder layer's feed-forward part: a gated MLP ([`Ffn`]: SwiGLU or GeGLU, separate or fused
//! input projections), or a mixture of experts ([`Moe`]: Mixtral, Qwen2-MoE, Qwen3-MoE) whose
//! router sends each token to its top-k experts. Only the chosen experts run, each on its own
//! tokens: rows are gathered per expert, and the weighted outputs added back in place
//! (`index_select` / `index_add`, both differentiable).

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rand_chacha::ChaCha8Rng;

use super::config::{Activation, ModelConfig, MoeConfig, MoeNaming};
use super::layers::{softmax, Dims, Linear, Weights};
use super::weights::WeightSource;

/// The MLP's input projections: separate (`gate_proj`, `up_proj`) or one fused `gate_up_proj`
/// whose output rows are the gate, then the up projection (Phi-3, GLM).
#[derive(Clone)]
pub enum GateUpProj {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

/// `down(act(gate(x)) ⊙ up(x))`.
#[derive(Clone)]
pub struct Ffn {
    pub gate_up: GateUpProj,
    pub down: Linear,
}

impl Ffn {
    /// The MLP under `prefix` with its three weights' names (`gate_proj`, `up_proj`,
    /// `down_proj`), or `gate_up_proj` when `fused`.
    fn new(
        prefix: &str,
        [gate, up, down]: [&str; 3],
        fused: bool,
        src: &mut dyn WeightSource,
    ) -> Result<Self> {
        let mut linear = |m: &str| Linear::new(format!("{prefix}.{m}"), false, &mut *src);
        Ok(Self {
            gate_up: if fused {
                GateUpProj::Fused(linear("gate_up_proj")?)
            } else {
                GateUpProj::Split {
                    gate: linear(gate)?,
                    up: linear(up)?,
                }
            },
            down: linear(down)?,
        })
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.gate_up {
            GateUpProj::Split { gate, up } => vec![gate, up],
            GateUpProj::Fused(gate_up) => vec![gate_up],
        };
        out.push(&self.down);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = match &mut self.gate_up {
            GateUpProj::Split { gate, up } => vec![gate, up],
            GateUpProj::Fused(gate_up) => vec![gate_up],
        };
        out.push(&mut self.down);
        out
    }

    fn forward(
        &self,
        h: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        d: &Dims,
    ) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUpProj::Split { gate, up } => (
                gate.forward(h, rng.as_deref_mut(), weights, d.dtype)?,
                up.forward(h, rng.as_deref_mut(), weights, d.dtype)?,
            ),
            GateUpProj::Fused(gate_up) => {
                let y = gate_up.forward(h, rng.as_deref_mut(), weights, d.dtype)?;
                let i = y.dim(1)? / 2;
                (y.narrow(1, 0, i)?, y.narrow(1, i, i)?)
            }
        };
        let act = match d.activation {
            Activation::Silu if crate::ops::fused_for(&gate) => crate::ops::swiglu(&gate, &up)?,
            Activation::Silu => (gate.silu()? * up)?,
            Activation::GeluTanh if crate::ops::fused_for(&gate) => crate::ops::geglu(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        self.down.forward(&act, rng, weights, d.dtype)
    }
}

/// A sparse MLP: the router's softmax picks `top_k` experts per token; their outputs are summed
/// with those probabilities (renormalised over the chosen when the model says so). Qwen2-MoE adds
/// a shared expert scaled by `sigmoid(shared_expert_gate(x))`.
#[derive(Clone)]
pub struct Moe {
    pub router: Linear,
    pub experts: Vec<Ffn>,
    pub shared: Option<(Ffn, Linear)>,
    pub top_k: usize,
    pub renormalize: bool,
}

impl Moe {
    fn new(prefix: &str, m: &MoeConfig, src: &mut dyn WeightSource) -> Result<Self> {
        let names = match m.naming {
            MoeNaming::Mixtral => ["w1", "w3", "w2"],
            MoeNaming::Qwen => ["gate_proj", "up_proj", "down_proj"],
        };
        let router = Linear::new(format!("{prefix}.gate"), false, &mut *src)?;
        let experts = (0..m.experts)
            .map(|e| Ffn::new(&format!("{prefix}.experts.{e}"), names, false, &mut *src))
            .collect::<Result<_>>()?;
        let shared = if m.shared_expert {
            Some((
                Ffn::new(&format!("{prefix}.shared_expert"), names, false, &mut *src)?,
                Linear::new(format!("{prefix}.shared_expert_gate"), false, &mut *src)?,
            ))
        } else {
            None
        };
        Ok(Self {
            router,
            experts,
            shared,
            top_k: m.top_k,
            renormalize: m.renormalize,
        })
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![&self.router];
        for e in &self.experts {
            out.extend(e.linears());
        }
        if let Some((ffn, gate)) = &self.shared {
            out.extend(ffn.linears());
            out.push(gate);
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.router];
        for e in &mut self.experts {
            out.extend(e.linears_mut());
        }
        if let Some((ffn, gate)) = &mut self.shared {
            out.extend(ffn.linears_mut());
            out.push(gate);
        }
        out
    }

    /// `h (N, hidden)` through the chosen experts, and the routing (for the load-balancing
    /// loss).
    fn forward(
        &self,
        h: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        d: &Dims,
    ) -> Result<(Tensor, Routing)> {
        let n = h.dim(0)?;
        let logits = self
            .router
            .forward(h, rng.as_deref_mut(), weights, d.dtype)?
            .to_dtype(super::layers::f32_if_half(d.dtype))?;
        let probs = softmax(&logits)?;
        // The choice itself is not differentiable: pick on the host, then gather the chosen
        // probabilities from the graph. Ties go to the lower expert index, as torch.topk does on
        // the CPU.
        let host: Vec<Vec<f64>> = probs.detach().to_dtype(DType::F64)?.to_vec2()?;
        let k = self.top_k;
        let mut chosen = Vec::with_capacity(n * k);
        for row in &host {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            chosen.extend(order[..k].iter().map(|&e| e as u32));
        }
        let idx = Tensor::from_vec(chosen.clone(), (n, k), h.device())?;
        let mut w = probs.gather(&idx, 1)?;
        if self.renormalize {
            w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
        }
        let w = w.to_dtype(h.dtype())?.flatten_all()?;
        let mut out = h.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let (rows, slots): (Vec<u32>, Vec<u32>) = chosen
                .iter()
                .enumerate()
                .filter(|(_, &c)| c as usize == e)
                .map(|(s, _)| ((s / k) as u32, s as u32))
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let rows = Tensor::from_vec(rows, slots.len(), h.device())?;
            let slots = Tensor::from_vec(slots, rows.dim(0)?, h.device())?;
            let y = expert.forward(&h.index_select(&rows, 0)?, rng.as_deref_mut(), weights, d)?;
            let y = y.broadcast_mul(&w.index_select(&slots, 0)?.unsqueeze(1)?)?;
            out = out.index_add(&rows, &y, 0)?;
        }
        if let Some((ffn, gate)) = &self.shared {
            let g =
                candle_nn::ops::sigmoid(&gate.forward(h, rng.as_deref_mut(), weights, d.dtype)?)?;
            out = (out + ffn.forward(h, rng, weights, d)?.broadcast_mul(&g)?)?;
        }
        Ok((out, Routing { probs, chosen }))
    }
}

/// A layer's feed-forward part.
// One per decoder layer: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Mlp {
    Dense(Ffn),
    Sparse(Moe),
}

impl Mlp {
    /// Layer `l`'s MLP: sparse where the config says so, else dense (`mlp.gate_proj`, … or
    /// Phi-3/GLM's fused `mlp.gate_up_proj`).
    pub(crate) fn new(
        l: usize,
        p: &str,
        c: &ModelConfig,
        src: &mut dyn WeightSource,
    ) -> Result<Self> {
        match &c.moe {
            Some(m) if m.sparse_layers[l] => {
                let block = match m.naming {
                    MoeNaming::Mixtral => "block_sparse_moe",
                    MoeNaming::Qwen => "mlp",
                };
                Ok(Mlp::Sparse(Moe::new(&format!("{p}.{block}"), m, src)?))
            }
            _ => Ok(Mlp::Dense(Ffn::new(
                &format!("{p}.mlp"),
                ["gate_proj", "up_proj", "down_proj"],
                c.fused_gate_up,
                src,
            )?)),
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Dense(f) => f.linears(),
            Mlp::Sparse(m) => m.linears(),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Dense(f) => f.linears_mut(),
            Mlp::Sparse(m) => m.linears_mut(),
        }
    }

    /// The MLP over `h`, and a sparse MLP's routing.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        d: &Dims,
    ) -> Result<(Tensor, Option<Routing>)> {
        Ok(match self {
            Mlp::Dense(f) => (f.forward(h, rng, weights, d)?, None),
            Mlp::Sparse(m) => {
                let (y, routing) = m.forward(h, rng, weights, d)?;
                (y, Some(routing))
            }
        })
    }
}

/// What a sparse layer's router decided for the `N` rows of a pass.
pub(crate) struct Routing {
    /// The router's probabilities `(N, experts)`, in the graph.
    pub probs: Tensor,
    /// The chosen experts, `top_k` per row, row by row.
    pub chosen: Vec<u32>,
}

/// transformers' `load_balancing_loss_func` over the routing of every sparse layer (rows of
/// one batch): `experts · Σ_e f_e · P_e`, where `f_e` is how often the (unpadded) tokens chose
/// expert `e`, per token, and `P_e` its mean router probability.
pub(crate) fn load_balancing_loss(
    routing: &[Routing],
    keep: &[bool],
    top_k: usize,
) -> Result<Tensor> {
    let probs: Vec<&Tensor> = routing.iter().map(|r| &r.probs).collect();
    let probs = Tensor::cat(&probs, 0)?;
    let (rows, experts) = probs.dims2()?;
    let chosen = routing.iter().flat_map(|r| r.chosen.iter());
    let mut counts = vec![0f64; experts];
    let mut mask = vec![0f64; rows];
    for (r, row_choice) in chosen.collect::<Vec<_>>().chunks(top_k).enumerate() {
        if keep[r % keep.len()] {
            mask[r] = 1.0;
            for &&e in row_choice {
                counts[e as usize] += 1.0;
            }
        }
    }
    let kept = mask.iter().sum::<f64>().max(1.0);
    let dev = probs.device();
    let dtype = probs.dtype();
    let f: Vec<f64> = counts.iter().map(|c| c / kept).collect();
    let mask = Tensor::from_vec(mask, (1, rows), dev)?.to_dtype(dtype)?;
    let p = (mask.matmul(&probs)? / kept)?; // (1, experts)
    let f = Tensor::from_vec(f, (experts, 1), dev)?.to_dtype(dtype)?;
    Ok((p.matmul(&f)?.squeeze(1)?.squeeze(0)? * experts as f64)?)
}
