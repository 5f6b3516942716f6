//! The compute device: the first GPU when built with `--features cuda` (or `metal`) and one is
//! present, else the CPU.

use candle_core::Device;

pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}

/// A human-readable name for `env` and logs.
pub fn describe(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA GPU",
        Device::Metal(_) => "Metal GPU",
    }
}

/// How a training run computes on its device.
#[derive(Debug, Clone, PartialEq)]
pub struct Precision {
    /// The dtype of the model's tensors.
    pub dtype: candle_core::DType,
    /// The CPU's `bf16`: frozen linear weights and attention multiply in bf16 on AMX tiles
    /// ([`crate::ops::use_bf16_products`]); the rest computes in f32.
    pub bf16_products: bool,
    /// What the run should log about it: `(is_warning, message)`.
    pub note: Option<(bool, String)>,
}

/// The compute precision of a training run on `device`. GPUs compute in bf16/f16 when
/// `bf16`/`fp16` (or `pure_bf16`) is set, with f32 masters for the trained tensors
/// ([`crate::model::Model::trainable_dtype`]). The CPU keeps its tensors in f32 (candle's CPU
/// kernels have no bf16 arithmetic); with `bf16` and AMX-BF16 tiles the frozen linear products —
/// most of a LoRA step's work — and attention's run in bf16 on the tiles, 4–5× the f32 rate
/// there. Without tiles bf16 is not faster: AVX512-BF16's `vdpbf16ps` runs at half the f32 FMA
/// rate on the Xeons we measured, so the run stays f32 and the note says which units the CPU
/// has. `fp16` on the CPU is f32 (candle's f16 CPU matmul is slower than its f32).
pub fn train_precision(args: &protocol::TrainArgs, device: &Device) -> Precision {
    use candle_core::DType;
    let wanted = if args.bf16 || args.pure_bf16 {
        Some((DType::BF16, "bf16"))
    } else if args.fp16 {
        Some((DType::F16, "fp16"))
    } else {
        None
    };
    let f32 = |note| Precision {
        dtype: DType::F32,
        bf16_products: false,
        note,
    };
    match (wanted, device.is_cpu()) {
        (Some((DType::BF16, name)), true) if crate::ops::amx_bf16::available() => Precision {
            dtype: DType::F32,
            bf16_products: true,
            note: Some((
                false,
                format!("`{name}: true` on the CPU: frozen linear weights and attention multiply in bf16 on AMX tiles (f32 sums); norms, softmax, losses, adapters and the optimizer compute in f32"),
            )),
        },
        (Some((_, name)), true) => {
            let units = crate::sysinfo::bf16_units();
            f32(Some((
                true,
                format!(
                    "`{name}: true` has no effect on the CPU: training computes in f32 (this CPU has {}; {})",
                    units.describe(),
                    if name == "fp16" {
                        "the CPU's f16 products are slower than f32"
                    } else if units.amx_bf16 {
                        "the OS did not grant this process the AMX tile state"
                    } else {
                        "without AMX tiles bf16 is not faster than f32 here"
                    }
                ),
            )))
        }
        (Some((dtype, _)), false) => Precision {
            dtype,
            bf16_products: false,
            note: None,
        },
        (None, _) => f32(None),
    }
}

/// The device of a data-parallel rank: GPU `local_rank` on a GPU build with GPUs (each rank
/// its own), else the CPU.
pub fn device_for_rank(local_rank: usize) -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(local_rank) {
        return d;
    }
    let _ = local_rank;
    default_device()
}

/// How many CUDA GPUs this process sees (0 without the `cuda` feature or a driver).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    if let Ok(n) = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count() {
        return n.max(0) as usize;
    }
    0
}
