"""Rank functions: the sparsity state in a DCP checkpoint (:func:`distsparse.dcp_state`) beside an
FSDP2 model's state, resharded across world sizes, replicated groups and TorchRec plans.

Masks are compared as whole tensors gathered here, in the test only (``full_tensor()``)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import distsparse
from fsdp2_fns import _sharded_model, _values

ROWS, COLS = 1001, 18
LEVEL, BLOCK = 0.43, (2, 3)


def _writer(folder: str, kind: str):
    if kind == "hf":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        return HuggingFaceStorageWriter(folder, save_distributed=True)
    if kind == "hf_shared":
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        return HuggingFaceStorageWriter(folder)
    return dcp.FileSystemWriter(folder)


def _reader(folder: str, kind: str):
    if kind.startswith("hf"):
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        return HuggingFaceStorageReader(folder)
    return dcp.FileSystemReader(folder)


def _sparsifier(level: float = LEVEL, norm: str = "L1"):
    return distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=BLOCK, norm=norm)


def _scheduler(sp):
    return distsparse.LinearScheduler(sp, final_value=0.7, initial_value=0.2, ramp_steps=10)


def _masks(sp) -> dict:
    out = {}
    for name in sorted(sp.data_groups):
        mask = sp.get_mask(name)
        out[name] = mask.full_tensor() if hasattr(mask, "full_tensor") else mask.clone()
    return out


def _summary(sp, sched) -> dict:
    return {"masks": _masks(sp), "sparsity": sp.sparsity(), "step_count": sp.step_count,
            "configs": json.loads(json.dumps(sp.data_groups)),  # as the launcher carries them
            "scheduler": None if sched is None else {"last_epoch": sched.last_epoch,
                                                    "base_param": sched.base_param}}


def _fsdp2_groups(sp, mesh: list):
    model = _sharded_model(ROWS, COLS, "few_values", mesh)
    sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small)
    return model


def _replicated_groups(sp):
    model = nn.ModuleDict({"emb": nn.Embedding(ROWS, COLS), "small": nn.EmbeddingBag(13, COLS)})
    with torch.no_grad():
        model["emb"].weight.copy_(_values("few_values", ROWS, COLS, 1))
        model["small"].weight.copy_(_values("few_values", 13, COLS, 2))
    sp.add_data("emb.weight", model["emb"].weight)
    sp.add_data("small.weight", model["small"])
    return model


def _build(mode: str, level: float = LEVEL, norm: str = "L1"):
    sp = _sparsifier(level, norm)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mode == "replicated":
        model = _replicated_groups(sp)
    else:  # FSDP2 over every rank, or HSDP: 2 replicas of world/2 shards, placements (Replicate(), Shard(0))
        model = _fsdp2_groups(sp, [world] if mode == "fsdp2" else [2, world // 2])
    return model, sp, _scheduler(sp)


def _model_state(model, mode: str) -> dict:
    if mode != "replicated":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model)
    return model.state_dict()


def save(folder: str, mode: str, kind: str, steps: int = 2) -> dict:
    """Step (with a schedule), then save model + sparsity in one DCP checkpoint."""
    model, sp, sched = _build(mode)
    for _ in range(steps):
        sp.step()
        sched.step()
    dcp.save({"model": _model_state(model, mode), "sparsity": distsparse.dcp_state(sp, sched)},
             storage_writer=_writer(folder, kind))
    out = _summary(sp, sched)
    dist.barrier()
    return out


def load(folder: str, mode: str, kind: str, save_to: str | None = None, with_model: bool = True) -> dict:
    """Another sparsifier (other level, fresh masks) of this mode and world size: load (with
    the model when it is the saved one), then optionally save again (the next hop of a chain)."""
    model, sp, sched = _build(mode, level=0.1)
    state = {"model": _model_state(model, mode)} if with_model else {}
    dcp.load({**state, "sparsity": distsparse.dcp_state(sp, sched)}, storage_reader=_reader(folder, kind))
    out = _summary(sp, sched)
    if save_to is not None:
        dcp.save({"sparsity": distsparse.dcp_state(sp, sched)}, storage_writer=_writer(save_to, kind))
    out["step_after_load"] = _step_matches(sp, mode)
    dist.barrier()
    return out


def _step_matches(sp, mode: str) -> bool:
    """A step after loading still computes the single-process mask (the state is live)."""
    sp.step()
    return all(bool(m.any()) for m in _masks(sp).values())


def load_refusals(folder: str, mode: str) -> dict:
    """Loads that must fail on every rank with nothing changed: another norm (sparsifier
    arguments), a group in the checkpoint that is not added, another shape, a scheduler
    state into a scheduler of another kind."""
    out = {}
    cases = {
        "norm": lambda: _build(mode, norm="L2"),
        "not_added": lambda: _only_emb(mode),
        "shape": lambda: _other_shape(mode),
    }
    for case, make in cases.items():
        model, sp, sched = make()
        sp.step()
        before = _masks(sp)
        try:
            dcp.load({"sparsity": distsparse.dcp_state(sp, sched)}, storage_reader=_reader(folder, "fs"))
            out[case] = {"error_type": None}
        except BaseException as exc:  # noqa: BLE001 - the test inspects it; DCP's CheckpointException is one
            out[case] = {"error_type": type(exc).__name__, "message": str(exc)}
        after = _masks(sp)
        out[case]["unchanged"] = all(torch.equal(before[n], after[n]) for n in before) and sp.step_count == 1
    dist.barrier()
    return out


def _only_emb(mode: str):
    sp = _sparsifier(0.1)
    if mode == "fsdp2":
        model = _sharded_model(ROWS, COLS, "few_values", [dist.get_world_size()])
        sp.add_data("emb.weight", model.emb.weight)
    else:
        model = _replicated_groups(sp)
        sp = _sparsifier(0.1)
        sp.add_data("emb.weight", model["emb"].weight)
    return model, sp, _scheduler(sp)


def _other_shape(mode: str):
    sp = _sparsifier(0.1)
    model = nn.ModuleDict({"emb": nn.Embedding(ROWS - 1, COLS), "small": nn.EmbeddingBag(13, COLS)})
    sp.add_data("emb.weight", model["emb"].weight)
    sp.add_data("small.weight", model["small"])
    return model, sp, _scheduler(sp)


def save_refused_with_shared_file(folder: str) -> dict:
    """``HuggingFaceStorageWriter(save_distributed=False)`` is refused on every rank."""
    model, sp, sched = _build("fsdp2")
    sp.step()
    try:
        dcp.save({"sparsity": distsparse.dcp_state(sp, sched)}, storage_writer=_writer(folder, "hf_shared"))
        out = {"error_type": None}
    except Exception as exc:  # noqa: BLE001
        out = {"error_type": type(exc).__name__, "message": str(exc)}
    dist.barrier()
    return out


# -- TorchRec -------------------------------------------------------------------------------------


def torchrec_save(folder: str) -> dict:
    """TorchRec plan A (fused kernels: row-, table-, column-wise with two shards on rank 0)."""
    import torchrec_fns
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables

    world = dist.get_world_size()
    tables = torchrec_fns.CKPT_TABLES
    specs = {"rw": row_wise(compute_kernel="fused"), "tw": table_wise(rank=world - 1, compute_kernel="fused"),
             "cw": column_wise(ranks=[0, world - 1, 0], compute_kernel="fused")}
    model = torchrec_fns._dmp(tables, specs, "fused")
    torchrec_fns._set_weights(model, tables, "few_values", 3)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.45, sparse_block_shape=(2, 3))
    add_torchrec_tables(sp, model)
    sp.step()
    dcp.save({"model": model.state_dict(), "sparsity": distsparse.dcp_state(sp)},
             storage_writer=dcp.FileSystemWriter(folder))
    out = {n: torchrec_fns._whole(sp.get_mask(n), tables[n]) for n in tables}
    out["sparsity"] = sp.sparsity()
    dist.barrier()
    return out


def torchrec_load(folder: str) -> dict:
    """TorchRec plan B (dense kernels, other shardings, DTensor outputs) at another world size."""
    import torchrec_fns
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables

    world = dist.get_world_size()
    tables = torchrec_fns.CKPT_TABLES
    specs = {"rw": column_wise(ranks=[world - 1, 0, 1], compute_kernel="dense"),
             "tw": row_wise(compute_kernel="dense"), "cw": table_wise(rank=1, compute_kernel="dense")}
    model = torchrec_fns._dmp(tables, specs, "dense")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 1))
    add_torchrec_tables(sp, model)
    # The plan-A run used (2, 3) blocks: refused by default on every rank, nothing changed; adopted on request.
    before = {n: torchrec_fns._whole(sp.get_mask(n), tables[n]) for n in tables}
    try:
        dcp.load({"sparsity": distsparse.dcp_state(sp)}, storage_reader=dcp.FileSystemReader(folder))
    except distsparse.CheckpointError as exc:
        assert "sparse_block_shape=[2, 3]" in str(exc) and 'config="checkpoint"' in str(exc), exc
    else:
        raise AssertionError("a checkpoint of another block shape loaded without config='checkpoint'")
    assert list(sp.data_groups["rw"]["sparse_block_shape"]) == [1, 1]
    assert all(torch.equal(torchrec_fns._whole(sp.get_mask(n), tables[n]), before[n]) for n in tables)
    dcp.load({"sparsity": distsparse.dcp_state(sp, config="checkpoint")}, storage_reader=dcp.FileSystemReader(folder))
    out = {n: torchrec_fns._whole(sp.get_mask(n), tables[n]) for n in tables}
    out["sparsity"] = sp.sparsity()
    out["config"] = list(sp.data_groups["rw"]["sparse_block_shape"])
    dist.barrier()
    return out


# -- a rank killed during a DCP save ---------------------------------------------------------------


def _mark_complete(folder: str) -> None:
    """The examples' protocol: a step folder counts once every rank returned from dcp.save."""
    dist.barrier()
    if dist.get_rank() == 0:
        with open(f"{folder}/COMPLETE", "w") as f:
            f.write("done\n")
    dist.barrier()


