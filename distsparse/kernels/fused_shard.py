"""The fused CPU kernel (:mod:`distsparse.kernels.fused_cpu`) on one rank's rows of a split group.

A replicated group split over ranks is a row range per rank; every rank holds the whole
table. Two kernels, the selection made global in between:

**One read** (:class:`OneReadShard`, where :func:`fused_cpu.one_read_applies`: one-row
blocks one key wide, whole blocks pruned, ``0 < k < n_blocks``, at least
``fused_cpu._BRACKET_MIN_BLOCKS`` blocks in the table):

1. every rank samples the WHOLE table — the same evenly spaced blocks as one process —
   and so gets the same bracket ``[lo, hi]`` around the GLOBAL k-th lowest key, with no
   communication; one read of the shard's rows writes every block's final mask word
   outside the bracket and gathers the keys inside it (:func:`fused_cpu.bracket_read`);
2. the caller sums ``(below, inside, missed)`` over the ranks (:attr:`OneReadShard.status`,
   a few int64 in the step's status all-reduce); when the summed counts hold the k-th key
   (:meth:`OneReadShard.holds_cut`, the same answer on every rank) the candidates of all
   shards go through the exact distributed selection for the ``need = k - below`` lowest,
   and :meth:`OneReadShard.settle` writes the candidates' words. Nothing is read twice.
   Otherwise (a sample unlike the data, ties filling the bracket) every rank runs the
   three passes below instead.

**Three passes** (every other covered shape, and the fallback):

1. :class:`FusedShard` — scores, keys and the top-digit histogram of the shard's blocks in
   one read, the keys parked in the shard's mask rows (the kernel's pass 1);
2. the caller sums the histograms over the ranks (one all-reduce), and every rank reads the
   digit holding the k-th lowest key off the global histogram (:meth:`FusedShard.digit_cut`,
   identical everywhere); the shard's keys in that digit — its candidates, in row-major
   order — go through the exact distributed radix selection
   (:class:`~distsparse.kernels.radix.ShardSelection`) for the ``need`` lowest of the
   candidates of all shards, ties to the lowest global block index;
3. :meth:`FusedShard.write` — one compare-and-write pass over the shard's mask rows.

The result is bit for bit ``masks.norm_block_mask`` of the whole table, rows
``[row_start, row_stop)``: scores and within-block zeros use the fused kernel's exact
arithmetic, and a block's key depends on its own elements only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused_cpu

__all__ = ["BINS", "FusedShard", "OneReadShard", "applies", "new_whole_mask", "one_read_applies"]

#: Length of a shard's top-digit histogram.
BINS = fused_cpu._BINS


def applies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a split group of this dtype and device runs the fused shard kernel here
    (every rank must agree: the step's agreement includes :func:`fused_cpu.available`)."""
    return fused_cpu.available() and device.type == "cpu" and dtype in (torch.float32, torch.float64)


def new_whole_mask(shape: torch.Size) -> torch.Tensor:
    """An uninitialised CPU bool mask of ``shape``: a split group's new whole mask, whose
    rows this rank's kernel writes and the mask exchange the others'. Large ones come
    from :func:`fused_cpu.mask_buffer`'s buffers, reused once nothing references them, so
    their pages are already in memory (a fresh 32 MB mask costs ~6 ms of page faults on
    each rank, half in the kernel's read, half in unpacking the other ranks' rows)."""
    return torch.from_numpy(fused_cpu.mask_buffer(1, math.prod(shape))).view(torch.bool).view(shape)


#: Whether a split group (its whole table's shape, the global ``k``) runs :class:`OneReadShard`.
one_read_applies = fused_cpu.one_read_applies


