//! CustomOps with hand-written backward passes.

/// Compiles a kernel (a row of a fused op, an AMX packing loop) for AVX-512 and for AVX2 + FMA
/// besides the baseline x86-64 (SSE2) the crate is built for, and calls the best copy this CPU
/// runs (`multiversion`). Built for the baseline alone, the kernels' loops vectorise 4 floats
/// wide instead of 16.
macro_rules! simd_kernel {
    ($($item:tt)*) => {
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
            "x86_64+avx2+fma",
        ))]
        $($item)*
    };
}

pub mod amx_bf16;
mod attach;
mod attention;
mod attention_blocks;
mod bf16_linear;
mod checkpoint;
mod frozen_linear;
mod head_logps;
mod log_sigmoid;
mod lora_linear;
mod low_rank;
mod rowwise;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod vendored_candle_tests;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

pub use attach::attach;
pub use attention::{attention, attention_packed};
pub use bf16_linear::{bf16_linear, bf16_products, use_bf16_products, Bf16Weight};
pub use checkpoint::{checkpoint, GradSink, Recompute};
pub use frozen_linear::frozen_linear;
pub use head_logps::{frozen_head, frozen_head_logps, pack_head_bf16, HEAD_TILE_ELEMS};
pub use log_sigmoid::log_sigmoid;
pub use lora_linear::{lora_linear, Frozen};
pub use rowwise::{geglu, log_softmax_gather, masked_softmax, rms_norm, rope, swiglu};

static COMPOSED: AtomicBool = AtomicBool::new(false);

/// Turns the fused row-wise kernels off (benchmarks and tests compare both paths).
pub fn use_composed_ops(on: bool) {
    COMPOSED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are switched off.
pub(crate) fn composed() -> bool {
    COMPOSED.load(Ordering::Relaxed)
}

/// `f` on the f32 elements of a contiguous CPU tensor.
pub(crate) fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> candle_core::Result<T> {
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            Ok(f(&v[a..b]))
        }
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

/// Whether the fused kernels apply to `t`: CPU, f32 or f64, and not switched off.
pub fn fused_for(t: &Tensor) -> bool {
    !COMPOSED.load(Ordering::Relaxed)
        && t.device().is_cpu()
        && matches!(t.dtype(), DType::F32 | DType::F64)
}
