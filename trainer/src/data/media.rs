//! Images in the data (LLaMA-Factory's multimodal plugin, `process_messages`): each `<image>`
//! placeholder of a record expanded into the tokens its image becomes — Qwen2-VL: one
//! `<|image_pad|>` per merged 2×2 patch window after LLaMA-Factory's regularization and the
//! processor's `smart_resize`, between `<|vision_start|>` and `<|vision_end|>`; LLaVA: a fixed
//! run of `<image>` tokens (576 for LLaVA-1.5), whatever the image's size. A template without
//! image support refuses a dataset with images; a record whose placeholders and images do not
//! match, or whose image cannot be read, is skipped with a warning that names it.

use std::path::Path;

use anyhow::{bail, Result};

use super::converter::Example;
use super::template::{MmPlugin, Template};
use super::Skipped;
use crate::model::vision::{mrope_positions, VisionConfig, VisionKind};
use crate::model::VisionBatch;
use crate::vision::clip::ClipProcessor;
use crate::vision::qwen2_vl::{ImagePatches, Qwen2VlProcessor};
use crate::vision::{clip, decode, qwen2_vl, RgbImage};

pub const IMAGE_PLACEHOLDER: &str = "<image>";
pub const VIDEO_PLACEHOLDER: &str = "<video>";
pub const AUDIO_PLACEHOLDER: &str = "<audio>";

/// A vision-language model's image processor.
#[derive(Debug, Clone)]
pub enum ImageProcessor {
    /// Qwen2-VL / Qwen2.5-VL: images of any size, M-RoPE positions.
    Qwen2Vl(Qwen2VlProcessor),
    /// LLaVA's CLIP processor; every image becomes `tokens` image tokens.
    Clip {
        processor: ClipProcessor,
        tokens: usize,
    },
}

/// What expanding images needs: the model's image processor and the regularization budget.
#[derive(Debug, Clone)]
pub struct MediaContext {
    pub processor: ImageProcessor,
    pub image_max_pixels: usize,
    pub image_min_pixels: usize,
}

impl MediaContext {
    /// The image processor of the model folder `dir` (`preprocessor_config.json`, and the
    /// vision config in `config.json`) with the run's regularization budget.
    pub fn load(dir: &Path, args: &protocol::TrainArgs) -> Result<Self> {
        let cfg = crate::model::config::ModelConfig::load(dir)?;
        Self::new(
            dir,
            cfg.vision.as_ref(),
            args.image_max_pixels,
            args.image_min_pixels,
        )
    }

    /// The processor for the vision tower `vision` (Qwen2-VL's when not known) from `dir`,
    /// with the budget given.
    pub fn new(
        dir: &Path,
        vision: Option<&VisionConfig>,
        image_max_pixels: usize,
        image_min_pixels: usize,
    ) -> Result<Self> {
        if !dir.join("preprocessor_config.json").exists() {
            bail!(
                "Image processor was not found: {} has no preprocessor_config.json (a vision-language model's folder has one)",
                dir.display()
            );
        }
        let processor = match vision {
            Some(v) if v.kind == VisionKind::Llava => {
                let processor = ClipProcessor::load(dir, v.patch_size)?;
                let tokens = v.fixed_image_tokens().unwrap_or(0);
                let (ch, cw) = processor.crop.unwrap_or((0, 0));
                let image = v.clip.as_ref().map_or(0, |c| c.image_size);
                if (ch, cw) != (image, image) {
                    bail!(
                        "{}: the processor's images are {cw}×{ch} (`crop_size`) but the vision tower reads {image}×{image} (`vision_config.image_size`)",
                        dir.join("preprocessor_config.json").display()
                    );
                }
                ImageProcessor::Clip { processor, tokens }
            }
            _ => ImageProcessor::Qwen2Vl(Qwen2VlProcessor::load(dir)?),
        };
        Ok(Self {
            processor,
            image_max_pixels,
            image_min_pixels,
        })
    }

