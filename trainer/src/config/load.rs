//! Reading a training config: a YAML (or JSON) file and `key=value` overrides, each key checked
//! against LLaMA-Factory's namespace and coerced like Hugging Face's argument parser, with errors
//! that name the file, key, value and what was expected (and the closest key or value).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use protocol::args::{KeyUse, TrainArgs, UNREAD_KEYS};
use serde_json::{Map, Value};

use super::suggest::closest;

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub enum ArgSource<'a> {
    File(&'a Path),
    CommandLine,
}

impl std::fmt::Display for ArgSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgSource::File(p) => write!(f, "{}", p.display()),
            ArgSource::CommandLine => write!(f, "command line"),
        }
    }
}

/// Loads a config file and applies `key=value` overrides on top, LLaMA-Factory style.
/// Returns the arguments and the warnings worth showing (keys that change nothing here).
pub fn load_args(path: &Path, overrides: &[String]) -> Result<(TrainArgs, Vec<String>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut values = parse_yaml_map(&text, &ArgSource::File(path))?;
    for (k, v) in parse_overrides(overrides)? {
        values.insert(k, v);
    }
    let mut merged = Map::new();
    for (key, value) in values {
        let source = if overrides
            .iter()
            .any(|o| o.split('=').next() == Some(key.as_str()))
        {
            ArgSource::CommandLine
        } else {
            ArgSource::File(path)
        };
        let value = check_key(&key, value, &source)?;
        merged.insert(key, value);
    }
    let warnings = no_effect_warnings(&merged);
    let args: TrainArgs = serde_json::from_value(Value::Object(merged))
        .context("internal error: checked arguments failed to deserialize")?;
    Ok((args, warnings))
}

/// Builds arguments from a JSON object (the server's run form) with the same checks as a file.
pub fn args_from_json(values: Map<String, Value>) -> Result<TrainArgs> {
    let mut merged = Map::new();
    for (key, value) in values {
        let value = check_key(&key, value, &ArgSource::CommandLine)?;
        merged.insert(key, value);
    }
    Ok(serde_json::from_value(Value::Object(merged))?)
}

/// `key=value` pairs; the value is read as a YAML scalar so `1e-4`, `true` and `null` mean what
/// they mean in the file.
pub fn parse_overrides(overrides: &[String]) -> Result<Vec<(String, Value)>> {
    overrides
        .iter()
        .map(|o| {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| anyhow!("command line: `{o}` is not of the form key=value"))?;
            let value: serde_yaml_ng::Value =
                serde_yaml_ng::from_str(v).unwrap_or(serde_yaml_ng::Value::String(v.into()));
            Ok((k.trim().to_string(), yaml_to_json(value, k)?))
        })
        .collect()
}

fn parse_yaml_map(text: &str, source: &ArgSource) -> Result<Map<String, Value>> {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| anyhow!("{source}: invalid YAML: {e}"))?;
    let mapping = match doc {
        serde_yaml_ng::Value::Null => return Ok(Map::new()),
        serde_yaml_ng::Value::Mapping(m) => m,
        _ => bail!("{source}: a config must be a mapping of `key: value` lines"),
    };
    let mut out = Map::new();
    for (k, v) in mapping {
        let key = match k {
            serde_yaml_ng::Value::String(s) => s,
            other => bail!("{source}: key {other:?} is not a string"),
        };
        let value = yaml_to_json(v, &key).map_err(|e| anyhow!("{source}: {e}"))?;
        out.insert(key, value);
    }
    Ok(out)
}

fn yaml_to_json(v: serde_yaml_ng::Value, key: &str) -> Result<Value> {
    serde_json::to_value(&v).map_err(|e| anyhow!("key `{key}`: value cannot be read: {e}"))
}

