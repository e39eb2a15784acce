"""Ranks that call different collectives, fail in update_mask with any exception, or wait
past the backstop timeout: the same outcome on every rank, never a gloo abort or a hang."""

from __future__ import annotations

import pytest

import out_of_step_fns
from launcher import run_ranks

JOB_TIMEOUT = 60
FAST_SECONDS = 30  # far below the 300 s backstop: proves no rank waited for it (not a speed target)


@pytest.mark.parametrize("case, names", [
    ("skip_scheduler_step", ["LinearScheduler.step()", "DataNormSparsifier.step()"]),
    ("skip_sparsifier_step", ["DataNormSparsifier.step()", "LinearScheduler.step()"]),
    ("save_while_step", ["DataNormSparsifier.step()", "save_checkpoint"]),
    ("load_while_schedule", ["LinearScheduler.step()", "load_checkpoint"]),
])
@pytest.mark.parametrize("world_size", [2, 3], ids=lambda ws: f"ws{ws}")
def test_ranks_in_different_collectives_raise_rank_disagreement_naming_both_calls(tmp_path, world_size, case, names):
    results = run_ranks(out_of_step_fns.different_operations, world_size, case, str(tmp_path),
                        timeout=JOB_TIMEOUT)
    for rank, res in enumerate(results):
        assert res["raised"] and res["error_type"] == "RankDisagreementError", (rank, res)
        assert all(name in res["message"] for name in names), (rank, res["message"])
        assert res["seconds"] < FAST_SECONDS
        assert res["unchanged"], f"rank {rank} changed state in a refused call"
    # back in step afterwards: identical masks and levels everywhere
    assert len({res["next_digest"] for res in results}) == 1
    assert len({repr(res["next_levels"]) for res in results}) == 1


@pytest.mark.parametrize("kind, error", [("runtime", "RuntimeError"), ("json", "ValueError"),
                                         ("keyerror", "RuntimeError")])
def test_any_exception_in_update_mask_fails_every_rank_fast_naming_the_group(kind, error):
    results = run_ranks(out_of_step_fns.any_exception_in_update_mask, 3, kind, timeout=JOB_TIMEOUT)
    owner = results[0]["owner"]
    for rank, res in enumerate(results):
        assert res["raised"], (rank, res)
        assert "'t1'" in res["message"], (rank, res["message"])
        assert res["seconds"] < FAST_SECONDS, (rank, res["seconds"])
        assert res["unchanged"] and res["step_count"] == 0, (rank, res)
        if rank == owner:
            assert error in res["mro"], (rank, res)
        else:
            assert res["error_type"] == "RemoteError", (rank, res)


def test_a_coordinator_slower_than_the_backstop_leaves_every_rank_unchanged_and_refusing(tmp_path):
    results = run_ranks(out_of_step_fns.slow_coordinator_schedule, 2, str(tmp_path), timeout=240,
                        env={"DISTSPARSE_COLLECTIVE_TIMEOUT": "2"})
    for rank, res in enumerate(results):
        assert res["raised"] and res["error_type"] == "CollectiveTimeoutError", (rank, res)
        assert "Slow.step()" in res["message"], (rank, res["message"])
        assert res["epoch_unchanged"] and res["level_unchanged"], (rank, res)
        assert res["later"]["raised"] and res["later"]["seconds"] < FAST_SECONDS, (rank, res["later"])
        assert "no longer" in res["later"]["message"]
    assert "start of Slow.step()" in results[1]["message"]  # rank 1 gave up waiting for rank 0's values
    # rank 0 passed the start (its values reached nobody) and was then left alone by rank 1
    assert "Slow.step()" in results[0]["message"] and "start of" not in results[0]["message"]


@pytest.mark.parametrize("kind", ["dtensor", "subclass"])
def test_a_tensor_subclass_is_refused_at_add_data_on_every_rank_and_nothing_is_registered(kind):
    results = run_ranks(out_of_step_fns.tensor_subclass_refused, 2, kind, timeout=JOB_TIMEOUT)
    for rank, res in enumerate(results):
        assert res["raised"] and res["error_type"] == "TypeError", (rank, res)
        assert "'sharded.weight'" in res["message"] and "subclass" in res["message"], res["message"]
        assert not res["registered"] and not res["step_raised"], (rank, res)
