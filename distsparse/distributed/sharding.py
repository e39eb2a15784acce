"""The layout of a ``DTensor`` group: which rows of its 2-D view each rank holds.

FSDP2 (``torch.distributed.fsdp.fully_shard``) makes every parameter a ``DTensor``. A
group whose data is a ``DTensor`` is computed where its rows live; this module answers,
from the DTensor's global shape, mesh and placements alone (no communication), the
questions the sparsifier asks about such a group:

* Is the placement supported? ``Replicate()`` on a 1-D mesh (every rank holds the whole
  tensor: an ordinary replicated group), ``Shard(0)`` on a 1-D mesh (FSDP2) and
  ``(Replicate(), Shard(0))`` on a 2-D mesh (HSDP) of data with at least 2 dimensions.
  Anything else (``Shard(1)``, ``Partial``, ``_StridedShard``, other meshes, a 1-D tensor
  sharded along its only dimension — its 2-D view is a single row) is a ``TypeError``
  naming the group, the placement and what is supported.
* Does the mesh hold exactly the sparsifier's ranks? (``ValueError`` otherwise.)
* Which rows ``[s, e)`` of the 2-D view (``masks.as_matrix``: ``prod(shape[:-1])`` rows)
  does each shard hold, which shard does each rank hold, and which rank *contributes* it
  (the replica at replicate coordinate 0; every HSDP replica computes the same mask, the
  others send zero counts to the selection)?
* Which blocks does a shard score? Those whose **first** row lies in its rows: rows
  ``[a, b)`` with ``a = ceil(s / bh)·bh`` and ``b = min(R, ceil(e / bh)·bh)`` (both capped
  at ``R``). Rows ``[e, b)`` (fewer than ``bh``) come from the next shards: the *halo*.

The one call into torch's private layout code is :func:`_shard_offsets`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..masks import packed_size, unpack_bits
from .selection import nonfinite_error

__all__ = ["ShardLayout", "ShardedRows", "is_dtensor", "layout_of", "owned_rows", "SUPPORTED_PLACEMENTS"]

SUPPORTED_PLACEMENTS = ("(Replicate(),) on a 1-D mesh, (Shard(dim=0),) on a 1-D mesh (FSDP2), "
                        "(Replicate(), Shard(dim=0)) on a 2-D mesh (HSDP)")


def is_dtensor(data: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(data, DTensor)


def owned_rows(start: int, stop: int, rows: int, block_rows: int) -> tuple[int, int]:
    """Rows ``[a, b)`` of the blocks whose first row lies in ``[start, stop)`` (empty,
    ``a == b``, when no block starts there). Pure."""
    a = min(rows, -(-start // block_rows) * block_rows)
    b = min(rows, -(-stop // block_rows) * block_rows)
    return a, max(a, b)


@dataclass(frozen=True)
class ShardLayout:
    """Where a DTensor group's rows live; identical on every rank except :attr:`rank`.

    ``shard_rows[j]``: rows ``[s, e)`` of the 2-D view held by shard ``j``;
    ``rank_shard[r]``: the shard group rank ``r`` holds; ``source[j]``: the group rank
    that contributes shard ``j`` (replicate coordinate 0). ``sharded`` is False for
    ``Replicate()`` (one shard, the whole tensor, every rank contributing).
    """

    global_shape: tuple[int, ...]
    placements: tuple[str, ...]
    mesh_shape: tuple[int, ...]
    sharded: bool
    rows: int
    cols: int
    shard_rows: tuple[tuple[int, int], ...]
    rank_shard: tuple[int, ...]
    source: tuple[int, ...]
    rank: int
    local_shape: tuple[int, ...]

    @property
    def shard(self) -> int:
        return self.rank_shard[self.rank]

    @property
    def contributes(self) -> bool:
        return self.source[self.shard] == self.rank

    @property
    def row_range(self) -> tuple[int, int]:
        return self.shard_rows[self.shard]

    @property
    def dim0_offset(self) -> int:
        """This rank's offset along dimension 0 of the data."""
        per = self.rows_per_dim0
        return self.row_range[0] // per if per else 0

    @property
    def rows_per_dim0(self) -> int:
        return math.prod(self.global_shape[1:-1]) if len(self.global_shape) > 1 else 1

    def owned(self, block_rows: int, shard: int | None = None) -> tuple[int, int]:
        s, e = self.shard_rows[self.shard if shard is None else shard]
        return owned_rows(s, e, self.rows, block_rows)

    def needs_halo(self, block_rows: int) -> bool:
        """Whether some block straddles a shard boundary (the same answer on every rank)."""
        for j, (_, e) in enumerate(self.shard_rows):
            a, b = self.owned(block_rows, j)
            if a < b and b > e:
                return True
        return False

    def describe(self) -> dict[str, Any]:
        """The facts every rank must share (the step's agreement digest)."""
        return {"global_shape": list(self.global_shape), "placements": list(self.placements),
                "mesh_shape": list(self.mesh_shape)}


