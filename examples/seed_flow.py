"""
    python examples/seed_flow.py
    accelerate launch --config_file launch/cpu_2proc.yaml examples/seed_flow.py   # same flow on 2 ranks

The seed README's flow (torch.ao's data-scheduler README, ../shared/origin in the project
notes) running on distsparse: the README's own `GammaScheduler` subclass, unchanged,
drives a `DataNormSparsifier` that was built with no data; each input batch is added
inside the training loop with `data_sparsifier.add_data(name="train_data", data=input)`
(a plain tensor, so a *local* group: under several processes every rank masks its own
batch), `data_sparsifier.step()` runs after every batch and `data_scheduler.step()`
after every epoch.

Part 1 shows the README's arithmetic as written: its `get_schedule_param()` returns 0.0
at epoch 0 and `min(threshold_sl, level * gamma)` afterwards (the *current* level times
gamma). In the README's order (no data when the scheduler is built) the group joins with
the sparsifier's default level and doubles from there; when the group already exists at
construction (run 1b), the epoch-0 branch sets it to 0.0 and 0.0 * gamma stays 0.0. Part 2 uses distsparse's built-in
`distsparse.GammaScheduler(sp, gamma=..., threshold=...)`, which sets
`level = min(threshold, base_level * gamma ** epoch)` from each group's *base* level (the
value it had when first scheduled), so it really ramps.

Batches must keep their shape: with `reuse_mask=True` (the default) the re-added batch
has to match the stored mask, and distsparse raises ValueError on a smaller last batch,
hence `drop_last=True` (and a dataset size that the batch size divides).
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import distsparse
from distsparse import BaseDataScheduler, DataNormSparsifier


# ---- exactly as in the seed README ------------------------------------------------
class GammaScheduler(BaseDataScheduler):
    def __init__(self, data_sparsifier, gamma, threshold_sl):
        super().__init__(data_sparsifier, "sparsity_level")
        self.gamma = gamma
        self.threshold_sl = threshold_sl

    def get_schedule_param(self):
        if self.last_epoch > 0:
            return {name: min(self.threshold_sl, config["sparsity_level"] * self.gamma) for name, config in self.data_sparsifier.data_groups.items()}
        else:
            return {name: 0.0 for name, config in self.data_sparsifier.data_groups.items()}
# -------------------------------------------------------------------------------------


EPOCHS = 5
N, FEATURES, BATCH = 512, 16, 64          # 512 / 64 = 8 full batches per epoch


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=g)
    w = torch.randn(FEATURES, generator=g)
    y = (x @ w > 0).long()
    return TensorDataset(x, y)


def train(make_scheduler, title, sparsity_level, add_before_scheduler=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    data_sparsifier = DataNormSparsifier(sparsity_level=sparsity_level, sparse_block_shape=(1, 4))  # no data yet
    dataset = DataLoader(make_data(), batch_size=BATCH, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(0))
    data_name = "train_data"
    if add_before_scheduler:   # the group exists when the scheduler's constructor runs step()
        data_sparsifier.add_data(name=data_name, data=torch.zeros(BATCH, FEATURES))
    data_scheduler = make_scheduler(data_sparsifier)

    print(f"\n== {title}")
    print(f"   sparsifier default sparsity_level={sparsity_level}; group added "
          f"{'before' if add_before_scheduler else 'after'} the scheduler was built")
    for epoch in range(EPOCHS):
        total = 0.0
        level_used = None
        for input, target in dataset:
            input = data_sparsifier.add_data(name=data_name, data=input)
            if level_used is None:
                level_used = data_sparsifier.data_groups[data_name]["sparsity_level"]

            optimizer.zero_grad()
            output = model(input)
            loss = loss_fn(output, target)
            loss.backward()
            optimizer.step()
            data_sparsifier.step()
            total += loss.item()

        zeros = 1.0 - data_sparsifier.get_mask(data_name).float().mean().item()
        data_scheduler.step()
        nxt = data_scheduler.get_last_param().get(data_name)
        print(f"   epoch {epoch}: level used {level_used:.3f}  zeros in mask {zeros:.3f}  "
              f"loss {total / len(dataset):.4f}  -> scheduler.step(): last_epoch={data_scheduler.last_epoch} "
              f"next level {nxt if nxt is None else round(float(nxt), 4)}")
    return data_sparsifier, data_scheduler


def main():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # launched by torchrun / accelerate launch: join the group so distsparse is rank-aware
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized() and dist.get_rank() != 0:
        global print
        print = lambda *a, **k: None  # noqa: E731  (rank 0 reports; every rank trains)
    print(f"world_size={dist.get_world_size() if dist.is_initialized() else 1}")
    # Part 1: the README's subclass, unchanged, in the README's order (sparsifier without
    # data, batches added in the loop): each epoch it multiplies the current level by gamma.
    train(lambda sp: GammaScheduler(sp, gamma=2.0, threshold_sl=0.8),
          "seed README GammaScheduler(gamma=2, threshold_sl=0.8)", 0.1)
    # Part 1b: same subclass, but the group already exists when the scheduler is built: the
    # README's epoch-0 branch sets it to 0.0, and 0.0 * gamma stays 0.0 for ever.
    train(lambda sp: GammaScheduler(sp, gamma=2.0, threshold_sl=0.8),
          "seed README GammaScheduler(gamma=2, threshold_sl=0.8), group added first", 0.1,
          add_before_scheduler=True)
    # Part 2: distsparse's built-in gamma schedule, min(threshold, base_level * gamma ** epoch),
    # from the level the group had when first scheduled (its base level): it ramps either way.
    train(lambda sp: distsparse.GammaScheduler(sp, gamma=2.0, threshold=0.8),
          "distsparse.GammaScheduler(gamma=2, threshold=0.8), group added first", 0.1,
          add_before_scheduler=True)

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
