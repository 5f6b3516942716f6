//! Everything a run needs before its first step: where it writes and whether it resumes, the
//! tokenizer, template and examples, the model with its fine-tuning method (LoRA, freeze,
//! full), the objective with its value head, and the optimizer — checked to fit in memory.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use protocol::args::{FinetuningType, Stage};
use protocol::{TrainArgs, WorkerEvent};

use super::batch::{Examples, ImageBatcher};
use super::checkpoint::last_checkpoint;
use super::objective::Objective;
use super::optim::AdamW;
use super::report::Reporter;
use super::TrainOptions;
use crate::data::pipeline::{get_dataset, load_tokenizer_and_template};
use crate::model::adapter::LoraSpec;
use crate::model::quant::QuantFormat;
use crate::model::value_head::{ValueHead, VALUE_HEAD_FILE};
use crate::model::vision::VisionPart;
use crate::model::Model;
use crate::tokenizer::HfTokenizer;

/// A run ready for its first step.
pub(crate) struct Prepared {
    pub output_dir: PathBuf,
    /// The base model's folder (its generation config goes with full checkpoints).
    pub model_dir: PathBuf,
    /// The checkpoint to continue from.
    pub resume: Option<PathBuf>,
    pub tok: HfTokenizer,
    pub model: Model,
    /// The adapter a LoRA run trains (and saves).
    pub lora: Option<LoraSpec>,
    pub objective: Objective,
    pub opt: AdamW,
    pub train: Examples,
    pub eval: Examples,
    pub skipped: usize,
    pub pad: u32,
    /// BAdam's block schedule, positioned at the step the run starts from.
    pub badam: Option<super::badam::Badam>,
}

fn log(rep: &mut dyn Reporter, level: &str, message: String) {
    rep.event(&WorkerEvent::Log {
        level: level.into(),
        message,
    });
}

