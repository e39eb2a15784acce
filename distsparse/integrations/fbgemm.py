"""Serve pruned tables through FBGEMM's inference table-batched embeddings.

:func:`build_inference_tbe` turns ``{name: PrunedTable}`` (:func:`distsparse.load_pruned_tables`)
into one ``IntNBitTableBatchedEmbeddingBagsCodegen``
(``fbgemm_gpu.split_table_batched_embeddings_ops_inference``): each table holds only its kept
rows and gets its int32 remap as FBGEMM's ``index_remapping`` (``-1`` = pruned). The rows are
copied byte for byte: distsparse writes int8/int4 rows in the TBE's own layout (float16
scale, float16 bias, values; :mod:`distsparse.quantization`). FBGEMM is imported here only
(``fbgemm-gpu-cpu`` on CPU, ``fbgemm-gpu`` on CUDA); the core never imports this module.

Usage::

    tables = distsparse.load_pruned_tables("served.safetensors")
    tbe = build_inference_tbe(tables, pooling="sum", device="cpu")
    out = tbe(indices.int(), offsets.int())      # (batch, sum of dims), tables in tbe_table_order

Indices and offsets follow FBGEMM: one flat list over the features (tables in
:func:`tbe_table_order`), ``offsets`` of length ``tables × batch + 1``.

Limitations:
    FBGEMM's inference TBE pools ``sum`` and ``mean`` (no ``max``: use
    :class:`distsparse.PrunedEmbeddingBag`); a pruned id adds nothing and still counts in a
    ``mean`` bag, so both equal the masked dense ``nn.EmbeddingBag`` (to float32 rounding: FBGEMM
    sums in its own order and dequantizes with fused multiply-adds). No ``padding_idx``;
    per-sample weights go to ``forward`` as FBGEMM takes them. ``bfloat16`` and ``float64``
    rows are not TBE weight types: save with
    ``dtype=torch.float16`` / ``None`` (float32) / ``"int8"`` / ``"int4"``. A table with every
    row pruned is given one zero row (FBGEMM needs at least one).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..pruned import PrunedTable

__all__ = ["build_inference_tbe", "tbe_table_order"]


def _sparse_type(encoding: str, name: str) -> Any:
    from fbgemm_gpu.split_embedding_configs import SparseType

    types = {"float32": SparseType.FP32, "float16": SparseType.FP16, "int8": SparseType.INT8,
             "int4": SparseType.INT4}
    if encoding not in types:
        raise ValueError(f"table {name!r}: FBGEMM's inference TBE has no {encoding} weights; save it with "
                         f"save_pruned_tables(..., dtype=...) one of {sorted(types)}")
    return types[encoding]


def tbe_table_order(tables: Mapping[str, PrunedTable]) -> list[str]:
    """The table (= feature) order of :func:`build_inference_tbe`'s TBE: sorted names."""
    return sorted(tables)


def build_inference_tbe(tables: Mapping[str, PrunedTable], *, pooling: str = "sum",
                        device: str | torch.device = "cpu", output_dtype: torch.dtype = torch.float32) -> Any:
    """One ``IntNBitTableBatchedEmbeddingBagsCodegen`` serving ``tables`` (one feature per
    table, in :func:`tbe_table_order`), holding each table's kept rows and int32 remap.

    ``pooling``: ``"sum"`` or ``"mean"`` (see the module's limitations). ``device``: ``"cpu"``
    or a CUDA device. ``output_dtype``: ``torch.float32`` or ``torch.float16``.
    """
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    modes = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}
    if pooling not in modes:
        raise ValueError(f"pooling must be one of {sorted(modes)} for FBGEMM's inference TBE, got {pooling!r}")
    outputs = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16}
    if output_dtype not in outputs:
        raise ValueError(f"output_dtype must be torch.float32 or torch.float16, got {output_dtype}")
    if not tables:
        raise ValueError("build_inference_tbe needs at least one table")
    device = torch.device(device)
    location = EmbeddingLocation.HOST if device.type == "cpu" else EmbeddingLocation.DEVICE
    names = tbe_table_order(tables)
    specs, remaps = [], []
    for name in names:
        table = tables[name]
        if not isinstance(table, PrunedTable):
            raise TypeError(f"table {name!r}: expected a distsparse PrunedTable, got {type(table).__name__}")
        specs.append((name, max(table.kept, 1), table.dim, _sparse_type(table.encoding, name), location))
        remaps.append(table.remap.to(device=device, dtype=torch.int32))
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        specs, index_remapping=remaps, pooling_mode=modes[pooling], device=device,
        output_dtype=outputs[output_dtype])
    tbe.initialize_weights()
    for name, (weights, scale_bias) in zip(names, tbe.split_embedding_weights(split_scale_shifts=True)):
        table = tables[name]
        rows = table.weight.to(device)
        weights.zero_()
        if table.kept == 0:
            if scale_bias is not None:
                scale_bias.zero_()
            continue
        if table.bits is None:  # float rows: copy their bytes into the uint8 rows
            weights.copy_(rows.contiguous().view(torch.uint8).reshape(table.kept, -1))
        else:
            scale_bias.copy_(rows[:, :4])
            weights[:, : rows.shape[1] - 4].copy_(rows[:, 4:])
    return tbe
