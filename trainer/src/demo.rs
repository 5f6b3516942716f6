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
    let params: usize = bytes
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(params)
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

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
