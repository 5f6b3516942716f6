//! Generation: KV-cache decoding with Hugging Face's sampling rules (repetition penalty,
//! temperature, top-k, top-p), stopping on eos and the template's stop words, streaming text
//! through a callback; and `ChatModel`, the loaded model + tokenizer + template used by
//! `llamafactory chat`, the API server and the web UI.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::converter::{Message, Role};
use crate::data::media::ImageBatcher;
use crate::data::pipeline::load_tokenizer_and_template;
use crate::data::template::Template;
use crate::model::{KvCache, Model};
use crate::tokenizer::HfTokenizer;
use protocol::TrainArgs;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl GenerationConfig {
    pub fn from_args(a: &TrainArgs) -> Self {
        Self {
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty,
            max_new_tokens: if a.max_new_tokens > 0 {
                a.max_new_tokens
            } else {
                a.max_length
            },
            seed: a.seed,
        }
    }

    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            max_new_tokens,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

/// Picks the next token from logits per `cfg`, as transformers' processors and warpers do.
pub fn next_token(
    logits: &[f32],
    history: &[u32],
    cfg: &GenerationConfig,
    rng: &mut ChaCha8Rng,
) -> u32 {
    let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    if cfg.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v < 0.0 {
                    *v * cfg.repetition_penalty
                } else {
                    *v / cfg.repetition_penalty
                };
            }
        }
    }
    let argmax = |l: &[f64]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if !cfg.do_sample || cfg.temperature <= 0.0 {
        return argmax(&l);
    }
    for v in l.iter_mut() {
        *v /= cfg.temperature;
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]));
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k.max(1));
    }
    let max = l[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (l[i] - max).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut r: f64 = rng.gen();
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return idx[i] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Turns growing token lists into text deltas without splitting a UTF-8 character, decoding
/// only a short window (not the whole reply) per token: the text of the window's tokens that
/// were already shown, and of the window with the new ones; the difference is new text once it
/// no longer ends in a half character (U+FFFD). Starting the window at shown tokens keeps
/// decoders that treat a sequence's start specially (a stripped leading space) consistent.
pub struct TextStream {
    /// Where the decoded window starts.
    prefix: usize,
    /// The tokens before this are shown.
    read: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self { prefix: 0, read: 0 }
    }

    pub fn delta(&mut self, tok: &HfTokenizer, ids: &[u32]) -> Option<String> {
        let shown = tok.decode(&ids[self.prefix..self.read], true);
        let text = tok.decode(&ids[self.prefix..], true);
        if text.len() <= shown.len()
            || text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(shown.len())
        {
            return None;
        }
        let d = text[shown.len()..].to_string();
        self.prefix = self.read;
        self.read = ids.len();
        Some(d)
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes up to `max_new_tokens` after `prompt`; `on_token` sees each new id and returns
/// false to stop early. Returns the new ids (without the stop token) and why it stopped.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &GenerationConfig,
    stop_ids: &[u32],
    on_token: impl FnMut(u32, &[u32]) -> bool,
) -> Result<(Vec<u32>, FinishReason)> {
    generate_with_images(model, prompt, None, cfg, stop_ids, on_token)
}

/// [`generate`] for a prompt whose image tokens take the embeddings of `images` (a
/// vision-language model).
pub fn generate_with_images(
    model: &Model,
    prompt: &[u32],
    images: Option<&crate::model::VisionBatch>,
    cfg: &GenerationConfig,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32, &[u32]) -> bool,
) -> Result<(Vec<u32>, FinishReason)> {
    if prompt.is_empty() {
        bail!("empty prompt");
    }
    let mut cache = KvCache::default();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    let mut logits = match images {
        Some(v) => model.forward_cached_with_images(prompt, v, &mut cache)?,
        None => model.forward_cached(prompt, &mut cache)?,
    };
    for _ in 0..cfg.max_new_tokens {
        let l: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        let t = next_token(&l, &history, cfg, &mut rng);
        if stop_ids.contains(&t) {
            return Ok((out, FinishReason::Stop));
        }
        out.push(t);
        history.push(t);
        if !on_token(t, &out) {
            return Ok((out, FinishReason::Cancelled));
        }
        logits = model.forward_cached(&[t], &mut cache)?;
    }
    Ok((out, FinishReason::Length))
}

