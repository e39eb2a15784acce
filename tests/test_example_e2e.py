"""End-to-end: examples/dlrm/train.py under `accelerate launch` with 2 gloo ranks on CPU.

Tiny settings (default mode: sparse model + same-length dense baseline, both prepared by
accelerate and both in every checkpoint); 8000 rows -> 7200 train rows, global batch
2 x 128 -> 28 steps per epoch, 120 steps (4.3 epochs), a checkpoint every 9 steps (not a
divisor of 28, so checkpoints fall inside epochs), the newest 3 kept.

* A  uninterrupted; its exported sparse tables load back bit for bit; re-running it says
     it is already finished and exits 0 without training or evaluating.
* B  killed (`--crash-at-step C`, every rank os._exit(1)s) at a random step C in epochs
     1-3 (seeded; the seed and C are printed, `DLRM_E2E_SEED=<seed>` replays it). Then the
     newest checkpoint loses its COMPLETE marker and the next one gets a flipped byte in
     its distsparse file. `--resume <damaged>` fails with one message and no traceback;
     `--resume auto` names both skipped folders and why, resumes from the third (inside
     epoch >= 1) and ends bit-identical to A: masks, schedule, both models.
* W  a checkpoint of A resumed by one process: says what changed (global batch, steps
     per epoch, samples seen again or skipped) and finishes.
* `accelerate launch --cpu --num_processes 2` (starts ONE process) is refused with the
  command to run instead.
"""

import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from _example_runner import MAIN as SCRIPT, ROOT, TABLES, accelerate, single
from _example_runner import ckpt as _ckpt, complete_ckpts as _complete_ckpts, ok as _ok
from _example_runner import summary as _summary

CONFIG = ROOT / "launch" / "cpu_2proc.yaml"

STEPS, SAVE_EVERY, KEEP, STEPS_PER_EPOCH = 120, 9, 3, 28
TINY = ["--rows", "8000", "--num-users", "400", "--num-items", "150", "--num-categories", "20",
        "--batch-size", "128", "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep", str(KEEP),
        "--start-step", "5", "--ramp-steps", "15", "--final-sparsity", "0.75",
        "--log-every", "30", "--seed", "3", "--no-progress"]


def _launch(out_dir, *extra, launcher=("--config_file", str(CONFIG))):
    """2 ranks through `accelerate launch` (the README's command)."""
    return accelerate(SCRIPT, "--output-dir", out_dir, *TINY, *extra, launcher=launcher)


def _single(out_dir, *extra):
    """One process, no launcher: `python examples/dlrm/train.py`."""
    return single(SCRIPT, "--output-dir", out_dir, *TINY, *extra)


