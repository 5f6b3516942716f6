//! TRL's value head (`v_head.summary`, a `hidden → 1` linear layer) on the causal-LM body: the
//! reward of a reward model (`stage: rm`, scored at a sequence's last token) and PPO's critic
//! (a value per response token). Saved as `value_head.safetensors`, like LLaMA-Factory.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::{Batch, Model};

pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
pub const WEIGHT: &str = "v_head.summary.weight";
pub const BIAS: &str = "v_head.summary.bias";

pub struct ValueHead {
    pub weight: Var,
    pub bias: Var,
}

impl ValueHead {
    /// `nn.Linear`'s default init: uniform in ±1/sqrt(hidden), seeded.
    pub fn new(hidden: usize, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005E_ED0F_7A1E);
        let bound = 1.0 / (hidden as f64).sqrt();
        let w: Vec<f64> = (0..hidden).map(|_| rng.gen_range(-bound..bound)).collect();
        let b = vec![rng.gen_range(-bound..bound)];
        Ok(Self {
            weight: Var::from_tensor(&Tensor::from_vec(w, (1, hidden), device)?.to_dtype(dtype)?)?,
            bias: Var::from_tensor(&Tensor::from_vec(b, 1, device)?.to_dtype(dtype)?)?,
        })
    }

    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let file = dir.join(VALUE_HEAD_FILE);
        let t = candle_core::safetensors::load(&file, device).with_context(|| {
            format!(
                "cannot read the reward model's value head {}",
                file.display()
            )
        })?;
        let get = |k: &str| -> Result<Var> {
            let x = t
                .get(k)
                .ok_or_else(|| anyhow!("{}: `{k}` missing", file.display()))?;
            Ok(Var::from_tensor(&x.to_dtype(dtype)?)?)
        };
        Ok(Self {
            weight: get(WEIGHT)?,
            bias: get(BIAS)?,
        })
    }

    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok([
            (
                WEIGHT.to_string(),
                self.weight.as_tensor().detach().to_dtype(DType::F32)?,
            ),
            (
                BIAS.to_string(),
                self.bias.as_tensor().detach().to_dtype(DType::F32)?,
            ),
        ]
        .into_iter()
        .collect())
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::files::write_safetensors(&dir.join(VALUE_HEAD_FILE), &self.tensors()?)
    }

    /// The score of each row: the value head at its last real token.
    pub fn scores(&self, model: &Model, b: &Batch, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let hidden = model.hidden(b, rng)?;
        let lens = &b.lens;
        let idx: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(r, &n)| (r * b.seq + n.max(1) - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, lens.len(), &model.device)?;
        self.apply(&hidden.index_select(&idx, 0)?)
    }

    /// The head on hidden states `(n, hidden)` → `(n,)`.
    pub fn apply(&self, h: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor().to_dtype(h.dtype())?;
        let s = h.matmul(&w.t()?)?.squeeze(1)?;
        Ok(s.broadcast_add(&self.bias.as_tensor().to_dtype(s.dtype())?)?)
    }
}
