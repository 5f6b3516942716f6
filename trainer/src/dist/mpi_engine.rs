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

    /// `op` in place on `data`, in pieces.
    fn apply<T: Equivalence + Copy>(&self, op: HostOp, data: &mut [T]) {
        let root = self.world.process_at_rank(0);
        for piece in data.chunks_mut(PIECE) {
            match op {
                HostOp::Sum => {
                    let send = piece.to_vec();
                    self.world
                        .all_reduce_into(&send[..], piece, SystemOperation::sum());
                }
                HostOp::Broadcast => root.broadcast_into(piece),
            }
        }
    }

    /// `op` on a 1-D tensor through host memory: f64 stays f64, anything else goes as f32.
    fn on_host(&self, t: &Tensor, op: HostOp) -> Result<Tensor> {
        let device = t.device().clone();
        Ok(match t.dtype() {
            DType::F64 => {
                let mut v = t.to_vec1::<f64>()?;
                self.apply(op, &mut v);
                Tensor::from_vec(v, t.dims(), &device)?
            }
            _ => {
                let mut v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                self.apply(op, &mut v);
                Tensor::from_vec(v, t.dims(), &device)?.to_dtype(t.dtype())?
            }
        })
    }
}

#[derive(Clone, Copy)]
enum HostOp {
    Sum,
    Broadcast,
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
        self.on_host(t, HostOp::Sum)
    }

    fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        self.on_host(t, HostOp::Broadcast)
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
