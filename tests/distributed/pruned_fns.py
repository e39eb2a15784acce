"""Rank functions: pruned tables written from FSDP2 (DTensor rows, HSDP) and TorchRec
(row-, table-, column-, table-row-wise) tables, streamed into one file by rank 0 without
gathering a table. The test compares each file with the one-process file, byte for byte."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import distsparse
import distsparse.pruned
from fsdp2_fns import _sharded_model, _values
from torchrec_fns import _dmp, _set_weights

ENCODINGS = [None, "float16", "int8", "int4"]


def fsdp2_pruned(folder: str, mesh_shape: list, rows: int, cols: int, band_rows: int) -> dict:
    """FSDP2 / HSDP: step, then save every encoding. Small bands: many pieces per shard."""
    distsparse.pruned.BAND_ROWS = band_rows
    model = _sharded_model(rows, cols, "random", mesh_shape)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4))
    sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small.weight)
    sp.step()
    tag = "x".join(str(m) for m in mesh_shape)
    for encoding in ENCODINGS:
        distsparse.save_pruned_tables(f"{folder}/fsdp2-{tag}-{encoding}.safetensors", sp, dtype=encoding)
    return {"local_rows": int(model.emb.weight.to_local().shape[0]), "world": dist.get_world_size()}


TORCHREC_TABLES = {"rw": (101, 12), "tw": (37, 12), "cw": (53, 12), "twrw": (61, 8)}


def torchrec_pruned(folder: str, band_rows: int) -> dict:
    """TorchRec DMP with every sharding type (column-wise: rows split over ranks): save."""
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables

    distsparse.pruned.BAND_ROWS = band_rows
    world = dist.get_world_size()
    specs = {"rw": row_wise(compute_kernel="fused"), "tw": table_wise(rank=world - 1, compute_kernel="fused"),
             "cw": column_wise(ranks=[0, world - 1, 0], compute_kernel="fused"),
             "twrw": table_row_wise(host_index=0)}
    model = _dmp(TORCHREC_TABLES, specs, "fused")
    _set_weights(model, TORCHREC_TABLES, "random", 5)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4))
    add_torchrec_tables(sp, model)
    sp.step()
    for encoding in ENCODINGS:
        distsparse.save_pruned_tables(f"{folder}/torchrec-{encoding}.safetensors", sp, dtype=encoding)
    shards = {n: [list(o) + list(t.shape) for o, t in sp.get_data(n, return_original=False).local_shards()]
              for n in sorted(TORCHREC_TABLES)}
    return {"world": world, "shards": shards}


def one_process(folder: str, kind: str) -> None:
    """The reference: the same tables as plain tensors in a one-process sparsifier."""
    sp = distsparse.DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4))
    if kind == "fsdp2":
        torch.manual_seed(0)
        weights = {"emb.weight": _values("random", 1001, 18, 1), "small.weight": _values("random", 13, 18, 2)}
    else:
        weights = {n: _values("random", r, c, 5 + i) for i, (n, (r, c)) in enumerate(sorted(TORCHREC_TABLES.items()))}
    for name, w in weights.items():
        sp.add_data(name, nn.Parameter(w))
    sp.step()
    for encoding in ENCODINGS:
        distsparse.save_pruned_tables(f"{folder}/{kind}-single-{encoding}.safetensors", sp, dtype=encoding)


def local_group_refused(folder: str) -> dict:
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("batch", torch.randn(8, 4) + dist.get_rank())
    sp.step()
    try:
        distsparse.save_pruned_tables(f"{folder}/local.safetensors", sp)
    except Exception as exc:  # noqa: BLE001 - the test checks its type and text
        return {"error_type": type(exc).__name__, "message": str(exc)}
    return {"error_type": None}
