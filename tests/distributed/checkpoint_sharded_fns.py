"""Rank functions: the single-file checkpoint of FSDP2 tables without whole-table cost — the
writer streams each rank's pieces, each rank reads only its own (or gets them from rank 0 when
it does not see rank 0's file), identical runs write identical bytes, geometry mismatches are
refused on every rank."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

import distsparse
from fsdp2_fns import _sharded_model
from rank_fns import capture_error


def _sparsifier(world_mesh: list, level: float, block=(3, 5)):
    model = _sharded_model(1001, 12, "few_values", world_mesh)
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=block)
    sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small.weight)
    return sp


def save_twice_in_two_runs(folder: str, run: int) -> dict:
    """One of two identical FSDP2 runs: step, save; returns the file's sha256 and its keys."""
    from safetensors import safe_open

    sp = _sparsifier([dist.get_world_size()], 0.43)
    sp.step()
    path = f"{folder}/run{run}.safetensors"
    distsparse.save_checkpoint(path, sp)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with safe_open(path, framework="pt") as f:
        keys = sorted(f.keys())
    return {"sha": digest, "keys": keys, "emb": sp.get_mask("emb.weight").full_tensor(),
            "sparsity": sp.sparsity()}


def load_where_ranks_see_different_files(folder: str, src: str, world_mesh: list, view: str) -> dict:
    """Rank 0 loads ``folder/src``; the other ranks are given a path where they see no file
    (``view="missing"``) or another, stale checkpoint (``view="stale"``): they must get their
    parts from rank 0. Returns the loaded global masks."""
    import shutil

    stale = _sparsifier(world_mesh, 0.9)
    stale.step()
    distsparse.save_checkpoint(f"{folder}/stale.safetensors", stale)
    path = f"{folder}/{src}"
    if dist.get_rank() != 0:
        path = f"{folder}/rank{dist.get_rank()}/{src}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if view == "stale":
            shutil.copyfile(f"{folder}/stale.safetensors", path)
    dist.barrier()
    sp = _sparsifier(world_mesh, 0.1)
    distsparse.load_checkpoint(path, sp)
    return {"emb": sp.get_mask("emb.weight").full_tensor(), "small": sp.get_mask("small.weight").full_tensor(),
            "sparsity": sp.sparsity()}


def load_with_another_block_shape(folder: str, src: str, world_mesh: list) -> dict:
    """The file holds (3, 5) blocks; this run asks (2, 2): every rank refuses, nothing changes;
    ``config="checkpoint"`` then loads the file's geometry."""
    sp = _sparsifier(world_mesh, 0.2, block=(2, 2))
    sp.step()
    before = sp.get_mask("emb.weight").full_tensor()
    refused = capture_error(distsparse.load_checkpoint, f"{folder}/{src}", sp)
    unchanged = torch.equal(sp.get_mask("emb.weight").full_tensor(), before)
    distsparse.load_checkpoint(f"{folder}/{src}", sp, config="checkpoint")
    return {"refused": refused, "unchanged": unchanged, "emb": sp.get_mask("emb.weight").full_tensor(),
            "block": list(sp.data_groups["emb.weight"]["sparse_block_shape"])}