pub(crate) fn prepare(
    args: &TrainArgs,
    opts: &TrainOptions,
    rep: &mut dyn Reporter,
) -> Result<Prepared> {
    let output_dir = PathBuf::from(
        args.output_dir
            .as_deref()
            .ok_or_else(|| anyhow!("`output_dir` is required"))?,
    );
    let resume = resume_point(args, &output_dir)?;
    if let Some(r) = &resume {
        log(
            rep,
            "info",
            format!("Resuming training from {}.", r.display()),
        );
    }
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;

    let (tok, template, warnings) = load_tokenizer_and_template(args)?;
    for w in warnings {
        log(rep, "warning", w);
    }
    let data = get_dataset(args, &tok, &template)?;
    for s in data.skipped.iter().take(10) {
        log(rep, "warning", format!("skipped {s}"));
    }
    let (mut model, model_dir) = load_model(args, opts, &tok)?;
    if let Some(msg) = describe_quantization(&model) {
        log(rep, "info", msg);
    }
    configure_rope(&mut model, args, rep);
    configure_moe(&mut model, args, rep)?;
    configure_shift_attn(&mut model, args, &tok, rep);
    let resized_args;
    let args = match resized_vocab_targets(&model, args) {
        Some(targets) => {
            log(
                rep,
                "warning",
                format!("Vocab has been resized, add {targets} to trainable params."),
            );
            resized_args = TrainArgs {
                additional_target: Some(targets),
                ..args.clone()
            };
            &resized_args
        }
        None => args,
    };
    let lora = apply_method(&mut model, args)?;
    apply_vision_freezing(&mut model, args, lora.is_some(), rep)?;
    let badam = apply_badam(&mut model, args, resume.as_deref(), rep)?;
    let pad = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
    let head = || value_head(args, opts, &model, resume.is_some(), lora.is_some());
    let objective = Objective::new(args, &model, head, template.stop_token_ids(&tok), pad)?;

    let mut trainable = model.trainable();
    trainable.extend(objective.trainable());
    if trainable.is_empty() {
        bail!("no parameter is trainable with these settings");
    }
    let n_trainable: u64 = trainable.iter().map(|(_, v)| v.elem_count() as u64).sum();
    let n_head: u64 = objective
        .trainable()
        .iter()
        .map(|(_, v)| v.elem_count() as u64)
        .sum();
    let n_all = model.num_params() + n_head;
    if args.print_param_status {
        // LLaMA-Factory's: every parameter with its dtype, device and whether it trains.
        let device = if model.device.is_cpu() { "cpu" } else { "gpu" };
        for (name, p) in model.params() {
            log(
                rep,
                "info",
                format!(
                    "name: {name}, dtype: {:?}, device: {device}, trainable: {}",
                    p.tensor.dtype(),
                    p.var.is_some()
                ),
            );
        }
        for (name, v) in trainable.iter().filter(|(n, _)| n.contains("lora_")) {
            log(
                rep,
                "info",
                format!(
                    "name: {name}, dtype: {:?}, device: {device}, trainable: true",
                    v.dtype()
                ),
            );
        }
    }
    log(
        rep,
        "info",
        format!(
            "trainable params: {n_trainable} || all params: {n_all} || trainable%: {:.4}",
            100.0 * n_trainable as f64 / n_all as f64
        ),
    );

    let opt = optimizer(trainable, args, &galore_targets(&model, args)?)?;
    let projection = if args.use_apollo {
        Some(format!(
            "APOLLO (rank {}, {} projection, {} scaling, every {} steps, scale {})",
            args.apollo_rank,
            args.apollo_proj,
            args.apollo_scale_type,
            args.apollo_update_interval,
            args.apollo_scale
        ))
    } else if args.use_galore {
        Some(format!(
            "GaLore (rank {}, every {} steps, scale {}, {})",
            args.galore_rank, args.galore_update_interval, args.galore_scale, args.galore_proj_type
        ))
    } else {
        None
    };
    if let Some(method) = projection {
        let plain: usize = opt.params.iter().map(|p| 2 * p.var.elem_count()).sum();
        log(
            rep,
            "info",
            format!(
                "{method}: optimizer state {:.1} MB instead of AdamW's {:.1} MB",
                opt.state_elements() as f64 * 4e-6,
                plain as f64 * 4e-6
            ),
        );
    }

    let train = with_images(
        Examples::for_stage(args.stage, &data.train, args.neat_packing),
        &model,
        args,
        &tok,
    )?;
    let eval = if objective.evaluates() {
        with_images(
            Examples::for_stage(args.stage, &data.eval, args.neat_packing),
            &model,
            args,
            &tok,
        )?
    } else {
        if !data.eval.is_empty() {
            log(
                rep,
                "warning",
                "PPO does not evaluate (as in LLaMA-Factory); the eval set is ignored".into(),
            );
        }
        Examples::for_stage(args.stage, &[], false)
    };
    check_memory(
        &model,
        n_trainable,
        args,
        train.max_len() + objective.generated_tokens(),
    )?;
    let mut model = model;
    if crate::ops::bf16_products() && lora.is_some() {
        let (n, bytes) = model.keep_frozen_in_bf16()?;
        log(
            rep,
            "info",
            format!(
                "{n} frozen linear weights kept only in bf16, packed for AMX tiles ({:.0} MB)",
                bytes as f64 / 1e6
            ),
        );
    }
    Ok(Prepared {
        output_dir,
        model_dir,
        resume,
        tok,
        model,
        lora,
        opt,
        objective,
        train,
        eval,
        skipped: data.skipped.len(),
        pad,
        badam,
    })
}

