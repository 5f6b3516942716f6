//! `llamafactory train`'s job: train, then predict or evaluate with the result, as the config
//! asks, and report `finished` once at the end.

use anyhow::{bail, Result};
use protocol::args::{FinetuningType, Stage};
use protocol::{TrainArgs, WorkerEvent};
use serde_json::Map;

use super::report::Reporter;
use super::{reward_predict, run_training, Outcome, TrainOptions};

/// What `llamafactory train` does with a config: train, then predict with the result when
/// `do_predict`; or only predict, or only evaluate. Reports `finished` once, at the end.
pub fn run_job(args: &TrainArgs, opts: &TrainOptions, rep: &mut dyn Reporter) -> Result<Outcome> {
    let mut metrics = Map::new();
    let mut predict_args = args.clone();
    if args.do_train {
        match run_training(args, opts, rep)? {
            Outcome::Finished(m) => metrics = m,
            other => return Ok(other),
        }
        // In a data-parallel run, rank 0 alone predicts with the result and reports.
        if !opts.world.is_main() {
            return Ok(Outcome::Finished(metrics));
        }
        let out = args.output_dir.clone();
        if args.finetuning_type == FinetuningType::Lora {
            predict_args.adapter_name_or_path = out;
        } else {
            predict_args.model_name_or_path = out;
        }
    } else if !args.do_predict && !args.do_eval {
        bail!("nothing to do: set `do_train`, `do_eval` or `do_predict` to true");
    } else if opts.world.size() > 1 {
        bail!(
            "prediction and evaluation without training run in one process, not {} ranks: drop `--nproc-per-node` (or the launcher)",
            opts.world.size()
        );
    }
    if !args.do_train && args.do_eval {
        crate::config::validate(args)?;
        metrics.extend(crate::predict::run_eval(args, &opts.device)?);
    }
    if args.do_predict {
        crate::config::validate(args)?;
        let predicted = if args.stage == Stage::Rm {
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