/// LLaMA-Factory keys of features this engine does not have yet, by key prefix: what they are
/// and what to use instead. Any value is an error that says so (not "unknown key").
const NOT_YET: &[(&str, &str)] = &[
    (
        "use_adam_mini",
        "Adam-mini is not supported; the optimizer is AdamW (GaLore with `use_galore`)",
    ),
    (
        "use_muon",
        "Muon is not supported; the optimizer is AdamW (GaLore with `use_galore`)",
    ),
    (
        "oft_",
        "OFT is not supported; use LoRA or DoRA (`use_dora`)",
    ),
    (
        "use_swanlab",
        "SwanLab tracking is not supported; the run's log is trainer_log.jsonl",
    ),
    (
        "swanlab_",
        "SwanLab tracking is not supported; the run's log is trainer_log.jsonl",
    ),
    ("use_mca", "Megatron-Core training is not supported"),
    ("use_dft_loss", "the DFT loss is not supported"),
    ("use_asft_loss", "the ASFT loss is not supported"),
    ("use_eaft_loss", "the EAFT loss is not supported"),
];

/// Checks one key against the namespace and coerces its value the way Hugging Face's argument
/// parser does (numbers written as strings, lists for comma-separated fields).
fn check_key(key: &str, value: Value, source: &ArgSource) -> Result<Value> {
    let keys = TrainArgs::keys();
    if let Some((_, why)) = NOT_YET.iter().find(|(p, _)| key.starts_with(p)) {
        bail!("{source}: key `{key}`: {why}");
    }
    if !keys.iter().any(|k| k == key) {
        let hint = closest(key, keys.iter().map(String::as_str))
            .map(|k| format!("; did you mean `{k}`?"))
            .unwrap_or_default();
        bail!("{source}: unknown key `{key}`{hint}");
    }
    let candidates = [Some(value.clone()), coerce(&value)];
    let mut first_err = None;
    for candidate in candidates.into_iter().flatten() {
        let mut one = Map::new();
        one.insert(key.to_string(), candidate.clone());
        match serde_json::from_value::<TrainArgs>(Value::Object(one)) {
            Ok(_) => return Ok(candidate),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let serde_msg = first_err.map(|e| e.to_string()).unwrap_or_default();
    if let Some(choices) = variants(&serde_msg) {
        let hint = value
            .as_str()
            .and_then(|v| closest(v, choices.iter().map(String::as_str)))
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        bail!(
            "{source}: key `{key}` has value {value}, expected one of {}{hint}",
            choices.join(", ")
        );
    }
    let expected = describe_expected(&serde_msg);
    bail!("{source}: key `{key}` has value {value}, expected {expected}")
}

/// The allowed values named by serde's "unknown variant `x`, expected one of `a`, `b`" (or
/// "expected `a`" when there is one).
fn variants(serde_msg: &str) -> Option<Vec<String>> {
    let rest = serde_msg.strip_prefix("unknown variant ")?;
    let expected = rest.split_once("expected ")?.1;
    let expected = expected.split(" at line").next().unwrap_or(expected);
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

fn coerce(value: &Value) -> Option<Value> {
    match value {
        Value::String(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                Some(Value::from(i))
            } else if let Ok(f) = t.parse::<f64>() {
                Some(Value::from(f))
            } else {
                match t.to_ascii_lowercase().as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    "null" | "none" | "~" => Some(Value::Null),
                    _ => None,
                }
            }
        }
        Value::Number(n) => match n.as_f64() {
            // `num_train_epochs: 3` and `val_size: 0` are fine; integers are valid floats but a
            // float like 3.0 for an integer key is also what people write.
            Some(f) if f.fract() == 0.0 && f >= 0.0 => Some(Value::from(f as u64)),
            _ => Some(Value::String(n.to_string())),
        },
        Value::Bool(b) => Some(Value::String(b.to_string())),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            Some(Value::String(
                items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| i.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ))
        }
        _ => None,
    }
}

fn describe_expected(serde_msg: &str) -> String {
    let raw = serde_msg.rsplit("expected ").next().unwrap_or(serde_msg);
    let raw = raw.split(" at line").next().unwrap_or(raw).trim();
    match raw {
        "f64" | "f32" => "a number".into(),
        "usize" | "u64" | "u32" => "a non-negative integer".into(),
        "i64" | "i32" => "an integer".into(),
        "a boolean" => "true or false".into(),
        other => other.to_string(),
    }
}

