"""A small deterministic "training" job for the resume tests, runnable in-process, in a
fresh subprocess, or on every rank of a :func:`launcher.run_ranks` job.

At step ``t`` the data is a function of ``t`` (and, for the per-rank batch, of the rank):
it stands in for the model weights that the model's own checkpoint restores. The
checkpoint carries only the sparsity state, so a resumed run must reproduce every later
mask and schedule value of an uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from typing import Any

import torch
from torch import nn

from distsparse import CubicScheduler, DataNormSparsifier, load_checkpoint, save_checkpoint
from distsparse.masks import pack_bits

REPLICATED = ("emb.weight", "mlp.0.weight", "mlp/1.weight")
LOCAL = "batch"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _randn(shape: tuple[int, ...], *seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(seed) & 0x7FFFFFFF)
    return torch.randn(*shape, generator=g)


class Job:
    def __init__(self) -> None:
        self.emb = nn.Embedding(64, 16)
        self.mlp0 = nn.Parameter(torch.zeros(24, 12))
        self.mlp1 = nn.Parameter(torch.zeros(9, 7))
        self.sp = DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
        self.sp.add_data("emb.weight", self.emb)
        self.sp.add_data("mlp.0.weight", self.mlp0)
        self.sp.add_data("mlp/1.weight", self.mlp1, sparse_block_shape=(3, 1))
        self.sch = CubicScheduler(self.sp, final_value=0.85, initial_value=0.05, ramp_steps=6, update_every=2)

    def set_data(self, t: int) -> None:
        """What training (or the model checkpoint) would hold at step t."""
        with torch.no_grad():
            self.emb.weight.copy_(_randn((64, 16), 1, t))
            self.mlp0.copy_(_randn((24, 12), 2, t))
            self.mlp1.copy_(_randn((9, 7), 3, t))

    def batch(self, t: int) -> torch.Tensor:
        return _randn((5, 8), 4, t, _rank())

    def train_step(self, t: int) -> dict[str, Any]:
        self.set_data(t)
        self.sp.add_data(LOCAL, self.batch(t))
        self.sp.step()
        self.sch.step()
        return self.record(t)

    def record(self, t: int) -> dict[str, Any]:
        masks = {n: hashlib.sha256(pack_bits(self.sp.get_mask(n)).numpy().tobytes()).hexdigest()
                 for n in sorted(self.sp.data_groups)}
        record = {"t": t, "masks": masks, "levels": self.sch.get_last_param(),
                  "configs": {n: dict(c) for n, c in sorted(self.sp.data_groups.items())},
                  "epoch": self.sch.last_epoch, "step_count": self.sp.step_count}
        return json.loads(json.dumps(record))  # as it travels between processes (tuples -> lists)


def full(path: str, steps: int, save_at: int) -> list[dict[str, Any]]:
    """Uninterrupted run of ``steps`` steps; saves a checkpoint after step ``save_at``."""
    job = Job()
    records = []
    for t in range(1, steps + 1):
        records.append(job.train_step(t))
        if t == save_at:
            save_checkpoint(path, job.sp, job.sch)
    return records


def resume(path: str, steps: int, save_at: int) -> dict[str, Any]:
    """A fresh job that loads the checkpoint saved after ``save_at`` and runs on to ``steps``."""
    job = Job()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, job.sp, job.sch)
        # The batch group was saved but is not added yet: it waits, then takes its mask.
        pending = LOCAL in job.sp._pending
        job.set_data(save_at)
        job.sp.add_data(LOCAL, job.batch(save_at))
    at_resume = job.record(save_at)
    local_mask_fresh = bool(job.sp.get_mask(LOCAL).all())
    records = [job.train_step(t) for t in range(save_at + 1, steps + 1)]
    return {"at_resume": at_resume, "records": records, "pending_before_add": pending,
            "local_mask_fresh": local_mask_fresh,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}


if __name__ == "__main__":  # python _resume_job.py resume PATH STEPS SAVE_AT  (prints JSON)
    torch.set_num_threads(1)
    mode, path, steps, save_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    result = resume(path, steps, save_at) if mode == "resume" else full(path, steps, save_at)
    print(json.dumps(result))
