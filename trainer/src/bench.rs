//! Benchmarks that print tables (`llamafactory bench ...`); speed targets live here, never in
//! timed unit tests.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::data::pipeline::{get_dataset, load_examples, load_tokenizer_and_template};
use protocol::TrainArgs;

pub struct DataBenchRow {
    pub stage: &'static str,
    pub examples: usize,
    pub seconds: f64,
}

/// Writes `n` Alpaca records (varied so the tokenizer cache does not make it trivial) and runs
/// the SFT pipeline over them: read + convert, then the whole path including tokenization.
pub fn data_pipeline(
    n: usize,
    model_dir: &Path,
    work: &Path,
    template: &str,
) -> Result<Vec<DataBenchRow>> {
    let data = work.join("bench-data");
    std::fs::create_dir_all(&data)?;
    let records: Vec<_> = (0..n)
        .map(|i| {
            json!({
                "instruction": format!("Add the two numbers and explain step {i}."),
                "input": format!("{} and {}", i % 97, (i * 7) % 89),
                "output": format!("{} plus {} is {}. Adding numbers is easy when you count carefully, example {i}.", i % 97, (i * 7) % 89, i % 97 + (i * 7) % 89)
            })
        })
        .collect();
    std::fs::write(data.join("bench.json"), serde_json::to_string(&records)?)?;
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"bench": {"file_name": "bench.json"}}"#,
    )?;
    let args = TrainArgs {
        model_name_or_path: Some(model_dir.display().to_string()),
        dataset: Some("bench".into()),
        dataset_dir: data.display().to_string(),
        template: Some(template.into()),
        cutoff_len: 1024,
        ..TrainArgs::default()
    };
    let (tok, tpl, _) = load_tokenizer_and_template(&args)?;
    let t = Instant::now();
    let mut skipped = Vec::new();
    let examples = load_examples(&["bench".to_string()], &args, &mut skipped)?;
    let read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let module = get_dataset(&args, &tok, &tpl)?;
    let full = t.elapsed().as_secs_f64();
    Ok(vec![
        DataBenchRow {
            stage: "read + convert",
            examples: examples.len(),
            seconds: read,
        },
        DataBenchRow {
            stage: "read + convert + template + tokenize",
            examples: module.train.len(),
            seconds: full,
        },
    ])
}

/// The shapes of `shared/bench/bench_torch_lora.py`, so both sides train the same model.
#[derive(Clone)]
pub struct TrainBenchConfig {
    pub name: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub eps: f64,
    pub seq: usize,
    pub batch: usize,
    /// Recompute each layer in backward (`gradient_checkpointing: true`).
    pub checkpointing: bool,
    /// A quantized base (QLoRA): the linear weights are quantized as they are made.
    pub quant: Option<crate::model::quant::QuantFormat>,
    /// A Mixtral-style mixture of this many experts (each of the dense MLP's size), top 2,
    /// instead of the dense MLP.
    pub experts: Option<usize>,
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    /// Full fine-tuning's optimizer: AdamW, GaLore (rank 16 on every linear) or BAdam (one
    /// decoder layer trainable).
    pub optimizer: FullOptimizer,
}

/// The optimizer a full fine-tuning benchmark uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullOptimizer {
    AdamW,
    Galore,
    Badam,
}

impl TrainBenchConfig {
    /// Another sequence length; the first 32 tokens of each row are the masked prompt.
    pub fn set_seq(&mut self, seq: usize) -> Result<()> {
        anyhow::ensure!(seq > 32, "--seq must exceed the 32 masked prompt tokens");
        self.seq = seq;
        Ok(())
    }
}

