"""Ranks that disagree, or data that cannot be sparsified, fail fast on every rank, naming the group."""

from __future__ import annotations

import pytest

import group_and_timeout_fns
import rank_fns
from launcher import run_ranks

# Generous for 2 slow cores, far below the 30 s collective timeout a hang would hit.
FAST_SECONDS = 30  # far below the 300 s backstop: proves no rank waited for it (not a speed target)
JOB_TIMEOUT = 45


def _assert_every_rank_raised(results, error_types, name):
    for rank, res in enumerate(results):
        assert res["raised"], f"rank {rank} did not raise: {res}"
        assert set(error_types) & set(res["mro"]), f"rank {rank} raised {res['error_type']}: {res['message']}"
        assert name in res["message"], f"rank {rank}'s message does not name {name!r}: {res['message']}"
        assert res["seconds"] < FAST_SECONDS, f"rank {rank} took {res['seconds']:.1f}s to fail"


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda ws: f"ws{ws}")
def test_an_extra_group_on_one_rank_fails_on_every_rank_naming_the_group(world_size):
    results = run_ranks(rank_fns.diverging_ranks, world_size, "extra_group", world_size - 1,
                        timeout=JOB_TIMEOUT)
    _assert_every_rank_raised(results, ["RuntimeError"], "extra.weight")


@pytest.mark.parametrize("world_size", [3], ids=lambda ws: f"ws{ws}")
def test_a_different_shape_on_one_rank_fails_on_every_rank_naming_the_group(world_size):
    results = run_ranks(rank_fns.diverging_ranks, world_size, "shape", 0, timeout=JOB_TIMEOUT)
    _assert_every_rank_raised(results, ["RuntimeError"], "layer2.weight")


@pytest.mark.parametrize("world_size", [2], ids=lambda ws: f"ws{ws}")
def test_a_different_config_on_one_rank_fails_on_every_rank_naming_the_group(world_size):
    results = run_ranks(rank_fns.diverging_ranks, world_size, "config", 1, timeout=JOB_TIMEOUT)
    _assert_every_rank_raised(results, ["RuntimeError"], "layer2.weight")


@pytest.mark.parametrize("world_size", [2], ids=lambda ws: f"ws{ws}")
def test_nan_in_a_replicated_group_owned_by_rank_1_fails_on_every_rank_naming_the_group(world_size):
    results = run_ranks(rank_fns.nan_in_group_owned_by_rank1, world_size, False, timeout=JOB_TIMEOUT)
    nan_group = results[0]["nan_group"]
    assert all(res["nan_group"] == nan_group for res in results)
    _assert_every_rank_raised(results, ["ValueError", "RuntimeError"], nan_group)


def test_nan_only_in_the_owners_copy_still_fails_on_every_rank_naming_the_group():
    results = run_ranks(rank_fns.nan_in_group_owned_by_rank1, 3, True, timeout=JOB_TIMEOUT)
    nan_group = results[0]["nan_group"]
    _assert_every_rank_raised(results, ["ValueError", "RuntimeError"], nan_group)


def test_a_rank_that_skips_step_makes_the_others_raise_after_the_collective_timeout(tmp_path):
    results = run_ranks(group_and_timeout_fns.rank1_skips_a_step, 2, str(tmp_path), timeout=240,
                        env={"DISTSPARSE_COLLECTIVE_TIMEOUT": "2"})
    waited = results[0]
    assert waited["error"] is not None, "rank 0 returned from step() without rank 1"
    assert "waited more than 2 s" in waited["error"] and "skipped a collective" in waited["error"]
    assert waited["seconds"] > 1.5  # the backstop, not rank 1's exit (rank 1 waits for rank 0)
    assert results[1] == {"skipped": True}
