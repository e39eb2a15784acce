"""Rank functions: save_sparse_data of sharded groups (FSDP2 rows, TorchRec rectangles) is
written by the ranks holding the rows — one part file each plus rank 0's index."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.export import save_sparse_data


def _folder_digests(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _export_twice(sp, folder: str) -> dict:
    """Export, record the folder; export the same content again and record it again."""
    path = os.path.join(folder, "sparse.safetensors")
    save_sparse_data(path, sp)
    dist.barrier()
    first = _folder_digests(folder)
    save_sparse_data(path, sp)
    dist.barrier()
    return {"first": first, "second": _folder_digests(folder), "path": path}


def fsdp2_export(folder: str) -> dict:
    """FSDP2 (fully_shard) tables in (3, 5) blocks, 1001 rows over the ranks, plus a plain
    replicated parameter; returns the files and the whole masked tables (test-side gather)."""
    from fsdp2_fns import _sharded_model

    model = _sharded_model(1001, 12, "random", [dist.get_world_size()])
    plain = nn.Parameter(torch.randn(7, 5, generator=torch.Generator().manual_seed(4)))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small.weight)
    sp.add_data("plain", plain)
    sp.step()
    out = _export_twice(sp, folder)
    out["local_rows"] = int(model.emb.weight.to_local().shape[0])
    out["tables"] = {n: sp.get_data(n, return_original=False).full_tensor() for n in ("emb.weight", "small.weight")}
    out["tables"]["plain"] = sp.get_data("plain", return_original=False).detach().clone()
    return out


def torchrec_export(folder: str) -> dict:
    """TorchRec row-, table- and column-wise tables; returns the files and whole masked tables."""
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables
    from torchrec_fns import CKPT_TABLES, _dmp, _set_weights, _whole

    world = dist.get_world_size()
    specs = {"rw": row_wise(compute_kernel="dense"), "tw": table_wise(rank=world - 1, compute_kernel="dense"),
             "cw": column_wise(ranks=[0, world - 1, 0], compute_kernel="dense")}
    model = _dmp(CKPT_TABLES, specs, "dense")
    _set_weights(model, CKPT_TABLES, "random", 3)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 3))
    add_torchrec_tables(sp, model)
    sp.step()
    out = _export_twice(sp, folder)
    out["tables"] = {n: _whole(sp.get_data(n, return_original=False), CKPT_TABLES[n]) for n in CKPT_TABLES}
    return out
