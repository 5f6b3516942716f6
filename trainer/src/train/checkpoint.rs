//! Output files: adapters or full weights, tokenizer, `trainer_state.json`, results, and
//! `checkpoint-N/` folders written atomically (to a temporary name, then renamed), so a failed
//! save (a full disk) never damages the previous checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::model::adapter::LoraSpec;
use crate::model::Model;
use crate::tokenizer::HfTokenizer;

pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// safetensors with `format: pt` metadata, as `transformers` writes.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let data: Vec<(String, Vec<usize>, DType, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let t = t.contiguous()?;
            let bytes = tensor_bytes(&t)?;
            Ok((k.clone(), t.dims().to_vec(), t.dtype(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(k, shape, dtype, bytes)| {
            let st = match dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                other => return Err(anyhow!("cannot save dtype {other:?}")),
            };
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(st, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => anyhow::bail!("cannot save dtype {other:?}"),
    })
}

/// Full weights, sharded past `max_shard_bytes` with `model.safetensors.index.json`.
pub fn write_sharded(
    dir: &Path,
    tensors: &BTreeMap<String, Tensor>,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for (k, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(BTreeMap::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        shards
            .last_mut()
            .expect("one shard")
            .insert(k.clone(), t.clone());
    }
    if shards.len() == 1 {
        let p = dir.join("model.safetensors");
        write_safetensors(&p, &shards[0])?;
        return Ok(vec![p]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for k in shard.keys() {
            weight_map.insert(k.clone(), Value::String(name.clone()));
        }
        let p = dir.join(&name);
        write_safetensors(&p, shard)?;
        files.push(p);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_json(&dir.join("model.safetensors.index.json"), &index)?;
    Ok(files)
}

/// How a run's model is saved.
pub enum SaveKind<'a> {
    Adapter(&'a LoraSpec),
    Full {
        source_dir: &'a Path,
        max_shard_bytes: u64,
    },
}

/// The model (adapter or full weights) and tokenizer into `dir`.
pub fn save_model(
    dir: &Path,
    model: &Model,
    kind: &SaveKind,
    base_model: &str,
    tok: &HfTokenizer,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match kind {
        SaveKind::Adapter(spec) => {
            write_safetensors(
                &dir.join("adapter_model.safetensors"),
                &model.adapter_tensors(DType::F32)?,
            )?;
            write_json(
                &dir.join("adapter_config.json"),
                &spec.peft_config(base_model),
            )?;
        }
        SaveKind::Full {
            source_dir,
            max_shard_bytes,
        } => {
            let tensors: BTreeMap<String, Tensor> = model
                .params
                .iter()
                .map(|(k, p)| Ok((k.clone(), p.t().detach().to_dtype(DType::F32)?)))
                .collect::<Result<_>>()?;
            write_sharded(dir, &tensors, *max_shard_bytes)?;
            let mut cfg = Value::Object(model.cfg.raw.clone());
            cfg["torch_dtype"] = Value::String("float32".into());
            write_json(&dir.join("config.json"), &cfg)?;
            let gen = source_dir.join("generation_config.json");
            if gen.exists() {
                std::fs::copy(&gen, dir.join("generation_config.json"))?;
            }
        }
    }
    tok.save(dir)
}

/// Writes into `dir.tmp` with `fill`, then renames over `dir`; on failure the temporary folder
/// is removed and `dir` is untouched.
pub fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .map_err(anyhow::Error::from)
        .and_then(|_| fill(&tmp));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "saving {} failed (is the disk full?); earlier checkpoints are intact",
            dir.display()
        )));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// The `checkpoint-N` folder with the highest N, as `transformers.get_last_checkpoint`.
pub fn last_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(output_dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Deletes the oldest checkpoints beyond `limit`.
pub fn rotate_checkpoints(output_dir: &Path, limit: usize) -> Result<()> {
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name.strip_prefix("checkpoint-")?.parse().ok()?, e.path()))
        })
        .collect();
    all.sort();
    while all.len() > limit.max(1) {
        let (_, p) = all.remove(0);
        std::fs::remove_dir_all(&p)
            .with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_save_leaves_the_previous_checkpoint_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-2");
        atomic_dir(&dir, |d| Ok(std::fs::write(d.join("weights"), b"good")?)).unwrap();
        let err = atomic_dir(&dir, |d| {
            std::fs::write(d.join("weights"), b"partial")?;
            Err(std::io::Error::from_raw_os_error(28).into()) // ENOSPC
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("is the disk full?") && msg.contains("earlier checkpoints are intact"),
            "{msg}"
        );
        assert_eq!(std::fs::read(dir.join("weights")).unwrap(), b"good");
        assert!(
            !dir.with_extension("tmp").exists(),
            "the partial copy is cleaned up"
        );
    }

    #[test]
    fn finds_and_rotates_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        for n in [5, 10, 15] {
            std::fs::create_dir(tmp.path().join(format!("checkpoint-{n}"))).unwrap();
        }
        assert_eq!(
            last_checkpoint(tmp.path()).unwrap(),
            tmp.path().join("checkpoint-15")
        );
        rotate_checkpoints(tmp.path(), 2).unwrap();
        assert!(
            !tmp.path().join("checkpoint-5").exists() && tmp.path().join("checkpoint-10").exists()
        );
    }
}
