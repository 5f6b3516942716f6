//! One server per work dir: an exclusive lock on `<workdir>/llamaboard.lock`, held for the
//! server's life (the kernel drops it when the process dies, however it dies). The file names
//! the holder's PID and address, so a second server can say who is there.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub struct WorkdirLock {
    file: File,
    path: PathBuf,
}

impl WorkdirLock {
    /// Takes the lock, or fails naming the server that holds it.
    pub fn acquire(workdir: &Path) -> Result<Self> {
        let path = workdir.join("llamaboard.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "another LlamaBoard server is using the work dir {} ({}); stop it, or start this one with another --workdir",
                    workdir.display(),
                    if holder.is_empty() {
                        "it has not said where it listens yet".to_string()
                    } else {
                        holder.to_string()
                    }
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        let mut lock = Self { file, path };
        lock.describe(&format!("pid {}", std::process::id()))?;
        Ok(lock)
    }

    /// Replaces what the lock file says about its holder (`pid 123, http://127.0.0.1:7860`).
    pub fn describe(&mut self, holder: &str) -> Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        writeln!(self.file, "{holder}")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = WorkdirLock::acquire(dir.path()).unwrap();
        first.describe("pid 1, http://127.0.0.1:7860").unwrap();
        let e = WorkdirLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("another LlamaBoard server") && e.contains("http://127.0.0.1:7860"),
            "{e}"
        );
        drop(first);
        assert!(WorkdirLock::acquire(dir.path()).is_ok(), "released on drop");
    }
}
