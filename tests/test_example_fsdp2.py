"""End-to-end: examples/dlrm/train.py --fsdp2 (tables sharded by FSDP2 fully_shard) with 2 gloo
ranks on CPU under torchrun, crash/resume, and checkpoints crossing between the FSDP2 and DDP modes.

Tiny settings as in test_example_e2e.py (sparse model + dense baseline, both sharded under
--fsdp2): 8000 rows -> 7200 train rows, global batch 2 x 128 -> 28 steps per epoch, 60 steps,
a checkpoint every 7 steps (inside epochs), the newest 3 kept.

* A  --fsdp2, uninterrupted: tables are Shard(0) DTensors, masks computed where the rows live,
     each step folder holds one sharded DCP checkpoint (models, optimizers, sparsity), the
     export loads back equal to the weights.
* D  the DDP mode on the same settings. At world 2 on gloo the two modes run the same float32
     operations (forward on the whole weights, gradients halved then summed over the 2 ranks,
     elementwise Adam), so A and D end bit-identical: weights, masks, validation figures.
* B  --fsdp2 killed at a random step in 49..59 (epochs 1-2; seeded, DLRM_FSDP2_SEED=<seed>
     replays it);
     the newest checkpoint loses COMPLETE, the next gets a flipped byte in a DCP file (its
     sha256 in train_state.json no longer matches); resumed
     through `accelerate launch
     --config_file launch/fsdp2_gpu.yaml` (CPU: the script calls fully_shard itself) it skips
     both and ends bit-identical to A.
* X  cross-mode: a DDP checkpoint resumed with --fsdp2 and an FSDP2 checkpoint resumed by the
     DDP mode both end bit-identical to A; at world 1 (`python ... --fsdp2`, a 1-rank process
     group) an FSDP2 checkpoint resumes too, and equals the DDP mode's world-1 resume.
* Refusals: `--resume PATH` of a checkpoint of another model shape (rank 0 finds it before any
  collective: one message, no rank left waiting), the FSDP launch config without --fsdp2.
"""

import json
import os
import random
import re
import shutil

import pytest
import torch

from _example_runner import MAIN as SCRIPT, ROOT, TABLES, accelerate, single, torchrun
from _example_runner import ckpt as _ckpt, complete_ckpts as _complete_ckpts, ok as _ok
from _example_runner import summary as _summary

FSDP2_CONFIG = ROOT / "launch" / "fsdp2_gpu.yaml"

STEPS, SAVE_EVERY, KEEP, STEPS_PER_EPOCH = 60, 7, 3, 28
TINY = ["--rows", "8000", "--num-users", "400", "--num-items", "150", "--num-categories", "20",
        "--batch-size", "128", "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep", str(KEEP),
        "--start-step", "5", "--ramp-steps", "15", "--final-sparsity", "0.75",
        "--log-every", "30", "--seed", "3", "--no-progress"]
# what must be equal for two runs to have ended in the same place
SAME = ("model_sha256", "baseline_model_sha256", "mask_sha256", "schedule", "schedule_last_epoch", "val",
        "val_dense_baseline", "tables")


def _torchrun(out_dir, *extra, nproc=2):
    return torchrun(SCRIPT, "--output-dir", out_dir, *TINY, *extra, nproc=nproc)


def _accelerate_fsdp2(out_dir, *extra):
    """`accelerate launch --config_file launch/fsdp2_gpu.yaml` (2 processes; on CPU the plugin is off)."""
    return accelerate(SCRIPT, "--output-dir", out_dir, *TINY, *extra, launcher=("--config_file", str(FSDP2_CONFIG)))


def _single(out_dir, *extra):
    """One process, no launcher."""
    return single(SCRIPT, "--output-dir", out_dir, *TINY, *extra)


def _copy_ckpt(src_run, step, dst_run):
    (dst_run / "ckpt").mkdir(parents=True)
    shutil.copytree(src_run / "ckpt" / _ckpt(step), dst_run / "ckpt" / _ckpt(step))


