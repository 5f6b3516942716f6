//! `x · Wᵀ` for a frozen quantized `W`, differentiable in `x`: the forward runs outside the
//! graph, one dequantized tile of rows at a time (`y[:, tile] = x · tileᵀ`), and is attached to
//! `x` with the backward `dx = Σ_tiles dy[:, tile] · tile`, dequantizing again tile by tile.
//! candle's `QMatMul` cuts the graph (`apply_op1_no_bwd`); this does not, and keeps no tile.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::QuantWeight;
use crate::ops::attach;

fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// `x (N, in) · Wᵀ → (N, out)`.
fn forward(x: &Tensor, w: &QuantWeight) -> Result<Tensor> {
    let x = x.detach();
    let mut parts = Vec::with_capacity(w.num_tiles());
    for i in 0..w.num_tiles() {
        let tile = w.dequantize_tile(i, x.dtype()).map_err(to_candle)?;
        parts.push(x.matmul(&tile.t()?)?);
    }
    Tensor::cat(&parts, 1)
}

/// `dy (N, out) · W → (N, in)`.
fn input_grad(dy: &Tensor, w: &QuantWeight) -> Result<Tensor> {
    let mut dx: Option<Tensor> = None;
    for i in 0..w.num_tiles() {
        let (r0, n) = w.tile_span(i);
        let tile = w.dequantize_tile(i, dy.dtype()).map_err(to_candle)?;
        let part = dy.narrow(1, r0, n)?.matmul(&tile)?;
        dx = Some(match dx {
            None => part,
            Some(acc) => (acc + part)?,
        });
    }
    dx.ok_or_else(|| candle_core::Error::Msg("an empty quantized weight".into()))
}

/// `x (N, in) · Wᵀ → (N, out)` for the quantized `W`, with `x`'s gradient.
pub fn quant_linear(x: &Tensor, w: &Arc<QuantWeight>) -> Result<Tensor> {
    let y0 = forward(x, w)?;
    let wb = w.clone();
    attach("quant-linear", x, y0, move |_x, g| {
        input_grad(&g.contiguous()?, &wb)
    })?
    .ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "quantized weights are not supported on {:?} in this build",
            x.device()
        ))
    })
}
