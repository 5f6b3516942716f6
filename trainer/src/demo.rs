//! The built-in demo model: a tiny Llama-architecture model (seeded random init) and a byte-level
//! BPE tokenizer trained on the demo datasets, saved in Hugging Face layout so every loader
//! (ours, `transformers`, llama.cpp's converters) reads it like a real model.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerBuilder, TokenizerImpl,
};

use crate::data::dataset_info::DatasetInfo;
use crate::data::loader::load_records;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            vocab_size: 1024,
            hidden_size: 128,
            intermediate_size: 344,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 2048,
            seed: 42,
        }
    }
}

pub const SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen2 writes it, with its default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Every text of every dataset in `dataset_dir`, for training the tokenizer.
fn corpus(dataset_dir: &Path) -> Result<Vec<String>> {
    let info = DatasetInfo::load(dataset_dir)?;
    let mut texts = Vec::new();
    for attr in info.all() {
        let Ok(records) = load_records(&attr, dataset_dir) else {
            continue;
        };
        for r in records {
            collect_strings(&Value::Object(r.value), &mut texts);
        }
    }
    if texts.is_empty() {
        return Err(anyhow!(
            "no text found in the datasets of {}",
            dataset_dir.display()
        ));
    }
    Ok(texts)
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if !s.is_empty() => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

type Tok = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tok> {
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tok: Tok = TokenizerBuilder::new()
        .with_model(ModelWrapper::BPE(BPE::default()))
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()
        .map_err(|e| anyhow!("building tokenizer: {e}"))?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training tokenizer: {e}"))?;
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    Ok(tok)
}

/// N(0, std) samples from a seeded generator (Box–Muller), so the demo model is the same on
/// every machine.
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::Rng;
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = rng.gen();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

fn write_weights(path: &Path, cfg: &DemoConfig, vocab: usize) -> Result<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let h = cfg.hidden_size;
    let head_dim = h / cfg.num_attention_heads;
    let kv = cfg.num_key_value_heads * head_dim;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, data: Vec<f32>| tensors.push((name, shape, data));
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        normal(&mut rng, vocab * h, 0.02),
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", cfg.intermediate_size, h),
            ("mlp.up_proj", cfg.intermediate_size, h),
            ("mlp.down_proj", h, cfg.intermediate_size),
        ] {
            add(
                format!("{p}.{name}.weight"),
                vec![out, inp],
                normal(&mut rng, out * inp, 0.02),
            );
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            vec![1.0; h],
        );
    }
    add("model.norm.weight".into(), vec![h], vec![1.0; h]);
    save_tensors(path, tensors)
}

/// Builds the demo model into `out`; returns a one-line summary.
pub fn build_demo_model(out: &Path, dataset_dir: &Path, cfg: &DemoConfig) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let texts = corpus(dataset_dir)?;
    let tok = train_tokenizer(&texts, cfg.vocab_size)?;
    tok.save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("saving tokenizer: {e}"))?;
    let vocab = tok.get_vocab_size(true);
    let added: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .filter_map(|t| tok.token_to_id(t).map(|id| (id.to_string(), json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}))))
        .collect();
    let tok_cfg = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": cfg.max_position_embeddings,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null
    });
    write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;
    write_json(
        &out.join("special_tokens_map.json"),
        &json!({
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>"
        }),
    )?;
    let id = |t: &str| tok.token_to_id(t).map(Value::from).unwrap_or(Value::Null);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "pad_token_id": id("<|endoftext|>"),
        "head_dim": cfg.hidden_size / cfg.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": vocab
    });
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": id("<|endoftext|>"),
            "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
            "pad_token_id": id("<|endoftext|>"),
            "do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20
        }),
    )?;
    let params = write_weights(&out.join("model.safetensors"), cfg, vocab)?;
    Ok(format!(
        "demo model written to {} ({} parameters, vocab {vocab}, tokenizer trained on {} texts)",
        out.display(),
        params,
        texts.len()
    ))
}

/// Writes named f32 tensors as one safetensors file; returns the number of parameters.
fn save_tensors(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<usize> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, d)| (n, s, d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let params = bytes
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(params)
}

