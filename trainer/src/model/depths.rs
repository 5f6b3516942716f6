//! Mixture-of-Depths (`mixture_of_depths`), as the `mixture-of-depth` package (1.2.0) that
//! LLaMA-Factory uses builds it: every odd decoder layer gets a token router, a
//! `Linear(hidden, 1)` computed in f32, and only the tokens it ranks highest go through the
//! layer, their output scaled by their router score; the others pass the layer unchanged.
//!
//! The package's rules, kept as they are:
//! - the capacity (the share of a row's tokens routed through) starts at 1 and decays as
//!   `0.125 + 0.875 / step` over training passes; a model that never trained in this process
//!   routes 12.5 %;
//! - a row routes the tokens whose score is *strictly* above its k-th largest, `k = max(1,
//!   ⌊capacity · n⌋)` (so `k − 1` of them unless scores tie), all tokens at or above it when
//!   `k = 1` (so a decoded token always goes through);
//! - routed tokens attend only to routed tokens (causally), at their own positions.
//!
//! In a full pass (training, evaluation) each row's chosen tokens are gathered and go through
//! the layer alone, so a routed layer computes only its capacity's share of the tokens. In
//! decoding with the KV cache the layer runs on the new tokens with the unchosen ones' keys
//! hidden (a decoded token is always chosen), and the cache keeps which tokens each routed
//! layer chose.

use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::layers::{Param, Weights, MASK_VALUE};
use super::weights::WeightSource;

/// The capacity of a model that has not trained (the package's `MoD(0.125, …)`).
pub const START_CAPACITY: f64 = 0.125;

/// The model types LLaMA-Factory converts (its `MOD_SUPPORTED_MODELS`) that this engine runs
/// dense (the mixtures of experts are left out: their load-balancing loss would count the
/// tokens a layer skips).
pub const SUPPORTED: &[&str] = &["llama", "mistral", "gemma"];

/// Applies `mixture_of_depths` to a loaded model: `convert` routes a dense model's odd layers
/// (routers drawn from `seed`), `load` checks that the checkpoint is routed. A routed checkpoint
/// loads routed with either value or none (its tensors are named for it).
pub fn configure(
    model: &mut super::Model,
    mode: Option<protocol::args::MixtureOfDepths>,
    seed: u64,
) -> Result<()> {
    use protocol::args::MixtureOfDepths as M;
    match mode {
        Some(M::Convert) => model.route_depths(seed),
        Some(M::Load) if !model.cfg.mixture_of_depths => anyhow::bail!(
            "`mixture_of_depths: load`: the model is not a Mixture-of-Depths checkpoint (its class is {}); use `mixture_of_depths: convert` to route a dense model",
            model.cfg.architecture()
        ),
        _ => Ok(()),
    }
}

/// The class name the package gives a routed model: `MoD` inserted before `For`
/// (`LlamaForCausalLM` → `LlamaMoDForCausalLM`).
pub fn routed_architecture(dense: &str) -> String {
    match dense.split_once("For") {
        Some((head, tail)) => format!("{head}MoDFor{tail}"),
        None => format!("MoD{dense}"),
    }
}

/// Whether a checkpoint's class is a routed one.
pub fn is_routed_architecture(name: &str) -> bool {
    name.contains("MoDFor") || name.starts_with("MoD")
}

/// A routed layer's router: one score per token.
#[derive(Clone)]
pub struct Router {
    /// `(1, hidden)`, f32 as the package keeps it.
    pub weight: Param,
    /// `(1,)`.
    pub bias: Param,
}

impl Router {
    /// The router saved under `prefix` (`model.layers.1.router.weight_predictor`).
    pub(crate) fn take(prefix: &str, src: &mut dyn WeightSource) -> Result<Self> {
        let mut f32 = |n: &str| -> Result<Param> {
            Ok(Param::frozen(
                src.take(&format!("{prefix}.{n}"))?.to_dtype(DType::F32)?,
            ))
        };
        Ok(Self {
            weight: f32("weight")?,
            bias: f32("bias")?,
        })
    }

    /// A new router as PyTorch initializes `nn.Linear(hidden, 1)`: weight and bias uniform in
    /// ±1/√hidden.
    pub fn init(hidden: usize, rng: &mut ChaCha8Rng, device: &candle_core::Device) -> Result<Self> {
        let bound = 1.0 / (hidden as f32).sqrt();
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-bound..bound)).collect() };
        Ok(Self {
            weight: Param::frozen(Tensor::from_vec(draw(hidden), (1, hidden), device)?),
            bias: Param::frozen(Tensor::from_vec(draw(1), 1, device)?),
        })
    }

    /// The scores of `x (N, hidden)`, `(N, 1)` in `x`'s dtype (computed in f32).
    fn scores(&self, x: &Tensor, weights: Weights) -> Result<Tensor> {
        let (w, _) = self.weight.value(weights, DType::F32)?;
        let (b, _) = self.bias.value(weights, DType::F32)?;
        let s = x.to_dtype(DType::F32)?.matmul(&w.t()?)?.broadcast_add(&b)?;
        Ok(s.to_dtype(x.dtype())?)
    }

    pub fn params(&self, prefix: &str) -> Vec<(String, &Param)> {
        vec![
            (format!("{prefix}.weight"), &self.weight),
            (format!("{prefix}.bias"), &self.bias),
        ]
    }

    pub fn params_mut(&mut self, prefix: &str) -> Vec<(String, &mut Param)> {
        vec![
            (format!("{prefix}.weight"), &mut self.weight),
            (format!("{prefix}.bias"), &mut self.bias),
        ]
    }
}

