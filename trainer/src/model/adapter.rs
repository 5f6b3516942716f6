//! Which tensors train (LoRA, freeze, full), and LoRA adapters in PEFT's file format:
//! `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight` / `lora_magnitude_vector`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::layers::{LinearWeight, LoraLayer, Param};
use super::llama::Model;
use protocol::TrainArgs;

/// The key prefix of every tensor in a PEFT adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// LoRA hyper-parameters as PEFT stores them.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<String>,
    /// PiSSA initialization (`pissa_init`), with its SVD.
    pub pissa: Option<super::pissa::Svd>,
}

impl LoraSpec {
    /// [`LoraSpec::from_args`] with `lora_target: all` meaning every linear module kind of
    /// `model` (LLaMA-Factory's `find_all_linear_modules`).
    pub fn for_model(a: &TrainArgs, model: &Model) -> Result<Self> {
        let mut spec = Self::from_args(a);
        if a.lora_target.trim() == "all" {
            spec.targets = model.linear_kinds();
        }
        if a.use_llama_pro {
            // LLaMA-Factory's `find_expanded_modules`: the targets in the expanded blocks only,
            // listed by full module path.
            let layers = model.llama_pro_layers(a.freeze_trainable_layers)?;
            let modules = model.target_modules(&spec.targets)?;
            spec.targets = modules
                .into_iter()
                .filter(|m| layers.iter().any(|l| m.contains(&format!(".layers.{l}."))))
                .map(|m| model.cfg.layout.module_path(&m))
                .collect();
        }
        Ok(spec)
    }

    /// The spec `a` asks for; `lora_target: all` is the Llama-family module list (see
    /// [`LoraSpec::for_model`]).
    pub fn from_args(a: &TrainArgs) -> Self {
        let targets = if a.lora_target.trim() == "all" {
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec()
        } else {
            TrainArgs::split_list(Some(&a.lora_target))
        };
        Self {
            rank: a.lora_rank,
            alpha: a.lora_alpha(),
            dropout: a.lora_dropout,
            targets,
            use_rslora: a.use_rslora,
            use_dora: a.use_dora,
            modules_to_save: TrainArgs::split_list(a.additional_target.as_deref()),
            pissa: a
                .pissa_init
                .then(|| super::pissa::Svd::from_pissa_iter(a.pissa_iter)),
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// PEFT's `adapter_config.json` for the adapter on `model`. A vision-language model's
    /// targets are the adapted modules' full paths, as LLaMA-Factory writes them, so that PEFT
    /// leaves the vision tower's like-named modules alone.
    pub fn peft_config(&self, base_model: &str, model: &Model) -> Value {
        let mut targets = if model.vision.is_some() || self.targets.iter().any(|t| t.contains('.'))
        {
            model
                .lora_layers()
                .keys()
                .map(|m| model.cfg.layout.module_path(m))
                .collect()
        } else {
            self.targets.clone()
        };
        targets.sort();
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": match self.pissa {
                Some(svd) => json!(svd.peft_name()),
                None => json!(true),
            },
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_bias": false,
            "lora_dropout": self.dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "peft_type": "LORA",
            "r": self.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora
        })
    }

    pub fn from_peft_config(v: &Value, file: &Path) -> Result<Self> {
        if v.get("peft_type").and_then(Value::as_str) != Some("LORA") {
            bail!(
                "{}: only LoRA adapters (`peft_type: LORA`) are supported",
                file.display()
            );
        }
        let rank = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("{}: `r` missing", file.display()))? as usize;
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => bail!("{}: `target_modules` missing", file.display()),
        };
        Ok(Self {
            rank,
            alpha: v
                .get("lora_alpha")
                .and_then(Value::as_f64)
                .unwrap_or(rank as f64),
            dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            targets,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            use_dora: v.get("use_dora").and_then(Value::as_bool).unwrap_or(false),
            modules_to_save: match v.get("modules_to_save") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect(),
                _ => Vec::new(),
            },
            // Other initializations only change where training starts.
            pissa: v
                .get("init_lora_weights")
                .and_then(Value::as_str)
                .and_then(super::pissa::Svd::from_peft_name),
        })
    }
}

