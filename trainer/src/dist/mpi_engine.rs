//! The MPI engine (CPU ranks): Open MPI through the `mpi` crate. Tensors are summed and sent
//! from host memory in pieces MPI's 32-bit counts can describe.

use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

use super::{Collective, Engine};

/// Elements per MPI call.
const PIECE: usize = 1 << 28;

pub(super) struct Mpi {
    world: SimpleCommunicator,
    /// Finalizes MPI when dropped (after `world`, declared first).
    _universe: mpi::environment::Universe,
}

impl Mpi {
    pub(super) fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| anyhow!("MPI was already initialized in this process"))?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }

    fn sum<T: Equivalence + Copy + Default>(&self, data: &mut [T]) {
        for piece in data.chunks_mut(PIECE) {
            let send = piece.to_vec();
            self.world
                .all_reduce_into(&send[..], piece, SystemOperation::sum());
        }
    }

    fn bcast<T: Equivalence>(&self, data: &mut [T]) {
        let root = self.world.process_at_rank(0);
        for piece in data.chunks_mut(PIECE) {
            root.broadcast_into(piece);
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn engine(&self) -> Engine {
        Engine::Mpi
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let device = t.device().clone();
        match t.dtype() {
            DType::F64 => {
                let mut v = t.to_vec1::<f64>()?;
                self.sum(&mut v);
                Ok(Tensor::from_vec(v, t.dims(), &device)?)
            }
            _ => {
                let mut v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                self.sum(&mut v);
                Ok(Tensor::from_vec(v, t.dims(), &device)?.to_dtype(t.dtype())?)
            }
        }
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        let device = t.device().clone();
        match t.dtype() {
            DType::F64 => {
                let mut v = t.to_vec1::<f64>()?;
                self.bcast(&mut v);
                Ok(Tensor::from_vec(v, t.dims(), &device)?)
            }
            _ => {
                let mut v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                self.bcast(&mut v);
                Ok(Tensor::from_vec(v, t.dims(), &device)?.to_dtype(t.dtype())?)
            }
        }
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.world_size();
        let len = Count::try_from(mine.len())
            .map_err(|_| anyhow!("{} bytes are too many for one MPI gather", mine.len()))?;
        let mut counts: Vec<Count> = vec![0; n];
        self.world.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut partition);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }
}
