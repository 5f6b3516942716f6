//! The decoder of every family in [`super::config::SUPPORTED`] (Llama, Gemma, Phi-3, GLM and the
//! mixtures of experts; what each does differently is read into [`ModelConfig`]): its weights
//! resolved into
//! typed parts when the model is built (a missing weight fails the load), the name map PEFT
//! files, freeze rules and exports use, and the forward passes: training passes with optional
//! gradient checkpointing, per-sequence log-probabilities, the loss, and cached decoding.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::batch::{shifted_targets, Batch};
use super::config::ModelConfig;
use super::layers::{
    f32_if_half, log_softmax, Block, DecoderLayer, Dims, KvCache, Linear, LinearWeight,
    LocalTables, LoraLayer, Param, Pass, Weights, MASK_VALUE,
};
use super::quant::QuantFormat;
use super::weights::{FileSource, MapSource, WeightSource};

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Param,
    pub layers: Vec<DecoderLayer>,
    pub norm: Param,
    /// The output projection; `None` when tied to the embedding.
    pub lm_head: Option<Param>,
    /// Tensors of the files that the architecture does not read: kept to be saved again,
    /// never trained.
    pub extra: BTreeMap<String, Param>,
    /// A vision-language model's vision tower and projector.
    pub vision: Option<super::vision::VisionTower>,
    /// Gradient checkpointing: training passes keep only each decoder layer's input and
    /// recompute the layer during backward (`gradient_checkpointing: true`).
    pub checkpointing: bool,
    /// NEFTune's α: noise on the input embeddings in training passes (those given an rng).
    pub neftune_alpha: Option<f64>,
    /// LongLoRA's S²-Attn in training passes (`shift_attn`), with the id that pads a batch to
    /// a multiple of 8 tokens.
    pub shift_attn: Option<u32>,
    /// Mixture-of-Depths' capacity schedule (used by routed layers only).
    pub depths: super::depths::Schedule,
    /// Where the recomputed layers leave their trainable tensors' gradients; see
    /// [`Model::backward`].
    grad_sink: crate::ops::GradSink,
    /// Padding-free passes: a batch of rows of different lengths is computed as one row of its
    /// real tokens, each sequence attending within itself (see [`Model::packs`]). On by
    /// default; off only to compare with the padded computation.
    pub padding_free: bool,
    /// The load-balancing loss's coefficient when training a mixture of experts with it
    /// (LLaMA-Factory's `moe_aux_loss_coef`, or the checkpoint's `output_router_logits`).
    pub router_aux_loss_coef: Option<f64>,
    /// The sparse layers' routing in the last policy pass, for [`Model::loss_sum`].
    routing: std::sync::Mutex<Vec<super::mlp::Routing>>,
    /// The frozen LM head packed in bf16 (per vocabulary tile), made on first use while the
    /// CPU's bf16 products are on.
    head_bf16: std::sync::OnceLock<Arc<Vec<crate::ops::Bf16Weight>>>,
    dims: Dims,
    pub dtype: DType,
    pub device: Device,
}