/// The vision tokens a Qwen2-VL tokenizer has.
const VISION_TOKENS: [&str; 4] = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// Builds the demo vision-language model into `out` from the demo model in `text_demo`: a tiny
/// Qwen2-VL (random init) with the demo tokenizer plus Qwen2-VL's vision tokens and the
/// processor's `preprocessor_config.json`, so the board's image chat and multimodal training
/// work out of the box. Returns a one-line summary.
pub fn build_demo_vl_model(text_demo: &Path, out: &Path, cfg: &DemoConfig) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tok = crate::tokenizer::HfTokenizer::load(text_demo)?;
    tok.add_special_tokens(&VISION_TOKENS.map(String::from))?;
    tok.save(out)?;
    let vocab = tok.len();
    let id = |t: &str| tok.token_to_id(t).map(Value::from).unwrap_or(Value::Null);
    let (h, heads, kv_heads) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    );
    let head_dim = h / heads;
    let half = head_dim / 2;
    let section = [
        half / 4,
        (half - half / 4) / 2,
        half - half / 4 - (half - half / 4) / 2,
    ];
    let (v_dim, v_heads, v_depth, v_mlp) = (64usize, 4usize, 2usize, 2usize);
    let config = json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "pad_token_id": id("<|endoftext|>"),
        "hidden_act": "silu",
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": vocab,
        "vision_start_token_id": id("<|vision_start|>"),
        "vision_end_token_id": id("<|vision_end|>"),
        "image_token_id": id("<|image_pad|>"),
        "video_token_id": id("<|video_pad|>"),
        "vision_config": {
            "depth": v_depth, "embed_dim": v_dim, "hidden_size": h, "hidden_act": "quick_gelu",
            "mlp_ratio": v_mlp, "num_heads": v_heads, "in_chans": 3, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2
        }
    });
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": id("<|endoftext|>"), "eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")],
                "pad_token_id": id("<|endoftext|>"), "do_sample": true, "temperature": 0.7, "top_p": 0.8}),
    )?;
    let p = crate::vision::qwen2_vl::Qwen2VlProcessor::default();
    write_json(
        &out.join("preprocessor_config.json"),
        &json!({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": p.image_mean, "image_std": p.image_std, "rescale_factor": p.rescale_factor,
            "min_pixels": p.min_pixels, "max_pixels": p.max_pixels, "merge_size": p.merge_size,
            "patch_size": p.patch_size, "temporal_patch_size": p.temporal_patch_size, "resample": 3
        }),
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed + 1);
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |rng: &mut ChaCha8Rng, name: String, shape: Vec<usize>, std: f32| {
        let n = shape.iter().product();
        let data = if std == 0.0 {
            vec![1.0; n]
        } else {
            normal(rng, n, std)
        };
        t.push((name, shape, data));
    };
    add(
        &mut rng,
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        0.02,
    );
    let kv = kv_heads * head_dim;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.q_proj.bias", vec![h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![cfg.intermediate_size, h]),
            ("mlp.up_proj.weight", vec![cfg.intermediate_size, h]),
            ("mlp.down_proj.weight", vec![h, cfg.intermediate_size]),
        ] {
            add(&mut rng, format!("{p}.{name}"), shape, 0.02);
        }
        add(
            &mut rng,
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.0,
        );
        add(
            &mut rng,
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.0,
        );
    }
    add(&mut rng, "model.norm.weight".into(), vec![h], 0.0);
    add(
        &mut rng,
        "visual.patch_embed.proj.weight".into(),
        vec![v_dim, 3, 2, 14, 14],
        0.02,
    );
    for b in 0..v_depth {
        let p = format!("visual.blocks.{b}");
        for (name, shape, std) in [
            ("norm1.weight", vec![v_dim], 0.0),
            ("norm1.bias", vec![v_dim], 0.02),
            ("attn.qkv.weight", vec![3 * v_dim, v_dim], 0.02),
            ("attn.qkv.bias", vec![3 * v_dim], 0.02),
            ("attn.proj.weight", vec![v_dim, v_dim], 0.02),
            ("attn.proj.bias", vec![v_dim], 0.02),
            ("norm2.weight", vec![v_dim], 0.0),
            ("norm2.bias", vec![v_dim], 0.02),
            ("mlp.fc1.weight", vec![v_mlp * v_dim, v_dim], 0.02),
            ("mlp.fc1.bias", vec![v_mlp * v_dim], 0.02),
            ("mlp.fc2.weight", vec![v_dim, v_mlp * v_dim], 0.02),
            ("mlp.fc2.bias", vec![v_dim], 0.02),
        ] {
            add(&mut rng, format!("{p}.{name}"), shape, std);
        }
    }
    let merged = 4 * v_dim;
    add(
        &mut rng,
        "visual.merger.ln_q.weight".into(),
        vec![v_dim],
        0.0,
    );
    add(
        &mut rng,
        "visual.merger.ln_q.bias".into(),
        vec![v_dim],
        0.02,
    );
    add(
        &mut rng,
        "visual.merger.mlp.0.weight".into(),
        vec![merged, merged],
        0.02,
    );
    add(
        &mut rng,
        "visual.merger.mlp.0.bias".into(),
        vec![merged],
        0.02,
    );
    add(
        &mut rng,
        "visual.merger.mlp.2.weight".into(),
        vec![h, merged],
        0.02,
    );
    add(&mut rng, "visual.merger.mlp.2.bias".into(), vec![h], 0.02);
    let params = save_tensors(&out.join("model.safetensors"), t)?;
    Ok(format!(
        "demo vision-language model (Qwen2-VL) written to {} ({params} parameters, vocab {vocab})",
        out.display()
    ))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
