"""Rank functions: checkpoint files of sparsifiers on different sub-groups never collide
(issue 10 item 4). World 4, sub-groups {0, 1} and {2, 3}."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import pack_bits
from fake_accelerator import FakeAccelerator
from outcomes import error_of


def _digest(sp) -> str:
    return hashlib.sha256(b"".join(pack_bits(sp.get_mask(n)).numpy().tobytes()
                                   for n in sorted(sp.data_groups))).hexdigest()


def two_subgroups_save_and_collide(folder: str) -> dict:
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    mine = rank // 2
    group = groups[mine]
    gen = torch.Generator().manual_seed(7 + mine)  # different data in each sub-group
    table = nn.Parameter(torch.randn(64, 16, generator=gen))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.3 + 0.2 * mine, process_group=group)
    sp.add_data("table", table)
    sp.step()
    out: dict = {"subgroup": mine}

    # (a) accelerate registrations with the default file name: one file per sub-group.
    acc = FakeAccelerator(dist.get_world_size())
    handles = distsparse.register_for_checkpointing(acc, sp)
    step_dir = os.path.join(folder, "step1")
    acc.save_state(step_dir)
    dist.barrier()
    out["files"] = sorted(os.listdir(step_dir))
    saved = _digest(sp)
    sp.data_groups["table"]["sparsity_level"] = 0.9
    sp.step()
    moved = _digest(sp)
    acc.load_state(step_dir)
    out["restored_own_masks"] = _digest(sp) == saved and moved != saved
    # (b) the same sparsifier registered twice on one accelerator is refused.
    out["twice"] = error_of(lambda: distsparse.register_for_checkpointing(acc, sp))
    for h in handles:
        h.remove()

    # save_checkpoint from two sub-groups to one path: the second is refused.
    shared = os.path.join(folder, "shared.safetensors")
    if mine == 0:
        distsparse.save_checkpoint(shared, sp)
    dist.barrier()
    out["second_group"] = error_of(lambda: distsparse.save_checkpoint(shared, sp)) if mine == 1 else None
    dist.barrier()
    # The file is still sub-group 0's, and sub-group 0 may overwrite its own file.
    out["owner_overwrite"] = error_of(lambda: distsparse.save_checkpoint(shared, sp)) if mine == 0 else None
    dist.barrier()
    fresh = distsparse.DataNormSparsifier(sparsity_level=0.3 + 0.2 * mine, process_group=group)
    fresh.add_data("table", nn.Parameter(table.detach().clone()))
    distsparse.load_checkpoint(shared, fresh)
    out["shared_holds_group0"] = _digest(fresh) == _digest(sp) if mine == 0 else None

    # Both sub-groups saving one new path at the same moment: exactly one wins.
    race = os.path.join(folder, "race.safetensors")
    dist.barrier()
    out["race"] = error_of(lambda: distsparse.save_checkpoint(race, sp))
    dist.barrier()
    out["race_files"] = sorted(p for p in os.listdir(folder) if p.startswith(("race", ".race")))
    return out
