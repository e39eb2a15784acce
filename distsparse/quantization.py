"""Row-wise int8 / int4 quantization in FBGEMM's inference-table layout, in plain torch.

Why here and not FBGEMM's own operators: the core must not import FBGEMM, and a served
table written by distsparse must load into FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``
by a plain byte copy. So each quantized row is laid out as FBGEMM's inference TBE stores it
(``scale_bias_size_in_bytes=4``, ``reverse_qparam=False``)::

    [scale: float16][bias: float16][q_0 q_1 ... q_{dim-1}]     # uint8 bytes

with ``x ≈ q * scale + bias``. int4 packs two values per byte, the lower-index value in the
low nibble. The arithmetic follows FBGEMM's reference quantizer
(``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``): ``bias = fp16(min(row))``,
``scale = fp16((max - bias) / (2**bits - 1))`` (``1.0`` for a constant row),
``q = clamp(round((x - bias) / scale), 0, 2**bits - 1)``. A row of zeros (a pruned row of the
masked dense table) quantizes to ``scale=1, bias=0, q=0`` and dequantizes to exact zeros.
"""

from __future__ import annotations

import torch

__all__ = ["SCALE_BIAS_BYTES", "quantize_rows", "dequantize_rows", "quantized_row_bytes"]

#: Bytes of the per-row header: a float16 scale, then a float16 bias.
SCALE_BIAS_BYTES = 4


def quantized_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one quantized row of ``dim`` values (header included)."""
    _check_bits(bits)
    return SCALE_BIAS_BYTES + -(-dim * bits // 8)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"row-wise quantization supports 8 or 4 bits, got {bits!r}")


def quantize_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """``(n, dim)`` floating rows -> ``(n, quantized_row_bytes(dim, bits))`` uint8 rows.

    Each row is quantized on its own, so the bytes of a row do not depend on which other
    rows are quantized with it (a sharded writer and a one-process writer agree)."""
    _check_bits(bits)
    if rows.dim() != 2 or not rows.is_floating_point():
        raise TypeError(f"quantize_rows needs a 2-D floating tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    x = rows.detach().to(device="cpu", dtype=torch.float32)
    n, dim = x.shape
    levels = (1 << bits) - 1
    if dim:
        lo = x.amin(dim=1)
        hi = x.amax(dim=1)
    else:
        lo = hi = torch.zeros(n)
    bias = lo.to(torch.float16)
    span = hi - bias.to(torch.float32)
    scale = torch.where(span == 0, torch.ones_like(span), span / levels).to(torch.float16)
    inv = 1.0 / scale.to(torch.float32)
    bad = torch.isinf(inv)  # a scale that underflowed to 0 in float16 (FBGEMM's corner case)
    if bool(bad.any()):
        scale = torch.where(bad, torch.ones_like(scale), scale)
        inv = torch.where(bad, torch.ones_like(inv), inv)
    q = torch.round((x - bias.to(torch.float32)[:, None]) * inv[:, None]).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        if dim % 2:
            q = torch.cat([q, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    header = torch.stack([scale, bias], dim=1).view(torch.uint8).reshape(n, SCALE_BIAS_BYTES)
    return torch.cat([header, q], dim=1).contiguous()


def dequantize_rows(packed: torch.Tensor, bits: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: ``(n, row bytes)`` uint8 -> ``(n, dim)`` of ``dtype``,
    computed as ``bias + q * scale`` in float32 (FBGEMM's dequantization)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != quantized_row_bytes(dim, bits):
        raise ValueError(f"expected uint8 rows of {quantized_row_bytes(dim, bits)} bytes for dim {dim} at {bits} "
                         f"bits, got {packed.dtype} of shape {tuple(packed.shape)}")
    header = packed[:, :SCALE_BIAS_BYTES].contiguous().view(torch.float16).to(torch.float32)
    scale, bias = header[:, 0:1], header[:, 1:2]
    data = packed[:, SCALE_BIAS_BYTES:]
    if bits == 4:
        data = torch.stack([data & 0x0F, data >> 4], dim=2).reshape(packed.shape[0], -1)[:, :dim]
    return torch.addcmul(bias, data.to(torch.float32), scale).to(dtype)
