//! `TrainArgs`: LLaMA-Factory's model, data, fine-tuning, generation and training arguments in one
//! flat namespace, exactly as they are spelled in a training YAML. Defaults are LLaMA-Factory's
//! (and Hugging Face `Seq2SeqTrainingArguments`' where LLaMA-Factory inherits them).

use serde::{Deserialize, Serialize};

pub use crate::options::{
    ApolloProj, ApolloProjType, ApolloScaleType, BadamMaskMode, BadamMode, BadamSwitchMode, Choice,
    ExportFormat, FinetuningType, GaloreProjType, GgufType, InferDtype, IntervalStrategy,
    MixStrategy, MixtureOfDepths, PrefLossType, QuantizationMethod, QuantizationType,
    RewardModelType, RopeScalingType, SchedulerType, Stage,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct TrainArgs {
    // ---- model ----
    pub model_name_or_path: Option<String>,
    pub adapter_name_or_path: Option<String>,
    pub adapter_folder: Option<String>,
    pub cache_dir: Option<String>,
    pub trust_remote_code: bool,
    pub use_fast_tokenizer: bool,
    pub resize_vocab: bool,
    pub split_special_tokens: bool,
    pub add_tokens: Option<String>,
    pub add_special_tokens: Option<String>,
    pub model_revision: String,
    pub low_cpu_mem_usage: bool,
    pub rope_scaling: Option<RopeScalingType>,
    /// Mixture-of-experts models: the load-balancing loss's coefficient (turns the loss on).
    pub moe_aux_loss_coef: Option<f64>,
    // ---- vision-language models ----
    /// The vision tower stays frozen (LLaMA-Factory's default).
    pub freeze_vision_tower: bool,
    /// The multi-modal projector (Qwen2-VL's merger, LLaVA's `multi_modal_projector`) stays frozen.
    pub freeze_multi_modal_projector: bool,
    /// The language model stays frozen (no LoRA or trained weights in it).
    pub freeze_language_model: bool,
    /// Full fine-tuning of the projector alone.
    pub train_mm_proj_only: bool,
    pub flash_attn: String,
    pub shift_attn: bool,
    /// Mixture-of-Depths: routed odd layers (`convert` a dense model, `load` a routed one).
    pub mixture_of_depths: Option<MixtureOfDepths>,
    pub use_unsloth: bool,
    pub enable_liger_kernel: bool,
    pub disable_gradient_checkpointing: bool,
    pub upcast_layernorm: bool,
    pub upcast_lmhead_output: bool,
    pub train_from_scratch: bool,
    pub infer_backend: String,
    pub infer_dtype: InferDtype,
    pub use_kv_cache: bool,
    pub print_param_status: bool,
    pub quantization_method: QuantizationMethod,
    pub quantization_bit: Option<u32>,
    pub quantization_type: QuantizationType,
    pub double_quantization: bool,
    pub hf_hub_token: Option<String>,
    // ---- export ----
    pub export_dir: Option<String>,
    pub export_size: u32,
    pub export_device: String,
    pub export_legacy_format: bool,
    pub export_quantization_bit: Option<u32>,
    /// GPTQ's calibration texts: a file (its `text` column) or a dataset of `dataset_dir`.
    pub export_quantization_dataset: Option<String>,
    /// Calibration windows (LLaMA-Factory's 128).
    pub export_quantization_nsamples: usize,
    /// Tokens per calibration window (LLaMA-Factory's 1024).
    pub export_quantization_maxlen: usize,
    /// `safetensors` (a Hugging Face folder) or `gguf` (one llama.cpp / Ollama file).
    pub export_format: ExportFormat,
    /// GGUF weight type: `f16`, `q8_0` or `q4_k_m`.
    pub export_gguf_type: GgufType,
    // ---- data ----
    pub template: Option<String>,
    pub dataset: Option<String>,
    pub eval_dataset: Option<String>,
    pub dataset_dir: String,
    pub media_dir: Option<String>,
    /// Images above this many pixels are scaled down before the processor (LLaMA-Factory's
    /// regularization), below `image_min_pixels` scaled up.
    pub image_max_pixels: usize,
    pub image_min_pixels: usize,
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    pub streaming: bool,
    pub buffer_size: usize,
    pub mix_strategy: MixStrategy,
    pub interleave_probs: Option<String>,
    pub overwrite_cache: bool,
    pub preprocessing_batch_size: usize,
    pub preprocessing_num_workers: Option<usize>,
    pub max_samples: Option<usize>,
    pub eval_num_beams: Option<usize>,
    pub ignore_pad_token_for_loss: bool,
    /// A fraction of the data when below 1, a number of examples otherwise.
    pub val_size: f64,
    pub eval_on_each_dataset: bool,
    /// `None` means: on for `pt`, off otherwise.
    pub packing: Option<bool>,
    pub neat_packing: bool,
    pub tool_format: Option<String>,
    pub default_system: Option<String>,
    pub enable_thinking: bool,
    pub preserve_thinking: bool,
    pub tokenized_path: Option<String>,
    // ---- fine-tuning method ----
    pub stage: Stage,
    pub finetuning_type: FinetuningType,
    pub pure_bf16: bool,
    pub use_llama_pro: bool,
    pub freeze_trainable_layers: i64,
    pub freeze_trainable_modules: String,
    pub freeze_extra_modules: Option<String>,
    pub lora_rank: usize,
    /// `None` means twice `lora_rank`.
    pub lora_alpha: Option<f64>,
    pub lora_dropout: f64,
    pub lora_target: String,
    pub additional_target: Option<String>,
    pub loraplus_lr_ratio: Option<f64>,
    pub loraplus_lr_embedding: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub pissa_init: bool,
    pub pissa_iter: i64,
    pub pissa_convert: bool,
    pub create_new_adapter: bool,
    // ---- GaLore ----
    /// Full-parameter training with gradients projected to a low-rank subspace.
    pub use_galore: bool,
    /// Linear modules whose weights GaLore projects (`all`: every linear module).
    pub galore_target: String,
    pub galore_rank: usize,
    /// Steps between refreshes of the projection (an SVD of the gradient).
    pub galore_update_interval: usize,
    pub galore_scale: f64,
    pub galore_proj_type: GaloreProjType,
    /// LLaMA-Factory's per-layer updates (no gradient clipping, no accumulation).
    pub galore_layerwise: bool,
    // ---- APOLLO ----
    /// Full-parameter training with gradients scaled by a low-rank Adam ratio.
    pub use_apollo: bool,
    pub apollo_target: String,
    pub apollo_rank: usize,
    pub apollo_update_interval: usize,
    pub apollo_scale: f64,
    pub apollo_proj: ApolloProj,
    pub apollo_proj_type: ApolloProjType,
    pub apollo_scale_type: ApolloScaleType,
    /// Per-layer updates (no gradient clipping, no accumulation).
    pub apollo_layerwise: bool,
    pub apollo_scale_front: bool,
    // ---- BAdam ----
    /// Block coordinate descent: one decoder layer trains at a time.
    pub use_badam: bool,
    pub badam_mode: BadamMode,
    /// The block to start with (by default the first, or the last when descending).
    pub badam_start_block: Option<usize>,
    pub badam_switch_mode: BadamSwitchMode,
    /// Steps each block trains for.
    pub badam_switch_interval: usize,
    pub badam_update_ratio: f64,
    pub badam_mask_mode: BadamMaskMode,
    /// 1 or more: log each block switch.
    pub badam_verbose: u32,
    // ---- preference / reward ----
    pub pref_beta: f64,
    pub pref_ftx: f64,
    pub pref_bco_weight: f64,
    pub pref_loss: PrefLossType,
    pub dpo_label_smoothing: f64,
    pub simpo_gamma: f64,
    pub ld_alpha: Option<f64>,
    pub kto_chosen_weight: f64,
    pub kto_rejected_weight: f64,
    pub ppo_buffer_size: usize,
    pub ppo_epochs: usize,
    pub ppo_score_norm: bool,
    pub ppo_target: f64,
    pub ppo_whiten_rewards: bool,
    pub ref_model: Option<String>,
    pub ref_model_adapters: Option<String>,
    pub reward_model: Option<String>,
    pub reward_model_adapters: Option<String>,
    pub reward_model_type: RewardModelType,
    pub compute_accuracy: bool,
    pub disable_shuffling: bool,
    pub early_stopping_steps: Option<usize>,
    pub plot_loss: bool,
    pub include_effective_tokens_per_second: bool,
    // ---- generation ----
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub num_beams: usize,
    pub max_length: usize,
    pub max_new_tokens: usize,
    pub repetition_penalty: f64,
    pub length_penalty: f64,
    pub skip_special_tokens: bool,
    // ---- training loop ----
    pub output_dir: Option<String>,
    pub overwrite_output_dir: bool,
    pub do_train: bool,
    pub do_eval: bool,
    pub do_predict: bool,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub num_train_epochs: f64,
    pub max_steps: i64,
    pub lr_scheduler_type: SchedulerType,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub logging_steps: usize,
    pub save_steps: usize,
    pub save_strategy: IntervalStrategy,
    pub save_total_limit: Option<usize>,
    pub save_only_model: bool,
    pub save_safetensors: bool,
    pub eval_strategy: IntervalStrategy,
    pub eval_steps: Option<usize>,
    pub bf16: bool,
    pub fp16: bool,
    pub gradient_checkpointing: bool,
    /// NEFTune: uniform noise of magnitude α/√(seq·hidden) added to the input embeddings while
    /// training (transformers' `neftune_noise_alpha`); none when unset.
    pub neftune_noise_alpha: Option<f64>,
    pub report_to: Option<String>,
    /// Where TensorBoard's event files go (default `<output_dir>/runs/<date>_<host>`).
    pub logging_dir: Option<String>,
    pub run_name: Option<String>,
    /// Seconds a collective operation waits for the other ranks of a data-parallel run
    /// before the rank ends with an error (transformers' default: 1800).
    pub ddp_timeout: u64,
    /// Data-parallel ranks on this machine (LLaMA-Factory's `NPROC_PER_NODE`; LlamaBoard's
    /// device count): one per GPU over NCCL, or CPU ranks over MPI. Unset: one per GPU when
    /// several are visible (as LLaMA-Factory), else one process.
    pub nproc_per_node: Option<usize>,
    pub deepspeed: Option<String>,
    pub resume_from_checkpoint: Option<String>,
    pub predict_with_generate: bool,
    pub dataloader_num_workers: usize,
    pub seed: u64,
    pub optim: String,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            model_name_or_path: None,
            adapter_name_or_path: None,
            adapter_folder: None,
            cache_dir: None,
            trust_remote_code: false,
            use_fast_tokenizer: true,
            resize_vocab: false,
            split_special_tokens: false,
            add_tokens: None,
            add_special_tokens: None,
            model_revision: "main".into(),
            low_cpu_mem_usage: true,
            rope_scaling: None,
            moe_aux_loss_coef: None,
            freeze_vision_tower: true,
            freeze_multi_modal_projector: true,
            freeze_language_model: false,
            train_mm_proj_only: false,
            flash_attn: "auto".into(),
            shift_attn: false,
            mixture_of_depths: None,
            use_unsloth: false,
            enable_liger_kernel: false,
            disable_gradient_checkpointing: false,
            upcast_layernorm: false,
            upcast_lmhead_output: false,
            train_from_scratch: false,
            infer_backend: "huggingface".into(),
            infer_dtype: InferDtype::Auto,
            use_kv_cache: true,
            print_param_status: false,
            quantization_method: QuantizationMethod::Bnb,
            quantization_bit: None,
            quantization_type: QuantizationType::Nf4,
            double_quantization: true,
            hf_hub_token: None,
            export_dir: None,
            export_size: 5,
            export_device: "cpu".into(),
            export_legacy_format: false,
            export_quantization_bit: None,
            export_quantization_dataset: None,
            export_quantization_nsamples: 128,
            export_quantization_maxlen: 1024,
            export_format: ExportFormat::Safetensors,
            export_gguf_type: GgufType::F16,
            template: None,
            dataset: None,
            eval_dataset: None,
            dataset_dir: "data".into(),
            media_dir: None,
            image_max_pixels: 768 * 768,
            image_min_pixels: 32 * 32,
            cutoff_len: 2048,
            train_on_prompt: false,
            mask_history: false,
            streaming: false,
            buffer_size: 16384,
            mix_strategy: MixStrategy::Concat,
            interleave_probs: None,
            overwrite_cache: false,
            preprocessing_batch_size: 1000,
            preprocessing_num_workers: None,
            max_samples: None,
            eval_num_beams: None,
            ignore_pad_token_for_loss: true,
            val_size: 0.0,
            eval_on_each_dataset: false,
            packing: None,
            neat_packing: false,
            tool_format: None,
            default_system: None,
            enable_thinking: true,
            preserve_thinking: false,
            tokenized_path: None,
            stage: Stage::Sft,
            finetuning_type: FinetuningType::Lora,
            pure_bf16: false,
            use_llama_pro: false,
            freeze_trainable_layers: 2,
            freeze_trainable_modules: "all".into(),
            freeze_extra_modules: None,
            lora_rank: 8,
            lora_alpha: None,
            lora_dropout: 0.0,
            lora_target: "all".into(),
            additional_target: None,
            loraplus_lr_ratio: None,
            loraplus_lr_embedding: 1e-6,
            use_rslora: false,
            use_dora: false,
            pissa_init: false,
            pissa_iter: 16,
            pissa_convert: false,
            create_new_adapter: false,
            use_galore: false,
            galore_target: "all".into(),
            galore_rank: 16,
            galore_update_interval: 200,
            galore_scale: 2.0,
            galore_proj_type: GaloreProjType::Std,
            galore_layerwise: false,
            use_apollo: false,
            apollo_target: "all".into(),
            apollo_rank: 16,
            apollo_update_interval: 200,
            apollo_scale: 32.0,
            apollo_proj: ApolloProj::Random,
            apollo_proj_type: ApolloProjType::Std,
            apollo_scale_type: ApolloScaleType::Channel,
            apollo_layerwise: false,
            apollo_scale_front: false,
            use_badam: false,
            badam_mode: BadamMode::Layer,
            badam_start_block: None,
            badam_switch_mode: BadamSwitchMode::Ascending,
            badam_switch_interval: 50,
            badam_update_ratio: 0.05,
            badam_mask_mode: BadamMaskMode::Adjacent,
            badam_verbose: 0,
            pref_beta: 0.1,
            pref_ftx: 0.0,
            pref_bco_weight: 0.0,
            pref_loss: PrefLossType::Sigmoid,
            dpo_label_smoothing: 0.0,
            simpo_gamma: 0.5,
            ld_alpha: None,
            kto_chosen_weight: 1.0,
            kto_rejected_weight: 1.0,
            ppo_buffer_size: 1,
            ppo_epochs: 4,
            ppo_score_norm: false,
            ppo_target: 6.0,
            ppo_whiten_rewards: false,
            ref_model: None,
            ref_model_adapters: None,
            reward_model: None,
            reward_model_adapters: None,
            reward_model_type: RewardModelType::Lora,
            compute_accuracy: false,
            disable_shuffling: false,
            early_stopping_steps: None,
            plot_loss: false,
            include_effective_tokens_per_second: false,
            do_sample: true,
            temperature: 0.95,
            top_p: 0.7,
            top_k: 50,
            num_beams: 1,
            max_length: 1024,
            max_new_tokens: 1024,
            repetition_penalty: 1.0,
            length_penalty: 1.0,
            skip_special_tokens: true,
            output_dir: None,
            overwrite_output_dir: false,
            do_train: false,
            do_eval: false,
            do_predict: false,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            num_train_epochs: 3.0,
            max_steps: -1,
            lr_scheduler_type: SchedulerType::Linear,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            logging_steps: 500,
            save_steps: 500,
            save_strategy: IntervalStrategy::Steps,
            save_total_limit: None,
            save_only_model: false,
            save_safetensors: true,
            eval_strategy: IntervalStrategy::No,
            eval_steps: None,
            bf16: false,
            fp16: false,
            gradient_checkpointing: false,
            neftune_noise_alpha: None,
            report_to: None,
            logging_dir: None,
            run_name: None,
            ddp_timeout: 1800,
            nproc_per_node: None,
            deepspeed: None,
            resume_from_checkpoint: None,
            predict_with_generate: false,
            dataloader_num_workers: 0,
            seed: 42,
            optim: "adamw_torch".into(),
        }
    }
}