/// One row of [`generate_batch`]: the new ids without the stop token, and the stop token
/// that ended it (none when it ran to `max_new_tokens`).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub stop: Option<u32>,
}

/// Decodes several prompts at once (left-padded); each row stops on its own.
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    stop_ids: &[u32],
    pad_id: u32,
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        bail!("empty prompt");
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let mut first = Vec::with_capacity(b * width);
    for (p, &pad) in prompts.iter().zip(&pads) {
        first.extend(std::iter::repeat_n(pad_id, pad));
        first.extend_from_slice(p);
    }
    let mut cache = KvCache::default();
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|i| ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(i as u64)))
        .collect();
    let mut histories: Vec<Vec<u32>> = prompts.to_vec();
    let mut outs: Vec<Generated> = vec![
        Generated {
            ids: Vec::new(),
            stop: None
        };
        b
    ];
    let mut done = vec![false; b];
    let mut logits = model.forward_cached_batch(&first, b, &pads, &mut cache)?;
    for _ in 0..cfg.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut step = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                step.push(pad_id);
                continue;
            }
            let t = next_token(&rows[r], &histories[r], cfg, &mut rngs[r]);
            if stop_ids.contains(&t) {
                done[r] = true;
                outs[r].stop = Some(t);
                step.push(pad_id);
            } else {
                outs[r].ids.push(t);
                histories[r].push(t);
                step.push(t);
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        logits = model.forward_cached_batch(&step, b, &pads, &mut cache)?;
    }
    Ok(outs)
}

/// A model ready to chat: base weights with adapters merged, tokenizer and template.
pub struct ChatModel {
    pub model: Model,
    pub tok: HfTokenizer,
    pub template: Template,
    pub gen: GenerationConfig,
    pub name: String,
    /// The resolved model folder.
    pub dir: std::path::PathBuf,
    /// LLaMA-Factory's image regularization budget (`image_max_pixels`, `image_min_pixels`).
    pub image_max_pixels: usize,
    pub image_min_pixels: usize,
}

pub struct Reply {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: FinishReason,
}

impl ChatModel {
    /// Loads the model, its adapters merged, and its tokenizer. Without `template`, the
    /// template follows the model (see `template::auto`): what `chat`, `api` and predictions do.
    pub fn load(args: &TrainArgs, device: &Device) -> Result<Self> {
        let name = args.model_name_or_path.clone().unwrap_or_default();
        let dir = crate::hub::resolve_model_dir(&name, &args.model_revision)?;
        let mut args = args.clone();
        if args.template.is_none() {
            args.template = crate::data::template::auto::auto_template(&dir).name;
        }
        Self::load_as_given(&args, device)
    }

    /// [`ChatModel::load`] without choosing a template: no `template` means the model's own
    /// chat template (LlamaBoard's explicit "model's own" choice).
    pub fn load_as_given(args: &TrainArgs, device: &Device) -> Result<Self> {
        let name = args.model_name_or_path.clone().unwrap_or_default();
        let dir = crate::hub::resolve_model_dir(&name, &args.model_revision)?;
        let (tok, template, _warnings) = load_tokenizer_and_template(args)?;
        let quant = crate::model::quant::QuantFormat::from_args(args)?;
        let mut model = Model::load_quantized(&dir, DType::F32, device, quant)?;
        crate::model::depths::configure(&mut model, args.mixture_of_depths, args.seed)?;
        if let Some(kind) = args.rope_scaling {
            model.cfg.apply_rope_scaling(kind, None);
        }
        if args.resize_vocab && tok.len() > model.cfg.vocab_size {
            model.resize_vocab(tok.len())?;
        }
        for adapter in TrainArgs::split_list(args.adapter_name_or_path.as_deref()) {
            model.load_adapter(Path::new(&adapter), false)?;
        }
        if tok.len() > model.cfg.vocab_size {
            bail!("the tokenizer has {} tokens but the model only {} embeddings: give the adapter's folder or resize the vocabulary", tok.len(), model.cfg.vocab_size);
        }
        Ok(Self {
            model,
            tok,
            template,
            gen: GenerationConfig::from_args(args),
            name,
            dir,
            image_max_pixels: args.image_max_pixels,
            image_min_pixels: args.image_min_pixels,
        })
    }