/// The capacity schedule shared by a model's routed layers (they all count the same passes).
#[derive(Debug)]
pub struct Schedule(Mutex<(u64, f64)>);

impl Default for Schedule {
    fn default() -> Self {
        Self(Mutex::new((0, START_CAPACITY)))
    }
}

impl Schedule {
    /// The capacity of the next pass; a training pass advances the schedule first.
    pub fn next(&self, training: bool) -> f64 {
        let mut g = self.0.lock().expect("depth schedule");
        if training {
            // The package's step counter: +1 up to 1000, then +999 per pass.
            g.0 += if g.0 < 1000 { 1 } else { 999 };
            g.1 = START_CAPACITY + (1.0 - START_CAPACITY) * (1.0 / g.0 as f64);
        }
        g.1
    }
}

/// Which of each row's `n` scores (row-major, `batch × n`) are routed through the layer.
pub fn select(scores: &[f32], n: usize, capacity: f64) -> Vec<bool> {
    let k = ((capacity * n as f64) as usize).max(1);
    let mut out = Vec::with_capacity(scores.len());
    for row in scores.chunks(n) {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k.min(n) - 1];
        out.extend(
            row.iter()
                .map(|&s| if k > 1 { s > threshold } else { s >= threshold }),
        );
    }
    out
}