/// What the engine does with a LLaMA-Factory key it does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Accepted so LLaMA-Factory YAMLs run unchanged, but it changes nothing here (the reason):
    /// a non-default value earns a warning, never silence.
    NoEffect(&'static str),
    /// A feature this engine does not have (what to do instead): a non-default value is an
    /// error that names the key.
    Unsupported(&'static str),
}

/// Every key of [`TrainArgs`] the engine does not read, and why. Every other key is read (a
/// test scans the engine's sources for each one), so no key is ever silently ignored.
pub const UNREAD_KEYS: &[(&str, KeyUse)] = &[
    ("trust_remote_code", KeyUse::NoEffect("no Python code runs here; the remote-code families supported (Baichuan 2) are built in")),
    ("use_fast_tokenizer", KeyUse::NoEffect("there is one tokenizer implementation (Hugging Face `tokenizers`)")),
    ("low_cpu_mem_usage", KeyUse::NoEffect("weights always load one tensor at a time")),
    ("flash_attn", KeyUse::NoEffect("attention is computed by this engine's own kernels")),
    ("use_unsloth", KeyUse::NoEffect("Unsloth's kernels are PyTorch-only")),
    ("enable_liger_kernel", KeyUse::NoEffect("Liger's kernels are PyTorch-only")),
    ("upcast_layernorm", KeyUse::NoEffect("norms always compute in f32")),
    ("upcast_lmhead_output", KeyUse::NoEffect("logits and log-probabilities always compute in f32")),
    ("use_kv_cache", KeyUse::NoEffect("generation always uses the KV cache")),
    ("hf_hub_token", KeyUse::NoEffect("nothing is downloaded: hub ids resolve through the local Hugging Face cache")),
    ("infer_backend", KeyUse::NoEffect("this engine is its own inference backend")),
    ("export_device", KeyUse::NoEffect("export runs on the CPU")),
    ("streaming", KeyUse::NoEffect("local dataset files are read whole")),
    ("buffer_size", KeyUse::NoEffect("local dataset files are read whole (no streaming buffer)")),
    ("overwrite_cache", KeyUse::NoEffect("processed datasets are not cached")),
    ("preprocessing_num_workers", KeyUse::NoEffect("preprocessing runs on every core")),
    ("dataloader_num_workers", KeyUse::NoEffect("batches are built in the training process")),
    ("ignore_pad_token_for_loss", KeyUse::NoEffect("padding never carries a label here")),
    ("loraplus_lr_embedding", KeyUse::NoEffect("LoRA is not applied to embeddings here")),
    ("length_penalty", KeyUse::NoEffect("it only matters to beam search, which is not supported")),
    ("include_effective_tokens_per_second", KeyUse::NoEffect("the results always report throughput (tokens per second)")),
    ("save_safetensors", KeyUse::NoEffect("weights are always saved as safetensors")),
    ("optim", KeyUse::NoEffect("the optimizer is AdamW (PyTorch's `adamw_torch`)")),
    ("adapter_folder", KeyUse::Unsupported("list the adapters in `adapter_name_or_path` (comma-separated)")),
    ("cache_dir", KeyUse::Unsupported("set `HF_HOME` / `HF_HUB_CACHE` to read hub ids from another Hugging Face cache")),
    ("split_special_tokens", KeyUse::Unsupported("special tokens in the text are always tokenized as special tokens")),
    ("train_from_scratch", KeyUse::Unsupported("training starts from the checkpoint's weights; initialize a model with transformers first")),
    // Its type has the one value `concat`: another is refused where the key is read.
    ("mix_strategy", KeyUse::Unsupported("datasets are concatenated (`mix_strategy: concat`); interleaving is not supported")),
    ("interleave_probs", KeyUse::Unsupported("datasets are concatenated; interleaving is not supported")),
    ("eval_num_beams", KeyUse::Unsupported("generation is greedy or sampled; beam search is not supported")),
    ("num_beams", KeyUse::Unsupported("generation is greedy or sampled; beam search is not supported")),
    ("eval_on_each_dataset", KeyUse::Unsupported("the evaluation datasets are evaluated together")),
    ("tokenized_path", KeyUse::Unsupported("datasets are processed at the start of every run (fast here); remove the key")),
    ("pref_bco_weight", KeyUse::Unsupported("the BCO term of DPO is not supported; use `pref_loss` sigmoid, hinge, ipo, orpo or simpo")),
    ("ld_alpha", KeyUse::Unsupported("LD-DPO is not supported; use `pref_loss` sigmoid, hinge, ipo, orpo or simpo")),
    ("ref_model", KeyUse::Unsupported("the reference model is the base model (with the adapter off for LoRA)")),
    ("ref_model_adapters", KeyUse::Unsupported("the reference model is the base model (with the adapter off for LoRA)")),
    ("early_stopping_steps", KeyUse::Unsupported("early stopping is not supported; use `max_steps` or watch the eval loss in LlamaBoard")),
    ("apollo_scale_front", KeyUse::NoEffect("APOLLOAdamW reads it from its constructor, which LLaMA-Factory does not pass it to: it has no effect there either")),
    ("deepspeed", KeyUse::Unsupported("this engine trains without DeepSpeed; remove the key")),
];

/// How the engine treats `key`: `None` when it reads it.
pub fn key_use(key: &str) -> Option<KeyUse> {
    UNREAD_KEYS.iter().find(|(k, _)| *k == key).map(|(_, u)| *u)
}

/// The experiment trackers transformers knows for `report_to`.
pub const TRACKERS: &[&str] = &[
    "tensorboard",
    "wandb",
    "mlflow",
    "swanlab",
    "comet_ml",
    "clearml",
    "dagshub",
    "dvclive",
    "neptune",
    "codecarbon",
    "azure_ml",
    "flyte",
    "trackio",
];

impl TrainArgs {
    /// The trackers `report_to` names (`all`: every one; `none` or unset: none).
    pub fn trackers(&self) -> Vec<String> {
        let list = Self::split_list(self.report_to.as_deref());
        if list.iter().any(|t| t == "all") {
            return TRACKERS.iter().map(|t| t.to_string()).collect();
        }
        list.into_iter().filter(|t| t != "none").collect()
    }

    /// Every key of the namespace, in declaration order.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => unreachable!("TrainArgs serializes to an object"),
        }
    }

    /// LoRA alpha with LLaMA-Factory's default of twice the rank.
    pub fn lora_alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64)
    }

    /// Packing is on by default for pre-training only.
    pub fn packing(&self) -> bool {
        self.packing.unwrap_or(self.stage == Stage::Pt) || self.neat_packing
    }

    /// Dataset names of a comma-separated list, trimmed, empties dropped.
    pub fn split_list(value: Option<&str>) -> Vec<String> {
        value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The keys whose value differs from the default, as a YAML-ready JSON object; this is what
    /// a run's `training_args.yaml` holds.
    pub fn non_default(&self) -> serde_json::Map<String, serde_json::Value> {
        let defaults = serde_json::to_value(Self::default()).unwrap_or_default();
        let mine = serde_json::to_value(self).unwrap_or_default();
        let (Some(d), Some(m)) = (defaults.as_object(), mine.as_object()) else {
            return Default::default();
        };
        m.iter()
            .filter(|(k, v)| d.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_llamafactory_defaults() {
        let a = TrainArgs::default();
        assert_eq!(a.cutoff_len, 2048);
        assert_eq!(a.lora_alpha(), 16.0);
        assert!(!a.packing());
        let pt = TrainArgs {
            stage: Stage::Pt,
            ..TrainArgs::default()
        };
        assert!(pt.packing());
        assert!(TrainArgs::keys().contains(&"lora_target".to_string()));
        for (k, _) in UNREAD_KEYS {
            assert!(TrainArgs::keys().contains(&k.to_string()), "{k}");
        }
    }

    #[test]
    fn non_default_lists_only_changed_keys() {
        let a = TrainArgs {
            learning_rate: 1e-4,
            ..TrainArgs::default()
        };
        let keys: Vec<_> = a.non_default().keys().cloned().collect();
        assert_eq!(keys, vec!["learning_rate"]);
    }
}
