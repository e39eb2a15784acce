"""Per-rank body of the Lightning DDP tests (launched by tests/test_lightning_integration.py).

    python tests/_lightning_ddp_job.py OUT_DIR

Lightning's ``strategy="ddp"`` re-runs this script for rank 1 (2 CPU processes, gloo);
both ranks run every phase below in step and write what they saw to
``OUT_DIR/rank<r>.json``; the test compares the ranks and the runs:

* ``full``: TrainingAwareDataSparsity every 2 optimizer steps, 4 epochs in one go;
* ``resumed``: 2 epochs, checkpoint, then a new Trainer resumes to 4 epochs from it;
* ``post``: PostTrainingDataSparsity on a 1-epoch run;
* ``wrong_world``: a sparsifier bound to a one-rank group under a 2-process Trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import lightning.pytorch as L

import distsparse
from distsparse.integrations.lightning import PostTrainingDataSparsity, TrainingAwareDataSparsity

OUT = sys.argv[1]
SPARSIFIER_ARGS = {"sparsity_level": 0.0, "sparse_block_shape": (1, 4)}
SCHEDULER_ARGS = {"final_value": 0.75, "initial_value": 0.1, "ramp_steps": 10}  # still ramping at the interruption


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank
        self.model = nn.Sequential(nn.Embedding(40, 8), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.mse_loss(self.model(ids).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (96, 3), generator=g)
    y = (ids.float().mean(1) / 40) + 0.1 * torch.randn(96, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=8)


def trainer(max_epochs: int, callbacks: list, root: str) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, callbacks=callbacks,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=root, deterministic=True)


def training_aware() -> TrainingAwareDataSparsity:
    return TrainingAwareDataSparsity(distsparse.DataNormSparsifier, SPARSIFIER_ARGS, distsparse.LinearScheduler,
                                     SCHEDULER_ARGS, every_n_train_steps=2, include=["0.weight", "*.weight"])


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def summary(cb: TrainingAwareDataSparsity, module: Net, t: L.Trainer) -> dict:
    sp, sch = cb.data_sparsifier, cb.data_scheduler
    return {
        "masks": {n: digest(sp.get_mask(n)) for n in sorted(sp.data_groups)},
        "sparsity": {n: 1 - float(sp.get_mask(n).float().mean()) for n in sorted(sp.data_groups)},
        "weights": {n: digest(p) for n, p in module.model.named_parameters()},
        "weights_match_masks": all(bool((p.detach()[~sp.get_mask(n)] == 0).all()) for n, p in
                                   module.model.named_parameters() if n in sp.data_groups),
        "step_count": sp.step_count, "last_epoch": sch.last_epoch, "levels": sch.get_last_param(),
        "global_step": t.global_step, "last_step_at": cb.last_step_at,
        "logged": sorted(k for k in t.callback_metrics if k.startswith("sparsity/")),
        "owners": {n: sp.owner_of(n) for n in sorted(sp.data_groups)},
        "world": sp.world_size,
    }


def main() -> None:
    result: dict = {}
    # full run
    cb, net = training_aware(), Net()
    t = trainer(4, [cb], f"{OUT}/full")
    t.fit(net, loader())
    rank = dist.get_rank()
    result["full"] = summary(cb, net, t)

    # interrupted after 2 epochs, resumed to 4 from the checkpoint
    cb, net = training_aware(), Net()
    t = trainer(2, [cb], f"{OUT}/part")
    t.fit(net, loader())
    ckpt = f"{OUT}/epoch2.ckpt"
    t.save_checkpoint(ckpt)  # every rank calls it; rank 0 writes
    result["part"] = summary(cb, net, t)
    cb, net = training_aware(), Net()
    t = trainer(4, [cb], f"{OUT}/resumed")
    t.fit(net, loader(), ckpt_path=ckpt)
    result["resumed"] = summary(cb, net, t)
    result["ckpt"] = ckpt

    # post-training: a sparsified copy, the trained model untouched
    post, net = PostTrainingDataSparsity(distsparse.DataNormSparsifier, {"sparsity_level": 0.5},
                                         module_types=(nn.Linear,)), Net()
    t = trainer(1, [post], f"{OUT}/post")
    t.fit(net, loader())
    sp = post.data_sparsifier
    result["post"] = {
        "groups": sorted(sp.data_groups),
        "masks": {n: digest(sp.get_mask(n)) for n in sorted(sp.data_groups)},
        "copy_zeros": {n: float((p == 0).float().mean()) for n, p in post.sparsified.named_parameters()},
        "trained_zeros": {n: float((p == 0).float().mean()) for n, p in net.model.named_parameters()},
        "copy_is_model": post.sparsified is net.model,
    }

    # a sparsifier on a one-rank sub-group while Lightning trains on two ranks
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    bad = TrainingAwareDataSparsity(distsparse.DataNormSparsifier,
                                    {"sparsity_level": 0.5, "process_group": groups[rank]},
                                    distsparse.LinearScheduler, SCHEDULER_ARGS)
    try:
        trainer(1, [bad], f"{OUT}/bad").fit(Net(), loader())
        result["wrong_world"] = "no error"
    except RuntimeError as exc:
        result["wrong_world"] = str(exc)

    with open(f"{OUT}/rank{rank}.json", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    os.environ.setdefault("DISTSPARSE_COLLECTIVE_TIMEOUT", "60")
    main()
