//! The fused kernels change speed, not results: 50 LoRA steps on the demo data give the same
//! loss curve (to 1e-3 relative) with them as with the composed candle ops. Its own test binary,
//! because the switch between the two paths is process-wide.

mod common;

use std::path::PathBuf;

/// Logged losses (rounded to 4 decimals, as LLaMA-Factory logs them) and the unrounded mean.
fn curve(base: &std::path::Path, out: PathBuf, composed: bool) -> (Vec<f64>, f64) {
    trainer::ops::use_composed_ops(composed);
    common::loss_curve(&common::demo_lora_args(base, out))
}

#[test]
fn fifty_steps_match_the_composed_path() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    trainer::demo::build_demo_model(&base, &data, &Default::default()).unwrap();
    let (fused, fused_mean) = curve(&base, tmp.path().join("fused"), false);
    let (composed, composed_mean) = curve(&base, tmp.path().join("composed"), true);
    trainer::ops::use_composed_ops(false);
    assert_eq!(fused.len(), 50);
    assert_eq!(fused.len(), composed.len());
    for (i, (a, b)) in fused.iter().zip(&composed).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs(),
            "step {}: fused {a} vs composed {b}",
            i + 1
        );
    }
    let (worst, mean_diff) = common::curve_gaps(&fused, &composed, fused_mean, composed_mean);
    eprintln!("largest relative difference of logged losses: {worst:.2e}; of the unrounded mean loss: {mean_diff:.2e}");
    assert!(mean_diff <= 1e-3, "{fused_mean} vs {composed_mean}");
    assert!(fused[49] < fused[0], "the run learns: {fused:?}");
}
