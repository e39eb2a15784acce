"""The single-file checkpoint of FSDP2 tables on real gloo processes (issue 18 item 2, issue 20
items 3 and 10): pieces streamed to the writer, each rank reading only its own, rank 0 serving
ranks that do not see its file, identical runs giving identical bytes, and geometry mismatches
refused on every rank."""

from __future__ import annotations

import pytest
import torch

import checkpoint_sharded_fns
from launcher import run_ranks

JOB_TIMEOUT = 180


def test_two_identical_fsdp2_runs_write_byte_identical_files_of_per_rank_pieces(tmp_path):
    first = run_ranks(checkpoint_sharded_fns.save_twice_in_two_runs, 2, str(tmp_path), 0, timeout=JOB_TIMEOUT)
    second = run_ranks(checkpoint_sharded_fns.save_twice_in_two_runs, 2, str(tmp_path), 1, timeout=JOB_TIMEOUT)
    assert first[0]["sha"] == first[1]["sha"] == second[0]["sha"] == second[1]["sha"]
    # Each rank's rows are their own piece: no rank assembled the table.
    assert [k for k in first[0]["keys"] if k.endswith("/emb.weight")] == ["piece/0,0/emb.weight",
                                                                         "piece/501,0/emb.weight"]
    assert first[0]["sparsity"] == first[1]["sparsity"]


@pytest.mark.parametrize("view", ["missing", "stale"])
def test_ranks_that_do_not_see_rank_0s_file_get_their_parts_from_rank_0_bit_exact(tmp_path, view):
    saved = run_ranks(checkpoint_sharded_fns.save_twice_in_two_runs, 2, str(tmp_path), 0, timeout=JOB_TIMEOUT)
    loaded = run_ranks(checkpoint_sharded_fns.load_where_ranks_see_different_files, 3, str(tmp_path),
                       "run0.safetensors", [3], view, timeout=JOB_TIMEOUT)
    for res in loaded:
        assert torch.equal(res["emb"], saved[0]["emb"])
        assert res["sparsity"]["emb.weight"] == saved[0]["sparsity"]["emb.weight"]


def test_a_file_of_another_block_shape_is_refused_on_every_rank_unless_config_checkpoint(tmp_path):
    saved = run_ranks(checkpoint_sharded_fns.save_twice_in_two_runs, 2, str(tmp_path), 0, timeout=JOB_TIMEOUT)
    results = run_ranks(checkpoint_sharded_fns.load_with_another_block_shape, 2, str(tmp_path),
                        "run0.safetensors", [2], timeout=JOB_TIMEOUT)
    for res in results:
        assert res["refused"]["raised"] and res["refused"]["error_type"] == "CheckpointError", res
        message = res["refused"]["message"]
        assert "'emb.weight'" in message and "sparse_block_shape=[3, 5]" in message, message
        assert "sparse_block_shape=[2, 2]" in message, message
        assert res["unchanged"]
        assert torch.equal(res["emb"], saved[0]["emb"]) and res["block"] == [3, 5]
