//! The closed choices of the run arguments (stage, fine-tuning method, scheduler, save and eval
//! strategies, preference loss, …) as enums, spelled exactly as LLaMA-Factory's YAML spells them.
//! One definition serves the YAML loader (serde), validation, the trainer and the browser, whose
//! option lists are built from [`Choice::ALL`]: the UI cannot offer a value the engine rejects.

use serde::{Deserialize, Serialize};

/// A closed set of YAML values.
pub trait Choice: Sized + Copy + 'static {
    /// Every value, in the order the UI lists them.
    const ALL: &'static [Self];
    /// The YAML spelling.
    fn as_str(self) -> &'static str;

    /// The value spelled `s`, if any.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// Every spelling, for messages and option lists.
    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|c| c.as_str()).collect()
    }
}

macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl Choice for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <Self as Choice>::parse(s).ok_or_else(|| {
                    format!("`{s}` is not one of {}", <Self as Choice>::names().join(", "))
                })
            }
        }
    };
}

choice! {
    /// `stage`: what is trained.
    Stage {
        /// Supervised fine-tuning on prompt/response pairs.
        Sft = "sft",
        /// A reward model (value head) on ranked pairs.
        Rm = "rm",
        /// Direct preference optimisation (and its relatives: `pref_loss`).
        Dpo = "dpo",
        /// Kahneman-Tversky optimisation on desirable / undesirable examples.
        Kto = "kto",
        /// PPO against a reward model.
        Ppo = "ppo",
        /// Pre-training on plain text.
        Pt = "pt",
    }
}

impl Stage {
    /// Stages whose data are ranked pairs (chosen, rejected).
    pub fn is_pairwise(self) -> bool {
        matches!(self, Self::Rm | Self::Dpo)
    }

    /// Stages that train a value head: the reward of RM, the critic of PPO.
    pub fn has_value_head(self) -> bool {
        matches!(self, Self::Rm | Self::Ppo)
    }
}

choice! {
    /// `finetuning_type`: which weights train.
    FinetuningType {
        Lora = "lora",
        Freeze = "freeze",
        Full = "full",
    }
}

choice! {
    /// `lr_scheduler_type`: the schedules of `transformers.get_scheduler` this engine runs.
    SchedulerType {
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        InverseSqrt = "inverse_sqrt",
        CosineWithMinLr = "cosine_with_min_lr",
        WarmupStableDecay = "warmup_stable_decay",
    }
}

choice! {
    /// `save_strategy` and `eval_strategy`: never, every N steps, or at each epoch's end.
    IntervalStrategy {
        No = "no",
        Steps = "steps",
        Epoch = "epoch",
    }
}

choice! {
    /// `pref_loss`: the DPO-family loss.
    PrefLossType {
        Sigmoid = "sigmoid",
        Hinge = "hinge",
        Ipo = "ipo",
        Orpo = "orpo",
        Simpo = "simpo",
    }
}

choice! {
    /// `rope_scaling`: how RoPE stretches past the model's length (LLaMA-Factory's
    /// `configure_rope`). `dynamic` and `yarn` are not run by this engine.
    RopeScalingType {
        Linear = "linear",
        Llama3 = "llama3",
    }
}

choice! {
    /// `mixture_of_depths`: Mixture-of-Depths (the `mixture-of-depth` package LLaMA-Factory
    /// uses): `convert` wraps every odd decoder layer of a dense model in a token router,
    /// `load` reads a checkpoint saved that way (`LlamaMoDForCausalLM`, …).
    MixtureOfDepths {
        Convert = "convert",
        Load = "load",
    }
}

choice! {
    /// `quantization_method`: how `quantization_bit` quantizes the frozen base (QLoRA).
    /// `bnb` (LLaMA-Factory's default): bitsandbytes' 4-bit NF4/FP4, or 8-bit; `ggml`:
    /// candle's GGML k-quants for 2, 3, 4, 5, 6 and 8 bits. The other methods LLaMA-Factory
    /// names are read so their error can say they are not supported.
    QuantizationMethod {
        Bnb = "bnb",
        Ggml = "ggml",
        Gptq = "gptq",
        Awq = "awq",
        Aqlm = "aqlm",
        Quanto = "quanto",
        Eetq = "eetq",
        Hqq = "hqq",
    }
}

