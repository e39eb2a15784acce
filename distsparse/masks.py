"""Pure tensor functions: block scores, exact lowest-k selection, within-block zeros, bit packing.

No state, no communication. Every function works on the data's device and never
materialises more than the block scores, the mask and one row chunk of temporaries:
the data is scored in chunks of whole block rows, the lowest blocks are found by
selection (``kthvalue``) rather than a sort, and the mask is a ``bool`` tensor.

Tie rule (the same on every rank and every run): among blocks with equal scores the one
with the lower row-major block index is pruned first; inside a block, among elements with
equal magnitude the one with the lower row-major position is zeroed first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import fused_triton
from .kernels.fused_cpu import fused_block_mask
from .kernels.radix import ShardSelection
from .kernels.unpack_rows import pack_blocks

__all__ = [
    "as_matrix",
    "block_scores",
    "lowest_blocks",
    "norm_block_mask",
    "pack_bits",
    "unpack_bits",
    "packed_size",
    "pack_block_bits",
    "unpack_block_bits",
    "block_bits_size",
]

# Elements scored per chunk: big enough to amortise kernel launches, small enough that
# the |x| temporary stays a rounding error next to the data. On CPU a chunk also stays in
# cache; a GPU needs far bigger ones to amortise its launches (H100, 1M x 64 table:
# block_scores 4.4 ms with 2**20-element chunks, 0.8 ms with 2**24).
_CHUNK_ELEMENTS = 1 << 20
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def as_matrix(data: torch.Tensor) -> torch.Tensor:
    """The 2-D view a block mask is computed on: 1-D data is one row; N-D data
    (N > 2) is ``(prod(shape[:-1]), shape[-1])`` — blocks run along the last dimension
    and across the flattened leading dimensions."""
    if data.dim() == 1:
        return data.reshape(1, -1)
    if data.dim() == 2:
        return data
    return data.reshape(-1, data.shape[-1])


def _magnitude(chunk: torch.Tensor, norm: str) -> torch.Tensor:
    # Same arithmetic as torch.ao (|x| or x*x in the data's dtype), so rankings match it.
    return chunk.abs() if norm == "L1" else chunk * chunk


def _row_chunks(rows: int, cols: int, block_rows: int, device: torch.device) -> range:
    budget = _CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    per_chunk = max(1, budget // max(cols, 1) // block_rows) * block_rows
    return range(0, rows, per_chunk)


def block_scores(matrix: torch.Tensor, block_shape: tuple[int, int], norm: str) -> torch.Tensor:
    """Mean of |x| (L1) or x² (L2) over each block's valid elements, shape (block rows, block cols).

    The arithmetic is torch.ao's ``avg_pool2d(ceil_mode=True)`` (edge blocks averaged over
    their valid elements), one chunk of whole block rows at a time. When blocks tile the
    data exactly and the dtype accumulates in itself (float32/float64), the same sums are
    formed by strided adds in the kernel's order — element (0,0), (0,1), … of each block,
    then one division — which is bit-identical and about a third faster.
    """
    rows, cols = matrix.shape
    bh, bw = block_shape
    n_br, n_bc = -(-rows // bh), -(-cols // bw)
    out = torch.empty(n_br, n_bc, dtype=matrix.dtype, device=matrix.device)
    step = _row_chunks(rows, cols, bh, matrix.device).step
    tiled = rows % bh == 0 and cols % bw == 0 and matrix.dtype in (torch.float32, torch.float64)
    for start in range(0, rows, step):
        chunk = _magnitude(matrix[start : start + step], norm)
        target = out[start // bh : start // bh + -(-chunk.shape[0] // bh)]
        if tiled:
            grid = chunk.view(-1, bh, n_bc, bw)
            target.copy_(grid[:, 0, :, 0])
            for a in range(bh):
                for b in range(bw):
                    if a or b:
                        target.add_(grid[:, a, :, b])
            target.div_(bh * bw)
        else:
            pooled = F.avg_pool2d(chunk[None, None], kernel_size=block_shape, stride=block_shape, ceil_mode=True)
            target.copy_(pooled[0, 0])
    return out


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, exactly, in linear time."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.float16):
        # numpy's introselect is several times faster than torch.kthvalue on CPU.
        return torch.as_tensor(np.partition(flat.numpy(), k - 1)[k - 1])
    if flat.device.type != "cpu":
        return _kth_smallest_by_topk(flat, k)
    return flat.kthvalue(k).values


def _kth_smallest_by_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value as the edge of the smaller side of a ``topk``: on CUDA,
    ``kthvalue`` sorts (H100, 16M scores: 118 ms) while ``topk`` selects (1.2 ms); the
    temporary holds at most half the scores."""
    n = flat.numel()
    if k <= n - k + 1:
        return torch.topk(flat, k, largest=False, sorted=False).values.max()
    return torch.topk(flat, n - k + 1, largest=True, sorted=False).values.min()


