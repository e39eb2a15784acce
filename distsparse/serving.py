"""Serve pruned tables in plain PyTorch: ``nn.Module``s that remap ids, then look them up.

:class:`PrunedEmbeddingBag` and :class:`PrunedEmbedding` hold only the kept rows of a table
(:class:`distsparse.pruned.PrunedTable`) and its int32 remap, and return what
``nn.EmbeddingBag`` / ``nn.Embedding`` return on the *masked dense* table: a pruned id
contributes a zero vector (it still counts in a ``mean`` bag and takes part in a ``max``
bag, as the dense zero row does). How: the module's weight is the kept rows plus one zero
row, and pruned ids are remapped to that row; ``padding_idx`` ids go to a row of their own
that ``F.embedding_bag`` skips, as ``nn.EmbeddingBag`` skips the padding row. The remap is
held in about 1 byte per row (:func:`_compact_remap`) rather than the file's 4-byte int32
remap, so that a 64-dim table 80 % pruned serves in 0.20x of its dense bytes.

Quantized tables (``int8`` / ``int4``) stay quantized in memory: the rows a batch touches
are dequantized per call (``q * scale + bias``, FBGEMM's arithmetic), then pooled.

Limitations:
    Inference only: weights are buffers (no gradient, no ``max_norm``, ``sparse``,
    ``scale_grad_by_freq``). Sum and mean pool the same vectors in the same order as the
    dense module, so they are equal bit for bit on CPU; quantized tables pool dequantized
    rows, equal to dequantizing the same quantization of the dense masked table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pruned import PrunedTable
from .quantization import dequantize_rows, quantize_rows

__all__ = ["PrunedEmbeddingBag", "PrunedEmbedding"]


#: Rows per group of the compact remap: a row's index among the kept rows of its group fits a
#: byte (255 marks a pruned row), and each group stores how many kept rows precede it.
_GROUP_SHIFT = 7
GROUP_ROWS = 1 << _GROUP_SHIFT
_PRUNED = 255


def _compact_remap(remap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 remap in about 1 byte per row: ``(rank, base)`` with ``rank[i]`` (uint8) row
    i's index among the kept rows of its group of :data:`GROUP_ROWS` rows (255: pruned) and
    ``base[g]`` (int64) the kept rows before group g, so ``remap[i] = base[i // 128] + rank[i]``.
    An int32 remap costs 4 bytes per row: 1/64 of a 64-dim float32 row and 1/17 of an int8
    one, too much for a table 80 % pruned to serve in 0.21x (0.06x in int8) of its dense bytes."""
    remap = remap.to(device="cpu", dtype=torch.int64)
    rows = remap.numel()
    groups = -(-rows // GROUP_ROWS)
    kept = remap >= 0
    padded = torch.zeros(groups * GROUP_ROWS, dtype=torch.int64)
    padded[:rows] = kept.to(torch.int64)
    per_group = padded.view(groups, GROUP_ROWS).sum(dim=1)
    base = torch.cumsum(per_group, 0) - per_group
    rank = torch.full((rows,), _PRUNED, dtype=torch.uint8)
    starts = base.repeat_interleave(GROUP_ROWS)[:rows]
    rank[kept] = (remap[kept] - starts[kept]).to(torch.uint8)
    return rank, base


def _check_padding_idx(padding_idx: int | None, rows: int) -> int | None:
    """``padding_idx`` as ``nn.Embedding`` accepts it (negative counts from the end)."""
    if padding_idx is None:
        return None
    if not -rows <= padding_idx < rows:
        raise ValueError(f"padding_idx {padding_idx} must be within the table's {rows} rows")
    return padding_idx + rows if padding_idx < 0 else padding_idx


class _PrunedLookup(nn.Module):
    """Shared storage: kept rows (+ the zero row, + a padding row for bags), served remap."""

    def __init__(self, table: PrunedTable, padding_idx: int | None, padding_row: bool) -> None:
        super().__init__()
        self.num_embeddings = table.rows
        self.embedding_dim = table.dim
        self.encoding = table.encoding
        self.bits = table.bits
        self.kept = table.kept
        self.padding_idx = _check_padding_idx(padding_idx, table.rows)
        extra = 2 if padding_row and self.padding_idx is not None else 1
        zeros = torch.zeros(extra, table.dim)
        if self.bits is None:
            weight = torch.cat([table.weight, zeros.to(device=table.weight.device, dtype=table.weight.dtype)])
        else:
            weight = torch.cat([table.weight, quantize_rows(zeros, self.bits).to(table.weight.device)])
        self._pad_ids = padding_row and self.padding_idx is not None
        self.register_buffer("weight", weight)
        rank, base = _compact_remap(table.remap)
        self.register_buffer("rank", rank.to(table.weight.device))
        self.register_buffer("base", base.to(table.weight.device))

    @property
    def _pad(self) -> int | None:
        """The served index that bags skip (the padding row), or None."""
        return None if self.padding_idx is None else self.kept + 1

    def _rows(self, served: torch.Tensor) -> torch.Tensor:
        """Dequantized rows of served indices (quantized tables)."""
        assert self.bits is not None
        return dequantize_rows(self.weight.index_select(0, served), self.bits, self.embedding_dim)

    def _remap(self, input: torch.Tensor) -> torch.Tensor:
        """Served indices of ``input`` ids; an id outside ``[0, num_embeddings)`` raises
        ``IndexError`` as ``nn.Embedding`` does (negative ids too: no wrap-around)."""
        if input.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"expected int32 or int64 ids, got {input.dtype}")
        ids = input.reshape(-1).to(torch.int64)
        rank = self.rank.index_select(0, ids)  # IndexError "index out of range in self" for ids < 0 or >= rows
        served = torch.where(rank == _PRUNED, self.kept, self.base.index_select(0, ids >> _GROUP_SHIFT) + rank)
        if self._pad_ids:
            served = torch.where(ids == self.padding_idx, self.kept + 1, served)
        return served.reshape(input.shape)

    def served_bytes(self) -> int:
        """Bytes this module holds for the table: kept rows (+ 1-2 extra rows) and the
        compact remap (1 byte per row + 8 bytes per 128 rows)."""
        return sum(b.numel() * b.element_size() for b in (self.weight, self.rank, self.base))


