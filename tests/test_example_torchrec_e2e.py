"""End-to-end: examples/dlrm/train_torchrec.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Tiny settings: 8000 rows -> 7200 train rows, global batch 2 x 128 -> 28 steps per epoch,
60 steps, a checkpoint every 9 steps (inside epochs), the newest 3 kept; `user` and `item`
sharded row-wise (`--row-wise-min-rows 100`), the four small tables table-wise; sparse
model + dense baseline (both DistributedModelParallel, fused Adagrad).

* A  uninterrupted: the summary's fields; every table's sparsity from the sharded run
     (`sp.sparsity()`) equals its whole mask's; the exported tables load back equal to the
     final weights; the final DCP checkpoint (models, optimizers, masks), read whole here,
     holds the masks the summary reports, and every pruned weight is 0; re-running it
     says it is finished and exits 0.
* B  killed (`--crash-at-step C`, every rank os._exit(1)s) at a random step C in 46..59
     (seeded; `TORCHREC_E2E_SEED=<seed>` replays it). Then the newest checkpoint loses its
     COMPLETE marker and the next one gets a flipped byte in a DCP file. `--resume
     <damaged>` fails with one message; `--resume auto` names both skipped folders, resumes
     from the third and ends bit-identical to A: masks, schedule, both models' weights
     (tables and MLPs), validation metrics.
* C  the same run with every table column-wise: the same masks and weights, bit for bit.
* W  a world-2 checkpoint of A resumed by ONE process (`python`, no launcher; DCP reshards
     the tables and optimizer state, distsparse the masks): says what changed, finishes.

Every launch has a hard timeout: torchrun gets SIGTERM (it stops its workers), then SIGKILL.
"""

import os
import random
import re
import shutil

import pytest
import torch

from _example_runner import TORCHREC as SCRIPT, TABLES, single, torchrun
from _example_runner import ckpt as _ckpt, complete_ckpts as _complete_ckpts, ok as _ok
from _example_runner import summary as _summary


STEPS, SAVE_EVERY, KEEP, STEPS_PER_EPOCH = 60, 9, 3, 28
TINY = ["--rows", "8000", "--num-users", "400", "--num-items", "150", "--num-categories", "20",
        "--batch-size", "128", "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep", str(KEEP),
        "--start-step", "5", "--ramp-steps", "15", "--final-sparsity", "0.75", "--row-wise-min-rows", "100",
        "--log-every", "30", "--seed", "3"]


def _torchrun(out_dir, *extra):
    """2 ranks through torchrun (the docstring's first command)."""
    return torchrun(SCRIPT, "--output-dir", out_dir, *TINY, *extra)


