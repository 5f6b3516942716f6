//! A run's saved model (adapter or full weights, with the tokenizer), `checkpoint-N/` folders
//! written atomically (to a temporary name, then renamed, so a failed save — a full disk —
//! never damages the previous checkpoint), their rotation, and resuming from one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::optim::AdamW;
use crate::files::{write_json, write_safetensors, write_sharded};
use crate::model::adapter::{LoraSpec, PEFT_PREFIX};
use crate::model::value_head::ValueHead;
use crate::model::weights::CheckpointLayout;
use crate::model::Model;
use crate::tokenizer::HfTokenizer;

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
                &spec.peft_config(base_model, model),
            )?;
        }
        SaveKind::Full {
            source_dir,
            max_shard_bytes,
        } => {
            let tensors: BTreeMap<String, Tensor> = model
                .checkpoint_params()
                .into_iter()
                .map(|(k, p)| Ok((k, p.t().detach().to_dtype(DType::F32)?)))
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

/// Where a PiSSA run with `pissa_convert` keeps its initial adapter, and the trained one as
/// it was before the conversion (LLaMA-Factory's folder names).
pub const PISSA_INIT: &str = "pissa_init";
pub const PISSA_BACKUP: &str = "pissa_backup";

/// `pissa_convert`: the PiSSA adapter in `dir` (trained on the residual base) becomes one that
/// applies to the original base, as PEFT converts it (`[B, −B₀]·[A; A₀]`, rank and alpha
/// doubled; alpha ×√2 with rsLoRA); the adapter as trained stays in `pissa_backup/`.
pub fn convert_pissa(dir: &Path) -> Result<()> {
    let backup = dir.join(PISSA_BACKUP);
    std::fs::create_dir_all(&backup)
        .with_context(|| format!("cannot create {}", backup.display()))?;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(dir.join(f), backup.join(f))
            .with_context(|| format!("cannot back up {}", dir.join(f).display()))?;
    }
    let load = |d: &Path| -> Result<std::collections::HashMap<String, Tensor>> {
        let f = d.join("adapter_model.safetensors");
        candle_core::safetensors::load(&f, &candle_core::Device::Cpu)
            .map_err(|e| anyhow!("cannot read {}: {e}", f.display()))
    };
    let (trained, init) = (load(dir)?, load(&dir.join(PISSA_INIT))?);
    let mut out = BTreeMap::new();
    for (k, a) in &trained {
        let Some(module) = k.strip_suffix(".lora_A.weight") else {
            if !k.contains(".lora_B.") {
                out.insert(k.clone(), a.clone());
            }
            continue;
        };
        let b_key = format!("{module}.lora_B.weight");
        let get = |m: &std::collections::HashMap<String, Tensor>, key: &str| -> Result<Tensor> {
            m.get(key)
                .cloned()
                .ok_or_else(|| anyhow!("PiSSA conversion: `{key}` is missing"))
        };
        let (a, b) = crate::model::pissa::convert(
            a,
            &get(&trained, &b_key)?,
            &get(&init, k)?,
            &get(&init, &b_key)?,
        )?;
        out.insert(k.clone(), a);
        out.insert(b_key, b);
    }
    write_safetensors(&dir.join("adapter_model.safetensors"), &out)?;
    let cfg_path = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    let r = cfg["r"].as_u64().unwrap_or(0);
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r as f64);
    let rslora = cfg["use_rslora"].as_bool().unwrap_or(false);
    cfg["r"] = json!(2 * r);
    cfg["lora_alpha"] = json!(if rslora {
        alpha * 2f64.sqrt()
    } else {
        2.0 * alpha
    });
    cfg["init_lora_weights"] = json!(true);
    write_json(&cfg_path, &cfg)
}

/// What a checkpoint holds besides weights: the Trainer's progress.
pub(crate) struct Restored {
    pub step: usize,
    pub log_history: Vec<Value>,
    pub tokens_seen: u64,
    /// Seconds the run had trained before the checkpoint.
    pub elapsed: f64,
}

/// Restores the optimizer's tensors (the adapter or trained weights, the value head when
/// `value_head`) and its moments from checkpoint `ckpt`, and returns the progress there.
pub(crate) fn restore(
    ckpt: &Path,
    opt: &mut AdamW,
    adapter: bool,
    value_head: bool,
    layout: CheckpointLayout,
    dtype: DType,
    device: &Device,
) -> Result<Restored> {
    let state_file = ckpt.join("trainer_state.json");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(&state_file)
            .with_context(|| format!("cannot read {}", state_file.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", state_file.display()))?;
    let step = state["global_step"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: no `global_step`", state_file.display()))?
        as usize;
    let weights_file = ckpt.join(if adapter {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    });
    let mut tensors = candle_core::safetensors::load(&weights_file, device)
        .map_err(|e| anyhow!("cannot read {}: {e}", weights_file.display()))?;
    if value_head {
        tensors.extend(ValueHead::load(ckpt, dtype, device)?.tensors()?);
    }
    for p in &opt.params {
        let key = if adapter && !p.name.starts_with(PEFT_PREFIX) && !p.name.starts_with("v_head.") {
            format!("{PEFT_PREFIX}{}", layout.module_path(&p.name))
        } else if adapter {
            p.name.clone()
        } else {
            layout.file(&p.name)
        };
        let t = tensors
            .get(&key)
            .ok_or_else(|| anyhow!("{}: `{key}` missing", weights_file.display()))?;
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    let opt_file = ckpt.join("optimizer.safetensors");
    if opt_file.exists() {
        opt.load_state(&opt_file)?;
    }
    Ok(Restored {
        step,
        log_history: state["log_history"].as_array().cloned().unwrap_or_default(),
        tokens_seen: state["num_input_tokens_seen"].as_u64().unwrap_or(0),
        elapsed: state["train_runtime_so_far"].as_f64().unwrap_or(0.0),
    })
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
