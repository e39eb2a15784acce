"""Rank functions: big replicated groups split into row ranges computed by several ranks,
their exact global selection, and masks equal to a single process's."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import norm_block_mask, pack_bits


def _data(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "constant":
        return torch.full((rows, cols), 0.5)
    if kind == "few_values":  # heavy ties: four distinct magnitudes
        return torch.randint(1, 5, (rows, cols), generator=gen).float() / 4
    if kind == "repeated_rows":  # tied blocks spread over every rank's rows
        base = torch.randn(3, cols, generator=gen)
        return base.repeat(rows // 3 + 1, 1)[:rows].contiguous()
    return torch.randn(rows, cols, generator=gen)


def _digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(pack_bits(mask).numpy().tobytes()).hexdigest()


def split_and_small_groups(kind: str, level: float, block: list, zeros, small_tables: int,
                           dtype: str = "float32") -> dict:
    """One big table (split across ranks) and ``small_tables`` small ones (whole), stepped
    twice with a level change in between; returns per-group digests and whether each
    equals the single-process mask of the same data."""
    big = nn.Parameter(_data(kind, 389, 36, 11).to(getattr(torch, dtype)))
    tables = {"big.weight": big}
    for i in range(small_tables):
        tables[f"small{i}"] = nn.Parameter(_data(kind, 9 + i, 12, 20 + i).to(getattr(torch, dtype)))
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block),
                                       zeros_per_block=zeros)
    sp.min_split_elements = 1000  # the 389 x 36 table is "big" here
    for name, table in tables.items():
        sp.add_data(name, table)
    out = {"assignment": {str(r): list(v) for r, v in sp.assignment("big.weight").items()},
           "owner_of_big": sp.owner_of("big.weight"), "steps": []}
    for step_level in (level, min(1.0, level + 0.23)):
        for name in tables:
            sp.data_groups[name]["sparsity_level"] = step_level
        sp.step()
        zeros_n = zeros if zeros is not None else block[0] * block[1]
        out["steps"].append({
            name: {"digest": _digest(sp.get_mask(name)),
                   "equals_single_process": bool(torch.equal(
                       sp.get_mask(name),
                       norm_block_mask(tables[name].detach(), step_level, tuple(block), zeros_n, "L1")))}
            for name in sorted(tables)})
    out["bytes_sent"] = sp.last_step_stats["bytes_sent"]
    return out


def nan_in_one_ranks_rows() -> dict:
    """NaN in the rows of a split group that the last rank scores: every rank raises
    naming the group, and no mask changes."""
    from rank_fns import capture_error

    data = _data("random", 389, 36, 3)
    data[380, 5] = float("nan")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.min_split_elements = 1000
    sp.add_data("big", nn.Parameter(data))
    sp.add_data("small", nn.Parameter(torch.randn(8, 8)))
    before = _digest(sp.get_mask("big")) + _digest(sp.get_mask("small"))
    outcome = capture_error(sp.step)
    return {**outcome, "unchanged": before == _digest(sp.get_mask("big")) + _digest(sp.get_mask("small")),
            "ranges": {str(r): list(v) for r, v in sp.assignment("big").items()}, "rank": dist.get_rank()}
