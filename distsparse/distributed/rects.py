"""Tables sharded in rectangles (TorchRec): their layout, halos and owned blocks.

TorchRec shards an embedding table row-wise, column-wise, table-wise or table-row-wise; each
rank then holds zero, one or several *rectangles* of the 2-D table — a row offset, a column
offset, rows, cols — as tensors that are views of the real (FBGEMM) storage. This module is
the torch-only description of such data (:class:`RectShards`, built from a torch
``ShardedTensor`` or a ``DTensor`` over a ``LocalShardsWrapper``, TorchRec's two forms) and
the protocol that computes its mask where the rectangles live, bit-identical to the mask of
the whole table:

* **Owned blocks.** Each block of the global grid (blocks start at (0, 0)) belongs to the
  rectangle holding its top-left element. Rectangle ``R = [s, e) × [cs, ce)`` owns the
  region ``O(R) = [a, b) × [ca, cb)`` with ``a = ceil(s / bh)·bh``, ``b = min(rows,
  ceil(e / bh)·bh)`` and the same for columns (:func:`~distsparse.distributed.sharding.owned_rows`).
  ``O(R)`` reaches past ``R`` by fewer than ``bh`` rows and ``bw`` columns, into the
  rectangles below and to the right: the *halo*.
* **Scores.** ``O(R)`` is scored as three parts, each made of whole blocks: the *body*
  (inside ``R``: a view, no copy), the *right strip* (the last block column, when it
  straddles a column boundary) and the *bottom strip* (the last block row, when it straddles
  a row boundary), the strips assembled from ``R`` and the halo. Every block is scored from
  its own elements by ``masks.block_scores`` — the single-process arithmetic, bit for bit
  (no partial sums are combined across shards: combining float partial sums is not exact in
  general, so the missing < ``bw`` columns / < ``bh`` rows are sent instead). Boundaries on
  block edges need no halo (TorchRec's column shards are multiples of 4 columns).
* **Selection.** One :class:`~distsparse.distributed.selection.ShardSelection` per group and rank over
  the concatenated scores of its rectangles. Ties at the threshold go to the lowest global
  row-major block indices: when every rectangle spans all columns and no rank holds two of
  one table (row-wise, table-wise, table-row-wise), each rank's blocks are one contiguous
  range of that order and the shards' tie counts suffice; otherwise (column-wise) the tied
  blocks' global indices go through a second exact selection.
* **Masks.** Each rank builds the mask of its owned regions; the parts lying in other
  rectangles (the halo's mask) travel back bit-packed, the mirror of the data halo.

What is sent per step for a table: the selection's counts (a few histograms of ``2**11``
int64), the halo rows/columns of straddling blocks (``< bh`` rows × table width per row
boundary, ``< bw`` columns × rows per column boundary; nothing when boundaries lie on block
edges, e.g. any row-wise table with ``bh = 1``) and their masks bit-packed; never a
table-sized mask. The layout is learnt once, at a group's first step, by one all-gather of
every rank's rectangles (a few bytes each).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sharding import owned_rows

__all__ = ["Rect", "RectShards", "RectLayout", "RectView", "as_rect_shards", "layout_from_gathered", "flat_views"]


@dataclass(frozen=True)
class Rect:
    """A rectangle of a table: global offset ``(row, col)``, size ``rows × cols``, held by
    group rank ``holder``."""

    row: int
    col: int
    rows: int
    cols: int
    holder: int

    @property
    def stop_row(self) -> int:
        return self.row + self.rows

    @property
    def stop_col(self) -> int:
        return self.col + self.cols

    def overlap(self, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int] | None:
        """The part of region ``[r0, r1) × [c0, c1)`` inside this rectangle, or None."""
        lo_r, hi_r = max(r0, self.row), min(r1, self.stop_row)
        lo_c, hi_c = max(c0, self.col), min(c1, self.stop_col)
        if lo_r >= hi_r or lo_c >= hi_c:
            return None
        return lo_r, hi_r, lo_c, hi_c


# -- the data: a torch-only view of TorchRec's sharded tables --------------------------------


class RectShards:
    """A 2-D tensor sharded in rectangles, as distsparse sees it: the global shape and this
    rank's shards, each a global ``(row, col)`` offset and a 2-D tensor (for TorchRec a view
    of the real storage: writing into it changes the next forward).

    ``source`` is the object it was built from (a ``ShardedTensor`` or ``DTensor``), which
    ``get_data(name)`` returns. :meth:`local_shards` gives ``[(offset, tensor), ...]``;
    ``get_mask`` of such a group is a ``RectShards`` of ``bool`` masks with the same offsets.
    """

    def __init__(self, shape: Sequence[int], shards: Sequence[tuple[Sequence[int], torch.Tensor]],
                 source: Any = None, dtype: torch.dtype | None = None) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"a table sharded in rectangles must be 2-D, got shape {shape}")
        self.shape = torch.Size(shape)
        self._shards = []
        for offset, tensor in shards:
            offset = tuple(int(o) for o in offset)
            if len(offset) != 2 or tensor.dim() != 2:
                raise ValueError(f"each shard must be a 2-D tensor with a (row, col) offset, got offset {offset} "
                                 f"and shape {tuple(tensor.shape)}")
            r, c = offset
            if r < 0 or c < 0 or r + tensor.shape[0] > shape[0] or c + tensor.shape[1] > shape[1]:
                raise ValueError(f"shard at offset {offset} of shape {tuple(tensor.shape)} lies outside the "
                                 f"table's shape {shape}")
            self._shards.append((offset, tensor))
        self.source = source
        self.dtype = dtype if dtype is not None else (self._shards[0][1].dtype if self._shards else torch.float32)

    def local_shards(self) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """``[((row, col), tensor), ...]``: this rank's shards, in the source's order."""
        return list(self._shards)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self._shards]

    @property
    def device(self) -> torch.device:
        return self._shards[0][1].device if self._shards else torch.device("cpu")

    def numel(self) -> int:
        """Elements of the whole table."""
        return self.shape[0] * self.shape[1]

    def local_numel(self) -> int:
        return sum(t.numel() for _, t in self._shards)

    def dim(self) -> int:
        return 2

    def local_rects(self, holder: int) -> list[Rect]:
        return [Rect(r, c, int(t.shape[0]), int(t.shape[1]), holder) for (r, c), t in self._shards]

    def with_tensors(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> RectShards:
        """The same offsets over other tensors (masks, masked data) of ``dtype`` (default:
        this table's; a rank holding no shard has no tensor to tell it)."""
        return RectShards(self.shape, [(o, t) for (o, _), t in zip(self._shards, tensors)],
                          dtype=dtype if dtype is not None else tensors[0].dtype if tensors else self.dtype)

    def __repr__(self) -> str:
        shards = ", ".join(f"{o}: {tuple(t.shape)}" for o, t in self._shards)
        return f"RectShards(shape={tuple(self.shape)}, dtype={self.dtype}, local shards [{shards}])"


def _is_sharded_tensor(data: Any) -> bool:
    # Only when the module is loaded (whoever made a ShardedTensor loaded it): importing it
    # here for every add_data changed how a process group tears down (a gloo peer left a
    # collective before its data was delivered).
    module = sys.modules.get("torch.distributed._shard.sharded_tensor")
    return module is not None and isinstance(data, module.ShardedTensor)


def _local_shards_wrapper(data: Any) -> Any | None:
    """The ``LocalShardsWrapper`` inside a TorchRec DTensor (``output_dtensor=True``), else
    None. Duck-typed (``local_shards()`` and ``local_offsets()``): TorchRec 1.9 uses its own
    class of that name (``torchrec.distributed.shards_wrapper``), torch has another, and the
    core never imports TorchRec."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(data, DTensor):
        return None
    local = data._local_tensor
    ok = callable(getattr(local, "local_shards", None)) and callable(getattr(local, "local_offsets", None))
    return local if ok else None


def as_rect_shards(data: Any) -> RectShards | None:
    """``data`` as :class:`RectShards` when it is sharded in rectangles — a torch
    ``ShardedTensor`` (TorchRec's ``state_dict()`` values) or a ``DTensor`` over a
    ``LocalShardsWrapper`` (TorchRec with ``output_dtensor=True``, whose placements are not
    trusted: the shards' offsets are) — else None. No copy: the shards are the source's own
    tensors."""
    if isinstance(data, RectShards):
        return data
    if _is_sharded_tensor(data):
        shards = [(tuple(s.metadata.shard_offsets), s.tensor) for s in data.local_shards()]
        return RectShards(tuple(data.size()), shards, source=data, dtype=data.dtype)
    wrapper = _local_shards_wrapper(data)
    if wrapper is not None:
        shards = [(tuple(int(o) for o in off), t) for off, t in zip(wrapper.local_offsets(), wrapper.local_shards())]
        return RectShards(tuple(data.shape), shards, source=data, dtype=data.dtype)
    return None


# -- the global layout --------------------------------------------------------------------------


@dataclass(frozen=True)
class RectLayout:
    """Every rank's rectangles of one table (the same on every rank except :attr:`rank`):
    ``rects`` in group-rank order, each rank's in its local order."""

    rows: int
    cols: int
    rects: tuple[Rect, ...]
    rank: int

    def mine(self) -> list[int]:
        """Indices of this rank's rectangles, in its local order."""
        return [i for i, r in enumerate(self.rects) if r.holder == self.rank]

    def owned(self, i: int, block: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(a, b, ca, cb)``: the region of the blocks whose top-left element lies in
        rectangle ``i`` (empty when none does)."""
        r = self.rects[i]
        a, b = owned_rows(r.row, r.stop_row, self.rows, block[0])
        ca, cb = owned_rows(r.col, r.stop_col, self.cols, block[1])
        if a == b or ca == cb:
            return a, a, ca, ca
        return a, b, ca, cb

    def grid(self, i: int, block: tuple[int, int]) -> tuple[int, int]:
        """Block rows and columns of rectangle ``i``'s owned region."""
        a, b, ca, cb = self.owned(i, block)
        return -(-(b - a) // block[0]), -(-(cb - ca) // block[1])

    @property
    def row_ordered(self) -> bool:
        """Whether each rank's owned blocks are one contiguous range of the global row-major
        block order, the ranges ascending with :meth:`slot` (every rectangle spans all columns,
        no rank holds two): then the shards' tie counts place the tied blocks exactly."""
        holders = [r.holder for r in self.rects if r.rows and r.cols]
        return len(holders) == len(set(holders)) and all(
            r.col == 0 and r.cols == self.cols for r in self.rects if r.rows and r.cols)

    def slot(self) -> int:
        """This rank's position in row order (for a :attr:`row_ordered` layout; 0 if it holds none)."""
        ordered = sorted((r.row, r.holder) for r in self.rects if r.rows and r.cols)
        return next((k for k, (_, h) in enumerate(ordered) if h == self.rank), 0)

    def pieces(self, block: tuple[int, int]) -> list[tuple[int, int, tuple[int, int, int, int]]]:
        """The halo: ``(i, j, region)`` for every rectangle ``i`` whose owned region overlaps
        another rectangle ``j``; the data of ``region`` goes from ``j``'s holder to ``i``'s
        and its mask comes back. Same list, same order, on every rank."""
        out = []
        for i in range(len(self.rects)):
            a, b, ca, cb = self.owned(i, block)
            if a == b:
                continue
            r = self.rects[i]
            if b <= r.stop_row and cb <= r.stop_col:
                continue
            for j, other in enumerate(self.rects):
                if j != i:
                    region = other.overlap(a, b, ca, cb)
                    if region is not None:
                        out.append((i, j, region))
        return out

    def describe(self) -> list[list[int]]:
        return [[r.row, r.col, r.rows, r.cols, r.holder] for r in self.rects]


def layout_from_gathered(name: str, shape: Sequence[int], per_rank: Sequence[Sequence[Sequence[int]]],
                         rank: int) -> RectLayout:
    """The layout from every rank's ``[[row, col, rows, cols], ...]`` (indexed by group rank).
    Raises ``ValueError`` naming the group when the rectangles do not tile the table exactly
    (overlaps, gaps, shards outside it) — every rank gets the same lists, so every rank raises."""
    rows, cols = (int(s) for s in shape)
    rects = tuple(Rect(int(r), int(c), int(n), int(m), holder)
                  for holder, items in enumerate(per_rank) for r, c, n, m in items)
    for x in rects:
        if x.row < 0 or x.col < 0 or x.rows < 0 or x.cols < 0 or x.stop_row > rows or x.stop_col > cols:
            raise ValueError(f"group {name!r}: rank {x.holder}'s shard at ({x.row}, {x.col}) of {x.rows}x{x.cols} "
                             f"lies outside the table's shape ({rows}, {cols})")
    solid = [x for x in rects if x.rows and x.cols]
    for k, x in enumerate(solid):
        for y in solid[k + 1 :]:
            if x.overlap(y.row, y.stop_row, y.col, y.stop_col) is not None:
                raise ValueError(f"group {name!r}: shards overlap: rank {x.holder}'s at ({x.row}, {x.col}) of "
                                 f"{x.rows}x{x.cols} and rank {y.holder}'s at ({y.row}, {y.col}) of {y.rows}x{y.cols}")
    covered = sum(x.rows * x.cols for x in solid)
    if covered != rows * cols:
        raise ValueError(f"group {name!r}: the ranks' shards cover {covered} of the table's {rows * cols} elements "
                         f"(shape ({rows}, {cols})); every element must be held by exactly one rank")
    return RectLayout(rows=rows, cols=cols, rects=rects, rank=rank)


# -- one group on one rank during a step ---------------------------------------------------------


def _copy_overlap(dst: torch.Tensor, dst_at: tuple[int, int], src: torch.Tensor, src_at: tuple[int, int]) -> None:
    """Copy the overlap of ``src`` (top-left at global ``src_at``) into ``dst`` (at ``dst_at``)."""
    r0, c0 = max(dst_at[0], src_at[0]), max(dst_at[1], src_at[1])
    r1 = min(dst_at[0] + dst.shape[0], src_at[0] + src.shape[0])
    c1 = min(dst_at[1] + dst.shape[1], src_at[1] + src.shape[1])
    if r0 < r1 and c0 < c1:
        dst[r0 - dst_at[0] : r1 - dst_at[0], c0 - dst_at[1] : c1 - dst_at[1]].copy_(
            src[r0 - src_at[0] : r1 - src_at[0], c0 - src_at[1] : c1 - src_at[1]])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (row-major) as a 1-D uint8 CPU tensor."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).cpu() if t.numel() else torch.zeros(0, dtype=torch.uint8)


@dataclass
class _Part:
    """One whole-block part of an owned region: rows ``[r0, r1)`` × cols ``[c0, c1)``,
    its data and the slice of the region's block grid it covers."""

    r0: int
    r1: int
    c0: int
    c1: int
    grid_rows: slice
    grid_cols: slice
    data: torch.Tensor | None = None  # None until assembled (strips)


class RectView:
    """This rank's part of one rectangle-sharded group in one step (pure: the exchanges are
    the sparsifier's). ``tensors``: this rank's 2-D shards in :meth:`RectLayout.mine` order."""

    def __init__(self, layout: RectLayout, tensors: Sequence[torch.Tensor], block: tuple[int, int]) -> None:
        self.layout, self.block = layout, block
        self.mine = layout.mine()
        self.tensors = dict(zip(self.mine, tensors))
        self.pieces = layout.pieces(block)
        self.dtype = tensors[0].dtype if tensors else torch.float32
        self.itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self.parts: dict[int, list[_Part]] = {i: self._parts(i) for i in self.mine}
        self._halo: dict[int, torch.Tensor] = {}  # piece index → data received (or copied locally)

    # -- layout of the owned regions --
    def _parts(self, i: int) -> list[_Part]:
        lay, (bh, bw) = self.layout, self.block
        a, b, ca, cb = lay.owned(i, self.block)
        if a == b:
            return []
        r = lay.rects[i]
        m = (r.stop_row // bh) * bh if b > r.stop_row else b
        cm = (r.stop_col // bw) * bw if cb > r.stop_col else cb
        nbr, nbc = -(-(m - a) // bh), -(-(cm - ca) // bw)
        parts = [_Part(a, m, ca, cm, slice(0, nbr), slice(0, nbc),
                       self.tensors[i][a - r.row : m - r.row, ca - r.col : cm - r.col])]
        if cm < cb and m > a:
            parts.append(_Part(a, m, cm, cb, slice(0, nbr), slice(nbc, nbc + 1)))
        if m < b:
            parts.append(_Part(m, b, ca, cb, slice(nbr, nbr + 1), slice(0, None)))
        return parts

    def _holder(self, i: int) -> int:
        return self.layout.rects[i].holder

    # -- the data halo --
    def halo_lengths(self, world_size: int) -> list[int]:
        """Bytes of halo data each rank sends for this group (to other ranks)."""
        lengths = [0] * world_size
        for i, j, (r0, r1, c0, c1) in self.pieces:
            if self._holder(i) != self._holder(j):
                lengths[self._holder(j)] += (r1 - r0) * (c1 - c0) * self.itemsize
        return lengths

    def halo_payload(self) -> torch.Tensor:
        """The halo data this rank sends, in piece order; pieces between two of this rank's
        own rectangles are kept locally."""
        out = []
        for p, (i, j, (r0, r1, c0, c1)) in enumerate(self.pieces):
            if self._holder(j) != self.layout.rank:
                continue
            src = self.layout.rects[j]
            region = self.tensors[j][r0 - src.row : r1 - src.row, c0 - src.col : c1 - src.col]
            if self._holder(i) == self.layout.rank:
                self._halo[p] = region
            else:
                out.append(_raw(region))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)

    def take_halo(self, gathered: Sequence[torch.Tensor]) -> None:
        """Take the pieces sent to this rank from every rank's :meth:`halo_payload` (indexed
        by group rank), then assemble the strips."""
        offsets = [0] * len(gathered)
        me = self.layout.rank
        for p, (i, j, (r0, r1, c0, c1)) in enumerate(self.pieces):
            src = self._holder(j)
            if src == self._holder(i):
                continue
            n = (r1 - r0) * (c1 - c0) * self.itemsize
            if self._holder(i) == me:
                raw = gathered[src][offsets[src] : offsets[src] + n]
                self._halo[p] = raw.clone().view(self.dtype).reshape(r1 - r0, c1 - c0)
            offsets[src] += n
        for i in self.mine:
            r = self.layout.rects[i]
            for part in self.parts[i][1:]:
                data = torch.empty(part.r1 - part.r0, part.c1 - part.c0, dtype=self.dtype,
                                   device=self.tensors[i].device)
                _copy_overlap(data, (part.r0, part.c0), self.tensors[i], (r.row, r.col))
                for p, (pi, _, (r0, _, c0, _)) in enumerate(self.pieces):
                    if pi == i:
                        _copy_overlap(data, (part.r0, part.c0), self._halo[p].to(data.device), (r0, c0))
                part.data = data
        self._halo.clear()

    # -- scores, ties, masks --
    def scores(self, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Scores of every owned block of this rank, flat: its rectangles in order, each one's
        grid row-major. ``score(matrix)``: the block scores of a whole-block matrix."""
        flats = []
        for i in self.mine:
            nbr, nbc = self.layout.grid(i, self.block)
            if not nbr or not nbc:
                continue
            parts = self.parts[i]
            if len(parts) == 1 and parts[0].data.numel():  # no halo: the body's scores as they are
                flats.append(score(parts[0].data).reshape(-1))
                continue
            grid = None
            for part in parts:
                s = score(part.data) if part.data.numel() else None
                if grid is None:
                    grid = torch.empty(nbr, nbc, dtype=s.dtype if s is not None else self.dtype,
                                       device=part.data.device)
                if s is not None:
                    grid[part.grid_rows, part.grid_cols] = s
            flats.append(grid.reshape(-1))
        if not flats:
            return torch.empty(0, dtype=self.dtype)
        return torch.cat(flats) if len(flats) > 1 else flats[0]

    def global_indices(self, positions: torch.Tensor) -> torch.Tensor:
        """Global row-major block indices (float64, exact below 2**53) of local flat
        positions (as :meth:`scores` orders them)."""
        bh, bw = self.block
        n_cols = -(-self.layout.cols // bw)
        out = torch.empty(positions.numel(), dtype=torch.float64)
        start = 0
        for i in self.mine:
            nbr, nbc = self.layout.grid(i, self.block)
            n = nbr * nbc
            if not n:
                continue
            a, _, ca, _ = self.layout.owned(i, self.block)
            sel = (positions >= start) & (positions < start + n)
            local = positions[sel] - start
            out[sel.cpu()] = ((a // bh + local // nbc) * n_cols + ca // bw + local % nbc).to(torch.float64).cpu()
            start += n
        return out

    def build_masks(self, build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                    pruned: torch.Tensor, masks: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Write the owned regions' masks into ``masks`` (rectangle index → this rank's new
        2-D mask of that rectangle) and return the bit-packable masks of the halo pieces this
        rank computed for other ranks, in piece order. ``pruned``: flat block flags (the
        order of :meth:`scores`); ``build(matrix, pruned_grid, out)`` writes a whole-block
        matrix's mask into ``out``."""
        outgoing: dict[int, torch.Tensor] = {}
        start = 0
        me = self.layout.rank
        for i in self.mine:
            nbr, nbc = self.layout.grid(i, self.block)
            if not nbr or not nbc:
                continue
            grid = pruned[start : start + nbr * nbc].reshape(nbr, nbc)
            start += nbr * nbc
            r = self.layout.rects[i]
            mine_pieces = [(p, j, reg) for p, (pi, j, reg) in enumerate(self.pieces) if pi == i]
            for k, part in enumerate(self.parts[i]):
                flags = grid[part.grid_rows, part.grid_cols]
                if k == 0:  # the body: straight into this rectangle's mask
                    out = masks[i][part.r0 - r.row : part.r1 - r.row, part.c0 - r.col : part.c1 - r.col]
                    if part.data.numel():
                        build(part.data, flags, out)
                    continue
                rows = torch.empty(part.data.shape, dtype=torch.bool, device=part.data.device)
                build(part.data, flags, rows)
                _copy_overlap(masks[i], (r.row, r.col), rows, (part.r0, part.c0))
                for p, j, (r0, r1, c0, c1) in mine_pieces:
                    if self._holder(j) == me:
                        other = self.layout.rects[j]
                        _copy_overlap(masks[j], (other.row, other.col), rows, (part.r0, part.c0))
                    else:
                        piece = outgoing.setdefault(p, torch.empty(r1 - r0, c1 - c0, dtype=torch.bool))
                        _copy_overlap(piece, (r0, c0), rows.cpu(), (part.r0, part.c0))
        return [outgoing[p] for p in sorted(outgoing)]

    def mask_lengths(self, world_size: int, packed: Callable[[int], int]) -> list[int]:
        """Bytes of halo masks each rank sends for this group (``packed(n)``: bytes of n bits)."""
        lengths = [0] * world_size
        for i, j, (r0, r1, c0, c1) in self.pieces:
            if self._holder(i) != self._holder(j):
                lengths[self._holder(i)] += packed((r1 - r0) * (c1 - c0))
        return lengths

    def take_masks(self, gathered: Sequence[torch.Tensor], masks: dict[int, torch.Tensor],
                   unpack: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
                   packed: Callable[[int], int]) -> None:
        """Write into ``masks`` the halo masks other ranks computed for this rank's rectangles
        (every rank's packed pieces, indexed by group rank, each piece packed on its own)."""
        offsets = [0] * len(gathered)
        me = self.layout.rank
        for i, j, (r0, r1, c0, c1) in self.pieces:
            src = self._holder(i)
            if src == self._holder(j):
                continue
            n = packed((r1 - r0) * (c1 - c0))
            if self._holder(j) == me:
                rows = unpack(gathered[src][offsets[src] : offsets[src] + n], (r1 - r0, c1 - c0))
                other = self.layout.rects[j]
                _copy_overlap(masks[j], (other.row, other.col), rows.to(masks[j].device), (r0, c0))
            offsets[src] += n


def flat_views(flat: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """2-D views of consecutive parts of a 1-D tensor (a group's per-shard masks live in one
    flat ``bool`` tensor: one object to update in place, one count for sparsity)."""
    out, at = [], 0
    for rows, cols in shapes:
        out.append(flat[at : at + rows * cols].view(rows, cols))
        at += rows * cols
    if at != flat.numel():
        raise ValueError(f"a flat mask of {flat.numel()} elements does not fit shards of {at} elements")
    return out