    /// An image as the model reads it: LLaMA-Factory's regularization, then the processor.
    pub fn process(&self, img: RgbImage) -> Result<ImagePatches> {
        let (max, min) = (self.image_max_pixels, self.image_min_pixels);
        match &self.processor {
            ImageProcessor::Qwen2Vl(p) => p.preprocess(&qwen2_vl::regularize(img, max, min)),
            ImageProcessor::Clip { processor, .. } => {
                processor.preprocess(&clip::regularize(img, max, min))
            }
        }
    }

    /// The number of image tokens an image of patch grid `grid` becomes.
    pub fn tokens_for(&self, grid: [usize; 3]) -> usize {
        match &self.processor {
            ImageProcessor::Qwen2Vl(p) => grid.iter().product::<usize>() / (p.merge_size.pow(2)),
            ImageProcessor::Clip { tokens, .. } => *tokens,
        }
    }

    /// The number of image tokens the image at `path` becomes.
    pub fn image_tokens(&self, path: &str) -> Result<usize, String> {
        Ok(self.tokens_for(self.image_grid(path)?))
    }

    /// The patch grid `(t, h, w)` of the image at `path` as the tower reads it (Qwen2-VL: after
    /// regularization and `smart_resize`), read from the image's header.
    pub fn image_grid(&self, path: &str) -> Result<[usize; 3], String> {
        let (w, h) =
            image::image_dimensions(path).map_err(|e| format!("cannot read image {path}: {e}"))?;
        let (max, min) = (self.image_max_pixels, self.image_min_pixels);
        match &self.processor {
            ImageProcessor::Qwen2Vl(p) => {
                let (w, h) = qwen2_vl::regularized_size(w as usize, h as usize, max, min);
                let (rh, rw) = p
                    .smart_resize(h, w)
                    .map_err(|e| format!("image {path}: {e}"))?;
                Ok([1, rh / p.patch_size, rw / p.patch_size])
            }
            ImageProcessor::Clip { processor: p, .. } => {
                let (w, h) = clip::regularized_size(w as usize, h as usize, max, min);
                let (oh, ow) = p.output_size(h, w);
                Ok([1, oh / p.patch_size, ow / p.patch_size])
            }
        }
    }

    /// Qwen2-VL's merge size, when the model places images with M-RoPE.
    fn mrope_merge(&self) -> Option<usize> {
        match &self.processor {
            ImageProcessor::Qwen2Vl(p) => Some(p.merge_size),
            ImageProcessor::Clip { .. } => None,
        }
    }
}

/// `text` with each `<image>` replaced by the template's tokens for the next image
/// (`tokens[next]` of them): Qwen2-VL's image pads between vision start and end, LLaVA's
/// `<image>` tokens.
pub fn fill_placeholders(
    plugin: MmPlugin,
    text: &str,
    tokens: &[usize],
    next: &mut usize,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(IMAGE_PLACEHOLDER) {
        out.push_str(&rest[..i]);
        let n = tokens.get(*next).copied().unwrap_or(0);
        match plugin {
            MmPlugin::Llava => out.push_str(&IMAGE_PLACEHOLDER.repeat(n)),
            MmPlugin::Qwen2Vl | MmPlugin::Base => {
                out.push_str("<|vision_start|>");
                out.push_str(&"<|image_pad|>".repeat(n));
                out.push_str("<|vision_end|>");
            }
        }
        *next += 1;
        rest = &rest[i + IMAGE_PLACEHOLDER.len()..];
    }
    out.push_str(rest);
    out
}

/// What turns a batch's image files into a vision-language model's inputs: the model's image
/// processor and budget ([`MediaContext`]) and its image token. Training, evaluation,
/// prediction and chat all use it.
pub struct ImageBatcher {
    pub media: MediaContext,
    pub image_token_id: u32,
}

impl ImageBatcher {
    /// The batcher of the model whose vision config is `vision` and whose folder `dir` holds its
    /// `preprocessor_config.json`.
    pub fn for_model(
        vision: Option<&VisionConfig>,
        dir: &Path,
        image_max_pixels: usize,
        image_min_pixels: usize,
    ) -> Result<Self> {
        let Some(v) = vision else {
            bail!("the data has images but the model has no vision tower (a text-only model)");
        };
        Ok(Self {
            media: MediaContext::new(dir, Some(v), image_max_pixels, image_min_pixels)?,
            image_token_id: v.image_token_id,
        })
    }