pub fn train_bench_config(name: &str) -> Result<TrainBenchConfig> {
    Ok(match name {
        "tiny" => TrainBenchConfig {
            name: "tiny",
            vocab: 8192,
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            tied: false,
            eps: 1e-6,
            seq: 256,
            batch: 4,
            checkpointing: false,
            quant: None,
            experts: None,
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            optimizer: FullOptimizer::AdamW,
        },
        "smol" => TrainBenchConfig {
            name: "smol",
            vocab: 49152,
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            tied: true,
            eps: 1e-5,
            seq: 256,
            batch: 1,
            checkpointing: false,
            quant: None,
            experts: None,
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            optimizer: FullOptimizer::AdamW,
        },
        // Qwen2.5-0.5B's shape (without its q/k/v biases), for GPU runs.
        "0.5b" => TrainBenchConfig {
            name: "0.5b",
            vocab: 151936,
            hidden: 896,
            intermediate: 4864,
            layers: 24,
            heads: 14,
            kv_heads: 2,
            tied: true,
            eps: 1e-6,
            seq: 512,
            batch: 4,
            checkpointing: false,
            quant: None,
            experts: None,
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            optimizer: FullOptimizer::AdamW,
        },
        // Qwen2.5-1.5B's shape (without its q/k/v biases).
        "1.5b" => TrainBenchConfig {
            name: "1.5b",
            vocab: 151936,
            hidden: 1536,
            intermediate: 8960,
            layers: 28,
            heads: 12,
            kv_heads: 2,
            tied: true,
            eps: 1e-6,
            seq: 512,
            batch: 1,
            checkpointing: false,
            quant: None,
            experts: None,
            device: candle_core::Device::Cpu,
            dtype: candle_core::DType::F32,
            optimizer: FullOptimizer::AdamW,
        },
        other => anyhow::bail!("unknown bench config `{other}` (tiny, smol, 0.5b, 1.5b)"),
    })
}

pub struct StepTiming {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub total: f64,
    /// The loss of the last step (the others are timed, this is the one trained furthest).
    pub loss: f64,
}

/// Median timings of LoRA (or full) training steps on random weights and tokens, the first 32
/// labels of each row masked, AdamW lr 1e-4 / weight decay 0.01, after 3 warm-up steps.
pub fn train_steps(c: &TrainBenchConfig, full: bool, steps: usize) -> Result<(StepTiming, usize)> {
    train_steps_for(c, full, steps, false)
}

/// A DPO step (sigmoid loss, β 0.1) on `batch` pairs: policy forward/backward over the chosen
/// and rejected rows plus a reference forward with the adapter switched off.
pub fn dpo_steps(c: &TrainBenchConfig, full: bool, steps: usize) -> Result<(StepTiming, usize)> {
    train_steps_for(c, full, steps, true)
}

