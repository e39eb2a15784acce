"""TorchRec embedding tables as distsparse groups: one call adds every table of a model.

TorchRec (``torchrec``, imported only here and only when called) shards each table of an
``EmbeddingBagCollection`` / ``EmbeddingCollection`` row-wise, column-wise, table-wise or
table-row-wise; ``model.state_dict()`` then holds each table as a ``ShardedTensor`` whose
local shards are views of the real (FBGEMM) storage. distsparse adds such a table as a
*sharded* group: each rank scores the blocks of its own shards and the exact global
selection gives every table the mask a single process computes on the whole table, bit for
bit (see :mod:`distsparse.distributed.rects`). ``squash_mask()`` writes into the local shards in place,
so the next forward sees the zeros.

Usage (every rank, after ``DistributedModelParallel``)::

    from distsparse.integrations.torchrec import add_torchrec_tables

    sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    names = add_torchrec_tables(sp, model)          # every table; tables=["t1"] for some
    sch = distsparse.CubicScheduler(sp, ...)
    for batch in loader:
        loss = model(batch) ...; loss.backward(); optimizer.step()   # fused: inside backward
        sp.step(); sch.step()
        sp.squash_mask()        # after EVERY step: the optimizer regrows pruned weights

**Fused optimizer state.** With fused kernels the optimizer updates the weights inside
backward (no ``optimizer.step()`` to hook), so pruned weights come back by one update; the
``squash_mask()`` after each step zeroes them again. Optimizer state is not touched by
``squash_mask``: :func:`zero_pruned_optimizer_state` zeroes the state of pruned elements
where the state has the weight's shape (e.g. fused Adagrad's ``momentum1``, exact) and
leaves row-wise state (``EXACT_ROWWISE_ADAGRAD``'s one value per row, shared with kept
elements) alone.

Group names are the TorchRec table names (``EmbeddingBagConfig.name``); pass
``group_name=lambda path, table: ...`` when two collections hold tables of the same name.
Tested with torchrec 1.9.2, fbgemm-gpu-cpu 1.8.0 and torch 2.13.0 on CPU (gloo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..sparsifier import is_dtensor, local_pieces

__all__ = ["add_torchrec_tables", "add_torchrec_table", "torchrec_tables", "zero_pruned_optimizer_state"]

_DMP_PREFIX = "_dmp_wrapped_module."


def _collection_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(sharded collection types, unsharded collection types) of TorchRec."""
    try:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
        from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "distsparse.integrations.torchrec needs torchrec; on CPU install it with "
            "`pip install fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics tqdm pyre-extensions` then "
            f"`pip install --no-deps torchrec==1.9.2` ({exc})") from exc
    return (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection), (EmbeddingBagCollection, EmbeddingCollection)


def _table_of(key: str) -> str | None:
    """The table name of a collection's state_dict key (``embedding_bags.<t>.weight`` or
    ``embeddings.<t>.weight``), else None."""
    for prefix in ("embedding_bags.", "embeddings."):
        if key.startswith(prefix) and key.endswith(".weight"):
            return key[len(prefix) : -len(".weight")]
    return None


def torchrec_tables(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """``{table name: (module path, weight)}`` of every TorchRec collection in ``model``
    (itself included): sharded ones give a ``ShardedTensor`` (or a plain tensor for a
    data-parallel table, or a ``DTensor`` with ``output_dtensor``), unsharded ones their
    ``nn.Parameter``. Raises ``ValueError`` naming both module paths when two collections
    hold tables of the same name. May run collectives (TorchRec's ``state_dict()``): call it
    on every rank."""
    return {table: (path, weight) for (path, table), weight in _collect(model).items()}


def _collect(model: nn.Module) -> dict[tuple[str, str], Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a DistributedModelParallel, a sharded or plain "
                        f"EmbeddingBagCollection / EmbeddingCollection, or a module holding them), got "
                        f"{type(model).__name__}")
    sharded_types, plain_types = _collection_types()
    found: dict[tuple[str, str], Any] = {}
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in inside):
            continue
        shown = path[len(_DMP_PREFIX):] if path.startswith(_DMP_PREFIX) else \
            ("" if path == _DMP_PREFIX[:-1] else path)
        if isinstance(module, sharded_types):
            inside.append(path)
            for key, value in module.state_dict().items():
                table = _table_of(key)
                if table is not None:
                    found[(shown, table)] = value
        elif isinstance(module, plain_types):
            inside.append(path)
            tables = module.embedding_bags if hasattr(module, "embedding_bags") else module.embeddings
            for table, sub in tables.items():
                found[(shown, table)] = sub.weight
    return found


