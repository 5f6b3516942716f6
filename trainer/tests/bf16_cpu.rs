//! The CPU's `bf16: true` on AMX tiles (frozen linear and attention products in bf16, summed in
//! f32): 50 LoRA steps on the demo data follow the f32 loss curve within bf16's tolerance, and
//! differ from it (the rounding is real). Its own test binary, because the switch is
//! process-wide. Skipped, saying so, where the CPU or OS offers no AMX-BF16 tiles.

mod common;

use std::path::PathBuf;

use protocol::TrainArgs;

fn args(base: &std::path::Path, out: PathBuf) -> TrainArgs {
    TrainArgs {
        bf16: true,
        ..common::demo_lora_args(base, out)
    }
}

/// Logged losses and the unrounded mean.
fn curve(base: &std::path::Path, out: PathBuf, bf16: bool) -> (Vec<f64>, f64) {
    assert_eq!(trainer::ops::use_bf16_products(bf16), bf16);
    common::loss_curve(&args(base, out))
}

#[test]
fn fifty_bf16_steps_follow_the_f32_curve() {
    if !trainer::ops::amx_bf16::available() {
        eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
        return;
    }
    // `bf16: true` on this CPU asks for the tiles.
    let p = trainer::device::train_precision(
        &args(std::path::Path::new("m"), "o".into()),
        &candle_core::Device::Cpu,
    );
    assert!(
        p.bf16_products && p.dtype == candle_core::DType::F32,
        "{p:?}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    trainer::demo::build_demo_model(&base, &data, &Default::default()).unwrap();
    let (bf16, bf16_mean) = curve(&base, tmp.path().join("bf16"), true);
    let (f32, f32_mean) = curve(&base, tmp.path().join("f32"), false);
    assert_eq!(bf16.len(), 50);
    assert_eq!(f32.len(), 50);
    let (worst, mean_diff) = common::curve_gaps(&bf16, &f32, bf16_mean, f32_mean);
    eprintln!("bf16 vs f32: largest relative difference of logged losses {worst:.2e}; of the mean loss {mean_diff:.2e}");
    assert!(worst <= 1e-2, "bf16 {bf16:?}\nf32 {f32:?}");
    assert!(mean_diff <= 2e-3, "{bf16_mean} vs {f32_mean}");
    assert!(
        mean_diff > 0.0,
        "bf16 products should round: the curves are identical"
    );
    assert!(bf16[49] < bf16[0], "the run learns: {bf16:?}");
}
