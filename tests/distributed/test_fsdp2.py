"""FSDP2 (``fully_shard``) and HSDP DTensor groups on real gloo processes: masks computed where
the rows live equal the single-process mask of the whole weight bit for bit (uneven chunks,
straddling blocks, ties), masks are DTensors, zeros reach the next forward, checkpoints
reshard across FSDP2 / replicated / single-process runs, a writer killed during a save leaves
the previous file whole, unsupported layouts are refused."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

import distsparse
import fsdp2_fns
from distsparse.masks import norm_block_mask
from launcher import RankFailure, run_ranks

JOB_TIMEOUT = 120


def _check_masks(results):
    for res in results:
        assert res["returned_dtensor"] and res["get_data_masked_equal"], res
        assert res["state_dict_rows"] and res["state_dict_round_trip"], res
        for step in res["steps"]:
            assert step["emb_equal"] and step["small_equal"], step
            assert step["same_object"] and step["local_dtype"] == "torch.bool", step
            # Besides the selection's counts (histograms: their size depends on the digit width,
            # not on the table), only a few halo rows and status bytes travel — never a mask.
            assert step["selection_bytes"] <= 256 * 1024, step
            assert step["bytes_sent"] - step["selection_bytes"] < 2 * 1024, step


CASES = [  # rows, cols, data, level, block, zeros_per_block
    [1001, 18, "random", 0.5, [1, 4], None],
    [1001, 18, "few_values", 0.37, [2, 2], 2],
    [1001, 18, "few_values", 0.5, [3, 5], None],
    [1001, 18, "constant", 0.61, [2, 2], None],
]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4], ids=lambda ws: f"ws{ws}")
def test_fsdp2_tables_give_the_single_process_mask_of_the_whole_weight(world_size):
    # 1,001 rows: uneven chunks (501/500, 334/334/333, 251/250/250/250), blocks straddling
    # shards; random data, heavy ties (few values) and constant data; (1,4), (2,2), (3,5).
    results = run_ranks(fsdp2_fns.fsdp2_cases, world_size, CASES, [world_size], timeout=JOB_TIMEOUT)
    for case in range(len(CASES)):
        _check_masks([res[case] for res in results])
        assert sum(res[case]["local_rows"][0] for res in results) == 1001


def test_narrow_selection_digits_send_under_64_kib_per_step_and_give_the_same_masks():
    cases = [[4001, 64, "random", 0.5, [1, 4], None], [4001, 64, "few_values", 0.5, [2, 2], None]]
    results = run_ranks(fsdp2_fns.fsdp2_cases, 2, cases, [2], 11, timeout=JOB_TIMEOUT)
    for case in range(len(cases)):
        _check_masks([res[case] for res in results])
        for res in results:
            # Two sharded tables (the embedding and the bag): under 64 KiB each.
            assert all(step["bytes_sent"] < 2 * 64 * 1024 for step in res[case]["steps"]), res[case]["steps"]


def test_tiny_shards_smaller_than_a_block_give_the_single_process_mask():
    # 5 rows on 4 ranks: shards of 2/2/1/0 rows, (3, 5) blocks span up to three shards.
    results = run_ranks(fsdp2_fns.fsdp2_masks, 4, 5, 11, "few_values", 0.5, [3, 5], None, [4], timeout=JOB_TIMEOUT)
    _check_masks(results)


@pytest.mark.parametrize("world_size, mesh", [(2, [1, 2]), (2, [2, 1]), (4, [2, 2])], ids=["1x2", "2x1", "2x2"])
def test_hsdp_replicas_agree_and_give_the_single_process_mask(world_size, mesh):
    results = run_ranks(fsdp2_fns.fsdp2_masks, world_size, 1001, 18, "few_values", 0.37, [2, 2], 2, mesh,
                        timeout=JOB_TIMEOUT)
    _check_masks(results)
    assert results[0]["steps"][0]["placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_3d_dtensor_sharded_on_dim_0_gives_the_single_process_mask(world_size):
    results = run_ranks(fsdp2_fns.three_d_shard0, world_size, 0.5, [2, 3], timeout=JOB_TIMEOUT)
    assert all(r["equal"] for r in results), results


def test_training_loop_zeros_reach_the_next_forward():
    results = run_ranks(fsdp2_fns.training_loop, 2, [2], timeout=JOB_TIMEOUT)
    for res in results:
        assert all(res["zeros_reached_forward"]), res


@pytest.mark.parametrize("kind", ["shard1", "one_dim", "mesh_not_the_group"])
def test_unsupported_dtensor_layouts_are_refused_at_add_data_on_every_rank(kind):
    results = run_ranks(fsdp2_fns.refusals, 2, kind, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and not res["registered"] and not res["step_raised"], res
        assert "'t'" in res["message"] and res["seconds"] < 30, res
    expected = "ValueError" if kind == "mesh_not_the_group" else "TypeError"
    assert results[0]["error_type"] == expected, results[0]
    if kind == "shard1":
        assert "Shard(dim=1)" in results[0]["message"] and "Shard(dim=0)" in results[0]["message"]


@pytest.mark.parametrize("row", [18, 16, 23], ids=["rank2s_first_row", "halo_row", "last_row"])
def test_nan_in_an_fsdp2_shard_is_named_by_its_global_row_on_every_rank(row):
    results = run_ranks(fsdp2_fns.nan_in_a_shard, 3, row, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and "'emb.weight'" in res["message"], res
        assert f"first at row {row}, column 5 of the 2-D view (value nan)" in res["message"], res


def test_ranks_disagreeing_on_a_sharded_groups_global_shape_fail_fast_on_every_rank():
    results = run_ranks(fsdp2_fns.disagreeing_global_shapes, 2, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["raised"] and res["error_type"] == "RankDisagreementError", res
        assert "'t'" in res["message"] and "global_shape" in res["message"] and res["seconds"] < 30, res


def test_checkpoints_reshard_fsdp2_2_to_replicated_3_to_single_to_fsdp2_4(tmp_path):
    folder = str(tmp_path)
    saved = run_ranks(fsdp2_fns.checkpoint_save_sharded, 2, folder, [2], 0.43, timeout=JOB_TIMEOUT)
    ddp = run_ranks(fsdp2_fns.checkpoint_load_replicated, 3, folder, "sp.safetensors", "ddp.safetensors",
                    timeout=JOB_TIMEOUT)
    single = run_ranks(fsdp2_fns.checkpoint_load_replicated, 1, folder, "ddp.safetensors", "single.safetensors",
                       timeout=JOB_TIMEOUT)
    back = run_ranks(fsdp2_fns.checkpoint_load_sharded, 4, folder, "single.safetensors", [4], timeout=JOB_TIMEOUT)
    hsdp = run_ranks(fsdp2_fns.checkpoint_load_sharded, 4, folder, "sp.safetensors", [2, 2], timeout=JOB_TIMEOUT)
    reference = saved[0]
    assert not reference["emb"].all() and reference["emb"].any()
    for res in saved + ddp + single + back + hsdp:
        assert torch.equal(res["emb"], reference["emb"]) and torch.equal(res["small"], reference["small"])


@pytest.mark.parametrize("at", ["mid_write", "before_rename"])
def test_a_writer_killed_during_a_save_leaves_the_previous_file_whole_and_the_next_save_works(tmp_path, at):
    """SIGKILL of the writing rank with half the new file written, or with all of it written
    and fsynced but not renamed: the previous file is byte-for-byte unchanged and loads
    bit-exact (FSDP2 on 3 ranks and a single process); the other rank raises instead of
    hanging; the killed writer's temporary file does not break the next save, which
    removes it."""
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / "sp.safetensors"
    with pytest.raises(RankFailure) as failure:
        run_ranks(fsdp2_fns.kill_during_save, 2, str(tmp_path), at, 0.43, 0.71, timeout=JOB_TIMEOUT, grace=30)
    report = str(failure.value)
    assert "rank 0: killed by signal 9 (SIGKILL)" in report and "--- rank 1: ok" in report, report
    survivor = json.loads((tmp_path / "rank1.json").read_text())
    # The other rank learns of the dead writer from gloo at once ("Connection closed by peer").
    assert survivor["save"]["raised"] and survivor["save"]["seconds"] < 60, survivor
    assert "save_checkpoint" in survivor["save"]["message"], survivor
    assert "crashed or closed its connection" in survivor["save"]["message"], survivor  # not "waited 300 s"
    assert not (tmp_path / "rank0.json").exists()

    # The previous file, untouched; the killed save's temporary file beside it.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == survivor["good_sha"]
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and re.fullmatch(r"\.sp\.safetensors\.tmp-\d+-[0-9a-f]{8}", leftovers[0].name), leftovers
    whole_size = path.stat().st_size  # the new file has the same size: same groups, same shape
    assert (0 < leftovers[0].stat().st_size < whole_size) if at == "mid_write" else \
        leftovers[0].stat().st_size == whole_size

    weight = fsdp2_fns._values("few_values", 1001, 12, 1)
    first = norm_block_mask(weight, 0.43, (3, 5), 15, "L1")
    second = norm_block_mask(weight, 0.71, (3, 5), 15, "L1")
    single = distsparse.DataNormSparsifier(sparse_block_shape=(3, 5))
    single.add_data("emb.weight", torch.nn.Parameter(weight.clone()))
    distsparse.load_checkpoint(str(path), single)
    assert torch.equal(single.get_mask("emb.weight"), first)

    # Next run (another world size): loads the previous masks, saves new ones over them.
    results = run_ranks(fsdp2_fns.load_then_save, 3, str(tmp_path), 0.71, timeout=JOB_TIMEOUT)
    for res in results:
        assert torch.equal(res["loaded"], first) and torch.equal(res["saved"], second)
        assert res["files"] == ["sp.safetensors"], res["files"]
    distsparse.load_checkpoint(str(path), single)
    assert torch.equal(single.get_mask("emb.weight"), second)