/// BAdam: the block schedule over the trainable layers, advanced to the step a resumed run
/// continues from (whose checkpoint holds every block trained so far), and only the current
/// block left trainable.
fn apply_badam(
    model: &mut Model,
    args: &TrainArgs,
    resume: Option<&Path>,
    rep: &mut dyn Reporter,
) -> Result<Option<super::badam::Badam>> {
    if !args.use_badam {
        return Ok(None);
    }
    if args.badam_mode == protocol::args::BadamMode::Ratio {
        // BlockOptimizerRatio freezes the embedding (LLaMA-Factory passes
        // `include_embedding=False`) and the head (its default); the optimizer masks the rest.
        model.train_only(|n| !n.contains("embed") && !n.contains("lm_head"))?;
        log(
            rep,
            "info",
            format!(
                "Using BAdam optimizer with ratio-based update, update ratio is {}, mask mode is {} (the masks move every {} steps)",
                args.badam_update_ratio,
                args.badam_mask_mode,
                super::badam_ratio::SWITCH_EVERY
            ),
        );
        return Ok(None);
    }
    let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
    let mut badam = super::badam::Badam::new(
        &names,
        args.badam_switch_mode,
        args.badam_switch_interval,
        args.badam_start_block,
        args.seed,
    )?;
    if let Some(ckpt) = resume {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("trainer_state.json")).with_context(|| {
                format!("cannot read {}", ckpt.join("trainer_state.json").display())
            })?,
        )?;
        for _ in 0..state["global_step"].as_u64().unwrap_or(0) {
            badam.after_step();
        }
        // Every block trained so far, from the checkpoint's full weights.
        let file = ckpt.join("model.safetensors");
        let saved = candle_core::safetensors::load(&file, &model.device)
            .map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
        let (layout, dtype) = (model.cfg.layout, model.dtype);
        for (name, p) in model.params_mut() {
            if let Some(t) = saved.get(&layout.file(&name)) {
                p.tensor = t.to_dtype(dtype)?;
                p.var = None;
            }
        }
    }
    model.train_only(|n| badam.is_active(n))?;
    if args.weight_decay != 0.0 && args.weight_decay != super::badam::WEIGHT_DECAY {
        log(rep, "warning", format!("BAdam decays every tensor by {} (BlockOptimizer's behaviour under LLaMA-Factory); `weight_decay: {}` is not used", super::badam::WEIGHT_DECAY, args.weight_decay));
    }
    log(
        rep,
        "info",
        format!(
            "BAdam ({} mode): {} blocks, switching every {} steps ({}); training {}",
            args.badam_mode,
            badam.blocks.len(),
            args.badam_switch_interval,
            args.badam_switch_mode,
            badam.active()
        ),
    );
    Ok(Some(badam))
}

/// The checkpoint to resume from: `resume_from_checkpoint`, else the last `checkpoint-N` of an
/// existing output dir (unless `overwrite_output_dir`), like LLaMA-Factory.
fn resume_point(args: &TrainArgs, output_dir: &Path) -> Result<Option<PathBuf>> {
    let mut resume = args.resume_from_checkpoint.as_ref().map(PathBuf::from);
    if resume.is_none() && output_dir.is_dir() && !args.overwrite_output_dir {
        resume = last_checkpoint(output_dir);
        let has_outputs = [
            "adapter_model.safetensors",
            "model.safetensors",
            "model.safetensors.index.json",
        ]
        .iter()
        .any(|f| output_dir.join(f).exists());
        if resume.is_none() && has_outputs {
            bail!(
                "Output directory {} already exists and is not empty. Please set `overwrite_output_dir: true` or choose another `output_dir`.",
                output_dir.display()
            );
        }
    }
    if let Some(r) = &resume {
        if !r.join("trainer_state.json").exists() {
            bail!(
                "cannot resume from {}: no trainer_state.json there",
                r.display()
            );
        }
    }
    Ok(resume)
}

