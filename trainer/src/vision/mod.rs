//! Images for vision-language models: decoding as Pillow does ([`decode`]), Pillow's bicubic
//! resampling ([`resample`]), and each model family's processor ([`qwen2_vl`], [`clip`] for LLaVA), so that pixel
//! values equal the Hugging Face processor's.

pub mod clip;
pub mod decode;
pub mod qwen2_vl;
pub mod resample;

/// OpenAI CLIP's per-channel normalization, the default of both processors.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

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

/// `preprocessor_config.json` of the model folder `dir`, and its path (for messages).
pub(crate) fn preprocessor_config(
    dir: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, serde_json::Value)> {
    use anyhow::Context;
    let file = dir.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let v = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", file.display()))?;
    Ok((file, v))
}

/// A per-channel triple of a processor config (`image_mean`, `image_std`), if given.
pub(crate) fn channel_triple(
    v: &serde_json::Value,
    key: &str,
    file: &std::path::Path,
) -> anyhow::Result<Option<[f32; 3]>> {
    let Some(a) = v.get(key) else { return Ok(None) };
    let a: Vec<f32> = a
        .as_array()
        .filter(|a| a.len() == 3)
        .ok_or_else(|| anyhow::anyhow!("{}: `{key}` must be three numbers", file.display()))?
        .iter()
        .map(|x| x.as_f64().unwrap_or(0.0) as f32)
        .collect();
    Ok(Some([a[0], a[1], a[2]]))
}
