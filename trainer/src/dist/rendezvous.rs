//! How NCCL's ranks find each other: rank 0 makes NCCL's unique id and hands it to every other
//! rank over a TCP connection to `MASTER_ADDR:MASTER_PORT` (what torchrun's store does). Only
//! these 128 bytes cross this connection; the gradients go through NCCL.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::RankEnv;

const MAGIC: &[u8; 8] = b"LFNCCL01";
pub(super) const ID_BYTES: usize = 128;

/// Rank 0: `id` to every other rank. Others: rank 0's id. Gives up after `timeout`.
pub(super) fn share_id(
    env: &RankEnv,
    id: Option<[u8; ID_BYTES]>,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let at = format!("{}:{}", env.master_addr, env.master_port);
    if env.rank == 0 {
        let id = id.context("rank 0 shares an id it made")?;
        let listener = TcpListener::bind(&at)
            .with_context(|| format!("rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {at}"))?;
        listener.set_nonblocking(true)?;
        let mut served = 0;
        while served + 1 < env.world_size {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.write_all(MAGIC)?;
                    s.write_all(&id)?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!(
                            "rank 0: only {served} of {} other ranks connected to {at} within {} s",
                            env.world_size - 1,
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("rank 0: accepting on {at}")),
            }
        }
        return Ok(id);
    }
    let addr = at
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve MASTER_ADDR:MASTER_PORT = {at}"))?
        .next()
        .with_context(|| format!("{at} resolves to no address"))?;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1)),
                ))?;
                let mut magic = [0u8; 8];
                s.read_exact(&mut magic)
                    .with_context(|| format!("rank {}: reading from {at}", env.rank))?;
                if &magic != MAGIC {
                    bail!("rank {}: {at} is not a llamafactory rank 0 (another service holds MASTER_PORT?)", env.rank);
                }
                let mut id = [0u8; ID_BYTES];
                s.read_exact(&mut id)?;
                return Ok(id);
            }
            Err(e) => {
                if Instant::now() > deadline {
                    return Err(e).with_context(|| {
                        format!(
                            "rank {}: rank 0 did not answer at {at} within {} s",
                            env.rank,
                            timeout.as_secs()
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Launcher;

    #[test]
    fn every_rank_gets_rank_zero_s_id() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = |rank| RankEnv {
            rank,
            world_size: 3,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
        };
        let id = [7u8; ID_BYTES];
        let others: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    share_id(&env(r), None, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        assert_eq!(
            share_id(&env(0), Some(id), Duration::from_secs(20)).unwrap(),
            id
        );
        for o in others {
            assert_eq!(o.join().unwrap(), id);
        }
    }
}