def add_torchrec_tables(sparsifier: Any, model: nn.Module, tables: Iterable[str] | None = None, *,
                        group_name: Callable[[str, str], str] | None = None, **config: Any) -> list[str]:
    """Add every table (or the named ``tables``) of the TorchRec collections in ``model`` to
    ``sparsifier`` and return the group names, sorted (the same on every rank).

    ``model``: a ``DistributedModelParallel``, a sharded ``EmbeddingBagCollection`` /
    ``EmbeddingCollection``, an unsharded one, or any module holding them. Sharded tables
    become sharded groups (row-, column-, table-, table-row-wise; fused or dense kernels);
    data-parallel and unsharded tables replicated groups. The group name is the table name,
    or ``group_name(module_path, table)``. ``config`` goes to ``add_data`` (e.g.
    ``sparsity_level``, ``sparse_block_shape``). Call it on every rank.

    Raises ``TypeError`` for a ``model`` that is not a module, ``ValueError`` when it holds
    no TorchRec collection, when a named table does not exist (naming it and the tables
    there are) or when two tables get the same group name (naming both module paths).
    """
    found = _collect(model)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no TorchRec EmbeddingBagCollection or EmbeddingCollection "
                         "(sharded or not); pass the DistributedModelParallel model or the collection")
    known = sorted({table for _, table in found})
    wanted = None
    if tables is not None:
        if isinstance(tables, str):
            tables = [tables]
        wanted = list(tables)
        missing = [t for t in wanted if t not in known]
        if missing:
            raise ValueError(f"table(s) {missing} do not exist in {type(model).__name__}; its TorchRec tables are "
                             f"{known}")
    chosen: dict[str, tuple[str, str, Any]] = {}
    for (path, table), weight in sorted(found.items()):
        if wanted is not None and table not in wanted:
            continue
        name = group_name(path, table) if group_name is not None else table
        if name in chosen:
            other = chosen[name]
            raise ValueError(
                f"group {name!r}: table {other[1]!r} of module {other[0] or '<root>'!r} and table {table!r} of module "
                f"{path or '<root>'!r} get the same group name; pass group_name=lambda path, table: ... "
                "(e.g. f'{path}.{table}') to tell them apart")
        chosen[name] = (path, table, weight)
    for name in sorted(chosen):
        add_torchrec_table(sparsifier, name, chosen[name][2], **config)
    return sorted(chosen)


def add_torchrec_table(sparsifier: Any, name: str, tensor: Any, **config: Any) -> Any:
    """Add one TorchRec table as group ``name`` and return it with the current mask applied.

    ``tensor``: the table's ``ShardedTensor`` (``model.state_dict()[".../<table>.weight"]``),
    its ``DTensor`` (TorchRec with ``output_dtensor=True``; the shards' offsets are used,
    not the placements), or a plain tensor / ``nn.Parameter`` (a data-parallel or unsharded
    table: a replicated group). ``get_mask(name)`` of a sharded table is a
    :class:`~distsparse.distributed.rects.RectShards` of ``bool`` masks (``local_shards()``: ``[((row,
    col), mask), ...]``). Raises ``TypeError`` naming the group for anything else.
    """
    if local_pieces(tensor) is not None:
        return sparsifier.add_data(name, tensor, **config)
    if isinstance(tensor, torch.Tensor) and (type(tensor) in (torch.Tensor, nn.Parameter) or is_dtensor(tensor)):
        return sparsifier.add_data(name, tensor, replicated=True, **config)
    raise TypeError(f"group {name!r}: {type(tensor).__module__}.{type(tensor).__name__} is not a TorchRec table; "
                    "pass its ShardedTensor (model.state_dict()['...<table>.weight']), its DTensor "
                    "(output_dtensor=True) or a plain tensor")


def zero_pruned_optimizer_state(sparsifier: Any, optimizer: Any, names: Iterable[str] | None = None) -> list[str]:
    """Zero the fused optimizer state of pruned elements, in place; returns the state keys
    changed (``"<table>.momentum1"``, ...).

    ``optimizer``: TorchRec's fused optimizer (``model.fused_optimizer``) or any optimizer
    whose ``state_dict()["state"]`` values hold per-table ``ShardedTensor`` states named
    ``"<table>.<state>"``. Only states with the weight's shape and local shards (e.g. fused
    Adagrad's ``momentum1``) are zeroed — exactly the pruned elements; row-wise states (one
    value per row, shared by kept elements) are left alone. Call it after ``squash_mask()``.
    """
    groups = sparsifier.data_groups
    selected = sorted(groups) if names is None else list(names)
    changed = []
    state = optimizer.state_dict()["state"]
    for per_param in state.values():
        if not isinstance(per_param, dict):
            continue
        for key, value in per_param.items():
            table = key.rsplit(".", 1)[0]
            if table not in selected or table not in groups:
                continue
            mask = local_pieces(sparsifier.get_mask(table))  # None: not a sharded group
            shards = local_pieces(value)
            if mask is None or shards is None or tuple(shards.shape) != tuple(mask.shape):
                continue
            offsets = [o for o, _ in mask.local_shards()]
            if [o for o, _ in shards.local_shards()] != offsets:
                continue
            with torch.no_grad():
                for (_, t), (_, m) in zip(shards.local_shards(), mask.local_shards()):
                    if tuple(t.shape) == tuple(m.shape):
                        t.masked_fill_(m.logical_not(), 0)
            changed.append(key)
    return sorted(changed)
