"""The collision rule of save_checkpoint (issue 10 item 4), file by file: a save is refused
only over a file another process group of the *same job* wrote; overwrites by the same
group, older files, other jobs (resumes, other world sizes) go through."""

from __future__ import annotations

from pathlib import Path

import pytest

from _checkpoint_util import build
from distsparse import CheckpointError, save_checkpoint
from distsparse.checkpoint import _check_not_another_group, _existing_writer, _rank_payload, _build_file, \
    _atomic_write


def _write(path: Path, writer: dict | None) -> None:
    sp, _, _ = build(steps=1)
    payload, replicated = _rank_payload(sp, writer=True)
    _atomic_write(path, _build_file([payload], replicated, None, writer=writer))


def test_a_single_process_save_records_its_writer(tmp_path):
    sp, sch, _ = build(steps=1)
    save_checkpoint(tmp_path / "c.safetensors", sp, sch)
    assert _existing_writer(tmp_path / "c.safetensors") == {"group_ranks": [0], "world_size": 1, "job": None}


@pytest.mark.parametrize("existing, refused", [
    ({"group_ranks": [2, 3], "world_size": 4, "job": "job-a"}, True),    # another group, this job
    ({"group_ranks": [0, 1], "world_size": 4, "job": "job-a"}, False),   # this group: an overwrite
    ({"group_ranks": [2, 3], "world_size": 4, "job": "job-b"}, False),   # an earlier job (a resume)
    ({"group_ranks": [0, 1, 2], "world_size": 3, "job": "job-b"}, False),  # another world size
    (None, False),                                                        # a file without a writer
])
def test_only_another_group_of_the_same_job_is_refused(tmp_path, existing, refused):
    path = tmp_path / "c.safetensors"
    _write(path, existing)
    me = {"group_ranks": [0, 1], "world_size": 4, "job": "job-a"}
    if refused:
        with pytest.raises(CheckpointError, match=r"global ranks \[2, 3\].*global ranks \[0, 1\]"):
            _check_not_another_group(path, path, me)
    else:
        _check_not_another_group(path, path, me)
    # Without a job token (no process group store) nothing can be judged: never refused.
    _check_not_another_group(path, path, {**me, "job": None})


def test_a_damaged_or_foreign_file_at_the_path_is_simply_replaced(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"\xff" * 100)
    assert _existing_writer(path) is None
    _check_not_another_group(path, path, {"group_ranks": [0], "world_size": 1, "job": "x"})