def lowest_blocks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean tensor (scores' shape) marking exactly the ``k`` lowest scores.

    Exact and deterministic: a linear-time selection finds the k-th smallest score;
    everything up to it is taken, and if ties at that value would take too many, the
    ones with the highest flat indices are given back.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = _kth_smallest(flat, k).to(flat.device)
    chosen = flat <= threshold
    excess = int(torch.count_nonzero(chosen)) - k
    if excess > 0:
        ties = (flat == threshold).nonzero().reshape(-1)
        chosen[ties[ties.numel() - excess :]] = False
    return chosen.reshape(scores.shape)


# From this many blocks on, the radix selection of distsparse.distributed.selection (run locally) beats
# numpy's introselect + the tie pass (measured: 16M float32 scores, 0.10 s vs 0.15 s).
_RADIX_MIN_BLOCKS = 1 << 20


def _lowest_blocks_consuming(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`lowest_blocks`, free to overwrite ``scores`` (their memory becomes the radix
    keys): the same flags bit for bit, by the same selection the distributed step runs."""
    n = scores.numel()
    if n < _RADIX_MIN_BLOCKS or k <= 0 or k >= n or scores.dtype not in (torch.float32, torch.float64) \
            or scores.device.type != "cpu":
        # On a GPU topk's selection wins at every size (H100, 16M scores: 0.6 ms against
        # the radix's 4.0 ms) for a temporary of at most half the scores' values + indices.
        return lowest_blocks(scores, k)
    selection = ShardSelection(scores, n, k, digit_bits=16)
    while not selection.done:
        selection.advance(selection.histogram())
    pruned = selection.pruned(0)
    selection.release()  # the keys (the scores' memory) can go before the mask is allocated
    return pruned


def _smallest_per_block(elements: list[torch.Tensor], count: int, nan_last: bool = False) -> list[torch.Tensor]:
    """For each block position, whether that element is among its block's ``count``
    smallest (ties to the lower position). ``elements[p]`` holds position p of every block.

    Few positions: rank each one by comparing it with the others (n² cheap passes over
    strided views, no copy of the data). Many: one stable sort of the gathered blocks.
    ``nan_last``: NaN (padding) ranks above everything, +inf included, as in torch's sort.
    """
    n = len(elements)
    if n <= 8:
        nans = [torch.isnan(e) for e in elements] if nan_last else None
        chosen = []
        for i in range(n):
            rank = torch.zeros(elements[i].shape, dtype=torch.uint8, device=elements[i].device)
            for j in range(n):
                if j == i:
                    continue
                below = elements[j] <= elements[i] if j < i else elements[j] < elements[i]
                if nans is not None:  # a real element ranks below padding; padding by position
                    below |= nans[i] & (~nans[j] if j > i else torch.ones_like(nans[j]))
                rank += below
            chosen.append(rank < count)
        return chosen
    values = torch.stack(elements, dim=-1)
    order = torch.sort(values, dim=-1, stable=True).indices[..., :count]
    flags = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, order, True)
    return list(flags.unbind(-1))


def _within_block_keep(
    matrix: torch.Tensor,
    pruned: torch.Tensor,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    mask_blocks: torch.Tensor,
) -> None:
    """In each pruned block, keep all but its ``zeros_per_block`` smallest elements.

    ``mask_blocks`` is the padded mask viewed as (block rows, block cols, bh, bw).
    Works one chunk of block rows at a time; padding is chosen last (as torch.ao's NaN
    padding is): +inf normally, NaN ranked above +inf when real magnitudes are +inf too
    (float16 squares overflow), since +inf padding would tie with them and win on position.
    """
    rows, cols = matrix.shape
    bh, bw = block_shape
    n_br, n_bc = pruned.shape
    step_br = _row_chunks(rows, cols, bh, matrix.device).step // bh
    for br0 in range(0, n_br, step_br):
        br1 = min(n_br, br0 + step_br)
        chunk_pruned = pruned[br0:br1]
        if not bool(chunk_pruned.any()):
            continue
        chunk = _magnitude(matrix[br0 * bh : br1 * bh], norm)
        nan_last = False
        if chunk.shape != ((br1 - br0) * bh, n_bc * bw):
            nan_last = bool(torch.isinf(chunk).any())
            fill = float("nan") if nan_last else float("inf")
            padded = torch.full(((br1 - br0) * bh, n_bc * bw), fill, dtype=chunk.dtype, device=chunk.device)
            padded[: chunk.shape[0], : chunk.shape[1]] = chunk
            chunk = padded
        grid = chunk.view(br1 - br0, bh, n_bc, bw)
        positions = [(a, b) for a in range(bh) for b in range(bw)]
        zeroed = _smallest_per_block([grid[:, a, :, b] for a, b in positions], zeros_per_block, nan_last)
        out = mask_blocks[br0:br1]
        for (a, b), zero in zip(positions, zeroed):
            torch.logical_not(zero & chunk_pruned, out=zero)
            out[:, :, a, b] = zero


def _check_finite(data: torch.Tensor) -> None:
    bad = ~torch.isfinite(data)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"data contains {int(bad.sum())} NaN/Inf value(s), first at index {first} "
            f"(value {data[first].item()})"
        )


_WORD_TYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fill_blocks(mask: torch.Tensor, keep: torch.Tensor, block_shape: tuple[int, int]) -> None:
    """Write each block's keep flag into every element of the (padded) block mask.

    When a block row is 1, 2, 4 or 8 bytes wide, one integer per block row (all bytes 0
    or all 1) is written through an integer view of the bool mask: a quarter to an eighth
    of the stores of an element-wise broadcast copy.
    """
    n_br, n_bc = keep.shape
    bh, bw = block_shape
    word = _WORD_TYPES.get(bw)
    # A one-row slice of a wider mask is "contiguous" whatever its row stride: check the stride.
    if word is not None and mask.is_contiguous() and mask.stride(0) % bw == 0 and mask.storage_offset() % bw == 0:
        ones = int.from_bytes(b"\x01" * bw, "little")
        if bw == 8:
            ones = int.from_bytes(b"\x01" * 8, "little", signed=True)
        words = mask.view(torch.uint8).view(word).view(n_br, bh, n_bc)
        torch.mul(keep.to(word)[:, None, :], ones, out=words) if bh == 1 else \
            words.copy_((keep.to(word) * ones)[:, None, :].expand(n_br, bh, n_bc))
        return
    mask.view(n_br, bh, n_bc, bw).copy_(keep[:, None, :, None].expand(n_br, bh, n_bc, bw))


def norm_block_mask(
    data: torch.Tensor,
    sparsity_level: float,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    norm: str,
) -> torch.Tensor:
    """The ``DataNormSparsifier`` mask for ``data`` (bool, data's shape and device; True keeps).

    Zeroes exactly ``round(sparsity_level * number_of_blocks)`` lowest-scoring blocks
    (Python's round, half to even, as torch.ao), and inside each of those its
    ``zeros_per_block`` smallest elements.
    """
    matrix = as_matrix(data)
    rows, cols = matrix.shape
    bh, bw = block_shape
    values_per_block = bh * bw
    if data.numel() == 0:
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    if sparsity_level <= 0 or zeros_per_block == 0:
        _check_finite(data)
        return torch.ones(data.shape, dtype=torch.bool, device=data.device)
    n_blocks = -(-rows // bh) * -(-cols // bw)
    if data.device.type == "cuda" and fused_triton.available():  # the Triton kernels, same bits
        fused = fused_triton.fused_block_mask(matrix, round(sparsity_level * n_blocks), block_shape, zeros_per_block,
                                              norm, lambda: _check_finite(data))
        if fused is not None:
            return fused.reshape(data.shape)
    fused = fused_block_mask(matrix, round(sparsity_level * n_blocks), block_shape, zeros_per_block, norm,
                             lambda: _check_finite(data))
    if fused is not None:  # the compiled one-read path (distsparse.kernels.fused_cpu), same bits
        return fused.reshape(data.shape)
    scores = block_scores(matrix, block_shape, norm)
    if not bool(torch.isfinite(scores.amax())):  # one pass, no temporary; NaN propagates
        _check_finite(data)  # else finite data whose squares overflowed: inf scores rank last
    k = round(sparsity_level * scores.numel())
    pruned = _lowest_blocks_consuming(scores, k)
    del scores
    n_br, n_bc = pruned.shape
    exact = rows == n_br * bh and cols == n_bc * bw
    mask = torch.empty(n_br * bh, n_bc * bw, dtype=torch.bool, device=data.device)
    mask_blocks = mask.view(n_br, bh, n_bc, bw).permute(0, 2, 1, 3)
    _fill_blocks(mask, torch.logical_not(pruned), block_shape)
    if zeros_per_block < values_per_block and k > 0:
        # Pruned blocks keep all but their smallest zeros_per_block elements.
        _within_block_keep(matrix, pruned, block_shape, zeros_per_block, norm, mask_blocks)
    if not exact:
        mask = mask[:rows, :cols].contiguous()
    return mask.reshape(data.shape)


# -- bit packing ------------------------------------------------------------------------


def packed_size(numel: int) -> int:
    """Bytes that ``pack_bits`` produces for ``numel`` mask elements."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """1 bit per element, row-major, most significant bit first, last byte zero-padded
    (the layout of ``numpy.packbits``). A 1-D ``uint8`` tensor of
    ``packed_size(mask.numel())`` bytes on ``mask``'s device.
    """
    flat = mask.detach().reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat.to(torch.bool)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))  # ~10x faster than the torch ops
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    packed = bits[:, 0] << 7
    for i in range(1, 8):
        packed |= bits[:, i] << (7 - i)
    return packed


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a ``bool`` tensor of ``shape`` on ``packed``'s device."""
    numel = math.prod(int(s) for s in shape)
    if packed.numel() != packed_size(numel):
        raise ValueError(f"packed mask has {packed.numel()} bytes, expected {packed_size(numel)} "
                         f"for shape {tuple(shape)}")
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.contiguous().numpy(), count=numel)
        return torch.from_numpy(bits).view(torch.bool).reshape(tuple(shape))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(tuple(shape))


def block_bits_size(shape: tuple[int, int], block_shape: tuple[int, int]) -> int:
    """Bytes that :func:`pack_block_bits` produces for a 2-D mask of ``shape``."""
    (rows, cols), (bh, bw) = shape, block_shape
    return packed_size(-(-rows // bh) * -(-cols // bw))


def pack_block_bits(mask: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """One bit per block of a 2-D mask that is constant on each of its blocks (the
    top-left element of each; edge blocks may be cut), in :func:`pack_bits`'s layout:
    a whole-block pruning mask travels in ``1 / (bh·bw)`` of :func:`pack_bits`'s bytes."""
    fast = pack_blocks(mask, block_shape)
    if fast is not None:
        return fast
    bh, bw = block_shape
    return pack_bits(mask[::bh, ::bw])


def unpack_block_bits(packed: torch.Tensor, shape: tuple[int, int], block_shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_block_bits`: the ``bool`` 2-D mask of ``shape``, each block
    filled with its bit (``kernels.unpack_rows.unpack_blocks_into`` writes into place)."""
    (rows, cols), (bh, bw) = shape, block_shape
    flags = unpack_bits(packed, (-(-rows // bh), -(-cols // bw)))
    return flags.repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]


# -- shards ------------------------------------------------------------------------------


def mask_from_pruned(
    matrix: torch.Tensor,
    pruned: torch.Tensor,
    block_shape: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask of a 2-D ``matrix`` (bool, its shape; True keeps) given which of its blocks
    are pruned (bool, ``(ceil(rows / bh), ceil(cols / bw))``): the second half of
    :func:`norm_block_mask`, for a shard whose blocks were selected elsewhere (see
    ``distsparse.distributed.selection``). Inside a pruned block its ``zeros_per_block`` smallest
    elements are zeroed, exactly as :func:`norm_block_mask` does. ``out``: a contiguous
    bool tensor of the matrix's shape to write into (the rows of a whole mask), returned.
    """
    rows, cols = matrix.shape
    bh, bw = block_shape
    n_br, n_bc = -(-rows // bh), -(-cols // bw)
    if tuple(pruned.shape) != (n_br, n_bc):
        raise ValueError(f"pruned flags have shape {tuple(pruned.shape)}, expected {(n_br, n_bc)} "
                         f"for a {rows}x{cols} matrix with blocks {tuple(block_shape)}")
    exact = rows == n_br * bh and cols == n_bc * bw
    if out is not None and (tuple(out.shape) != (rows, cols) or out.dtype != torch.bool):
        raise ValueError(f"out must be a bool tensor of shape {(rows, cols)}, got {out.dtype} {tuple(out.shape)}")
    if out is not None and exact and out.is_contiguous():
        mask = out
    else:
        mask = torch.empty(n_br * bh, n_bc * bw, dtype=torch.bool, device=matrix.device)
    if mask.numel() == 0:
        return mask[:rows, :cols].contiguous() if out is None else out
    mask_blocks = mask.view(n_br, bh, n_bc, bw).permute(0, 2, 1, 3)
    pruned = pruned.to(device=matrix.device, dtype=torch.bool)
    _fill_blocks(mask, torch.logical_not(pruned), block_shape)
    if zeros_per_block < bh * bw and bool(pruned.any()):
        _within_block_keep(matrix, pruned, block_shape, zeros_per_block, norm, mask_blocks)
    if out is not None:
        if mask is not out:
            out.copy_(mask[:rows, :cols])
        return out
    if not exact:
        mask = mask[:rows, :cols].contiguous()
    return mask
