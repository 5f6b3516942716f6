//! Data-parallel training on CPU ranks over MPI (built with `--features mpi`, Open MPI
//! installed): `mpirun -np 2` and `llamafactory train --nproc-per-node 2` against one process
//! taking the doubled batch; a rank killed mid-run; an abort reaching every rank.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_llamafactory"));
    c
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

/// The largest per-tensor relative difference ‖a − b‖ / ‖a‖ between two adapters.
fn adapter_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, x)| {
            let y = &b[k];
            let d: f64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
                .sum();
            let n: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
            (d / n.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(1e-12)
}

fn losses(dir: &Path) -> Vec<(u64, f64, Option<f64>)> {
    jsonl(&dir.join("trainer_log.jsonl"))
        .iter()
        .filter_map(|l| {
            Some((
                l["current_steps"].as_u64()?,
                l["loss"].as_f64().or(l["eval_loss"].as_f64())?,
                l["eval_loss"].as_f64(),
            ))
        })
        .collect()
}

/// Two ranks with `per_device_train_batch_size: 2` against one process with 4: the same
/// examples per step (a short last batch leaves rank 1 nothing), the same loss curve and
/// evaluations, the same adapter — by `mpirun` and by our own launcher.
fn assert_two_ranks_equal_the_doubled_batch(body: &str, tolerance: f64) {
    let dir = workdir();
    let cfg = write_config(dir.path(), body);
    let cfg = cfg.to_str().unwrap();
    let one = run(
        &[
            "train",
            cfg,
            "output_dir=one",
            "per_device_train_batch_size=4",
        ],
        dir.path(),
    );
    assert!(one.status.success(), "{}", stderr(&one));
    let by_mpirun = mpirun()
        .args([
            "train",
            cfg,
            "output_dir=mpi",
            "per_device_train_batch_size=2",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(by_mpirun.status.success(), "{}", stderr(&by_mpirun));
    let ours = run(
        &[
            "train",
            cfg,
            "output_dir=ours",
            "per_device_train_batch_size=2",
            "--nproc-per-node",
            "2",
            "--events",
            "json",
        ],
        dir.path(),
    );
    assert!(ours.status.success(), "{}", stderr(&ours));
    let events = stdout(&ours);
    assert!(events.contains("2 ranks over MPI"), "{events}");
    // Rank 0 alone reports: one `started`, one `finished`.
    assert_eq!(
        events.matches("\"event\":\"started\"").count(),
        1,
        "{events}"
    );
    assert_eq!(
        events.matches("\"event\":\"finished\"").count(),
        1,
        "{events}"
    );

    let reference = losses(&dir.path().join("one"));
    assert!(reference.len() >= 4, "{reference:?}");
    for run in ["mpi", "ours"] {
        let out = dir.path().join(run);
        let got = losses(&out);
        // Rank 0 alone writes the log: one line per logged step, as the single process.
        assert_eq!(
            got.len(),
            reference.len(),
            "{run}: {got:?} vs {reference:?}"
        );
        for ((s1, l1, e1), (s2, l2, e2)) in reference.iter().zip(&got) {
            assert_eq!(s1, s2);
            // The log keeps 4 decimals, as transformers': equal up to one rounding unit.
            assert!(
                (l1 - l2).abs() <= 1.01e-4,
                "{run} step {s1}: loss {l1} vs {l2}"
            );
            assert_eq!(e1.is_some(), e2.is_some());
        }
        let (r1, r2) = (
            read_json(&dir.path().join("one/all_results.json")),
            read_json(&out.join("all_results.json")),
        );
        for key in ["train_loss", "eval_loss"] {
            let (a, b) = (r1[key].as_f64().unwrap(), r2[key].as_f64().unwrap());
            assert!(rel(a, b) <= 1e-6, "{run} {key}: {a} vs {b}");
        }
        assert_eq!(
            r1["num_input_tokens_seen"], r2["num_input_tokens_seen"],
            "{run}"
        );
        let d = adapter_difference(
            &dir.path().join("one/adapter_model.safetensors"),
            &out.join("adapter_model.safetensors"),
        );
        assert!(d <= tolerance, "{run}: adapters differ by {d:e} (relative)");
    }
}

#[test]
fn sft_on_two_mpi_ranks_equals_one_process_with_the_doubled_batch() {
    // 26 training examples (32 less a validation fifth... rounded): global micro-batches of 4,
    // the last one short; two per step (gradient accumulation); evaluation every 2 steps.
    assert_two_ranks_equal_the_doubled_batch(
        "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 64\nmax_samples: 33\n\
         val_size: 0.2\neval_strategy: steps\neval_steps: 2\nper_device_eval_batch_size: 2\n\
         gradient_accumulation_steps: 2\nnum_train_epochs: 2\nlogging_steps: 1\nsave_strategy: 'no'\n\
         learning_rate: 1.0e-3\nwarmup_ratio: 0.1\nlora_rank: 4\nreport_to: none\n",
        1e-6,
    );
}

#[test]
fn dpo_on_two_mpi_ranks_equals_one_process_with_the_doubled_batch() {
    // DPO's loss is a mean over pairs: each rank's mean weighs by its share of the batch.
    assert_two_ranks_equal_the_doubled_batch(
        "stage: dpo\ndo_train: true\ndataset: demo_dpo\ntemplate: qwen\ncutoff_len: 64\nmax_samples: 14\n\
         val_size: 0.2\neval_strategy: steps\neval_steps: 2\nper_device_eval_batch_size: 2\n\
         num_train_epochs: 2\nlogging_steps: 1\nsave_strategy: 'no'\nlearning_rate: 1.0e-3\n\
         lora_rank: 4\nreport_to: none\n",
        // f32 sums in another order, through the reference model's log-ratios too: 6e-6 seen;
        // a wrong weighing of the short batch's 2 + 1 pairs moves it by 1e-2.
        2e-5,
    );
}

/// Starts a long two-rank run into `out_name` by our launcher, with collectives waiting at most
/// `ddp_timeout` seconds, and waits until `ready` holds.
fn start_long_run(
    dir: &Path,
    out_name: &str,
    ddp_timeout: u64,
    ready: impl Fn(&Path) -> bool,
) -> std::process::Child {
    let cfg = write_config(
        dir,
        "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 64\nmax_samples: 64\n\
         per_device_train_batch_size: 2\nnum_train_epochs: 1000\nlogging_steps: 1\nsave_steps: 2\n\
         learning_rate: 1.0e-3\nlora_rank: 4\nreport_to: none\n",
    );
    let child = bin()
        .args([
            "train",
            cfg.to_str().unwrap(),
            &format!("output_dir={out_name}"),
            &format!("ddp_timeout={ddp_timeout}"),
            "--nproc-per-node",
            "2",
            "--events",
            "json",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.join(out_name);
    let t0 = Instant::now();
    while !ready(&out) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run did not get going"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

fn finish(
    child: std::process::Child,
    within: Duration,
) -> (std::process::ExitStatus, String, String) {
    let t0 = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if t0.elapsed() > within {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the job did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = waiter.join().unwrap();
    (o.status, stdout(&o), stderr(&o))
}

#[test]
fn a_killed_rank_ends_the_job_with_a_clear_error_and_keeps_its_checkpoint() {
    let dir = workdir();
    let child = start_long_run(dir.path(), "killed", 30, |out| {
        out.join("checkpoint-2/trainer_state.json").exists()
    });
    let out = dir.path().join("killed");
    let pids = mpi_ranks(dir.path(), "output_dir=killed");
    assert_eq!(pids.len(), 2, "{pids:?}");
    // SAFETY: kill(2) on a rank of our own job.
    unsafe { libc::kill(pids[&1], libc::SIGKILL) };
    let (status, events, log) = finish(child, Duration::from_secs(60));
    assert!(!status.success());
    let failed = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "failed")
        .unwrap_or_else(|| panic!("no failed event:\n{events}\n{log}"));
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("rank") && error.contains("mpirun"),
        "{error}"
    );
    // Every rank is gone, and the checkpoint saved before is whole.
    assert!(mpi_ranks(dir.path(), "output_dir=killed").is_empty());
    let state = read_json(&out.join("checkpoint-2/trainer_state.json"));
    assert_eq!(state["global_step"], 2);
    assert!(!tensors(&out.join("checkpoint-2/adapter_model.safetensors")).is_empty());
    assert!(out.join("checkpoint-2/optimizer.safetensors").exists());
}

#[test]
fn an_abort_stops_every_rank_at_one_step_and_saves_one_checkpoint() {
    let dir = workdir();
    let child = start_long_run(dir.path(), "aborted", 30, |out| {
        out.join("trainer_log.jsonl").exists()
            && std::fs::read_to_string(out.join("trainer_log.jsonl"))
                .is_ok_and(|t| t.lines().count() >= 3)
    });
    // What LlamaBoard's abort does: SIGINT to the worker (the launcher).
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let (status, events, log) = finish(child, Duration::from_secs(60));
    assert!(status.success(), "{events}\n{log}");
    let aborted: Vec<serde_json::Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "aborted")
        .collect();
    assert_eq!(aborted.len(), 1, "{events}");
    let step = aborted[0]["step"].as_u64().unwrap();
    let ckpt = dir.path().join(format!("aborted/checkpoint-{step}"));
    assert_eq!(
        aborted[0]["checkpoint"],
        format!("aborted/checkpoint-{step}")
    );
    assert_eq!(
        read_json(&ckpt.join("trainer_state.json"))["global_step"],
        step
    );
}

/// `ddp_timeout`: a rank that stops answering (SIGSTOP: alive, so mpirun sees nothing) leaves
/// rank 0 waiting in a collective; after `ddp_timeout` seconds rank 0 ends with an error naming
/// the wait, and the job ends.
#[test]
fn a_rank_that_stops_answering_ends_the_job_after_ddp_timeout() {
    let dir = workdir();
    let child = start_long_run(dir.path(), "stalled", 3, |out| {
        out.join("checkpoint-2/trainer_state.json").exists()
    });
    let pids = mpi_ranks(dir.path(), "output_dir=stalled");
    // SAFETY: kill(2) on a rank of our own job.
    unsafe { libc::kill(pids[&1], libc::SIGSTOP) };
    let (status, events, log) = finish(child, Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        log.contains("rank 0: waited 3 s for the other ranks"),
        "{events}\n{log}"
    );
    assert!(events.contains("\"event\":\"failed\""), "{events}");
    assert!(mpi_ranks(dir.path(), "output_dir=stalled").is_empty());
}
