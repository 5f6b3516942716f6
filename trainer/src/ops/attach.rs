//! The attach trick: compute a result outside the autograd graph (fused or stable code), then
//! re-attach it to its input with a hand-written input gradient. The forward is one copy of
//! the precomputed result, which the op then drops: the graph keeps the input and the output,
//! never the result twice.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// A result computed before its op: the op's forward takes it out (the graph keeps the op's
/// inputs and its output, never a second copy of the result).
pub(super) struct Slot {
    name: &'static str,
    result: Mutex<Option<Tensor>>,
}

impl Slot {
    pub(super) fn new(name: &'static str, result: Tensor) -> Result<Self> {
        Ok(Self {
            name,
            result: Mutex::new(Some(result.contiguous()?)),
        })
    }

    fn take(&self) -> Result<Tensor> {
        let mut slot = self.result.lock().unwrap_or_else(|e| e.into_inner());
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: the forward ran twice", self.name)))
    }

    /// The result as the storage `pick` finds for this device (a copy of it, as an op's
    /// output must own its storage).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn take_as<S: BackendStorage>(&self, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        Self::copied(self.name, self.take()?, pick)
    }

    fn copied<S: BackendStorage>(
        name: &str,
        y: Tensor,
        pick: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (s, l) = y.storage_and_layout();
        match pick(&s) {
            Some(c) => precomputed(name, c, l),
            None => candle_core::bail!("{name}: result on another device"),
        }
    }

    /// On the CPU the result's storage is moved into the op when the result owns all of it
    /// (the usual case: a fresh product or kernel output), else copied.
    pub(super) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let shape = y.shape().clone();
        match owned_cpu_storage(y) {
            Ok(c) => Ok((c, shape)),
            Err(y) => Self::copied(self.name, y, |s| match s {
                Storage::Cpu(c) => Some(c),
                _ => None,
            }),
        }
    }

    #[cfg(feature = "cuda")]
    pub(super) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take_as(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "metal")]
    pub(super) fn metal(&self) -> Result<(candle_core::MetalStorage, Shape)> {
        self.take_as(|s| match s {
            Storage::Metal(c) => Some(c),
            _ => None,
        })
    }
}

/// The device forwards of a `CustomOp3` whose result waits in its `result` [`Slot`].
macro_rules! slot_forwards3 {
    () => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.result.cpu()
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.result.cuda()
        }

        #[cfg(feature = "metal")]
        fn metal_fwd(
            &self,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            self.result.metal()
        }
    };
}
pub(super) use slot_forwards3;

struct Attach {
    result: Slot,
    /// (input, gradient of the result) → gradient of the input.
    input_grad: InputGrad,
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        self.result.name
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.result.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.result.cuda()
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _s: &candle_core::MetalStorage,
        _l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.result.metal()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.input_grad)(x, grad)?))
    }
}

/// The CPU storage of a float tensor that holds all of it alone, in order from its start,
/// moved out without a copy; `Err` with the tensor back otherwise.
pub(crate) fn owned_cpu_storage(y: Tensor) -> std::result::Result<CpuStorage, Tensor> {
    let whole = {
        let (s, l) = y.storage_and_layout();
        let len = match &*s {
            Storage::Cpu(CpuStorage::F32(v)) => Some(v.len()),
            Storage::Cpu(CpuStorage::F64(v)) => Some(v.len()),
            Storage::Cpu(CpuStorage::BF16(v)) => Some(v.len()),
            Storage::Cpu(CpuStorage::F16(v)) => Some(v.len()),
            _ => None,
        };
        l.is_contiguous() && l.start_offset() == 0 && len == Some(l.shape().elem_count())
    };
    if !whole {
        return Err(y);
    }
    match y.try_into_storage() {
        Ok((Storage::Cpu(c), _)) => Ok(c),
        // Checked above to be a CPU storage; rebuilt as it was (contiguous from its start),
        // detached: the callers take results computed outside the graph.
        Ok((s, l)) => Err(Tensor::from_storage(
            s,
            l.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        )),
        Err(y) => Err(y),
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

/// Whether this build has a forward for ops on `t`'s device.
pub(super) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu()
        || (cfg!(feature = "cuda") && t.device().is_cuda())
        || (cfg!(feature = "metal") && t.device().is_metal())
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
    if !supported(x) {
        return Ok(None);
    }
    let op = Attach {
        result: Slot::new(name, y0)?,
        input_grad: Box::new(input_grad),
    };
    Ok(Some(x.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn buffer(t: &Tensor) -> usize {
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(CpuStorage::F32(v)) => v[l.start_offset()..].as_ptr() as usize,
            _ => panic!("an f32 CPU tensor"),
        }
    }

    /// A result that owns all of its storage becomes the op's output without a copy; one that
    /// shares its storage, or views part of a larger one, is copied; the values and the input
    /// gradient are the same either way.
    #[test]
    fn a_result_that_owns_its_storage_moves_into_the_output() {
        let dev = Device::Cpu;
        let x = Var::new(&[1f32, 2., 3.], &dev).unwrap();
        let grad = |x: &Tensor, g: &Tensor| x * g;
        let owned = Tensor::new(&[4f32, 5., 6.], &dev).unwrap();
        let shared = Tensor::new(&[4f32, 5., 6.], &dev).unwrap();
        let view = Tensor::new(&[4f32, 5., 6., 7.], &dev)
            .unwrap()
            .narrow(0, 0, 3)
            .unwrap();
        for (name, y0, keep, moved) in [
            ("owned", owned, None, true),
            ("shared", shared.clone(), Some(shared), false),
            ("view", view, None, false),
        ] {
            let before = buffer(&y0);
            let y = attach(name, x.as_tensor(), y0, grad).unwrap().unwrap();
            assert_eq!(buffer(&y) == before, moved, "{name}");
            assert_eq!(y.to_vec1::<f32>().unwrap(), [4., 5., 6.], "{name}");
            let g = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(
                g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
                [1., 2., 3.],
                "{name}"
            );
            if let Some(keep) = keep {
                assert_eq!(keep.to_vec1::<f32>().unwrap(), [4., 5., 6.]);
            }
        }
    }
}
