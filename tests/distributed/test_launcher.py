"""The multi-process harness itself: results come back, and failures are loud, fast and named."""

from __future__ import annotations

import time

import pytest
import torch

import rank_fns
from launcher import RankFailure, run_ranks


@pytest.mark.parametrize("world_size", [1, 3])
def test_all_reduce_sums_a_value_over_every_rank_on_one_thread_each(world_size):
    results = run_ranks(rank_fns.all_reduce_sum, world_size, 1.0)
    expected = world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world_size"] == world_size for r in results)
    assert all(r["sum"] == expected for r in results)
    assert all(r["threads"] == 1 for r in results)


def test_arguments_and_results_carry_floats_and_tensors_bit_for_bit():
    arg = {"x": 0.1 + 1e-9, "t": torch.tensor([0.1, float("nan"), -0.0], dtype=torch.float64)}
    results = run_ranks("rank_fns:echo_tensors", 1, arg)
    for r in results:
        assert r["payload"]["x"] == arg["x"]
        assert torch.equal(r["payload"]["t"].view(torch.int64), arg["t"].view(torch.int64))
        assert r["made_here"].dtype == torch.float32
        assert torch.equal(r["made_here"], torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3)
        assert r["mask"].dtype == torch.bool


def test_an_exception_on_one_rank_fails_with_that_ranks_traceback():
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_fns.raise_on_rank, 2, 1)
    msg = str(info.value)
    assert "rank 1: exit code 1" in msg
    assert "ValueError: deliberate failure on rank 1" in msg
    assert "raise_on_rank" in msg  # the traceback's frame


def test_a_hung_rank_is_killed_at_the_job_timeout_and_named_with_its_stack():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_fns.hang_on_rank, 2, 0, timeout=10)
    assert time.monotonic() - start < 45
    msg = str(info.value)
    assert "job timed out after 10s" in msg
    assert "rank 0: HUNG: still running at the 10s job timeout" in msg
    assert "hang_on_rank" in msg  # faulthandler's stack dump of the hung rank


def test_a_rank_killed_by_a_signal_fails_the_job():
    with pytest.raises(RankFailure, match=r"rank 1: killed by signal 9"):
        run_ranks(rank_fns.crash_on_rank, 2, 1)


def test_ranks_still_running_after_another_rank_failed_are_killed_after_the_grace_period():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_fns.raise_on_rank_others_sleep, 2, 0, grace=1, timeout=60)
    assert time.monotonic() - start < 45
    msg = str(info.value)
    assert "deliberate failure on rank 0" in msg
    assert "rank 1: HUNG: still running 1s after rank 0 failed" in msg