/// The base model, its vocabulary grown for tokens the template added (`resize_vocab`).
fn load_model(
    args: &TrainArgs,
    opts: &TrainOptions,
    tok: &HfTokenizer,
) -> Result<(Model, PathBuf)> {
    let name = args.model_name_or_path.clone().unwrap_or_default();
    let dir = crate::hub::resolve_model_dir(&name, &args.model_revision)?;
    let quant = QuantFormat::from_args(args)?;
    let mut model = Model::load_quantized(&dir, opts.dtype, &opts.device, quant)
        .with_context(|| format!("loading model {}", dir.display()))?;
    crate::model::depths::configure(&mut model, args.mixture_of_depths, args.seed)?;
    if let Some(q) = model.quantized().next() {
        if args.finetuning_type != protocol::args::FinetuningType::Lora {
            bail!(
                "the model's weights are quantized ({}): a quantized model trains with LoRA only (`finetuning_type: lora`), as in LLaMA-Factory",
                q.format.describe()
            );
        }
    }
    if model.cfg.mixture_of_depths && args.shift_attn {
        bail!("`shift_attn` cannot be combined with Mixture-of-Depths (`mixture_of_depths`): the routed layers attend over the tokens they chose");
    }
    if tok.len() > model.cfg.vocab_size {
        if !args.resize_vocab {
            bail!(
                "the template added tokens {:?} that the model's vocabulary ({} entries) lacks; set `resize_vocab: true` to train their embeddings, or choose the model's own template",
                tok.new_tokens,
                model.cfg.vocab_size
            );
        }
        model.resize_vocab(tok.len())?;
    }
    model.checkpointing = args.gradient_checkpointing && !args.disable_gradient_checkpointing;
    model.neftune_alpha = args.neftune_noise_alpha.filter(|a| *a > 0.0);
    // A diagnostic switch for benchmarks (`bench e2e --padded`): the result is the same either
    // way, only slower padded.
    model.padding_free = std::env::var("LLAMAFACTORY_PADDING_FREE").map_or(true, |v| v != "0");
    Ok((model, dir))
}

/// What a QLoRA base is stored as: the format and the weights that took a narrower-row
/// fallback.
pub(crate) fn describe_quantization(model: &Model) -> Option<String> {
    let all: Vec<_> = model.quantized().collect();
    let first = all.first()?;
    let bytes: usize = all.iter().map(|q| q.bytes()).sum();
    let fallback = all.iter().filter(|q| q.stored() != q.format).count();
    let mut msg = format!(
        "the base's {} linear weights are quantized: {} ({:.1} MiB)",
        all.len(),
        first.format.describe(),
        bytes as f64 / (1 << 20) as f64
    );
    if let Some(q) = all.iter().find(|q| q.stored() != q.format) {
        msg += &format!(
            "; {fallback} of them as {} (rows of {} values are not whole 256-blocks)",
            q.stored().describe(),
            q.cols,
        );
    }
    let dense = model.linears().count() - all.len();
    if dense > 0 {
        msg += &format!("; {dense} stay in full precision (rows that are not whole 32-blocks)");
    }
    Some(msg)
}

/// `rope_scaling` for training on `cutoff_len` tokens, with LLaMA-Factory's message.
fn configure_rope(model: &mut Model, args: &TrainArgs, rep: &mut dyn Reporter) {
    if let Some(kind) = args.rope_scaling {
        let msg = model.cfg.apply_rope_scaling(kind, Some(args.cutoff_len));
        log(rep, "info", msg);
    }
}

/// The load-balancing loss of a mixture of experts, as LLaMA-Factory's `configure_moe` turns it
/// on: `moe_aux_loss_coef` (or the checkpoint's own `output_router_logits`) sets
/// `router_aux_loss_coef`, and the loss joins the language-model loss.
fn configure_moe(model: &mut Model, args: &TrainArgs, rep: &mut dyn Reporter) -> Result<()> {
    let Some(moe) = &model.cfg.moe else {
        if args.moe_aux_loss_coef.is_some() {
            log(
                rep,
                "warning",
                format!(
                    "`moe_aux_loss_coef` has no effect: {} is not a mixture-of-experts model",
                    model.cfg.model_type
                ),
            );
        }
        return Ok(());
    };
    let coef = match args.moe_aux_loss_coef {
        Some(c) if c != 0.0 => Some(c),
        Some(_) => None,
        None => moe.output_router_logits.then_some(moe.router_aux_loss_coef),
    };
    let Some(coef) = coef else {
        return Ok(());
    };
    if !matches!(args.stage, Stage::Sft | Stage::Pt) {
        bail!(
            "`moe_aux_loss_coef`: the load-balancing loss joins the language-model loss of `stage: sft` or `pt`; remove it for `stage: {}`",
            args.stage
        );
    }
    if model.checkpointing {
        bail!("`moe_aux_loss_coef` with gradient checkpointing is not supported yet (the recomputed layers do not return their router logits); set `gradient_checkpointing: false` or remove `moe_aux_loss_coef`");
    }
    log(
        rep,
        "info",
        format!("router load-balancing loss on, coefficient {coef}"),
    );
    model.router_aux_loss_coef = Some(coef);
    Ok(())
}

