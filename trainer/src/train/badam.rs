//! BAdam (`use_badam`, layer mode): block coordinate descent over the decoder layers, as
//! `badam.BlockOptimizer` runs it under LLaMA-Factory. One block (`model.layers.N.`) trains at a
//! time — only its tensors are variables, so backward computes nothing else and Adam keeps
//! state for that block alone — and the next block takes over every `badam_switch_interval`
//! steps (the first block one step sooner, as BlockOptimizer counts), its Adam state fresh.
//! Embeddings, final norm and head never train (BlockOptimizer's defaults). Every tensor of the
//! block decays by [`WEIGHT_DECAY`], whatever `weight_decay` says, as BlockOptimizer does.

use anyhow::{bail, Result};
use protocol::args::BadamSwitchMode;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The weight decay of every BAdam update: BlockOptimizer builds its groups as
/// `{"weight_decay": …, **defaults}`, so the base optimizer's default (torch AdamW's 0.01, as
/// LLaMA-Factory passes none) overrides the run's `weight_decay`.
pub const WEIGHT_DECAY: f64 = 0.01;

/// The block schedule.
#[derive(Debug, Clone)]
pub struct Badam {
    /// The blocks' name prefixes, in model order.
    pub blocks: Vec<String>,
    mode: BadamSwitchMode,
    every: usize,
    current: usize,
    /// The block after the current one (BlockOptimizer advances its index on each switch).
    next: usize,
    /// Random mode: the rest of this round's order (popped from the back).
    order: Vec<usize>,
    rng: ChaCha8Rng,
    /// Optimizer steps taken.
    step: usize,
}

impl Badam {
    /// The schedule over the layers found in `names` (each `….layers.N.` prefix, in order).
    pub fn new(
        names: &[String],
        mode: BadamSwitchMode,
        every: usize,
        start: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        let mut blocks: Vec<String> = Vec::new();
        for n in names {
            if let Some(i) = n.find("layers.") {
                let rest = &n[i + "layers.".len()..];
                if let Some(dot) = rest.find('.') {
                    let prefix = n[..i + "layers.".len() + dot + 1].to_string();
                    if !blocks.contains(&prefix) {
                        blocks.push(prefix);
                    }
                }
            }
        }
        if blocks.is_empty() {
            bail!("BAdam found no decoder layers (`layers.N.`) to train");
        }
        if every == 0 {
            bail!("`badam_switch_interval` must be at least 1");
        }
        let mut s = Self {
            mode,
            every,
            current: 0,
            next: 0,
            order: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            step: 0,
            blocks,
        };
        let n = s.blocks.len();
        s.next = match (start, mode) {
            (Some(b), _) if b < n => b,
            (Some(b), _) => bail!("`badam_start_block: {b}` is past the model's {n} blocks"),
            (None, BadamSwitchMode::Descending) => n - 1,
            (None, BadamSwitchMode::Random) => s.pop_random(),
            (None, _) => 0,
        };
        s.switch();
        Ok(s)
    }

    fn pop_random(&mut self) -> usize {
        if self.order.is_empty() {
            self.order = (0..self.blocks.len()).collect();
            self.order.shuffle(&mut self.rng);
        }
        self.order.pop().unwrap_or(0)
    }

    /// Makes the pending block current and picks the one after it.
    fn switch(&mut self) {
        let n = self.blocks.len();
        self.current = self.next;
        self.next = match self.mode {
            BadamSwitchMode::Ascending => (self.current + 1) % n,
            BadamSwitchMode::Descending => (self.current + n - 1) % n,
            BadamSwitchMode::Random => self.pop_random(),
            BadamSwitchMode::Fixed => self.current,
        };
    }

    /// The prefix of the block training now.
    pub fn active(&self) -> &str {
        &self.blocks[self.current]
    }

    /// Whether the tensor `name` trains now.
    pub fn is_active(&self, name: &str) -> bool {
        name.contains(self.active())
    }

    /// Counts an optimizer step; true when the next block takes over (its optimizer state
    /// starts fresh).
    pub fn after_step(&mut self) -> bool {
        self.step += 1;
        if (self.step + 1).is_multiple_of(self.every) {
            self.switch();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{AdamW, ParamGroup};
    use candle_core::{Device, Tensor, Var};
    use protocol::options::Choice;

    /// `badam.BlockOptimizer` over torch's AdamW as LLaMA-Factory builds it
    /// (`scripts/optim_reference.py`): which block trains at each step, when the state starts
    /// fresh, and every value after seven steps, ascending and descending.
    #[test]
    fn blocks_and_updates_match_badam() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/optim/badam.json");
        let e: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let names: Vec<String> = e["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let tensor = |n: &str, v: &serde_json::Value| -> Tensor {
            let shape: Vec<usize> = e["shapes"][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            Tensor::from_vec(floats(v), shape, &Device::Cpu).unwrap()
        };
        for case in e["cases"].as_array().unwrap() {
            let mode = BadamSwitchMode::parse(case["switch_mode"].as_str().unwrap()).unwrap();
            let mut b = Badam::new(&names, mode, 3, None, 0).unwrap();
            assert_eq!(b.blocks.len(), 3);
            let vars: Vec<Var> = names
                .iter()
                .map(|n| Var::from_tensor(&tensor(n, &e["init"][n.as_str()])).unwrap())
                .collect();
            let build = |b: &Badam| -> (AdamW, Vec<usize>) {
                let idx: Vec<usize> = (0..names.len())
                    .filter(|&i| b.is_active(&names[i]))
                    .collect();
                let groups = idx
                    .iter()
                    .map(|&i| ParamGroup {
                        name: names[i].clone(),
                        var: vars[i].clone(),
                        weight_decay: WEIGHT_DECAY,
                        lr_scale: 1.0,
                        galore: None,
                    })
                    .collect();
                (AdamW::new(groups, 0.9, 0.999, 1e-8).unwrap(), idx)
            };
            let (mut opt, mut idx) = build(&b);
            for (step, g) in e["grads"].as_array().unwrap().iter().enumerate() {
                let grads: Vec<Option<Tensor>> = idx
                    .iter()
                    .map(|&i| Some(tensor(&names[i], &g[names[i].as_str()])))
                    .collect();
                opt.update(&grads, 0.01).unwrap();
                if b.after_step() {
                    (opt, idx) = build(&b);
                }
                for (i, n) in names.iter().enumerate() {
                    let ours: Vec<f32> = vars[i]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let theirs = floats(&case["steps"][step][n.as_str()]);
                    let worst = ours
                        .iter()
                        .zip(&theirs)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst < 1e-6,
                        "{mode:?} step {}: `{n}` off by {worst}",
                        step + 1
                    );
                }
            }
        }
    }
}
