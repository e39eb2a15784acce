"""A cheap 64-bit digest of a bool mask, to check that ranks computed the same mask.

A group computed by every rank from its own replicated copy (planner kind
``"everywhere"``) does not send its mask; the ranks compare digests instead. The digest
is ``sum(w[i] * (2i + 1)) mod 2**64`` over the mask's bytes read as little-endian 64-bit
words ``w`` (the last word zero-padded), plus the byte count: a change confined to one word
always changes it (an odd multiplier is invertible mod 2**64), and several changes cancel
only by accident. It is a check against diverging replicas, not a cryptographic hash.

One read of the mask (an eighth of a float64 table's bytes, a quarter of a float32's):
compiled with numba when it is installed, else the same sum in torch, chunked (the two
give the same value, so ranks may differ in having numba).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

__all__ = ["mask_digest"]

_HAS_NUMBA = importlib.util.find_spec("numba") is not None
_CHUNK_WORDS = 1 << 20
_jit = None


def _compiled():
    global _jit
    if _jit is None:
        from numba import njit

        @njit(cache=True, nogil=True)
        def weighted_sum(words):  # uint64 arithmetic wraps mod 2**64
            acc = np.uint64(0)
            for i in range(words.size):
                acc += words[i] * np.uint64(2 * i + 1)
            return acc

        _jit = weighted_sum
    return _jit


def mask_digest(mask: torch.Tensor) -> int:
    """The digest (a signed 64-bit int) of ``mask``'s values in row-major order."""
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.bool).contiguous().view(torch.uint8)
    n = flat.numel()
    whole = n - n % 8
    tail = torch.zeros(8, dtype=torch.uint8)
    tail[: n - whole] = flat[whole:]
    if _HAS_NUMBA:
        words = flat[:whole].numpy().view(np.uint64)
        acc = int(_compiled()(words))
    else:
        words = flat[:whole].view(torch.int64)
        acc = 0
        for start in range(0, words.numel(), _CHUNK_WORDS):
            chunk = words[start : start + _CHUNK_WORDS]
            weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64).mul_(2).add_(1)
            acc += int(chunk.mul(weights).sum())  # int64 wraps: the same residue mod 2**64
    acc += int(tail.view(torch.int64)[0]) * (2 * (whole // 8) + 1)
    acc = (acc + n * 0x9E3779B97F4A7C15) % (1 << 64)
    return acc - (1 << 64) if acc >= 1 << 63 else acc
