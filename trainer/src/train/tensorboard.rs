//! TensorBoard event files (`report_to: tensorboard`), written natively: the TFRecord framing
//! (length, masked CRC-32C of the length, the record, masked CRC-32C of the record) around
//! `Event` protocol buffers — a `brain.Event:2` version record, then scalar summaries under the
//! tags transformers' `TensorBoardCallback` uses (`train/loss`, `train/learning_rate`,
//! `train/grad_norm`, `train/epoch`, `eval/loss`, …) and the run's arguments as a text summary
//! (`args/text_summary`). Files go to `logging_dir` (by default `<output_dir>/runs/<date>_<host>`
//! as transformers names it), so `tensorboard --logdir saves/` lists runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;
use serde_json::Value;

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 8")]
    value: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    /// `DT_STRING` is 7.
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {}

/// TFRecord's masked CRC-32C.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, as event-file and run-folder names (and W&B's run record) carry it.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// transformers' `rewrite_logs`, which its TensorBoard and W&B callbacks apply: `eval_x` becomes
/// `eval/x`, anything else `train/x`.
pub(crate) fn rewrite_key(k: &str) -> String {
    match k.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{k}"),
    }
}

/// transformers' default `logging_dir`: `runs/<Mon>DD_HH-MM-SS_<host>`.
pub fn default_logging_dir(output_dir: &Path) -> PathBuf {
    let stamp = chrono::Local::now().format("%b%d_%H-%M-%S");
    output_dir
        .join("runs")
        .join(format!("{stamp}_{}", hostname()))
}

/// An open event file.
pub struct EventWriter {
    file: std::fs::File,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorBoard's writers name theirs.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}.0",
            now() as u64,
            hostname(),
            std::process::id()
        ));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self { file, path };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        self.file
            .write_all(&record(&e.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Scalars at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                metadata: None,
                value: Some(ValueKind::SimpleValue(*v as f32)),
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// A text summary (`tag/text_summary`, the text plugin), as `add_text` writes it.
    pub fn text(&mut self, tag: &str, text: &str) -> Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::Summary(Summary {
                value: vec![SummaryValue {
                    tag: format!("{tag}/text_summary"),
                    metadata: Some(SummaryMetadata {
                        plugin_data: Some(PluginData {
                            plugin_name: "text".into(),
                        }),
                    }),
                    value: Some(ValueKind::Tensor(TensorProto {
                        dtype: 7,
                        tensor_shape: Some(TensorShape {}),
                        string_val: vec![text.as_bytes().to_vec()],
                    })),
                }],
            })),
        })
    }

    /// One entry of the Trainer's `log_history` as transformers' callback logs it: every number
    /// but `step`, `eval_x` as `eval/x` and the rest as `train/x`, at the entry's step.
    pub fn log_entry(&mut self, entry: &Value) -> Result<()> {
        let Some(map) = entry.as_object() else {
            return Ok(());
        };
        let step = map.get("step").and_then(Value::as_u64).unwrap_or(0);
        let values: Vec<(String, f64)> = map
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| Some((rewrite_key(k), v.as_f64()?)))
            .collect();
        self.scalars(step, &values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_known_values() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TensorFlow's masking: rotate right by 15, add 0xa282ead8.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc32c(&3u64.to_le_bytes())
        );
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(
            u32::from_le_bytes(r[15..19].try_into().unwrap()),
            masked_crc32c(b"abc")
        );
    }
}