fn train_steps_for(
    c: &TrainBenchConfig,
    full: bool,
    steps: usize,
    dpo: bool,
) -> Result<(StepTiming, usize)> {
    use crate::train::objective::Dpo;
    use crate::train::optim::AdamW;
    use rand::SeedableRng;

    // The optimizer setup of a training run with these hyper-parameters.
    let args = protocol::TrainArgs {
        learning_rate: 1e-4,
        weight_decay: 0.01,
        pref_beta: 0.1,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut model = random_model(c, full)?;
    model.checkpointing = c.checkpointing;
    let mut opt = match (full, c.optimizer) {
        (true, FullOptimizer::Galore) => {
            let targets: Vec<String> = model.linears().map(|l| l.name.clone()).collect();
            let galore = protocol::TrainArgs {
                use_galore: true,
                ..args.clone()
            };
            AdamW::for_training(model.trainable(), &galore, &targets)?
        }
        (true, FullOptimizer::Badam) => {
            model.train_only(|n| n.contains("layers.0."))?;
            AdamW::for_training(model.trainable(), &args, &[])?
        }
        _ => AdamW::for_training(model.trainable(), &args, &[])?,
    };
    let dpo_loss = Dpo::from_args(&args);
    let rows_n = if dpo { 2 * c.batch } else { c.batch };
    let batch = random_batch(&mut rng, rows_n, c.seq, c.vocab, 32);
    let mut timings = Vec::new();
    for step in 0..3 + steps {
        let t0 = Instant::now();
        let loss = if dpo {
            dpo_loss.loss(&model, &batch, None)?.0
        } else {
            let (sum, n) = model.loss_sum(&batch, None)?;
            (sum / n as f64)?
        };
        let lv = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let store = model.backward(&loss)?;
        let grads = opt.grads_of(&store);
        drop(store);
        // GPU kernels run asynchronously: wait for them so each phase is timed by itself.
        c.device.synchronize()?;
        let t2 = Instant::now();
        opt.update(&grads, args.learning_rate)?;
        c.device.synchronize()?;
        let t3 = Instant::now();
        if step >= 3 {
            timings.push(StepTiming {
                forward: (t1 - t0).as_secs_f64(),
                backward: (t2 - t1).as_secs_f64(),
                optimizer: (t3 - t2).as_secs_f64(),
                total: (t3 - t0).as_secs_f64(),
                loss: lv,
            });
        }
    }
    let last_loss = timings.last().map_or(f64::NAN, |t| t.loss);
    timings.sort_by(|a, b| a.total.total_cmp(&b.total));
    let mut median = timings.swap_remove(timings.len() / 2);
    median.loss = last_loss;
    Ok((median, rows_n * c.seq))
}

/// A seeded random Llama (or, with `experts`, Mixtral) of the bench shapes, with LoRA (rank 8,
/// alpha 16, all linears) unless
/// `full`, in which case every weight trains.
pub fn random_model(c: &TrainBenchConfig, full: bool) -> Result<crate::model::Model> {
    use crate::model::adapter::LoraSpec;
    use crate::model::{Model, ModelConfig};
    use candle_core::{DType, Device, Tensor};
    use rand::SeedableRng;
    let mut raw = json!({"model_type": "llama", "vocab_size": c.vocab, "hidden_size": c.hidden, "intermediate_size": c.intermediate,
        "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.eps, "rope_theta": 10000.0, "tie_word_embeddings": c.tied, "max_position_embeddings": 1024});
    if let Some(e) = c.experts {
        raw["model_type"] = json!("mixtral");
        raw["num_local_experts"] = json!(e);
        raw["num_experts_per_tok"] = json!(2.min(e));
    }
    let cfg = ModelConfig::from_json(raw, Path::new("bench"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let dev = Device::Cpu;
    let mut weights = std::collections::HashMap::new();
    let mut quantized = std::collections::HashMap::new();
    let mut add = |name: String,
                   shape: &[usize],
                   ones: bool,
                   rng: &mut rand_chacha::ChaCha8Rng|
     -> Result<()> {
        let n: usize = shape.iter().product();
        let data = if ones {
            vec![1f32; n]
        } else {
            crate::demo::normal(rng, n, 0.02)
        };
        let t = Tensor::from_vec(data, shape, &dev)?;
        // A quantized base never exists in f32 as a whole: each weight is quantized as made.
        match c.quant {
            Some(f) if shape.len() == 2 && name.contains(".layers.") && f.fits(shape[1]) => {
                quantized.insert(name, crate::model::quant::QuantWeight::quantize(&t, f)?);
            }
            // QLoRA keeps a bf16 checkpoint's embedding and LM head in bf16, as loaded.
            Some(_) if !name.contains(".layers.") && shape.len() == 2 => {
                weights.insert(name, t.to_dtype(DType::BF16)?);
            }
            _ => {
                weights.insert(name, t);
            }
        }
        Ok(())
    };
    let hd = c.hidden / c.heads;
    add(
        "model.embed_tokens.weight".into(),
        &[c.vocab, c.hidden],
        false,
        &mut rng,
    )?;
    if !c.tied {
        add(
            "lm_head.weight".into(),
            &[c.vocab, c.hidden],
            false,
            &mut rng,
        )?;
    }
    add("model.norm.weight".into(), &[c.hidden], true, &mut rng)?;
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        for (m, o, i) in [
            ("self_attn.q_proj", c.heads * hd, c.hidden),
            ("self_attn.k_proj", c.kv_heads * hd, c.hidden),
            ("self_attn.v_proj", c.kv_heads * hd, c.hidden),
            ("self_attn.o_proj", c.hidden, c.heads * hd),
        ] {
            add(format!("{p}.{m}.weight"), &[o, i], false, &mut rng)?;
        }
        let mlp: Vec<(String, usize, usize)> = match c.experts {
            None => vec![
                ("mlp.gate_proj".into(), c.intermediate, c.hidden),
                ("mlp.up_proj".into(), c.intermediate, c.hidden),
                ("mlp.down_proj".into(), c.hidden, c.intermediate),
            ],
            Some(e) => std::iter::once(("block_sparse_moe.gate".into(), e, c.hidden))
                .chain((0..e).flat_map(|x| {
                    [
                        (
                            format!("block_sparse_moe.experts.{x}.w1"),
                            c.intermediate,
                            c.hidden,
                        ),
                        (
                            format!("block_sparse_moe.experts.{x}.w3"),
                            c.intermediate,
                            c.hidden,
                        ),
                        (
                            format!("block_sparse_moe.experts.{x}.w2"),
                            c.hidden,
                            c.intermediate,
                        ),
                    ]
                }))
                .collect(),
        };
        for (m, o, i) in mlp {
            add(format!("{p}.{m}.weight"), &[o, i], false, &mut rng)?;
        }
        add(
            format!("{p}.input_layernorm.weight"),
            &[c.hidden],
            true,
            &mut rng,
        )?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[c.hidden],
            true,
            &mut rng,
        )?;
    }
    let mut model = Model::from_parts(cfg, weights, quantized, DType::F32, &dev)?;
    if !c.device.is_cpu() || c.dtype != DType::F32 {
        model = model.to_device(&c.device, c.dtype)?;
    }
    if full {
        model.setup_full()?;
    } else {
        let args = TrainArgs {
            lora_rank: 8,
            lora_alpha: Some(16.0),
            ..TrainArgs::default()
        };
        model.add_lora(&LoraSpec::for_model(&args, &model)?, 0)?;
    }
    Ok(model)
}

/// Greedy decoding speed: a 32-token prompt, 64 new tokens with a KV cache, LoRA unmerged as
/// in the PyTorch script; median of three timed repetitions after one warm-up. Returns tokens/s
/// for batch 1 and for `batch` prompts decoded together.
pub fn decode_speed(c: &TrainBenchConfig, batch: usize) -> Result<(f64, f64)> {
    use crate::infer::{generate_batch, GenerationConfig};
    let model = random_model(c, false)?;
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 7919) % c.vocab as u32).collect();
    let cfg = GenerationConfig::greedy(64);
    let time = |prompts: &[Vec<u32>]| -> Result<f64> {
        let mut times = Vec::new();
        for rep in 0..4 {
            let t = Instant::now();
            let out = generate_batch(&model, prompts, &cfg, &[], 0)?;
            anyhow::ensure!(
                out.iter().all(|o| o.ids.len() == 64),
                "decode stopped early"
            );
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[1])
    };
    let single = 64.0 / time(std::slice::from_ref(&prompt))?;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            prompt
                .iter()
                .map(|t| (t + b as u32) % c.vocab as u32)
                .collect()
        })
        .collect();
    let batched = (64 * batch) as f64 / time(&prompts)?;
    Ok((single, batched))
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    crate::sysinfo::proc_kib("/proc/self/status", "VmHWM:").map(|kb| kb * 1024)
}

