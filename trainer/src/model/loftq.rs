//! LoftQ (`llamafactory loftq-init`, LLaMA-Factory's `scripts/loftq_init.py`): each target
//! weight `W` split into a quantized part `Q` and a LoRA adapter `B·A` by alternating
//! quantization of the residual and a rank-`r` SVD of what quantization missed, as PEFT's
//! `loftq_utils.loftq_init` does with its own normal-float quantizer (`NFQuantizer`: blocks of 64,
//! a table from the normal distribution's quantiles). The base written is `Q` (dequantized, to be
//! loaded with `quantization_bit`), the adapter `B·A` (not scaled, as PEFT writes it).

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;

/// PEFT's `NFQuantizer.create_normal_map(offset=0.9677083, symmetric=False)`: quantiles of the
/// normal distribution at points spaced as `torch.linspace` spaces them in f32, normalized to
/// the largest.
pub fn normal_map(bits: u32) -> Vec<f32> {
    let variations = 1usize << bits;
    let ppf = |p: f32| normal_ppf(f64::from(p));
    let mut v: Vec<f32> = linspace_f32(0.967_708_3, 0.5, variations / 2 + 1)
        .into_iter()
        .take(variations / 2)
        .map(|p| ppf(p) as f32)
        .collect();
    v.push(0.0);
    v.extend(
        linspace_f32(0.967_708_3, 0.5, variations / 2)
            .into_iter()
            .take(variations / 2 - 1)
            .map(|p| -ppf(p) as f32),
    );
    v.sort_by(|a, b| a.total_cmp(b));
    let max = v.iter().copied().fold(f32::MIN, f32::max);
    v.iter().map(|x| x / max).collect()
}

/// `torch.linspace(start, end, steps)` in f32 (the first half counted from `start`, the rest
/// back from `end`).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// The standard normal's quantile function: Acklam's approximation refined by one Halley step
/// on `erfc` (about 1e-15 relative).
pub fn normal_ppf(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let low = 0.024_25;
    let x = if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step.
    let e = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// `NFQuantizer.quantize_block` then `dequantize_block` (method `normal`, blocks of 64) on the
/// row-major values of a weight: each block scaled by its largest magnitude, each value
/// replaced by the nearest table entry (the first on ties).
pub fn nf_roundtrip(values: &[f32], table: &[f32]) -> Result<Vec<f32>> {
    const BLOCK: usize = 64;
    if !values.len().is_multiple_of(BLOCK) {
        bail!(
            "{} values do not divide into blocks of {BLOCK} (LoftQ's quantizer needs that)",
            values.len()
        );
    }
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        for &v in block {
            let x = v / max;
            let mut best = 0;
            for (i, t) in table.iter().enumerate() {
                if (x - t).abs() < (x - table[best]).abs() {
                    best = i;
                }
            }
            out.push(table[best] * max);
        }
    }
    Ok(out)
}