def _flip_a_data_byte(path: Path):
    """Flip one bit inside the tensor data of a safetensors file (after the JSON header)."""
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) > 8 + header, "no tensor data to damage"
    raw[8 + header] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference run: (folder, launch result)."""
    a = tmp_path_factory.mktemp("dlrm") / "a"
    return a, _ok(_launch(a, "--expect-world-size", "2"))


def test_uninterrupted_run_exports_its_tables_and_is_not_redone(run_a):
    a, ra = run_a
    assert "world_size=2 backend=gloo distributed_type=MULTI_CPU" in ra.stdout, ra.stdout
    assert "starting from scratch" in ra.stdout
    assert f"the run makes {STEPS} steps = {STEPS / STEPS_PER_EPOCH:.2f} epochs over the 7200 training rows" in ra.stdout
    assert "warning" not in ra.stdout
    sa = _summary(a)
    assert sa["final_step"] == STEPS and sa["world_size"] == 2 and sa["mode"] == "sparse"
    assert sa["resumed_from"] is None
    assert f"dense baseline @ step {STEPS}" in ra.stdout and f"sparse         @ step {STEPS}" in ra.stdout, ra.stdout
    assert "cost of sparsity" in ra.stdout
    assert sa["baseline_model_sha256"] not in (None, sa["model_sha256"])  # a separate, unpruned model
    assert sa["baseline_cost"]["loss"] == pytest.approx(sa["val"]["loss"] - sa["val_dense_baseline"]["loss"])
    assert sa["dense_reference"] is None                                  # replaced by the baseline
    assert _complete_ckpts(a) == [_ckpt(s) for s in (108, 117, 120)]     # --keep 3
    for t in sa["tables"].values():
        assert t["weight_zeros"] >= t["zeroed"] > 0                      # masks were written into the weights

    # the exported file is real, smaller than the same tables dense, and loads back bit for bit
    import distsparse
    from safetensors.torch import load_file
    export = a / "sparse_tables.safetensors"
    e = sa["export"]
    assert e["file_bytes"] == export.stat().st_size
    assert e["file_bytes"] < 0.5 * e["dense_file_bytes"], e               # 75 % of (1,4) blocks pruned
    assert f"sparse_tables.safetensors: {e['file_bytes']} B on disk vs {e['dense_file_bytes']} B" in ra.stdout
    tables = distsparse.load_sparse_data(str(export))
    assert set(tables) == set(TABLES)
    model = load_file(str(a / "ckpt" / _ckpt(STEPS) / "model.safetensors"))
    for name in TABLES:
        w = model[f"tables.{name}.weight"]
        assert tables[name].dtype == w.dtype and torch.equal(tables[name], w), name
        assert torch.equal(tables[name].view(torch.uint8), w.view(torch.uint8)), name  # -0.0 / bits too

    # re-running a finished job: says so, exits 0 at once, changes nothing
    before = (a / "summary.json").stat().st_mtime_ns
    again = _ok(_launch(a))
    assert f"already finished: step {STEPS}" in again.stdout and str(a / "summary.json") in again.stdout, again.stdout
    assert "resumed from" not in again.stdout and "summary (" not in again.stdout
    assert (a / "summary.json").stat().st_mtime_ns == before


def test_crash_in_a_later_epoch_and_damaged_checkpoints_resume_bit_exactly(run_a, tmp_path):
    a, _ = run_a
    sa = _summary(a)
    seed = int(os.environ.get("DLRM_E2E_SEED", random.SystemRandom().randrange(10**6)))
    # epochs 1-3 are steps 29..112; from step 54 on, the third-newest checkpoint is past epoch 0
    crash = random.Random(seed).randint(54, 112)
    print(f"DLRM_E2E_SEED={seed}: crash at step {crash} (epoch {(crash - 1) // STEPS_PER_EPOCH})")
    why = f"(DLRM_E2E_SEED={seed}, crash at step {crash})"
    newest = crash // SAVE_EVERY * SAVE_EVERY
    k3, k2, k1 = newest, newest - SAVE_EVERY, newest - 2 * SAVE_EVERY
    assert k1 > STEPS_PER_EPOCH

    b = tmp_path / "b"
    rb1 = _launch(b, "--crash-at-step", str(crash))
    assert rb1.returncode != 0, f"the crash run exited 0 {why}\n{rb1.stdout}\n{rb1.stderr}"
    assert f"step {crash:5d} simulated crash" in rb1.stdout, rb1.stdout
    assert not (b / "summary.json").exists()
    assert _complete_ckpts(b) == [_ckpt(k1), _ckpt(k2), _ckpt(k3)], why

    # the newest checkpoint is incomplete, the next one damaged: only k1 can be resumed from
    (b / "ckpt" / _ckpt(k3) / "COMPLETE").unlink()
    _flip_a_data_byte(b / "ckpt" / _ckpt(k2) / "distsparse_state.safetensors")

    # an explicit folder never falls back: one message, no traceback from any rank
    rx = _launch(b, "--resume", str(b / "ckpt" / _ckpt(k2)))
    assert rx.returncode != 0, f"resumed from a damaged checkpoint {why}\n{rx.stdout}\n{rx.stderr}"
    both = rx.stdout + rx.stderr
    assert both.count(f"error: cannot resume from {b / 'ckpt' / _ckpt(k2)}") == 1, both
    assert "does not match its sha256 checksum" in both and "--resume PATH` never falls back" in both, both
    assert "[rank0]: Traceback" not in both and "[rank1]: Traceback" not in both, both

    rb2 = _ok(_launch(b))
    skip = [line for line in rb2.stdout.splitlines() if line.startswith("resume: skipped")]
    assert len(skip) == 1, rb2.stdout
    assert (f"{_ckpt(k3)} (no COMPLETE marker" in skip[0] and f"{_ckpt(k2)} (" in skip[0]
            and "distsparse_state.safetensors" in skip[0] and "tensor '" in skip[0]
            and skip[0].endswith(f"resuming from {_ckpt(k1)}")), skip[0]
    assert re.search(rf"resumed from {_ckpt(k1)} at step {k1} \(epoch {k1 // STEPS_PER_EPOCH}, ", rb2.stdout), rb2.stdout
    sb = _summary(b)
    assert sb["final_step"] == STEPS and sb["resumed_from"] == _ckpt(k1) and sb["steps_this_run"] == STEPS - k1
    assert _complete_ckpts(b) == [_ckpt(s) for s in (108, 117, 120)]

    # the resumed run ends exactly where the uninterrupted one did
    assert sb["model_sha256"] == sa["model_sha256"], why                     # bit-identical weights
    assert sb["baseline_model_sha256"] == sa["baseline_model_sha256"], why   # the baseline too
    assert sb["mask_sha256"] == sa["mask_sha256"] and set(sa["mask_sha256"]) == set(TABLES), why
    assert sb["schedule"] == sa["schedule"] and sb["schedule_last_epoch"] == sa["schedule_last_epoch"] == STEPS
    assert all(v == pytest.approx(0.75) for v in sa["schedule"].values())
    assert sb["val"] == sa["val"] and sb["val_dense_baseline"] == sa["val_dense_baseline"], why
    assert sb["tables"] == sa["tables"], why
    assert sb["export"]["file_bytes"] == sa["export"]["file_bytes"]


def test_resume_on_another_world_size_says_what_changed(run_a, tmp_path):
    a, _ = run_a
    w = tmp_path / "w"
    (w / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / _ckpt(108), w / "ckpt" / _ckpt(108))
    r = _ok(_single(w))
    assert "world_size=1" in r.stdout
    # step 108 is in epoch 3 (steps 85..112) with 24 of its 28 steps done: sample 24 * 256 = 6144
    assert "resumed from step_000108 at step 108 (epoch 3, sample 6144 of 7200)" in r.stdout, r.stdout
    assert ("resized: 2 processes x batch 128 -> 1 x 128: global batch 256 -> 128 samples per step, "
            "28 -> 56 steps per epoch") in r.stdout, r.stdout
    assert ("epoch 3 continues at sample 6144 of 7200 exactly, so no sample of it is seen again or skipped; "
            "its remaining 1056 samples make 8 steps, the last 32 are dropped") in r.stdout, r.stdout
    s = _summary(w)
    assert s["final_step"] == STEPS and s["world_size"] == 1 and s["steps_this_run"] == STEPS - 108


def test_cpu_num_processes_launch_is_refused_with_what_to_run(tmp_path):
    r = _launch(tmp_path / "x", "--max-steps", "1", launcher=("--cpu", "--num_processes", "2"))
    assert r.returncode != 0, r.stdout + r.stderr
    assert "accelerate launch started ONE process although several were asked for" in r.stderr, r.stderr
    assert "accelerate launch --config_file launch/cpu_2proc.yaml examples/dlrm/train.py" in r.stderr
    assert "accelerate launch --multi_gpu --num_processes N examples/dlrm/train.py" in r.stderr
    assert not (tmp_path / "x" / "ckpt").exists()   # refused before any work


def _cubic(t, final, start, ramp):
    """CubicScheduler's value at epoch t from 0.0 (Zhu & Gupta)."""
    progress = min(1.0, max(0, t - start) / ramp)
    return final if progress >= 1.0 else final - final * (1.0 - progress) ** 3


