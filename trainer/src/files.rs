//! Files written the way transformers writes them: pretty JSON with a trailing newline,
//! safetensors with `format: pt` metadata, and full weights sharded with
//! `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;

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
                // GPTQ's packed integers.
                DType::I32 => safetensors::Dtype::I32,
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
        DType::I32 => flat
            .to_vec1::<i32>()?
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
