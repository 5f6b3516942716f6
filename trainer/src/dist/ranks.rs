//! A rank's place in its run, from what its launcher set: our own launcher and torchrun
//! (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), Open MPI's `mpirun`
//! (`OMPI_COMM_WORLD_*`), MPICH-style PMI (`PMI_RANK`, `PMI_SIZE`), or a Slurm job step
//! (`srun`: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`).

use std::fmt;

use anyhow::{bail, Context, Result};

/// Who started the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `RANK`/`WORLD_SIZE`: torchrun, or `llamafactory train --nproc-per-node` on GPUs.
    Torchrun,
    /// Open MPI's `mpirun` (what `--nproc-per-node` runs for CPU ranks).
    Mpirun,
    /// A PMI process manager (MPICH's `mpiexec`, Hydra).
    Pmi,
    /// `srun` in a Slurm allocation.
    Slurm,
}

impl Launcher {
    /// Whether the ranks were started by something MPI can join through.
    pub fn starts_mpi(self) -> bool {
        !matches!(self, Launcher::Torchrun)
    }
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Torchrun => "torchrun-style variables (RANK, WORLD_SIZE)",
            Launcher::Mpirun => "mpirun",
            Launcher::Pmi => "the PMI process manager",
            Launcher::Slurm => "srun",
        })
    }
}

/// One rank's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Its index on its machine: the GPU it uses.
    pub local_rank: usize,
    /// Where rank 0 shares what the ranks need to connect (NCCL's unique id).
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

impl RankEnv {
    /// One process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            launcher: Launcher::Torchrun,
        }
    }
}

/// This process's place, read from the environment; one process alone when no launcher set
/// anything.
pub fn ranks() -> Result<RankEnv> {
    ranks_from(&|k| std::env::var(k).ok())
}

/// [`ranks`] over any variable lookup (tests pass a map).
pub fn ranks_from(var: &dyn Fn(&str) -> Option<String>) -> Result<RankEnv> {
    let num = |k: &str| -> Result<Option<usize>> {
        var(k)
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("the environment variable {k}={v:?} is not a number"))
            })
            .transpose()
    };
    let found = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
        Some((rank, world, num("LOCAL_RANK")?, Launcher::Torchrun))
    } else if let (Some(rank), Some(world)) =
        (num("OMPI_COMM_WORLD_RANK")?, num("OMPI_COMM_WORLD_SIZE")?)
    {
        Some((
            rank,
            world,
            num("OMPI_COMM_WORLD_LOCAL_RANK")?,
            Launcher::Mpirun,
        ))
    } else if let (Some(rank), Some(world)) = (num("PMI_RANK")?, num("PMI_SIZE")?) {
        Some((rank, world, num("MPI_LOCALRANKID")?, Launcher::Pmi))
    } else if let (Some(rank), Some(world)) =
        // SLURM_STEP_NUM_TASKS is set by `srun` only: a batch script itself is no rank.
        (num("SLURM_PROCID")?, num("SLURM_STEP_NUM_TASKS")?)
    {
        Some((rank, world, num("SLURM_LOCALID")?, Launcher::Slurm))
    } else {
        None
    };
    let Some((rank, world_size, local_rank, launcher)) = found else {
        return Ok(RankEnv::single());
    };
    if world_size == 0 || rank >= world_size {
        bail!("{launcher} says rank {rank} of a world of {world_size}");
    }
    let master_port = match num("MASTER_PORT")? {
        Some(p) => u16::try_from(p).with_context(|| format!("MASTER_PORT={p} is not a port"))?,
        None => 29500,
    };
    Ok(RankEnv {
        rank,
        world_size,
        local_rank: local_rank.unwrap_or(rank),
        master_addr: var("MASTER_ADDR")
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "127.0.0.1".into()),
        master_port,
        launcher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<RankEnv> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ranks_from(&|k| map.get(k).cloned())
    }

    #[test]
    fn each_launcher_s_variables_give_the_rank() {
        assert_eq!(from(&[]).unwrap(), RankEnv::single());
        let t = from(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world_size, t.local_rank, t.launcher),
            (3, 4, 1, Launcher::Torchrun)
        );
        assert_eq!((t.master_addr.as_str(), t.master_port), ("10.0.0.1", 29400));
        let m = from(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(
            (m.rank, m.world_size, m.local_rank, m.launcher),
            (1, 2, 1, Launcher::Mpirun)
        );
        let s = from(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.launcher),
            (5, 8, 1, Launcher::Slurm)
        );
        // A Slurm batch script (no job step) is one process.
        assert_eq!(
            from(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(),
            RankEnv::single()
        );
    }

    #[test]
    fn impossible_places_are_errors_naming_the_variable() {
        let e = from(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("rank 2 of a world of 2"), "{e:#}");
        let e = from(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(format!("{e:#}").contains("RANK=\"x\""), "{e:#}");
    }
}
