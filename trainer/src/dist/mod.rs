//! Data parallelism: one training process per device (a *rank*), each taking its shard of every
//! global batch, with the gradients summed across ranks before each optimizer step so every
//! rank makes the same update.
//!
//! The collective operations come from existing engines, never from sockets of our own: MPI
//! for CPUs and clusters (`mpi` cargo feature, Open MPI through the `mpi` crate) and NCCL for
//! CUDA GPUs (`cuda` feature, through cudarc). One process is the [`World::single`] world,
//! whose operations are the identity. [`ranks`] reads a rank's place from what its launcher
//! set (our own `--nproc-per-node`, torchrun, `mpirun`, Slurm's `srun`); [`World::connect`]
//! joins the others; every collective is watched by a timeout (`ddp_timeout`), so a rank whose
//! peer died ends with an error instead of waiting forever.

pub mod ranks;
mod watchdog;

#[cfg(feature = "mpi")]
mod mpi_engine;
#[cfg(feature = "cuda")]
mod nccl_engine;
#[cfg(feature = "cuda")]
mod rendezvous;

use std::fmt;
use std::time::Duration;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

pub use ranks::{ranks, Launcher, RankEnv};
use watchdog::Watchdog;

/// What carries a world's collective operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One process: nothing to exchange.
    Single,
    /// MPI (CPU ranks; any interconnect Open MPI drives).
    Mpi,
    /// NCCL (CUDA GPUs; NVLink, PCIe, InfiniBand).
    Nccl,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Single => "single process",
            Engine::Mpi => "MPI",
            Engine::Nccl => "NCCL",
        })
    }
}

