//! The NCCL engine (CUDA ranks, one GPU each), through cudarc. Sums and broadcasts run on the
//! device buffers themselves; only the small byte gathers go through host memory.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::rendezvous::{share_id, ID_BYTES};
use super::{Collective, Engine, RankEnv};

pub(super) struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl Nccl {
    pub(super) fn connect(env: &RankEnv, device: &CudaDevice, timeout: Duration) -> Result<Self> {
        let made = if env.rank == 0 {
            let id = Id::new().map_err(|e| anyhow!("NCCL cannot make a unique id: {e:?}"))?;
            Some(id.internal().map(|c| c as u8))
        } else {
            None
        };
        let id = share_id(env, made, timeout)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let stream = device.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), env.rank, env.world_size, id).map_err(|e| {
            anyhow!(
                "NCCL cannot join rank {} of {}: {e:?}",
                env.rank,
                env.world_size
            )
        })?;
        Ok(Self {
            comm,
            stream,
            rank: env.rank,
            world: env.world_size,
        })
    }
}

/// A sum or broadcast over ranks as an op on a tensor's CUDA buffer.
struct OverRanks<'a> {
    comm: &'a Comm,
    broadcast: bool,
}

impl OverRanks<'_> {
    fn run<T>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let src = s.as_cuda_slice::<T>()?;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("a collective needs a contiguous tensor");
        };
        let src = src.slice(start..end);
        let dev = s.device().clone();
        let mut dst = dev
            .cuda_stream()
            .alloc_zeros::<T>(end - start)
            .map_err(candle_core::Error::wrap)?;
        let done = if self.broadcast {
            self.comm.broadcast(Some(&src), &mut dst, 0)
        } else {
            self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
        };
        done.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for OverRanks<'_> {
    fn name(&self) -> &'static str {
        if self.broadcast {
            "nccl-broadcast"
        } else {
            "nccl-all-reduce"
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL engine sums CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, l)?,
            DType::F64 => self.run::<f64>(s, l)?,
            DType::BF16 => self.run::<half::bf16>(s, l)?,
            other => candle_core::bail!("the NCCL engine does not sum {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn engine(&self) -> Engine {
        Engine::Nccl
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = OverRanks {
            comm: &self.comm,
            broadcast: false,
        };
        Ok(t.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let op = OverRanks {
            comm: &self.comm,
            broadcast: true,
        };
        Ok(t.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let nccl = |e| anyhow!("NCCL: {e:?}");
        // Lengths first, then every rank's bytes padded to the longest.
        let len = self.stream.clone_htod(&[mine.len() as u64])?;
        let mut lens = self.stream.alloc_zeros::<u64>(self.world)?;
        self.comm.all_gather(&len, &mut lens).map_err(nccl)?;
        let lens: Vec<u64> = self.stream.clone_dtoh(&lens)?;
        let longest = lens.iter().copied().max().unwrap_or(0) as usize;
        if longest == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        let mut padded = mine.to_vec();
        padded.resize(longest, 0);
        let send = self.stream.clone_htod(&padded)?;
        let mut all = self.stream.alloc_zeros::<u8>(longest * self.world)?;
        self.comm.all_gather(&send, &mut all).map_err(nccl)?;
        let all: Vec<u8> = self.stream.clone_dtoh(&all)?;
        if all.len() != longest * self.world {
            bail!(
                "NCCL gathered {} bytes, not {}",
                all.len(),
                longest * self.world
            );
        }
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * longest..r * longest + n as usize].to_vec())
            .collect())
    }
}

#[allow(dead_code)]
const _: () = assert!(ID_BYTES == 128);
