"""Unpack bit-packed mask rows straight into their place in a bool mask.

``masks.unpack_bits`` returns a new tensor, which the closing exchange of a split group
then copies into the rows of the whole mask: two writes and one more fresh table-sized
allocation per step (page faults, which cost a lot on a loaded machine). This kernel
writes the bits once, into the destination. Layout: :func:`distsparse.masks.pack_bits`'s
(row-major, most significant bit first).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

__all__ = ["unpack_into"]

_HAS_NUMBA = importlib.util.find_spec("numba") is not None
_jit = None


def _compiled():
    global _jit
    if _jit is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def unpack(packed, out):
            n = out.size
            full = n // 8
            for i in range(full):
                b = packed[i]
                base = i * 8
                for j in range(8):
                    out[base + j] = (b >> (7 - j)) & 1
            for j in range(n - full * 8):
                out[full * 8 + j] = (packed[full] >> (7 - j)) & 1

        _jit = unpack
    return _jit


def unpack_into(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Write the bits of ``packed`` (uint8, CPU) into the contiguous CPU bool tensor
    ``out``; returns False (nothing written) where this kernel does not apply."""
    if not (_HAS_NUMBA and out.device.type == "cpu" and packed.device.type == "cpu" and out.is_contiguous()
            and out.dtype == torch.bool and packed.numel() * 8 >= out.numel()):
        return False
    _compiled()(packed.contiguous().numpy(), out.view(torch.uint8).reshape(-1).numpy())
    return True
