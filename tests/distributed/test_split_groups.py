"""A big replicated group is computed in row ranges by every rank, with an exact global
selection: masks identical on every rank and equal to the single-process mask, ties included."""

from __future__ import annotations

import pytest

import split_groups_fns
from launcher import run_ranks

JOB_TIMEOUT = 90


def _check(results, world_size):
    for res in results:
        assert res["assignment"] == results[0]["assignment"]
        for step in res["steps"]:
            for name, facts in step.items():
                assert facts["equals_single_process"], (name, facts)
    for i in range(len(results[0]["steps"])):  # identical on every rank
        assert len({repr(res["steps"][i]) for res in results}) == 1
    ranges = results[0]["assignment"]
    if world_size > 1:
        assert len(ranges) == world_size, ranges  # the big table is shared by every rank
        bounds = sorted(tuple(v) for v in ranges.values())
        assert bounds[0][0] == 0 and bounds[-1][1] == 389
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    else:
        assert ranges == {"0": [0, 389]}


# Data kinds (tie-free, ties with zeros_per_block, all equal, repeated rows) x block shapes, shared by the tests below.
DATA_CASES = [
    ("random", 0.5, [1, 4], None),
    ("few_values", 0.37, [2, 2], 2),
    ("constant", 0.5, [3, 5], None),
    ("repeated_rows", 0.61, [1, 4], 3),
]
DATA_IDS = ["random-1x4", "ties-2x2-zpb2", "constant-3x5", "repeated-rows-zpb3"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4], ids=lambda ws: f"ws{ws}")
@pytest.mark.parametrize("kind, level, block, zeros", DATA_CASES, ids=DATA_IDS)
def test_one_big_table_and_small_ones_give_the_single_process_masks_on_every_rank(world_size, kind, level,
                                                                                  block, zeros):
    results = run_ranks(split_groups_fns.split_and_small_groups, world_size, kind, level, block, zeros, 5,
                        timeout=JOB_TIMEOUT)
    _check(results, world_size)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_split_groups_of_every_float_dtype_give_the_single_process_masks(dtype):
    results = run_ranks(split_groups_fns.split_and_small_groups, 3, "few_values", 0.5, [1, 4], None, 2, dtype,
                        timeout=JOB_TIMEOUT)
    _check(results, 3)