impl QuantizationMethod {
    /// Whether this engine runs the method.
    pub fn supported(self) -> bool {
        matches!(self, Self::Bnb | Self::Ggml)
    }

    /// The bit widths the method runs with here.
    pub fn bits(self) -> &'static [u32] {
        match self {
            Self::Bnb => &[4, 8],
            Self::Ggml => &[2, 3, 4, 5, 6, 8],
            _ => &[],
        }
    }
}

choice! {
    /// `quantization_type`: the 4-bit data type of `bnb`.
    QuantizationType {
        Nf4 = "nf4",
        Fp4 = "fp4",
    }
}

choice! {
    /// `galore_proj_type`: which side of a gradient GaLore projects (`std`: the smaller one).
    GaloreProjType {
        Std = "std",
        ReverseStd = "reverse_std",
        Right = "right",
        Left = "left",
        Full = "full",
    }
}

choice! {
    /// `apollo_proj`: APOLLO's projection, a seeded Gaussian matrix or the gradient's singular
    /// vectors.
    ApolloProj {
        Random = "random",
        Svd = "svd",
    }
}

choice! {
    /// `apollo_proj_type`: which side of a gradient APOLLO projects (`std`: the smaller one).
    ApolloProjType {
        Std = "std",
        Right = "right",
        Left = "left",
    }
}

choice! {
    /// `apollo_scale_type`: one gradient scaling factor per channel or per tensor.
    ApolloScaleType {
        Channel = "channel",
        Tensor = "tensor",
    }
}

choice! {
    /// `badam_mode`: BAdam's blocks, whole layers or a ratio of each weight (the latter is not
    /// supported; validation says so).
    BadamMode {
        Layer = "layer",
        Ratio = "ratio",
    }
}

choice! {
    /// `badam_switch_mode`: the order BAdam's blocks take turns in.
    BadamSwitchMode {
        Ascending = "ascending",
        Descending = "descending",
        Random = "random",
        Fixed = "fixed",
    }
}

choice! {
    /// `badam_mask_mode`: ratio-mode BAdam's choice of entries.
    BadamMaskMode {
        Adjacent = "adjacent",
        Scatter = "scatter",
    }
}

choice! {
    /// `mix_strategy`: how several datasets are combined.
    MixStrategy {
        Concat = "concat",
    }
}

choice! {
    /// `reward_model_type`: how PPO's reward model is given. `api` is LLaMA-Factory's HTTP
    /// scorer, which this engine does not run (validation says so).
    RewardModelType {
        Lora = "lora",
        Full = "full",
        Api = "api",
    }
}

choice! {
    /// `export_format`: a Hugging Face folder or one llama.cpp file.
    ExportFormat {
        Safetensors = "safetensors",
        Gguf = "gguf",
    }
}

choice! {
    /// `export_gguf_type`: the GGUF weight type.
    GgufType {
        F16 = "f16",
        Q8_0 = "q8_0",
        Q4KM = "q4_k_m",
        /// Each tensor in the type it has in the base GGUF file (a model trained on a GGUF base).
        Base = "base",
    }
}

choice! {
    /// `infer_dtype`: the dtype of chat, prediction and export (`auto`: the model's own).
    InferDtype {
        Auto = "auto",
        Float32 = "float32",
        Bfloat16 = "bfloat16",
        Float16 = "float16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_through_serde_and_from_str() {
        for s in Stage::ALL {
            let v = serde_json::to_value(s).unwrap();
            assert_eq!(v, serde_json::Value::String(s.as_str().into()));
            assert_eq!(serde_json::from_value::<Stage>(v).unwrap(), *s);
            assert_eq!(s.as_str().parse::<Stage>().unwrap(), *s);
        }
        assert_eq!(
            SchedulerType::parse("warmup_stable_decay"),
            Some(SchedulerType::WarmupStableDecay)
        );
        assert!("sawtooth".parse::<SchedulerType>().is_err());
        assert_eq!(GgufType::Q4KM.as_str(), "q4_k_m");
        let e = serde_json::from_value::<Stage>("stf".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `stf`") && e.contains("`sft`"),
            "{e}"
        );
    }
}
