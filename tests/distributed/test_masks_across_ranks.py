"""Masks on several gloo ranks: identical where replicated, per rank where local."""

from __future__ import annotations

import pytest
import torch

import rank_fns
from launcher import run_ranks, run_ranks_once

REPLICATED_NAMES = [n for n, *_ in rank_fns.REPLICATED] + [rank_fns.REPLICATED_TENSOR[0]]
LOCAL_NAMES = [n for n, *_ in rank_fns.LOCAL]


def _differences(results, reference_per_rank, names):
    bad = []
    for rank, res in enumerate(results):
        for name in names:
            got, want = res["masks"][name], reference_per_rank[rank][name]
            if got.shape != want.shape or not torch.equal(got.bool(), want.bool()):
                bad.append(f"rank {rank} group {name!r}: {int((got.bool() != want.bool()).sum())} "
                           f"of {want.numel()} elements differ" if got.shape == want.shape else
                           f"rank {rank} group {name!r}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    return bad


def test_replicated_masks_are_identical_on_every_rank(happy_path):
    world_size, results = happy_path
    assert len(results) == world_size
    for name in REPLICATED_NAMES:
        rank0 = results[0]["masks"][name]
        for rank, res in enumerate(results[1:], start=1):
            assert torch.equal(res["masks"][name], rank0), f"group {name!r}: rank {rank} != rank 0"


def test_replicated_masks_equal_the_single_process_masks(happy_path):
    world_size, results = happy_path
    reference = rank_fns.happy_path_reference(world_size)
    assert _differences(results, reference, REPLICATED_NAMES) == []


def test_local_groups_get_masks_computed_from_each_ranks_own_data(happy_path):
    world_size, results = happy_path
    reference = rank_fns.happy_path_reference(world_size)
    assert _differences(results, reference, LOCAL_NAMES) == []
    if world_size > 1:  # the data really differed, so identical masks would be a bug
        for name in LOCAL_NAMES:
            masks = [res["masks"][name] for res in results]
            assert any(not torch.equal(masks[0], m) for m in masks[1:]), name


def test_masks_are_bool_tensors_on_the_datas_device(happy_path):
    _, results = happy_path
    for rank, res in enumerate(results):
        for name in REPLICATED_NAMES + LOCAL_NAMES:
            assert res["mask_dtype"][name] == "torch.bool", (rank, name, res["mask_dtype"][name])
            assert res["mask_device"][name] == res["data_device"][name] == "cpu", (rank, name)


def test_data_groups_hold_the_same_config_on_every_rank(happy_path):
    _, results = happy_path
    for rank, res in enumerate(results[1:], start=1):
        assert res["configs"] == results[0]["configs"], f"rank {rank}"


@pytest.mark.parametrize(("world_size", "n_groups"), [(2, 1), (4, 3), (3, 0)],
                         ids=["ws2-1group", "ws4-3groups", "ws3-no-groups"])
def test_ranks_that_own_no_group_still_step_and_end_with_every_mask(world_size, n_groups):
    results = run_ranks(rank_fns.few_groups, world_size, n_groups)
    names = [n for n, *_ in rank_fns.REPLICATED[:n_groups]]
    owners = results[0]["owners"]
    assert all(res["owners"] == owners for res in results)
    assert set(owners.values()) <= set(range(world_size))
    assert len(set(owners.values())) < world_size  # some rank owns nothing
    entries = [(n, rank_fns.make_data(n, k, s, rank_fns.SEED), c)
               for n, k, s, c in rank_fns.REPLICATED[:n_groups]]
    reference = rank_fns.single_process_masks(entries)
    assert _differences(results, [reference] * world_size, names) == []


def _two_sections(section):
    results = run_ranks_once(rank_fns.local_shapes_and_differing_replicas, 2)
    errors = [res[section]["error"] for res in results if "error" in res[section]]
    assert not errors, "\n".join(errors)
    return [res[section] for res in results]


def test_local_groups_may_have_a_different_shape_on_each_rank():
    results = _two_sections("local_shapes")
    for rank, res in enumerate(results):
        data = rank_fns.make_data("batch.x", "tensor", (4 + rank, 8),
                                  rank_fns.local_seed(rank_fns.SEED, rank))
        name, kind, shape, cfg = rank_fns.REPLICATED[0]
        reference = rank_fns.single_process_masks(
            [(name, rank_fns.make_data(name, kind, shape, rank_fns.SEED), cfg),
             ("batch.x", data, {"sparsity_level": 0.5})])
        assert _differences([res], [reference], [name, "batch.x"]) == []


def test_replicated_true_on_a_plain_tensor_gives_every_rank_its_owners_mask():
    results = _two_sections("differing_replica")
    owner = results[0]["owner"]
    assert all(res["owner"] == owner for res in results)
    owners_copy = rank_fns.make_data("shared.buf", "tensor", (8, 8),
                                     rank_fns.local_seed(rank_fns.SEED, owner))
    reference = rank_fns.single_process_masks([("shared.buf", owners_copy, {"sparsity_level": 0.45})])
    assert _differences(results, [reference] * len(results), ["shared.buf"]) == []