/// LLaMA-Factory's rule for LoRA with `resize_vocab`: unless `additional_target` says
/// otherwise, the embedding (and an untied LM head) train whole, so the new tokens learn
/// their rows and the adapter carries them (PEFT's `modules_to_save`).
fn resized_vocab_targets(model: &Model, args: &TrainArgs) -> Option<String> {
    if args.finetuning_type != FinetuningType::Lora
        || args.additional_target.is_some()
        || !args.resize_vocab
    {
        return None;
    }
    Some(if model.lm_head.is_some() {
        "embed_tokens,lm_head".into()
    } else {
        "embed_tokens".into()
    })
}

/// Examples whose batches carry their images, when they have any (a vision-language model).
fn with_images(
    examples: Examples,
    model: &Model,
    args: &TrainArgs,
    tok: &crate::tokenizer::HfTokenizer,
) -> Result<Examples> {
    if !examples.has_images() {
        return Ok(examples);
    }
    if args.packing() || args.neat_packing {
        bail!("`packing` with images is not supported; remove `packing` / `neat_packing`");
    }
    let batcher = ImageBatcher::for_model(
        model.cfg.vision.as_ref(),
        &tok.dir,
        args.image_max_pixels,
        args.image_min_pixels,
    )?;
    Ok(examples.with_images(std::sync::Arc::new(batcher)))
}

/// The run's optimizer over `trainable`. BAdam's decays every tensor by BlockOptimizer's
/// effective weight decay ([`super::badam::WEIGHT_DECAY`]).
pub(crate) fn optimizer(
    trainable: Vec<(String, candle_core::Var)>,
    args: &TrainArgs,
    galore_targets: &[String],
) -> Result<AdamW> {
    if args.use_badam && args.badam_mode == protocol::args::BadamMode::Ratio {
        let masks = super::badam_ratio::RatioMasks::new(
            trainable.len(),
            args.badam_update_ratio,
            args.badam_mask_mode,
            super::badam_ratio::SWITCH_EVERY,
            args.seed,
        );
        let groups = trainable
            .into_iter()
            .map(|(name, var)| super::optim::ParamGroup {
                name,
                var,
                weight_decay: 0.0,
                lr_scale: 1.0,
                galore: None,
            })
            .collect();
        return AdamW::ratio(
            groups,
            (args.adam_beta1, args.adam_beta2, args.adam_epsilon),
            masks,
        );
    }
    if args.use_badam {
        let groups = trainable
            .into_iter()
            .map(|(name, var)| super::optim::ParamGroup {
                name,
                var,
                weight_decay: super::badam::WEIGHT_DECAY,
                lr_scale: 1.0,
                galore: None,
            })
            .collect();
        return AdamW::new(groups, args.adam_beta1, args.adam_beta2, args.adam_epsilon);
    }
    AdamW::for_training(trainable, args, galore_targets)
}

/// `shift_attn`: LongLoRA's S²-Attn in training passes, as LLaMA-Factory's
/// `configure_longlora` sets it (Llama models only; other models are told it has no effect).
fn configure_shift_attn(
    model: &mut Model,
    args: &TrainArgs,
    tok: &HfTokenizer,
    rep: &mut dyn Reporter,
) {
    if !args.shift_attn {
        return;
    }
    if model.cfg.model_type == "llama" {
        model.shift_attn = Some(tok.pad_id().or(tok.eos_id()).unwrap_or(0));
        log(
            rep,
            "info",
            "Using shift short attention with group_size_ratio=1/4.".into(),
        );
    } else {
        log(
            rep,
            "warning",
            format!(
                "Current model does not support shift short attention (`shift_attn` applies to llama models; this is {}).",
                model.cfg.model_type
            ),
        );
    }
}

