//! Weights & Biases (`report_to: wandb`) in offline mode (`WANDB_MODE=offline`): the run directory
//! wandb itself writes, `wandb/offline-run-<date>_<time>-<id>/run-<id>.wandb`, which `wandb sync`
//! uploads later. The `.wandb` file is wandb's record log: a `:W&B` header, then `wandb.Record`
//! protocol buffers in LevelDB's log framing (32 KiB blocks; each piece behind a CRC-32 of its
//! type and bytes, its length and its type; records split across blocks as FIRST / MIDDLE / LAST).
//!
//! What is logged is what transformers' `WandbCallback` logs: the run (project `WANDB_PROJECT`,
//! default `huggingface`; entity `WANDB_ENTITY`; name `run_name`; id `WANDB_RUN_ID` or a new one)
//! with the arguments and the model's config as its config; each log line as a history row,
//! keys rewritten `train/…` / `eval/…` with `train/global_step`; the end-of-training figures
//! (`train_runtime`, `train_loss`, …) in the summary; the exit code. Online mode needs the
//! network and an API key, which this engine does not use: it is refused with a warning.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;
use serde_json::{Map, Value};

const BLOCK: usize = 32 * 1024;
const HEADER: usize = 7;
const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// The file's first bytes: `:W&B`, magic 0xBEE1 (little-endian), version 0.
pub const FILE_HEADER: [u8; 7] = [b':', b'W', b'&', b'B', 0xE1, 0xBE, 0];

/// Appends records in wandb's framing.
pub struct RecordLog<W: Write> {
    out: W,
    /// Bytes written so far, the file header included (block positions count from the start).
    offset: usize,
}

impl<W: Write> RecordLog<W> {
    pub fn new(mut out: W) -> Result<Self> {
        out.write_all(&FILE_HEADER)?;
        Ok(Self {
            out,
            offset: FILE_HEADER.len(),
        })
    }

    fn piece(&mut self, kind: u8, data: &[u8]) -> Result<()> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(data);
        self.out.write_all(&crc.finalize().to_le_bytes())?;
        self.out.write_all(&(data.len() as u16).to_le_bytes())?;
        self.out.write_all(&[kind])?;
        self.out.write_all(data)?;
        self.offset += HEADER + data.len();
        Ok(())
    }

    /// One record's bytes, split across blocks as needed.
    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        let mut left = BLOCK - self.offset % BLOCK;
        if left < HEADER {
            self.out.write_all(&vec![0u8; left])?;
            self.offset += left;
            left = BLOCK;
        }
        if data.len() + HEADER <= left {
            return self.piece(FULL, data);
        }
        let (head, mut rest) = data.split_at(left - HEADER);
        self.piece(FIRST, head)?;
        while rest.len() > BLOCK - HEADER {
            let (mid, tail) = rest.split_at(BLOCK - HEADER);
            self.piece(MIDDLE, mid)?;
            rest = tail;
        }
        self.piece(LAST, rest)
    }

    pub fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }
}

/// The records of a run file's bytes (checking each piece's CRC): what `wandb sync` reads.
pub fn read_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    anyhow::ensure!(bytes.starts_with(&FILE_HEADER), "not a W&B run file");
    let (mut at, mut out, mut partial) = (FILE_HEADER.len(), Vec::new(), Vec::new());
    while at + HEADER <= bytes.len() {
        let left = BLOCK - at % BLOCK;
        if left < HEADER {
            at += left;
            continue;
        }
        let crc = u32::from_le_bytes(bytes[at..at + 4].try_into()?);
        let len = usize::from(u16::from_le_bytes(bytes[at + 4..at + 6].try_into()?));
        let kind = bytes[at + 6];
        let data = bytes
            .get(at + HEADER..at + HEADER + len)
            .ok_or_else(|| anyhow::anyhow!("record at byte {at} runs past the end"))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(data);
        anyhow::ensure!(h.finalize() == crc, "record at byte {at}: CRC mismatch");
        partial.extend_from_slice(data);
        if kind == FULL || kind == LAST {
            out.push(std::mem::take(&mut partial));
        }
        at += HEADER + len;
    }
    Ok(out)
}

// The parts of wandb's `wandb_internal.proto` written here (field numbers as there).

#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(int64, tag = "1")]
    pub num: i64,
    #[prost(oneof = "Kind", tags = "2, 3, 17, 18, 21")]
    pub kind: Option<Kind>,
    #[prost(message, optional, tag = "200")]
    pub info: Option<RecordInfo>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(message, tag = "2")]
    History(HistoryRecord),
    #[prost(message, tag = "3")]
    Summary(SummaryRecord),
    #[prost(message, tag = "17")]
    Run(RunRecord),
    #[prost(message, tag = "18")]
    Exit(RunExitRecord),
    #[prost(message, tag = "21")]
    Header(HeaderRecord),
}

