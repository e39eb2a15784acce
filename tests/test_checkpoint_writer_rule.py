"""The collision rule of save_checkpoint (issue 10 item 4), file by file: a save is refused
only over a file another process group of the *same job* wrote; overwrites by the same
group and files of earlier jobs (resumes, other world sizes) go through. Who wrote a path is
claimed in the job's store (the default process group's), never written into the file: two
identical runs write identical bytes (issue 20 item 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from _checkpoint_util import build
from distsparse import CheckpointError, save_checkpoint
from distsparse.checkpoint import _check_not_another_group


def test_a_group_that_claimed_a_path_may_save_to_it_again_and_another_group_of_the_job_may_not(tmp_path):
    store = dist.HashStore()
    path = tmp_path / "c.safetensors"
    _check_not_another_group(path, path, [0, 1], store)
    _check_not_another_group(path, path, [0, 1], store)  # an overwrite by the same group
    with pytest.raises(CheckpointError, match=r"global ranks \[0, 1\].*global ranks \[2, 3\]"):
        _check_not_another_group(path, path, [2, 3], store)
    _check_not_another_group(tmp_path / "other.safetensors", tmp_path / "other.safetensors", [2, 3], store)


def test_a_new_job_replaces_a_file_an_earlier_jobs_other_group_wrote(tmp_path):
    path = tmp_path / "c.safetensors"
    _check_not_another_group(path, path, [2, 3], dist.HashStore())
    _check_not_another_group(path, path, [0, 1], dist.HashStore())  # a fresh store: another job


def test_without_a_store_one_process_never_collides(tmp_path):
    path = tmp_path / "c.safetensors"
    _check_not_another_group(path, path, [2, 3], None)
    _check_not_another_group(path, path, [0, 1], None)


def test_two_identical_runs_write_byte_identical_checkpoint_files(tmp_path):
    files = []
    for run in range(2):
        sp, sch, _ = build(seed=3, steps=2)
        path: Path = tmp_path / f"run{run}.safetensors"
        save_checkpoint(path, sp, sch)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run0.safetensors", "run1.safetensors"]