def _single(out_dir, *extra):
    """One process, no launcher: `python examples/dlrm/train_torchrec.py`."""
    return single(SCRIPT, "--output-dir", out_dir, *TINY, *extra)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference run: (folder, launch result)."""
    a = tmp_path_factory.mktemp("torchrec") / "a"
    return a, _ok(_torchrun(a, "--expect-world-size", "2"))


def test_uninterrupted_run_summary_masks_export_and_not_redone(run_a):
    import distsparse

    a, ra = run_a
    assert "world_size=2 backend=gloo" in ra.stdout and "starting from scratch" in ra.stdout, ra.stdout
    # big tables row-wise over both ranks, small ones whole on the least loaded rank, biggest first
    assert ("TorchRec plan: user:row_wise@[0, 1] item:row_wise@[0, 1] item_category:table_wise@[1] "
            "hour:table_wise@[1] device:table_wise@[1] region:table_wise@[0]") in ra.stdout, ra.stdout
    sa = _summary(a)
    for key in ("final_step", "world_size", "resumed_from", "mode", "sharding", "val", "val_dense_baseline",
                "baseline_cost", "train_seconds_this_run", "steps_this_run", "samples_per_s", "tables",
                "mask_sha256", "sparsity_from_sharded_run", "schedule", "schedule_last_epoch", "export",
                "model_sha256", "baseline_model_sha256"):
        assert key in sa, key
    assert sa["final_step"] == STEPS and sa["world_size"] == 2 and sa["mode"] == "sparse"
    assert sa["resumed_from"] is None and sa["steps_this_run"] == STEPS
    assert 0.5 < sa["val"]["auc"] < 1 and 0.5 < sa["val_dense_baseline"]["auc"] < 1, sa
    assert sa["baseline_cost"]["auc"] == pytest.approx(sa["val"]["auc"] - sa["val_dense_baseline"]["auc"])
    assert sa["baseline_model_sha256"] not in (None, sa["model_sha256"])   # a separate, unpruned model
    assert sa["schedule_last_epoch"] == STEPS and all(v == pytest.approx(0.75) for v in sa["schedule"].values())
    for line in ("cost of sparsity (sparse - baseline)", f"dense baseline @ step {STEPS}",
                 f"sparse         @ step {STEPS}", "sparse_tables.safetensors: "):
        assert line in ra.stdout, line
    assert _complete_ckpts(a) == [_ckpt(s) for s in (45, 54, 60)]        # --keep 3
    for name in TABLES:
        t = sa["tables"][name]
        assert t["zeroed"] > 0 and t["weight_zeros"] >= t["zeroed"], (name, t)
        # the sharded run's global figure == the whole mask's (the summary's, from the checkpoint)
        assert sa["sparsity_from_sharded_run"][name] == pytest.approx(t["sparsity"], abs=1e-12), name
        assert abs(t["sparsity"] - 0.75) < 0.02, (name, t)

    # the exported file is smaller than the same tables dense and holds the final weights
    e = sa["export"]
    assert e["file_bytes"] == (a / "sparse_tables.safetensors").stat().st_size
    assert e["file_bytes"] < 0.5 * e["dense_file_bytes"], e
    exported = distsparse.load_sparse_data(str(a / "sparse_tables.safetensors"))
    assert set(exported) == set(TABLES)
    import hashlib
    for name in TABLES:
        w = exported[name]
        assert hashlib.sha256(w.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() == \
            sa["tables"][name]["weight_sha256"], name

    # the final checkpoint is ONE DCP checkpoint holding the masks too; read whole in this process
    folder = a / "ckpt" / _ckpt(STEPS)
    assert not (folder / "distsparse_state.safetensors").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(folder / "model", a / "whole.pt")
    whole = torch.load(a / "whole.pt", weights_only=False)
    for name in TABLES:
        m = whole["sparsity"][f"rects/{name}"].to(torch.bool)        # 0/1 per element, the table's shape
        assert hashlib.sha256(m.contiguous().numpy().tobytes()).hexdigest() == sa["mask_sha256"][name], name
        assert not exported[name][~m].any(), name                      # every pruned weight is 0

    # re-running a finished job: says so, exits 0 at once, changes nothing
    before = (a / "summary.json").stat().st_mtime_ns
    again = _ok(_torchrun(a))
    assert f"already finished: step {STEPS}" in again.stdout, again.stdout
    assert "resumed from" not in again.stdout and "summary (" not in again.stdout
    assert (a / "summary.json").stat().st_mtime_ns == before


def test_crash_and_damaged_checkpoints_resume_bit_exactly(run_a, tmp_path):
    a, _ = run_a
    sa = _summary(a)
    seed = int(os.environ.get("TORCHREC_E2E_SEED", random.SystemRandom().randrange(10**6)))
    crash = random.Random(seed).randint(46, 59)   # checkpoints k1 < k2 < k3 = (27, 36, 45) or (36, 45, 54)
    why = f"(TORCHREC_E2E_SEED={seed}, crash at step {crash})"
    print(why)
    newest = crash // SAVE_EVERY * SAVE_EVERY
    k3, k2, k1 = newest, newest - SAVE_EVERY, newest - 2 * SAVE_EVERY

    b = tmp_path / "b"
    rb1 = _torchrun(b, "--crash-at-step", str(crash))
    assert rb1.returncode != 0, f"the crash run exited 0 {why}\n{rb1.stdout}\n{rb1.stderr}"
    assert f"step {crash:5d} simulated crash" in rb1.stdout, rb1.stdout
    assert not (b / "summary.json").exists()
    assert _complete_ckpts(b) == [_ckpt(k1), _ckpt(k2), _ckpt(k3)], why

    # the newest checkpoint is incomplete, the next one has a damaged DCP file: only k1 loads
    (b / "ckpt" / _ckpt(k3) / "COMPLETE").unlink()
    dcp_file = sorted((b / "ckpt" / _ckpt(k2) / "model").glob("*.distcp"))[0]
    raw = bytearray(dcp_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    dcp_file.write_bytes(bytes(raw))

    rx = _torchrun(b, "--resume", str(b / "ckpt" / _ckpt(k2)))
    assert rx.returncode != 0, f"resumed from a damaged checkpoint {why}\n{rx.stdout}\n{rx.stderr}"
    both = rx.stdout + rx.stderr
    assert both.count(f"error: cannot resume from {b / 'ckpt' / _ckpt(k2)}") == 1, both
    assert "does not match its sha256 in train_state.json" in both and "never falls back" in both, both

    rb2 = _ok(_torchrun(b))
    skip = [line for line in rb2.stdout.splitlines() if line.startswith("resume: skipped")]
    assert len(skip) == 1, rb2.stdout
    assert (f"{_ckpt(k3)} (no COMPLETE marker" in skip[0] and f"{_ckpt(k2)} (model/{dcp_file.name} does not match"
            in skip[0] and skip[0].endswith(f"resuming from {_ckpt(k1)}")), skip[0]
    resumed = rf"resumed from {_ckpt(k1)} at step {k1} \(epoch {k1 // STEPS_PER_EPOCH}, "
    assert re.search(resumed, rb2.stdout), rb2.stdout
    sb = _summary(b)
    assert sb["final_step"] == STEPS and sb["resumed_from"] == _ckpt(k1) and sb["steps_this_run"] == STEPS - k1

    # the resumed run ends exactly where the uninterrupted one did
    assert sb["mask_sha256"] == sa["mask_sha256"] and set(sa["mask_sha256"]) == set(TABLES), why
    assert sb["model_sha256"] == sa["model_sha256"], why                     # tables + MLPs, bit for bit
    assert sb["baseline_model_sha256"] == sa["baseline_model_sha256"], why
    assert sb["schedule"] == sa["schedule"] and sb["schedule_last_epoch"] == sa["schedule_last_epoch"]
    assert sb["val"] == sa["val"] and sb["val_dense_baseline"] == sa["val_dense_baseline"], why
    assert sb["tables"] == sa["tables"], why
    assert sb["export"]["file_bytes"] == sa["export"]["file_bytes"]


def test_world_2_checkpoint_resumes_in_one_process(run_a, tmp_path):
    a, _ = run_a
    w = tmp_path / "w"
    (w / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / _ckpt(54), w / "ckpt" / _ckpt(54))
    r = _ok(_single(w))
    assert "world_size=1 backend=gloo" in r.stdout, r.stdout
    # step 54 is in epoch 1 (steps 29..56) with 26 of its 28 steps done: sample 26 * 256 = 6656
    assert "resumed from step_000054 at step 54 (epoch 1, sample 6656 of 7200)" in r.stdout, r.stdout
    assert "global batch 256 -> 128 samples per step, 28 -> 56 steps per epoch" in r.stdout, r.stdout
    assert "resharded: the checkpoint's plan was user:row_wise@[0, 1]" in r.stdout, r.stdout
    s = _summary(w)
    assert s["final_step"] == STEPS and s["world_size"] == 1 and s["steps_this_run"] == STEPS - 54
    for name in TABLES:   # the masks came through the reshard: still at the final level
        assert abs(s["tables"][name]["sparsity"] - 0.75) < 0.02, (name, s["tables"][name])


def test_column_wise_plan_gives_the_same_masks_and_weights(run_a, tmp_path):
    """Masks do not depend on how TorchRec shards the tables (each is the single-process mask
    of the whole table); with these plans TorchRec's arithmetic is the same too, so the whole
    run is bit-identical to A's row-/table-wise one."""
    a, _ = run_a
    sa = _summary(a)
    c = tmp_path / "c"
    rc = _ok(_torchrun(c, "--sharding", "column_wise"))
    assert "TorchRec plan: user:column_wise@[0, 1] item:column_wise@[0, 1]" in rc.stdout, rc.stdout
    sc = _summary(c)
    assert sc["mask_sha256"] == sa["mask_sha256"]
    assert sc["model_sha256"] == sa["model_sha256"] and sc["val"] == sa["val"]
    assert sc["tables"] == sa["tables"]