    /// Prompt ids for a conversation ending in a user turn, as LLaMA-Factory's chat encodes it.
    pub fn prompt_ids(&self, messages: &[Message], system: &str, tools: &str) -> Result<Vec<u32>> {
        let mut msgs = messages.to_vec();
        msgs.push(Message::new(Role::Assistant, ""));
        let (prompt, _) = self
            .template
            .encode_oneturn(&self.tok, &msgs, system, tools)
            .map_err(anyhow::Error::msg)?;
        Ok(prompt)
    }

    /// Answers `messages`, streaming text deltas to `on_text` (return false to stop).
    pub fn chat(
        &self,
        messages: &[Message],
        system: &str,
        tools: &str,
        gen: &GenerationConfig,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Reply> {
        self.chat_with_images(messages, &[], system, tools, gen, on_text)
    }

    /// Whether the model reads images (a vision-language model with its template).
    pub fn takes_images(&self) -> bool {
        self.model.vision.is_some() && self.template.mm != crate::data::template::MmPlugin::Base
    }

    /// [`ChatModel::chat`] with images: each `<image>` of the messages takes the next image
    /// (without any, the images go before the first message's text, as LLaMA-Factory's chat
    /// puts them), each regularized and processed as in training.
    pub fn chat_with_images(
        &self,
        messages: &[Message],
        images: &[crate::vision::RgbImage],
        system: &str,
        tools: &str,
        gen: &GenerationConfig,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Reply> {
        let (prompt, vision) = if images.is_empty() {
            (self.prompt_ids(messages, system, tools)?, None)
        } else {
            let batcher = self.image_batcher()?;
            let (messages, pixels) = self.with_images(&batcher, messages, images)?;
            let prompt = self.prompt_ids(&messages, system, tools)?;
            let vision = batcher.with_positions(pixels, &prompt, prompt.len())?;
            (prompt, Some(vision))
        };
        let stop = self.template.stop_token_ids(&self.tok);
        let mut stream = TextStream::new();
        let (ids, finish) = generate_with_images(
            &self.model,
            &prompt,
            vision.as_ref(),
            gen,
            &stop,
            |_, all| match stream.delta(&self.tok, all) {
                Some(d) => on_text(&d),
                None => true,
            },
        )?;
        Ok(Reply {
            text: self.tok.decode(&ids, true),
            prompt_tokens: prompt.len(),
            completion_tokens: ids.len(),
            finish,
        })
    }
}

impl ChatModel {
    /// The image batcher of a model that takes images.
    fn image_batcher(&self) -> Result<ImageBatcher> {
        if !self.takes_images() {
            bail!(
                "This model does not support image input (model {}, template `{}`); images need a vision-language model such as Qwen2-VL or LLaVA with its template",
                self.name,
                self.template.name
            );
        }
        ImageBatcher::for_model(
            self.model.cfg.vision.as_ref(),
            &self.dir,
            self.image_max_pixels,
            self.image_min_pixels,
        )
    }

    /// The messages with their `<image>` placeholders expanded for `images`, and the images as
    /// the model reads them (their positions still to come from the prompt).
    fn with_images(
        &self,
        batcher: &ImageBatcher,
        messages: &[Message],
        images: &[crate::vision::RgbImage],
    ) -> Result<(Vec<Message>, crate::model::VisionBatch)> {
        use crate::data::media::IMAGE_PLACEHOLDER;
        let mut messages = messages.to_vec();
        let placed: usize = messages
            .iter()
            .map(|m| m.content.matches(IMAGE_PLACEHOLDER).count())
            .sum();
        if placed == 0 {
            if let Some(first) = messages.first_mut() {
                first.content = IMAGE_PLACEHOLDER.repeat(images.len()) + &first.content;
            }
        } else if placed != images.len() {
            bail!(
                "The number of images ({}) does not match the number of {IMAGE_PLACEHOLDER} tokens ({placed})",
                images.len()
            );
        }
        let vision = batcher.pixels(images.iter().cloned().map(Ok))?;
        let tokens: Vec<usize> = vision
            .grids
            .iter()
            .map(|g| batcher.media.tokens_for(*g))
            .collect();
        let mut next = 0;
        for msg in &mut messages {
            msg.content = crate::data::media::fill_placeholders(
                self.template.mm,
                &msg.content,
                &tokens,
                &mut next,
            );
        }
        Ok((messages, vision))
    }
}

/// Greedy ids for a batch of prompts, one after another (the API and predict use this).
pub fn generate_ids(model: &Model, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    Ok(generate(
        model,
        prompt,
        &GenerationConfig::greedy(max_new),
        &[],
        |_, _| true,
    )?
    .0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_rules() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        assert_eq!(
            next_token(&logits, &[], &GenerationConfig::greedy(1), &mut rng),
            1
        );
        // Repetition penalty 3 turns 3.0 into 1.0, so token 2 wins greedily.
        let cfg = GenerationConfig {
            repetition_penalty: 3.0,
            ..GenerationConfig::greedy(1)
        };
        assert_eq!(next_token(&logits, &[1], &cfg, &mut rng), 2);
        // top_k 1 and top_p tiny are greedy even when sampling.
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 1,
            ..GenerationConfig::greedy(1)
        };
        assert!((0..20).all(|_| next_token(&logits, &[], &cfg, &mut rng) == 1));
        let cfg = GenerationConfig {
            do_sample: true,
            top_p: 0.01,
            temperature: 0.7,
            ..GenerationConfig::greedy(1)
        };
        assert!((0..20).all(|_| next_token(&logits, &[], &cfg, &mut rng) == 1));
        // Plain sampling reaches other tokens, never beyond top_k.
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 2,
            temperature: 5.0,
            ..GenerationConfig::greedy(1)
        };
        let picks: Vec<u32> = (0..200)
            .map(|_| next_token(&logits, &[], &cfg, &mut rng))
            .collect();
        assert!(
            picks.contains(&1) && picks.contains(&2) && !picks.contains(&0) && !picks.contains(&3)
        );
    }

