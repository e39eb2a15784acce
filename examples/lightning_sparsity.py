"""Lightning training with an embedding table and MLP sparsified on a schedule, resumable.

    python examples/lightning_sparsity.py                   # 1 CPU process
    python examples/lightning_sparsity.py --devices 2       # 2 CPU processes, strategy="ddp" (gloo)
    python examples/lightning_sparsity.py --devices 2 --epochs 6 --resume   # continue from runs/lightning/last.ckpt

TrainingAwareDataSparsity (torch.ao's callback, from distsparse) sparsifies the weights of
the model being trained from 0 to 80 % with a cubic schedule, every 10 optimizer steps; under
DDP each mask is computed by one rank and shared. Lightning's checkpoints (``last.ckpt``)
carry the masks and the schedule, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import distsparse
from distsparse.integrations.lightning import TrainingAwareDataSparsity


class ClickModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank
        self.model = nn.Sequential(nn.Embedding(500, 16), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        ids, label = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(ids).squeeze(-1), label)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(samples: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (samples, 4), generator=g)  # 4 ids per sample; clicks depend on ids % 7
    label = ((ids % 7 == 0).sum(1) > 0).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, label), batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (default 1)")
    parser.add_argument("--epochs", type=int, default=4, help="train up to this epoch (default 4)")
    parser.add_argument("--resume", action="store_true", help="continue from runs/lightning/last.ckpt")
    parser.add_argument("--out", default="runs/lightning", help="checkpoint folder (default runs/lightning)")
    parser.add_argument("--samples", type=int, default=4096, help="synthetic training samples (default 4096)")
    args = parser.parse_args()

    sparsity = TrainingAwareDataSparsity(
        data_sparsifier_class=distsparse.DataNormSparsifier,
        data_sparsifier_args={"sparsity_level": 0.0, "sparse_block_shape": (1, 4)},
        data_scheduler_class=distsparse.CubicScheduler,
        data_scheduler_args={"final_value": 0.8, "ramp_steps": 12},  # 12 sparsifier steps = 120 optimizer steps
        every_n_train_steps=10,
        include="*.weight",  # weights only (torch.ao: every parameter)
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, callbacks=[sparsity, ModelCheckpoint(dirpath=args.out, save_last=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    sparsifier_steps = args.epochs * -(-args.samples // 64) // 10  # 64 samples a batch, every 10 steps
    if sparsifier_steps < 12 + 1:  # step k's masks use the level of scheduler epoch k - 1
        print(f"warning: {sparsifier_steps} sparsifier steps: the masks reach the final level 0.8 at step 13; "
              "train longer (--epochs, --samples)")
    ckpt = os.path.join(args.out, "last.ckpt") if args.resume else None
    trainer.fit(ClickModel(), data(args.samples), ckpt_path=ckpt)
    if trainer.is_global_zero:
        sp, sch = sparsity.data_sparsifier, sparsity.data_scheduler
        print(f"world_size={trainer.world_size} global_step={trainer.global_step} sparsifier steps={sp.step_count} "
              f"scheduler epoch={sch.last_epoch} loss={float(trainer.callback_metrics['loss']):.4f}")
        def level(name: str) -> str:  # the level the masks were computed with
            return "-" if sparsity.mask_params is None else f"{sparsity.mask_params[name]:.3f}"

        for name in sp.data_groups:
            weight, mask = sp.get_data(name), sp.get_mask(name)
            print(f"  {name:10s} {tuple(weight.shape)!s:10s} pruned {1 - float(mask.double().mean()):.4f} "
                  f"zeros {float((weight == 0).double().mean()):.4f} level {level(name)} "
                  f"(next {sp.data_groups[name]['sparsity_level']:.3f}, mask computed by rank {sp.owner_of(name)})")


if __name__ == "__main__":
    main()
