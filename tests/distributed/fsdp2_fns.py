"""Rank functions: FSDP2 (``fully_shard``) and other DTensor groups — masks computed where the
rows live, equal to the single-process mask of the whole weight, and checkpoints that reshard.

The full weight is gathered (``full_tensor()``) here, in the test only, to compute the
single-process reference mask."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import norm_block_mask


def _values(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "few_values":  # heavy ties
        return torch.randint(1, 4, (rows, cols), generator=gen).float() / 4
    if kind == "constant":
        return torch.full((rows, cols), 0.5)
    return torch.randn(rows, cols, generator=gen)


class _Tables(nn.Module):
    def __init__(self, rows: int, cols: int, kind: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, cols)
        self.small = nn.EmbeddingBag(13, cols, mode="sum")
        with torch.no_grad():
            self.emb.weight.copy_(_values(kind, rows, cols, 1))
            self.small.weight.copy_(_values(kind, 13, cols, 2))
        self.head = nn.Linear(cols, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).sum(1) + self.small(ids % 13))


def _mesh(mesh_shape: list):
    from torch.distributed.device_mesh import init_device_mesh

    if len(mesh_shape) == 1:
        return init_device_mesh("cpu", tuple(mesh_shape))
    return init_device_mesh("cpu", tuple(mesh_shape), mesh_dim_names=("replicate", "shard"))


def _sharded_model(rows: int, cols: int, kind: str, mesh_shape: list) -> nn.Module:
    """The embedding modules wrapped first, then the root (REFERENCE §4: a root-only wrap
    leaves parameters unsharded after a no_grad forward)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Tables(rows, cols, kind)
    mesh = _mesh(mesh_shape)
    fully_shard(model.emb, mesh=mesh)
    fully_shard(model.small, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _reference(weight, level: float, block: list, zeros) -> torch.Tensor:
    zeros_n = block[0] * block[1] if zeros is None else zeros
    return norm_block_mask(weight.detach().full_tensor(), level, tuple(block), zeros_n, "L1")


def fsdp2_masks(rows: int, cols: int, kind: str, level: float, block: list, zeros, mesh_shape: list,
                digit_bits=None) -> dict:
    """Step twice (level changes in between): the global mask equals the whole weight's,
    the mask is a DTensor of the data's layout whose local part stays the same object."""
    from torch.distributed.tensor import DTensor

    model = _sharded_model(rows, cols, kind, mesh_shape)
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block),
                                       zeros_per_block=zeros)
    sp.selection_digit_bits = digit_bits
    masked = sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small)
    out = {"returned_dtensor": isinstance(masked, DTensor), "steps": [],
           "local_rows": list(model.emb.weight.to_local().shape)}
    mask0 = sp.get_mask("emb.weight")
    local0 = mask0.to_local()
    for step_level in (level, min(1.0, level + 0.21)):
        for name in ("emb.weight", "small.weight"):
            sp.data_groups[name]["sparsity_level"] = step_level
        sp.step()
        mask = sp.get_mask("emb.weight")
        out["steps"].append({
            "emb_equal": bool(torch.equal(mask.full_tensor(), _reference(model.emb.weight, step_level, block, zeros))),
            "small_equal": bool(torch.equal(sp.get_mask("small.weight").full_tensor(),
                                            _reference(model.small.weight, step_level, block, zeros))),
            "same_object": mask is mask0 and mask.to_local().data_ptr() == local0.data_ptr(),
            "placements": str(mask.placements), "local_dtype": str(mask.to_local().dtype),
            "bytes_sent": sp.last_step_stats["bytes_sent"],
            "selection_bytes": sp.last_step_stats["selection_bytes"],
        })
    masked = sp.get_data("emb.weight", return_original=False)
    out["get_data_masked_equal"] = bool(torch.equal(
        masked.full_tensor(), torch.where(mask.full_tensor(), model.emb.weight.detach().full_tensor(), 0.0)))
    out["weight_bytes"] = model.emb.weight.numel() * 4
    # state_dict of a sharded group: this rank's rows and its layout; loads on the same layout.
    sd = sp.state_dict()
    again = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block),
                                          zeros_per_block=zeros)
    again.add_data("emb.weight", model.emb.weight)
    again.add_data("small.weight", model.small)
    again.load_state_dict(sd)
    out["state_dict_rows"] = list(sd["masks"]["emb.weight"].shape) == list(model.emb.weight.to_local().shape)
    out["state_dict_round_trip"] = bool(torch.equal(again.get_mask("emb.weight").to_local(), mask.to_local()))
    return out


