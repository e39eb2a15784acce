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
from dataclasses import dataclass

import torch

from .masks import block_scores, mask_from_pruned

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

#: Key width per score dtype. Scores have the data's dtype (``block_scores``).
KEY_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_KEY_DTYPE = {16: torch.int16, 32: torch.int32, 64: torch.int64}

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


# -- keys ------------------------------------------------------------------------------


def score_keys(scores: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Order-preserving integer keys of ``scores``, flat (row-major), one per score.

    For floats ``a``, ``b`` (not NaN): ``a < b`` ⇔ ``key(a) < key(b)`` and ``a == b`` ⇔
    ``key(a) == key(b)`` — so ``-0.0`` and ``+0.0`` share key 0, and ``+inf`` sorts above
    every finite value. The key is the float's bit pattern read as a signed integer of
    the same width, with negative floats (sign bit set) mapped to ``-(magnitude bits)``.
    Keys fit ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` for ``b`` = :data:`KEY_BITS` of the dtype.

    ``inplace=True`` reuses the scores' memory (the scores are destroyed): no copy.
    """
    bits = KEY_BITS.get(scores.dtype)
    if bits is None:
        raise TypeError(f"scores must be float16/bfloat16/float32/float64, got {scores.dtype}")
    flat = scores.reshape(-1)
    if not inplace or not scores.is_contiguous():
        flat = flat.clone()
    keys = flat.view(_KEY_DTYPE[bits])
    if keys.numel() and bool(keys.amin() < 0):  # sign bit set: negative floats and -0.0
        magnitude_mask = (1 << (bits - 1)) - 1
        sign = keys >> (bits - 1)  # -1 where negative, else 0 (arithmetic shift)
        keys.bitwise_and_(magnitude_mask)
        keys.bitwise_xor_(sign).sub_(sign)  # two's complement negation where negative
    return keys


def digit_schedule(key_bits: int, digit_bits: int) -> list[tuple[int, int]]:
    """The rounds for ``key_bits``-bit keys as ``(shift, width)``, most significant first:
    full ``digit_bits`` digits, the last one narrower when the widths don't divide."""
    if digit_bits < 1 or digit_bits > 16:
        raise ValueError(f"digit_bits must be in [1, 16], got {digit_bits}")
    out: list[tuple[int, int]] = []
    left = key_bits
    while left > 0:
        width = min(digit_bits, left)
        left -= width
        out.append((left, width))
    return out


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


# -- one round ---------------------------------------------------------------------------


# Keys handled per pass on CPU: 4 MiB of int32 digits, reused — fresh full-size
# temporaries cost more in page faults than the arithmetic (measured: 24 ms to allocate
# and touch 64 MiB, 6 ms to shift 16M keys into a warm buffer); 2**18 and 2**16 were
# slower (more small ops), a single full-size pass ~1.7x slower.
_CPU_CHUNK = 1 << 20


def _chunks(keys: torch.Tensor) -> range:
    step = _CPU_CHUNK if keys.device.type == "cpu" else max(keys.numel(), 1)
    return range(0, keys.numel(), step)


def _digits_into(out: torch.Tensor, keys: torch.Tensor, key_bits: int, shift: int, width: int) -> torch.Tensor:
    """Digit ``(shift, width)`` of the keys' *unsigned* order (key + 2**(b-1)), into ``out``.

    The top digit is the arithmetic shift plus the sign offset; lower digits are the same
    bits in the signed and the unsigned form, so a mask suffices."""
    if keys.dtype == out.dtype:
        torch.bitwise_right_shift(keys, shift, out=out)
    else:
        out.copy_(keys)
        out.bitwise_right_shift_(shift)
    if shift + width == key_bits:
        out += 1 << (width - 1)
    else:
        out &= (1 << width) - 1
    return out


def _digit_buffer(keys: torch.Tensor, key_bits: int) -> torch.Tensor:
    wide = torch.int64 if key_bits == 64 else torch.int32
    return torch.empty(min(keys.numel(), _chunks(keys).step), dtype=wide, device=keys.device)


def shard_histogram(candidates: torch.Tensor, key_bits: int, shift: int, width: int) -> torch.Tensor:
    """Count of this shard's candidate keys per value of digit ``(shift, width)``:
    int64, ``2**width`` bins, on the keys' device."""
    hist = torch.zeros(1 << width, dtype=torch.int64, device=candidates.device)
    buf = _digit_buffer(candidates, key_bits)
    for start in _chunks(candidates):
        part = candidates[start : start + buf.numel()]
        hist += torch.bincount(_digits_into(buf[: part.numel()], part, key_bits, shift, width),
                               minlength=1 << width)
    return hist


def narrow_candidates(candidates: torch.Tensor, key_bits: int, shift: int, width: int,
                      digit: int) -> torch.Tensor:
    """The candidate keys whose digit ``(shift, width)`` is ``digit``, in their order."""
    buf = _digit_buffer(candidates, key_bits)
    hit = torch.empty(buf.shape, dtype=torch.bool, device=buf.device)
    pieces = []
    for start in _chunks(candidates):
        part = candidates[start : start + buf.numel()]
        digits = _digits_into(buf[: part.numel()], part, key_bits, shift, width)
        pieces.append(part[torch.eq(digits, digit, out=hit[: part.numel()])])
    return torch.cat(pieces) if pieces else candidates[:0]


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


@dataclass(frozen=True)
class Pick:
    """Outcome of one round: the digit holding the ``remaining``-th lowest candidate key,
    how many candidates lie in lower digits (``below``, all pruned), how many share the
    digit (``in_digit``) and how many of those are still to be pruned (``remaining``)."""

    digit: int
    below: int
    in_digit: int
    remaining: int


def pick(histogram: torch.Tensor, remaining: int) -> Pick:
    """From the global histogram and the number still to prune (1 ≤ remaining ≤ total),
    the digit of the ``remaining``-th lowest candidate. Pure; identical on every rank."""
    cums = histogram.to(torch.int64).cumsum(0)
    target = torch.tensor([remaining], dtype=torch.int64, device=cums.device)
    digit = int(torch.searchsorted(cums, target)[0])  # first bin whose running count reaches it
    if digit >= histogram.numel():
        total = int(cums[-1]) if cums.numel() else 0
        raise RuntimeError(f"selection: the histogram holds {total} keys, fewer than the {remaining} "
                           "still to prune (shards overlap or are missing, or ranks disagree)")
    in_digit = int(histogram[digit])
    below = int(cums[digit]) - in_digit
    return Pick(digit=digit, below=below, in_digit=in_digit, remaining=remaining - below)


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


def ties_to_take(ties: int, ties_before: int, local_ties: int) -> int:
    """This shard's share of the ``ties`` (see :func:`tie_shares`)."""
    return min(local_ties, max(0, ties - ties_before))


def prune_flags(keys: torch.Tensor, threshold: int, ties_here: int | None) -> torch.Tensor:
    """Bool per local block (flat, row-major): key below ``threshold``, plus the first
    ``ties_here`` keys equal to it in row-major order (``None``: all of them)."""
    if ties_here is None:
        return keys <= threshold
    pruned = keys < threshold
    if ties_here > 0:
        idx = (keys == threshold).nonzero().reshape(-1)[:ties_here]
        pruned[idx] = True
    return pruned


# -- one group's shard on one rank ---------------------------------------------------------


class ShardSelection:
    """The selection state of one group's shard on one rank.

    Holds the local keys and the candidates still matching the chosen prefix, plus the
    progress every rank shares (prefix, remaining count, outcome), which changes only in
    :meth:`advance` from the *global* histogram — hence identically on every rank. A rank
    holding no rows of the group still takes part with an empty shard.

    Args:
        scores: this shard's block scores (any shape, row-major = global block order
            within the shard); their memory is reused for the keys.
        n_blocks: the group's number of blocks over all shards.
        k: blocks to prune over all shards (:func:`blocks_to_prune`), 0 ≤ k ≤ n_blocks.
        digit_bits: radix digit width (:func:`choose_digit_bits`), the same on every rank.
    """

    def __init__(self, scores: torch.Tensor, n_blocks: int, k: int, digit_bits: int = 11) -> None:
        if not 0 <= k <= n_blocks:
            raise ValueError(f"k must be in [0, {n_blocks}], got {k}")
        self.shape = tuple(scores.shape)
        self.key_bits = KEY_BITS.get(scores.dtype, 0)
        if not self.key_bits:
            raise TypeError(f"scores must be float16/bfloat16/float32/float64, got {scores.dtype}")
        self.n_blocks, self.k = n_blocks, k
        self.keys = score_keys(scores, inplace=True)
        self._schedule = digit_schedule(self.key_bits, digit_bits)
        self._round = 0
        self._prefix = 0  # unsigned prefix of the threshold key over the rounds done
        self._remaining = k
        self._expected = n_blocks  # keys the next global histogram must hold
        self._candidates: torch.Tensor | None = self.keys
        self._local: torch.Tensor | None = None  # this round's local histogram
        #: Outcome, once done: prune keys < threshold, then ``ties`` of the keys equal to
        #: it (``None``: all of them); ``tie_count`` keys equal it over all shards.
        self.threshold: int | None = None
        self.ties: int | None = None
        self.tie_count = 0
        self._fast: bool | None = None  # k == 0 → False, k == n_blocks → True
        if k == 0 or k == n_blocks:
            self._fast = k == n_blocks and n_blocks > 0
            self._candidates = None

    @property
    def rounds(self) -> int:
        """Rounds this group needs at most (0 for the k = 0 and k = all fast paths)."""
        return 0 if self._fast is not None else len(self._schedule)

    @property
    def done(self) -> bool:
        return self._candidates is None

    @property
    def histogram_size(self) -> int:
        """Length of this round's histogram; 0 once done (it then sends nothing)."""
        return 0 if self.done else 1 << self._schedule[self._round][1]

    def histogram(self) -> torch.Tensor:
        """This shard's histogram for the current round (empty once done)."""
        if self.done:
            return torch.zeros(0, dtype=torch.int64, device=self.keys.device)
        shift, width = self._schedule[self._round]
        self._local = shard_histogram(self._candidates, self.key_bits, shift, width)
        return self._local

    def advance(self, global_histogram: torch.Tensor) -> None:
        """Consume the round's global histogram (the sum over all shards): pick the digit,
        keep the local candidates holding it, and finish when decided."""
        if self.done:
            if global_histogram.numel():
                raise ValueError("advance() after the selection finished got a non-empty histogram")
            return
        shift, width = self._schedule[self._round]
        if global_histogram.numel() != 1 << width or self._local is None:
            raise ValueError(f"advance() needs this round's histogram() first and a global histogram of "
                             f"{1 << width} bins, got {global_histogram.numel()}")
        total = int(global_histogram.sum())
        if total != self._expected:
            raise RuntimeError(f"selection round {self._round}: the shards hold {total} candidate blocks, "
                               f"expected {self._expected} (shards overlap, are missing, or ranks disagree)")
        chosen = pick(global_histogram, self._remaining)
        local_in_digit = int(self._local[chosen.digit])
        self._local = None
        self._prefix = (self._prefix << width) | chosen.digit
        self._remaining = chosen.remaining
        self._expected = chosen.in_digit
        self._round += 1
        offset = 1 << (self.key_bits - 1)
        if chosen.remaining == chosen.in_digit:
            # The whole digit is pruned: everything up to its last key, no tie to split.
            self.threshold = (((self._prefix + 1) << shift) - 1) - offset
            self.ties, self.tie_count = None, chosen.in_digit
            self._candidates = None
        elif self._round == len(self._schedule):
            self.threshold = self._prefix - offset
            self.ties, self.tie_count = chosen.remaining, chosen.in_digit
            self._candidates = None
        elif local_in_digit == 0:
            self._candidates = self.keys[:0]
        elif local_in_digit != self._candidates.numel():  # else all local candidates stay
            self._candidates = narrow_candidates(self._candidates, self.key_bits, shift, width, chosen.digit)

    def release(self) -> None:
        """Drop the keys and candidates (the scores' memory) once :meth:`pruned` was taken."""
        self.keys = torch.empty(0, dtype=self.keys.dtype, device=self.keys.device)
        self._candidates = self._digits = None

    @property
    def needs_tie_prefix(self) -> bool:
        """Whether only some of the keys equal to the threshold are pruned, so each shard
        needs the tie counts of the shards before it (same answer on every rank)."""
        return self.done and self._fast is None and self.ties is not None

    def local_ties(self) -> int:
        """This shard's number of keys equal to the threshold."""
        if not self.done or self._fast is not None:
            raise RuntimeError("local_ties() needs a finished selection with a threshold")
        return int(torch.count_nonzero(self.keys == self.threshold))

    def pruned(self, ties_before: int = 0) -> torch.Tensor:
        """Bool block flags of this shard (the scores' shape): exactly this shard's part of
        ``masks.lowest_blocks(all_scores, k)``. ``ties_before``: keys equal to the
        threshold in the shards before this one (needed when :attr:`needs_tie_prefix`)."""
        if not self.done:
            raise RuntimeError("pruned() before the selection finished (advance() all rounds first)")
        if self._fast is not None:
            return torch.full(self.shape, self._fast, dtype=torch.bool, device=self.keys.device)
        if self.ties is None:
            flags = prune_flags(self.keys, self.threshold, None)
        else:
            local = int(torch.count_nonzero(self.keys == self.threshold))
            here = ties_to_take(self.ties, ties_before, local)
            flags = prune_flags(self.keys, self.threshold, None if here == local else here)
        return flags.reshape(self.shape)


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
