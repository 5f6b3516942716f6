//! Images for vision-language models: decoding as Pillow does ([`decode`]), Pillow's bicubic
//! resampling ([`resample`]), and each model family's processor ([`qwen2_vl`]), so that pixel
//! values equal the Hugging Face processor's.

pub mod decode;
pub mod qwen2_vl;
pub mod resample;

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "RGB buffer size");
        Self {
            width,
            height,
            data,
        }
    }
}

/// What turns image files into a vision-language model's inputs: the processor, LLaMA-Factory's
/// regularization budget and the image token.
pub struct ImageBatcher {
    pub processor: qwen2_vl::Qwen2VlProcessor,
    pub image_max_pixels: usize,
    pub image_min_pixels: usize,
    pub image_token_id: u32,
}

impl ImageBatcher {
    /// One row's images (decoded, regularized, processed): pixel values, grids, and the M-RoPE
    /// positions of its `ids` continued over `len` tokens (padding continues the count).
    pub fn row(
        &self,
        ids: &[u32],
        images: &[String],
        len: usize,
    ) -> anyhow::Result<crate::model::VisionBatch> {
        let (mut pixel_values, mut grids) = (Vec::new(), Vec::with_capacity(images.len()));
        for path in images {
            let img = decode::load(std::path::Path::new(path))?;
            let img = qwen2_vl::regularize(img, self.image_max_pixels, self.image_min_pixels);
            let p = self.processor.preprocess(&img)?;
            pixel_values.extend(p.pixel_values);
            grids.push(p.grid);
        }
        let mut pos = crate::model::vision::mrope_positions(
            ids,
            &grids,
            self.image_token_id,
            self.processor.merge_size,
        )?;
        let mut next = pos
            .iter()
            .map(|p| p[0].max(p[1]).max(p[2]) + 1)
            .max()
            .unwrap_or(0);
        while pos.len() < len {
            pos.push([next; 3]);
            next += 1;
        }
        Ok(crate::model::VisionBatch {
            pixel_values,
            grids,
            mrope_positions: pos,
        })
    }

    /// The images of `rows` (`(ids, image files)`) for a batch padded to `seq` tokens.
    pub fn batch(
        &self,
        rows: &[(&[u32], &[String])],
        seq: usize,
    ) -> anyhow::Result<crate::model::VisionBatch> {
        let mut v = crate::model::VisionBatch {
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