/// LoftQ's `(Q, A, B)` for the weight `w (out, in)`: `num_iter` rounds of quantizing the
/// residual and decomposing what it missed at rank `r`. All in f32 like PEFT's, the SVD in f64.
pub fn loftq(w: &Tensor, bits: u32, r: usize, num_iter: usize) -> Result<(Tensor, Tensor, Tensor)> {
    if ![2, 4, 8].contains(&bits) {
        bail!("LoftQ supports 2, 4 and 8 bits (`loftq_bits: {bits}`)");
    }
    if num_iter == 0 {
        bail!("`loftq_iter` must be at least 1");
    }
    let (rows, cols) = w.dims2()?;
    let table = normal_map(bits);
    let weight: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut res = weight.clone();
    let (mut q, mut a, mut b) = (Vec::new(), DMatrix::zeros(0, 0), DMatrix::zeros(0, 0));
    for _ in 0..num_iter {
        q = nf_roundtrip(&res, &table)?;
        let missed: Vec<f64> = weight
            .iter()
            .zip(&q)
            .map(|(w, q)| f64::from(w - q))
            .collect();
        let svd = DMatrix::from_row_slice(rows, cols, &missed).svd(true, true);
        let (u, vt) = (svd.u.expect("u"), svd.v_t.expect("vᵀ"));
        let k = r.min(rows).min(cols);
        let root: Vec<f64> = svd
            .singular_values
            .iter()
            .take(k)
            .map(|s| s.sqrt())
            .collect();
        b = DMatrix::from_fn(rows, k, |i, j| u[(i, j)] * root[j]);
        a = DMatrix::from_fn(k, cols, |i, j| root[i] * vt[(i, j)]);
        let lr = &b * &a;
        res = weight
            .iter()
            .enumerate()
            .map(|(i, w)| w - lr[(i / cols, i % cols)] as f32)
            .collect();
    }
    let dev = &Device::Cpu;
    let to = |m: &DMatrix<f64>| super::linalg::to_tensor(m, DType::F32, dev);
    Ok((Tensor::from_vec(q, (rows, cols), dev)?, to(&a)?, to(&b)?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_quantile_function_is_accurate() {
        for (p, z) in [
            (0.975, 1.959_963_984_540_054),
            (0.5, 0.0),
            (0.01, -2.326_347_874_040_841),
        ] {
            assert!((super::normal_ppf(p) - z).abs() < 1e-12, "{p}");
        }
    }
}

/// What `llamafactory loftq-init` asks for (LLaMA-Factory's `scripts/loftq_init.py` arguments).
#[derive(Debug, Clone)]
pub struct LoftqArgs {
    pub bits: u32,
    pub iters: usize,
    pub rank: usize,
    /// `None`: twice the rank.
    pub alpha: Option<f64>,
    pub dropout: f64,
    /// Module kinds (`q_proj,v_proj`) or `all`.
    pub targets: Vec<String>,
}

/// Writes the LoftQ base (the dequantized `Q` of every target, other weights as they were, in
/// the checkpoint's dtype) to `out` with the tokenizer files, and the adapter to
/// `out/loftq_init`; returns the files written.
pub fn loftq_init_model(
    src: &std::path::Path,
    out: &std::path::Path,
    a: &LoftqArgs,
) -> Result<Vec<std::path::PathBuf>> {
    use std::collections::BTreeMap;

    use super::adapter::{LoraSpec, PEFT_PREFIX};
    use super::layers::{LinearWeight, Param};
    use super::Model;

    let mut model = Model::load(src, DType::F32, &Device::Cpu)?;
    let targets = if a.targets.iter().any(|t| t == "all") {
        model.linear_kinds()
    } else {
        a.targets.clone()
    };
    let spec = LoraSpec {
        rank: a.rank,
        alpha: a.alpha.unwrap_or(2.0 * a.rank as f64),
        dropout: a.dropout,
        targets: targets.clone(),
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        pissa: None,
    };
    let layout = model.cfg.layout;
    let mut adapter = BTreeMap::new();
    for module in model.target_modules(&targets)? {
        let lin = model
            .linear_mut(&module)
            .ok_or_else(|| anyhow::anyhow!("no linear module `{module}`"))?;
        let w = lin.weight.to_dense(DType::F32)?;
        let (q, lora_a, lora_b) =
            loftq(&w, a.bits, a.rank, a.iters).map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
        lin.weight = LinearWeight::Dense(Param::frozen(q));
        let path = layout.module_path(&module);
        adapter.insert(format!("{PEFT_PREFIX}{path}.lora_A.weight"), lora_a);
        adapter.insert(format!("{PEFT_PREFIX}{path}.lora_B.weight"), lora_b);
    }
    let dtype = match model.cfg.torch_dtype.as_str() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => DType::F32,
    };
    std::fs::create_dir_all(out)?;
    let tensors: BTreeMap<String, Tensor> = model
        .checkpoint_params()
        .into_iter()
        .map(|(k, p)| Ok((k, p.t().to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let mut files = crate::files::write_sharded(out, &tensors, 5_000_000_000)?;
    for f in ["config.json"].iter().chain(super::expand::COPIED) {
        let from = src.join(f);
        if from.exists() {
            std::fs::copy(&from, out.join(f))?;
            files.push(out.join(f));
        }
    }
    let dir = out.join("loftq_init");
    std::fs::create_dir_all(&dir)?;
    crate::files::write_safetensors(&dir.join("adapter_model.safetensors"), &adapter)?;
    let base = std::fs::canonicalize(out)?.display().to_string();
    crate::files::write_json(
        &dir.join("adapter_config.json"),
        &spec.peft_config(&base, &model),
    )?;
    files.push(dir.join("adapter_model.safetensors"));
    files.push(dir.join("adapter_config.json"));
    Ok(files)
}