/// The linear modules whose weights GaLore projects: LLaMA-Factory's `galore_target` (`all`:
/// every linear module kind of the decoder), matched within module names.
fn galore_targets(model: &Model, args: &TrainArgs) -> Result<Vec<String>> {
    let (key, target) = if args.use_galore {
        ("galore_target", &args.galore_target)
    } else if args.use_apollo {
        ("apollo_target", &args.apollo_target)
    } else {
        return Ok(Vec::new());
    };
    let wanted = if target.trim() == "all" {
        model.linear_kinds()
    } else {
        TrainArgs::split_list(Some(target))
    };
    let modules: Vec<String> = model
        .linears()
        .filter(|l| wanted.iter().any(|t| l.name.contains(t.as_str())))
        .map(|l| l.name.clone())
        .collect();
    if modules.is_empty() {
        bail!(
            "`{key}: {target}` matches no linear module; choose from {} or `all`",
            model.linear_kinds().join(", ")
        );
    }
    Ok(modules)
}

/// LLaMA-Factory's freezing keys on a vision-language model: the vision tower trains only with
/// `freeze_vision_tower: false`, the projector (Qwen2-VL's merger) only with
/// `freeze_multi_modal_projector: false` (fully, also next to LoRA), the language model not
/// with `freeze_language_model`; `train_mm_proj_only` trains the projector alone. On a text-only
/// model a changed key says it has no effect.
fn apply_vision_freezing(
    model: &mut Model,
    args: &TrainArgs,
    lora: bool,
    rep: &mut dyn Reporter,
) -> Result<()> {
    let changed = !args.freeze_vision_tower
        || !args.freeze_multi_modal_projector
        || args.freeze_language_model
        || args.train_mm_proj_only;
    if model.vision.is_none() {
        if changed {
            log(rep, "warning", "`freeze_vision_tower` / `freeze_multi_modal_projector` / `freeze_language_model` / `train_mm_proj_only` have no effect: the model has no vision tower".into());
        }
        return Ok(());
    }
    let only_projector = args.train_mm_proj_only;
    let train_tower = !args.freeze_vision_tower && !only_projector;
    let train_projector = !args.freeze_multi_modal_projector || only_projector;
    let freeze_lm = args.freeze_language_model || only_projector;
    if lora && train_tower {
        bail!("`freeze_vision_tower: false` with LoRA is not supported (LoRA adapts the language model here); use `finetuning_type: full` or `freeze` to train the vision tower");
    }
    if lora && freeze_lm && model.lora_layers().values().next().is_some() {
        bail!("`freeze_language_model` / `train_mm_proj_only` with LoRA would train nothing of the language model; use `finetuning_type: full` to train the projector alone");
    }
    let dtype = model.trainable_dtype();
    let kind = model.vision.as_ref().map(|v| v.cfg().kind);
    for (name, p) in model.params_mut() {
        let wanted = match kind.and_then(|k| k.part(&name)) {
            Some(VisionPart::Projector) => train_projector,
            Some(VisionPart::Tower) => train_tower && !lora,
            None => !freeze_lm && p.var.is_some(),
        };
        match (wanted, p.var.is_some()) {
            (true, false) => {
                p.var = Some(candle_core::Var::from_tensor(&p.tensor.to_dtype(dtype)?)?)
            }
            (false, true) => p.var = None,
            _ => {}
        }
    }
    Ok(())
}