class OneReadShard:
    """The one-read kernel on rows ``[row_start, row_stop)`` of the 2-D ``matrix`` (the
    whole table, which every rank holds), writing into ``out`` (the bool mask rows of that
    range): samples the whole table for the bracket around the global ``k``-th lowest
    key, then reads the shard's rows once. Only where :func:`one_read_applies`.

    :attr:`status` — ``(below, inside, missed)`` as int64, to be summed over the ranks:
    blocks below the bracket, blocks inside it (this shard's candidates), and 1 when this
    shard did not read (the sample put over ``fused_cpu._MAX_SHARE`` of the blocks inside
    the bracket: heavy ties) or gathered more candidates than planned. ``nonfinite``:
    some block score is inf or NaN."""

    #: Length of :attr:`status`.
    STATUS = 3

    def __init__(self, matrix: torch.Tensor, row_start: int, row_stop: int, block_shape: tuple[int, int],
                 norm: str, out: torch.Tensor, k: int) -> None:
        from . import _fused_cpu_jit as jit

        self._jit = jit
        bw = block_shape[1]
        x = matrix.detach().numpy()
        self.nbytes = x.itemsize
        key_type = np.int32 if self.nbytes == 4 else np.int64
        self.ones = int.from_bytes(b"\x01" * self.nbytes, "little", signed=True)
        self.nonfinite = False
        self.keys = self.idx = np.empty(0, dtype=np.int64)
        self.status = torch.tensor([0, 0, 1], dtype=torch.int64)  # missed until read
        if not (x.flags.c_contiguous and out.is_contiguous()):
            return  # (not met by the sparsifier's tables and masks) the three passes
        l2 = norm == "L2"
        divisors = np.arange(bw + 1).astype(x.dtype)
        xb = x.reshape(-1, bw)
        lo, hi, share = fused_cpu.sample_bracket(jit, xb, k, l2, divisors, key_type)
        if share > fused_cpu._MAX_SHARE:  # the k-th key is heavily tied: three passes, no wasted read
            return
        n_bc = x.shape[1] // bw
        shard = xb[row_start * n_bc : row_stop * n_bc]
        self.words = out.view(torch.uint8).numpy().view(key_type).reshape(-1)
        parts = max(1, min(torch.get_num_threads(), row_stop - row_start))
        bounds = fused_cpu._ranges(row_stop - row_start, parts) * n_bc
        top, below, inside, fits, self.keys, self.idx = fused_cpu.bracket_read(
            jit, shard, self.words, parts, bounds, l2, divisors, self.ones, fused_cpu._INF_KEY[self.nbytes],
            key_type, lo, hi, share)
        self.nonfinite = top >= fused_cpu._INF_KEY[self.nbytes] or top < 0
        self.status = torch.tensor([below, inside, 0 if fits else 1], dtype=torch.int64)

    @staticmethod
    def holds_cut(total: torch.Tensor, k: int) -> tuple[bool, int, int]:
        """From the status summed over the ranks: ``(held, need, candidates)`` — whether the
        brackets hold the k-th lowest key (no shard missed, ``below <= k <= below +
        inside``), how many of all shards' candidates are pruned and how many there are.
        The same on every rank."""
        below, inside, missed = (int(v) for v in total)
        return missed == 0 and below <= k <= below + inside, k - below, inside

    def candidates(self) -> torch.Tensor:
        """This shard's candidates' keys as scores (the key bits read as floats: the
        selection's keys order them as the integers), in row-major order."""
        dtype = np.float32 if self.nbytes == 4 else np.float64
        return torch.from_numpy(self.keys.astype(np.int32 if self.nbytes == 4 else np.int64).view(dtype))

    def settle(self, pruned: torch.Tensor | None) -> None:
        """Write the candidates' words (the read wrote 0 for them): all ones for those not
        flagged in ``pruned`` (one flag per candidate; ``None``: none pruned)."""
        if not self.idx.size:
            return
        kept = self.idx if pruned is None else self.idx[~pruned.numpy()]
        self.words[kept] = self.ones
        self.keys = self.idx = np.empty(0, dtype=np.int64)