def fsdp2_cases(cases: list, mesh_shape: list, digit_bits=None) -> list:
    """:func:`fsdp2_masks` for each ``[rows, cols, kind, level, block, zeros]`` in one job
    (process start-up dominates a case's time)."""
    return [fsdp2_masks(*case, mesh_shape, digit_bits) for case in cases]


def three_d_shard0(level: float, block: list) -> dict:
    """A 3-D DTensor sharded on dim 0: its 2-D view's rows per shard are dim-0 rows times
    shape[1]; uneven chunks (7 on 2-4 ranks)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh([dist.get_world_size()])
    full = _values("few_values", 7 * 3, 10, 5).reshape(7, 3, 10)
    data = nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block))
    sp.add_data("t", data)
    sp.step()
    ref = norm_block_mask(full, level, tuple(block), block[0] * block[1], "L1")
    return {"equal": bool(torch.equal(sp.get_mask("t").full_tensor(), ref))}


def training_loop(mesh_shape: list) -> dict:
    """forward, backward, optimizer step, sp.step(), scheduler.step(), squash_mask():
    after every squash the pruned rows are zero in the next forward's (unsharded) weight."""
    model = _sharded_model(101, 8, "random", mesh_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(2, 2))
    sp.add_data("emb.weight", model.emb.weight)
    sch = distsparse.GammaScheduler(sp, gamma=1.5, threshold=0.6)
    seen: list[bool] = []
    captured: dict = {}

    def hook(module, args):  # the unsharded weight the forward really uses
        captured["weight"] = module.weight.detach().clone()

    handle = model.emb.register_forward_pre_hook(hook)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        ids = torch.randint(0, 101, (4, 3), generator=gen)
        loss = model(ids).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step()
        sch.step()
        sp.squash_mask()
        expected_zero = ~sp.get_mask("emb.weight").full_tensor()
        model(torch.zeros(1, 1, dtype=torch.long))
        weight = captured["weight"]
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        seen.append(bool(expected_zero.any()) and bool((weight[expected_zero] == 0).all()))
    handle.remove()
    return {"zeros_reached_forward": seen, "sparsity": sp.sparsity()["emb.weight"]}


def refusals(kind: str) -> dict:
    """Unsupported placements and a mesh that does not cover the group: TypeError /
    ValueError at add_data on every rank, nothing registered, the next step works."""
    from rank_fns import capture_error
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("plain", nn.Parameter(torch.randn(8, 8)))
    if kind == "shard1":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        data = nn.Parameter(distribute_tensor(torch.randn(10, 8), mesh, [Shard(1)]))
    elif kind == "one_dim":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        data = nn.Parameter(distribute_tensor(torch.randn(16), mesh, [Shard(0)]))
    else:  # a sparsifier over rank 0 only, a mesh over every rank
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        data = nn.Parameter(distribute_tensor(torch.randn(10, 8), mesh, [Shard(0)]))
        solo = dist.new_group([0])
        if dist.get_rank() != 0:
            return {"raised": True, "error_type": "ValueError", "message": "'t' not in the group",
                    "registered": False, "step_raised": False, "seconds": 0.0}
        sp = distsparse.DataNormSparsifier(sparsity_level=0.5, process_group=solo)
    outcome = capture_error(sp.add_data, "t", data)
    return {**outcome, "registered": "t" in sp.data_groups, "step_raised": capture_error(sp.step)["raised"]}


def nan_in_a_shard(global_row: int) -> dict:
    """World 3, a 24x8 FSDP2 table (rows 0-7, 8-15, 16-23), (3, 4) blocks: rank 1's last
    owned block [15, 18) straddles into rank 2's rows. A NaN at ``global_row``, column 5."""
    from rank_fns import capture_error

    assert dist.get_world_size() == 3
    model = _sharded_model(24, 8, "random", [3])
    weight = model.emb.weight
    start = dist.get_rank() * 8
    if start <= global_row < start + 8:
        with torch.no_grad():
            weight.to_local()[global_row - start, 5] = float("nan")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(3, 4))
    sp.add_data("emb.weight", weight)
    return capture_error(sp.step)