class PrunedEmbeddingBag(_PrunedLookup):
    """``nn.EmbeddingBag`` over a pruned table: same ``forward(input, offsets=None,
    per_sample_weights=None)``, same output as the masked dense table's ``nn.EmbeddingBag``
    with the same ``mode``, ``padding_idx`` and ``include_last_offset``."""

    def __init__(self, table: PrunedTable, mode: str = "sum", padding_idx: int | None = None,
                 include_last_offset: bool = False) -> None:
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        super().__init__(table, padding_idx, padding_row=True)
        self.mode = mode
        self.include_last_offset = include_last_offset

    @classmethod
    def from_pruned(cls, table: PrunedTable, mode: str = "sum", padding_idx: int | None = None,
                    include_last_offset: bool = False) -> PrunedEmbeddingBag:
        """The module serving ``table`` (from :func:`distsparse.load_pruned_tables`)."""
        return cls(table, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        served = self._remap(input)
        if self.bits is None:
            return F.embedding_bag(served, self.weight, offsets, mode=self.mode,
                                   per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset, padding_idx=self._pad)
        flat = served.reshape(-1)
        rows = self._rows(flat)
        positions = torch.arange(flat.numel(), device=flat.device)
        pad = None
        if self._pad is not None:  # padding ids point at an extra zero row that the bag skips
            pad = flat.numel()
            positions = torch.where(flat == self._pad, torch.full_like(positions, pad), positions)
            rows = torch.cat([rows, rows.new_zeros(1, self.embedding_dim)])
        return F.embedding_bag(positions.reshape(served.shape), rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=pad)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, kept={self.kept}, encoding={self.encoding}, "
                f"mode={self.mode!r}" + ("" if self.padding_idx is None else f", padding_idx={self.padding_idx}"))


class PrunedEmbedding(_PrunedLookup):
    """``nn.Embedding`` over a pruned table: ``forward(input)`` returns ``input.shape + (dim,)``,
    the masked dense table's rows (zeros for pruned ids). ``padding_idx`` is accepted for
    symmetry with ``nn.Embedding``; as there, it changes no forward output."""

    def __init__(self, table: PrunedTable, padding_idx: int | None = None) -> None:
        super().__init__(table, padding_idx, padding_row=False)

    @classmethod
    def from_pruned(cls, table: PrunedTable, padding_idx: int | None = None) -> PrunedEmbedding:
        """The module serving ``table`` (from :func:`distsparse.load_pruned_tables`)."""
        return cls(table, padding_idx=padding_idx)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        served = self._remap(input)
        if self.bits is None:
            return F.embedding(served, self.weight)
        return self._rows(served.reshape(-1)).reshape(*served.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kept={self.kept}, encoding={self.encoding}"
