"""Unpack bit-packed mask rows straight into their place in a bool mask.

``masks.unpack_bits`` returns a new tensor, which the closing exchange of a split group
then copies into the rows of the whole mask: two writes and one more fresh table-sized
allocation per step (page faults, which cost a lot on a loaded machine). This kernel
writes the bits once, into the destination. Layout: :func:`distsparse.masks.pack_bits`'s
(row-major, most significant bit first).

:func:`unpack_blocks_into` does the same for one bit per block
(``masks.pack_block_bits``): each bit fills its block, a block row at a time, through a
word as wide as the block where the rows tile into such words.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

__all__ = ["unpack_into", "unpack_blocks_into"]

_HAS_NUMBA = importlib.util.find_spec("numba") is not None
_jit = None


def unpack_into(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Write the bits of ``packed`` (uint8, CPU) into the contiguous CPU bool tensor
    ``out``; returns False (nothing written) where this kernel does not apply."""
    if not (_HAS_NUMBA and out.device.type == "cpu" and packed.device.type == "cpu" and out.is_contiguous()
            and out.dtype == torch.bool and packed.numel() * 8 >= out.numel()):
        return False
    _compiled()[0](packed.contiguous().numpy(), out.view(torch.uint8).reshape(-1).numpy(), np.uint8(1))
    return True


def _compiled():
    """The kernels, compiled on first use: (unpack_words, unpack_blocks, pack_words)."""
    global _jit
    if _jit is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def unpack_words(packed, out, one):
            # bit b sets word b to ``one`` or 0: one bool per word (unpack_into), or one block per word
            n = out.size
            full = n // 8
            for i in range(full):
                byte = packed[i]
                base = i * 8
                for j in range(8):
                    out[base + j] = ((byte >> (7 - j)) & 1) * one
            for j in range(n - full * 8):
                out[full * 8 + j] = ((packed[full] >> (7 - j)) & 1) * one

        @njit(cache=True, nogil=True)
        def unpack_blocks(packed, out, bh, bw):
            rows, cols = out.shape
            n_bc = (cols + bw - 1) // bw
            for i in range(rows):
                first = (i // bh) * n_bc
                for jb in range(n_bc):
                    b = first + jb
                    v = (packed[b >> 3] >> (7 - (b & 7))) & 1
                    for j in range(jb * bw, min(jb * bw + bw, cols)):
                        out[i, j] = v

        @njit(cache=True, nogil=True)
        def pack_words(words, packed):
            # bit b set when word b is nonzero (a block row's bytes are all 0 or all 1)
            n = words.size
            full = n // 8
            for i in range(full):
                base = i * 8
                byte = 0
                for j in range(8):
                    byte = (byte << 1) | (words[base + j] != 0)
                packed[i] = byte
            if n > full * 8:
                byte = 0
                for j in range(8):
                    byte = (byte << 1) | (full * 8 + j < n and words[full * 8 + j] != 0)
                packed[full] = byte

        _jit = (unpack_words, unpack_blocks, pack_words)
    return _jit


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _block_words(mask: torch.Tensor, block_shape: tuple[int, int]) -> np.ndarray | None:
    """A contiguous CPU bool 2-D mask of one-row blocks that tile its rows, as one word
    per block (1-D), or None."""
    bh, bw = block_shape
    if not (_HAS_NUMBA and mask.device.type == "cpu" and mask.dim() == 2 and mask.is_contiguous()
            and mask.dtype == torch.bool and bh == 1 and bw in _WORDS and mask.shape[1] % bw == 0):
        return None
    flat = mask.view(torch.uint8).numpy().reshape(-1)
    return flat.view(_WORDS[bw]) if flat.ctypes.data % bw == 0 else None


def pack_blocks(mask: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor | None:
    """``masks.pack_block_bits`` of a block-constant mask of one-row blocks that tile its
    rows, in one pass over the mask; None where this kernel does not apply."""
    words = _block_words(mask, block_shape)
    if words is None:
        return None
    packed = np.empty((words.size + 7) // 8, dtype=np.uint8)
    _compiled()[2](words, packed)
    return torch.from_numpy(packed)


def unpack_blocks_into(packed: torch.Tensor, out: torch.Tensor, block_shape: tuple[int, int]) -> bool:
    """Fill each ``block_shape`` block of the contiguous 2-D CPU bool tensor ``out`` with
    its bit of ``packed`` (``masks.pack_block_bits``'s layout); returns False (nothing
    written) where this kernel does not apply."""
    if not (_HAS_NUMBA and out.device.type == "cpu" and packed.device.type == "cpu" and out.dim() == 2
            and out.is_contiguous() and out.dtype == torch.bool):
        return False
    rows, cols = out.shape
    bh, bw = block_shape
    if packed.numel() * 8 < -(-rows // bh) * -(-cols // bw):
        return False
    source = packed.contiguous().numpy()
    words = _block_words(out, block_shape)
    if words is not None:
        _compiled()[0](source, words, words.dtype.type(int.from_bytes(b"\x01" * bw, "little")))
    else:
        _compiled()[1](source, out.view(torch.uint8).numpy(), bh, bw)
    return True