/// Training FLOPs per token of a step on this shape: forward and input-gradient GEMMs of every
/// linear layer and the LM head (2 + 2 per weight), the weight-gradient GEMMs too when `full`
/// (2 more), and attention's two products per layer (forward, and twice that in backward), at
/// the full `seq × seq` size that the kernels compute.
pub fn train_flops_per_token(c: &TrainBenchConfig, full: bool) -> f64 {
    let hd = c.hidden / c.heads;
    let per_layer = c.hidden * (c.heads * hd) * 2
        + c.hidden * (c.kv_heads * hd) * 2
        + 3 * c.hidden * c.intermediate;
    let linear = (per_layer * c.layers + c.vocab * c.hidden) as f64;
    let attention = (c.layers * 2 * 2 * c.seq * c.heads * hd) as f64 * 3.0;
    linear * if full { 6.0 } else { 4.0 } + attention
}

/// One dtype's comparison of a device against the CPU on the same weights and batch.
pub struct DeviceAgreement {
    pub dtype: candle_core::DType,
    /// Largest |logit difference| and the largest |logit| on the CPU, for scale.
    pub logits_max_diff: f64,
    pub logits_max: f64,
    pub loss_cpu: f64,
    pub loss_device: f64,
    /// Worst relative L2 error over the LoRA gradients.
    pub grad_rel_err: f64,
}

/// Logits, loss and LoRA gradients of the `tiny` shape (2 × 64 tokens, B randomised so every
/// LoRA path matters) on `device` in each of `dtypes`, against the CPU in f32.
pub fn device_agreement(
    device: &candle_core::Device,
    dtypes: &[candle_core::DType],
) -> Result<Vec<DeviceAgreement>> {
    use candle_core::{DType, Tensor};
    use rand::SeedableRng;

    let mut c = train_bench_config("tiny")?;
    c.seq = 64;
    let cpu = random_model(&c, false)?;
    cpu.randomize_lora_b(0.05, 9)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let batch = random_batch(&mut rng, 2, c.seq, c.vocab, 16);
    let measure = |m: &crate::model::Model| -> Result<(Tensor, f64, Vec<Tensor>)> {
        let logits = m
            .logits(&batch)?
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?;
        let (sum, n) = m.loss_sum(&batch, None)?;
        let loss = (sum / n as f64)?;
        let grads = m.backward(&loss)?;
        let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = m
            .trainable()
            .iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
                Ok(g.to_device(&candle_core::Device::Cpu)?
                    .to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, lv, g))
    };
    let (ref_logits, ref_loss, ref_grads) = measure(&cpu)?;
    let logits_max = ref_logits.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let mut out = Vec::new();
    for &dtype in dtypes {
        let (logits, loss, grads) = measure(&cpu.to_device(device, dtype)?)?;
        let diff = (logits - &ref_logits)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()? as f64;
        let mut worst = 0f64;
        for (g, r) in grads.iter().zip(&ref_grads) {
            let num = (g - r)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
            let den = r.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
            worst = worst.max(num / den.max(1e-30));
        }
        out.push(DeviceAgreement {
            dtype,
            logits_max_diff: diff,
            logits_max,
            loss_cpu: ref_loss,
            loss_device: loss,
            grad_rel_err: worst,
        });
    }
    Ok(out)
}