fn no_effect_warnings(merged: &Map<String, Value>) -> Vec<String> {
    let defaults = serde_json::to_value(TrainArgs::default()).unwrap_or_default();
    UNREAD_KEYS
        .iter()
        .filter_map(|(k, u)| {
            let KeyUse::NoEffect(why) = u else {
                return None;
            };
            let v = merged.get(*k)?;
            let default = defaults.get(*k)?;
            let harmless = v == default || v.is_null();
            (!harmless)
                .then(|| format!("`{k}: {v}` has no effect in this engine and is ignored: {why}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_llamafactory_example_with_overrides() {
        let f = write("model_name_or_path: m\nlearning_rate: 1.0e-4\nnum_train_epochs: 3\nlora_target: all\nbf16: true\nddp_timeout: 180000000\ndataloader_num_workers: 4\nresume_from_checkpoint: null\n");
        let (a, warnings) = load_args(
            f.path(),
            &["learning_rate=2e-5".into(), "cutoff_len=512".into()],
        )
        .unwrap();
        assert_eq!(a.learning_rate, 2e-5);
        assert_eq!(a.cutoff_len, 512);
        assert_eq!(a.num_train_epochs, 3.0);
        assert!(a.bf16);
        assert_eq!(a.ddp_timeout, 180000000, "read: the collective timeout");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("dataloader_num_workers"));
    }

    #[test]
    fn unknown_key_names_file_key_and_suggestion() {
        let f = write("lerning_rate: 1e-4\n");
        let e = load_args(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("unknown key `lerning_rate`"), "{e}");
        assert!(e.contains("did you mean `learning_rate`"), "{e}");
    }

    #[test]
    fn llamafactory_methods_not_here_say_so_by_name() {
        for (key, says) in [
            ("use_adam_mini: true", "Adam-mini is not supported"),
            ("use_muon: true", "Muon is not supported"),
        ] {
            let f = write(&format!("{key}\n"));
            let e = load_args(f.path(), &[]).unwrap_err().to_string();
            let name = key.split(':').next().unwrap();
            assert!(
                e.contains(&format!("key `{name}`")) && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn wrong_type_names_key_value_and_expected_type() {
        let f = write("cutoff_len: lots\n");
        let e = load_args(f.path(), &[]).unwrap_err().to_string();
        assert!(
            e.contains("key `cutoff_len` has value \"lots\", expected a non-negative integer"),
            "{e}"
        );
        let f = write("bf16: maybe\n");
        let e = load_args(f.path(), &[]).unwrap_err().to_string();
        assert!(
            e.contains("key `bf16`") && e.contains("true or false"),
            "{e}"
        );
        let e = load_args(write("").path(), &["learning_rate=fast".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("command line: key `learning_rate`") && e.contains("a number"),
            "{e}"
        );
    }

    #[test]
    fn a_closed_choice_lists_its_values_and_suggests_the_closest() {
        let f = write("stage: stf\n");
        let e = load_args(f.path(), &[]).unwrap_err().to_string();
        assert!(
            e.contains("key `stage` has value \"stf\", expected one of sft, rm, dpo, kto, ppo, pt")
                && e.contains("did you mean `sft`"),
            "{e}"
        );
        let e = load_args(
            write("").path(),
            &["lr_scheduler_type=cosine_restarts".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean `cosine_with_restarts`"), "{e}");
        let (a, _) = load_args(write("save_strategy: epoch\n").path(), &[]).unwrap();
        assert_eq!(a.save_strategy, protocol::args::IntervalStrategy::Epoch);
    }

    #[test]
    fn coerces_strings_and_lists_like_hf_argparser() {
        let f = write("learning_rate: '1e-4'\nlora_target: [q_proj, v_proj]\nmax_samples: 100\n");
        let (a, _) = load_args(f.path(), &[]).unwrap();
        assert_eq!(a.learning_rate, 1e-4);
        assert_eq!(a.lora_target, "q_proj,v_proj");
        assert_eq!(a.max_samples, Some(100));
    }

    #[test]
    fn bad_yaml_and_missing_file_are_clear() {
        let e = load_args(Path::new("/nonexistent/cfg.yaml"), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read config file /nonexistent/cfg.yaml"));
        let f = write("a: [1,\n");
        let e = load_args(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("invalid YAML") && e.contains("line"), "{e}");
        let e = load_args(write("").path(), &["noequals".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
    }
}