class _DyingWriter(dcp.FileSystemWriter):
    """Rank 1 writes its data file, then dies (``os._exit``) before DCP gathers the results:
    the coordinator never writes the folder's ``.metadata``."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        if dist.get_rank() == 1:
            import os

            future.wait()
            os._exit(17)
        return future


def save_then_die(root: str) -> dict:
    """Save step_1 (marked COMPLETE), step again, then save step_2 with rank 1 killed mid-save."""
    model, sp, sched = _build("fsdp2")
    sp.step()
    sched.step()
    dcp.save({"model": _model_state(model, "fsdp2"), "sparsity": distsparse.dcp_state(sp, sched)},
             storage_writer=dcp.FileSystemWriter(f"{root}/step_1"))
    _mark_complete(f"{root}/step_1")
    first = _summary(sp, sched)
    torch.save(first["masks"], f"{root}/masks_1_rank{dist.get_rank()}.pt")
    for _ in range(3):
        sp.step()
        sched.step()
    dcp.save({"model": _model_state(model, "fsdp2"), "sparsity": distsparse.dcp_state(sp, sched)},
             storage_writer=_DyingWriter(f"{root}/step_2"))
    _mark_complete(f"{root}/step_2")  # never reached on any rank
    return first


def resume_newest_complete(root: str) -> dict:
    """Load the newest folder with COMPLETE (the examples' resume) at this world size."""
    import os

    folders = sorted(p for p in os.listdir(root) if p.startswith("step_") and os.path.isfile(f"{root}/{p}/COMPLETE"))
    model, sp, sched = _build("fsdp2", level=0.1)
    dcp.load({"model": _model_state(model, "fsdp2"), "sparsity": distsparse.dcp_state(sp, sched)},
             storage_reader=dcp.FileSystemReader(f"{root}/{folders[-1]}"))
    out = _summary(sp, sched)
    out["folder"] = folders[-1]
    out["expected_masks"] = torch.load(f"{root}/masks_1_rank0.pt")
    dist.barrier()
    return out
