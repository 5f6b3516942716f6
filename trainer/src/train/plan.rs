//! The step plan of a run: how many optimizer steps, which examples each one takes (a seeded
//! shuffle per epoch, as the Hugging Face Trainer's sampler), the learning rate of each step,
//! and the one rule each for when to evaluate and when to save, as transformers'
//! `DefaultFlowCallback` decides them.

use protocol::args::{IntervalStrategy, Stage};
use protocol::TrainArgs;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::schedule::LrSchedule;

pub(crate) struct Plan {
    /// Examples per micro-batch.
    batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation; PPO's buffer too).
    micro_per_step: usize,
    /// Micro-batches per epoch.
    micro_per_epoch: usize,
    examples: usize,
    pub(crate) steps_per_epoch: usize,
    pub(crate) total_steps: usize,
    schedule: LrSchedule,
    peak_lr: f64,
    save: IntervalStrategy,
    save_steps: usize,
    eval: IntervalStrategy,
    eval_steps: usize,
    seed: u64,
    shuffle: bool,
}

impl Plan {
    /// The plan for `examples` training examples over `ranks` data-parallel ranks: a
    /// micro-batch is `per_device_train_batch_size` examples per rank. A PPO step samples
    /// `ppo_buffer_size` batches of prompts.
    pub(crate) fn new(args: &TrainArgs, examples: usize, ranks: usize) -> Self {
        let batch_size = args.per_device_train_batch_size.max(1) * ranks.max(1);
        let buffer = if args.stage == Stage::Ppo {
            args.ppo_buffer_size.max(1)
        } else {
            1
        };
        let micro_per_step = args.gradient_accumulation_steps.max(1) * buffer;
        let micro_per_epoch = examples.div_ceil(batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(micro_per_step).max(1);
        let total_steps = if args.max_steps > 0 {
            args.max_steps as usize
        } else {
            (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
        };
        let warmup = if args.warmup_steps > 0 {
            args.warmup_steps
        } else {
            (args.warmup_ratio * total_steps as f64).ceil() as usize
        };
        Self {
            batch_size,
            micro_per_step,
            micro_per_epoch,
            examples,
            steps_per_epoch,
            total_steps,
            schedule: LrSchedule::new(
                args.lr_scheduler_type,
                warmup,
                total_steps,
                args.learning_rate,
            ),
            peak_lr: args.learning_rate,
            save: args.save_strategy,
            save_steps: args.save_steps.max(1),
            eval: args.eval_strategy,
            eval_steps: args.eval_steps.unwrap_or(args.logging_steps).max(1),
            seed: args.seed,
            shuffle: !args.disable_shuffling,
        }
    }

    /// The examples the run trains on, as the Hugging Face Trainer counts them for
    /// `train_samples_per_second`: `max_steps` × the examples of an optimizer step when
    /// `max_steps` is set, else the examples × `num_train_epochs`.
    pub(crate) fn samples(&self, args: &TrainArgs) -> f64 {
        if args.max_steps > 0 {
            (args.max_steps as usize * self.batch_size * self.micro_per_step) as f64
        } else {
            self.examples as f64 * args.num_train_epochs
        }
    }

    /// The learning rate after `done` optimizer steps.
    pub(crate) fn lr(&self, done: usize) -> f64 {
        self.peak_lr * self.schedule.factor(done)
    }

    /// Epochs completed after `step` steps (fractional).
    pub(crate) fn epoch_at(&self, step: usize) -> f64 {
        step as f64 / self.steps_per_epoch as f64
    }

    /// Whether step `step` (1-based) ends an epoch, or ends the run (where the Trainer also
    /// closes the epoch it is in).
    fn epoch_end(&self, step: usize) -> bool {
        step.is_multiple_of(self.steps_per_epoch) || step == self.total_steps
    }

    /// Evaluate after `step`: every `eval_steps` (`steps`), or at each epoch's end (`epoch`).
    pub(crate) fn should_eval(&self, step: usize) -> bool {
        match self.eval {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => step.is_multiple_of(self.eval_steps),
            IntervalStrategy::Epoch => self.epoch_end(step),
        }
    }

    /// Save a checkpoint after `step`: every `save_steps` (`steps`) or at each epoch's end
    /// (`epoch`), and in both cases after the last step.
    pub(crate) fn should_save(&self, step: usize) -> bool {
        match self.save {
            IntervalStrategy::No => false,
            IntervalStrategy::Steps => {
                step.is_multiple_of(self.save_steps) || step == self.total_steps
            }
            IntervalStrategy::Epoch => self.epoch_end(step),
        }
    }

    /// The example indices of each micro-batch of `step` (1-based).
    pub(crate) fn micro_batches(&self, order: &mut Order, step: usize) -> Vec<Vec<usize>> {
        let epoch = (step - 1) / self.steps_per_epoch;
        let in_epoch = (step - 1) % self.steps_per_epoch;
        let perm = order.epoch(epoch, self);
        let first = in_epoch * self.micro_per_step;
        let last = ((in_epoch + 1) * self.micro_per_step).min(self.micro_per_epoch);
        (first..last)
            .map(|m| {
                perm[m * self.batch_size..((m + 1) * self.batch_size).min(perm.len())].to_vec()
            })
            .collect()
    }
}

/// The shuffled order of the examples in the current epoch.
#[derive(Default)]
pub(crate) struct Order {
    epoch: Option<usize>,
    perm: Vec<usize>,
}

impl Order {
    fn epoch(&mut self, epoch: usize, plan: &Plan) -> &[usize] {
        if self.epoch != Some(epoch) {
            self.perm = (0..plan.examples).collect();
            if plan.shuffle {
                self.perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    plan.seed.wrapping_add(epoch as u64),
                ));
            }
            self.epoch = Some(epoch);
        }
        &self.perm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(save: IntervalStrategy, eval: IntervalStrategy, epochs: f64, max_steps: i64) -> Plan {
        let args = TrainArgs {
            per_device_train_batch_size: 2,
            num_train_epochs: epochs,
            max_steps,
            save_strategy: save,
            save_steps: 4,
            eval_strategy: eval,
            eval_steps: Some(4),
            ..TrainArgs::default()
        };
        Plan::new(&args, 6, 1) // 3 steps per epoch
    }

    #[test]
    fn samples_count_as_the_hugging_face_trainer_counts_them() {
        // transformers' `num_train_samples`: max_steps × total batch when max_steps is set.
        let p = plan(IntervalStrategy::No, IntervalStrategy::No, 3.0, 5);
        let args = TrainArgs {
            per_device_train_batch_size: 2,
            num_train_epochs: 3.0,
            max_steps: 5,
            ..TrainArgs::default()
        };
        assert_eq!(p.samples(&args), 10.0);
        let p = plan(IntervalStrategy::No, IntervalStrategy::No, 2.5, -1);
        let args = TrainArgs {
            num_train_epochs: 2.5,
            max_steps: -1,
            ..args
        };
        assert_eq!(p.samples(&args), 15.0);
    }

    #[test]
    fn epoch_strategy_saves_and_evaluates_at_each_epoch_end_and_the_last_step() {
        let p = plan(IntervalStrategy::Epoch, IntervalStrategy::Epoch, 2.0, -1);
        assert_eq!(p.total_steps, 6);
        let saved: Vec<usize> = (1..=6).filter(|&s| p.should_save(s)).collect();
        assert_eq!(saved, [3, 6], "6 % save_steps != 0 must not matter");
        let evaluated: Vec<usize> = (1..=6).filter(|&s| p.should_eval(s)).collect();
        assert_eq!(evaluated, [3, 6]);
        // max_steps stopping mid-epoch still closes that epoch.
        let p = plan(IntervalStrategy::Epoch, IntervalStrategy::Epoch, 3.0, 5);
        assert_eq!(
            (1..=5).filter(|&s| p.should_save(s)).collect::<Vec<_>>(),
            [3, 5]
        );
    }

    #[test]
    fn steps_strategy_saves_every_n_and_at_the_end_but_evaluates_every_n_only() {
        let p = plan(IntervalStrategy::Steps, IntervalStrategy::Steps, 2.0, -1);
        assert_eq!(
            (1..=6).filter(|&s| p.should_save(s)).collect::<Vec<_>>(),
            [4, 6]
        );
        assert_eq!(
            (1..=6).filter(|&s| p.should_eval(s)).collect::<Vec<_>>(),
            [4]
        );
        let p = plan(IntervalStrategy::No, IntervalStrategy::No, 2.0, -1);
        assert!((1..=6).all(|s| !p.should_save(s) && !p.should_eval(s)));
    }

    #[test]
    fn micro_batches_cover_each_epoch_once_in_a_seeded_order() {
        let p = plan(IntervalStrategy::No, IntervalStrategy::No, 2.0, -1);
        let mut order = Order::default();
        let epoch = |order: &mut Order, first: usize| -> Vec<usize> {
            let mut seen: Vec<usize> = (first..first + 3)
                .flat_map(|s| p.micro_batches(order, s).concat())
                .collect();
            seen.sort();
            seen
        };
        assert_eq!(epoch(&mut order, 1), [0, 1, 2, 3, 4, 5]);
        assert_eq!(epoch(&mut order, 4), [0, 1, 2, 3, 4, 5]);
        let first: Vec<Vec<usize>> = p.micro_batches(&mut Order::default(), 1);
        assert_eq!(first, p.micro_batches(&mut order, 1));
    }
}
