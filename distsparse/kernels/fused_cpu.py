"""Fused CPU block mask: one read of the data, selection over candidates only, one mask write.

The torch path of ``distsparse.masks.norm_block_mask`` makes ~20 passes over the data and
its block scores (scores in chunks, conversions, radix rounds, the mask broadcast). This
kernel, compiled with numba, makes three passes:

1. **Scores, keys and the first histogram in one read.** Each block's score is formed with
   exactly the arithmetic of the torch path (``|x|`` or ``x*x`` in the data's dtype, summed
   from 0 in row-major order within the block, one division by the number of valid
   elements, all in the data's dtype: the order of ``avg_pool2d``'s loop and of the
   strided adds). Its bit pattern is the score's integer key (scores are ``>= +0.0``), whose
   top bits are counted into a histogram. The key is parked in the new mask's own bytes,
   inside the block's region, so the step's memory is the mask plus small buffers.
2. **Candidates.** The digit holding the k-th lowest key is read off the summed histogram;
   only the keys in that digit (typically under 1 % of the blocks) are gathered, in
   row-major order, and the exact k-th key and the tie cut are found among them.
3. **One mask write.** Each block's key is compared with the threshold (ties: the lowest
   global block indices first, as everywhere in distsparse) and its region overwritten with
   the keep flags; a pruned block keeps all but its ``zeros_per_block`` smallest elements
   (ties to the lower position).

**One read, the common case.** Whole blocks one row by one key wide ((1,4) float32,
(1,8) float64, ``zeros_per_block`` covering the block) with at least
``_BRACKET_MIN_BLOCKS`` blocks take :func:`_bracket_mask` instead: the scores of
:func:`sample_size` evenly spaced blocks (one in 16, 2**14 to 2**16) give a bracket
``[lo, hi]`` around the k-th lowest key (4 standard deviations of the sample quantile
either side: ~1.6 % of the blocks at 1M x 64, ~3 % at 2**18 blocks), and ONE read of
the data writes every block's final mask word (pruned below ``lo``, kept above ``hi``)
while gathering the keys inside the bracket; the cut among those
(:func:`_fused_cpu_jit._settle`) writes the rest. Nothing is read twice. When the
bracket missed the k-th key (a sample unlike the data) or held more candidates than
planned, the three passes above run instead: the same mask, slower. The keys' order is
the scores' order, so the read compares scores with ``hi``'s score and keys with the
keys' bounds, in their own width (both vectorise). A split group's shard
(:class:`~distsparse.kernels.fused_shard.OneReadShard`) takes the same sample of the
whole table (:func:`sample_bracket`) and reads only its rows (:func:`bracket_read`).
Both run where :func:`one_read_applies`.

Masks of 4 MiB and more are allocated from :func:`mask_buffer`, which reuses a buffer of
an earlier mask once nothing references it: a table stepped again alternates between two
buffers whose pages are already in memory (one unused buffer of that size stays
allocated between steps; ``DISTSPARSE_FUSED_CPU_REUSE=0`` turns this off).

Work is split into fixed ranges of block rows; counts are integers and the candidate
order is the row-major order, so the result does not depend on the number of threads.
Numba is optional: :func:`fused_block_mask` returns ``None`` when it is missing or the
input is not covered (float16/bfloat16 data, non-contiguous data, blocks whose region is
smaller than a key), and the caller runs the torch path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# numba is optional (pyproject extra "fast"; the test and example extras install it) and
# imported on the first call only (``_fused_cpu_jit``): ``import distsparse`` stays fast.
_HAS_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["available", "faster_than_torch", "fused_block_mask", "mask_buffer", "one_read_applies"]

# Top-digit shift per key width: 2**15 bins (keys of scores >= 0 are below 2**(bits-1)).
_SHIFT = {4: 16, 8: 48}
_BINS = 1 << 15
# Key of +inf: scores at or above it are not finite.
_INF_KEY = {4: 0x7F800000, 8: 0x7FF0000000000000}
# One-read path (``_bracket_mask``): from this many blocks up, with a sample this large.
_BRACKET_MIN_BLOCKS = 1 << 18
# Blocks sampled: one in _SAMPLE_EVERY, at least _SAMPLE_MIN and at most _SAMPLE (sample_size).
_SAMPLE, _SAMPLE_MIN, _SAMPLE_EVERY = 1 << 16, 1 << 14, 16
# Candidate room per range: this multiple of the sample's share inside the bracket, plus this.
_CAP_SLACK, _CAP_EXTRA = 1.5, 1024
# ... unless the sample puts more than this share of the blocks inside the bracket (ties).
_MAX_SHARE = 0.05
# Mask buffers kept for reuse (``mask_buffer``): per size in bytes, from this size up.
_SPARES: dict[int, list[np.ndarray]] = {}
_SPARE_MIN_BYTES, _SPARE_PER_SIZE = 1 << 22, 2
_LOCK = threading.Lock()
_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}


def available() -> bool:
    """Whether the compiled kernel can run here (numba importable, not disabled by
    ``DISTSPARSE_FUSED_CPU=0``)."""
    return _HAS_NUMBA and os.environ.get("DISTSPARSE_FUSED_CPU", "1") != "0"


def _run(parts: int, work: Callable[[int], int | None]) -> list:
    """``work(c)`` for every range ``c``: inline for one, else on threads (the kernels
    release the GIL); each range writes only its own outputs."""
    if parts == 1:
        return [work(0)]
    key = (os.getpid(), parts)  # a forked child has none of its parent's pool threads: its own pool
    with _LOCK:
        pool = _POOL.get(key)
        if pool is None:
            pool = _POOL[key] = ThreadPoolExecutor(parts, thread_name_prefix="distsparse-fused")
    return list(pool.map(work, range(parts)))


def mask_buffer(rows: int, cols: int) -> np.ndarray:
    """A ``(rows, cols)`` uint8 array for a new mask. Large ones come from a few buffers
    kept per size: one that nothing references any more (the mask it held was dropped:
    the sparsifier drops a group's old mask when it stores the new one) is reused, its
    pages already in memory; else a new one (numpy backs it with huge pages: faulting in
    a fresh 64 MB mask takes ~8 ms, ~27 ms with torch.empty's 4 KiB pages). So a table
    stepped again alternates between two buffers; at most ``_SPARE_PER_SIZE`` unused
    ones per size stay allocated (``DISTSPARSE_FUSED_CPU_REUSE=0``: none)."""
    size = rows * cols
    if size < _SPARE_MIN_BYTES or os.environ.get("DISTSPARSE_FUSED_CPU_REUSE", "1") == "0":
        return np.empty((rows, cols), dtype=np.uint8)
    with _LOCK:
        spares = _SPARES.setdefault(size, [])
        for arr in spares:
            if sys.getrefcount(arr) == 3:  # the list, ``arr`` and getrefcount's argument: unused
                return arr.reshape(rows, cols)  # a view: in use (referenced) until it is dropped
        arr = np.empty(size, dtype=np.uint8)
        if len(spares) < _SPARE_PER_SIZE:
            spares.append(arr)
        return arr.reshape(rows, cols)


def one_read_applies(shape: tuple[int, int], block_shape: tuple[int, int], zeros_per_block: int, nbytes: int,
                     k: int) -> bool:
    """Whether the one-read path (:func:`_bracket_mask`; a split group's
    :class:`~distsparse.kernels.fused_shard.OneReadShard`) covers the 2-D ``shape`` (the
    whole table), block shape, ``zeros_per_block``, element size ``nbytes`` and ``k``: whole
    blocks one row by one key wide, tiling the columns, ``0 < k < n_blocks``, at least
    ``_BRACKET_MIN_BLOCKS`` blocks. A function of facts every rank shares (the step's
    agreement), so every rank of a split group decides the same."""
    rows, cols = shape
    bh, bw = block_shape
    n_blocks = -(-rows // bh) * -(-cols // bw)
    return bh == 1 and bw == nbytes and cols % bw == 0 and zeros_per_block >= bh * bw and 0 < k < n_blocks \
        and n_blocks >= _BRACKET_MIN_BLOCKS


def _ranges(n: int, parts: int) -> np.ndarray:
    return np.linspace(0, n, parts + 1).round().astype(np.int64)


def fused_block_mask(
    matrix: torch.Tensor,
    k: int,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    on_nonfinite: Callable[[], None],
    threads: int | None = None,
    force: bool = False,
) -> torch.Tensor | None:
    """The mask of the 2-D ``matrix`` (bool, its shape) pruning its ``k`` lowest-scoring
    blocks — bit for bit ``masks.norm_block_mask``'s — or ``None`` where this kernel does
    not apply (then the caller runs the torch path).

    ``on_nonfinite`` is called when some block score is inf or NaN: it raises for
    NaN/Inf data (finite data whose squares overflowed continues, inf scores ranking
    last). ``threads``: ranges of block rows run in parallel (default: torch's thread
    count); the mask is the same for every value. Only where :func:`faster_than_torch`
    unless ``force`` (tests: every covered input, same bits).
    """
    if not available() or matrix.device.type != "cpu" or matrix.dtype not in (torch.float32, torch.float64) \
            or not matrix.is_contiguous() or matrix.dim() != 2 or matrix.numel() == 0:
        return None
    if not (force or faster_than_torch(block_shape, zeros_per_block, matrix.element_size())):
        return None
    from . import _fused_cpu_jit as jit  # compiled on first use, then from numba's on-disk cache

    rows, cols = matrix.shape
    bh, bw = block_shape
    n_br, n_bc = -(-rows // bh), -(-cols // bw)
    n_blocks = n_br * n_bc
    nbytes = matrix.element_size()
    x = matrix.detach().numpy()
    exact = rows == n_br * bh and cols == n_bc * bw
    buf = mask_buffer(n_br * bh, n_bc * bw)
    out = torch.from_numpy(buf)
    key_type = np.int32 if nbytes == 4 else np.int64
    # Keys live in the mask's own bytes when a block's region can hold one: through an
    # integer view when a block row is exactly one key wide, else byte by byte.
    mode = 0 if bw == nbytes else (1 if bh * bw >= nbytes else 2)
    kview = buf.view(key_type) if mode == 0 else np.empty((0, 0), dtype=key_type)
    threads = threads or torch.get_num_threads()
    parts = max(1, min(threads, n_br))
    bounds = _ranges(n_br, parts)
    divisors = np.arange(bh * bw + 1).astype(x.dtype)
    l2 = norm == "L2"
    ones = int.from_bytes(b"\x01" * nbytes, "little", signed=True)
    if one_read_applies((rows, cols), block_shape, zeros_per_block, nbytes, k):  # then mode == 0
        xb = x.reshape(-1, bw)
        if _bracket_mask(jit, xb, kview.reshape(-1), k, parts, bounds * n_bc, bw, l2, divisors, ones,
                         _INF_KEY[nbytes], key_type, on_nonfinite):
            return out.view(torch.bool)
    side = np.empty(n_blocks if mode == 2 else 0, dtype=np.int64)
    # One-row blocks tiling the data: scored as one long (blocks × bw) loop, 4096 at a time.
    xb = x.reshape(-1, bw) if bh == 1 and cols % bw == 0 else np.empty((0, bw), dtype=x.dtype)
    tmpf = np.empty((parts, max(n_bc, 4096)), dtype=x.dtype)
    tmpi = tmpf.view(key_type)
    kflat = kview.reshape(-1)
    hist = np.zeros((parts, 4, _BINS), dtype=np.int64)
    shift = _SHIFT[nbytes]
    flat_scores = bh == 1 and xb.shape[0] and mode != 1
    bad = sum(_run(parts, lambda c: jit._score_flat(
        xb, bounds[c] * n_bc, bounds[c + 1] * n_bc, bw, l2, mode, divisors, tmpf[c], tmpi[c], kflat, side, shift,
        _INF_KEY[nbytes], hist[c]) if flat_scores else jit._score_rows(
        x, bounds[c], bounds[c + 1], bh, bw, l2, mode, nbytes, divisors, tmpf[c], tmpi[c], kview, buf, side, shift,
        _INF_KEY[nbytes], hist[c])))
    if bad:
        on_nonfinite()  # raises for NaN/Inf data
    hist = hist.sum(1)

    def gather(digit: int, offsets: np.ndarray, keys: np.ndarray, idx: np.ndarray) -> None:
        _run(parts, lambda c: jit._gather_rows(mode, kview, buf, side, bounds[c], bounds[c + 1], bh, bw, n_bc, nbytes,
                                           shift, digit, offsets[c], keys, idx))

    threshold, last_tie = k_lowest_cut(hist, k, n_blocks, shift, gather)
    _run(parts, lambda c: jit._write_rows(x, bounds[c], bounds[c + 1], mode, kview, buf, side, bh, bw, l2, nbytes, ones,
                                      threshold, last_tie, zeros_per_block))
    mask = out.view(torch.bool)
    return mask if exact else mask[:rows, :cols].contiguous()


def sample_size(n_blocks: int) -> int:
    """Blocks the bracket samples: one in ``_SAMPLE_EVERY``, clamped to
    ``[_SAMPLE_MIN, _SAMPLE]`` (and to ``n_blocks``). 2**18 blocks sample 2**14 (~0.5 ms
    less than 2**16 at 1M elements; ~3 % of the blocks inside the bracket instead of
    ~1.6 %), 2**20 blocks and more 2**16."""
    return min(n_blocks, _SAMPLE, max(_SAMPLE_MIN, n_blocks // _SAMPLE_EVERY))


def bracket(sample: np.ndarray, k: int, n_blocks: int) -> tuple[int, int]:
    """Keys ``(lo, hi)`` that hold the ``k``-th lowest of ``n_blocks`` keys between them
    but for a ~4-sigma miss, read off ``sample`` (keys of evenly spaced blocks; consumed)."""
    size = sample.size
    p = k / n_blocks
    margin = 4.0 * np.sqrt(size * p * (1.0 - p)) + 8
    lo_i, hi_i = int(np.floor(p * size - margin)), int(np.ceil(p * size + margin))
    picks = [i for i in (lo_i, hi_i) if 0 <= i < size]
    if picks:
        sample.partition(picks)
    lo = int(sample[lo_i]) if lo_i >= 0 else 0
    hi = int(sample[hi_i]) if hi_i < size else np.iinfo(np.int64).max
    return lo, hi


def sample_bracket(jit, xb: np.ndarray, k: int, l2: bool, divisors: np.ndarray,
                   key_type) -> tuple[int, int, float]:
    """``(lo, hi, share)``: the bracket around the ``k``-th lowest key of ALL the one-row
    blocks ``xb`` (blocks × bw) from the scores of :func:`sample_size` evenly spaced
    blocks, and the share of the sample inside it. A pure function of the data: every
    rank holding the same table gets the same bracket."""
    n_blocks = xb.shape[0]
    sample = np.empty(sample_size(n_blocks), dtype=xb.dtype)
    jit._sample_scores(xb, n_blocks, xb.shape[1], l2, divisors, sample)
    keys = sample.view(key_type)
    lo, hi = bracket(keys.astype(np.int64), k, n_blocks)
    share = float(np.count_nonzero(keys >= lo) - np.count_nonzero(keys > hi)) / sample.size
    return lo, hi, share


def bracket_read(jit, xb: np.ndarray, words: np.ndarray, parts: int, bounds: np.ndarray, l2: bool,
                 divisors: np.ndarray, ones: int, inf_key: int, key_type, lo: int, hi: int,
                 share: float) -> tuple[int, int, int, bool, np.ndarray, np.ndarray]:
    """ONE read of the one-row, one-key-wide blocks ``xb`` (blocks × bw), in ``parts``
    ranges of blocks (``bounds``), writing each block's final word into ``words`` (0
    below the bracket ``[lo, hi]``, all ones above it, 0 inside it) and gathering the
    keys inside it with their indices in ``xb``, in row-major order. Returns (the largest
    key: non-finite scores when ``>= inf_key``, blocks below the bracket, blocks inside
    it, whether every range's candidates fitted the room planned from ``share``, the
    candidates' keys, their indices); the candidates are only whole when they fitted. The
    largest key is negative when some key is (a NaN keeping its sign: L2's ``-nan * -nan``)."""
    bw = xb.shape[1]
    acc = np.empty((parts, max(1, min(4096, xb.shape[0]))), dtype=xb.dtype)
    cand_keys, cand_idx = [], []
    for c in range(parts):
        cap = int(share * _CAP_SLACK * (bounds[c + 1] - bounds[c])) + _CAP_EXTRA
        cand_keys.append(np.empty(cap, dtype=np.int64))
        cand_idx.append(np.empty(cap, dtype=np.int64))
    keys = acc.view(key_type)
    flags = np.zeros((parts, -(-acc.shape[1] // 8) * 8), dtype=np.uint8)
    words8 = flags.view(np.uint64)
    busy = np.empty(words8.shape, dtype=np.int64)
    # scores >= +0 compare as their keys: the bracket's top as a score (+inf when open)
    hi_s = np.array(min(hi, inf_key), dtype=key_type).view(xb.dtype)[()]
    word_ones, lo_key, hi_key = words.dtype.type(ones), key_type(lo), key_type(min(hi, inf_key))
    counts = _run(parts, lambda c: jit._bracket_flat(
        xb, bounds[c], bounds[c + 1], bw, l2, divisors, acc[c], keys[c], flags[c], words8[c], busy[c], words,
        word_ones, hi_s, lo_key, hi_key, cand_keys[c], cand_idx[c]))
    tops = [int(t) for t, _, _ in counts]
    top = min(tops) if min(tops) < 0 else max(tops)
    below = sum(int(b) for _, b, _ in counts)
    inside = sum(int(n) for _, _, n in counts)
    fits = all(n <= ck.size for (_, _, n), ck in zip(counts, cand_keys))
    if parts == 1:
        ck, ci = cand_keys[0][: counts[0][2]], cand_idx[0][: counts[0][2]]
    elif fits:
        ck, ci = (np.concatenate([a[:n] for a, (_, _, n) in zip(arrays, counts)]) for arrays in (cand_keys, cand_idx))
    else:
        ck = ci = np.empty(0, dtype=np.int64)
    return top, below, inside, fits, ck, ci


def _bracket_mask(jit, xb: np.ndarray, words: np.ndarray, k: int, parts: int, bounds: np.ndarray, bw: int,
                  l2: bool, divisors: np.ndarray, ones: int, inf_key: int, key_type, on_nonfinite) -> bool:
    """The whole-block mask of one-row, one-key-wide blocks in ONE read of the data, into
    ``words`` (one word per block): a bracket ``[lo, hi]`` around the k-th lowest key is
    guessed from a sample, the read writes every block's final word outside it and
    gathers the keys inside it (~2 % of the blocks), and the cut among those settles the
    rest. ``False`` (the words then hold garbage) when the bracket missed the k-th key
    or held more candidates than planned, or without reading when the sample puts over
    ``_MAX_SHARE`` of the blocks inside it: the caller runs the three-pass path."""
    lo, hi, share = sample_bracket(jit, xb, k, l2, divisors, key_type)
    if share > _MAX_SHARE:  # the k-th key is heavily tied (zeroed blocks, say): three passes, no wasted read
        return False
    top, below, inside, fits, ck, ci = bracket_read(jit, xb, words, parts, bounds, l2, divisors, ones, inf_key,
                                                    key_type, lo, hi, share)
    if top >= inf_key or top < 0:
        on_nonfinite()  # raises for NaN/Inf data
    if not fits or not below <= k <= below + inside:
        return False
    need = k - below
    if need == 0:
        words[ci] = ones  # every candidate is kept
    else:
        jit._settle(ck, ci, need, words, words.dtype.type(ones))
    return True


def faster_than_torch(block_shape: tuple[int, int], zeros_per_block: int, nbytes: int) -> bool:
    """Whether this kernel beats the torch path for such blocks (measured at 1M x 64, one
    thread, process CPU time): one-row blocks one key wide ((1,4) float32: 34 ms against
    ~270 ms; (1,8) float64) and one-row blocks pruned partly ((1,8) float32 with 4 zeros:
    0.63 s against 0.82 s). Elsewhere its byte-wise keys and per-element ranks lose:
    (2,2) whole 0.67 s against 0.36 s, (4,1) 0.73 s against 0.35 s, (1,8) float32 whole
    0.48 s against 0.30 s, (2,2) with 2 zeros 1.07 s against 0.80 s."""
    bh, bw = block_shape
    return bh == 1 and (bw == nbytes or zeros_per_block < bw)


def k_lowest_cut(hist: np.ndarray, k: int, n_blocks: int, shift: int,
                 gather: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]) -> tuple[int, int]:
    """(threshold key, last flat index pruned among the keys equal to it) for the ``k``
    lowest of ``n_blocks`` keys ``>= 0``, from their top-digit histogram per range of
    block rows (``hist``, ranges × bins) and ``gather(digit, offsets, keys, idx)``, which
    fills the keys of that digit and their flat indices in row-major order."""
    if k <= 0:
        return -1, -1  # nothing pruned
    if k >= n_blocks:
        return np.iinfo(np.int64).max, n_blocks
    total = hist.sum(0)
    cums = np.cumsum(total)
    digit = int(np.searchsorted(cums, k))  # first bin whose running count reaches k
    need = k - int(cums[digit] - total[digit])
    if need == int(total[digit]):  # the whole digit is pruned
        return ((digit + 1) << shift) - 1, n_blocks
    offsets = np.concatenate([[0], np.cumsum(hist[:, digit])]).astype(np.int64)
    keys = np.empty(int(total[digit]), dtype=np.int64)
    idx = np.empty(int(total[digit]), dtype=np.int64)
    gather(digit, offsets, keys, idx)
    threshold = int(np.partition(keys, need - 1)[need - 1])
    ties = need - int(np.count_nonzero(keys < threshold))  # >= 1
    return threshold, int(idx[keys == threshold][ties - 1])
