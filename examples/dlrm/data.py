"""The click data both DLRM jobs train on, and where a resumed run re-enters it.

* `synthetic_clicks`: a deterministic click log generated in-process from `--seed` (400k rows
  by default; users and items with Zipf popularity and latent factors, items with 1-3
  categories, hour/device/region context, 4 dense features; labels drawn from a logistic
  model, so the task is learnable). `csv_clicks` reads `user,item,label` rows instead (ids may
  be any tokens, labels 0 or 1; the item's category bag is derived from a hash of the item id,
  context/dense features are 0). `split` takes 10 % for validation.
* `EpochSampler`: the training permutation depends only on (seed, epoch), and a checkpoint
  records the epoch and how many samples of it were consumed. A resumed run continues that
  epoch at exactly that sample (`position_after_resume`; accelerate's `skip_first_batches`
  is not used: in accelerate 1.15 its loader does not pass `set_epoch` on to a custom sampler
  under several processes, which replayed epoch 0's order after the first epoch). Same world
  size and batch size: the resumed run follows the uninterrupted one step for step, bit for
  bit. Another world size or `--batch-size`: it says what changed (global batch, steps per
  epoch) and still sees every sample of the epoch once.
"""

from __future__ import annotations

import csv
import math

import torch
from torch.utils.data import Sampler

TABLES = ("user", "item", "item_category", "hour", "device", "region")
N_DENSE = 4
MAX_CATS = 3
MANY_EPOCHS = 5  # warn from this many passes over the training rows


def synthetic_clicks(rows: int, n_users: int, n_items: int, n_cats: int, seed: int):
    """Deterministic click log: same (rows, sizes, seed) -> same tensors on every rank."""
    g = torch.Generator().manual_seed(seed)
    k = 8

    def zipf(n, a):
        w = 1.0 / (torch.arange(n, dtype=torch.float64) + 5.0) ** a
        perm = torch.randperm(n, generator=g)  # popular ids are not just the low ones
        return w[perm]

    user = torch.multinomial(zipf(n_users, 0.8), rows, replacement=True, generator=g)
    item = torch.multinomial(zipf(n_items, 1.0), rows, replacement=True, generator=g)
    hour = torch.randint(0, 24, (rows,), generator=g)
    device = torch.randint(0, 6, (rows,), generator=g)
    region = torch.randint(0, 50, (rows,), generator=g)
    dense = torch.randn(rows, N_DENSE, generator=g)

    # item -> 1..3 categories in 1..n_cats (0 is padding)
    n_of = torch.randint(1, MAX_CATS + 1, (n_items,), generator=g)
    item_cats = torch.randint(1, n_cats + 1, (n_items, MAX_CATS), generator=g)
    item_cats[torch.arange(MAX_CATS)[None, :] >= n_of[:, None]] = 0
    cats = item_cats[item]

    U = torch.randn(n_users, k, generator=g) / math.sqrt(k)
    V = torch.randn(n_items, k, generator=g)
    bu = 0.5 * torch.randn(n_users, generator=g)
    bi = 0.8 * torch.randn(n_items, generator=g)
    bc = torch.cat([torch.zeros(1), 0.6 * torch.randn(n_cats, generator=g)])
    bh = 0.5 * torch.sin(torch.arange(24) / 24 * 2 * math.pi)
    bd = 0.3 * torch.randn(6, generator=g)
    br = 0.3 * torch.randn(50, generator=g)
    wd = torch.tensor([0.6, -0.4, 0.3, 0.0])
    cat_sum = bc[cats].sum(1) / (cats > 0).sum(1)
    logit = (1.5 * (U[user] * V[item]).sum(1) + bu[user] + bi[item] + cat_sum
             + bh[hour] + bd[device] + br[region] + dense @ wd - 0.5)
    label = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return dict(user=user, item=item, cats=cats, hour=hour, device=device, region=region,
                dense=dense, label=label)