    /// Images (decoded or read from their files) as pixel values and grids, in order.
    pub fn pixels(
        &self,
        images: impl IntoIterator<Item = Result<RgbImage>>,
    ) -> Result<VisionBatch> {
        let mut v = VisionBatch {
            pixel_values: Vec::new(),
            grids: Vec::new(),
            mrope_positions: Vec::new(),
        };
        for img in images {
            let p = self.media.process(img?)?;
            v.pixel_values.extend(p.pixel_values);
            v.grids.push(p.grid);
        }
        Ok(v)
    }

    /// `v` with the M-RoPE positions of `ids` continued over `len` tokens (padding continues the
    /// count); a model without M-RoPE (LLaVA) takes plain positions and `v` as it is.
    pub fn with_positions(
        &self,
        mut v: VisionBatch,
        ids: &[u32],
        len: usize,
    ) -> Result<VisionBatch> {
        let Some(merge) = self.media.mrope_merge() else {
            return Ok(v);
        };
        let mut pos = mrope_positions(ids, &v.grids, self.image_token_id, merge)?;
        let mut next = pos
            .iter()
            .map(|p| p[0].max(p[1]).max(p[2]) + 1)
            .max()
            .unwrap_or(0);
        while pos.len() < len {
            pos.push([next; 3]);
            next += 1;
        }
        v.mrope_positions = pos;
        Ok(v)
    }

    /// One row's image files, processed, with its M-RoPE positions over `len` tokens.
    pub fn row(&self, ids: &[u32], images: &[String], len: usize) -> Result<VisionBatch> {
        let v = self.pixels(images.iter().map(|p| decode::load(Path::new(p))))?;
        self.with_positions(v, ids, len)
    }

    /// The images of `rows` (`(ids, image files)`) for a batch padded to `seq` tokens.
    pub fn batch(&self, rows: &[(&[u32], &[String])], seq: usize) -> Result<VisionBatch> {
        let mut v = VisionBatch {
            pixel_values: Vec::new(),
            grids: Vec::new(),
            mrope_positions: Vec::with_capacity(rows.len() * seq),
        };
        for (ids, images) in rows {
            let r = self.row(ids, images, seq)?;
            v.pixel_values.extend(r.pixel_values);
            v.grids.extend(r.grids);
            v.mrope_positions.extend(r.mrope_positions);
        }
        Ok(v)
    }
}

fn has_media(ex: &Example) -> bool {
    !ex.images.is_empty() || !ex.videos.is_empty() || !ex.audios.is_empty()
}

/// Expands the placeholders of every example for `tpl`; records that cannot be expanded come
/// back as skipped. Fails when the data has images and the template cannot take them.
pub fn expand(
    examples: Vec<Example>,
    tpl: &Template,
    ctx: Option<&MediaContext>,
) -> Result<(Vec<Example>, Vec<Skipped>)> {
    let Some(first) = examples.iter().find(|e| has_media(e)) else {
        return Ok((examples, Vec::new()));
    };
    let what = if !first.images.is_empty() {
        "image"
    } else if !first.videos.is_empty() {
        "video"
    } else {
        "audio"
    };
    if tpl.mm == MmPlugin::Base || what != "image" {
        bail!(
            "{} record {}: This model does not support {what} input. Please check whether the correct `template` is used (template `{}`; images need a vision-language model and its template, e.g. qwen2_vl)",
            first.file,
            first.row,
            tpl.name
        );
    }
    let Some(ctx) = ctx else {
        bail!("the data has images but no image processor was loaded");
    };
    let mut kept = Vec::with_capacity(examples.len());
    let mut skipped = Vec::new();
    for mut ex in examples {
        match expand_one(&mut ex, tpl.mm, ctx) {
            Ok(()) => kept.push(ex),
            Err(reason) => skipped.push(Skipped {
                file: ex.file.to_string(),
                row: ex.row,
                reason,
            }),
        }
    }
    Ok((kept, skipped))
}

