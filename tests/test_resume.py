"""A run checkpointed at step k and resumed in fresh processes matches an uninterrupted run
at every later step: masks bit for bit, schedule values and configs — on one process, on
the same number of ranks, and on fewer or more ranks (local masks then start fresh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _resume_job

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
from launcher import run_ranks  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS, SAVE_AT = 9, 4


def _subprocess_resume(path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(HERE / "_resume_job.py"), "resume", str(path), str(STEPS),
                           str(SAVE_AT)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _same_except_local(a: dict, b: dict) -> None:
    assert a["t"] == b["t"]
    assert a["levels"] == b["levels"], a["t"]
    assert a["configs"] == b["configs"], a["t"]
    assert (a["epoch"], a["step_count"]) == (b["epoch"], b["step_count"])
    for name in _resume_job.REPLICATED:
        assert a["masks"][name] == b["masks"][name], (a["t"], name)


def test_a_resumed_single_process_run_matches_the_uninterrupted_run_at_every_later_step(tmp_path):
    path = tmp_path / "step4.safetensors"
    reference = _resume_job.full(str(path), STEPS, SAVE_AT)
    resumed = _subprocess_resume(path)
    assert resumed["pending_before_add"] and not resumed["warnings"]
    assert resumed["at_resume"] == reference[SAVE_AT - 1]  # local batch mask included
    assert resumed["records"] == reference[SAVE_AT:]
    # The schedule really moved over the resumed steps (the test is not vacuous).
    levels = [r["levels"]["emb.weight"] for r in reference]
    assert len(set(levels[SAVE_AT:])) > 1 and levels[-1] == pytest.approx(0.85)


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume2")
    path = folder / "step4.safetensors"
    per_rank = run_ranks(_resume_job.full, 2, str(path), STEPS, SAVE_AT, timeout=90)
    return path, per_rank


def test_two_ranks_resumed_on_two_ranks_match_every_later_step_local_masks_included(two_rank_reference):
    path, reference = two_rank_reference
    resumed = run_ranks(_resume_job.resume, 2, str(path), STEPS, SAVE_AT, timeout=90)
    for rank in range(2):
        assert not resumed[rank]["warnings"]
        assert resumed[rank]["at_resume"] == reference[rank][SAVE_AT - 1]
        assert resumed[rank]["records"] == reference[rank][SAVE_AT:]
    # Local (per-rank) masks really differ between ranks; replicated ones agree.
    last = [reference[r][-1]["masks"] for r in range(2)]
    assert last[0]["batch"] != last[1]["batch"]
    assert all(last[0][n] == last[1][n] for n in _resume_job.REPLICATED)


@pytest.mark.parametrize("world_size", [1, 3])
def test_two_ranks_resumed_on_another_world_size_match_with_fresh_local_masks_and_a_warning(
        two_rank_reference, world_size):
    path, reference = two_rank_reference
    resumed = run_ranks(_resume_job.resume, world_size, str(path), STEPS, SAVE_AT, timeout=90)
    for rank in range(world_size):
        got = resumed[rank]
        assert any("batch" in w and "start fresh" in w for w in got["warnings"]), got["warnings"]
        assert got["local_mask_fresh"]
        _same_except_local(got["at_resume"], reference[0][SAVE_AT - 1])
        for mine, ref in zip(got["records"], reference[0][SAVE_AT:], strict=True):
            _same_except_local(mine, ref)
            if rank < 2:  # after a step, a local mask depends only on this rank's batch
                assert mine["masks"]["batch"] == reference[rank][mine["t"] - 1]["masks"]["batch"]
