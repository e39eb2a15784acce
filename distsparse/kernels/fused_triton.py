"""Fused GPU block mask in Triton: one read of the data, on-device radix selection, one mask write.

The same design as :mod:`.fused_cpu`, for CUDA tensors (``triton`` is optional: the pyproject
extra ``gpu``; without it, or with ``DISTSPARSE_FUSED_TRITON=0``, the torch path runs):

1. **Scores, keys and the first histogram in one read** (``score_kernel``). Each block's
   score is formed with exactly the torch path's arithmetic (``|x|`` or ``x*x`` rounded to
   the data's dtype; summed from 0 in row-major order within the block, in float32 for
   float16/bfloat16/float32 data and float64 for float64 — ``avg_pool2d``'s accumulator;
   one correctly rounded division by the block's *valid* elements, so blocks cut by the
   table's edge are averaged over what they hold; rounded to the data's dtype). The score
   is stored once; its bit pattern is its order key (scores are ``>= +0``). Each program
   counts its keys' top digit in a local histogram and adds it to the global one.
2. **Refinement on the device.** A one-program kernel (``pick_kernel``) scans the
   histogram and stores the chosen digit prefix and the count still to prune; the next
   round histograms the next digit of the candidates (the keys matching the prefix). The
   second round scans every key once more and, when the first digit's candidates fit a
   buffer of 1/16 of the blocks, compacts them into it; later rounds read only that list.
   The number of rounds is fixed by the key width (2 for 16-bit, 3 for 32-bit, 6 for 64-bit
   keys), so nothing is read back to the host: the step can be captured in a CUDA graph
   (:class:`GraphedBlockMask`).
3. **One compare-and-write pass** (``mask_kernel``), after a per-program count of the keys
   equal to the threshold and its prefix sum (``torch.cumsum`` on the device): ties go to
   the lowest global block index first; a pruned block keeps all but its
   ``zeros_per_block`` smallest valid elements (ties to the lower position).

NaN/Inf data: the score pass raises a device flag for a non-finite score; it is read once,
after the mask is written (the one host sync of :func:`fused_block_mask`), and then the
caller's check decides (it raises for NaN/Inf data; finite data whose squares overflowed
keeps its +inf scores, which rank last). :class:`GraphedBlockMask` leaves the flag to you.

Memory: the mask (the output) plus one score per block (the keys are the scores' own
bits) and a few KiB of histograms. Kernels run on CUDA tensors; in a process started with
``TRITON_INTERPRET=1`` they also run on CPU tensors under Triton's interpreter (the tests).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = [
    "available", "interpreting", "supports", "digit_rounds", "block_scores", "fused_block_mask", "GraphedBlockMask",
]

# Data kinds of the kernels, their key widths and the key of +inf.
_KIND = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_KEY_BITS = {0: 32, 1: 64, 2: 16, 3: 16}
_KEY_VIEW = {0: torch.int32, 1: torch.int64, 2: torch.int16, 3: torch.int16}
_INF_KEY = {0: 0x7F800000, 1: 0x7FF0000000000000, 2: 0x7C00, 3: 0x7F80}
_MAX_DIGIT_BITS = 11  # 2048 bins: the RAFT/cuVS "AIR top-k" choice
_BLOCK = 1024  # blocks per program (score, refine, ties and mask passes)
_MAX_BLOCK_VALUES = 1024  # larger blocks: the torch path (the mask pass ranks elements pairwise)


def available() -> bool:
    """Whether CUDA tensors take this path: triton importable and not disabled by
    ``DISTSPARSE_FUSED_TRITON=0``."""
    return _HAS_TRITON and os.environ.get("DISTSPARSE_FUSED_TRITON", "1") != "0"


def supports(matrix: torch.Tensor, block_shape: tuple[int, int]) -> bool:
    """Whether these kernels cover this 2-D input (dtype, size; any strides)."""
    bh, bw = block_shape
    n_blocks = -(-matrix.shape[0] // bh) * -(-matrix.shape[1] // bw) if matrix.dim() == 2 else 0
    return (matrix.dim() == 2 and matrix.dtype in _KIND and 0 < matrix.numel() < 2**31 and n_blocks < 2**31
            and bh * bw <= _MAX_BLOCK_VALUES)


def digit_rounds(key_bits: int) -> list[tuple[int, int]]:
    """The radix rounds ``(shift, width)`` over the ``key_bits - 1`` bits of keys >= 0, most
    significant first, at most 11 bits each and as even as possible (float32: 11, 10, 10)."""
    bits = key_bits - 1
    n = -(-bits // _MAX_DIGIT_BITS)
    widths = [bits // n + (i < bits % n) for i in range(n)]
    out, left = [], bits
    for w in widths:
        left -= w
        out.append((left, w))
    return out


def interpreting() -> bool:
    """Whether this process runs Triton kernels under its interpreter (``TRITON_INTERPRET=1``
    when triton was imported: triton decorates its own library then, so the mode is the
    process's, fixed at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels() -> ModuleType:
    from . import _fused_triton_jit  # triton's import and the kernels' decoration, on first use

    return _fused_triton_jit


class _Plan:
    """The buffers and launches of one fused step for one input shape: every launch is
    asynchronous and reads its counts from device memory, so :meth:`launch` can be
    replayed from a CUDA graph."""

    def __init__(self, matrix: torch.Tensor, k: int, block_shape: tuple[int, int], zeros_per_block: int,
                 norm: str) -> None:
        if matrix.device.type != "cuda" and not interpreting():
            raise ValueError(f"the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before triton's "
                             f"import), got one on {matrix.device}")
        self.jit = _kernels()
        self.matrix = matrix
        self.kind = _KIND[matrix.dtype]
        rows, cols = matrix.shape
        bh, bw = block_shape
        self.shape = (rows, cols)
        self.block_shape = (bh, bw)
        self.n_bc = -(-cols // bw)
        self.n_blocks = -(-rows // bh) * self.n_bc
        self.k = min(max(int(k), 0), self.n_blocks)
        self.zeros = int(zeros_per_block)
        self.l2 = norm == "L2"
        self.rounds = digit_rounds(_KEY_BITS[self.kind])
        dev = matrix.device
        self.data = matrix.view(torch.int16) if self.kind == 3 else matrix
        self.scores = torch.empty(self.n_blocks, dtype=matrix.dtype, device=dev)
        self.keys = self.scores.view(_KEY_VIEW[self.kind])
        self.programs = -(-self.n_blocks // _BLOCK)
        bins = sum(1 << w for _, w in self.rounds)
        self.counters = torch.empty(bins + 2, dtype=torch.int32, device=dev)  # zeroed by one launch per step
        self.hist, self.flag, self.ncand = self.counters[:bins], self.counters[bins:bins + 1], self.counters[bins + 1:]
        # threshold prefix, left to prune, candidates after the first digit
        self.state = torch.empty(3, dtype=torch.int64, device=dev)
        self.cap = _candidate_capacity(self.n_blocks) if len(self.rounds) > 2 else 0
        self.cand = torch.empty(max(self.cap, 1), dtype=torch.int64 if self.kind == 1 else torch.int32, device=dev)
        self.tie_counts = torch.empty(self.programs, dtype=torch.int64, device=dev)
        self.ties_before = torch.zeros(self.programs + 1, dtype=torch.int64, device=dev)  # [0] stays 0
        self.mask = torch.empty(rows, cols, dtype=torch.bool, device=dev)

    def score(self) -> None:
        """Scores, keys, the first histogram and the non-finite flag (zeroes the counters)."""
        rows, cols = self.shape
        bh, bw = self.block_shape
        self.counters.zero_()
        shift, width = self.rounds[0]
        self.jit.score_kernel[(self.programs,)](
            self.data, self.keys, self.hist, self.flag, rows, cols, self.matrix.stride(0), self.matrix.stride(1),
            self.n_bc, self.n_blocks, _INF_KEY[self.kind], int(self.l2), BH=bh, BW=bw, BWP=triton_next_pow2(bw),
            KIND=self.kind, SHIFT=shift, BINS=1 << width, BLOCK=_BLOCK, enable_fp_fusion=False)

    def launch(self) -> None:
        """The whole step on the current stream, no host sync: ``self.mask`` and ``self.flag``."""
        rows, cols = self.shape
        bh, bw = self.block_shape
        self.score()
        base = 0
        for i, (shift, width) in enumerate(self.rounds):
            hist = self.hist[base:base + (1 << width)]
            if i:
                self.jit.refine_kernel[(self.programs,)](
                    self.keys, self.cand, self.ncand, hist, self.state, self.n_blocks, self.cap, KIND=self.kind,
                    HIGH=shift + width, SHIFT=shift, BINS=1 << width, BLOCK=_BLOCK, MODE=min(i, 2))
            self.jit.pick_kernel[(1,)](hist, self.state, self.k, FIRST=i == 0, WIDTH=width, BINS=1 << width)
            base += 1 << width
        self.jit.ties_kernel[(self.programs,)](self.keys, self.state, self.tie_counts, self.n_blocks,
                                               KIND=self.kind, BLOCK=_BLOCK)
        torch.cumsum(self.tie_counts, 0, out=self.ties_before[1:])  # exclusive prefix: ties_before[:-1]
        values = bh * bw
        self.jit.mask_kernel[(self.programs,)](
            self.data, self.keys, self.state, self.ties_before, self.mask.view(torch.uint8), rows, cols,
            self.matrix.stride(0), self.matrix.stride(1), self.n_bc, self.n_blocks, self.zeros, int(self.l2), BH=bh,
            BW=bw, BWP=triton_next_pow2(bw), PP=triton_next_pow2(values), KIND=self.kind,
            WHOLE=self.zeros >= values, BLOCK=_BLOCK, enable_fp_fusion=False)


def _candidate_capacity(n_blocks: int) -> int:
    """Keys the compacted candidate list holds (1/16 of the blocks, at least 4096): when the
    first digit's candidates fit, the rounds after the second read them instead of every key."""
    return min(n_blocks, max(4096, n_blocks // 16))


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_scores(matrix: torch.Tensor, block_shape: tuple[int, int], norm: str) -> torch.Tensor:
    """The score pass alone: ``masks.block_scores``'s values bit for bit, shape
    (block rows, block cols)."""
    if not supports(matrix, block_shape):
        raise ValueError(f"the Triton kernels do not cover a {matrix.dtype} {tuple(matrix.shape)} "
                         f"matrix with blocks {tuple(block_shape)}")
    plan = _Plan(matrix, 0, block_shape, 0, norm)
    plan.score()
    return plan.scores.view(-(-matrix.shape[0] // block_shape[0]), plan.n_bc)


def fused_block_mask(
    matrix: torch.Tensor,
    k: int,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    on_nonfinite: Callable[[], None],
) -> torch.Tensor | None:
    """The mask of the 2-D ``matrix`` (bool, its shape) pruning its ``k`` lowest-scoring
    blocks — bit for bit ``masks.norm_block_mask``'s — or ``None`` where these kernels do
    not apply (triton missing or disabled, dtype, size), and the caller runs the torch path.

    ``on_nonfinite`` is called (after the kernels, one host read of a flag) when some block
    score is inf or NaN: it raises for NaN/Inf data. CUDA tensors; CPU tensors only under
    Triton's interpreter (the tests).
    """
    if not available() or not supports(matrix, block_shape):
        return None
    plan = _Plan(matrix.detach(), k, block_shape, zeros_per_block, norm)
    plan.launch()
    if int(plan.flag.item()):
        on_nonfinite()  # raises for NaN/Inf data; else +inf scores (overflowed squares) rank last
    return plan.mask


class GraphedBlockMask:
    """One fused step captured in a CUDA graph, for a training loop that recomputes the
    mask of the same tensor (same storage, shape, dtype, ``k``) every step: :meth:`__call__`
    replays the graph — no host work per kernel, no host sync — and returns the (reused)
    mask tensor. Update the data in place; a new tensor needs a new capture.

    The non-finite check is yours: :attr:`nonfinite` is a device int32 tensor, nonzero
    when a block score was inf/NaN in the last replay (read it when you can afford a sync).
    ``graph=False`` runs the same launches eagerly (the interpreter tests use it).
    """

    def __init__(self, matrix: torch.Tensor, k: int, block_shape: tuple[int, int], zeros_per_block: int,
                 norm: str, *, graph: bool = True) -> None:
        if not _HAS_TRITON or not supports(matrix, block_shape):
            raise ValueError(f"the Triton kernels do not cover a {matrix.dtype} {tuple(matrix.shape)} "
                             f"matrix with blocks {tuple(block_shape)} (or triton is not installed)")
        self._plan = _Plan(matrix.detach(), k, block_shape, zeros_per_block, norm)
        self._graph = None
        if graph:
            if matrix.device.type != "cuda":
                raise ValueError("a CUDA graph needs a CUDA tensor")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._plan.launch()  # compiles every kernel before the capture
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._plan.launch()

    @property
    def nonfinite(self) -> torch.Tensor:
        return self._plan.flag

    def __call__(self) -> torch.Tensor:
        if self._graph is None:
            self._plan.launch()
        else:
            self._graph.replay()
        return self._plan.mask