/// The additive mask that hides unrouted keys: `(batch, 1, n, total)` for queries at
/// `start..start + n` over keys `0..total`, where `routed[r][j]` says whether row `r`'s key `j`
/// was routed. A query always keeps its own key (an unrouted query's output is discarded, and a
/// fully masked row would be undefined).
fn hidden_keys(
    routed: &[Vec<bool>],
    n: usize,
    start: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let total = start + n;
    let mut m = vec![0f32; routed.len() * n * total];
    for (r, keys) in routed.iter().enumerate() {
        for i in 0..n {
            for (j, &kept) in keys.iter().enumerate().take(total) {
                if !kept && j != start + i {
                    m[(r * n + i) * total + j] = MASK_VALUE as f32;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (routed.len(), 1, n, total), device)?.to_dtype(dtype)?)
}

/// The routed layer over `x (B·n, hidden)`: `layer(x)·score` for routed tokens, `x` for the
/// others. With a KV cache, the routed flags of earlier tokens are kept in it per layer.
pub(crate) fn forward(
    layer: &super::layers::DecoderLayer,
    router: &Router,
    d: &super::layers::Dims,
    x: Tensor,
    pass: &mut super::layers::Pass,
    rng: Option<&mut ChaCha8Rng>,
    weights: Weights,
) -> Result<Tensor> {
    let (bs, n) = (pass.batch, pass.n);
    let scores = router.scores(&x, weights)?;
    let flat: Vec<f32> = scores.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let chosen = select(&flat, n, pass.depth_capacity);
    if pass.cache.is_none() {
        return gathered(layer, d, &x, &scores, &chosen, pass, rng, weights);
    }
    let (start, routed) = match pass.cache.as_deref_mut() {
        Some(cache) => {
            let start = cache.len;
            let rows = cache.routed.entry(layer.index).or_default();
            rows.resize(bs, Vec::new());
            for (r, row) in rows.iter_mut().enumerate() {
                row.resize(start, false);
                row.extend_from_slice(&chosen[r * n..(r + 1) * n]);
            }
            (start, rows.clone())
        }
        None => (0, chosen.chunks(n).map(<[bool]>::to_vec).collect()),
    };
    let hide = hidden_keys(&routed, n, start, pass.mask.dtype(), x.device())?;
    let mut inner = super::layers::Pass {
        batch: bs,
        n,
        cos: pass.cos.clone(),
        sin: pass.sin.clone(),
        mask: pass.mask.broadcast_add(&hide)?,
        local: match &pass.local {
            Some(l) => Some(super::layers::LocalTables {
                mask: l.mask.broadcast_add(&hide)?,
                ..l.clone()
            }),
            None => None,
        },
        routing: None,
        cache: pass.cache.as_deref_mut(),
        shift: false,
        depth_capacity: pass.depth_capacity,
        blocks: None,
    };
    let y = layer.block(d, x.clone(), &mut inner, rng, weights)?;
    let keep: Vec<f32> = chosen.iter().map(|&c| f32::from(u8::from(c))).collect();
    let keep = Tensor::from_vec(keep, (bs * n, 1), x.device())?.to_dtype(x.dtype())?;
    let routed_out = y.broadcast_mul(&scores)?.broadcast_mul(&keep)?;
    let passed = x.broadcast_mul(&(1.0 - keep)?)?;
    Ok((routed_out + passed)?)
}

/// A full pass (training, evaluation) through a routed layer: each row's chosen tokens alone go
/// through the layer, at their positions and under the pass's mask restricted to them, so the
/// layer computes the chosen share of the tokens only.
#[allow(clippy::too_many_arguments)]
fn gathered(
    layer: &super::layers::DecoderLayer,
    d: &super::layers::Dims,
    x: &Tensor,
    scores: &Tensor,
    chosen: &[bool],
    pass: &super::layers::Pass,
    mut rng: Option<&mut ChaCha8Rng>,
    weights: Weights,
) -> Result<Tensor> {
    let (bs, n) = (pass.batch, pass.n);
    let device = x.device();
    let mut all = Vec::new();
    let mut outs = Vec::new();
    for r in 0..bs {
        let picked: Vec<u32> = (0..n)
            .filter(|&i| chosen[r * n + i])
            .map(|i| i as u32)
            .collect();
        if picked.is_empty() {
            continue;
        }
        let m = picked.len();
        let local = Tensor::from_slice(&picked, m, device)?;
        let rows: Vec<u32> = picked.iter().map(|&i| (r * n) as u32 + i).collect();
        let rows = Tensor::from_slice(&rows, m, device)?;
        // The row's tables at the chosen positions: `(1, 1, m, ·)` and the `(m, m)` mask.
        let pick = |t: &Tensor, square: bool| -> Result<Tensor> {
            let t = t
                .narrow(0, r.min(t.dim(0)? - 1), 1)?
                .index_select(&local, 2)?;
            Ok(if square {
                t.index_select(&local, 3)?
            } else {
                t
            })
        };
        let mut sub = super::layers::Pass {
            batch: 1,
            n: m,
            cos: pick(&pass.cos, false)?,
            sin: pick(&pass.sin, false)?,
            mask: pick(&pass.mask, true)?,
            local: match &pass.local {
                Some(l) => Some(super::layers::LocalTables {
                    cos: pick(&l.cos, false)?,
                    sin: pick(&l.sin, false)?,
                    mask: pick(&l.mask, true)?,
                }),
                None => None,
            },
            routing: None,
            cache: None,
            shift: false,
            depth_capacity: pass.depth_capacity,
            blocks: None,
        };
        let y = layer.block(
            d,
            x.index_select(&rows, 0)?,
            &mut sub,
            rng.as_deref_mut(),
            weights,
        )?;
        outs.push(y.broadcast_mul(&scores.index_select(&rows, 0)?)?);
        all.push(rows);
    }
    let keep: Vec<f32> = chosen.iter().map(|&c| f32::from(u8::from(!c))).collect();
    let passed =
        x.broadcast_mul(&Tensor::from_vec(keep, (bs * n, 1), device)?.to_dtype(x.dtype())?)?;
    if outs.is_empty() {
        return Ok(passed);
    }
    let (ids, ys) = (Tensor::cat(&all, 0)?, Tensor::cat(&outs, 0)?);
    Ok(passed.index_add(&ids, &ys, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_is_strictly_above_the_kth_score_and_inclusive_for_one() {
        // Capacity 1 over 4 tokens: k = 4, threshold = the smallest, which is left out.
        assert_eq!(
            select(&[0.3, -1.0, 2.0, 0.5], 4, 1.0),
            [true, false, true, true]
        );
        // k = ⌊0.5 · 4⌋ = 2: only the best one is strictly above the second best.
        assert_eq!(
            select(&[0.3, -1.0, 2.0, 0.5], 4, 0.5),
            [false, false, true, false]
        );
        // k = 1: the best, ties included; a single decoded token always routes.
        assert_eq!(
            select(&[0.3, 2.0, 2.0, 0.5], 4, 0.25),
            [false, true, true, false]
        );
        assert_eq!(select(&[-7.0], 1, START_CAPACITY), [true]);
        // Rows are ranked separately.
        assert_eq!(
            select(&[1.0, 0.0, 0.0, 1.0], 2, 1.0),
            [true, false, false, true]
        );
    }

    #[test]
    fn capacity_decays_over_training_passes_only() {
        let s = Schedule::default();
        assert_eq!(s.next(false), START_CAPACITY);
        assert_eq!(s.next(true), 1.0);
        assert_eq!(s.next(true), 0.5625);
        assert_eq!(s.next(false), 0.5625);
        assert!((s.next(true) - (0.125 + 0.875 / 3.0)).abs() < 1e-15);
    }
}
