"""TorchRec sharded embedding tables on real gloo processes (CPU, fbgemm-gpu-cpu): row-, column-
(aligned and off the block edges), table- and table-row-wise shards with fused and dense
kernels give every table the single-process mask of its global weight bit for bit (ties,
(1,4), (2,2) and odd blocks), squash_mask's zeros reach the next forward, a scheduled
training loop re-masks after every step, checkpoints move between TorchRec, a single
process, replicated (DDP-style) groups and another TorchRec plan and world size. Tables
sharded in rectangles by hand (RectShards, no TorchRec) cover random layouts."""

from __future__ import annotations

import pytest
import torch

import torchrec_fns
from launcher import run_ranks


JOB_TIMEOUT = 240

CASES = [  # kind, level, block, zeros_per_block
    ["random", 0.5, [1, 4], None],
    ["few_values", 0.37, [2, 2], 2],
    ["few_values", 0.5, [3, 5], None],
    ["constant", 0.61, [2, 3], None],
]


def _check_cases(results):
    for res in results:
        for case in res["cases"]:
            assert case["names"] == sorted(torchrec_fns.TABLES), case
            assert all(case["equal"].values()), case
            assert all(case["sparsity_exact"].values()), case
            assert all(case["forward_zeros"].values()), case


@pytest.mark.parametrize("world_size, kernel", [(2, "fused"), (2, "dense"), (3, "fused"), (3, "dense")],
                         ids=["ws2-fused", "ws2-dense", "ws3-fused", "ws3-dense"])
def test_every_sharding_type_gives_the_single_process_mask_and_the_forward_sees_the_zeros(world_size, kernel):
    results = run_ranks(torchrec_fns.sharding_cases, world_size, kernel, CASES, timeout=JOB_TIMEOUT)
    _check_cases(results)
    layouts = results[0]["layouts"]
    # rank 0 holds two column shards of "cw"; the uneven column shards start off the block edges (dense)
    assert [s[:2] for s in layouts["cw"]] == [[0, 0], [0, 8]], layouts
    if kernel == "dense":
        assert layouts["cwu"] == [[0, 0, 45, 5]], layouts


@pytest.mark.parametrize("kernel", ["fused", "dense"])
def test_training_loop_with_a_scheduler_remasks_every_step(kernel):
    results = run_ranks(torchrec_fns.training_loop, 2, kernel, timeout=JOB_TIMEOUT)
    for res in results:
        assert all(res["equal"]) and all(res["forward_zeros"]), res
        assert res["sparsity"][-1]["rw"] > 0.5, res["sparsity"]
        assert res["sparsity"] == results[0]["sparsity"]  # global figures: the same on every rank
        if kernel == "fused":  # fused Adagrad's momentum1 has the weight's shape: zeroed exactly
            assert res["momentum_zeroed"][-1] and res["momentum_of_pruned_zero"], res


def test_bad_input_is_a_clear_error_naming_it():
    results = run_ranks(torchrec_fns.refusals, 2, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["not_a_module"]["error_type"] == "TypeError" and "nn.Module" in res["not_a_module"]["message"]
        assert res["no_tables"]["error_type"] == "ValueError" and "holds no TorchRec" in res["no_tables"]["message"]
        missing = res["missing_table"]
        assert missing["error_type"] == "ValueError" and "'nope'" in missing["message"], missing
        assert "['rw', 'tw']" in missing["message"], missing
        twins = res["twins"]
        assert twins["error_type"] == "ValueError" and "'a.ebc'" in twins["message"] and "'b.ebc'" in twins["message"]
        assert res["unsupported"]["error_type"] == "TypeError" and "'x'" in res["unsupported"]["message"]
        assert res["module_to_add_data"]["error_type"] == "TypeError"
        assert "add_torchrec_tables" in res["module_to_add_data"]["message"]
        assert res["groups_after_errors"] == [], res
        assert res["twins_named"] == ["a.ebc.t", "b.ebc.t"] and res["only_rw"] == ["rw"]


def test_checkpoints_move_from_torchrec_2_to_single_to_replicated_3_to_torchrec_3_with_another_plan(tmp_path):
    folder = str(tmp_path)
    saved = run_ranks(torchrec_fns.checkpoint_save_torchrec, 2, folder, 0.43, [2, 3], timeout=JOB_TIMEOUT)
    single = run_ranks(torchrec_fns.checkpoint_load_replicated, 1, folder, "torchrec.safetensors",
                       "single.safetensors", timeout=JOB_TIMEOUT)
    ddp = run_ranks(torchrec_fns.checkpoint_load_replicated, 3, folder, "single.safetensors", "ddp.safetensors",
                    timeout=JOB_TIMEOUT)
    back = run_ranks(torchrec_fns.checkpoint_load_torchrec, 3, folder, "ddp.safetensors", timeout=JOB_TIMEOUT)
    direct = run_ranks(torchrec_fns.checkpoint_load_torchrec, 3, folder, "torchrec.safetensors", timeout=JOB_TIMEOUT)
    reference = saved[0]
    for name in torchrec_fns.CKPT_TABLES:
        assert reference[name].any() and not reference[name].all(), name
    sparsity = {n: 1.0 - int(m.sum()) / m.numel() for n, m in reference.items()}
    for res in saved + single + ddp + back + direct:
        for name in torchrec_fns.CKPT_TABLES:
            assert torch.equal(res[name], reference[name]), name
        if "sparsity" in res:
            assert res["sparsity"] == sparsity, res["sparsity"]
    assert back[0]["config"] == [2, 3] and back[0]["dtensor"]


def test_rectangles_dealt_at_random_give_the_single_process_mask():
    # No TorchRec: random row and column cuts (thin, empty, off the block edges) dealt to
    # random ranks (none, one or several rectangles each), ties, partial edge blocks.
    results = run_ranks(torchrec_fns.rect_shards_random, 3, 60, 5, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["failures"] == [], res["failures"][:3]


def test_one_row_rectangles_column_sharded_over_two_ranks_get_the_single_process_mask():
    results = run_ranks(torchrec_fns.rect_one_row_layouts, 2, timeout=JOB_TIMEOUT)
    assert results == [{"1x9": True, "8x9": True}] * 2, results


def test_shards_that_overlap_or_leave_a_gap_fail_the_first_step_on_every_rank():
    results = run_ranks(torchrec_fns.rect_bad_layouts, 2, timeout=JOB_TIMEOUT)
    for res in results:
        assert "shards overlap" in res["overlap"]["message"] and "'bad.table'" in res["overlap"]["message"]
        assert "cover 72 of the table's 80 elements" in res["gap"]["message"], res["gap"]
        for kind in ("overlap", "gap"):
            assert res[kind]["error_type"] == "ValueError" and res[kind]["seconds"] < 30, res[kind]
            assert res[kind]["mask_untouched"], res[kind]


def test_sparsity_of_an_fsdp2_table_is_global_and_exact_without_a_collective(tmp_path):
    results = run_ranks(torchrec_fns.fsdp2_global_sparsity, 2, str(tmp_path), timeout=JOB_TIMEOUT)
    for res in results:
        assert res["initial"] == 0.0 and res["no_collective"], res
        assert res["after_step"] == res["exact"] == res["after_load"] == results[0]["exact"] > 0.3, res
