"""Rank functions: save_sparse_data is a collective written by rank 0 (issue 9 item 7)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.export import load_sparse_data, save_sparse_data
from outcomes import error_of


def export_replicated_refuse_local(folder: str) -> dict:
    rank = dist.get_rank()
    table = nn.Parameter(torch.randn(50, 12, generator=torch.Generator().manual_seed(1)))  # same on every rank
    batch = torch.randn(6, 8, generator=torch.Generator().manual_seed(10 + rank))           # per rank
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("table", table)
    sp.add_data("batch", batch)
    sp.step()
    out = {"all": error_of(lambda: save_sparse_data(os.path.join(folder, "all.safetensors"), sp))}
    path = os.path.join(folder, "tables.safetensors")
    save_sparse_data(path, sp, names=["table"])
    loaded = load_sparse_data(path)
    out["exact"] = torch.equal(loaded["table"].view(torch.int32),
                               sp.get_data("table", return_original=False).view(torch.int32))
    out["files"] = sorted(os.listdir(folder))
    # Ranks asking for different groups get a RankDisagreementError, not a hang.
    names = ["table"] if rank == 0 else ["table", "batch"]
    out["disagree"] = error_of(lambda: save_sparse_data(os.path.join(folder, "x.safetensors"), sp, names=names))
    sp.step()  # still in step afterwards
    return out