/// `rows` sequences of random tokens, each one's first `masked` labels ignored (the prompt).
fn random_batch(
    rng: &mut rand_chacha::ChaCha8Rng,
    rows: usize,
    seq: usize,
    vocab: usize,
    masked: usize,
) -> crate::model::Batch {
    use rand::Rng;
    let ids: Vec<Vec<u32>> = (0..rows)
        .map(|_| (0..seq).map(|_| rng.gen_range(0..vocab as u32)).collect())
        .collect();
    let labels: Vec<Vec<i64>> = ids
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, &x)| if i < masked { -100 } else { x as i64 })
                .collect()
        })
        .collect();
    let refs: Vec<crate::model::RowRef> = ids
        .iter()
        .zip(&labels)
        .map(|(i, l)| (i.as_slice(), l.as_slice(), None))
        .collect();
    crate::model::Batch::pad(&refs, 0)
}

/// One f32 product of a training step: `m × k` by `k × n`, the right side stored transposed
/// (a weight in `x · Wᵀ`) or not (`g · W`).
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub what: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub transposed: bool,
}

/// The products of a LoRA step of the 135M (`smol`) shape at 512 tokens, and a large square one.
pub fn gemm_shapes() -> Vec<GemmShape> {
    let s = |what, m, n, k, transposed| GemmShape {
        what,
        m,
        n,
        k,
        transposed,
    };
    vec![
        s("q/o projection x·Wᵀ", 512, 576, 576, true),
        s("k/v projection x·Wᵀ", 512, 192, 576, true),
        s("gate/up x·Wᵀ", 512, 1536, 576, true),
        s("down x·Wᵀ", 512, 576, 1536, true),
        s("LM head tile x·Wᵀ", 512, 4096, 576, true),
        s("input gradient g·W", 512, 576, 1536, false),
        s("input gradient g·W (up)", 512, 1536, 576, false),
        s("attention p·v, one head", 256, 64, 256, false),
        s("square", 1024, 2048, 2048, true),
    ]
}

/// GFLOP/s of our AMX bf16 product on `shape` (A rounded and packed in the timing, B packed
/// once before it, as a frozen weight is); `None` where the CPU or OS offers no AMX tiles.
pub fn amx_gemm_gflops(shape: &GemmShape, rounds: usize) -> Result<Option<f64>> {
    use crate::ops::amx_bf16;
    if !amx_bf16::available() {
        return Ok(None);
    }
    let wave = |len: usize, seed: f32| -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    };
    let (m, n, k) = (shape.m, shape.n, shape.k);
    let a = wave(m * k, 0.1);
    let b = if shape.transposed {
        amx_bf16::PackedB::new(&wave(n * k, 0.7), k, n, 1, k)
    } else {
        amx_bf16::PackedB::new(&wave(k * n, 0.7), k, n, n, 1)
    };
    let mut c = vec![0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((4e10 / flops) as usize).clamp(3, 8000);
    let best = best_seconds(rounds, reps, || {
        amx_bf16::matmul(&a, m, k, &b, &mut c, n);
        Ok(())
    })?;
    Ok(Some(flops / best / 1e9))
}

/// The best over `rounds` of the mean time of `reps` calls of `f`, each round after one
/// untimed call.
fn best_seconds(rounds: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..rounds {
        f()?;
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(best)
}

/// GFLOP/s of candle's f32 matmul on `shape` on the CPU: the best of `rounds` timings of
/// enough repetitions for ~0.1 s.
pub fn gemm_gflops(shape: &GemmShape, rounds: usize) -> Result<f64> {
    use candle_core::Tensor;
    let dev = candle_core::Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (shape.m, shape.k), &dev)?;
    let b = if shape.transposed {
        Tensor::randn(0f32, 1.0, (shape.n, shape.k), &dev)?.t()?
    } else {
        Tensor::randn(0f32, 1.0, (shape.k, shape.n), &dev)?
    };
    let flops = 2.0 * (shape.m * shape.n * shape.k) as f64;
    let reps = ((1e10 / flops) as usize).clamp(3, 2000);
    let best = best_seconds(rounds, reps, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(flops / best / 1e9)
}