impl Model {
    /// Loads a Hugging Face model folder with every weight frozen.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, None)
    }

    /// [`Model::load`] with the decoder layers' linear weights quantized to `quant` as they are
    /// read (QLoRA); the norms stay in `dtype` and the embedding and LM head unquantized, as in
    /// LLaMA-Factory — in a half-precision checkpoint's own 16 bits (see
    /// [`super::weights::WeightSource::take_table`]).
    pub fn load_quantized(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<QuantFormat>,
    ) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        if let Some(file) = super::gguf::source_of(dir) {
            if let Some(q) = quant {
                anyhow::bail!(
                    "{} is a GGUF file whose weights are already quantized: remove `quantization_bit` (asked for {})",
                    file.display(),
                    q.describe()
                );
            }
            let mut src = super::gguf::GgufSource::open(&file, dtype, device)?;
            return Self::from_source(cfg, &mut src, dtype, device);
        }
        let layout = cfg.layout;
        let quant = match (cfg.gptq, quant) {
            (Some(_), Some(_)) => {
                eprintln!("warning: `quantization_bit` will not affect on the PTQ-quantized models (this checkpoint is GPTQ-quantized).");
                None
            }
            (_, q) => q,
        };
        let mut src = FileSource::open(dir, dtype, device, quant, layout, cfg.gptq)?;
        Self::from_source(cfg, &mut src, dtype, device)
    }

    /// Builds the model from tensors by Hugging Face name; every weight the architecture
    /// reads must be there.
    pub fn from_weights(
        cfg: ModelConfig,
        weights: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts(cfg, weights, HashMap::new(), dtype, device)
    }

    /// [`Model::from_weights`] where some linear weights come already quantized.
    pub fn from_parts(
        cfg: ModelConfig,
        weights: HashMap<String, Tensor>,
        quantized: HashMap<String, std::sync::Arc<super::quant::QuantWeight>>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut src = MapSource {
            map: weights,
            quantized,
            quant: None,
        };
        Self::from_source(cfg, &mut src, dtype, device)
    }

    fn from_source(
        cfg: ModelConfig,
        src: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let embed = Param::frozen(src.take_table("model.embed_tokens.weight")?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(l, &cfg, src))
            .collect::<Result<Vec<_>>>()?;
        let norm = Param::frozen(src.take("model.norm.weight")?);
        let vision = cfg
            .vision
            .as_ref()
            .map(|v| super::vision::VisionTower::new(v, src))
            .transpose()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = src.take_table("lm_head.weight")?;
            // Baichuan 2 normalizes its head once for inference; a head that trains is
            // normalized again in every pass (`head_weight`).
            Some(Param::frozen(if cfg.norm_head {
                unit_rows(&w)?
            } else {
                w
            }))
        };
        let extra = src.rest()?;
        Ok(Self {
            dims: Dims::new(&cfg, dtype),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            vision,
            extra: extra
                .into_iter()
                .map(|(k, t)| (k, Param::frozen(t)))
                .collect(),
            checkpointing: false,
            neftune_alpha: None,
            shift_attn: None,
            depths: Default::default(),
            grad_sink: Default::default(),
            padding_free: true,
            router_aux_loss_coef: None,
            routing: Default::default(),
            head_bf16: Default::default(),
            dtype,
            device: device.clone(),
        })
    }

    /// Mixture-of-Depths `convert`: every odd layer gets a new router (PyTorch's `nn.Linear`
    /// initialization drawn from `seed`), as the package's `apply_mod_to_hf` wraps them; the
    /// saved config names the routed class (`LlamaMoDForCausalLM`, …), as the package renames it.
    pub fn route_depths(&mut self, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        let family = self.cfg.model_type.clone();
        if !super::depths::SUPPORTED.contains(&family.as_str()) {
            anyhow::bail!(
                "`mixture_of_depths: convert`: Current model is not supported by mixture-of-depth (model_type `{family}`; supported here: {})",
                super::depths::SUPPORTED.join(", ")
            );
        }
        if self.cfg.mixture_of_depths {
            anyhow::bail!(
                "`mixture_of_depths: convert`: this checkpoint is already routed ({}); use `mixture_of_depths: load`",
                self.cfg.architecture()
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let hidden = self.cfg.hidden_size;
        for layer in self.layers.iter_mut().filter(|l| l.index % 2 == 1) {
            layer.route(super::depths::Router::init(hidden, &mut rng, &self.device)?);
        }
        self.cfg.mixture_of_depths = true;
        let routed = super::depths::routed_architecture(&self.cfg.architecture());
        self.cfg
            .raw
            .insert("architectures".into(), serde_json::json!([routed]));
        Ok(())
    }

    /// Every tensor under its Hugging Face name, sorted by name.
    pub fn params(&self) -> Vec<(String, &Param)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), &self.embed),
            ("model.norm.weight".to_string(), &self.norm),
        ];
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        for layer in &self.layers {
            out.extend(layer.params());
        }
        if let Some(v) = &self.vision {
            out.extend(v.params());
        }
        out.extend(self.extra.iter().map(|(k, p)| (k.clone(), p)));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// [`Model::params`] under the names a saved checkpoint gives them (its layout's).
    pub fn checkpoint_params(&self) -> Vec<(String, &Param)> {
        self.params()
            .into_iter()
            .map(|(k, p)| (self.cfg.layout.file(&k), p))
            .collect()
    }

    /// [`Model::params`], to change them (sorted by name).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), &mut self.embed),
            ("model.norm.weight".to_string(), &mut self.norm),
        ];
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".into(), h));
        }
        for layer in &mut self.layers {
            out.extend(layer.params_mut());
        }
        if let Some(v) = &mut self.vision {
            out.extend(v.params_mut());
        }
        out.extend(self.extra.iter_mut().map(|(k, p)| (k.clone(), p)));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The weight called `name`, to change it.
    pub fn param_mut(&mut self, name: &str) -> Option<&mut Param> {
        self.params_mut()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// Every linear module of the decoder layers, layer by layer.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| l.linears_mut())
    }

    /// The linear module called `name` (`model.layers.0.self_attn.q_proj`).
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        self.linears_mut().find(|l| l.name == name)
    }

    /// The LoRA layers by module name.
    pub fn lora_layers(&self) -> BTreeMap<&str, &LoraLayer> {
        self.linears()
            .filter_map(|l| Some((l.name.as_str(), l.lora.as_ref()?)))
            .collect()
    }

    /// Sets every LoRA B to values drawn uniformly from (−bound, bound) with `seed`: a fresh
    /// adapter's B is zero, which hides what A and B do from benchmarks and tests.
    pub fn randomize_lora_b(&self, bound: f64, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for l in self.lora_layers().values() {
            let shape = l.b.shape().clone();
            let data: Vec<f64> = (0..shape.elem_count())
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            l.b.set(&Tensor::from_vec(data, shape, l.b.device())?.to_dtype(l.b.dtype())?)?;
        }
        Ok(())
    }

    pub fn lora_layers_mut(&mut self) -> impl Iterator<Item = &mut LoraLayer> {
        self.linears_mut().filter_map(|l| l.lora.as_mut())
    }

    /// Exchanges the attached LoRA layers with `other` (by module name): two adapters taking
    /// turns on the same base weights, like PPO's policy and reward adapters.
    pub fn swap_lora(&mut self, other: &mut BTreeMap<String, LoraLayer>) {
        let mut mine = BTreeMap::new();
        for lin in self.linears_mut() {
            if let Some(l) = lin.lora.take() {
                mine.insert(lin.name.clone(), l);
            }
            lin.lora = other.remove(&lin.name);
        }
        *other = mine;
    }

    /// The dtype trainable tensors are kept in: f32 when the model computes in bf16/f16
    /// (updates of 1e-4 relative vanish in bf16's 8-bit mantissa), else the model's own.
    /// Log-probabilities and losses use it too.
    pub fn trainable_dtype(&self) -> DType {
        f32_if_half(self.dtype)
    }

    /// Makes the weights `active` names trainable and freezes the others, keeping what they
    /// learned (BAdam's block switch).
    pub fn train_only(&mut self, active: impl Fn(&str) -> bool) -> Result<()> {
        let (train_dtype, dtype) = (self.trainable_dtype(), self.dtype);
        for (name, p) in self.params_mut() {
            match (active(&name), p.var.take()) {
                (true, Some(v)) => p.var = Some(v),
                (true, None) => p.var = Some(Var::from_tensor(&p.tensor.to_dtype(train_dtype)?)?),
                (false, Some(v)) => p.tensor = v.as_tensor().detach().to_dtype(dtype)?,
                (false, None) => {}
            }
        }
        Ok(())
    }

    /// Elements in the base model's weights (quantized ones included).
    pub fn num_base_params(&self) -> u64 {
        let dense: u64 = self
            .params()
            .iter()
            .map(|(_, p)| p.tensor.elem_count() as u64)
            .sum();
        dense
            + self
                .quantized()
                .map(|q| (q.rows * q.cols) as u64)
                .sum::<u64>()
            + self.bf16_packed_params()
    }

    /// Grows the embeddings (and an untied LM head) to `new_size` rows for tokens a template
    /// added (`resize_vocab`), initialised to the mean embedding like transformers'
    /// `resize_token_embeddings(mean_resizing=True)`.
    pub fn resize_vocab(&mut self, new_size: usize) -> Result<()> {
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let Some(p) = self.param_mut(name) else {
                continue;
            };
            let (rows, _) = p.tensor.dims2()?;
            if rows >= new_size {
                continue;
            }
            let mean = p.tensor.mean_keepdim(0)?;
            let extra = mean.repeat((new_size - rows, 1))?;
            p.tensor = Tensor::cat(&[&p.tensor, &extra], 0)?;
        }
        self.sync_vocab_size()
    }

    /// `vocab_size` (and the `config.json` saved with the model) from the embedding's rows: an
    /// adapter's `modules_to_save` may carry a resized embedding.
    pub(crate) fn sync_vocab_size(&mut self) -> Result<()> {
        let rows = self.embed.tensor.dim(0)?;
        if rows != self.cfg.vocab_size {
            self.cfg.vocab_size = rows;
            self.cfg
                .raw
                .insert("vocab_size".into(), serde_json::json!(rows));
        }
        Ok(())
    }

    /// The LM head, or the embedding it is tied to.
    fn head(&self) -> &Param {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Whether the LM head (or the embedding it is tied to) trains.
    pub fn head_trains(&self) -> bool {
        self.head().var.is_some()
    }

    /// Bytes the base weights take: dense ones as stored (the model's dtype, or a QLoRA
    /// embedding's 16 bits), quantized ones as stored.
    pub fn base_bytes(&self) -> u64 {
        let dense: u64 = self
            .params()
            .iter()
            .map(|(_, p)| (p.tensor.elem_count() * p.tensor.dtype().size_in_bytes()) as u64)
            .sum();
        dense + self.quantized().map(|q| q.bytes() as u64).sum::<u64>()
    }

    /// Replaces every quantized linear weight by its dequantized tensor (exporting a model
    /// whose base was quantized, e.g. a GGUF file); returns how many there were.
    pub fn dequantize_all(&mut self) -> Result<usize> {
        let dtype = self.dtype;
        let mut n = 0;
        for lin in self.linears_mut() {
            if let LinearWeight::Quantized(q) = &lin.weight {
                lin.weight = LinearWeight::Dense(Param::frozen(q.dequantize(dtype)?));
                n += 1;
            }
        }
        Ok(n)
    }

    /// The quantized linear weights (QLoRA).
    pub fn quantized(&self) -> impl Iterator<Item = &std::sync::Arc<super::quant::QuantWeight>> {
        self.linears().filter_map(|l| match &l.weight {
            LinearWeight::Quantized(q) => Some(q),
            LinearWeight::Dense(_) | LinearWeight::Bf16(_) => None,
        })
    }

    /// Keeps the frozen weights of the LoRA-adapted linears (plain LoRA, not DoRA) only as
    /// their bf16 packings for AMX tiles, dropping the f32 copies: while the CPU's bf16
    /// products are on, those copies are never multiplied, and a LoRA run never saves them.
    /// Returns how many weights and the bytes of their packings.
    pub fn keep_frozen_in_bf16(&mut self) -> Result<(usize, usize)> {
        let (mut n, mut bytes) = (0, 0);
        for lin in self.linears_mut() {
            let adapted = lin.lora.as_ref().is_some_and(|l| l.magnitude.is_none());
            let LinearWeight::Dense(p) = &lin.weight else {
                continue;
            };
            if !adapted || p.var.is_some() || !p.tensor.device().is_cpu() || lin.observer.is_some()
            {
                continue;
            }
            let packed = match lin.bf16.take() {
                Some(packed) => packed,
                None => Arc::new(crate::ops::Bf16Weight::new(&p.tensor)?),
            };
            bytes += packed.bytes();
            lin.weight = LinearWeight::Bf16(packed);
            n += 1;
        }
        Ok((n, bytes))
    }

    /// Elements of the weights kept only as bf16 packings ([`Model::keep_frozen_in_bf16`]).
    fn bf16_packed_params(&self) -> u64 {
        self.linears()
            .filter_map(|l| match &l.weight {
                LinearWeight::Bf16(w) => Some((w.dims().0 * w.dims().1) as u64),
                _ => None,
            })
            .sum()
    }

    /// Elements in the base weights and the LoRA matrices (PEFT's "all params").
    pub fn num_params(&self) -> u64 {
        self.num_base_params()
            + self
                .lora_layers()
                .values()
                .map(|l| (l.a.elem_count() + l.b.elem_count()) as u64)
                .sum::<u64>()
    }

    fn lm_head(&self, h: &Tensor, weights: Weights) -> Result<Tensor> {
        head_logits(h, &self.head_weight(weights)?, self.final_softcap())
    }

    /// The LM head weight and whether it trains; a training NormHead (Baichuan 2) is
    /// normalized inside the graph, as Baichuan's own training does.
    fn head_weight(&self, weights: Weights) -> Result<(Tensor, bool)> {
        let (w, trains) = self.head().value(weights, self.dtype)?;
        if self.cfg.norm_head && self.lm_head.is_some() && trains {
            return Ok((unit_rows(&w)?, true));
        }
        Ok((w, trains))
    }

    /// A frozen `head` packed in bf16 when the CPU's bf16 products are on and `h` is an f32 CPU
    /// tensor (packed on first use, then kept).
    fn head_bf16(
        &self,
        (w, trains): &(Tensor, bool),
        h: &Tensor,
    ) -> Result<Option<Arc<Vec<crate::ops::Bf16Weight>>>> {
        if *trains
            || !crate::ops::bf16_products()
            || h.dtype() != DType::F32
            || !h.device().is_cpu()
        {
            return Ok(None);
        }
        if let Some(p) = self.head_bf16.get() {
            return Ok(Some(p.clone()));
        }
        let packed = Arc::new(crate::ops::pack_head_bf16(w)?);
        Ok(Some(self.head_bf16.get_or_init(|| packed).clone()))
    }

    /// Gemma 2's `final_logit_softcapping`.
    fn final_softcap(&self) -> Option<f64> {
        self.cfg.gemma.as_ref().and_then(|g| g.final_softcap)
    }

    fn embed(&self, ids: &[u32], weights: Weights) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let x = self
            .embed
            .value(weights, self.dtype)?
            .0
            .index_select(&ids, 0)?
            .to_dtype(self.dtype)?;
        if self.cfg.gemma.is_none() {
            return Ok(x);
        }
        // Gemma scales by √hidden rounded to the model's dtype, as transformers does.
        let scale = Tensor::new((self.cfg.hidden_size as f64).sqrt(), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok((x * scale)?)
    }

    fn final_norm(&self, x: &Tensor, weights: Weights) -> Result<Tensor> {
        self.dims.norm(x, &self.norm.value(weights, self.dtype)?.0)
    }

    /// RoPE tables `(B, 1, T, rotary_dim)` for `positions`. LongRoPE picks its factors from the
    /// pass's furthest position, as transformers does at each forward.
    fn rope_tables(&self, positions: &[u32], batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let (inv, scale) = self.cfg.rope_for(len);
        self.rope_tables_for(&inv, scale, positions, batch, seq)
    }

    /// M-RoPE tables: each rotary half-dimension turned by the time, height or width position of
    /// its section (`mrope_section`), laid out like [`Self::rope_tables_for`]'s.
    fn mrope_tables(
        &self,
        positions: &[[u32; 3]],
        section: [usize; 3],
        batch: usize,
        seq: usize,
    ) -> Result<(Tensor, Tensor)> {
        let inv = self.cfg.inv_freq();
        if section.iter().sum::<usize>() != inv.len() || positions.len() != batch * seq {
            anyhow::bail!(
                "M-RoPE: mrope_section {section:?} must cover the {} rotary frequencies, and {} positions the {batch}×{seq} tokens",
                inv.len(),
                positions.len()
            );
        }
        let axis: Vec<usize> = (0..inv.len())
            .map(|j| {
                if j < section[0] {
                    0
                } else if j < section[0] + section[1] {
                    1
                } else {
                    2
                }
            })
            .collect();
        let d = inv.len() * 2;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for p in positions {
            for _ in 0..2 {
                for (f, a) in inv.iter().zip(&axis) {
                    let angle = f64::from(p[*a]) * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (batch, 1, seq, d);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// The token embeddings `x (B·T, hidden)` with each image token's row replaced by the
    /// vision tower's output for it, in order.
    fn merge_images(
        &self,
        x: Tensor,
        ids: &[u32],
        v: &super::VisionBatch,
        weights: Weights,
    ) -> Result<Tensor> {
        let Some(tower) = &self.vision else {
            anyhow::bail!(
                "the batch has images but the model has no vision tower (a text-only model)"
            );
        };
        let image = tower.cfg().image_token_id;
        let patch_dim = tower.cfg().patch_dim();
        let pixels = Tensor::from_slice(
            &v.pixel_values,
            (v.pixel_values.len() / patch_dim, patch_dim),
            &self.device,
        )?;
        let feats = tower
            .forward(&pixels, &v.grids, weights)?
            .to_dtype(x.dtype())?;
        let slots = ids.iter().filter(|&&t| t == image).count();
        if slots != feats.dim(0)? {
            anyhow::bail!(
                "the batch has {slots} image tokens but its images give {} embeddings",
                feats.dim(0)?
            );
        }
        // Runs of text rows and of image rows, joined in order.
        let mut pieces = Vec::new();
        let (mut i, mut used) = (0, 0);
        while i < ids.len() {
            let is_image = ids[i] == image;
            let start = i;
            while i < ids.len() && (ids[i] == image) == is_image {
                i += 1;
            }
            let len = i - start;
            if is_image {
                pieces.push(feats.narrow(0, used, len)?);
                used += len;
            } else {
                pieces.push(x.narrow(0, start, len)?);
            }
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }

    /// The sliding-window layers' tables, when the model has such layers: their RoPE (Gemma 3's
    /// local base) and the attention mask `mask(window)` builds.
    fn local_tables(
        &self,
        positions: &[u32],
        batch: usize,
        seq: usize,
        mask: impl FnOnce(usize) -> Result<Tensor>,
    ) -> Result<Option<LocalTables>> {
        let Some(window) = self.cfg.sliding_window.iter().flatten().next() else {
            return Ok(None);
        };
        let (cos, sin) = match self.cfg.local_inv_freq() {
            Some(inv) => self.rope_tables_for(&inv, 1.0, positions, batch, seq)?,
            None => self.rope_tables(positions, batch, seq)?,
        };
        Ok(Some(LocalTables {
            cos,
            sin,
            mask: mask(*window)?,
        }))
    }

    fn rope_tables_for(
        &self,
        inv: &[f64],
        scale: f64,
        positions: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<(Tensor, Tensor)> {
        let half = inv.len();
        let d = half * 2;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            for _ in 0..2 {
                for f in inv {
                    let a = p as f64 * f;
                    cos.push(a.cos() * scale);
                    sin.push(a.sin() * scale);
                }
            }
        }
        let shape = (batch, 1, seq, d);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// The causal mask of a training pass (within packed segments), with keys `window` or more
    /// tokens back blocked too for a sliding-window layer.
    /// `hide_padding` also masks each row's padding keys, as transformers builds the mask from
    /// an attention mask (S²-Attn's groups take the first group's mask, where a short row's
    /// padding shows; otherwise right padding only ever follows a query).
    fn attention_mask(
        &self,
        b: &Batch,
        window: Option<usize>,
        hide_padding: bool,
    ) -> Result<Tensor> {
        let (bs, t) = (b.batch, b.seq);
        let mut m = vec![0f64; bs * t * t];
        for r in 0..bs {
            for i in 0..t {
                for j in 0..t {
                    let mut blocked =
                        causally_blocked(i, j, window) || (hide_padding && j >= b.lens[r]);
                    if let Some(seg) = &b.segments {
                        blocked |= seg[r * t + i] != seg[r * t + j];
                    }
                    if blocked {
                        m[(r * t + i) * t + j] = MASK_VALUE;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (bs, 1, t, t), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Final hidden states of the policy, `(B·T, hidden)`. `rng` turns on dropout (training).
    pub fn hidden(&self, b: &Batch, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        self.hidden_with(b, rng, Weights::Policy)
    }

    /// Final hidden states computed with `weights`. A training pass with S²-Attn runs on the
    /// batch padded to a multiple of 8 tokens, as LLaMA-Factory's collator pads it (the padding
    /// matters there: shifted groups wrap around the sequence); the extra rows are dropped.
    pub fn hidden_with(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
    ) -> Result<Tensor> {
        let Some(pad) = self
            .shift_attn
            .filter(|_| rng.is_some() && weights == Weights::Policy)
        else {
            return self.hidden_pass(b, rng, weights, false);
        };
        let n8 = b.seq.div_ceil(8) * 8;
        if n8 == b.seq {
            return self.hidden_pass(b, rng, weights, true);
        }
        let h = self.hidden_pass(&b.padded_to(n8, pad), rng, weights, true)?;
        let width = h.dim(1)?;
        Ok(h.reshape((b.batch, n8, width))?
            .narrow(1, 0, b.seq)?
            .reshape((b.batch * b.seq, width))?)
    }

    fn hidden_pass(
        &self,
        b: &Batch,
        mut rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        shift: bool,
    ) -> Result<Tensor> {
        let pack = !shift && self.packs(b);
        let (mut x, mut pass) = self.begin_pass(b, rng.as_deref_mut(), weights, shift, pack)?;
        for layer in &self.layers {
            x = if self.checkpointing && weights == Weights::Policy {
                self.checkpointed_layer(layer, x, &pass, rng.as_deref_mut())?
            } else {
                layer.forward(&self.dims, x, &mut pass, rng.as_deref_mut(), weights)?
            };
        }
        if let Some(routing) = pass.routing {
            *self.routing.lock().expect("routing") = routing;
        }
        let h = self.final_norm(&x, weights)?;
        if pack {
            return unpack_rows(&h, b);
        }
        Ok(h)
    }

    /// Whether a pass over `b` runs padding-free: its rows differ in length, and nothing in it
    /// needs the padded layout (neat packing's segments, images and M-RoPE, Mixture-of-Depths'
    /// per-row capacity, S²-Attn's groups — the caller checks the last).
    pub fn packs(&self, b: &Batch) -> bool {
        self.padding_free
            && b.batch > 1
            && b.segments.is_none()
            && b.vision.is_none()
            && !self.layers.iter().any(|l| l.router.is_some())
            && b.lens.iter().sum::<usize>() < b.batch * b.seq
    }

    /// The input embeddings of `b` and what its pass shares across layers (RoPE tables, masks).
    pub(crate) fn begin_pass(
        &self,
        b: &Batch,
        mut rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
        shift: bool,
        pack: bool,
    ) -> Result<(Tensor, Pass<'static>)> {
        let mut x = self.embed(&b.input_ids, weights)?;
        if let (Some(alpha), Some(rng), Weights::Policy) =
            (self.neftune_alpha, rng.as_deref_mut(), weights)
        {
            x = neftune(&x, alpha, b.seq, rng)?;
        }
        let policy = weights == Weights::Policy;
        let routing = (self.router_aux_loss_coef.is_some() && policy).then(Vec::new);
        let depth_capacity = self.depths.next(rng.is_some() && policy);
        if pack {
            // The padded rows are embedded (and NEFTune's noise drawn) as in the padded pass,
            // then only the real tokens go on.
            let real = real_tokens(b);
            let idx = Tensor::from_slice(&real, real.len(), &self.device)?;
            x = x.index_select(&idx, 0)?;
            let positions: Vec<u32> = real.iter().map(|&i| b.positions[i as usize]).collect();
            let mut pass = self.packed_pass(b, &positions)?;
            pass.routing = routing;
            pass.depth_capacity = depth_capacity;
            return Ok((x, pass));
        }
        if let Some(v) = &b.vision {
            x = self.merge_images(x, &b.input_ids, v, weights)?;
        }
        let (cos, sin) = match (&b.vision, self.cfg.mrope_section) {
            (Some(v), Some(section)) => {
                self.mrope_tables(&v.mrope_positions, section, b.batch, b.seq)?
            }
            _ => self.rope_tables(&b.positions, b.batch, b.seq)?,
        };
        let local = self.local_tables(&b.positions, b.batch, b.seq, |w| {
            self.attention_mask(b, Some(w), false)
        })?;
        let pass = Pass {
            batch: b.batch,
            n: b.seq,
            cos,
            sin,
            mask: self.attention_mask(b, None, shift)?,
            local,
            routing,
            cache: None,
            shift,
            depth_capacity,
            blocks: None,
        };
        Ok((x, pass))
    }

    /// The pass of a padding-free batch: one row of its real tokens at `positions`, with a
    /// causal mask per sequence (no routing sink, capacity 1: the caller sets those).
    fn packed_pass(&self, b: &Batch, positions: &[u32]) -> Result<Pass<'static>> {
        let n = positions.len();
        let window = self.cfg.sliding_window.iter().flatten().next().copied();
        let mut masks: BTreeMap<usize, (Tensor, Option<Tensor>)> = BTreeMap::new();
        let mut blocks = Vec::with_capacity(b.batch);
        let mut start = 0;
        for &len in &b.lens {
            if let std::collections::btree_map::Entry::Vacant(e) = masks.entry(len) {
                let global = causal_mask(len, None, self.dtype, &self.device)?;
                let local = window
                    .map(|w| causal_mask(len, Some(w), self.dtype, &self.device))
                    .transpose()?;
                e.insert((global, local));
            }
            let (mask, local_mask) = masks[&len].clone();
            blocks.push(Block {
                start,
                len,
                mask,
                local_mask,
            });
            start += len;
        }
        let (cos, sin) = self.rope_tables(positions, 1, n)?;
        let unused = Tensor::zeros((1, 1, 1, 1), self.dtype, &self.device)?;
        let local = self.local_tables(positions, 1, n, |_| Ok(unused.clone()))?;
        let pass = Pass {
            batch: 1,
            n,
            cos,
            sin,
            mask: unused,
            local,
            routing: None,
            cache: None,
            shift: false,
            depth_capacity: 1.0,
            blocks: Some(blocks),
        };
        Ok(pass)
    }

    /// Decoder layer `l` over `x` in `pass` (an evaluation pass: GPTQ's calibration).
    pub(crate) fn layer_forward(&self, l: usize, x: Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.layers[l].forward(&self.dims, x, pass, None, Weights::Policy)
    }

    /// A decoder layer whose activations are not kept: the output joins the graph through a
    /// checkpoint node whose backward runs the layer again from its saved input (with the same
    /// dropout draws) and hands the layer's trainable gradients to the sink.
    fn checkpointed_layer(
        &self,
        layer: &DecoderLayer,
        x: Tensor,
        pass: &Pass,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let trainable = layer.trainable_tensors();
        let mut fresh = pass.fresh();
        let Some(anchor) = trainable.first().cloned() else {
            // Nothing in this layer trains: its graph only carries `x`'s gradient through.
            return layer.forward(&self.dims, x, &mut fresh, rng, Weights::Policy);
        };
        let replay = rng.as_deref().cloned();
        let y0 = layer
            .forward(&self.dims, x.detach(), &mut fresh, rng, Weights::Policy)?
            .detach();
        // The layer's tensors are shared, not copied: cloning a layer clones handles.
        let layer = std::sync::Arc::new(layer.clone());
        let (dims, sink) = (self.dims, self.grad_sink.clone());
        let l = layer.index;
        let recompute = move |x: &Tensor, g: &Tensor| -> candle_core::Result<Tensor> {
            let run = || -> Result<Tensor> {
                let input = Var::from_tensor(&x.detach())?;
                let mut rng = replay.clone();
                let y = layer.forward(
                    &dims,
                    input.as_tensor().clone(),
                    &mut fresh.fresh(),
                    rng.as_mut(),
                    Weights::Policy,
                )?;
                let store = (y * g)?.sum_all()?.backward()?;
                for t in &trainable {
                    if let Some(gt) = store.get(t) {
                        sink.push(t.clone(), gt.clone());
                    }
                }
                Ok(match store.get(input.as_tensor()) {
                    Some(dx) => dx.clone(),
                    None => input.as_tensor().zeros_like()?,
                })
            };
            run().map_err(|e| candle_core::Error::Msg(format!("checkpointed layer {l}: {e}")))
        };
        Ok(crate::ops::checkpoint(
            &x,
            y0,
            &anchor,
            Box::new(recompute),
        )?)
    }

    /// This model on `device`, computing in `dtype`; what trains keeps training (in
    /// [`Model::trainable_dtype`]). Used to compare devices on the same weights.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Model> {
        if self.quantized().next().is_some() {
            anyhow::bail!("a model with quantized weights cannot be moved to another device");
        }
        let mut weights = HashMap::new();
        for (name, p) in self.params() {
            weights.insert(name, p.t().to_device(device)?.to_dtype(dtype)?);
        }
        let mut m = Model::from_weights(self.cfg.clone(), weights, dtype, device)?;
        let master = m.trainable_dtype();
        let moved = |v: &Var| -> Result<Var> {
            Ok(Var::from_tensor(
                &v.as_tensor().to_device(device)?.to_dtype(master)?,
            )?)
        };
        let trained: BTreeMap<String, Var> = self
            .params()
            .into_iter()
            .filter_map(|(n, p)| Some((n, p.var.clone()?)))
            .collect();
        for (name, p) in m.params_mut() {
            if let Some(v) = trained.get(&name) {
                p.var = Some(moved(v)?);
            }
        }
        let lora: BTreeMap<String, LoraLayer> = self
            .lora_layers()
            .into_iter()
            .map(|(name, l)| (name.to_string(), l.clone()))
            .collect();
        for lin in m.linears_mut() {
            if let Some(l) = lora.get(&lin.name) {
                lin.lora = Some(LoraLayer {
                    a: moved(&l.a)?,
                    b: moved(&l.b)?,
                    magnitude: l.magnitude.as_ref().map(moved).transpose()?,
                    ..l.clone()
                });
            }
        }
        m.checkpointing = self.checkpointing;
        Ok(m)
    }

    /// `loss.backward()`, with the gradients of checkpointed layers merged in. Training code
    /// calls this rather than `backward()` itself.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.grad_sink.clear();
        let mut store = loss.backward()?;
        self.grad_sink.drain_into(&mut store)?;
        Ok(store)
    }

    /// Next-token logits `(vocab,)` for `new` tokens appended to the sequence in `cache`
    /// (batch 1). Weights should be merged and frozen: nothing here is differentiated.
    pub fn forward_cached(&self, new: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.forward_cached_batch(new, 1, &[0], cache)?.squeeze(0)?)
    }

    /// [`Model::forward_cached`] for a prompt with images (a vision-language model): the images'
    /// embeddings spliced in at their tokens, M-RoPE positions, and the cache told where later
    /// tokens sit.
    pub fn forward_cached_with_images(
        &self,
        prompt: &[u32],
        vision: &super::VisionBatch,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        Ok(self
            .cached_pass(prompt, 1, &[0], cache, Some(vision))?
            .squeeze(0)?)
    }

    /// Batched decoding step: `new` holds `batch` rows of equal length (row-major); row `r`
    /// starts with `pad_left[r]` padding positions that no token attends to, and its positions
    /// count from its first real token. Returns next-token logits `(batch, vocab)`.
    pub fn forward_cached_batch(
        &self,
        new: &[u32],
        batch: usize,
        pad_left: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.cached_pass(new, batch, pad_left, cache, None)
    }

    fn cached_pass(
        &self,
        new: &[u32],
        batch: usize,
        pad_left: &[usize],
        cache: &mut KvCache,
        vision: Option<&super::VisionBatch>,
    ) -> Result<Tensor> {
        let n = new.len() / batch;
        let start = cache.len;
        let total = start + n;
        let mut x = self.embed(new, Weights::Policy)?;
        if let Some(v) = vision {
            x = self.merge_images(x, new, v, Weights::Policy)?;
        }
        let mut positions = Vec::with_capacity(batch * n);
        for &pad in pad_left.iter().take(batch) {
            for i in 0..n {
                let p = (start + i).saturating_sub(pad) as i64 + cache.mrope_delta;
                positions.push(p.max(0) as u32);
            }
        }
        // Keys at cache index `j` for the query at `start + i`: causal, never padding, and
        // within the window of a sliding-window layer (counted in cache indices, as
        // transformers counts cache positions).
        let mask = |window: Option<usize>| -> Result<Tensor> {
            let mut m = vec![0f64; batch * n * total];
            for (r, &pad) in pad_left.iter().enumerate().take(batch) {
                for i in 0..n {
                    let q = start + i;
                    for j in 0..total {
                        if j > q || j < pad || window.is_some_and(|w| q - j >= w) {
                            m[(r * n + i) * total + j] = MASK_VALUE;
                        }
                    }
                }
            }
            Ok(Tensor::from_vec(m, (batch, 1, n, total), &self.device)?.to_dtype(self.dtype)?)
        };
        let (cos, sin) = match (vision, self.cfg.mrope_section) {
            (Some(v), Some(section)) => {
                let top = v
                    .mrope_positions
                    .iter()
                    .map(|p| i64::from(p[0].max(p[1]).max(p[2])))
                    .max()
                    .unwrap_or(-1);
                cache.mrope_delta = top + 1 - (start + n) as i64;
                self.mrope_tables(&v.mrope_positions, section, batch, n)?
            }
            _ => self.rope_tables(&positions, batch, n)?,
        };
        let local = self.local_tables(&positions, batch, n, |w| mask(Some(w)))?;
        let mut pass = Pass {
            batch,
            n,
            cos,
            sin,
            mask: mask(None)?,
            local,
            routing: None,
            cache: Some(cache),
            shift: false,
            depth_capacity: self.depths.next(false),
            blocks: None,
        };
        for layer in &self.layers {
            x = layer.forward(&self.dims, x, &mut pass, None, Weights::Policy)?;
        }
        if let Some(cache) = pass.cache {
            cache.len = total;
        }
        let last = x.reshape((batch, n, ()))?.narrow(1, n - 1, 1)?.squeeze(1)?;
        let h = self.final_norm(&last, Weights::Policy)?;
        self.lm_head(&h, Weights::Policy)
    }

    /// Logits for every position, `(B, T, vocab)`.
    pub fn logits(&self, b: &Batch) -> Result<Tensor> {
        let h = self.hidden(b, None)?;
        let logits = self.lm_head(&h, Weights::Policy)?;
        Ok(logits.reshape((b.batch, b.seq, ()))?)
    }

    /// `(B, T, vocab)` logits of a training pass (`rng` drives dropout and NEFTune; S²-Attn
    /// when `shift_attn` is on).
    pub fn train_logits(&self, b: &Batch, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let h = self.hidden(b, Some(rng))?;
        let logits = self.lm_head(&h, Weights::Policy)?;
        Ok(logits.reshape((b.batch, b.seq, ()))?)
    }

    /// LM-head logits of every position whose next label is trained. Only these rows reach the
    /// LM head: prompt rows cost nothing there.
    pub fn target_logits(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Option<TargetLogits>> {
        Ok(self.target_states(b, rng, Weights::Policy)?.map(|(_, t)| t))
    }

    /// [`Model::target_logits`] computed with `weights`, with the final hidden states of those
    /// positions `(n, hidden)` (what a value head reads).
    pub fn target_states(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
    ) -> Result<Option<(Tensor, TargetLogits)>> {
        let h = self.hidden_with(b, rng, weights)?;
        let (rows, targets) = shifted_targets(b);
        if rows.is_empty() {
            return Ok(None);
        }
        let idx = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let h = h.index_select(&idx, 0)?;
        let head = self.head_weight(weights)?;
        let head_bf16 = self.head_bf16(&head, &h)?;
        Ok(Some((
            h.clone(),
            TargetLogits {
                h,
                head,
                head_bf16,
                softcap: self.final_softcap(),
                rows,
                targets,
            },
        )))
    }

    /// Per-sequence sums of the log-probabilities of the labelled tokens `(B,)`, and how many
    /// labelled tokens each sequence has (for length-averaged losses).
    pub fn sequence_logps(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Vec<usize>)> {
        self.sequence_logps_with(b, rng, Weights::Policy)
    }

    fn sequence_logps_with(
        &self,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
        weights: Weights,
    ) -> Result<(Tensor, Vec<usize>)> {
        let Some((_, t)) = self.target_states(b, rng, weights)? else {
            return Ok((
                Tensor::zeros(b.batch, self.trainable_dtype(), &self.device)?,
                vec![0; b.batch],
            ));
        };
        let n = t.targets.len();
        let mut counts = vec![0usize; b.batch];
        let mut member = vec![0f64; b.batch * n];
        for (k, r) in t.rows.iter().enumerate() {
            let seq = *r as usize / b.seq;
            counts[seq] += 1;
            member[seq * n + k] = 1.0;
        }
        let logps = t.token_logps()?;
        let member =
            Tensor::from_vec(member, (b.batch, n), &self.device)?.to_dtype(logps.dtype())?;
        Ok((member.matmul(&logps)?.squeeze(1)?, counts))
    }

    /// [`Model::sequence_logps`] of the reference model (base weights, adapters off), detached.
    pub fn reference_logps(&self, b: &Batch) -> Result<Tensor> {
        Ok(self
            .sequence_logps_with(b, None, Weights::Reference)?
            .0
            .detach())
    }

    /// Summed token cross-entropy over labels != -100, shifted like Hugging Face (position t
    /// predicts label t+1), and the number of such tokens.
    pub fn loss_sum(&self, b: &Batch, rng: Option<&mut ChaCha8Rng>) -> Result<(Tensor, usize)> {
        let Some(t) = self.target_logits(b, rng)? else {
            return Ok((Tensor::zeros((), self.trainable_dtype(), &self.device)?, 0));
        };
        let n = t.targets.len();
        let ce = t.token_logps()?.sum_all()?.neg()?;
        let Some(coef) = self.router_aux_loss_coef else {
            return Ok((ce, n));
        };
        // transformers adds `coef · aux` to the batch's mean loss; as a token sum that is
        // `coef · aux · n`, so a step's token-weighted mean carries the same term.
        let routing = std::mem::take(&mut *self.routing.lock().expect("routing"));
        let Some(moe) = self.cfg.moe.as_ref().filter(|_| !routing.is_empty()) else {
            anyhow::bail!("the load-balancing loss needs the router logits of a mixture-of-experts pass without gradient checkpointing");
        };
        // A padding-free pass routed the real tokens only.
        let routed = routing[0].probs.dim(0)?;
        let keep: Vec<bool> = if routed == b.batch * b.seq {
            (0..b.batch)
                .flat_map(|r| (0..b.seq).map(move |t| t < b.lens[r]))
                .collect()
        } else {
            vec![true; routed]
        };
        let aux = super::mlp::load_balancing_loss(&routing, &keep, moe.top_k)?;
        let aux = (aux.to_dtype(ce.dtype())? * (coef * n as f64))?;
        Ok(((ce + aux)?, n))
    }
}

/// Index into `B·T` of every real (unpadded) token of `b`, row by row.
fn real_tokens(b: &Batch) -> Vec<u32> {
    (0..b.batch)
        .flat_map(|r| (0..b.lens[r]).map(move |t| (r * b.seq + t) as u32))
        .collect()
}

/// The rows of a padding-free pass `(Σ lens, width)` put back in the batch's `(B·T, width)`
/// layout, zeros at the padding.
fn unpack_rows(h: &Tensor, b: &Batch) -> Result<Tensor> {
    let width = h.dim(1)?;
    let mut pieces = Vec::with_capacity(2 * b.batch);
    let mut start = 0;
    for &len in &b.lens {
        pieces.push(h.narrow(0, start, len)?);
        start += len;
        if len < b.seq {
            pieces.push(Tensor::zeros((b.seq - len, width), h.dtype(), h.device())?);
        }
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

/// Whether query `i` may not see key `j`: a later key, or one `window` or more tokens back.
fn causally_blocked(i: usize, j: usize, window: Option<usize>) -> bool {
    j > i || window.is_some_and(|w| i - j.min(i) >= w)
}

/// A causal mask `(1, 1, len, len)`, keys `window` or more tokens back blocked too.
fn causal_mask(len: usize, window: Option<usize>, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; len * len];
    for i in 0..len {
        for j in 0..len {
            if causally_blocked(i, j, window) {
                m[i * len + j] = MASK_VALUE as f32;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, 1, len, len), dev)?.to_dtype(dtype)?)
}

/// Each row of `w` divided by its length (`torch.nn.functional.normalize`, eps 1e-12), computed
/// in f32 for a half-precision `w` and returned in `w`'s dtype.
pub(crate) fn unit_rows(w: &Tensor) -> Result<Tensor> {
    let x = w.to_dtype(super::layers::f32_if_half(w.dtype()))?;
    let len = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&len)?.to_dtype(w.dtype())?)
}

/// `h · Wᵀ` for an LM head `(W, trains)`, soft-capped as `cap · tanh(z / cap)` when the model
/// says so: a frozen head through [`crate::ops::frozen_head`] (input gradient only, any stored
/// dtype).
fn head_logits(h: &Tensor, (w, trains): &(Tensor, bool), softcap: Option<f64>) -> Result<Tensor> {
    let z = if *trains {
        h.matmul(&w.t()?)?
    } else {
        crate::ops::frozen_head(h, w)?
    };
    Ok(match softcap {
        Some(cap) => ((z / cap)?.tanh()? * cap)?,
        None => z,
    })
}

/// The labelled positions of a batch: their final hidden states, the LM head that turns them
/// into logits, their rows in `B·T` and their target ids. The `(n, vocab)` logits are made only
/// on request: the log-probabilities a loss needs come without them.
pub struct TargetLogits {
    /// `(n, hidden)`.
    h: Tensor,
    /// The LM head weight `(vocab, hidden)` and whether it trains.
    head: (Tensor, bool),
    /// The frozen head packed in bf16, when the CPU's bf16 products are on.
    head_bf16: Option<Arc<Vec<crate::ops::Bf16Weight>>>,
    /// Final logit soft-capping (Gemma 2).
    softcap: Option<f64>,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl TargetLogits {
    /// `(n, vocab)`.
    pub fn logits(&self) -> Result<Tensor> {
        head_logits(&self.h, &self.head, self.softcap)
    }

    /// Log-probability of each target token, `(n, 1)`. With a frozen head (LoRA, freeze, a
    /// reference pass) the logits are made and dropped a few rows at a time.
    pub fn token_logps(&self) -> Result<Tensor> {
        if let (w, false) = &self.head {
            return Ok(crate::ops::frozen_head_logps(
                &self.h,
                w,
                &self.targets,
                self.softcap,
                self.head_bf16.as_deref().map(Vec::as_slice),
            )?);
        }
        let logits = self.logits()?;
        let n = self.targets.len();
        if crate::ops::fused_for(&logits) {
            return Ok(crate::ops::log_softmax_gather(
                &logits,
                self.targets.clone(),
            )?);
        }
        let tgt = Tensor::from_slice(&self.targets, (n, 1), logits.device())?;
        // Half-precision models get f32 log-probabilities (and so an f32 loss).
        let logits = logits.to_dtype(f32_if_half(logits.dtype()))?;
        Ok(log_softmax(&logits)?.gather(&tgt, 1)?)
    }
}

/// NEFTune (Jain et al.; transformers' `neftune_post_forward_hook`): the embeddings `x (B·T,
/// hidden)` of a batch padded to `seq` tokens plus uniform noise in `±α/√(seq·hidden)`.
pub(crate) fn neftune(x: &Tensor, alpha: f64, seq: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    use rand::Rng;
    let hidden = x.dim(1)?;
    let mag = alpha / ((seq * hidden) as f64).sqrt();
    let noise: Vec<f32> = (0..x.elem_count())
        .map(|_| rng.gen_range(-mag..=mag) as f32)
        .collect();
    let noise = Tensor::from_vec(noise, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x + noise)?)
}

#[cfg(test)]
mod neftune_tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn neftune_noise_is_uniform_with_transformers_magnitude() {
        // transformers: mag_norm = α / √(seq_len · hidden), noise ~ U(−mag_norm, mag_norm).
        let (rows, hidden, seq, alpha) = (4 * 16, 64, 16, 5.0);
        let x = Tensor::zeros((rows, hidden), DType::F32, &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let y: Vec<f32> = neftune(&x, alpha, seq, &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mag = alpha / ((seq * hidden) as f64).sqrt();
        let max = y.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
        assert!(max <= mag + 1e-7 && max > 0.99 * mag, "{max} vs {mag}");
        let mean_sq = y.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / y.len() as f64;
        let want = mag * mag / 3.0;
        assert!((mean_sq - want).abs() < 0.05 * want, "{mean_sq} vs {want}");
    }
}