def _shard_offsets(global_shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: list[int],
                   placements: tuple[Any, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of the shard at mesh ``coordinate`` — torch's own rule
    (``torch.chunk``-like: 1,001 rows on 2 → 501 / 500; trailing shards may be empty)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    return _compute_local_shape_and_global_offset(global_shape, mesh_shape, coordinate, placements)


def _placement_kind(placements: tuple[Any, ...], mesh_ndim: int, data_ndim: int) -> str | None:
    from torch.distributed.tensor import Replicate, Shard

    def shard0(p: Any) -> bool:
        return type(p) is Shard and p.dim == 0

    if mesh_ndim == 1 and len(placements) == 1 and type(placements[0]) is Replicate:
        return "replicate"
    if data_ndim < 2:
        return None
    if mesh_ndim == 1 and len(placements) == 1 and shard0(placements[0]):
        return "shard"
    if mesh_ndim == 2 and len(placements) == 2 and type(placements[0]) is Replicate and shard0(placements[1]):
        return "hsdp"
    return None


def layout_of(name: str, data: Any, group_ranks: list[int], group_rank: int) -> ShardLayout:
    """The layout of DTensor ``data`` for group ``name``. ``group_ranks``: the global rank of
    every member of the sparsifier's process group, in group-rank order; ``group_rank``:
    this process's rank in it. Raises ``TypeError`` for an unsupported placement and
    ``ValueError`` for a mesh that does not hold exactly the group's ranks."""
    mesh = data.device_mesh
    placements = tuple(data.placements)
    shape = tuple(int(s) for s in data.shape)
    shown = "(" + ", ".join(repr(p) for p in placements) + (",)" if len(placements) == 1 else ")")
    kind = _placement_kind(placements, mesh.ndim, len(shape))
    if kind is None:
        raise TypeError(
            f"group {name!r}: a DTensor (tensor subclass) of shape {tuple(shape)} with placements {shown} "
            f"on a {mesh.ndim}-D mesh {tuple(mesh.shape)} is not supported; supported: {SUPPORTED_PLACEMENTS}, "
            "for data with at least 2 dimensions when sharded (pass the full tensor, e.g. "
            "p.full_tensor(), for other layouts)")
    mesh_ranks = mesh.mesh.reshape(-1).tolist()
    if sorted(mesh_ranks) != sorted(group_ranks):
        raise ValueError(
            f"group {name!r}: the DTensor's mesh holds global ranks {sorted(mesh_ranks)} but the sparsifier's "
            f"process group holds {sorted(group_ranks)}; build the sparsifier with the process group of the "
            "mesh (process_group=...) or a mesh over the same ranks")
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1] if shape else 1
    per = math.prod(shape[1:-1]) if len(shape) > 1 else 1
    mesh_shape = tuple(int(s) for s in mesh.shape)
    coords = {int(g): list(c) for g, c in zip(mesh_ranks, _coordinates(mesh_shape))}
    if kind == "replicate":
        shard_rows, rank_shard, source = ((0, rows),), (0,) * len(group_ranks), (0,)
        local_shape = shape
    else:
        shard_dim = mesh.ndim - 1
        n_shards = mesh_shape[shard_dim]
        spans = []
        for j in range(n_shards):
            coord = [0] * mesh.ndim
            coord[shard_dim] = j
            local, offset = _shard_offsets(shape, mesh_shape, coord, placements)
            spans.append((offset[0] * per, (offset[0] + local[0]) * per))
        shard_rows = tuple(spans)
        rank_shard = tuple(coords[g][shard_dim] for g in group_ranks)
        source = tuple(next(r for r, g in enumerate(group_ranks)
                            if coords[g][shard_dim] == j and all(c == 0 for c in coords[g][:shard_dim]))
                       for j in range(n_shards))
        mine = coords[group_ranks[group_rank]]
        local_shape, _ = _shard_offsets(shape, mesh_shape, mine, placements)
        local_shape = tuple(int(s) for s in local_shape)
    return ShardLayout(global_shape=shape, placements=tuple(repr(p) for p in placements), mesh_shape=mesh_shape,
                       sharded=kind != "replicate", rows=rows, cols=cols, shard_rows=shard_rows,
                       rank_shard=rank_shard, source=source, rank=group_rank, local_shape=tuple(local_shape))


def _coordinates(mesh_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every coordinate of a mesh, row-major (the order of ``mesh.mesh.reshape(-1)``)."""
    return list(itertools.product(*(range(n) for n in mesh_shape)))


class ShardedRows:
    """This rank's owned rows ``[a, b)`` of a sharded group, as the tensors the sharded
    protocol scores: the *body* (rows ``[a, m)``, whole block rows inside the local rows,
    a view — no copy) and, when the last owned block row straddles into the next shards,
    the *tail* (rows ``[m, b)``: one block row, the local rows ``[m, e)`` plus the halo
    rows ``[e, b)`` taken from the next shards' first rows). Every owned block is whole in
    one of them, so its score and mask are those of the whole tensor, bit for bit.

    Pure given the gathered halos (the all-gathers are the sparsifier's, through
    :class:`~distsparse.distributed.comm.Comm`).
    """

    def __init__(self, layout: ShardLayout, local: torch.Tensor, block: tuple[int, int]) -> None:
        self.layout, self.local, self.block = layout, local, block
        bh = block[0]
        self.s, self.e = layout.row_range
        self.a, self.b = layout.owned(bh)
        straddles = self.a < self.b and self.b > self.e
        self.m = (self.e // bh) * bh if straddles else self.b
        self.body = local[self.a - self.s : self.m - self.s]
        self.tail: torch.Tensor | None = None
        self._straddles = straddles
        cols = layout.cols
        #: Bytes each rank sends for this group in the row-halo all-gather.
        self.halo_nbytes = (bh - 1) * cols * local.element_size()
        #: Bytes each rank sends for this group in the mask-halo all-gather.
        self.mask_halo_nbytes = packed_size((bh - 1) * cols)

    def first_rows_bytes(self) -> torch.Tensor:
        """This rank's first ``bh - 1`` rows (fewer if it holds fewer) as bytes, padded."""
        rows = self.local[: self.block[0] - 1].contiguous()
        raw = rows.reshape(-1).view(torch.uint8).cpu() if rows.numel() else torch.zeros(0, dtype=torch.uint8)
        return torch.cat([raw, torch.zeros(self.halo_nbytes - raw.numel(), dtype=torch.uint8)])

    def take_halo(self, gathered: Sequence[torch.Tensor]) -> None:
        """Build the tail from every rank's :meth:`first_rows_bytes` (indexed by group rank)."""
        if not self._straddles:
            return
        lay, cols, itemsize = self.layout, self.layout.cols, self.local.element_size()
        parts = [self.local[self.m - self.s :]]
        for j in range(lay.shard + 1, len(lay.shard_rows)):
            sj, ej = lay.shard_rows[j]
            lo, hi = max(self.e, sj), min(self.b, ej)
            if lo >= hi:
                if sj >= self.b:
                    break
                continue
            raw = gathered[lay.source[j]][(lo - sj) * cols * itemsize : (hi - sj) * cols * itemsize]
            parts.append(raw.clone().view(self.local.dtype).reshape(hi - lo, cols).to(self.local.device))
        tail = torch.cat(parts)
        if tail.shape[0] != self.b - self.m:
            raise RuntimeError(f"halo rows [{self.e}, {self.b}) incomplete: got {tail.shape[0] - (self.e - self.m)}")
        self.tail = tail

    def scores(self, sparsifier: Any, name: str, config: dict[str, Any]) -> torch.Tensor:
        """Scores of the owned blocks, row-major (the sparsifier's ``_shard_scores``)."""
        parts = [self._scores(sparsifier, name, config, self.body, self.a)]
        if self.tail is not None:
            parts.append(self._scores(sparsifier, name, config, self.tail, self.m))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def _scores(sparsifier: Any, name: str, config: dict[str, Any], rows: torch.Tensor,
                first_row: int) -> torch.Tensor:
        """Scores of ``rows`` (global rows from ``first_row`` on); NaN/Inf errors name the
        global row, as the single-process and split paths do, not the row in the shard."""
        try:
            return sparsifier._shard_scores(name, rows, 0, rows.shape[0], config)
        except ValueError:
            error = nonfinite_error(rows, first_row) if rows.is_floating_point() else None
            if error is None:
                raise
            raise error from None

    def build_mask(self, sparsifier: Any, name: str, config: dict[str, Any], pruned: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor | None:
        """Write mask rows ``[a, min(b, e))`` into ``out`` (the new local mask's 2-D view)
        and return rows ``[e, b)``, which belong to the next shards (None when none)."""
        bh = self.block[0]
        n_body = -(-self.body.shape[0] // bh)
        if self.body.shape[0]:
            sparsifier._shard_mask(name, self.body, 0, self.body.shape[0], pruned[:n_body], config,
                                   out[self.a - self.s : self.m - self.s])
        if self.tail is None:
            return None
        rows = torch.empty(self.tail.shape, dtype=torch.bool, device=out.device)
        sparsifier._shard_mask(name, self.tail, 0, self.tail.shape[0], pruned[n_body:], config, rows)
        out[self.m - self.s :].copy_(rows[: self.e - self.m])
        return rows[self.e - self.m :]

    def take_mask_halo(self, gathered: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Mask rows ``[s, min(a, e))`` from the shard owning the block that straddles into
        this one (every rank's padded, bit-packed rows ``[e, b)``, indexed by group rank)."""
        stop = min(self.a, self.e)
        if stop <= self.s:
            return
        lay, bh, cols = self.layout, self.block[0], self.layout.cols
        start_of_block = (self.s // bh) * bh
        j = next(j for j, (sj, ej) in enumerate(lay.shard_rows) if sj <= start_of_block < ej)
        ej = lay.shard_rows[j][1]
        _, bj = lay.owned(bh, j)
        n = (bj - ej) * cols
        rows = unpack_bits(gathered[lay.source[j]][: packed_size(n)], (bj - ej, cols))
        out[: stop - self.s].copy_(rows[self.s - ej : stop - ej])
