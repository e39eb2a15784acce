"""Exact radix selection of the lowest scores: order-preserving integer keys, digit
histograms, candidate narrowing, and one shard's selection state (:class:`ShardSelection`).

The kernels layer: pure tensor code that imports nothing else from the package, so the
mask functions (``distsparse.masks``) and the distributed selection protocol
(``distsparse.distributed.selection``, which re-exports these names) both build on it one way.
See ``distsparse.distributed.selection`` for the protocol that drives :class:`ShardSelection` across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "KEY_BITS",
    "score_keys",
    "digit_schedule",
    "shard_histogram",
    "narrow_candidates",
    "Pick",
    "pick",
    "ties_to_take",
    "prune_flags",
    "ShardSelection",
]


#: Key width per score dtype. Scores have the data's dtype (``masks.block_scores``).
KEY_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_KEY_DTYPE = {16: torch.int16, 32: torch.int32, 64: torch.int64}


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


def ties_to_take(ties: int, ties_before: int, local_ties: int) -> int:
    """This shard's share of the ``ties``: the lowest global block indices first, i.e.
    ``min(local_ties, max(0, ties − ties_before))`` (``distsparse.distributed.selection.tie_shares``)."""
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
