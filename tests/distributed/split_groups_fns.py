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


def _reference(data: torch.Tensor, level: float, block: list, zeros) -> torch.Tensor:
    zeros_n = zeros if zeros is not None else block[0] * block[1]
    return norm_block_mask(data.detach(), level, tuple(block), zeros_n, "L1")


def default_plan_groups(shapes: list, kind: str, level: float, block: list, zeros, dtype: str = "float32",
                        steps: int = 2, min_split: int | None = None) -> dict:
    """Tables of ``shapes`` under the default (cost model) plan — or the size rule of
    ``min_split`` — : each group's plan kind, mask digests per step and whether each
    equals the single-process mask."""
    tables = {f"t{i}": nn.Parameter(_data(kind, r, c, 40 + i).to(getattr(torch, dtype)))
              for i, (r, c) in enumerate(shapes)}
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block), zeros_per_block=zeros)
    for name, table in tables.items():
        sp.add_data(name, table)
    if min_split is not None:
        sp.min_split_elements = min_split
    plan = sp._plan() if sp.world_size > 1 else None
    from distsparse.distributed.step import _runs_fused

    out = {"kinds": {n: plan.groups[n].kind if plan else "single" for n in tables},
           "fused": {n: _runs_fused(sp, n) for n in tables},
           "owners": {n: sp.owner_of(n) for n in tables}, "steps": [], "bytes_sent": []}
    for i in range(steps):
        step_level = min(1.0, level + 0.21 * i)
        for name in tables:
            sp.data_groups[name]["sparsity_level"] = step_level
        sp.step()
        out["steps"].append({name: {"digest": _digest(sp.get_mask(name)), "equals_single_process": bool(
            torch.equal(sp.get_mask(name), _reference(tables[name], step_level, block, zeros)))}
            for name in sorted(tables)})
        out["bytes_sent"].append(sp.last_step_stats["bytes_sent"])
    return out


def differing_replicas(nan_on_rank: int | None = None) -> dict:
    """One replicated table whose copies differ per rank (every rank computes it under
    the default plan): every rank must end with the owner's mask; with ``nan_on_rank``,
    that rank's copy has a NaN and every rank raises naming the group."""
    from rank_fns import capture_error

    rank = dist.get_rank()
    data = _data("random", 301, 16, 5 + rank)
    if nan_on_rank == rank:
        data[17, 3] = float("nan")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("shared", nn.Parameter(data))
    kind, owner = sp._plan().groups["shared"].kind, sp.owner_of("shared")
    before = _digest(sp.get_mask("shared"))
    outcome = capture_error(sp.step)
    owner_copy = _data("random", 301, 16, 5 + owner)
    return {**outcome, "kind": kind, "owner": owner, "rank": rank, "digest": _digest(sp.get_mask("shared")),
            "unchanged": before == _digest(sp.get_mask("shared")),
            "equals_owners_copy": bool(torch.equal(sp.get_mask("shared"),
                                                   _reference(owner_copy, 0.5, [1, 4], None)))}


def one_read_split(shape: list, dtype: str, block: list, norm: str, levels: list, kind: str = "random",
                   miss: str | None = None, nan_at: list | None = None) -> dict:
    """One table of ``shape`` big enough for the one-read shard kernel, split over every
    rank, stepped at each of ``levels``; per step whether the mask equals the torch path's
    (``DISTSPARSE_FUSED_CPU=0``) and world 1's fused kernel, plus how many shards of each
    kernel this rank built. ``kind="rounded"``: values to 0.01 (ties at the cut, across
    ranks); ``"zero_rows"``: 60 % of the rows are zero (the cut is tied: three passes). ``miss="bracket"``: every rank's bracket lies wholly above the
    k-th key; ``"cap_on_rank1"``: rank 1 alone gathers more candidates than planned.
    ``nan_at``: a NaN at that (row, col); then the outcome of the first step instead."""
    import os

    from distsparse.kernels import fused_cpu, fused_shard
    from rank_fns import capture_error

    rank = dist.get_rank()
    data = _data("random", *shape, 61).to(getattr(torch, dtype))
    if kind == "rounded":  # ~800 distinct scores: the blocks tied at the cut lie in every rank's rows
        data = (data * 100).round() / 100
    if kind == "zero_rows":
        data[torch.randperm(shape[0], generator=torch.Generator().manual_seed(3))[: shape[0] * 3 // 5]] = 0
    if nan_at is not None:
        data[nan_at[0], nan_at[1]] = float("nan")
    made = {"one_read": 0, "one_read_missed": 0, "three_pass": 0}
    one_init, three_init = fused_shard.OneReadShard.__init__, fused_shard.FusedShard.__init__

    def one_read(self, *args, **kwargs):
        one_init(self, *args, **kwargs)
        made["one_read"] += 1
        made["one_read_missed"] += int(self.status[2])

    def three_pass(self, *args, **kwargs):
        three_init(self, *args, **kwargs)
        made["three_pass"] += 1

    fused_shard.OneReadShard.__init__, fused_shard.FusedShard.__init__ = one_read, three_pass
    if miss == "bracket":
        real_bracket = fused_cpu.bracket

        def above_the_cut(sample, k, n_blocks):  # the bracket of a cut 10 % higher: k falls below it
            return real_bracket(sample, min(n_blocks - 1, k + n_blocks // 10), n_blocks)

        fused_cpu.bracket = above_the_cut
    if miss == "cap_on_rank1" and rank == 1:
        fused_cpu._CAP_SLACK, fused_cpu._CAP_EXTRA = 0.0, 8
    sp = distsparse.DataNormSparsifier(sparsity_level=levels[0], sparse_block_shape=tuple(block), norm=norm)
    sp.min_split_elements = 1000  # split the table over every rank
    big = nn.Parameter(data)
    sp.add_data("big", big)
    out = {"ranges": {str(r): list(v) for r, v in sp.assignment("big").items()}, "steps": []}
    if nan_at is not None:
        before = _digest(sp.get_mask("big"))
        return {**capture_error(sp.step), "unchanged": before == _digest(sp.get_mask("big")), "made": made,
                "ranges": out["ranges"]}
    for level in levels:
        sp.data_groups["big"]["sparsity_level"] = level
        sp.step()
        mask = sp.get_mask("big")
        whole = norm_block_mask(data, level, tuple(block), block[0] * block[1], norm)  # world 1's fused kernel
        os.environ["DISTSPARSE_FUSED_CPU"] = "0"
        try:
            torch_path = norm_block_mask(data, level, tuple(block), block[0] * block[1], norm)
        finally:
            del os.environ["DISTSPARSE_FUSED_CPU"]
        out["steps"].append({"digest": _digest(mask), "equals_torch_path": bool(torch.equal(mask, torch_path)),
                             "equals_world_1": bool(torch.equal(mask, whole)),
                             "selection_bytes": sp.last_step_stats["selection_bytes"],
                             "bytes_sent": sp.last_step_stats["bytes_sent"]})
    out["made"] = made
    return out
