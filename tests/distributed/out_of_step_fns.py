"""Rank functions: ranks out of step (different collectives), exceptions of any type in
update_mask, a one-sided backstop timeout, and tensor subclasses refused at add_data."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import pack_bits
from rank_fns import capture_error


def _tables():
    gen = torch.Generator().manual_seed(7)
    return {f"t{i}": nn.Parameter(torch.randn(24 + 8 * i, 16, generator=gen)) for i in range(3)}


def _masks_digest(sp) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(sp.data_groups):
        digest.update(pack_bits(sp.get_mask(name)).numpy().tobytes())
    return digest.hexdigest()


def different_operations(case: str, folder: str) -> dict:
    """Rank 0 and the other ranks call different distsparse collectives."""
    sp = distsparse.DataNormSparsifier(sparsity_level=0.3)
    for name, table in _tables().items():
        sp.add_data(name, table)
    sch = distsparse.LinearScheduler(sp, final_value=0.6, ramp_steps=4)
    sp.step()
    before = (_masks_digest(sp), sch.last_epoch, sp.step_count)
    lead = dist.get_rank() == 0
    path = os.path.join(folder, "state.safetensors")
    calls = {
        # rank 1.. skip one scheduler.step(): rank 0 schedules while they step the sparsifier
        "skip_scheduler_step": (sch.step, sp.step),
        # rank 1.. skip one sparsifier.step(): rank 0 steps while they schedule
        "skip_sparsifier_step": (sp.step, sch.step),
        "save_while_step": (sp.step, lambda: distsparse.save_checkpoint(path, sp, sch)),
        "load_while_schedule": (sch.step, lambda: distsparse.load_checkpoint(path, sp, sch)),
    }[case]
    if case == "load_while_schedule":
        distsparse.save_checkpoint(path, sp, sch)
        before = (_masks_digest(sp), sch.last_epoch, sp.step_count)
    outcome = capture_error(calls[0] if lead else calls[1])
    after = (_masks_digest(sp), sch.last_epoch, sp.step_count)
    # The ranks are back in step: the next calls work on every rank.
    sp.step()
    sch.step()
    return {**outcome, "unchanged": before == after, "next_digest": _masks_digest(sp),
            "next_levels": {n: sp.data_groups[n]["sparsity_level"] for n in sorted(sp.data_groups)}}


class _Failing(distsparse.DataNormSparsifier):
    """update_mask raises ``kind`` for group ``bad`` on whichever rank computes it."""

    def __init__(self, kind: str, bad: str, **kw):
        self.kind, self.bad = kind, bad
        super().__init__(**kw)

    def update_mask(self, name, data, **config):
        if name == self.bad:
            if self.kind == "runtime":
                raise RuntimeError("CUDA out of memory (simulated)")
            if self.kind == "json":
                json.loads("{not json")  # json.JSONDecodeError: its constructor takes 3 arguments
            if self.kind == "keyerror":
                raise KeyError("scratch")
        return super().update_mask(name, data, **config)


def any_exception_in_update_mask(kind: str) -> dict:
    tables = _tables()
    sp = _Failing(kind, "t1", sparsity_level=0.5)
    for name, table in tables.items():
        sp.add_data(name, table)
    owner = sp.owner_of("t1")
    before = _masks_digest(sp)
    outcome = capture_error(sp.step)
    return {**outcome, "owner": owner, "unchanged": before == _masks_digest(sp), "step_count": sp.step_count}


def slow_coordinator_schedule(folder: str) -> dict:
    """Rank 0's get_schedule_param is slower than DISTSPARSE_COLLECTIVE_TIMEOUT: it returns
    only once rank 1 has given up waiting (a flag file, not a fixed sleep that a loaded
    machine could outlast)."""
    gave_up = os.path.join(folder, "rank1_gave_up")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.2)
    sp.add_data("w", nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(1))))

    class Slow(distsparse.BaseDataScheduler):
        slow = False

        def get_schedule_param(self):
            while self.slow and not os.path.exists(gave_up):  # the job timeout catches a hang
                time.sleep(0.05)
            return {n: 0.5 for n in self.data_sparsifier.data_groups}

    sch = Slow(sp, "sparsity_level")
    sp.step()
    epoch, level = sch.last_epoch, sp.data_groups["w"]["sparsity_level"]
    sch.slow = True
    outcome = capture_error(sch.step)
    if dist.get_rank() == 1:
        open(gave_up, "w").close()
    state = {"epoch_unchanged": sch.last_epoch == epoch,
             "level_unchanged": sp.data_groups["w"]["sparsity_level"] == level}
    later = capture_error(sp.step)  # refused at once: the ranks are no longer in step
    return {**outcome, **state, "later": later}


def tensor_subclass_refused(kind: str) -> dict:
    """add_data of a DTensor with an unsupported placement (``Shard(1)``: FSDP2's
    ``Shard(0)`` is supported) or of another tensor subclass is a TypeError naming the group
    on every rank, registers nothing, and the next step() works."""
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("plain", nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(2))))
    if kind == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        data = nn.Parameter(distribute_tensor(torch.randn(10, 8), mesh, [Shard(1)]))
    else:
        data = torch.Tensor._make_subclass(type("MyTensor", (torch.Tensor,), {}), torch.randn(4, 8))
    outcome = capture_error(sp.add_data, "sharded.weight", data)
    registered = "sharded.weight" in sp.data_groups
    stepped = capture_error(sp.step)
    return {**outcome, "registered": registered, "step_raised": stepped["raised"]}