def _same_end(a, b, why=""):
    sa, sb = _summary(a), _summary(b)
    differ = [k for k in SAME if sa[k] != sb[k]]
    assert not differ, f"{differ} differ between {a.name} and {b.name} {why}"
    assert set(sa["mask_sha256"]) == set(TABLES) and sa["final_step"] == sb["final_step"] == STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted runs: {"fsdp2": (folder, result), "ddp": (folder, result)}."""
    root = tmp_path_factory.mktemp("dlrm_fsdp2")
    return {"fsdp2": (root / "a", _ok(_torchrun(root / "a", "--fsdp2", "--expect-world-size", "2"))),
            "ddp": (root / "d", _ok(_torchrun(root / "d", "--expect-world-size", "2")))}


def test_fsdp2_run_shards_the_tables_and_writes_one_sharded_dcp_checkpoint(runs):
    a, ra = runs["fsdp2"]
    d, _ = runs["ddp"]
    assert "world_size=2 backend=gloo" in ra.stdout, ra.stdout
    assert "fsdp2: tables sharded by rows over 2 rank(s) on cpu, fully_shard called by this script" in ra.stdout
    # 400 user rows -> 200/200, a 21-row EmbeddingBag -> 11/10: each rank masks its own rows
    assert ("masks computed where the rows live (rows of each rank): user->200/200 item->75/75 "
            "item_category->11/10 hour->12/12 device->3/3 region->25/25") in ra.stdout, ra.stdout
    assert "mask owners" not in ra.stdout and "warning" not in ra.stdout.lower(), ra.stdout
    assert "returned a view tensor" not in ra.stderr
    sa = _summary(a)
    assert sa["parallelism"] == "fsdp2" and sa["mode"] == "sparse" and sa["world_size"] == 2
    assert f"summary (sparse + dense baseline, step {STEPS}, world_size 2, FSDP2)" in ra.stdout
    assert _complete_ckpts(a) == [_ckpt(s) for s in (49, 56, 60)]
    for t in sa["tables"].values():
        assert t["weight_zeros"] >= t["zeroed"] > 0
        assert t["sparsity"] == pytest.approx(0.75, abs=0.02)

    # one DCP checkpoint, one file per rank (no full state dict anywhere), "mode" in train_state.json
    folder = a / "ckpt" / _ckpt(STEPS)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["COMPLETE", "dcp", "random_states_0.pkl", "random_states_1.pkl", "train_state.json"], files
    assert sorted(p.name for p in (folder / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = json.loads((folder / "train_state.json").read_text())
    assert state["mode"] == "fsdp2" and state["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(state["files"])  # checksummed
    assert json.loads((d / "ckpt" / _ckpt(STEPS) / "train_state.json").read_text())["mode"] == "ddp"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(folder / "dcp", a / "whole.pt")                # the DCP checkpoint, whole, in one process
    whole = torch.load(a / "whole.pt", weights_only=False)
    model = whole["model_0"]
    assert model["tables.user.weight"].shape == (400, 16) and model["tables.item_category.weight"].shape == (21, 16)
    assert whole["optim_0"]["state"]["tables.user.weight"]["exp_avg"].shape == (400, 16)
    assert set(whole["sparsity"]) >= {"state", "rows/user", "rows/item_category"}
    assert whole["sparsity"]["rows/user"].shape == (400, 2)          # row-packed: 16 bits -> 2 bytes a row

    # the export (gathered from the shards) loads back equal to the weights
    import distsparse
    tables = distsparse.load_sparse_data(str(a / "sparse_tables.safetensors"))
    assert set(tables) == set(TABLES)
    for name in TABLES:
        w = model[f"tables.{name}.weight"]
        assert torch.equal(tables[name].view(torch.uint8), w.view(torch.uint8)), name
    assert sa["export"]["file_bytes"] < 0.5 * sa["export"]["dense_file_bytes"]


def _log_lines(stdout):
    """The "step N loss ..." lines without the throughput."""
    return [re.sub(r"samples/s +\d+", "", line) for line in stdout.splitlines() if re.match(r"step +\d+ loss", line)]


def test_fsdp2_and_ddp_modes_end_bit_identical_at_world_2(runs):
    (a, ra), (d, rd) = runs["fsdp2"], runs["ddp"]
    _same_end(a, d)
    assert len(_log_lines(ra.stdout)) == STEPS // 30 and _log_lines(ra.stdout) == _log_lines(rd.stdout)
    sa, sd = _summary(a), _summary(d)
    assert sa["parallelism"] == "fsdp2" and sd["parallelism"] == "ddp"
    assert sa["export"]["file_bytes"] == sd["export"]["file_bytes"]


def test_fsdp2_crash_and_damaged_checkpoints_resume_bit_exactly(runs, tmp_path):
    a, _ = runs["fsdp2"]
    seed = int(os.environ.get("DLRM_FSDP2_SEED", random.SystemRandom().randrange(10**6)))
    # steps 49..59 (epochs 1-2): the third-newest checkpoint is then at step 35 or 42 (epoch 1)
    crash = random.Random(seed).randint(49, 59)
    print(f"DLRM_FSDP2_SEED={seed}: crash at step {crash} (epoch {(crash - 1) // STEPS_PER_EPOCH})")
    why = f"(DLRM_FSDP2_SEED={seed}, crash at step {crash})"
    newest = crash // SAVE_EVERY * SAVE_EVERY
    k3, k2, k1 = newest, newest - SAVE_EVERY, newest - 2 * SAVE_EVERY
    assert k1 > STEPS_PER_EPOCH

    b = tmp_path / "b"
    rb1 = _torchrun(b, "--fsdp2", "--crash-at-step", str(crash))
    assert rb1.returncode != 0, f"the crash run exited 0 {why}\n{rb1.stdout}\n{rb1.stderr}"
    assert f"step {crash:5d} simulated crash" in rb1.stdout, rb1.stdout
    assert not (b / "summary.json").exists()
    assert _complete_ckpts(b) == [_ckpt(k1), _ckpt(k2), _ckpt(k3)], why

    (b / "ckpt" / _ckpt(k3) / "COMPLETE").unlink()
    damaged = b / "ckpt" / _ckpt(k2) / "dcp" / "__1_0.distcp"
    damaged.write_bytes(bytes([damaged.read_bytes()[0] ^ 1]) + damaged.read_bytes()[1:])

    # resumed through the FSDP2 launch config (on CPU accelerate's plugin is off: fully_shard here)
    rb2 = _ok(_accelerate_fsdp2(b, "--fsdp2"))
    assert "fully_shard called by this script (accelerate's FSDP plugin is off" in rb2.stdout, rb2.stdout
    skip = [line for line in rb2.stdout.splitlines() if line.startswith("resume: skipped")]
    assert len(skip) == 1, rb2.stdout
    assert (f"{_ckpt(k3)} (no COMPLETE marker" in skip[0] and f"{_ckpt(k2)} (" in skip[0]
            and "dcp/__1_0.distcp does not match its sha256" in skip[0] and skip[0].endswith(f"resuming from {_ckpt(k1)}")), skip[0]
    assert re.search(rf"resumed from {_ckpt(k1)} at step {k1} \(epoch {k1 // STEPS_PER_EPOCH}, ", rb2.stdout)
    assert "written in the" not in rb2.stdout                     # same mode: nothing to say
    sb = _summary(b)
    assert sb["resumed_from"] == _ckpt(k1) and sb["steps_this_run"] == STEPS - k1
    assert _complete_ckpts(b) == [_ckpt(s) for s in (49, 56, 60)]
    _same_end(a, b, why)


@pytest.mark.parametrize("written, resumed", [("ddp", "fsdp2"), ("fsdp2", "ddp")])
def test_a_checkpoint_of_one_mode_resumes_in_the_other_bit_exactly(runs, tmp_path, written, resumed):
    src, _ = runs[written]
    x = tmp_path / "x"
    _copy_ckpt(src, 49, x)
    r = _ok(_torchrun(x, *(["--fsdp2"] if resumed == "fsdp2" else [])))
    assert "resumed from step_000049 at step 49 (epoch 1, sample 5376 of 7200)" in r.stdout, r.stdout
    assert (f"resume: step_000049 was written in the {written} mode and continues in the {resumed} mode "
            "(each mode reads the other's checkpoint: the DDP mode's files, the FSDP2 mode's DCP checkpoint; "
            "the masks reshard)") in r.stdout
    assert _summary(x)["parallelism"] == resumed
    _same_end(runs["fsdp2"][0], x, f"({written} -> {resumed})")


def test_fsdp2_at_world_1_resumes_a_2_rank_checkpoint_like_the_ddp_mode(runs, tmp_path):
    a, _ = runs["fsdp2"]
    f1, d1 = tmp_path / "f1", tmp_path / "d1"
    _copy_ckpt(a, 49, f1)
    _copy_ckpt(a, 49, d1)
    rf = _ok(_single(f1, "--fsdp2"))      # no launcher: the script opens a 1-rank process group
    rd = _ok(_single(d1))
    for r in (rf, rd):
        assert "world_size=1" in r.stdout and "resumed from step_000049 at step 49" in r.stdout, r.stdout
        assert "global batch 256 -> 128 samples per step" in r.stdout
    assert "fsdp2: tables sharded by rows over 1 rank(s) on cpu" in rf.stdout
    assert "user->400 item->150" in rf.stdout, rf.stdout
    sf, sd = _summary(f1), _summary(d1)
    assert sf["world_size"] == 1 and sf["parallelism"] == "fsdp2" and sd["parallelism"] == "ddp"
    differ = [k for k in SAME if sf[k] != sd[k]]
    assert not differ, differ


def test_a_checkpoint_of_another_model_shape_is_refused_on_every_rank_with_one_message(runs, tmp_path):
    a, _ = runs["fsdp2"]
    x = tmp_path / "x"
    _copy_ckpt(a, STEPS, x)
    r = _torchrun(x, "--fsdp2", "--dim", "8", "--resume", str(x / "ckpt" / _ckpt(STEPS)))
    both = r.stdout + r.stderr
    assert r.returncode != 0, both
    assert both.count(f"error: cannot resume from {x / 'ckpt' / _ckpt(STEPS)}: dcp: Size mismatch ") == 1, both
    assert "saved torch.Size([400, 16]) and current: torch.Size([400, 8]) for model_0.tables.user.weight" in both, both
    assert "[rank0]: Traceback" not in both and "[rank1]: Traceback" not in both, both


def test_the_fsdp_launch_config_without_fsdp2_is_refused(tmp_path):
    r = _accelerate_fsdp2(tmp_path / "x", "--max-steps", "1")
    assert r.returncode != 0, r.stdout + r.stderr
    assert r.stderr.count("error: the launch config turns on accelerate's FSDP (distributed_type: FSDP) but "
                          "--fsdp2 is not given") == 1, r.stderr
    assert not (tmp_path / "x" / "ckpt").exists()   # refused before any work