/// The operations data-parallel training needs from an engine. Every rank calls the same
/// operations in the same order with buffers of the same shape.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn engine(&self) -> Engine;
    /// The element-wise sum over ranks of a 1-D f32 or f64 tensor; every rank gets the same
    /// result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0's value of a 1-D tensor, on every rank.
    fn broadcast(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's bytes (of any length), in rank order.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// One process alone.
struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> Engine {
        Engine::Single
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}

/// Rank `rank`'s part of `global`: its run of `per_rank` items, cut short at the end.
fn rank_slice<T>(global: &[T], per_rank: usize, rank: usize) -> &[T] {
    let start = (rank * per_rank).min(global.len());
    let end = (start + per_rank).min(global.len());
    &global[start..end]
}

/// The dtype tensors of `dtypes` travel in: f64 when any is f64 (tests), else f32 (the
/// trained tensors' masters).
fn wire_dtype(dtypes: impl IntoIterator<Item = DType>) -> DType {
    if dtypes.into_iter().any(|d| d == DType::F64) {
        DType::F64
    } else {
        DType::F32
    }
}

/// Elements per all-reduce of gradients: larger gradient sets go in buckets of this size
/// (100 MB of f32), so the flat copy never doubles a full fine-tune's gradient memory.
const BUCKET_ELEMS: usize = 25 << 20;

/// The ranks of a run and how they talk: what the training loop sees of data parallelism.
pub struct World {
    engine: Box<dyn Collective>,
    watchdog: Option<Watchdog>,
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

impl World {
    /// One process, no exchange.
    pub fn single() -> Self {
        Self {
            engine: Box::new(Alone),
            watchdog: None,
        }
    }

    /// Joins the ranks `env` describes with the engine for `device` (MPI on the CPU, NCCL on a
    /// CUDA GPU); each collective waits at most `timeout` for the others.
    pub fn connect(env: &RankEnv, device: &Device, timeout: Duration) -> Result<Self> {
        if env.world_size <= 1 {
            return Ok(Self::single());
        }
        let watchdog = Watchdog::start(env.rank, timeout);
        let engine: Box<dyn Collective> = match device {
            Device::Cpu => Self::mpi(env)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let _armed = watchdog.arm("joining the NCCL ranks");
                Box::new(nccl_engine::Nccl::connect(env, d, timeout)?)
            }
            #[allow(unreachable_patterns)]
            other => bail!(
                "data-parallel training runs on CPUs (MPI) and CUDA GPUs (NCCL), not on {:?}",
                other.location()
            ),
        };
        if engine.world_size() != env.world_size || engine.rank() != env.rank {
            bail!(
                "the launcher says rank {} of {}, but the {} engine says rank {} of {}",
                env.rank,
                env.world_size,
                engine.engine(),
                engine.rank(),
                engine.world_size()
            );
        }
        Ok(Self {
            engine,
            watchdog: Some(watchdog),
        })
    }

    #[cfg(feature = "mpi")]
    fn mpi(env: &RankEnv) -> Result<Box<dyn Collective>> {
        if !env.launcher.starts_mpi() {
            bail!(
                "{} ranks on the CPU talk through MPI, which {} does not start: launch them with `mpirun -np {} llamafactory train …` or `llamafactory train … --nproc-per-node {}`",
                env.world_size,
                env.launcher,
                env.world_size,
                env.world_size
            );
        }
        Ok(Box::new(mpi_engine::Mpi::init()?))
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(env: &RankEnv) -> Result<Box<dyn Collective>> {
        bail!(
            "{} set {} ranks, but this build has no MPI engine for CPU ranks: build with `cargo build --release --features mpi` (Open MPI: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`)",
            env.launcher,
            env.world_size
        )
    }

    pub fn rank(&self) -> usize {
        self.engine.rank()
    }

    pub fn size(&self) -> usize {
        self.engine.world_size()
    }

    pub fn engine(&self) -> Engine {
        self.engine.engine()
    }

    /// Rank 0, which alone reports and writes files.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's part of a global batch: the `rank`-th run of `len / world` consecutive
    /// examples (a global batch is `per_device_train_batch_size × world` examples; a short
    /// last batch leaves the last ranks fewer, possibly none).
    pub fn shard<'a, T>(&self, global: &'a [T], per_rank: usize) -> &'a [T] {
        rank_slice(global, per_rank, self.rank())
    }

    fn armed(&self, what: &'static str) -> Option<watchdog::Armed<'_>> {
        self.watchdog.as_ref().map(|w| w.arm(what))
    }

    /// Each rank's values, in rank order.
    pub fn gather_f64(&self, mine: &[f64], what: &'static str) -> Result<Vec<Vec<f64>>> {
        if self.size() == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        let _armed = self.armed(what);
        let all = self.engine.all_gather_bytes(&bytes)?;
        Ok(all
            .iter()
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            })
            .collect())
    }

    /// The sum over ranks of each value, added in rank order (the same on every rank).
    pub fn sum_f64(&self, mine: &[f64], what: &'static str) -> Result<Vec<f64>> {
        let all = self.gather_f64(mine, what)?;
        let mut sum = vec![0.0; mine.len()];
        for values in &all {
            if values.len() != sum.len() {
                bail!(
                    "ranks disagree on what `{what}` sums ({} vs {} values)",
                    values.len(),
                    sum.len()
                );
            }
            for (s, v) in sum.iter_mut().zip(values) {
                *s += v;
            }
        }
        Ok(sum)
    }

    /// Whether any rank says yes (a stop request on one rank stops all at the same step).
    pub fn any(&self, mine: bool, what: &'static str) -> Result<bool> {
        Ok(self.sum_f64(&[f64::from(u8::from(mine))], what)?[0] > 0.0)
    }

    /// Each rank's JSON value, in rank order.
    pub fn gather_json(
        &self,
        mine: &serde_json::Value,
        what: &'static str,
    ) -> Result<Vec<serde_json::Value>> {
        if self.size() == 1 {
            return Ok(vec![mine.clone()]);
        }
        let _armed = self.armed(what);
        let all = self
            .engine
            .all_gather_bytes(serde_json::to_string(mine)?.as_bytes())?;
        all.iter().map(|b| Ok(serde_json::from_slice(b)?)).collect()
    }

    /// Sums gradients over ranks, in buckets of at most [`BUCKET_ELEMS`] elements. A tensor no
    /// rank has a gradient for stays `None`; one only some ranks have (a rank whose shard was
    /// empty) counts as zeros on the others.
    pub fn all_reduce_gradients(&self, grads: &mut [Option<Tensor>], like: &[Var]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        // Which tensors have a gradient anywhere: one flag per tensor, summed.
        let mine: Vec<f64> = grads
            .iter()
            .map(|g| f64::from(u8::from(g.is_some())))
            .collect();
        let present = self.sum_f64(&mine, "gradient presence")?;
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut elems = 0;
            while end < grads.len()
                && (end == start || elems + like[end].elem_count() <= BUCKET_ELEMS)
            {
                elems += like[end].elem_count();
                end += 1;
            }
            self.reduce_bucket(
                &mut grads[start..end],
                &like[start..end],
                &present[start..end],
            )?;
            start = end;
        }
        Ok(())
    }

    fn reduce_bucket(
        &self,
        grads: &mut [Option<Tensor>],
        like: &[Var],
        present: &[f64],
    ) -> Result<()> {
        let flat_dtype = wire_dtype(like.iter().map(|v| v.dtype()));
        let mut parts = Vec::new();
        for ((g, v), &p) in grads.iter().zip(like).zip(present) {
            if p == 0.0 {
                continue;
            }
            let part = match g {
                Some(g) => g.flatten_all()?.to_dtype(flat_dtype)?,
                None => Tensor::zeros(v.elem_count(), flat_dtype, v.device())?,
            };
            parts.push(part);
        }
        if parts.is_empty() {
            return Ok(());
        }
        let flat = Tensor::cat(&parts, 0)?;
        drop(parts);
        let summed = {
            let _armed = self.armed("gradients");
            self.engine.all_reduce_sum(&flat)?
        };
        let mut offset = 0;
        for ((g, v), &p) in grads.iter_mut().zip(like).zip(present) {
            if p == 0.0 {
                continue;
            }
            let n = v.elem_count();
            *g = Some(
                summed
                    .narrow(0, offset, n)?
                    .reshape(v.shape())?
                    .to_dtype(v.dtype())?,
            );
            offset += n;
        }
        Ok(())
    }

    /// Sets every tensor to rank 0's value: initial weights (LoRA's random A, a value head)
    /// are the same on every rank before the first step.
    pub fn broadcast_vars(&self, vars: &[Var]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        for v in vars {
            let dtype = v.dtype();
            let flat = v.as_tensor().flatten_all()?.to_dtype(wire_dtype([dtype]))?;
            let got = {
                let _armed = self.armed("initial weights");
                self.engine.broadcast(&flat)?
            };
            v.set(&got.reshape(v.shape())?.to_dtype(dtype)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_a_global_batch_in_rank_order_and_leave_late_ranks_short() {
        let global = [10, 11, 12, 13, 14];
        assert_eq!(rank_slice(&global, 2, 0), [10, 11]);
        assert_eq!(rank_slice(&global, 2, 1), [12, 13]);
        assert_eq!(rank_slice(&global, 2, 2), [14]);
        assert!(rank_slice(&global[..3], 2, 2).is_empty());
    }
}
