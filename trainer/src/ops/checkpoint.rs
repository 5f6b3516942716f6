//! Gradient checkpointing: a block's output enters the graph without the block's activations;
//! the backward recomputes the block (with its own small graph) when its gradient arrives.
//!
//! A CustomOp's backward can only return gradients for its (at most three) inputs, so the
//! gradients of the block's trainable tensors travel through a [`GradSink`] that the caller
//! merges into the outer gradient store after `backward()`.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `(input, gradient of the output) → gradient of the input`; pushes the gradients of the
/// block's trainable tensors into the sink.
pub type Recompute = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Gradients of trainable tensors computed inside checkpointed blocks during a backward pass.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl GradSink {
    pub fn push(&self, tensor: Tensor, grad: Tensor) {
        self.lock().push((tensor, grad));
    }

    /// Adds what the checkpointed blocks produced to `store` and empties the sink.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        for (t, g) in self.lock().drain(..) {
            let sum = match store.get(&t) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            store.insert(&t, sum);
        }
        Ok(())
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>> {
        // A panic in another backward cannot leave the list half-written: recover it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Checkpoint {
    recompute: Recompute,
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::attach::precomputed(self.name(), s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::attach::precomputed(self.name(), s2, l2)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _s1: &candle_core::MetalStorage,
        _l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        _s3: &candle_core::MetalStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        super::attach::precomputed(self.name(), s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y0: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.recompute)(x, grad)?), None, None))
    }
}

/// `y0`, computed from `x` by a block whose graph was dropped, as a node of the graph.
/// `anchor` is one of the block's trainable tensors: it keeps the node in the graph when `x`
/// itself is not tracked (the first block after a frozen embedding). Its gradient, like those
/// of the block's other trainable tensors, goes through the sink, not through this node.
pub fn checkpoint(x: &Tensor, y0: Tensor, anchor: &Tensor, recompute: Recompute) -> Result<Tensor> {
    let y0 = y0.contiguous()?;
    x.apply_op3_arc(&y0, anchor, Arc::new(Box::new(Checkpoint { recompute })))
}
