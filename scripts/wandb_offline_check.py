"""Dev-only: an offline W&B run of ours, read back by wandb itself. Run from the repository root:

    python -m venv /tmp/wb17 && /tmp/wb17/bin/pip install 'wandb==0.17.9'    # its Python record reader
    python -m venv /tmp/wbnew && /tmp/wbnew/bin/pip install wandb            # today's `wandb sync`
    /tmp/wb17/bin/python scripts/wandb_offline_check.py target/debug/llamafactory /tmp/wbnew/bin/wandb

It trains the demo model for 6 steps with `report_to: wandb` and `WANDB_MODE=offline`, then scans the run's `.wandb`
file with wandb 0.17's `DataStore` (the last wandb whose record log reader is Python; newer ones read the same format
in wandb-core), parses every record as a `wandb_internal_pb2.Record` and prints them, and asks today's `wandb sync
--dry-run` what it would upload.
"""
import glob
import os
import subprocess
import sys
import tempfile

from wandb.proto import wandb_internal_pb2 as pb
from wandb.sdk.internal import datastore

bin_path, wandb_cli = os.path.abspath(sys.argv[1]), sys.argv[2]
repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
work = tempfile.mkdtemp()
subprocess.run([bin_path, "demo", "--out", "model", "--dataset-dir", os.path.join(repo, "data")], cwd=work, check=True)
with open(os.path.join(work, "cfg.yaml"), "w") as f:
    f.write(f"model_name_or_path: model\nstage: sft\ndo_train: true\ndataset: demo_sft\ndataset_dir: {repo}/data\n"
            "template: qwen\ncutoff_len: 48\nmax_samples: 24\nval_size: 0.25\nper_device_train_batch_size: 4\n"
            "max_steps: 6\nlogging_steps: 2\neval_strategy: steps\neval_steps: 3\nreport_to: wandb\n"
            "run_name: wandb-check\noutput_dir: out\n")
env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=work, WANDB_PROJECT="llamaboard")
subprocess.run([bin_path, "train", "cfg.yaml"], cwd=work, env=env, check=True)
(path,) = glob.glob(os.path.join(work, "wandb", "offline-run-*", "run-*.wandb"))
ds = datastore.DataStore()
ds.open_for_scan(path)
kinds = []
while True:
    data = ds.scan_data()
    if data is None:
        break
    r = pb.Record()
    r.ParseFromString(data)
    kind = r.WhichOneof("record_type")
    kinds.append(kind)
    body = getattr(r, kind)
    if kind == "history":
        print("history", {i.key: i.value_json for i in body.item})
    elif kind == "run":
        print("run", body.run_id, body.project, body.display_name, len(body.config.update), "config items")
    else:
        print(kind, str(body).replace("\n", " ")[:200])
assert kinds[:2] == ["header", "run"] and kinds[-2:] == ["summary", "exit"], kinds
out = subprocess.run([wandb_cli, "sync", "--dry-run", os.path.dirname(path)], capture_output=True, text=True)
print(out.stdout.strip(), out.stderr.strip()[-500:])
