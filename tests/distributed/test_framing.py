"""Operation framing (Comm.begin / finish): on the success path one fixed 16-byte
all-reduce opens and one closes every operation, at every world size; payloads travel in
collectives sized by what they carry; mismatches still fail on every rank, named."""

from __future__ import annotations

import pytest

import framing_fns
from launcher import run_ranks

JOB_TIMEOUT = 60
FRAME_BYTES = 16  # two int64
DECISION_BYTES = 256


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda ws: f"ws{ws}")
def success(request):
    return request.param, run_ranks(framing_fns.success_path, request.param, timeout=JOB_TIMEOUT)


def test_scheduler_step_is_one_frame_and_one_all_reduce_of_its_values_that_commits(success):
    world, results = success
    for rank, res in enumerate(results):
        assert res["scheduler"] == [["all_reduce", FRAME_BYTES], ["all_reduce", DECISION_BYTES]], (rank, res)
    assert len({repr(res["levels"]) for res in results}) == 1


def test_framing_bytes_per_operation_do_not_grow_with_the_world_size(success):
    world, results = success
    ring = 2 * (world - 1) * FRAME_BYTES // world  # what one all-reduce of the frame sends (ring model)
    for rank, res in enumerate(results):
        assert res["scheduler_framing_bytes"] == ring <= 2 * FRAME_BYTES, (rank, res)
        assert res["step_framing_bytes"] == 2 * ring, (rank, res)
        frames = [c for c in res["step"] if c == ["all_reduce", FRAME_BYTES]]
        assert res["step"][0] == ["all_reduce", FRAME_BYTES] and res["step"][-1] == ["all_reduce", FRAME_BYTES]
        assert len(frames) >= 2, (rank, res["step"])


@pytest.fixture(scope="module", params=[2, 3], ids=lambda ws: f"ws{ws}")
def mismatch(request):
    return request.param, run_ranks(framing_fns.mismatches, request.param, timeout=JOB_TIMEOUT)


def test_a_rank_in_finish_meeting_a_rank_in_another_begin_fails_on_every_rank_naming_both(mismatch):
    world, results = mismatch
    for rank, res in enumerate(results):
        case = res["finish_vs_begin"]
        assert case["raised"] and case["error_type"] == "RankDisagreementError", (rank, case)
        assert "rank 0: <finish> A (distsparse call #1)" in case["message"], case["message"]
        for other in range(1, world):
            assert f"rank {other}: B (distsparse call #2)" in case["message"], case["message"]
        assert case["seconds"] < 10


def test_inline_payloads_of_any_length_reach_every_rank(mismatch):
    world, results = mismatch
    expected = [list(bytes(range(r * 3 % 256)) * (r + 1)) for r in range(world)]
    for rank, res in enumerate(results):
        assert res["inline"] == expected, rank
        assert res["empty_inline"] == [[]] * world, rank
        odd = res["inline_on_rank_0_only"]
        assert odd["raised"] and odd["error_type"] == "RankDisagreementError", (rank, odd)
        assert "only rank(s) [0]" in odd["message"], odd["message"]


def test_a_decided_value_over_4_kib_from_rank_1_and_its_error_reach_every_rank(mismatch):
    _, results = mismatch
    for rank, res in enumerate(results):
        assert res["decided_equal"], rank
        err = res["decided_error"]
        assert err["raised"] and "no decision from rank 1" in err["message"], (rank, err)
        assert err["error_type"] == ("ValueError" if rank == 1 else "RemoteError"), (rank, err)


def test_one_ranks_error_makes_every_rank_raise_and_the_comm_stays_usable(mismatch):
    _, results = mismatch
    for rank, res in enumerate(results):
        err = res["any_failed"]
        assert err["raised"] and "rank 1's disk is full" in err["message"], (rank, err)
        assert err["error_type"] == ("OSError" if rank == 1 else "RemoteError"), (rank, err)
        assert res["usable"], rank


# -- a step whose every mask comes from the rank's own data: one collective in all ---------------


@pytest.mark.parametrize("world_size", [2, 3], ids=lambda ws: f"ws{ws}")
def test_a_step_computed_from_every_ranks_own_data_is_one_16_byte_all_reduce(world_size):
    results = run_ranks(framing_fns.one_round_step, world_size, timeout=JOB_TIMEOUT)
    ring = 2 * (world_size - 1) * FRAME_BYTES // world_size
    for rank, res in enumerate(results):
        assert res["kind"] == "everywhere", res
        assert res["step"] == [["all_reduce", FRAME_BYTES]], (rank, res["step"])
        assert res["framing_bytes"] == ring and res["bytes_sent"] == 0, (rank, res)
        assert res["single_process"] == {"table": True, "batch": True}, (rank, res)


def test_a_one_round_step_meeting_another_call_or_description_fails_on_every_rank_naming_it():
    results = run_ranks(framing_fns.one_round_mismatches, 2, timeout=JOB_TIMEOUT)
    assert [res["kind"] for res in results] == ["everywhere"] * 2
    assert results[1]["kinds_by_rank"] == "split"  # rank 1 would split: another protocol, same first collective
    for rank, res in enumerate(results):
        case = res["step_vs_scheduler"]
        assert case["raised"] and case["error_type"] == "RankDisagreementError", (rank, case)
        assert "rank 0: DataNormSparsifier.step() (distsparse call #" in case["message"], case["message"]
        assert "rank 1: LinearScheduler.step()" in case["message"], case["message"]
        assert case["seconds"] < 10
        case = res["differing_description"]
        assert case["raised"] and case["error_type"] == "RankDisagreementError", (rank, case)
        assert "min_split_elements" in case["message"], case["message"]
        assert res["unchanged"], rank