class FusedShard:
    """Pass 1 on rows ``[row_start, row_stop)`` (whole block rows) of the 2-D ``matrix``,
    writing into ``out`` (the bool mask rows of that range). ``hist``: the shard's counts
    per top digit; ``nonfinite``: some block score is inf or NaN."""

    def __init__(self, matrix: torch.Tensor, row_start: int, row_stop: int, block_shape: tuple[int, int],
                 norm: str, out: torch.Tensor) -> None:
        from . import _fused_cpu_jit as jit

        self._jit = jit
        part = matrix[row_start:row_stop].detach()
        self.x = np.ascontiguousarray(part.numpy())
        rows, cols = self.x.shape
        bh, bw = block_shape
        self.block, self.l2 = (bh, bw), norm == "L2"
        self.n_br, self.n_bc = -(-rows // bh), -(-cols // bw)
        self.nbytes = self.x.itemsize
        self.out = out
        exact = rows == self.n_br * bh and cols == self.n_bc * bw
        self._buf_t = out.view(torch.uint8) if exact and out.is_contiguous() else \
            torch.empty(self.n_br * bh, self.n_bc * bw, dtype=torch.uint8)
        self._exact = self._buf_t is not None and exact and out.is_contiguous()
        buf = self.buf = self._buf_t.numpy()
        key_type = np.int32 if self.nbytes == 4 else np.int64
        self.mode = mode = 0 if bw == self.nbytes else (1 if bh * bw >= self.nbytes else 2)
        self.kview = buf.view(key_type) if mode == 0 else np.empty((0, 0), dtype=key_type)
        self.side = np.empty(self.n_br * self.n_bc if mode == 2 else 0, dtype=np.int64)
        self.shift = fused_cpu._SHIFT[self.nbytes]
        divisors = np.arange(bh * bw + 1).astype(self.x.dtype)
        n_keys = max(self.n_bc, 4096)
        tmpf = np.empty(n_keys, dtype=self.x.dtype)
        tmpi = tmpf.view(key_type)
        hist = np.zeros((4, fused_cpu._BINS), dtype=np.int64)
        inf_key = fused_cpu._INF_KEY[self.nbytes]
        if rows == 0:
            bad = 0
        elif bh == 1 and cols % bw == 0 and mode != 1:
            xb = self.x.reshape(-1, bw)
            bad = jit._score_flat(xb, 0, self.n_br * self.n_bc, bw, self.l2, mode, divisors, tmpf, tmpi,
                                  self.kview.reshape(-1), self.side, self.shift, inf_key, hist)
        else:
            bad = jit._score_rows(self.x, 0, self.n_br, bh, bw, self.l2, mode, self.nbytes, divisors, tmpf, tmpi,
                                  self.kview, buf, self.side, self.shift, inf_key, hist)
        self.nonfinite = bool(bad)
        self.hist = torch.from_numpy(hist.sum(0))

    @staticmethod
    def digit_cut(hist: torch.Tensor, k: int) -> tuple[int, int, int]:
        """From the *global* histogram: ``(digit, below, need)`` — the digit holding the k-th
        lowest key, the keys in lower digits (all pruned) and how many of the digit's keys
        are pruned. ``digit = -1`` when ``k == 0``. The same on every rank."""
        if k <= 0:
            return -1, 0, 0
        cums = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cums, torch.tensor([k], dtype=cums.dtype))[0])
        below = int(cums[digit] - hist[digit])
        return digit, below, k - below

    def candidates(self, digit: int) -> tuple[torch.Tensor, np.ndarray]:
        """This shard's keys in ``digit`` as scores (the key bits read as floats: the
        selection's keys order them as the integers) and their flat block indices, row-major."""
        dtype = np.float32 if self.nbytes == 4 else np.float64
        count = int(self.hist[digit]) if digit >= 0 else 0
        keys = np.empty(count, dtype=np.int64)
        idx = np.empty(count, dtype=np.int64)
        if count:
            bh, bw = self.block
            self._jit._gather_rows(self.mode, self.kview, self.buf, self.side, 0, self.n_br, bh, bw, self.n_bc,
                                   self.nbytes, self.shift, digit, 0, keys, idx)
        self._keys = keys
        scores = keys.astype(np.int32 if self.nbytes == 4 else np.int64).view(dtype)
        return torch.from_numpy(scores.copy()), idx

    def write(self, digit: int, pruned: torch.Tensor | None, idx: np.ndarray, zeros_per_block: int) -> torch.Tensor:
        """The compare-and-write pass: prune every key below ``digit`` and the candidates
        flagged in ``pruned`` (a prefix of each key's candidates, in row-major order)."""
        if digit < 0:
            threshold, last = -1, -1
        else:
            threshold, last = (digit << self.shift) - 1, self.n_br * self.n_bc
            if pruned is not None and bool(pruned.any()):
                chosen = pruned.numpy()
                threshold = int(self._keys[chosen].max())
                last = int(idx[chosen & (self._keys == threshold)].max())
        if self.n_br:
            bh, bw = self.block
            ones = int.from_bytes(b"\x01" * self.nbytes, "little", signed=True)
            self._jit._write_rows(self.x, 0, self.n_br, self.mode, self.kview, self.buf, self.side, bh, bw, self.l2,
                                  self.nbytes, ones, threshold, last, zeros_per_block)
        if not self._exact:
            rows, cols = self.out.shape
            self.out.copy_(self._buf_t[:rows, :cols].view(torch.bool))
        return self.out
