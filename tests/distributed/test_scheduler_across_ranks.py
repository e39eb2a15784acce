"""The data scheduler on several ranks: rank 0 decides, every rank applies it bit for bit."""

from __future__ import annotations

import struct

import pytest
import torch

import rank_fns
from launcher import run_ranks


def _bits(x: float) -> str:
    return struct.pack("<d", x).hex()


def test_every_rank_holds_rank_0s_scheduled_levels_bit_for_bit(scheduled):
    world_size, results = scheduled
    calls = results[0]["calls"]  # what rank 0's get_schedule_param returned, per step
    assert len(calls) == 3
    for rank, res in enumerate(results):
        for epoch, record in enumerate(res["records"]):
            expected = calls[epoch]
            assert set(record["levels"]) == set(expected), (rank, epoch)
            for name, value in expected.items():
                got = record["levels"][name]
                assert record["level_types"][name] == "float", (rank, epoch, name)
                assert _bits(got) == _bits(value), (
                    f"rank {rank} epoch {epoch} group {name!r}: data_groups level {got!r} "
                    f"!= rank 0's {value!r}")


def test_get_last_param_returns_rank_0s_values_on_every_rank(scheduled):
    _, results = scheduled
    calls = results[0]["calls"]
    for rank, res in enumerate(results):
        for epoch, record in enumerate(res["records"]):
            assert record["last_epoch"] == epoch, (rank, epoch)
            for name, value in calls[epoch].items():
                assert _bits(record["last_param"][name]) == _bits(value), (rank, epoch, name)


def test_only_rank_0_calls_get_schedule_param(scheduled):
    _, results = scheduled
    for rank, res in enumerate(results[1:], start=1):
        assert res["calls"] == [], f"rank {rank} called get_schedule_param {len(res['calls'])} times"


def test_scheduled_masks_are_identical_on_every_rank_and_follow_the_levels(scheduled):
    world_size, results = scheduled
    calls = results[0]["calls"]
    for epoch in range(3):
        entries = [(n, rank_fns.make_data(n, k, s, rank_fns.SEED),
                    {**c, "sparsity_level": calls[epoch][n]}) for n, k, s, c in rank_fns.SCHEDULED]
        reference = rank_fns.single_process_masks(entries)
        for rank, res in enumerate(results):
            for name, want in reference.items():
                got = res["records"][epoch]["masks"][name]
                assert torch.equal(got.bool(), want.bool()), (rank, epoch, name)


@pytest.mark.parametrize(
    ("world_size", "raise_at_call"),
    [(1, 1), (4, 1), (2, 0)],
    ids=["ws1-at-step", "ws4-at-step", "ws2-in-constructor"],
)
def test_an_exception_in_rank_0s_get_schedule_param_raises_on_every_rank(world_size, raise_at_call):
    results = run_ranks(rank_fns.scheduler_raising_on_rank0, world_size, raise_at_call, timeout=45)
    for rank, res in enumerate(results):
        assert res["raised"], f"rank {rank} did not raise: {res}"
        assert {"ValueError", "RuntimeError"} & set(res["mro"]), (rank, res["mro"])
        assert f"boom from rank 0 at call {raise_at_call}" in res["message"], (rank, res["message"])
        assert res["seconds"] < 30, (rank, res["seconds"])
