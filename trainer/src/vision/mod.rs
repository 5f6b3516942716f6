//! Images for vision-language models: decoding as Pillow does ([`decode`]), Pillow's bicubic
//! resampling ([`resample`]), and each model family's processor ([`qwen2_vl`], [`clip`] for LLaVA), so that pixel
//! values equal the Hugging Face processor's.

pub mod clip;
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
