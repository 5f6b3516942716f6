//! The attach trick: compute a result outside the autograd graph (fused or stable code), then
//! re-attach it to its input with a hand-written input gradient. The forward is one copy of
//! the precomputed result.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

struct Attach {
    name: &'static str,
    /// (input, gradient of the result) → gradient of the input.
    input_grad: InputGrad,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        precomputed(self.name, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        precomputed(self.name, s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _s1: &candle_core::MetalStorage,
        _l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        precomputed(self.name, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y0: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.input_grad)(x, grad)?), None))
    }
}

/// The forward of ops whose result was computed before the op, on any device: a copy of
/// that result.
pub(super) fn precomputed<S: BackendStorage>(op: &str, s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{op}: precomputed result must be contiguous");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// `y0` (computed from `x` outside the graph) as a differentiable function of `x` whose
/// gradient is `input_grad(x, dy)`, on the CPU and the GPU back-ends built in; `None` on a
/// device this build has no forward for (callers then use their composed version).
pub fn attach(
    name: &'static str,
    x: &Tensor,
    y0: Tensor,
    input_grad: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Option<Tensor>> {
    let supported = x.device().is_cpu()
        || (cfg!(feature = "cuda") && x.device().is_cuda())
        || (cfg!(feature = "metal") && x.device().is_metal());
    if !supported {
        return Ok(None);
    }
    let y0 = y0.contiguous()?;
    let op = Attach {
        name,
        input_grad: Box::new(input_grad),
    };
    Ok(Some(
        x.apply_op2_arc(&y0, std::sync::Arc::new(Box::new(op)))?,
    ))
}
