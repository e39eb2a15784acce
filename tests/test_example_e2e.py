"""End-to-end: examples/train_dlrm.py under `accelerate launch` with 2 gloo ranks on CPU.

Launches with tiny settings (default mode: sparse model + same-length dense baseline trained
side by side, both prepared by accelerate and both in every checkpoint):
  A  uninterrupted, 30 steps;
  B1 same settings, killed by `--crash-at-step 25` (every rank os._exit(1)s after step 25,
     5 steps after the step-20 checkpoint);
  B2 relaunched into B's folder: must resume from step_000020 at step 20, replay steps
     21..30 (crossing an epoch boundary, skip_first_batches inside epoch 0) and end with
     the same masks (sha256 per table), schedule values and validation loss as A, and the
     same dense baseline (weights sha256, validation loss/AUC);
  B3 relaunched into B's folder with `--no-baseline`: refuses to resume a checkpoint that
     holds a baseline model, with a message saying so.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_dlrm.py"
CONFIG = ROOT / "launch" / "cpu_2proc.yaml"
TIMEOUT = 150  # seconds per launch (each takes ~10-20 s on a loaded 2-core machine)

# 8000 rows -> 7200 train rows, global batch 2 x 128 -> 28 steps per epoch
TINY = ["--rows", "8000", "--num-users", "400", "--num-items", "150", "--num-categories", "20",
        "--batch-size", "128", "--max-steps", "30", "--save-every", "10", "--keep", "2",
        "--start-step", "5", "--ramp-steps", "15", "--final-sparsity", "0.75",
        "--log-every", "10", "--seed", "3", "--no-progress", "--expect-world-size", "2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--main_process_port", str(_free_port()), str(SCRIPT), "--output-dir", str(out_dir),
           *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None); env.pop("RANK", None); env.pop("LOCAL_RANK", None)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"launch timed out after {TIMEOUT}s: {' '.join(cmd)}\n"
                    f"stdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    return r


def _ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def _summary(out_dir):
    return json.loads((Path(out_dir) / "summary.json").read_text())


def _complete_ckpts(out_dir):
    root = Path(out_dir) / "ckpt"
    return sorted(p.name for p in root.iterdir() if (p / "COMPLETE").is_file())


def test_crash_and_resume_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"

    ra = _ok(_launch(a))
    assert "world_size=2 backend=gloo distributed_type=MULTI_CPU" in ra.stdout, ra.stdout
    assert "starting from scratch" in ra.stdout
    sa = _summary(a)
    assert sa["final_step"] == 30 and sa["world_size"] == 2 and sa["mode"] == "sparse"
    assert sa["resumed_from"] is None
    assert "dense baseline @ step 30" in ra.stdout and "sparse         @ step 30" in ra.stdout, ra.stdout
    assert "cost of sparsity" in ra.stdout
    assert sa["val_dense_baseline"] is not None and sa["baseline_model_sha256"] is not None
    assert sa["baseline_model_sha256"] != sa["model_sha256"]  # the baseline is a separate, unpruned model
    assert sa["baseline_cost"]["loss"] == pytest.approx(sa["val"]["loss"] - sa["val_dense_baseline"]["loss"])
    assert sa["dense_reference"] is None                     # replaced by the baseline
    assert _complete_ckpts(a) == ["step_000020", "step_000030"]  # --keep 2

    rb1 = _launch(b, "--crash-at-step", "25")
    assert rb1.returncode != 0, f"the crash run exited 0\n{rb1.stdout}\n{rb1.stderr}"
    assert "world_size=2" in rb1.stdout
    assert "step    25 simulated crash" in rb1.stdout, rb1.stdout
    assert "step    30" not in rb1.stdout
    assert not (b / "summary.json").exists()
    assert _complete_ckpts(b) == ["step_000010", "step_000020"]

    rb2 = _ok(_launch(b))
    assert "world_size=2 backend=gloo distributed_type=MULTI_CPU" in rb2.stdout
    m = re.search(r"resumed from (step_\d+) at step (\d+)", rb2.stdout)
    assert m, rb2.stdout
    assert m.group(1) == "step_000020" and int(m.group(2)) == 20
    sb = _summary(b)
    assert sb["final_step"] == 30 and sb["resumed_from"] == "step_000020"
    assert sb["steps_this_run"] == 10
    assert _complete_ckpts(b) == ["step_000020", "step_000030"]

    # the resumed run ends exactly where the uninterrupted one did
    assert set(sa["mask_sha256"]) == {"user", "item", "item_category", "hour", "device", "region"}
    assert sb["mask_sha256"] == sa["mask_sha256"]
    assert sb["schedule"] == sa["schedule"]
    assert sb["schedule_last_epoch"] == sa["schedule_last_epoch"] == 30
    assert all(v == pytest.approx(0.75) for v in sa["schedule"].values())
    assert sb["dense_reference"] == sa["dense_reference"]
    assert sb["model_sha256"] == sa["model_sha256"]      # bit-identical weights
    assert sb["val"] == sa["val"]
    assert sb["baseline_model_sha256"] == sa["baseline_model_sha256"]  # baseline restored exactly too
    assert sb["val_dense_baseline"] == sa["val_dense_baseline"]
    assert sb["baseline_cost"] == sa["baseline_cost"]
    assert sb["tables"] == sa["tables"]
    for t in sa["tables"].values():
        assert t["weight_zeros"] >= t["zeroed"] > 0      # masks were written into the weights

    # a checkpoint holding a baseline model is not resumed without one (clear error, no hang)
    rb3 = _launch(b, "--no-baseline")
    assert rb3.returncode != 0, f"--no-baseline resumed a baseline checkpoint\n{rb3.stdout}\n{rb3.stderr}"
    assert "was written with a dense baseline model" in rb3.stdout + rb3.stderr, rb3.stdout + rb3.stderr
