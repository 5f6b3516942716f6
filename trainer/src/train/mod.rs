//! `llamafactory train`: SFT and pre-training with LoRA, freeze or full fine-tuning, from
//! LLaMA-Factory's arguments, writing LLaMA-Factory's output files.

pub mod checkpoint;
pub mod optim;
mod ppo;
pub mod report;
mod reward_predict;
pub mod schedule;
mod session;

pub use session::{preference_step, run_training, Outcome, TrainOptions};

use anyhow::{bail, Result};
use protocol::{TrainArgs, WorkerEvent};
use report::Reporter;

/// What `llamafactory train` does with a config: train, then predict with the result when
/// `do_predict`; or only predict, or only evaluate. Reports `finished` once, at the end.
pub fn run_job(args: &TrainArgs, opts: &TrainOptions, rep: &mut dyn Reporter) -> Result<Outcome> {
    let mut metrics = serde_json::Map::new();
    let mut predict_args = args.clone();
    if args.do_train {
        match run_training(args, opts, rep)? {
            Outcome::Finished(m) => metrics = m,
            other => return Ok(other),
        }
        let out = args.output_dir.clone();
        if args.finetuning_type == "lora" {
            predict_args.adapter_name_or_path = out;
        } else {
            predict_args.model_name_or_path = out;
        }
    } else if !args.do_predict && !args.do_eval {
        bail!("nothing to do: set `do_train`, `do_eval` or `do_predict` to true");
    }
    if !args.do_train && args.do_eval {
        crate::config::validate(args)?;
        metrics.extend(crate::predict::run_eval(args, &opts.device)?);
    }
    if args.do_predict {
        crate::config::validate(args)?;
        let predicted = if args.stage == "rm" {
            reward_predict::run(&predict_args, &opts.device, rep)?
        } else {
            crate::predict::run_predict(&predict_args, &opts.device, rep)?
        };
        metrics.extend(predicted);
    }
    let step = metrics
        .get("global_step")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    rep.event(&WorkerEvent::Finished {
        step,
        metrics: metrics.clone(),
    });
    Ok(Outcome::Finished(metrics))
}