/// A PEFT adapter read from disk: its LoRA layers by module and its `modules_to_save` copies.
pub struct Adapter {
    pub spec: LoraSpec,
    pub layers: BTreeMap<String, LoraLayer>,
    pub full_weights: BTreeMap<String, Tensor>,
}

impl LoraLayer {
    fn new(a: &Tensor, b: &Tensor, magnitude: Option<Var>, spec: &LoraSpec) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(a)?,
            b: Var::from_tensor(b)?,
            scale: spec.scale(),
            dropout: spec.dropout,
            magnitude,
            detach_norm: true,
        })
    }
}

impl Model {
    /// Linear module names (full paths) whose last component is one of `targets`.
    pub fn target_modules(&self, targets: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        // A target is a module kind (`q_proj`), or a module's full path (LLaMA-Factory lists
        // the language model's modules one by one for vision-language models).
        let layout = self.cfg.layout;
        let full: Vec<String> = targets.iter().map(|t| layout.internal(t)).collect();
        for lin in self.linears() {
            let m = lin.name.splitn(4, '.').nth(3).unwrap_or_default();
            let short = m.rsplit('.').next().unwrap_or(m);
            if targets.iter().any(|t| t == short || t == m) || full.contains(&lin.name) {
                out.push(lin.name.clone());
            }
        }
        let kinds = self.linear_kinds();
        for (t, f) in targets.iter().zip(&full) {
            if !kinds.iter().any(|k| k == t) && !self.linears().any(|l| &l.name == f) {
                bail!(
                    "lora_target `{t}` matches no linear layer of this {} model; choose from {} or `all`",
                    self.cfg.model_type,
                    kinds.join(", ")
                );
            }
        }
        Ok(out)
    }

    /// LLaMA Pro's trainable layers (`use_llama_pro`): the last of every `num_layers / k` layers,
    /// which is where `llamafactory expand-model` put the new blocks.
    pub fn llama_pro_layers(&self, k: i64) -> Result<Vec<usize>> {
        let n = self.cfg.num_hidden_layers;
        if k <= 0 || !n.is_multiple_of(k as usize) {
            bail!(
                "`use_llama_pro`: `num_layers` {n} should be divisible by `freeze_trainable_layers` {k} (the number of expanded blocks)"
            );
        }
        let stride = n / k as usize;
        Ok((stride - 1..n + stride - 1).step_by(stride).collect())
    }