    #[test]
    fn batched_greedy_equals_one_by_one() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/llama");
        let model = Model::load(&dir, DType::F64, &Device::Cpu).unwrap();
        let prompts = vec![
            vec![3u32, 17, 42, 5, 88, 9],
            vec![11, 2],
            vec![7, 50, 61, 23],
        ];
        let cfg = GenerationConfig::greedy(7);
        let batched = generate_batch(&model, &prompts, &cfg, &[], 0).unwrap();
        for (p, got) in prompts.iter().zip(&batched) {
            assert_eq!(generate_ids(&model, p, 7).unwrap(), got.ids);
        }
    }

    #[test]
    fn cached_decoding_matches_full_forward() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/qwen3");
        let model = Model::load(&dir, DType::F64, &Device::Cpu).unwrap();
        let ids: Vec<u32> = vec![3, 17, 42, 5, 88, 9];
        let mut cache = KvCache::default();
        model.forward_cached(&ids[..4], &mut cache).unwrap();
        model.forward_cached(&ids[4..5], &mut cache).unwrap();
        let last = model
            .forward_cached(&ids[5..], &mut cache)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let b = crate::model::Batch::pad(&[(&ids, &labels, None)], 0);
        let full = model
            .logits(&b)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(5)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let diff = last
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-10, "{diff}");
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    /// With the demo tokenizer (byte-level BPE) a CJK character or an emoji takes several
    /// tokens: no delta may carry a half character, and the deltas add up to the text.
    #[test]
    fn deltas_never_split_a_character() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/demo-tokenizer");
        let tok = HfTokenizer::load(&dir).unwrap();
        let text = "你好，世界！今天天气很好 🙂 é";
        let ids = tok.encode(text);
        assert!(
            ids.len() > text.chars().count(),
            "characters span several tokens"
        );
        let mut stream = TextStream::new();
        let mut out = String::new();
        for n in 1..=ids.len() {
            if let Some(d) = stream.delta(&tok, &ids[..n]) {
                assert!(!d.contains('\u{FFFD}'), "half a character in {d:?}");
                out += &d;
            }
        }
        assert_eq!(out, tok.decode(&ids, true));
    }
}
