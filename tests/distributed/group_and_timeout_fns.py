"""Rank functions: sparsifiers bound to a sub-group (process_group=), and the collective timeout."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import norm_block_mask, pack_bits


def masks_and_schedule_in_two_subgroups(folder: str) -> dict:
    """World 4 split into sub-groups {0, 1} and {2, 3}; each sub-group has its own
    sparsifier, scheduler and checkpoint, with data that differs between sub-groups."""
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    mine = rank // 2
    group = groups[mine]
    gen = torch.Generator().manual_seed(100 + mine)  # same data inside a sub-group only
    tables = {f"t{i}": nn.Parameter(torch.randn(40 + 8 * i, 16, generator=gen)) for i in range(3)}
    sp = distsparse.DataNormSparsifier(sparsity_level=0.25, process_group=group)
    for name, table in tables.items():
        sp.add_data(name, table)

    class Jitter(distsparse.BaseDataScheduler):
        def get_schedule_param(self):  # rank-dependent: only the sub-group's rank 0 counts
            return {n: 0.25 + 0.1 * dist.get_rank() for n in self.data_sparsifier.data_groups}

    sch = Jitter(sp, "sparsity_level")
    sp.step()
    sch.step()
    sp.step()
    path = os.path.join(folder, f"group{mine}.safetensors")
    distsparse.save_checkpoint(path, sp, sch)
    digest = hashlib.sha256(b"".join(pack_bits(sp.get_mask(n)).numpy().tobytes() for n in sorted(tables)))
    return {
        "group_rank": dist.get_rank(group),
        "owners": {n: sp.owner_of(n) for n in sorted(tables)},
        "levels": {n: sp.data_groups[n]["sparsity_level"] for n in sorted(tables)},
        "mask_sha256": digest.hexdigest(),
        "single_process_sha256": _single_process(tables, sp),
        "checkpoint_exists": os.path.exists(path),
    }


def _single_process(tables: dict, sp) -> str:
    """Masks computed locally (no communication) from the same data and levels."""
    digest = hashlib.sha256()
    for name in sorted(tables):
        level = sp.data_groups[name]["sparsity_level"]
        mask = norm_block_mask(tables[name].detach(), level, (1, 4), 4, "L1")
        digest.update(pack_bits(mask).numpy().tobytes())
    return digest.hexdigest()


def rank1_skips_a_step(folder: str) -> dict:
    """Rank 1 never calls step(): rank 0 must give up after DISTSPARSE_COLLECTIVE_TIMEOUT
    with an error naming the collective, instead of hanging for the process group's timeout.
    Rank 1 stays alive until rank 0 is done (a flag file, not a fixed sleep: on a loaded
    machine rank 1's exit must not be what ends rank 0's wait)."""
    import time

    done = os.path.join(folder, "rank0_done")
    sp = distsparse.DataNormSparsifier()
    sp.add_data("w", nn.Parameter(torch.ones(8, 8)))
    if dist.get_rank() == 1:
        while not os.path.exists(done):  # the job timeout catches a hang
            time.sleep(0.05)
        return {"skipped": True}
    started = time.monotonic()
    try:
        sp.step()
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - started}
    finally:
        open(done, "w").close()
    return {"error": None}
