"""Exact global k-lowest block selection over shards, without gathering scores.

A group's blocks may be spread over *shards*: contiguous row ranges of its 2-D view
(``masks.as_matrix``), each held by one rank. The global ``k`` lowest blocks are found by
a radix selection over integer keys of the scores: every round, each shard counts its
candidate keys per value of the next digit (a histogram), the histograms are summed over
all shards (one all-reduce, of every split group of the step at once), and every rank
picks — from the same global histogram, so identically — the digit that holds the k-th
lowest key. After the last round the threshold key ``T`` is known exactly, and so is how
many blocks equal to ``T`` must still be pruned (``ties``); they go to the lowest global
row-major block indices first, shard by shard in row order, through an exclusive prefix
of the shards' tie counts (one more all-reduce, only when a group has to split its ties).
The result is bit for bit ``masks.lowest_blocks`` of the whole score tensor.

Everything here is pure and single-process: the sums travel through whatever the caller
passes (``torch.distributed.all_reduce`` in the sparsifier, a plain sum in the simulated
tests). One ``step()`` on one rank, for its split groups in name order::

    sels = [ShardSelection(shard_block_scores(matrix, start, stop, block, norm),
                           n_blocks, blocks_to_prune(level, n_blocks), digit_bits)
            for each split group]                       # digit_bits = choose_digit_bits(...)
    for _ in range(max(s.rounds for s in sels)):         # same on every rank
        if all(s.done for s in sels): break              # decided by global counts: same everywhere
        flat = pack_histograms([s.histogram() for s in sels])
        all_reduce(flat, SUM)                            # collective: one per round
        for s, h in zip(sels, unpack_histograms(flat, [s.histogram_size for s in sels])):
            s.advance(h)
    need = [s for s in sels if s.needs_tie_prefix]       # same on every rank
    if need:
        counts = zeros(len(need), world_size, int64); counts[:, rank] = [s.local_ties() for s in need]
        all_reduce(counts, SUM)                          # collective: tie counts per shard
        ties_before = exclusive prefix of counts[i] over the shards in row order
    mask_rows = shard_mask(matrix, start, stop, s.pruned(ties_before), block, zeros, norm)

**Keys.** :func:`score_keys` maps scores to signed integers of the score's width
(float16/bfloat16 → int16, float32 → int32, float64 → int64) whose integer order is the
scores' order as torch compares them: ``-0.0`` and ``+0.0`` get the same key, ``+inf``
(squares of float16 overflowing) the largest finite-data key. It works in place on the
score tensor's memory (no copy), which the selection no longer needs. Half-precision
keys come straight from the 16-bit patterns: converting to float32 is exact and monotone,
so they order exactly as float32 keys would, with half the radix passes.

**Digit width.** A round moves ``8 × 2**digit_bits`` bytes per split group through a ring
all-reduce and costs one latency term of the collective; fewer, wider digits trade bytes
for rounds, and a wide first digit also leaves far fewer candidate keys for the later
passes (the top bits of float scores are mostly their shared exponent).
:func:`choose_digit_bits` picks 8, 11 or 16 bits from that model (named constants
below): 16 bits (float32 keys: 2 rounds, 512 KiB per group and round) for big shards and
large worlds, 11 bits (3 rounds, 16 KiB) for many split groups with small shards.
Rounds per step: ``ceil(max key bits / digit_bits)`` at most (half 1-2, float32 2-3,
float64 4-6), fewer when every group is decided early (a whole histogram bin taken).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels.radix import (  # re-exported: the selection's kernels, part of this module's API
    KEY_BITS,
    Pick,
    ShardSelection,
    digit_schedule,
    narrow_candidates,
    pick,
    prune_flags,
    score_keys,
    shard_histogram,
    ties_to_take,
)
from ..masks import block_scores, mask_from_pruned

__all__ = [
    "KEY_BITS",
    "blocks_to_prune",
    "score_keys",
    "digit_schedule",
    "choose_digit_bits",
    "shard_histogram",
    "narrow_candidates",
    "combine_histograms",
    "pack_histograms",
    "unpack_histograms",
    "Pick",
    "pick",
    "tie_shares",
    "ties_to_take",
    "prune_flags",
    "ShardSelection",
    "check_shard_rows",
    "shard_block_scores",
    "shard_mask",
]

# Cost model of a step's rounds (choose_digit_bits). A ring all-reduce takes 2(N-1) steps,
# each a latency plus a 1/N slice of the buffer; every round also makes one or two passes
# over the shard's candidate keys. Defaults: gloo over loopback and one core of this
# project's 2-vCPU machine, measured by benchmarks/cost_model.py --calibrate (world 2).
ALLREDUCE_STEP_LATENCY_S = 104e-6
ALLREDUCE_BYTES_PER_S = 1.04e9
SECONDS_PER_KEY_PASS = 3e-9
DIGIT_BITS_CHOICES = (8, 11, 16)
# Fraction of the keys still candidates after the first digit, measured on float32 block
# scores of normal, uniform and log-normal data (L1 and L2): the first digits are mostly
# sign and exponent, shared by most scores of a table — 11 bits keep 6-30%, 16 bits 0.2-1%.
_SURVIVING_FIRST_DIGIT = {8: 0.85, 11: 0.3, 16: 0.01}


def blocks_to_prune(level: float, n_blocks: int) -> int:
    """``round(level × n_blocks)``: Python's round, half to even — the count
    ``masks.norm_block_mask`` (and torch.ao) prunes."""
    return round(level * n_blocks)


def choose_digit_bits(world_size: int, n_groups: int, key_bits: int = 32, keys_per_rank: int = 0, *,
                      step_latency_s: float = ALLREDUCE_STEP_LATENCY_S,
                      bytes_per_s: float = ALLREDUCE_BYTES_PER_S,
                      seconds_per_key_pass: float = SECONDS_PER_KEY_PASS) -> int:
    """Digit width (8, 11 or 16) minimising the modelled time of a step's selection.

    Each of the ``ceil(key_bits / w)`` rounds all-reduces ``n_groups × 2**w`` int64
    counts through a ring — ``2(N−1) × (step_latency + 8·2**w·n_groups / (N·bytes_per_s))``
    — and narrower digits leave more candidates for the passes after the first round
    (``keys_per_rank × 2 passes × surviving fraction``; ``keys_per_rank`` is the most
    block keys any rank holds in the step's split groups). Wide digits win when latency
    or local keys dominate (large worlds, big shards); narrow ones when the histogram bytes
    do (many split groups with small shards). Pure: every rank gets the same width.
    """
    if world_size < 1 or n_groups < 0 or keys_per_rank < 0:
        raise ValueError(f"world_size must be >= 1, n_groups and keys_per_rank >= 0, "
                         f"got {world_size}, {n_groups}, {keys_per_rank}")
    steps = 2 * (world_size - 1)

    def cost(w: int) -> float:
        per_step = step_latency_s + 8 * (1 << w) * n_groups / (world_size * bytes_per_s)
        local = keys_per_rank * seconds_per_key_pass * 2 * _SURVIVING_FIRST_DIGIT[w]
        return math.ceil(key_bits / w) * steps * per_step + local

    return min(DIGIT_BITS_CHOICES, key=lambda w: (cost(w), -w))


def combine_histograms(histograms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global histogram: the element-wise sum of every shard's (what the all-reduce does)."""
    return torch.stack(list(histograms)).sum(0)


def pack_histograms(histograms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several groups' histograms as one flat int64 tensor (groups in the caller's order;
    a finished group contributes an empty tensor), so one all-reduce serves them all."""
    if not histograms:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([h.reshape(-1).to(torch.int64) for h in histograms])


def unpack_histograms(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_histograms` given each group's ``histogram_size``."""
    if flat.numel() != sum(sizes):
        raise ValueError(f"packed histograms hold {flat.numel()} counts, expected {sum(sizes)} "
                         f"for group sizes {list(sizes)}")
    return list(torch.split(flat.reshape(-1), list(sizes)))


# -- ties --------------------------------------------------------------------------------


def tie_shares(tie_counts: Sequence[int], ties: int) -> list[int]:
    """How many of its keys equal to the threshold each shard prunes, shards in row order:
    the ``ties`` lowest global block indices, i.e. ``min(count, max(0, ties − before))``
    with ``before`` the exclusive prefix sum of the earlier shards' counts."""
    out, before = [], 0
    for count in tie_counts:
        out.append(ties_to_take(ties, before, count))
        before += count
    return out


# -- a shard's rows ------------------------------------------------------------------------


def check_shard_rows(rows: int, block_rows: int, row_start: int, row_stop: int) -> None:
    """A shard is whole block rows: it starts and stops at a multiple of the block height
    or at the last row (an empty shard may sit there too), so no block straddles two shards."""
    if not 0 <= row_start <= row_stop <= rows:
        raise ValueError(f"shard rows [{row_start}, {row_stop}) are outside [0, {rows}]")
    if (row_start % block_rows and row_start != rows) or (row_stop % block_rows and row_stop != rows):
        raise ValueError(f"shard rows [{row_start}, {row_stop}) must start and stop at a multiple of the "
                         f"block height {block_rows} (or stop at the last row, {rows})")


def shard_block_scores(matrix: torch.Tensor, row_start: int, row_stop: int,
                       block_shape: tuple[int, int], norm: str) -> torch.Tensor:
    """Block scores of rows ``[row_start, row_stop)`` of the 2-D view ``matrix``.

    Bit-identical to the same rows of ``masks.block_scores(matrix, ...)``: each block's
    score is computed from its own elements only (``avg_pool2d`` sums each window in its
    own loop, the strided-add path is element-wise), and ``block_scores`` chunks rows in
    steps that depend on the column count and block height only, always at multiples of
    the block height from the slice's start — so a slice starting at a block row meets
    every block whole, in the same kernel arithmetic. (Whether the float32/float64 fast
    strided-add path or ``avg_pool2d`` runs may differ between slice and whole tensor;
    the two are bit-identical, tests/test_selection_simulated.py checks it.)

    Raises ``ValueError`` for NaN/Inf data in the rows, naming the first one's position in
    the 2-D view; +inf *scores* from finite data (float16 squares overflowing) are kept.
    """
    rows = matrix.shape[0]
    check_shard_rows(rows, block_shape[0], row_start, row_stop)
    part = matrix[row_start:row_stop]
    scores = block_scores(part, block_shape, norm)
    if scores.numel() and not bool(torch.isfinite(scores.amax())):
        error = nonfinite_error(part, row_start)
        if error is not None:
            raise error
    return scores


def nonfinite_error(part: torch.Tensor, first_row: int) -> ValueError | None:
    """The error for NaN/Inf values in ``part`` (rows of the 2-D view from ``first_row`` on),
    naming the first one's row and column in the whole view; None when every value is finite."""
    bad = ~torch.isfinite(part)
    if not bool(bad.any()):
        return None
    r, c = (int(i) for i in bad.nonzero()[0])
    return ValueError(f"data contains {int(bad.sum())} NaN/Inf value(s) in rows [{first_row}, "
                      f"{first_row + part.shape[0]}), first at row {first_row + r}, column {c} "
                      f"of the 2-D view (value {part[r, c].item()})")


def shard_mask(matrix: torch.Tensor, row_start: int, row_stop: int, pruned: torch.Tensor,
               block_shape: tuple[int, int], zeros_per_block: int, norm: str,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask rows ``[row_start, row_stop)`` of the 2-D view (bool, ``(rows, cols)`` of the
    slice) from the shard's pruned block flags: the shards' masks concatenated in row
    order are ``masks.norm_block_mask(data, ...)`` viewed as ``as_matrix``, bit for bit
    (the within-block zeros of a pruned block depend on that block's elements only).
    ``out``: where to write them (e.g. those rows of the whole mask), returned."""
    check_shard_rows(matrix.shape[0], block_shape[0], row_start, row_stop)
    return mask_from_pruned(matrix[row_start:row_stop], pruned, block_shape, zeros_per_block, norm, out)