def test_nan_in_one_ranks_rows_of_a_split_group_fails_every_rank_and_changes_no_mask():
    results = run_ranks(split_groups_fns.nan_in_one_ranks_rows, 2, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and "'big'" in res["message"], res
        assert res["unchanged"], res
        assert res["seconds"] < 30
    owner_of_row_380 = next(int(r) for r, (a, b) in results[0]["ranges"].items() if a <= 380 < b)
    assert "ValueError" in results[owner_of_row_380]["mro"]
    assert results[1 - owner_of_row_380]["error_type"] == "RemoteError"


# -- the default plan (issue 22 item 5): small tables computed on every rank, big ones split ---------


def _check_default(results, world_size):
    for i in range(len(results[0]["steps"])):
        assert len({repr(res["steps"][i]) for res in results}) == 1  # identical on every rank
        for name, facts in results[0]["steps"][i].items():
            assert facts["equals_single_process"], (i, name, facts)
    assert all(res["kinds"] == results[0]["kinds"] for res in results)


@pytest.mark.parametrize("world_size", [2, 3], ids=lambda ws: f"ws{ws}")
@pytest.mark.parametrize("kind, level, block, zeros", DATA_CASES, ids=DATA_IDS)
def test_one_table_is_computed_on_every_rank_and_no_mask_travels(world_size, kind, level, block, zeros):
    results = run_ranks(split_groups_fns.default_plan_groups, world_size, [(389, 37)], kind, level, block, zeros,
                        timeout=JOB_TIMEOUT)
    _check_default(results, world_size)
    assert results[0]["kinds"] == {"t0": "everywhere"}
    # The closing all-gather carries a status byte and one 8-byte digest: no mask bytes.
    assert all(sent <= 9 * (world_size - 1) for res in results for sent in res["bytes_sent"]), results[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_every_rank_computing_a_mix_of_tables_gives_the_single_process_masks(dtype):
    # 3 tables at world 2: t0 and t2 on one rank, t1 on the other, which computes t2 too (no time lost).
    results = run_ranks(split_groups_fns.default_plan_groups, 2, [(201, 37), (201, 37), (199, 37)], "few_values",
                        0.5, [1, 4], None, dtype, timeout=JOB_TIMEOUT)
    _check_default(results, 2)
    assert results[0]["kinds"] == {"t0": "whole", "t1": "whole", "t2": "everywhere"}


def test_replicas_that_differ_end_with_the_owners_mask_on_every_rank():
    results = run_ranks(split_groups_fns.differing_replicas, 2, timeout=JOB_TIMEOUT)
    assert [res["kind"] for res in results] == ["everywhere"] * 2
    for res in results:
        assert not res["raised"], res
        assert res["equals_owners_copy"], res
    assert results[0]["digest"] == results[1]["digest"]


@pytest.mark.parametrize("nan_on_rank", [0, 1])
def test_nan_in_one_ranks_copy_of_an_everywhere_group_fails_every_rank_naming_it(nan_on_rank):
    results = run_ranks(split_groups_fns.differing_replicas, 2, nan_on_rank, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and "'shared'" in res["message"], res
        assert res["unchanged"], res
    assert "ValueError" in results[nan_on_rank]["mro"]
    assert results[1 - nan_on_rank]["error_type"] == "RemoteError"


@pytest.mark.parametrize("world_size", [2, 3], ids=lambda ws: f"ws{ws}")
@pytest.mark.parametrize("kind, level, block, zeros, dtype", [
    ("few_values", 0.37, [3, 4], 2, "float32"),
    ("repeated_rows", 0.5, [1, 4], None, "float64"),
], ids=["ties-3x4-zpb2-f32", "repeated-rows-1x4-f64"])
def test_a_split_table_runs_the_fused_kernel_on_its_rows(world_size, kind, level, block, zeros, dtype):
    # 1,600,003 x 4 (ragged block rows), split by the size rule (the cost model splits from ~62M elements at
    # world 2: tests/test_planner.py); each rank runs the fused kernel on its rows.
    results = run_ranks(split_groups_fns.default_plan_groups, world_size, [(1_600_003, 4), (50, 12)], kind, level,
                        block, zeros, dtype, 2, 1 << 20, timeout=JOB_TIMEOUT)
    _check_default(results, world_size)
    assert results[0]["kinds"]["t0"] == "split" and results[0]["fused"]["t0"]


# -- the one-read shard kernel (issue 22 item 5): (1,4) float32 / (1,8) float64 whole blocks, >= 2**18 blocks ----

# 65,539 x 16 float32 (262,156 blocks of (1,4)) and 131,075 x 16 float64 (262,150 of (1,8)): ragged row ranges.
ONE_READ_TABLES = {"float32": ([65_539, 16], [1, 4]), "float64": ([131_075, 16], [1, 8])}
LEVELS = [0.5, 0.07, 0.93]


def _check_one_read(results, world_size, steps=len(LEVELS)):
    for res in results:
        assert len(res["ranges"]) == world_size, res["ranges"]  # split over every rank
        assert len(res["steps"]) == steps
        for step in res["steps"]:
            assert step["equals_torch_path"] and step["equals_world_1"], step
    for i in range(steps):
        assert len({res["steps"][i]["digest"] for res in results}) == 1  # identical on every rank


@pytest.mark.parametrize("world_size", [2, 3], ids=lambda ws: f"ws{ws}")
@pytest.mark.parametrize("dtype, norm", [("float32", "L1"), ("float64", "L2")])
def test_a_split_table_in_one_read_per_rank_gives_the_single_process_masks(world_size, dtype, norm):
    shape, block = ONE_READ_TABLES[dtype]
    results = run_ranks(split_groups_fns.one_read_split, world_size, shape, dtype, block, norm, LEVELS,
                        timeout=JOB_TIMEOUT)
    _check_one_read(results, world_size)
    for res in results:  # one read per step, no fallback
        assert res["made"] == {"one_read": len(LEVELS), "one_read_missed": 0, "three_pass": 0}, res["made"]
        # the status carries 3 counts per group: the step's all-reduces move less than the 2**15-bin
        # int64 histogram alone did (256 KiB)
        assert all(step["selection_bytes"] < 8 * 2**15 for step in res["steps"]), res["steps"]
        # whole (1,4)/(1,8) blocks pruned: the rows travel as one bit per block (to each other rank), a
        # quarter / an eighth of the one bit per element that this rank's share of the rows would take
        element_bits_sent = shape[0] * shape[1] // 8 // world_size * (world_size - 1)
        for step in res["steps"]:
            assert step["bytes_sent"] - step["selection_bytes"] < element_bits_sent // 3, (step, element_bits_sent)


def test_blocks_tied_at_the_cut_in_every_ranks_rows_go_to_the_lowest_indices_in_one_read():
    shape, block = ONE_READ_TABLES["float32"]
    results = run_ranks(split_groups_fns.one_read_split, 3, shape, "float32", block, "L1", LEVELS, "rounded",
                        timeout=JOB_TIMEOUT)
    _check_one_read(results, 3)
    for res in results:
        assert res["made"] == {"one_read": len(LEVELS), "one_read_missed": 0, "three_pass": 0}, res["made"]


def test_a_cut_among_many_zero_rows_takes_the_three_passes_on_every_rank():
    shape, block = ONE_READ_TABLES["float32"]
    results = run_ranks(split_groups_fns.one_read_split, 2, shape, "float32", block, "L1", [0.5, 0.3], "zero_rows",
                        timeout=JOB_TIMEOUT)
    _check_one_read(results, 2, steps=2)
    for res in results:  # the sample puts 60 % of the blocks in the bracket: no read, then the three passes
        assert res["made"] == {"one_read": 2, "one_read_missed": 2, "three_pass": 2}, res["made"]


@pytest.mark.parametrize("world_size, miss", [(3, "bracket"), (2, "cap_on_rank1")])
def test_a_missed_bracket_makes_every_rank_fall_back_to_the_same_masks(world_size, miss):
    shape, block = ONE_READ_TABLES["float32"]
    results = run_ranks(split_groups_fns.one_read_split, world_size, shape, "float32", block, "L2", [0.5],
                        "random", miss, timeout=JOB_TIMEOUT)
    _check_one_read(results, world_size, steps=1)
    for rank, res in enumerate(results):
        assert res["made"]["one_read"] == 1 and res["made"]["three_pass"] == 1, (rank, res["made"])
        # "cap_on_rank1": rank 1 alone overflowed; the summed status sends every rank to the three passes
        assert res["made"]["one_read_missed"] == int(miss == "cap_on_rank1" and rank == 1), (rank, res["made"])


def test_nan_in_one_ranks_rows_of_a_one_read_split_fails_every_rank_and_changes_no_mask():
    shape, block = ONE_READ_TABLES["float32"]
    results = run_ranks(split_groups_fns.one_read_split, 2, shape, "float32", block, "L1", [0.5], "random", None,
                        [65_000, 5], timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and "'big'" in res["message"], res
        assert res["unchanged"], res
        assert res["made"] == {"one_read": 1, "one_read_missed": 0, "three_pass": 0}, res["made"]
    owner = next(int(r) for r, (a, b) in results[0]["ranges"].items() if a <= 65_000 < b)
    assert "ValueError" in results[owner]["mro"] and "row 65000" in results[owner]["message"]
    assert results[1 - owner]["error_type"] == "RemoteError"