    /// The short names of the decoder layers' linear modules (`q_proj`, …, `down_proj`; Phi-3's
    /// `qkv_proj` and `gate_up_proj`; a mixture's `gate` and experts), in layer order, over
    /// every layer (dense and sparse ones differ): what `lora_target: all` means.
    pub fn linear_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = Vec::new();
        for lin in self.linears() {
            let short = lin.name.rsplit('.').next().unwrap_or_default().to_string();
            if !kinds.contains(&short) {
                kinds.push(short);
            }
        }
        kinds
    }

    /// Adds fresh LoRA layers: A ~ U(±1/√fan_in) (PEFT's Kaiming-uniform with a=√5), B = 0,
    /// DoRA magnitudes = row norms of W. Seeded for reproducible runs.
    pub fn add_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dtype = self.trainable_dtype();
        let device = self.device.clone();
        for module in self.target_modules(&spec.targets)? {
            let lin = self
                .linear_mut(&module)
                .ok_or_else(|| anyhow!("no linear module `{module}`"))?;
            let (out_f, in_f) = lin.weight.dims()?;
            let bound = 1.0 / (in_f as f64).sqrt();
            let a: Vec<f64> = (0..spec.rank * in_f)
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (spec.rank, in_f), &device)?.to_dtype(dtype)?;
            let b = Tensor::zeros((out_f, spec.rank), dtype, &device)?;
            let magnitude = if spec.use_dora {
                let norms = match &lin.weight {
                    LinearWeight::Dense(p) => p.tensor.to_dtype(dtype)?.sqr()?.sum(1)?.sqrt()?,
                    LinearWeight::Quantized(q) => q.row_norms(None, dtype)?,
                    LinearWeight::Bf16(w) => w.to_dense(dtype)?.sqr()?.sum(1)?.sqrt()?,
                };
                Some(Var::from_tensor(&norms)?)
            } else {
                None
            };
            lin.lora = Some(LoraLayer::new(&a, &b, magnitude, spec)?);
        }
        if let Some(svd) = spec.pissa {
            for module in self.target_modules(&spec.targets)? {
                let (a, b) = self.pissa_residual(&module, spec, svd)?;
                let l = self
                    .linear_mut(&module)
                    .and_then(|l| l.lora.as_mut())
                    .expect("LoRA just added");
                l.a.set(&a.to_dtype(l.a.dtype())?)?;
                l.b.set(&b.to_dtype(l.b.dtype())?)?;
            }
        }
        self.make_trainable(
            &spec
                .modules_to_save
                .iter()
                .map(|m| format!(".{m}."))
                .collect::<Vec<_>>(),
            true,
        )?;
        Ok(())
    }

    /// PiSSA on the module `module`: its base weight becomes the residual; returns the
    /// initial `(A, B)`. The randomized SVD's sketch is seeded by the module's name, so the
    /// residual a loaded adapter needs is the one it trained on.
    fn pissa_residual(
        &mut self,
        module: &str,
        spec: &LoraSpec,
        svd: super::pissa::Svd,
    ) -> Result<(Tensor, Tensor)> {
        if spec.use_dora {
            bail!("`pissa_init` with `use_dora` is not supported");
        }
        let model_dtype = self.dtype;
        let lin = self
            .linear_mut(module)
            .ok_or_else(|| anyhow!("no linear module `{module}`"))?;
        let w = match &lin.weight {
            LinearWeight::Dense(p) => p.tensor.to_dtype(DType::F32)?,
            LinearWeight::Bf16(w) => w.to_dense(DType::F32)?,
            LinearWeight::Quantized(_) => bail!(
                "`pissa_init` on a quantized base (`quantization_bit`) is not supported: the residual must stay in full precision; train PiSSA on the unquantized model"
            ),
        };
        let seed = module.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
        });
        let (a, b, residual) = super::pissa::factors(&w, spec.rank, spec.scale(), svd, seed)?;
        lin.weight = LinearWeight::Dense(Param::frozen(residual.to_dtype(model_dtype)?));
        Ok((a, b))
    }

    /// Marks parameters whose dotted name contains any of `patterns` trainable.
    fn make_trainable(&mut self, patterns: &[String], dotted: bool) -> Result<usize> {
        let mut n = 0;
        let dtype = self.trainable_dtype();
        for (name, p) in self.params_mut() {
            let hay = if dotted { format!(".{name}") } else { name };
            if p.var.is_none() && patterns.iter().any(|pat| hay.contains(pat.as_str())) {
                p.var = Some(Var::from_tensor(&p.tensor.to_dtype(dtype)?)?);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every parameter trains (`finetuning_type: full`).
    pub fn setup_full(&mut self) -> Result<()> {
        self.make_trainable(&[String::new()], false)?;
        Ok(())
    }

    /// LLaMA-Factory's freeze tuning: the last (or, negative, first) N layers, restricted to
    /// `freeze_trainable_modules`, plus `freeze_extra_modules` outside the layers.
    pub fn setup_freeze(&mut self, a: &TrainArgs) -> Result<()> {
        let n = self.cfg.num_hidden_layers as i64;
        let k = a.freeze_trainable_layers;
        let ids: Vec<i64> = if a.use_llama_pro {
            self.llama_pro_layers(k)?
                .into_iter()
                .map(|i| i as i64)
                .collect()
        } else if k > 0 {
            ((n - k).max(0)..n).collect()
        } else {
            (0..(-k).min(n)).collect()
        };
        let names: Vec<String> = self.params().into_iter().map(|(n, _)| n).collect();
        let hidden: Vec<String> = names
            .iter()
            .filter_map(|name| {
                name.split(".0.")
                    .nth(1)
                    .map(|rest| rest.split('.').next().unwrap_or_default().to_string())
            })
            .collect();
        let mut patterns = Vec::new();
        for module in TrainArgs::split_list(Some(&a.freeze_trainable_modules)) {
            if module != "all" && !hidden.contains(&module) {
                let mut choices = hidden.clone();
                choices.sort();
                choices.dedup();
                bail!(
                    "Module {module} is not found, please choose from {}",
                    choices.join(", ")
                );
            }
            for idx in &ids {
                patterns.push(format!(
                    ".{idx}.{}",
                    if module == "all" { "" } else { &module }
                ));
            }
        }
        let non_hidden: Vec<String> = names
            .iter()
            .filter(|n| !n.contains(".layers."))
            .filter_map(|n| n.rsplit('.').nth(1).map(String::from))
            .collect();
        for extra in TrainArgs::split_list(a.freeze_extra_modules.as_deref()) {
            if !non_hidden.contains(&extra) {
                bail!(
                    "Module {extra} is not found, please choose from {}",
                    non_hidden.join(", ")
                );
            }
            patterns.push(extra);
        }
        self.make_trainable(&patterns, false)?;
        Ok(())
    }

    /// Trainable tensors with their names (PEFT names for LoRA tensors: transformers' module
    /// paths, see [`super::weights::CheckpointLayout::module_path`]).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (name, l) in self.lora_layers() {
            let m = self.cfg.layout.module_path(name);
            out.push((format!("{PEFT_PREFIX}{m}.lora_A.weight"), l.a.clone()));
            out.push((format!("{PEFT_PREFIX}{m}.lora_B.weight"), l.b.clone()));
            if let Some(mag) = &l.magnitude {
                out.push((
                    format!("{PEFT_PREFIX}{m}.lora_magnitude_vector"),
                    mag.clone(),
                ));
            }
        }
        for (name, p) in self.params() {
            if let Some(v) = &p.var {
                out.push((name, v.clone()));
            }
        }
        out
    }

    /// The adapter's tensors under PEFT's key names, in `dtype`.
    pub fn adapter_tensors(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, var) in self.trainable() {
            let key = if name.starts_with(PEFT_PREFIX) {
                name
            } else {
                format!("{PEFT_PREFIX}{}", self.cfg.layout.module_path(&name))
            };
            out.insert(key, var.as_tensor().detach().to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// Loads a PEFT LoRA adapter (ours or one written by PEFT / LLaMA-Factory). `trainable`
    /// keeps its tensors as variables to continue training it.
    pub fn load_adapter(&mut self, dir: &Path, trainable: bool) -> Result<LoraSpec> {
        let mut adapter = self.read_adapter(dir)?;
        // A PiSSA adapter applies to the residual base, as PEFT recomputes it on load.
        if let Some(svd) = adapter.spec.pissa {
            for module in adapter.layers.keys().cloned().collect::<Vec<_>>() {
                self.pissa_residual(&module, &adapter.spec, svd)?;
            }
        }
        for lin in self.linears_mut() {
            if let Some(l) = adapter.layers.remove(&lin.name) {
                lin.lora = Some(l);
            }
        }
        // modules_to_save: full copies of base tensors.
        let dtype = self.trainable_dtype();
        for (name, t) in adapter.full_weights {
            let p = self.param_mut(&name).ok_or_else(|| {
                anyhow!(
                    "{}: `{PEFT_PREFIX}{name}` matches no model weight",
                    dir.display()
                )
            })?;
            p.tensor = t;
            p.var = if trainable {
                Some(Var::from_tensor(&p.tensor.to_dtype(dtype)?)?)
            } else {
                None
            };
        }
        self.sync_vocab_size()?;
        if !trainable {
            self.merge_lora()?;
        }
        Ok(adapter.spec)
    }

    /// Reads a PEFT LoRA adapter for this model without attaching it (a second adapter that
    /// takes turns with the first, like PPO's reward adapter).
    pub fn read_adapter(&self, dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{} is not a PEFT adapter folder (no adapter_config.json)",
                dir.display()
            )
        })?;
        let spec = LoraSpec::from_peft_config(&serde_json::from_str(&text)?, &cfg_path)?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            bail!("{}: adapter_model.safetensors is missing (only safetensors adapters are supported)", dir.display());
        }
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&file, &self.device)?;
        let get = |k: &str| -> Result<Tensor> {
            Ok(tensors
                .get(k)
                .ok_or_else(|| anyhow!("{}: tensor `{k}` missing", file.display()))?
                .to_dtype(self.trainable_dtype())?)
        };
        let mut layers = BTreeMap::new();
        for module in self.target_modules(&spec.targets)? {
            // The module's name in the file: transformers' module path, or an older name.
            let aliases = self.cfg.layout.module_aliases(&module);
            let path = aliases
                .iter()
                .find(|m| tensors.contains_key(&format!("{PEFT_PREFIX}{m}.lora_A.weight")))
                .unwrap_or(&aliases[0]);
            let a = get(&format!("{PEFT_PREFIX}{path}.lora_A.weight"))?;
            let b = get(&format!("{PEFT_PREFIX}{path}.lora_B.weight"))?;
            let magnitude = if spec.use_dora {
                let key = format!("{PEFT_PREFIX}{path}.lora_magnitude_vector");
                let t = tensors
                    .get(&key)
                    .or_else(|| tensors.get(&format!("{key}.weight")));
                Some(Var::from_tensor(
                    &t.ok_or_else(|| anyhow!("{}: `{key}` missing", file.display()))?
                        .to_dtype(self.trainable_dtype())?,
                )?)
            } else {
                None
            };
            layers.insert(module, LoraLayer::new(&a, &b, magnitude, &spec)?);
        }
        let mut full_weights = BTreeMap::new();
        for (key, t) in &tensors {
            if let Some(name) = key.strip_prefix(PEFT_PREFIX) {
                if !name.contains("lora_") {
                    full_weights.insert(self.cfg.layout.internal(name), t.to_dtype(self.dtype)?);
                }
            }
        }
        Ok(Adapter {
            spec,
            layers,
            full_weights,
        })
    }

    /// Folds every LoRA layer into its base weight (W + s·B·A, DoRA-rescaled) and drops it.
    pub fn merge_lora(&mut self) -> Result<()> {
        let model_dtype = self.dtype;
        for lin in self.linears_mut() {
            let Some(l) = lin.lora.take() else {
                continue;
            };
            // In the trainable dtype (f32 for half models): the product is rounded once, at the end.
            let dtype = l.a.dtype();
            let w = lin.weight.to_dense(dtype)?;
            let mut merged = (&w + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?)?;
            if let Some(m) = &l.magnitude {
                let norm = merged.sqr()?.sum_keepdim(1)?.sqrt()?;
                merged =
                    merged.broadcast_mul(&m.as_tensor().unsqueeze(1)?.broadcast_div(&norm)?)?;
            }
            // A quantized base merges into full precision (export); the result is dense.
            lin.weight = LinearWeight::Dense(Param::frozen(merged.to_dtype(model_dtype)?));
        }
        Ok(())
    }
}
