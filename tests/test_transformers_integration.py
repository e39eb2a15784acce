"""transformers.Trainer callback (distsparse.integrations.transformers): steps and squashes
after optimizer steps, writes the state into every checkpoint-<step> folder, resumes it
exactly, logs per-group sparsity; 1 process in-process and 2 processes under torchrun; FSDP2
sharded tables (hooks driven on 2 gloo ranks): adopted, logged without collectives, resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

import distsparse
import fsdp2_fns
from _trainer_job import digest, model, run, sparsity, summary, trainer
from distsparse.integrations.transformers import STATE_FILENAME, DataSparsityCallback
from launcher import run_ranks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 8-step run, and the same run stopped at step 4 then resumed."""
    out = tmp_path_factory.mktemp("trainer")
    full = summary(*run(str(out / "full")))
    part = summary(*run(str(out / "resumed"), stop_at=4))
    resumed = summary(*run(str(out / "resumed"), resume=True))
    return out, full, part, resumed


def test_resume_from_checkpoint_continues_masks_schedule_and_weights_exactly(runs):
    out, full, part, resumed = runs
    assert part["global_step"] == 4 and part["step_count"] == 2  # stopped mid-ramp
    assert part["masks"] != full["masks"]
    assert resumed["restored_from"] == str(out / "resumed" / "checkpoint-4")
    assert full["step_count"] == 4 and full["scheduler"]["last_epoch"] == 4 and full["weights_match_masks"]
    for key in ("masks", "weights", "step_count", "scheduler", "global_step", "logged"):
        assert resumed[key] == full[key], key


def test_every_checkpoint_folder_holds_the_state_file_of_its_step(runs):
    out = runs[0]
    for step, count in ((4, 2), (8, 4)):
        sp, sch = sparsity(model())
        distsparse.load_checkpoint(out / "full" / f"checkpoint-{step}" / STATE_FILENAME, sp, sch)
        assert sp.step_count == count and sch.last_epoch == count


def test_per_group_sparsity_is_in_the_logs_and_the_saved_log_history(runs):
    out, full = runs[0], runs[1]
    logged = full["logged"]
    assert [e["step"] for e in logged] == [2, 4, 6, 8]
    assert len([k for k in logged[0] if k.startswith("sparsity/")]) == 10  # every 2-D parameter
    assert logged[0]["sparsity/transformer.wte.weight"] == pytest.approx(26 / 256)  # round(0.1 * 256 blocks)
    saved = json.loads((out / "full" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert saved[-1]["sparsity/transformer.wte.weight"] == logged[1]["sparsity/transformer.wte.weight"]


def test_resume_from_a_checkpoint_without_state_file_says_so(runs, tmp_path):
    shutil.copytree(runs[0] / "full" / "checkpoint-4", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / STATE_FILENAME).unlink()
    net = model()
    sp, sch = sparsity(net)
    t = trainer(str(tmp_path), [DataSparsityCallback(sp, sch, every_n_steps=2)], net)
    with pytest.raises(distsparse.CheckpointNotFoundError, match="resumed at step 4 but .*does not exist"):
        t.train(resume_from_checkpoint=True)
    assert sp.step_count == 0


def test_a_folder_outside_output_dir_is_named_to_the_callback(runs, tmp_path):
    elsewhere = runs[0] / "full" / "checkpoint-4"
    net = model()
    sp, sch = sparsity(net)
    cb = DataSparsityCallback(sp, sch, every_n_steps=2, resume_from_checkpoint=elsewhere)
    t = trainer(str(tmp_path / "new"), [cb], net)
    t.train(resume_from_checkpoint=str(elsewhere))
    assert summary(t, cb)["masks"] == runs[1]["masks"] and cb.restored_from == str(elsewhere)


def test_every_n_steps_and_bad_arguments(tmp_path):
    t, cb = run(str(tmp_path), every_n_steps=3)
    assert t.state.global_step == 8 and cb.sparsifier.step_count == 2  # after steps 3 and 6
    sp, sch = sparsity(model())
    with pytest.raises(ValueError, match="every_n_steps must be a positive int, got 0"):
        DataSparsityCallback(sp, sch, every_n_steps=0)
    with pytest.raises(ValueError, match="plain file name"):
        DataSparsityCallback(sp, sch, filename="a/b.safetensors")
    other, _ = sparsity(model())
    with pytest.raises(ValueError, match="scheduler schedules another sparsifier"):
        DataSparsityCallback(other, sch)


def test_two_processes_under_torchrun_share_masks_and_resume_exactly(tmp_path):
    """Trainer(use_cpu=True) under torchrun: 2 gloo ranks; see tests/_trainer_job.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_trainer_job.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # masks, weights, schedule and logs identical on both ranks
    full, resumed = r0["full"], r0["resumed"]
    assert full["owners"] == [0, 1] and full["weights_match_masks"]  # both ranks compute masks
    assert full["step_count"] == 4 and r0["part"]["step_count"] == 2
    assert resumed["restored_from"] == str(tmp_path / "resumed" / "checkpoint-4")
    for key in ("masks", "weights", "step_count", "scheduler", "global_step", "logged"):
        assert resumed[key] == full[key], key
    assert "the Trainer runs 2 process(es) but the sparsifier's process group has 1 rank(s)" in r0["wrong_world"]
    sp, sch = sparsity(model())
    distsparse.load_checkpoint(tmp_path / "full" / "checkpoint-8" / STATE_FILENAME, sp, sch)  # on 1 process
    assert sp.step_count == 4 and {n: digest(sp.get_mask(n)) for n in sp.data_groups} == full["masks"]


def test_the_trainer_example_trains_and_resumes(tmp_path, monkeypatch, capsys):
    import runpy

    script = str(REPO / "examples" / "hf_trainer_sparsity.py")
    for steps in ("10", "15"):
        monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path), "--max-steps", steps])
        runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert "world_size=1 global_step=10 sparsifier steps=2 resumed from=None" in out
    assert f"world_size=1 global_step=15 sparsifier steps=3 resumed from={tmp_path / 'checkpoint-10'}" in out


def test_fsdp2_sharded_tables_are_adopted_logged_without_collectives_saved_and_resumed(tmp_path):
    """The Trainer shards the model inside train() (accelerate's FSDP2; on CPU accelerate does
    no FSDP, so the hooks are driven as the Trainer calls them, on 2 gloo ranks with fully_shard)."""
    results = run_ranks(fsdp2_fns.trainer_callback_on_fsdp2, 2, str(tmp_path), timeout=120)
    for res in results:
        assert res["adopted"] and res["placements"] == "(Shard(dim=0),)", res
        assert res["mask_is_reference"] and res["zeros_squashed"], res
        assert res["old_way_collectives"] > 0  # mask.float().mean() of a DTensor mask all-reduces
        assert res["restored_from"] == str(tmp_path / "checkpoint-3")
        assert res["resumed_equal"] and res["resumed_schedule"], res
    logged = results[0]  # rank 0 logged alone: no collective, sparsity() figures in logs and history
    assert logged["log_collectives"] == 0
    expected = {f"sparsity/{n}": v for n, v in logged["sparsity_at_log"].items()}
    assert {k: v for k, v in logged["logs"].items() if k != "loss"} == expected
    assert {k: v for k, v in logged["log_history"].items() if k.startswith("sparsity/")} == expected
    assert "logs" not in results[1]