def disagreeing_global_shapes() -> dict:
    """Ranks whose DTensor of one group has different global shapes (10 vs 12 rows): the
    first step() raises RankDisagreementError naming the group on every rank, fast."""
    from rank_fns import capture_error
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh([dist.get_world_size()])
    rows = 10 if dist.get_rank() == 0 else 12
    local_rows = -(-rows // 2) if dist.get_rank() == 0 else rows - -(-rows // 2)
    data = DTensor.from_local(torch.randn(local_rows, 8), mesh, [Shard(0)], run_check=False,
                              shape=torch.Size([rows, 8]), stride=(8, 1))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("t", nn.Parameter(data))
    return capture_error(sp.step)


def checkpoint_save_sharded(folder: str, world_mesh: list, level: float) -> dict:
    """FSDP2 run: step and save; returns the global mask for the test to compare."""
    model = _sharded_model(1001, 12, "few_values", world_mesh)
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", model.emb.weight)
    sp.add_data("small.weight", model.small.weight)
    sp.step()
    distsparse.save_checkpoint(f"{folder}/sp.safetensors", sp)
    return {"emb": sp.get_mask("emb.weight").full_tensor(), "small": sp.get_mask("small.weight").full_tensor()}


def checkpoint_load_replicated(folder: str, src: str, dst: str) -> dict:
    """Plain replicated tensors (DDP-style, or a single process): load, compare, save again."""
    emb = nn.Parameter(_values("few_values", 1001, 12, 1))
    small = nn.Parameter(_values("few_values", 13, 12, 2))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", emb)
    sp.add_data("small.weight", small)
    distsparse.load_checkpoint(f"{folder}/{src}", sp)
    distsparse.save_checkpoint(f"{folder}/{dst}", sp)
    return {"emb": sp.get_mask("emb.weight").clone(), "small": sp.get_mask("small.weight").clone()}


def checkpoint_load_sharded(folder: str, src: str, world_mesh: list) -> dict:
    model = _sharded_model(1001, 12, "few_values", world_mesh)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", model.emb.weight)
    distsparse.load_checkpoint(f"{folder}/{src}", sp)
    sp.add_data("small.weight", model.small.weight)  # restored pending: takes its rows when added
    return {"emb": sp.get_mask("emb.weight").full_tensor(), "small": sp.get_mask("small.weight").full_tensor()}


class _KillingOs:
    """Stands in for ``os`` inside ``distsparse.checkpoint`` and SIGKILLs this process at one
    point of the atomic write: ``"mid_write"`` (half of the file's bytes are in the temporary
    file) or ``"before_rename"`` (the temporary file is whole and fsynced, not yet renamed)."""

    def __init__(self, real, at: str) -> None:
        self._real, self._at = real, at

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def _die(self) -> None:
        import signal
        import time

        self._real.kill(self._real.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught
        raise AssertionError("still alive after SIGKILL")

    def write(self, fd: int, data) -> int:
        if self._at == "mid_write":
            self._real.write(fd, data[: len(data) // 2])
            self._die()
        return self._real.write(fd, data)

    def replace(self, src, dst) -> None:
        if self._at == "before_rename":
            self._die()
        return self._real.replace(src, dst)


def kill_during_save(folder: str, at: str, first_level: float, second_level: float) -> dict:
    """FSDP2 run: a complete save at ``first_level``, then new masks at ``second_level`` and a
    save during which the writing rank (0) is SIGKILLed at ``at`` (see :class:`_KillingOs`).
    Rank 0 never returns; rank 1 writes what it saw to ``<folder>/rank1.json`` (the previous
    file's sha256, the error its save raised and how long that took) and returns it."""
    import hashlib
    import json

    import distsparse.checkpoint as ckpt
    from rank_fns import capture_error

    model = _sharded_model(1001, 12, "few_values", [dist.get_world_size()])
    sp = distsparse.DataNormSparsifier(sparsity_level=first_level, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", model.emb.weight)
    sp.step()
    path = f"{folder}/ckpt/sp.safetensors"
    distsparse.save_checkpoint(path, sp)
    with open(path, "rb") as f:
        good_sha = hashlib.sha256(f.read()).hexdigest()
    sp.data_groups["emb.weight"]["sparsity_level"] = second_level
    sp.step()
    if dist.get_rank() == 0:
        ckpt.os = _KillingOs(ckpt.os, at)
    out = {"good_sha": good_sha, "save": capture_error(distsparse.save_checkpoint, path, sp)}
    with open(f"{folder}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)
    return out


def load_then_save(folder: str, level: float) -> dict:
    """After a killed save: load the previous file on this FSDP2 layout, step at ``level`` and
    save to the same path (the killed writer's temporary file is still beside it); returns
    the loaded and the new global masks and the folder's files after the save."""
    import os

    path = f"{folder}/ckpt/sp.safetensors"
    model = _sharded_model(1001, 12, "few_values", [dist.get_world_size()])
    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(3, 5))
    sp.add_data("emb.weight", model.emb.weight)
    distsparse.load_checkpoint(path, sp)
    loaded = sp.get_mask("emb.weight").full_tensor()
    sp.data_groups["emb.weight"]["sparsity_level"] = level
    sp.step()
    distsparse.save_checkpoint(path, sp)
    return {"loaded": loaded, "saved": sp.get_mask("emb.weight").full_tensor(),
            "files": sorted(os.listdir(f"{folder}/ckpt"))}


def trainer_callback_on_fsdp2(folder: str) -> dict:
    """transformers' DataSparsityCallback driven hook by hook as the Trainer does under FSDP2:
    the sparsifier is built on the plain parameters, the model is then sharded (what
    accelerate's FSDP2 does inside ``train()``), ``on_train_begin`` adopts the DTensors; three
    optimizer steps with ``on_step_end``; ``on_log`` on rank 0 only, counted by CommDebugMode;
    ``on_save``; a fresh callback resumes from the folder."""
    import os
    from types import SimpleNamespace

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    from distsparse.integrations.transformers import DataSparsityCallback

    world, rank = dist.get_world_size(), dist.get_rank()
    names = ("emb.weight", "small.weight")

    def callback(model):
        sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(2, 2))
        params = dict(model.named_parameters())
        for name in names:
            sp.add_data(name, params[name])
        sch = distsparse.LinearScheduler(sp, final_value=0.6, initial_value=0.2, ramp_steps=2)
        return DataSparsityCallback(sp, sch, every_n_steps=1)

    torch.manual_seed(0)
    model = _Tables(1001, 18, "random")
    cb = callback(model)
    mesh = _mesh([world])
    fully_shard(model.emb, mesh=mesh)
    fully_shard(model.small, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(world_size=world, output_dir=folder, resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0, log_history=[])
    cb.on_train_begin(args, state, None, model=model)
    sp = cb.sparsifier
    out: dict = {"adopted": all(sp.get_data(n, return_original=True) is dict(model.named_parameters())[n]
                                for n in names)}
    gen = torch.Generator().manual_seed(rank)
    for step in (1, 2, 3):
        model(torch.randint(0, 1001, (4, 3), generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        state.global_step = step
        cb.on_step_end(args, state, None, model=model)
        if step == 2 and rank == 0:  # ranks log at different moments: nothing may wait here
            logs = {"loss": 1.0}
            state.log_history.append({"loss": 1.0, "step": 2})
            with CommDebugMode() as comm:
                cb.on_log(args, state, None, logs=logs)
            out["logs"], out["log_collectives"] = logs, comm.get_total_counts()
            out["sparsity_at_log"] = sp.sparsity()
            out["log_history"] = state.log_history[-1]
    with CommDebugMode() as old:  # what the callback used to do: a collective (every rank runs it)
        1.0 - float(sp.get_mask("emb.weight").float().mean())
    out["old_way_collectives"] = old.get_total_counts()
    weight, mask = model.emb.weight, sp.get_mask("emb.weight")
    out["placements"] = str(mask.placements)
    out["mask_is_reference"] = bool(torch.equal(mask.full_tensor(), _reference(weight, 0.6, [2, 2], None)))
    out["zeros_squashed"] = bool((weight.detach().to_local()[~mask.to_local()] == 0).all())
    if rank == 0:
        os.makedirs(f"{folder}/checkpoint-3")
    dist.barrier()
    cb.on_save(args, state, None)
    again = callback(model)  # the model is sharded already: the groups are DTensors from the start
    again.on_train_begin(args, SimpleNamespace(global_step=3, log_history=[]), None, model=model)
    out["restored_from"] = again.restored_from
    out["resumed_equal"] = all(torch.equal(again.sparsifier.get_mask(n).full_tensor(), sp.get_mask(n).full_tensor())
                               for n in names)
    out["resumed_schedule"] = again.scheduler.state_dict() == cb.scheduler.state_dict()
    return out