def csv_clicks(path: str, n_cats: int):
    """`user,item,label` rows (a header line is skipped). Ids are arbitrary tokens; a label
    must be 0 or 1 (a click log: anything else is refused with its line number, never
    clamped)."""
    users, items, labels = [], [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{i + 1}: expected user,item,label, got {row!r}")
            try:
                lab = float(row[2])
            except ValueError:
                if i == 0:
                    continue  # header
                raise ValueError(f"{path}:{i + 1}: label {row[2]!r} is not a number") from None
            if lab not in (0.0, 1.0):
                raise ValueError(f"{path}:{i + 1}: label {row[2].strip()!r} is not 0 or 1 (a click label)")
            users.append(row[0].strip()); items.append(row[1].strip()); labels.append(lab)
    if not labels:
        raise ValueError(f"{path}: no rows")
    def factorize(tokens):
        index = {t: j for j, t in enumerate(sorted(set(tokens)))}
        return torch.tensor([index[t] for t in tokens])
    user, item = factorize(users), factorize(items)
    rows = len(labels)
    # category bag from a stable hash of the item index (CSV has no categories)
    h = (item[:, None] * torch.tensor([2654435761, 40503, 97]) + torch.tensor([0, 7, 13])) % n_cats + 1
    h[:, 2] = 0
    z = torch.zeros(rows, dtype=torch.long)
    return dict(user=user, item=item, cats=h, hour=z, device=z.clone(), region=z.clone(),
                dense=torch.zeros(rows, N_DENSE), label=torch.tensor(labels))


class EpochSampler(Sampler):
    """Permutation that depends only on (seed, epoch), optionally entered mid-epoch.

    `start_at(epoch, position)` makes the pass over `epoch` begin at that position of its
    permutation (a resumed run continues exactly where the checkpoint stopped, whatever
    the global batch now is); every other epoch is whole.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self._resume = (-1, 0)  # (epoch, first position) of a resumed epoch

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def start_at(self, epoch: int, position: int):
        self.epoch, self._resume = epoch, (epoch, position)

    def _first(self) -> int:
        return self._resume[1] if self._resume[0] == self.epoch else 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self._first():].tolist())

    def __len__(self):
        return self.n - self._first()


def split(data: dict, seed: int) -> tuple[dict, dict]:
    """(train, validation): a seeded 90/10 split, the same on every rank."""
    n = data["label"].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, n // 10)
    return {k: v[perm[n_val:]] for k, v in data.items()}, {k: v[perm[:n_val]] for k, v in data.items()}


def position_after_resume(st: dict, n_train: int, batch_size: int, world: int, steps_per_epoch: int):
    """(epoch, first sample of the epoch, note) to continue from a checkpoint's train_state.

    The checkpoint says which epoch it was in and how many samples of that epoch's
    permutation were consumed; the run continues at exactly that sample, so no sample of
    the epoch is seen twice or skipped, whatever the global batch is now. The note (None
    when nothing changed) says what did change.
    """
    old_world = int(st.get("world_size") or world)
    old_bs = int(st.get("batch_size") or batch_size)
    old_gb, new_gb = old_bs * old_world, batch_size * world
    epoch = int(st.get("epoch", st["step"] // max(1, steps_per_epoch)))
    pos = int(st["epoch_position"]) if "epoch_position" in st else int(st.get("batch_in_epoch", 0)) * old_gb
    if old_gb == new_gb and old_world == world:
        return epoch, pos, None
    left = n_train - pos
    note = (f"resized: {old_world} processes x batch {old_bs} -> {world} x {batch_size}: global batch "
            f"{old_gb} -> {new_gb} samples per step, {n_train // old_gb} -> {steps_per_epoch} steps per epoch.\n"
            f"resized: epoch {epoch} continues at sample {pos} of {n_train} exactly, so no sample of it is seen "
            f"again or skipped; its remaining {left} samples make {left // new_gb} steps, the last {left % new_gb} "
            f"are dropped (drop_last; {left % old_gb} at the old size). Steps (and the sparsity schedule, which "
            f"counts steps) continue from {st['step']}, now {new_gb} samples each.")
    return epoch, pos, note


def epochs_note(max_steps: int, step: int, steps_per_epoch: int, n_train: int) -> str:
    """How many passes over the training rows the run makes, with a warning when many."""
    epochs = max_steps / steps_per_epoch
    text = f"the run makes {max_steps} steps = {epochs:.2f} epochs over the {n_train} training rows"
    if step:
        text += f" ({max_steps - step} steps = {(max_steps - step) / steps_per_epoch:.2f} epochs left)"
    if epochs >= MANY_EPOCHS:
        text += (f"\nwarning: {epochs:.1f} passes over the same rows: the models (the dense baseline first) may "
                 f"overfit and the validation numbers then say little; use more rows or fewer --max-steps")
    return text

