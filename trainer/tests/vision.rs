//! The Qwen2-VL and LLaVA image paths equal LLaMA-Factory's regularization and transformers'
//! `Qwen2VLImageProcessor` / `CLIPImageProcessor` (`scripts/make_vision_fixtures.py`): Pillow's bicubic resize to the
//! bit, JPEG decoding to the bit, pixel values within 1e-5, grids and image token counts.

use std::path::PathBuf;

use base64::Engine;
use serde_json::Value;
use trainer::vision::{decode, qwen2_vl, resample, RgbImage};

#[path = "../../tests/common/shared.rs"]
mod shared;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision")
}

fn bytes(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    bytes(v)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("qwen2_vl.json")).unwrap())
        .unwrap()
}

fn image(rel: &str, test: &str) -> Option<RgbImage> {
    let path = if rel.starts_with("mllm_demo_data/") {
        shared::shared_file(&format!("compat/llamafactory-data/{rel}"), test)?
    } else {
        fixtures().join(rel)
    };
    Some(decode::load(&path).unwrap())
}

#[test]
fn bicubic_resize_equals_pillow_to_the_bit() {
    let e = expected();
    let Some(src) = image(e["resize_source"].as_str().unwrap(), "bicubic_resize") else {
        return;
    };
    for r in e["resizes"].as_array().unwrap() {
        let (w, h) = (
            r["size"][0].as_u64().unwrap() as usize,
            r["size"][1].as_u64().unwrap() as usize,
        );
        let ours = resample::resize_bicubic(&src, w, h);
        let want = bytes(&r["pixels"]);
        let off = ours.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            off,
            0,
            "{w}x{h}: {off} of {} bytes differ from Pillow",
            want.len()
        );
    }
}

#[test]
fn qwen2_vl_pixel_values_equal_the_hugging_face_processor() {
    let e = expected();
    let processor = qwen2_vl::Qwen2VlProcessor::load(&fixtures()).unwrap();
    assert_eq!(processor, qwen2_vl::Qwen2VlProcessor::default());
    let mut full = 0;
    for case in e["cases"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let Some(img) = image(name, "qwen2_vl_pixel_values") else {
            return;
        };
        let max = case["image_max_pixels"].as_u64().unwrap() as usize;
        let min = case["image_min_pixels"].as_u64().unwrap() as usize;
        let img = qwen2_vl::regularize(img, max, min);
        let what = format!("{name} ({max}, {min})");
        assert_eq!(
            [img.width as u64, img.height as u64],
            [
                case["regularized"][0].as_u64().unwrap(),
                case["regularized"][1].as_u64().unwrap()
            ],
            "{what}: regularized size"
        );
        let out = processor.preprocess(&img).unwrap();
        let grid: Vec<usize> = case["grid"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(out.grid.to_vec(), grid, "{what}: grid");
        assert_eq!(out.tokens(2) as u64, case["tokens"].as_u64().unwrap());
        let row = 3 * 2 * 14 * 14;
        assert_eq!(out.pixel_values.len(), grid.iter().product::<usize>() * row);
        for (i, patch) in out.pixel_values.chunks(row).enumerate() {
            let sum: f64 = patch.iter().map(|&x| f64::from(x)).sum();
            let sq: f64 = patch.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let (ws, wq) = (
                case["patch_sums"][i].as_f64().unwrap(),
                case["patch_sq_sums"][i].as_f64().unwrap(),
            );
            assert!(
                (sum - ws).abs() < 1e-3,
                "{what} patch {i}: sum {sum} vs {ws}"
            );
            assert!(
                (sq - wq).abs() < 1e-3 * wq.max(1.0),
                "{what} patch {i}: {sq} vs {wq}"
            );
        }
        if let Some(pv) = case.get("pixel_values") {
            full += 1;
            let want = floats(pv);
            let worst = out
                .pixel_values
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{what}: max abs error {worst}");
        }
    }
    assert_eq!(full, 2, "two cases carry every value");
}

/// LLaVA-1.5's path: LLaMA-Factory's base regularization and transformers' Pillow
/// `CLIPImageProcessor` (shortest side 336, center crop) on the mllm_demo photos and a small PNG,
/// compared per 14×14 patch (sum and sum of squares, within 1e-5 per value).
#[test]
fn llava_pixel_values_equal_the_clip_processor() {
    use trainer::vision::clip;
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("clip.json")).unwrap())
            .unwrap();
    let processor = clip::ClipProcessor::default();
    for case in e["cases"].as_array().unwrap() {
        let name = case["image"].as_str().unwrap();
        let Some(img) = image(name, "llava_pixel_values") else {
            return;
        };
        let max = case["image_max_pixels"].as_u64().unwrap() as usize;
        let min = case["image_min_pixels"].as_u64().unwrap() as usize;
        let img = clip::regularize(img, max, min);
        assert_eq!(
            [img.width as u64, img.height as u64],
            [
                case["regularized"][0].as_u64().unwrap(),
                case["regularized"][1].as_u64().unwrap()
            ],
            "{name}: regularized size"
        );
        let p = processor.preprocess(&img).unwrap();
        assert_eq!(p.grid, [1, 24, 24]);
        let row = 3 * 14 * 14;
        // 1e-5 per value: a sum moves by at most 588·1e-5, a sum of squares (|x| ≤ 2.2) by
        // 588·4.4e-5.
        for (key, f, tol) in [
            (
                "patch_sums",
                (|x: f64| x) as fn(f64) -> f64,
                row as f64 * 1e-5,
            ),
            ("patch_sq_sums", |x: f64| x * x, row as f64 * 4.4e-5),
        ] {
            let want = case[key].as_array().unwrap();
            for (i, chunk) in p.pixel_values.chunks(row).enumerate() {
                let ours: f64 = chunk.iter().map(|&v| f(f64::from(v))).sum();
                let theirs = want[i].as_f64().unwrap();
                assert!(
                    (ours - theirs).abs() <= tol,
                    "{name} ({max}/{min}) {key} patch {i}: {ours} vs {theirs}"
                );
            }
        }
    }
}