#[derive(Clone, PartialEq, Message)]
pub struct RecordInfo {
    #[prost(string, tag = "1")]
    pub stream_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct HeaderRecord {
    #[prost(message, optional, tag = "1")]
    pub version_info: Option<VersionInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct VersionInfo {
    #[prost(string, tag = "1")]
    pub producer: String,
    #[prost(string, tag = "2")]
    pub min_consumer: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunRecord {
    #[prost(string, tag = "1")]
    pub run_id: String,
    #[prost(string, tag = "2")]
    pub entity: String,
    #[prost(string, tag = "3")]
    pub project: String,
    #[prost(message, optional, tag = "4")]
    pub config: Option<ConfigRecord>,
    #[prost(string, tag = "8")]
    pub display_name: String,
    #[prost(string, tag = "13")]
    pub host: String,
    #[prost(message, optional, tag = "17")]
    pub start_time: Option<Timestamp>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigRecord {
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<Item>,
}

/// `ConfigItem`, `HistoryItem` and `SummaryItem` share these fields.
#[derive(Clone, PartialEq, Message)]
pub struct Item {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "16")]
    pub value_json: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistoryRecord {
    #[prost(message, repeated, tag = "1")]
    pub item: Vec<Item>,
    #[prost(message, optional, tag = "2")]
    pub step: Option<HistoryStep>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistoryStep {
    #[prost(int64, tag = "1")]
    pub num: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryRecord {
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<Item>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunExitRecord {
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    #[prost(int32, tag = "2")]
    pub runtime: i32,
}

/// transformers' single-value figures: summary entries, not history.
const SUMMARY_ONLY: &[&str] = &[
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
    "total_flos",
];

/// An offline W&B run being written.
pub struct WandbRun {
    log: RecordLog<std::io::BufWriter<std::fs::File>>,
    run_id: String,
    num: i64,
    step: i64,
    started: Instant,
    start_secs: f64,
    /// The last value of every key, for the summary.
    summary: Map<String, Value>,
    pub dir: PathBuf,
}

/// How `WANDB_MODE` / `WANDB_DISABLED` leave W&B: `Some(true)` offline, `Some(false)` online
/// (not available here), `None` disabled.
fn mode() -> Option<bool> {
    let disabled = std::env::var("WANDB_DISABLED").unwrap_or_default();
    if matches!(disabled.to_ascii_lowercase().as_str(), "true" | "1" | "yes") {
        return None;
    }
    match std::env::var("WANDB_MODE").unwrap_or_default().as_str() {
        "offline" | "dryrun" => Some(true),
        "disabled" => None,
        _ => Some(false),
    }
}

fn new_run_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

impl WandbRun {
    /// Starts the run under `WANDB_DIR` (default: the current directory); `None`, after a
    /// warning where one is due, when W&B is not in offline mode or the folder cannot be made.
    pub fn start(run_name: &str, config: Vec<(String, Value)>) -> Option<Self> {
        match mode() {
            None => return None,
            Some(false) => {
                eprintln!("warning: `report_to: wandb`: online W&B needs the network and an API key, which this engine does not use; set WANDB_MODE=offline to write the run for `wandb sync` to upload later. W&B logging is off for this run");
                return None;
            }
            Some(true) => {}
        }
        let root = std::env::var("WANDB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from("."));
        match Self::create(&root, run_name, config) {
            Ok(run) => {
                eprintln!(
                    "W&B offline run {} in {}: `wandb sync {}` uploads it",
                    run.run_id,
                    run.dir.display(),
                    run.dir.display()
                );
                Some(run)
            }
            Err(e) => {
                eprintln!("warning: `report_to: wandb`: {e:#}; W&B logging is off for this run");
                None
            }
        }
    }

    fn create(root: &Path, run_name: &str, config: Vec<(String, Value)>) -> Result<Self> {
        let run_id = std::env::var("WANDB_RUN_ID")
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(new_run_id);
        let stamp = chrono::Local::now().format("%Y%m%d_%H%M%S");
        let wandb = root.join("wandb");
        let dir = wandb.join(format!("offline-run-{stamp}-{run_id}"));
        std::fs::create_dir_all(dir.join("files"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let file = dir.join(format!("run-{run_id}.wandb"));
        let out = std::fs::File::create(&file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        let latest = wandb.join("latest-run");
        let _ = std::fs::remove_file(&latest);
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink(dir.file_name().unwrap_or_default(), &latest);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut run = Self {
            log: RecordLog::new(std::io::BufWriter::new(out))?,
            run_id: run_id.clone(),
            num: 0,
            step: 0,
            started: Instant::now(),
            start_secs: now.as_secs_f64(),
            summary: Map::new(),
            dir,
        };
        run.write(Kind::Header(HeaderRecord {
            version_info: Some(VersionInfo {
                producer: format!("llamafactory-rs {}", env!("CARGO_PKG_VERSION")),
                min_consumer: "0.40.0".into(),
            }),
        }))?;
        let host = super::tensorboard::hostname();
        run.write(Kind::Run(RunRecord {
            run_id,
            entity: std::env::var("WANDB_ENTITY").unwrap_or_default(),
            project: std::env::var("WANDB_PROJECT")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "huggingface".into()),
            config: Some(ConfigRecord {
                update: config
                    .into_iter()
                    .map(|(key, v)| Item {
                        key,
                        value_json: v.to_string(),
                    })
                    .collect(),
            }),
            display_name: run_name.to_string(),
            host,
            start_time: Some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
        }))?;
        run.log.flush()?;
        Ok(run)
    }

    fn write(&mut self, kind: Kind) -> Result<()> {
        self.num += 1;
        let record = Record {
            num: self.num,
            kind: Some(kind),
            info: Some(RecordInfo {
                stream_id: self.run_id.clone(),
            }),
        };
        self.log.append(&record.encode_to_vec())
    }

    /// A log-history entry as transformers' `on_log` logs it: its single-value figures into the
    /// summary, the rest as one history row (`train/…`, `eval/…`, `train/global_step`).
    pub fn log_entry(&mut self, entry: &Value) -> Result<()> {
        let Some(map) = entry.as_object() else {
            return Ok(());
        };
        let global_step = map.get("step").and_then(Value::as_u64).unwrap_or(0);
        let mut row: Vec<(String, Value)> = Vec::new();
        for (k, v) in map {
            if k == "step" || !v.is_number() {
                continue;
            }
            if SUMMARY_ONLY.contains(&k.as_str()) {
                self.summary.insert(k.clone(), v.clone());
                continue;
            }
            row.push((super::tensorboard::rewrite_key(k), v.clone()));
        }
        if row.is_empty() {
            return Ok(());
        }
        row.push(("train/global_step".into(), Value::from(global_step)));
        let runtime = self.started.elapsed().as_secs_f64();
        row.push(("_step".into(), Value::from(self.step)));
        row.push(("_runtime".into(), Value::from(runtime)));
        row.push(("_timestamp".into(), Value::from(self.start_secs + runtime)));
        for (k, v) in &row {
            self.summary.insert(k.clone(), v.clone());
        }
        let item = row
            .into_iter()
            .map(|(key, v)| Item {
                key,
                value_json: v.to_string(),
            })
            .collect();
        let step = self.step;
        self.step += 1;
        self.write(Kind::History(HistoryRecord {
            item,
            step: Some(HistoryStep { num: step }),
        }))?;
        self.log.flush()
    }

    /// Writes the summary and the exit record (`exit_code` 0 when the run finished).
    pub fn finish(mut self, exit_code: i32) -> Result<()> {
        let update = std::mem::take(&mut self.summary)
            .into_iter()
            .map(|(key, v)| Item {
                key,
                value_json: v.to_string(),
            })
            .collect();
        self.write(Kind::Summary(SummaryRecord { update }))?;
        self.write(Kind::Exit(RunExitRecord {
            exit_code,
            runtime: self.started.elapsed().as_secs() as i32,
        }))?;
        self.log.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a run file wandb 0.31 wrote offline (its header record), framed
    /// again from the same record bytes.
    #[test]
    fn framing_matches_wandbs_own_file() {
        let theirs = include_bytes!("../../../tests/fixtures/wandb/header-record.bin");
        let payload = &theirs[14..];
        assert_eq!(
            usize::from(u16::from_le_bytes([theirs[11], theirs[12]])),
            payload.len()
        );
        let mut ours = Vec::new();
        RecordLog::new(&mut ours).unwrap().append(payload).unwrap();
        assert_eq!(&ours[..], &theirs[..]);
        // And the payload is a header record our message types read back.
        let r = Record::decode(payload).unwrap();
        assert!(matches!(r.kind, Some(Kind::Header(_))));
        assert_eq!(r.num, 1);
    }

    #[test]
    fn records_split_across_blocks_and_pad_short_tails() {
        let mut buf = Vec::new();
        let mut log = RecordLog::new(&mut buf).unwrap();
        let records: Vec<Vec<u8>> = vec![
            vec![1; 100],
            vec![2; BLOCK - 7 - 107 - 7 - 3], // leaves 3 bytes in the block: padding
            vec![3; 70_000],                  // FIRST, MIDDLE, LAST
            vec![4; 5],
        ];
        for r in &records {
            log.append(r).unwrap();
        }
        assert_eq!(read_records(&buf).unwrap(), records);
        // The padded tail: the third record starts on the second block.
        assert_eq!(buf[BLOCK + 6], FIRST);
    }
}
