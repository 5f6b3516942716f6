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

/// The compute dtype of a training run on `device`, and a warning when the request cannot be
/// honoured. GPUs compute in bf16/f16 when `bf16`/`fp16` (or `pure_bf16`) is set, with f32
/// masters for the trained tensors ([`crate::model::Model::trainable_dtype`]); the CPU always
/// trains in f32: candle's CPU matmul has no bf16 kernel (it widens to f32) and its f16 one is
/// slower than f32. Only AMX tiles would make bf16 faster there: AVX512-BF16's `vdpbf16ps`
/// runs at half the f32 FMA rate on the Xeon we measured (80–86 against 165–175 GFLOP/s per
/// core), and an AMX kernel is not built yet — the warning says which the CPU has.
pub fn train_dtype(
    args: &protocol::TrainArgs,
    device: &Device,
) -> (candle_core::DType, Option<String>) {
    use candle_core::DType;
    let wanted = if args.bf16 || args.pure_bf16 {
        Some((DType::BF16, "bf16"))
    } else if args.fp16 {
        Some((DType::F16, "fp16"))
    } else {
        None
    };
    match (wanted, device.is_cpu()) {
        (Some((_, name)), true) => {
            let units = crate::sysinfo::bf16_units();
            (
            DType::F32,
            Some(format!(
                "`{name}: true` has no effect on the CPU: training computes in f32 (this CPU has {}; {})",
                units.describe(),
                if units.amx_bf16 {
                    "this build has no AMX kernel yet"
                } else {
                    "without AMX tiles bf16 is not faster than f32 here"
                }
            )),
            )
        }
        (Some((dtype, _)), false) => (dtype, None),
        (None, _) => (DType::F32, None),
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