/// Makes the method's tensors trainable. LoRA merges all adapters given but the last, which it
/// continues (or adds a fresh one: none given, or `create_new_adapter`).
fn apply_method(model: &mut Model, args: &TrainArgs) -> Result<Option<LoraSpec>> {
    match args.finetuning_type {
        FinetuningType::Lora => {
            let adapters = TrainArgs::split_list(args.adapter_name_or_path.as_deref());
            let (merge, resume_adapter) = match (adapters.split_last(), args.create_new_adapter) {
                (Some((last, rest)), false) => (rest.to_vec(), Some(last.clone())),
                _ => (adapters.clone(), None),
            };
            for a in &merge {
                model.load_adapter(Path::new(a), false)?;
            }
            Ok(Some(match resume_adapter {
                Some(a) => model.load_adapter(Path::new(&a), true)?,
                None => {
                    let spec = LoraSpec::for_model(args, model)?;
                    model.add_lora(&spec, args.seed)?;
                    spec
                }
            }))
        }
        FinetuningType::Freeze => {
            model.setup_freeze(args)?;
            Ok(None)
        }
        FinetuningType::Full => {
            model.setup_full()?;
            Ok(None)
        }
    }
}

/// The value head RM trains and PPO's critic: the one next to a continued adapter, else a
/// fresh one (a resumed run restores its own from the checkpoint).
fn value_head(
    args: &TrainArgs,
    opts: &TrainOptions,
    model: &Model,
    resuming: bool,
    lora: bool,
) -> Result<ValueHead> {
    debug_assert!(args.stage.has_value_head());
    let continued = TrainArgs::split_list(args.adapter_name_or_path.as_deref())
        .last()
        .map(PathBuf::from)
        .filter(|d| {
            !resuming && lora && !args.create_new_adapter && d.join(VALUE_HEAD_FILE).exists()
        });
    match continued {
        Some(dir) => ValueHead::load(&dir, opts.dtype, &opts.device),
        None => ValueHead::new(model.cfg.hidden_size, args.seed, opts.dtype, &opts.device),
    }
}