/// LLaMA-Factory's `process_messages` of the template's plugin on the prompt followed by each
/// response (as its processors call it on `prompt + response`, once per answer of a pair).
fn expand_one(ex: &mut Example, plugin: MmPlugin, ctx: &MediaContext) -> Result<(), String> {
    if !ex.videos.is_empty() || !ex.audios.is_empty() {
        return Err("videos and audios are not supported yet".into());
    }
    let count = |s: &str| s.matches(IMAGE_PLACEHOLDER).count();
    let in_prompt: usize = ex.prompt.iter().map(|m| count(&m.content)).sum();
    for r in &ex.response {
        if in_prompt + count(&r.content) != ex.images.len() {
            return Err(format!(
                "The number of images ({}) does not match the number of {IMAGE_PLACEHOLDER} tokens ({})",
                ex.images.len(),
                in_prompt + count(&r.content)
            ));
        }
    }
    let tokens: Vec<usize> = ex
        .images
        .iter()
        .map(|p| ctx.image_tokens(p))
        .collect::<Result<_, _>>()?;
    let fill = |text: &str, next: &mut usize| fill_placeholders(plugin, text, &tokens, next);
    let mut next = 0;
    for m in &mut ex.prompt {
        m.content = fill(&m.content, &mut next);
    }
    for r in &mut ex.response {
        let mut n = next;
        r.content = fill(&r.content, &mut n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::converter::{Message, Role};

    fn example(prompt: &str, images: usize) -> Example {
        let png = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/vision/small.png")
            .display()
            .to_string();
        Example {
            prompt: vec![Message::new(Role::User, prompt)],
            response: vec![Message::new(Role::Assistant, "ok")],
            system: String::new(),
            tools: String::new(),
            images: vec![png; images],
            videos: Vec::new(),
            audios: Vec::new(),
            file: "data.json".into(),
            row: 7,
        }
    }

    fn ctx() -> MediaContext {
        MediaContext {
            processor: ImageProcessor::Qwen2Vl(Qwen2VlProcessor::default()),
            image_max_pixels: 768 * 768,
            image_min_pixels: 32 * 32,
        }
    }

    #[test]
    fn placeholders_expand_by_image_size_and_mismatches_are_skipped_by_name() {
        let tpl = crate::data::template::get_template("qwen2_vl").unwrap();
        let (kept, skipped) = expand(
            vec![
                example("<image>What is it?", 1),
                example("<image><image>Two?", 1),
            ],
            &tpl,
            Some(&ctx()),
        )
        .unwrap();
        // 45×20 → 48×28 (at least 28 a side) → smart_resize 56×84 → 2×3 merged windows.
        assert_eq!(
            kept[0].prompt[0].content,
            format!(
                "<|vision_start|>{}<|vision_end|>What is it?",
                "<|image_pad|>".repeat(6)
            )
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!((skipped[0].file.as_str(), skipped[0].row), ("data.json", 7));
        assert!(
            skipped[0].reason.contains("does not match"),
            "{:?}",
            skipped[0]
        );
        let mut missing = example("<image>x", 1);
        missing.images = vec!["/no/such/image.png".into()];
        let (_, skipped) = expand(vec![missing], &tpl, Some(&ctx())).unwrap();
        assert!(
            skipped[0].reason.contains("/no/such/image.png"),
            "{:?}",
            skipped[0]
        );
    }

    #[test]
    fn a_text_template_refuses_images() {
        let tpl = crate::data::template::get_template("qwen").unwrap();
        let e = expand(vec![example("<image>hi", 1)], &tpl, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.json record 7") && e.contains("does not support image input"),
            "{e}"
        );
        // Without images nothing changes.
        let (kept, _) = expand(vec![example("<image>hi", 0)], &tpl, None).unwrap();
        assert_eq!(kept[0].prompt[0].content, "<image>hi");
    }
}