def test_the_log_names_the_level_the_masks_used_the_next_one_and_full_paths(tmp_path):
    # Issue 20 items 6 and 11: "level" was the next step's (sparsity seemed to lag it), and the
    # job printed bare names ("saved checkpoint step_000200").
    out = tmp_path / "run"
    r = _ok(_single(out, "--max-steps", "8", "--start-step", "0", "--ramp-steps", "5", "--log-every", "1",
                    "--save-every", "4"))
    lines = r.stdout.splitlines()
    assert f"run folder {out.resolve()} (checkpoints in {(out / 'ckpt').resolve()})" in lines, r.stdout[:2000]
    for step in (4, 8):
        ckpt = (out / "ckpt" / _ckpt(step)).resolve()
        assert f"step {step:5d} saved checkpoint {ckpt}" in lines and ckpt.is_dir(), r.stdout
    assert any(line.startswith(f"saved file  {(out / 'sparse_tables.safetensors').resolve()}: ") for line in lines)
    logged = [re.match(r"step +(\d+) loss \S+ .*level (\S+) \(next (\S+)\) sparsity (.*)$", line)
              for line in lines if re.match(r"step +\d+ loss", line)]
    assert len(logged) == 8 and all(logged), lines
    for m in logged:
        step, level, next_level = int(m.group(1)), float(m.group(2)), float(m.group(3))
        assert level == pytest.approx(_cubic(step - 1, 0.75, 0, 5), abs=6e-4), m.group(0)
        assert next_level == pytest.approx(_cubic(step, 0.75, 0, 5), abs=6e-4), m.group(0)
        sparsity = {k: float(v) for k, v in (kv.split("=") for kv in m.group(4).split())}
        assert set(sparsity) == set(TABLES)
        assert all(abs(s - level) < 0.011 for s in sparsity.values()), m.group(0)  # the masks' own level
    assert float(logged[-1].group(2)) == 0.75  # the final level shaped the last step's masks