fn available_memory() -> Option<u64> {
    crate::sysinfo::proc_kib("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024)
}

/// Refuses runs that clearly cannot fit in memory, with the numbers.
fn check_memory(model: &Model, trainable: u64, args: &TrainArgs, seq: usize) -> Result<()> {
    let elem = model.dtype.size_in_bytes() as u64;
    let base = model.base_bytes();
    let tokens = (args.per_device_train_batch_size * seq) as u64;
    let activations =
        super::memory::activation_bytes(&model.cfg, tokens, seq, elem, model.head_trains());
    let need = base + trainable * elem * 4 + activations;
    if let Some(avail) = available_memory() {
        if need > avail {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            bail!(
                "this run needs about {:.1} GiB ({:.1} GiB weights, {:.1} GiB gradients and optimizer state, {:.1} GiB activations for batch {} × {} tokens) but only {:.1} GiB is available; lower `per_device_train_batch_size` or `cutoff_len`, or use LoRA",
                gib(need),
                gib(base),
                gib(trainable * elem * 4),
                gib(activations),
                args.per_device_train_batch_size,
                seq,
                gib(avail)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Collects the log lines a setup step reports.
    #[derive(Default)]
    struct Lines(Vec<String>);

    impl Reporter for Lines {
        fn event(&mut self, e: &WorkerEvent) {
            if let WorkerEvent::Log { message, .. } = e {
                self.0.push(message.clone());
            }
        }
    }

    fn fixture(name: &str) -> Model {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        Model::load(&dir.join(name), DType::F32, &Device::Cpu).unwrap()
    }

    /// Which parts of the model train after the method and the vision freezing keys.
    fn trained_parts(name: &str, args: &TrainArgs) -> Result<(bool, bool, bool)> {
        let mut m = fixture(name);
        let lora = apply_method(&mut m, args)?.is_some();
        apply_vision_freezing(&mut m, args, lora, &mut Lines::default())?;
        let kind = m.vision.as_ref().unwrap().cfg().kind;
        let parts: Vec<Option<VisionPart>> = m
            .trainable()
            .into_iter()
            .map(|(n, _)| kind.part(&n))
            .collect();
        let has = |p: Option<VisionPart>| parts.contains(&p);
        Ok((
            has(Some(VisionPart::Tower)),
            has(Some(VisionPart::Projector)),
            has(None),
        ))
    }

    #[test]
    fn vision_freezing_keys_choose_what_trains_as_llamafactory() {
        use protocol::args::FinetuningType;
        let full = TrainArgs {
            finetuning_type: FinetuningType::Full,
            ..TrainArgs::default()
        };
        // Defaults: the tower and the projector stay frozen, LoRA or full.
        assert_eq!(
            trained_parts("qwen2_vl", &TrainArgs::default()).unwrap(),
            (false, false, true)
        );
        assert_eq!(
            trained_parts("qwen2_vl", &full).unwrap(),
            (false, false, true)
        );
        let projector = TrainArgs {
            freeze_multi_modal_projector: false,
            ..TrainArgs::default()
        };
        assert_eq!(
            trained_parts("qwen2_vl", &projector).unwrap(),
            (false, true, true)
        );
        let tower = TrainArgs {
            freeze_vision_tower: false,
            ..full.clone()
        };
        assert_eq!(
            trained_parts("qwen2_vl", &tower).unwrap(),
            (true, false, true)
        );
        let no_lm = TrainArgs {
            freeze_language_model: true,
            freeze_multi_modal_projector: false,
            ..full.clone()
        };
        assert_eq!(
            trained_parts("qwen2_vl", &no_lm).unwrap(),
            (false, true, false)
        );
        let only = TrainArgs {
            train_mm_proj_only: true,
            ..full
        };
        assert_eq!(
            trained_parts("qwen2_vl", &only).unwrap(),
            (false, true, false)
        );
        // LLaVA names its parts differently (`vision_tower.*`, `multi_modal_projector.*`): the
        // same keys choose the same parts.
        assert_eq!(
            trained_parts("llava", &TrainArgs::default()).unwrap(),
            (false, false, true)
        );
        assert_eq!(trained_parts("llava", &only).unwrap(), (false, true, false));
        assert_eq!(trained_parts("llava", &tower).unwrap(), (true, false, true));
        // LoRA cannot train the tower here: said by name.
        let e = trained_parts(
            "qwen2_vl",
            &TrainArgs {
                freeze_vision_tower: false,
                ..TrainArgs::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("freeze_vision_tower"), "{e}");
        // A text model: a changed key warns that it has no effect.
        let mut m = fixture("qwen2");
        let mut lines = Lines::default();
        apply_vision_freezing(&mut m, &projector, true, &mut lines).unwrap();
        assert!(
            lines.0.iter().any(|l| l.contains("have no effect")),
            "{:?}",
            lines.0
        );
    }

    #[test]
    fn moe_aux_loss_coef_turns_the_load_balancing_loss_on_or_says_why_not() {
        let on = TrainArgs {
            moe_aux_loss_coef: Some(0.02),
            ..TrainArgs::default()
        };
        let mut m = fixture("mixtral");
        assert_eq!(m.router_aux_loss_coef, None, "off unless asked");
        configure_moe(&mut m, &TrainArgs::default(), &mut Lines::default()).unwrap();
        assert_eq!(
            m.router_aux_loss_coef, None,
            "the checkpoint does not ask for it"
        );
        configure_moe(&mut m, &on, &mut Lines::default()).unwrap();
        assert_eq!(m.router_aux_loss_coef, Some(0.02));

        let mut m = fixture("mixtral");
        let dpo = TrainArgs {
            stage: Stage::Dpo,
            ..on.clone()
        };
        let e = configure_moe(&mut m, &dpo, &mut Lines::default()).unwrap_err();
        assert!(e.to_string().contains("`moe_aux_loss_coef`"), "{e}");
        m.checkpointing = true;
        let e = configure_moe(&mut m, &on, &mut Lines::default()).unwrap_err();
        assert!(e.to_string().contains("gradient checkpointing"), "{e}");

        let mut m = fixture("llama");
        let mut lines = Lines::default();
        configure_moe(&mut m, &on, &mut lines).unwrap();
        assert_eq!(m.router_aux_loss_coef, None);
        assert!(
            lines
                .0
                .iter()
                .any(|l| l.contains("`moe_aux_loss_coef` has no effect")),
            "{:?}",
            lines.0
        );
    }
}
