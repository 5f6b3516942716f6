use candle_core::{Device, Tensor};
use std::time::Instant;
fn bench(f: &dyn Fn() -> candle_core::Result<Tensor>, flops: f64) -> candle_core::Result<f64> {
    for _ in 0..3 {
        let _ = f()?;
    }
    let iters = (1e10 / flops).clamp(3.0, 2000.0) as usize;
    let t = Instant::now();
    for _ in 0..iters {
        let _ = f()?;
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    Ok(flops / s / 1e9)
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for m in [256usize, 1024] {
        for n in [256usize, 576, 896] {
            let mut line = format!("m {m} n {n}:");
            for k in [576usize, 688, 1024, 1536, 2048, 4864] {
                let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
                let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
                let wt = w.t()?.contiguous()?;
                let fl = 2.0 * (m * k * n) as f64;
                let t = bench(&|| a.matmul(&w.t()?), fl)?;
                let c = bench(&|| a.matmul(&wt), fl)?;
                line += &format!(" k{k}: {t:.0}/{c:.0}");
            }
            println!("{line}");
        }
    }
    Ok(())
}
