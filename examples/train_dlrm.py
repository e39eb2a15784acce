"""
    accelerate launch --config_file launch/cpu_2proc.yaml examples/train_dlrm.py     # 2 CPU processes (gloo)
    accelerate launch --config_file launch/single_gpu.yaml examples/train_dlrm.py    # 1 GPU
    accelerate launch --config_file launch/multi_gpu.yaml examples/train_dlrm.py     # N GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/train_dlrm.py                                # same as the first line
    python examples/train_dlrm.py                                                     # 1 process, no launcher
    torchrun --nproc_per_node 2 examples/train_dlrm.py --fsdp2                        # tables sharded by FSDP2 (CPU: gloo)
    accelerate launch --config_file launch/fsdp2_gpu.yaml examples/train_dlrm.py --fsdp2  # N GPUs, accelerate's FSDP2 plugin

Run from the repository root. By default the run trains the sparse model AND a dense
baseline side by side and reports what sparsity cost; `--no-baseline` skips the baseline,
`--dense` trains only a dense model (no sparsifier), `--csv PATH` trains on your own
`user,item,label` rows, `--fsdp2` shards the tables instead of replicating them. Every
option and its default is listed below.

DLRM-style click model whose embedding tables are sparsified during training by
distsparse, trained with HuggingFace accelerate (DDP; FSDP2 with --fsdp2), resumable
after a crash.

What it does
------------
* Data: a deterministic synthetic click log generated in-process from `--seed`
  (400k rows by default; users and items with Zipf popularity and latent factors, items
  with 1-3 categories, hour/device/region context, 4 dense features; labels drawn from a
  logistic model, so the task is learnable), split 90/10 into train/validation.
  `--csv PATH` reads `user,item,label` rows instead (ids may be any tokens, labels 0 or 1;
  the item's category bag is derived from a hash of the item id, context/dense features
  are 0). The run says how many epochs it makes over the training rows and warns when
  they are many (the dense baseline then overfits).
* Model: tables `user`, `item` (nn.Embedding), `item_category` (nn.EmbeddingBag, mean
  over up to 3 categories, padding index 0), `hour`, `device`, `region` (small
  nn.Embedding), a bottom MLP for the dense features, pairwise dot-product interactions
  and a top MLP (DLRM, Naumov et al. 2019).
* Sparsity: `distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))`
  with every table added by `sp.add_data(name, table)` (embedding tables are
  "replicated" groups: each table's mask is computed by one owning rank and shared), and
  `distsparse.CubicScheduler(sp, final_value=0.8, initial_value=0.0, start_step=S0,
  ramp_steps=R)`. Every training step: optimizer step, `sp.step()` (new masks from the
  current weights), `sch.step()` (next sparsity level), `sp.squash_mask()` (the masks are
  multiplied into the live embedding weights, so the next forward pass uses them).
  Pruned weights may regrow through the optimizer and be pruned again at the next step
  (gradual magnitude pruning); after the ramp the level stays at `--final-sparsity`.
* Dense baseline (default): a second model, a `copy.deepcopy` of the sparse model taken
  before training (same initial weights) with its own Adam optimizer (same
  hyper-parameters) and no sparsifier, trained in the same loop on the same batches for
  the same number of steps. Both models (and optimizers) are prepared by accelerate and
  are in every checkpoint (`model.safetensors` / `model_1.safetensors`, `optimizer.bin` /
  `optimizer_1.bin`), so a resumed run continues both exactly. At the end both are
  evaluated on the validation set and the difference is what sparsity cost.
  `--no-baseline` trains the sparse model alone and reports the sparse model at step
  S0 = `--start-step` (still dense then, fewer steps: only a rough reference). A checkpoint
  written with a baseline can only be resumed with one, and vice versa.
* Data order: the training permutation depends only on (seed, epoch) (`EpochSampler`),
  and a checkpoint records the epoch and how many samples of it were consumed. A resumed
  run continues that epoch at exactly that sample (the sampler starts there; accelerate's
  `skip_first_batches` is not used: in accelerate 1.15 its loader does not pass
  `set_epoch` on to a custom sampler under several processes, which replayed epoch 0's
  order after the first epoch). Same world size and batch size: the resumed run follows
  the uninterrupted one step for step, bit for bit. Another world size or `--batch-size`:
  it says what changed (global batch, steps per epoch) and still sees every sample of
  the epoch once.
* Checkpoints (FSDP2 mode: the same files, see below): `accelerator.save_state()` every
  `--save-every` steps into
  `OUTPUT_DIR/ckpt/step_000120/` (model, optimizer, RNG states, plus distsparse's
  safetensors sparsity state through `distsparse.register_for_checkpointing`); after every
  rank has finished writing (`wait_for_everyone`), the main process writes
  `train_state.json` (step, epoch position, world size, a sha256 of every accelerate
  file) and a `COMPLETE` marker, and only then deletes the complete checkpoints
  beyond the newest `--keep` among those at or before the step just written (a newer
  folder, e.g. one skipped as damaged, is never counted or deleted: it is replaced when
  the run reaches its step again).
* Resume (`--resume auto`, the default): the checkpoint folders are tried newest first;
  a folder without `COMPLETE`, with an unreadable `train_state.json`, with a file that
  does not match the sha256 recorded for it in `train_state.json` (accelerate's files
  carry no checksum of their own), or whose files fail to load (distsparse verifies each
  of its tensors' sha256) is skipped, and one line names each
  skipped folder and why. The run resumes from the newest one that loads, and stops with
  an error (deleting nothing) when complete checkpoints exist but none loads.
  `--resume PATH` loads exactly PATH or stops with one message; `--resume none` starts
  over. A finished run (summary.json at the newest checkpoint's step >= `--max-steps`)
  is not redone: it says so and exits 0.
* Output: a tqdm bar on the local main process; every `--log-every` steps a line with
  loss, throughput and per-table sparsity (also sent to `accelerator.log`, with trackers
  when `--log-with` is given); at the end the sparsified tables are exported with
  `distsparse.save_sparse_data` to `OUTPUT_DIR/sparse_tables.safetensors` (kept (1,4)
  blocks' values + 1 bit per block), and a summary: zeroed parameters per table, dense
  bytes vs the blocks' payload, the real export file size vs the same tables saved dense
  in safetensors, validation loss and AUC of each model and their difference;
  `OUTPUT_DIR/summary.json` holds it all with a sha256 digest of every mask, of every
  table's final weights, of both models' weights and the last scheduled values.
* `--prune rows`: whole rows are pruned (`sparse_block_shape=(1, dim)`, same schedule). At
  the end `distsparse.save_pruned_tables` writes `OUTPUT_DIR/pruned_tables.safetensors`
  (kept rows + int32 remap; with `--fsdp2` from the sharded tables, none gathered), a
  one-process copy of the model with `distsparse.PrunedEmbedding` / `PrunedEmbeddingBag`
  tables loaded from it serves the validation set, and the summary prints the served size
  vs dense and the served AUC, equal to the trained masked model's.
* `--crash-at-step N` ends every rank with `os._exit(1)` right after step N (after that
  step's checkpoint, if any): used to test crash/resume.

FSDP2 mode (`--fsdp2`)
----------------------
The embedding tables (and the MLPs) are sharded by rows with PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`) instead of replicated by DDP: each table module is
wrapped itself, then the root (a root-only wrap leaves the parameters unsharded after a
`no_grad` forward, e.g. the evaluation, until `reshard()`), and the dense baseline is
sharded the same way. Each table weight is then a `DTensor` (`Shard(0)`), which
`sp.add_data(name, table)` takes as a *sharded* group: every rank computes the mask of
its own rows and only the selection's counts travel (never the data or a mask).
* Who calls `fully_shard`: accelerate's FSDP2 plugin when it is on
  (`accelerator.distributed_type == FSDP`, i.e. `accelerate launch --config_file
  launch/fsdp2_gpu.yaml`: `fsdp_version: 2`, each `Embedding`/`EmbeddingBag` wrapped by
  `fsdp_transformer_layer_cls_to_wrap`; accelerate's `prepare()` shards); otherwise this
  script, on a 1-D device mesh over all ranks (`torchrun`, or `accelerate launch` on CPU,
  where accelerate 1.15 has no FSDP and its plugin falls back to DDP). `python
  examples/train_dlrm.py --fsdp2` (no launcher) opens a 1-rank process group itself. Either
  way the tables are checked to be sharded `Shard(0)` DTensors before training; a launch
  config that turns FSDP on without `--fsdp2`, or FSDP1 (`fsdp_version: 1`), is refused.
* Checkpoints: ONE sharded DCP checkpoint (`torch.distributed.checkpoint`) per step folder,
  `dcp/`, written by every rank for its own rows: each model's and optimizer's state
  (`get_model_state_dict` / `get_optimizer_state_dict`, by parameter name) and the sparsity
  (`distsparse.dcp_state`: masks row-packed as `Shard(0)` DTensors, configs and schedule as
  JSON), beside accelerate's `random_states_<rank>.pkl`, `train_state.json` (with `"mode"`
  and a sha256 of every file, those in `dcp/` too) and `COMPLETE`. No full state dict passes
  through any rank. Either mode resumes the other's checkpoint (and on another number of
  ranks): the FSDP2 mode reads a DDP folder's files (rank 0 checks them, then
  `set_model_state_dict(broadcast_from_rank0)` gives each rank its rows), the DDP mode reads
  `dcp/` into its whole tensors (DCP reshards); the masks reshard either way; the run says
  which mode wrote it. A folder written by an unknown mode is refused, naming it.
* Same settings, same numbers: both modes run the same float32 operations (the forward on
  the whole gathered weights; gradients halved, then summed over 2 ranks; elementwise
  Adam), so at world 2 on gloo (tests/test_example_fsdp2.py) and at world 1 on one GPU
  (checked on an H100) the FSDP2 mode ends bit-identical to the DDP mode: weights, masks,
  validation figures. It is slower on CPU (all-gathers and reduce-scatters per table).
* Resuming a DDP folder in the FSDP2 mode passes the full state through rank 0's CPU
  memory once (that folder holds full tensors). The summary at the end gathers the tables and masks (`full_tensor()`) for its figures,
  digests and the export (`distsparse.save_sparse_data` does not take DTensor groups: the
  masked tables are gathered and exported by rank 0 through a one-rank sparsifier).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import save as safetensors_bytes

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: a no-op stand-in
    class tqdm:  # type: ignore[no-redef]
        def __init__(self, *a, **k): pass
        def update(self, n=1): pass
        def set_postfix(self, *a, **k): pass
        def close(self): pass
        @staticmethod
        def write(s): print(s, flush=True)

import distsparse
from distsparse.integrations.accelerate import default_filename

TABLES = ("user", "item", "item_category", "hour", "device", "region")
N_DENSE = 4
MAX_CATS = 3
CKPT_RE = re.compile(r"^step_(\d{6,})$")
EXPORT_NAME = "sparse_tables.safetensors"
MANY_EPOCHS = 5  # warn from this many passes over the training rows


class JobError(Exception):
    """A refusal with a message for the user: printed once, no traceback, exit code 2."""


# --------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------- model
def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DLRM(nn.Module):
    def __init__(self, n_users, n_items, n_cats, dim=16):
        super().__init__()
        self.tables = nn.ModuleDict({
            "user": nn.Embedding(n_users, dim),
            "item": nn.Embedding(n_items, dim),
            "item_category": nn.EmbeddingBag(n_cats + 1, dim, mode="mean", padding_idx=0),
            "hour": nn.Embedding(24, dim),
            "device": nn.Embedding(6, dim),
            "region": nn.Embedding(50, dim),
        })
        for t in self.tables.values():
            nn.init.normal_(t.weight, std=0.1)
        with torch.no_grad():
            self.tables["item_category"].weight[0].zero_()
        self.bottom = mlp([N_DENSE, 32, dim])
        n_vec = len(self.tables) + 1
        self.register_buffer("iu", torch.triu_indices(n_vec, n_vec, offset=1), persistent=False)
        self.top = mlp([dim + self.iu.shape[1], 64, 32, 1])

    def forward(self, user, item, cats, hour, device, region, dense):
        t = self.tables
        vecs = [self.bottom(dense), t["user"](user), t["item"](item), t["item_category"](cats),
                t["hour"](hour), t["device"](device), t["region"](region)]
        T = torch.stack(vecs, 1)                      # (B, 7, dim)
        Z = torch.bmm(T, T.transpose(1, 2))           # pairwise dot products
        inter = Z[:, self.iu[0], self.iu[1]]          # (B, 21)
        return self.top(torch.cat([vecs[0], inter], 1)).squeeze(1)


# --------------------------------------------------------------------------- metrics
def auc_score(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC via the rank-sum (Mann-Whitney U) formula, ties get their average rank."""
    scores = scores.double().flatten(); labels = labels.flatten() > 0.5
    n_pos = int(labels.sum()); n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()                 # 1-based rank of each tie group's last
    avg_rank = ends - (counts.double() - 1) / 2             # average rank inside the group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model, data, device, batch=8192):
    model.eval()
    logits = []
    n = data["label"].numel()
    for s in range(0, n, batch):
        b = {k: v[s:s + batch].to(device) for k, v in data.items() if k != "label"}
        logits.append(model(**b).float().cpu())
    model.train()
    if hasattr(model, "reshard"):  # FSDP2: the root keeps its parameters unsharded after a no_grad forward
        model.reshard()
    logits = torch.cat(logits)
    loss = F.binary_cross_entropy_with_logits(logits, data["label"]).item()
    return {"loss": loss, "auc": auc_score(logits, data["label"])}


def table_summary_lines(summary: dict, folder: Path | None = None) -> list[str]:
    """The summary's per-table rows (shape, zeroed, sparsity, dense and kept-block bytes), the
    total and the exported file's size (its full path in ``folder``): shared by the main job
    and its TorchRec variant."""
    lines = [f"{'table':<14}{'shape':>12}{'zeroed':>18}{'sparsity':>10}{'dense B':>11}{'blocks B':>11}{'saved':>8}"]
    tot_d = tot_s = 0
    for name, t in summary["tables"].items():
        tot_d += t["dense_bytes"]; tot_s += t["blocks_bytes"]
        lines.append(f"{name:<14}{'x'.join(map(str, t['shape'])):>12}{t['zeroed']:>10}/{t['numel']:<7}"
                     f"{t['sparsity']:>10.3f}{t['dense_bytes']:>11}{t['blocks_bytes']:>11}"
                     f"{1 - t['blocks_bytes'] / t['dense_bytes']:>8.1%}")
    lines.append(f"{'all tables':<14}{'':>12}{'':>18}{'':>10}{tot_d:>11}{tot_s:>11}{1 - tot_s / tot_d:>8.1%}")
    if summary["export"] is not None:
        e = summary["export"]
        lines.append(f"saved file  {(folder / EXPORT_NAME).resolve() if folder else EXPORT_NAME}: "
                     f"{e['file_bytes']} B on disk vs {e['dense_file_bytes']} B for the "
                     f"same tables dense in safetensors ({1 - e['file_bytes'] / e['dense_file_bytes']:.1%} smaller)")
    return lines


def mask_stats(mask: torch.Tensor, weight: torch.Tensor, block=4):
    """Zeroed params, dense bytes and the payload of a (1, block) block-sparse encoding:
    kept blocks' values plus a 1-bit-per-block bitmap (the export file adds its header)."""
    m = mask.detach().bool().cpu().reshape(-1, mask.shape[-1])
    rows, cols = m.shape
    nb = -(-cols // block)
    pad = nb * block - cols
    if pad:
        m = F.pad(m, (0, pad), value=False)
    kept_blocks = int(m.reshape(rows, nb, block).any(-1).sum())
    es = weight.element_size()
    return {
        "numel": weight.numel(),
        "zeroed": int((~mask.bool()).sum()),
        "sparsity": 1.0 - float(mask.float().mean()),
        "dense_bytes": weight.numel() * es,
        "blocks_bytes": kept_blocks * block * es + -(-(rows * nb) // 8),
        "kept_blocks": kept_blocks,
        "blocks": rows * nb,
    }


def mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.detach().bool().cpu().contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(root: Path, complete_only=True):
    """[(step, folder)] of `step_NNNNNN` folders, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / "COMPLETE").is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int, distrusted: set, write=None):
    """Write `root/step_NNNNNN` on every rank, mark it COMPLETE, then apply retention.

    `write(path)` writes the files on every rank (default: `accelerator.save_state`; the
    FSDP2 mode passes its own writer, same files).

    Retention counts only complete folders at or before `step` that are not `distrusted`
    (skipped as damaged when this run resumed): a folder newer than the run's position, or
    a damaged one, never pushes a good checkpoint out. Incomplete folders older than
    `step` are leftovers of interrupted saves and are removed.
    """
    path = root / f"step_{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():              # leftover of a crashed save or a damaged folder: replaced
            shutil.rmtree(path)
        path.mkdir(parents=True)
    distrusted.discard(path.name)
    accelerator.wait_for_everyone()
    if write is None:
        accelerator.save_state(str(path))  # every rank: model/optimizer (main), RNG (each), sparsity hook
    else:
        write(path)
    accelerator.wait_for_everyone()    # all ranks finished writing their files
    if accelerator.is_main_process:
        # accelerate's files carry no checksum (a flipped byte in model.safetensors would load
        # silently): record one per file; distsparse's own file checks each of its tensors
        state = dict(state, files={str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*"))
                                   if f.is_file() and not f.name.startswith("distsparse")})
        with open(path / "train_state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush(); os.fsync(f.fileno())
        with open(path / "COMPLETE", "w") as f:
            f.write(f"{step}\n"); f.flush(); os.fsync(f.fileno())
        trusted = [(s, p) for s, p in list_checkpoints(root) if s <= step and p.name not in distrusted]
        for _, p in trusted[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for s, p in list_checkpoints(root, complete_only=False):
            if s < step and not (p / "COMPLETE").is_file():
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def inspect_checkpoint(path: Path, sparse: bool, baseline: bool):
    """Rank 0's look at a folder before loading: ("ok", train_state), ("skip", why) for a
    folder that cannot be resumed from, or ("fatal", why) when it was written by a run
    configured differently (older folders were too: no point falling back)."""
    if not path.is_dir():
        return "skip", "not a folder"
    if not (path / "COMPLETE").is_file():
        return "skip", "no COMPLETE marker: its save did not finish"
    try:
        st = json.loads((path / "train_state.json").read_text())
        int(st["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return "skip", f"train_state.json unreadable ({type(exc).__name__}: {exc})"
    for name, digest in (st.get("files") or {}).items():
        if not (path / name).is_file():
            return "skip", f"{name} is missing"
        if file_sha256(path / name) != digest:
            return "skip", f"{name} does not match its sha256 in train_state.json (damaged file)"
    if "sparse" in st and bool(st["sparse"]) != sparse:
        return "fatal", (f"{path} was written by a {'sparse' if st['sparse'] else '--dense'} run; resume it "
                         f"{'without' if st['sparse'] else 'with'} --dense, or start over with "
                         f"--resume none / another --output-dir")
    if bool(st.get("baseline", False)) != baseline:
        return "fatal", (f"{path} was written {'with' if st.get('baseline') else 'without'} a dense "
                         f"baseline model; resume it {'without' if st.get('baseline') else 'with'} "
                         f"--no-baseline, or start over with --resume none / another --output-dir")
    mode = st.get("mode", "ddp")
    if mode not in MODES:
        return "fatal", (f"{path} was written in mode {mode!r}, which this script cannot resume (it resumes "
                         f"checkpoints of the modes {', '.join(MODES)}); start over with --resume none / another "
                         f"--output-dir")
    return "ok", st


def _one_line(exc: BaseException, folder: Path) -> str:
    """An exception as one short line, paths inside `folder` shown relative to it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.replace(str(folder) + os.sep, "")


def all_ranks(obj):
    """Every rank's `obj`, in rank order (a collective when distributed)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def resume(accelerator, args, ckpt_root: Path, sparse: bool, baseline: bool, say, load=None):
    """Load the checkpoint to continue from on every rank; return (folder, train_state,
    skipped names) or (None, None, skipped names) to start from scratch.

    `load(path)` loads a folder on every rank (default `accelerator.load_state`; the FSDP2
    mode passes its own loader, which reads the same files).

    Every decision is rank 0's (broadcast), and a load counts only if it succeeded on
    every rank (gathered), so all ranks always agree. A failed `load_state` may have
    changed some state (weights, optimizer) before raising; the next candidate's
    `load_state` overwrites all of it, and with no candidate left the run stops.
    """
    if args.resume == "none":
        return None, None, []
    explicit = args.resume != "auto"
    names = [None]
    if accelerator.is_main_process:
        names[0] = ([args.resume] if explicit else
                    [str(p) for _, p in reversed(list_checkpoints(ckpt_root, complete_only=False))])
    broadcast_object_list(names)
    skipped, complete_seen = [], False
    for name in names[0]:
        path = Path(name)
        verdict = [None]
        if accelerator.is_main_process:
            verdict[0] = inspect_checkpoint(path, sparse, baseline)
        broadcast_object_list(verdict)
        kind, detail = verdict[0]
        if kind == "fatal":
            raise JobError(detail)
        if kind == "ok":
            complete_seen = True
            try:
                if load is None:
                    accelerator.load_state(str(path))
                else:
                    load(path)
                error = None
            except Exception as exc:  # any failure: damaged file, missing file, shape change...
                error = _one_line(exc, path)
            errors = [(r, e) for r, e in enumerate(all_ranks(error)) if e is not None]
            if not errors:
                if skipped:
                    say(f"resume: skipped {'; '.join(skipped)}; resuming from {path.name}")
                return path, detail, [s.split(" ", 1)[0] for s in skipped]
            rank, detail = errors[0]
            if accelerator.num_processes > 1 and len(errors) < accelerator.num_processes:
                detail += f" (on rank{'s' if len(errors) > 1 else ''} {', '.join(str(r) for r, _ in errors)})"
        if explicit:
            raise JobError(f"cannot resume from {path}: {detail}. `--resume PATH` never falls back; "
                           f"use --resume auto to take the newest checkpoint that loads, or --resume none")
        skipped.append(f"{path.name} ({detail})")
    if complete_seen:
        raise JobError(f"no checkpoint in {ckpt_root} can be resumed from: {'; '.join(skipped)}. Nothing was "
                       f"deleted; start over with --resume none or another --output-dir")
    if skipped:
        say(f"resume: skipped {'; '.join(skipped)}; no complete checkpoint, starting from scratch")
    return None, None, [s.split(" ", 1)[0] for s in skipped]


def finished_message(args, out: Path, ckpt_root: Path):
    """Rank 0: a message when this output folder already holds the finished run, else None."""
    if args.resume != "auto" or not (out / "summary.json").is_file():
        return None
    try:
        final = int(json.loads((out / "summary.json").read_text())["final_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ckpts = list_checkpoints(ckpt_root)
    if final < args.max_steps or not ckpts or ckpts[-1][0] != final:
        return None
    export = out / EXPORT_NAME
    return (f"already finished: step {final} (--max-steps {args.max_steps}); the summary is {out / 'summary.json'}"
            + (f", the exported tables {export}" if export.is_file() else "")
            + ". Nothing to do: pass a larger --max-steps to train on, or --resume none (or another "
              "--output-dir) to start over.")


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


# --------------------------------------------------------------------------- FSDP2
MODES = ("ddp", "fsdp2")  # what train_state.json's "mode" may say (absent: ddp, written before --fsdp2)


def model_file(i: int) -> str:
    """accelerate's name for the i-th model's weights in a save_state folder."""
    return "model.safetensors" if i == 0 else f"model_{i}.safetensors"


def optimizer_file(i: int) -> str:
    return "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"


def fsdp2_route(accelerator) -> str:
    """'plugin' when accelerate's FSDP plugin is on (its prepare() calls fully_shard), else
    'direct' (this script calls fully_shard: torchrun, CPU, one process)."""
    from accelerate.utils import DistributedType

    return "plugin" if accelerator.distributed_type == DistributedType.FSDP else "direct"


def shard_model(model: "DLRM", mesh) -> None:
    """fully_shard each table module, then the root (the root group takes the MLPs).

    Wrapping the tables themselves matters: with only the root wrapped, a no_grad forward
    (the evaluation) leaves every parameter unsharded until reshard()."""
    from torch.distributed.fsdp import fully_shard

    for table in model.tables.values():
        fully_shard(table, mesh=mesh)
    fully_shard(model, mesh=mesh)


def check_sharded(model: nn.Module, what: str) -> None:
    """JobError unless the root and every table are FSDP2 modules with Shard(0) weights."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    bad = [n for n, t in model.tables.items()
           if not isinstance(t, FSDPModule) or not isinstance(t.weight, DTensor)
           or tuple(t.weight.placements) != (Shard(0),)]
    if bad or not isinstance(model, FSDPModule):
        raise JobError(
            f"--fsdp2: the {what}'s tables {bad or list(model.tables)} are not fully_shard-ed modules of their own "
            f"with Shard(0) weights{'' if isinstance(model, FSDPModule) else ' (and the root is not sharded)'}. With "
            "accelerate's FSDP2 plugin set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP and "
            "fsdp_transformer_layer_cls_to_wrap: Embedding,EmbeddingBag (launch/fsdp2_gpu.yaml): a root-only wrap "
            "leaves the tables unsharded after a no_grad forward")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The global tensor of a DTensor (a collective: every rank calls it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_by_index(osd: dict) -> dict:
    """A full optimizer state dict keyed by parameter names (get_optimizer_state_dict) in
    torch's own format (parameters numbered in the optimizer's order): what the DDP mode's
    optimizer.bin holds."""
    order = [fqn for group in osd["param_groups"] for fqn in group["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    return {"state": {index[fqn]: v for fqn, v in osd["state"].items()},
            "param_groups": [dict(g, params=[index[f] for f in g["params"]]) for g in osd["param_groups"]]}


def optimizer_by_name(sd: dict, names: list, shapes: dict, where: str) -> dict:
    """torch's optimizer state dict (parameters by index) keyed by this model's parameter
    names, checked against their global shapes (ValueError naming the file otherwise)."""
    try:
        order = [i for group in sd["param_groups"] for i in group["params"]]
        state = sd["state"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a torch optimizer state dict ({type(exc).__name__}: {exc})") from None
    if len(order) != len(names) or len(set(order)) != len(order):
        raise ValueError(f"{where}: {len(order)} parameters, this run's model has {len(names)}")
    name_of = {i: names[j] for j, i in enumerate(order)}
    for i, st in state.items():
        if i not in name_of:
            raise ValueError(f"{where}: state of parameter {i!r}, which no parameter group holds")
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and list(v.shape) != shapes[name_of[i]]:
                raise ValueError(f"{where}: {key} of {name_of[i]} has shape {list(v.shape)}, this run's "
                                 f"parameter {shapes[name_of[i]]}")
    return {"state": {name_of[i]: v for i, v in state.items()},
            "param_groups": [dict(g, params=[name_of[i] for i in g["params"]]) for g in sd["param_groups"]]}


def check_model_state(sd: dict, shapes: dict, where: str) -> None:
    """ValueError naming the file unless sd holds exactly this model's tensors and shapes."""
    missing, extra = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or extra:
        raise ValueError(f"{where}: " + "; ".join(s for s in (f"missing {missing}" if missing else "",
                                                           f"unexpected {extra}" if extra else "") if s))
    for name, shape in shapes.items():
        if list(sd[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {list(sd[name].shape)}, this run's model {shape} "
                             f"(another --num-users / --num-items / --num-categories / --dim or data?)")


def fsdp2_pairs_names(pairs) -> list:
    """Each (model, optimizer)'s parameter names in the optimizer's order (the index order
    of torch's optimizer format) and their global shapes."""
    out = []
    for model, opt in pairs:
        named = list(model.named_parameters())
        if [id(p) for g in opt.param_groups for p in g["params"]] != [id(p) for _, p in named]:
            raise RuntimeError("the optimizer's parameters are not the model's parameters in their order")
        out.append(([n for n, _ in named], {n: list(p.shape) for n, p in named}))
    return out


DCP_DIR = "dcp"  # the FSDP2 mode's one DCP checkpoint (models, optimizers, sparsity) inside a step folder


def dcp_state_dict(pairs, sp, sch) -> dict:
    """The state dict of a DCP checkpoint, in either mode: each model's and optimizer's state
    by parameter name (this rank's rows as DTensors under FSDP2, whole tensors under DDP) and
    the sparsity (`distsparse.dcp_state`: masks in their own layout, configs, scheduler)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {}
    for i, (model, opt) in enumerate(pairs):
        state[f"model_{i}"] = get_model_state_dict(model)
        state[f"optim_{i}"] = get_optimizer_state_dict(model, opt)
    if sp is not None:
        state["sparsity"] = distsparse.dcp_state(sp, sch)
    return state


def fsdp2_save_files(accelerator, path: Path, pairs, sp, sch) -> None:
    """Every rank: ONE sharded DCP checkpoint `path/dcp` (each rank writes its own rows of the
    models, optimizer states and masks: no full state dict anywhere) and this rank's RNG states
    (accelerate's random_states_<rank>.pkl)."""
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state

    dcp.save(dcp_state_dict(pairs, sp, sch), storage_writer=dcp.FileSystemWriter(str(path / DCP_DIR)))
    save_accelerator_state(str(path), [], [], [], [], accelerator.process_index, accelerator.step)


def load_dcp_files(accelerator, path: Path, pairs, sp, sch) -> None:
    """Every rank, either mode: load `path/dcp` (DCP reshards: each rank reads its rows, or the
    whole tensors under DDP), then the RNG states. DCP's own error (a shape change, say,
    raised on every rank) becomes one line naming the first failing rank's cause."""
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = dcp_state_dict(pairs, sp, sch)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)))
    except CheckpointException as exc:  # a BaseException: resume() catches Exceptions
        first = next(iter(exc.failures.values()), None)
        cause = first[0] if isinstance(first, tuple) else first
        raise RuntimeError(f"{DCP_DIR}: {cause if cause is not None else exc}") from None
    for i, (model, opt) in enumerate(pairs):
        set_model_state_dict(model, state[f"model_{i}"])
        set_optimizer_state_dict(model, opt, state[f"optim_{i}"])
    override = load_accelerator_state(str(path), [], [], [], [], accelerator.process_index)
    accelerator.step = override.get("step", accelerator.step)


def fsdp2_load_files(accelerator, path: Path, pairs, sp, sch) -> None:
    """Every rank: load a checkpoint folder of either mode into the sharded models.

    An FSDP2 folder (`dcp/`) goes through load_dcp_files. For a DDP folder, rank 0 reads and checks the model and optimizer files first (before any collective, so
    a damaged or mismatched file fails on every rank alike: no rank waits in a broadcast
    that will never come); then distsparse's file (collective; masks reshard), then the
    state dicts, sent from rank 0 (broadcast_from_rank0) so each rank keeps only its rows."""
    from accelerate.checkpointing import load_accelerator_state
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if (path / DCP_DIR).is_dir():
        return load_dcp_files(accelerator, path, pairs, sp, sch)
    names = fsdp2_pairs_names(pairs)
    states, error = [({}, {}) for _ in pairs], None
    if accelerator.is_main_process:
        try:
            for i, (order, shapes) in enumerate(names):
                where = model_file(i)
                if not (path / where).is_file():
                    raise FileNotFoundError(f"{where} is missing")
                msd = load_file(str(path / where))
                check_model_state(msd, shapes, where)
                where = optimizer_file(i)
                osd = optimizer_by_name(torch.load(path / where, map_location="cpu", weights_only=True),
                                        order, shapes, where)
                states[i] = (msd, osd)
        except Exception as exc:  # noqa: BLE001 - reported on every rank just below
            error = _one_line(exc, path)
    errors = [e for e in all_ranks(error) if e is not None]
    if errors:
        raise RuntimeError(errors[0])
    if sp is not None:
        distsparse.load_checkpoint(path / default_filename(sp), sp, sch)
    bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for (model, opt), (msd, osd) in zip(pairs, states):
        set_model_state_dict(model, msd, options=bcast)
        set_optimizer_state_dict(model, opt, osd, options=bcast)
    states.clear()
    override = load_accelerator_state(str(path), [], [], [], [], accelerator.process_index)
    accelerator.step = override.get("step", accelerator.step)


def sharded_sparsities(sp, device) -> dict:
    """Per-table sparsity of sharded groups from each rank's own mask rows (one all-reduce
    of two counts per table; no mask is gathered), rounded as the DDP mode's
    `1 - mask.float().mean()` is (float32 kept fraction), so both modes log the same figures."""
    counts = torch.tensor([[float(sp.get_mask(n).to_local().sum()), float(sp.get_mask(n).to_local().numel())]
                           for n in TABLES], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return {n: 1.0 - float(torch.tensor(kept, dtype=torch.float32) / total) if total else 0.0
            for n, (kept, total) in zip(TABLES, counts.tolist())}


def export_sharded(path: Path, sp, is_main: bool) -> None:
    """save_sparse_data for DTensor groups, which it refuses: the masked tables are gathered
    (full_tensor(), a collective) and rank 0 exports them through a one-rank sparsifier with
    the same block shape (the masks are already in the values: its own masks are all ones)."""
    masked = {n: full_tensor(sp.get_data(n, return_original=False)).detach().cpu() for n in TABLES}
    solo = dist.new_group([0]) if dist.is_available() and dist.is_initialized() else None
    if is_main:
        one = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4), process_group=solo)
        for n in TABLES:
            one.add_data(n, masked[n])
        one.step_count = sp.step_count  # the file says how many steps made the masks, as in the DDP mode
        distsparse.save_sparse_data(str(path), one)
    if solo is not None:
        dist.barrier()
        dist.destroy_process_group(solo)


# --------------------------------------------------------------------------- arguments
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and every option's default."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # every rank parses the same arguments: only one of them prints the usage error
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _number(kind, lo=None, hi=None, lo_open=False):
    """argparse type: a `kind` number in [lo, hi] ((lo, hi] with lo_open), finite."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{text} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None
                else f"{text} must be {'>' if lo_open else '>='} {lo:g}")
        return v
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("What it does")[0].strip("\n"), formatter_class=_HelpFormatter,
                epilog="How it works (data order, checkpoints, resume, summary): the docstring of examples/train_dlrm.py.")
    count = _number(int, 1)
    p.add_argument("--output-dir", default="runs/dlrm", help="checkpoints (ckpt/), summary.json and the exported tables")
    p.add_argument("--max-steps", type=count, default=600, help="training steps in all (a resumed run counts on)")
    p.add_argument("--batch-size", type=count, default=512, help="per process; the global batch is this x processes")
    p.add_argument("--lr", type=_number(float, 0.0, lo_open=True), default=4e-3, help="Adam learning rate")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="data, split, initial weights and data order")
    p.add_argument("--rows", type=_number(int, 20), default=400_000, help="synthetic rows (train+validation)")
    p.add_argument("--num-users", type=count, default=6000, help="synthetic users")
    p.add_argument("--num-items", type=count, default=2000, help="synthetic items")
    p.add_argument("--num-categories", type=count, default=120, help="item categories")
    p.add_argument("--dim", type=count, default=16, help="embedding dimension")
    p.add_argument("--csv", default=None, help="read user,item,label rows (labels 0/1) instead of synthetic data")
    p.add_argument("--dense", action="store_true", help="train only a dense model: no sparsifier, no baseline")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not train the same-length dense baseline next to the sparse model (faster)")
    p.add_argument("--final-sparsity", type=_number(float, 0.0, 1.0), default=0.8,
                   help="sparsity level at the end of the ramp, in [0, 1]")
    p.add_argument("--start-step", type=_number(int, 0), default=100, help="S0: dense warm-up steps before the ramp")
    p.add_argument("--ramp-steps", type=count, default=300, help="R: cubic ramp length in steps")
    p.add_argument("--save-every", type=_number(int, 0), default=200, help="checkpoint interval in steps; 0: only at the end")
    p.add_argument("--keep", type=count, default=2, help="complete checkpoints to keep")
    p.add_argument("--resume", default="auto",
                   help="'auto': the newest checkpoint that loads; 'none': start over; or a checkpoint folder "
                        "(loaded exactly, no fallback)")
    p.add_argument("--crash-at-step", type=count, default=None, help="os._exit(1) on every rank after this step (tests)")
    p.add_argument("--log-every", type=_number(int, 0), default=50, help="steps between log lines; 0: only at the end")
    p.add_argument("--log-with", default=None, help="accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--expect-world-size", type=count, default=None, help="exit with an error on another world size")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    p.add_argument("--fsdp2", action="store_true",
                   help="shard the tables (and MLPs, and the baseline) with FSDP2 fully_shard instead of DDP "
                        "(see 'FSDP2 mode' in the docstring)")
    p.add_argument("--prune", choices=("blocks", "rows"), default="blocks",
                   help="'blocks': (1, 4) blocks; 'rows': whole rows ((1, dim) blocks, same schedule), then write "
                        "the pruned tables (kept rows + int32 remap) and serve the validation set from them")
    args = p.parse_args(argv)
    if args.csv is not None and not os.path.isfile(args.csv):
        p.error(f"argument --csv: {args.csv!r} is not a file")
    if args.resume not in ("auto", "none") and not os.path.isdir(args.resume):
        p.error(f"argument --resume: {args.resume!r} is neither 'auto', 'none' nor a checkpoint folder")
    if args.crash_at_step is not None and args.crash_at_step > args.max_steps:
        p.error(f"argument --crash-at-step: {args.crash_at_step} is after --max-steps {args.max_steps}: it would never crash")
    return args


def launch_mistake(argv):
    """A message when `accelerate launch` was asked for several CPU processes but started
    one (`--cpu --num_processes N`, `use_cpu: true` / `distributed_type: MULTI_CPU` in a
    config without mpirun), else None.

    accelerate 1.15's single-process launcher (`simple_launcher`) sets ACCELERATE_USE_CPU,
    sets MASTER_ADDR/MASTER_PORT only when more than one process (or machine) was asked
    for, and no WORLD_SIZE; its multi-process launcher (torchrun) always sets WORLD_SIZE.
    """
    env = os.environ
    if "WORLD_SIZE" in env or "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env:
        return None
    script = "examples/train_dlrm.py " + shlex.join(argv)
    return ("accelerate launch started ONE process although several were asked for: with --cpu (or use_cpu: "
            "true / distributed_type: MULTI_CPU in the config) accelerate uses its single-process launcher "
            "(that path expects mpirun). For N processes on CPU run\n"
            f"    accelerate launch --config_file launch/cpu_2proc.yaml {script}\n"
            f"or  accelerate launch --multi_gpu --num_processes N {script}\n"
            "(this script passes Accelerator(cpu=True) when there is no CUDA, which makes them gloo CPU ranks; "
            "see launch/README.md). To run one process on purpose, leave out --num_processes or pass "
            "--expect-world-size 1.")


def ramp_note(args) -> str | None:
    """A warning when the schedule's final level comes after the last step. Step k's masks use
    the level of scheduler epoch k - 1, so the final level first shapes the masks at step
    start_step + ramp_steps + 1."""
    first_final = args.start_step + args.ramp_steps + 1
    if args.dense or first_final <= args.max_steps:
        return None
    return (f"warning: the masks reach --final-sparsity {args.final_sparsity} at step {first_final} (--start-step "
            f"{args.start_step} + --ramp-steps {args.ramp_steps} + 1), after --max-steps {args.max_steps}: the run "
            "ends below it")


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


# --------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.expect_world_size != 1:
        mistake = launch_mistake(argv)
        if mistake:
            print(f"error: {mistake}", file=sys.stderr)
            raise SystemExit(2)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              log_with=args.log_with, project_dir=args.output_dir)
    if args.fsdp2 and accelerator.num_processes == 1 and not dist.is_initialized():
        # no launcher: fully_shard needs a process group (and a device mesh over it), so open
        # a 1-rank one here (an in-process store: nothing listens on a port)
        dist.init_process_group("cuda:nccl,cpu:gloo" if accelerator.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    try:
        run(args, accelerator)
        # Leave together; drop accelerate's references to the DDP models (they hold the process
        # group) before end_training destroys the group. A DDP module or a rank that outlives
        # the group can be aborted by gloo at interpreter exit ("terminate called without an
        # active exception", SIGABRT: seen in ~15 % of 2-rank runs of the README script).
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        accelerator.end_training()
    except JobError as exc:
        # every rank reaches the same refusal (rank 0 decided and broadcast): one message
        if accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if args.fsdp2 and accelerator.num_processes == 1 and dist.is_initialized():
            dist.destroy_process_group()  # the 1-rank group opened above (end_training may have)


def run(args, accelerator):
    say = (lambda s: tqdm.write(s)) if accelerator.is_main_process else (lambda s: None)

    # ---- world size: accelerate and torch.distributed must agree (REFERENCE 2.3)
    env_ws = int(os.environ.get("WORLD_SIZE", "1"))
    dist_ws = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    if not (accelerator.num_processes == env_ws == dist_ws):
        raise JobError(f"world size mismatch: accelerate={accelerator.num_processes} WORLD_SIZE={env_ws} "
                       f"torch.distributed={dist_ws}; on CPU launch with --multi_gpu --num_processes N "
                       f"and Accelerator(cpu=True) (see launch/README.md)")
    say(f"world_size={accelerator.num_processes} backend={backend} "
        f"distributed_type={accelerator.distributed_type.value} device={accelerator.device}")
    if args.expect_world_size is not None and accelerator.num_processes != args.expect_world_size:
        raise JobError(f"expected world size {args.expect_world_size}, got {accelerator.num_processes}")
    fsdp_config = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    route = fsdp2_route(accelerator) if args.fsdp2 else None
    if not args.fsdp2 and (fsdp_config or fsdp2_route(accelerator) == "plugin"):
        raise JobError("the launch config turns on accelerate's FSDP (distributed_type: FSDP) but --fsdp2 is not "
                       "given: pass --fsdp2 to shard the tables, or launch with launch/multi_gpu.yaml (GPUs) or "
                       "launch/cpu_2proc.yaml (CPU) for the DDP mode")
    if route == "plugin" and not accelerator.is_fsdp2:
        raise JobError("--fsdp2 under accelerate's FSDP1 plugin (fsdp_version: 1): set fsdp_version: 2 in the launch "
                       "config (launch/fsdp2_gpu.yaml)")
    if args.fsdp2:
        say(f"fsdp2: tables sharded by rows over {accelerator.num_processes} rank(s) on {accelerator.device.type}, "
            + ("fully_shard called by accelerate's FSDP2 plugin (prepare)" if route == "plugin" else
               "fully_shard called by this script" + (" (accelerate's FSDP plugin is off: accelerate 1.15 has "
                                                     "no FSDP on CPU)" if fsdp_config else "")))

    out = Path(args.output_dir); ckpt_root = out / "ckpt"
    say(f"run folder {out.resolve()} (checkpoints in {ckpt_root.resolve()})")
    done = [finished_message(args, out, ckpt_root) if accelerator.is_main_process else None]
    broadcast_object_list(done)
    if done[0]:
        say(done[0])
        return
    set_seed(args.seed)
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in (out / "summary.json", out / EXPORT_NAME):  # describe a finished run only
            if stale.is_file():
                stale.unlink()
    accelerator.wait_for_everyone()

    # ---- data (identical on every rank)
    if args.csv:
        try:
            data = csv_clicks(args.csv, args.num_categories)
        except (OSError, ValueError) as exc:
            raise JobError(str(exc)) from None
    else:
        data = synthetic_clicks(args.rows, args.num_users, args.num_items, args.num_categories, args.seed)
    n = data["label"].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))
    n_val = max(1, n // 10)
    val = {k: v[perm[:n_val]] for k, v in data.items()}
    tr = {k: v[perm[n_val:]] for k, v in data.items()}
    keys = ("user", "item", "cats", "hour", "device", "region", "dense", "label")
    train_ds = TensorDataset(*(tr[k] for k in keys))
    sampler = EpochSampler(len(train_ds), args.seed)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    n_users = int(data["user"].max()) + 1; n_items = int(data["item"].max()) + 1

    model = DLRM(n_users, n_items, args.num_categories, args.dim)
    with_baseline = not args.dense and not args.no_baseline
    # the baseline: same initial weights (copied before any sharding), own optimizer with the
    # same hyper-parameters, no sparsifier; prepared after the sparse model, so checkpoints
    # hold it as model_1 / optimizer_1
    base_model = copy.deepcopy(model) if with_baseline else None
    if route is not None:
        # FSDP2 warns that the root returns a view (the logits' squeeze): an in-place op on it
        # would skip the backward all-gather. This job never modifies the logits in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    if route == "direct":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for net in (model, base_model):
            if net is not None:
                shard_model(net, mesh)
    # built on the sharded parameters when sharded above (FSDP2 replaces them); the plugin's
    # prepare() moves them onto its sharded parameters itself
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    base_opt = torch.optim.Adam(base_model.parameters(), lr=args.lr) if with_baseline else None
    if route is None:  # DDP
        if with_baseline:
            model, optimizer, base_model, base_opt, train_dl = accelerator.prepare(
                model, optimizer, base_model, base_opt, train_dl)
        else:
            model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    else:
        if route == "plugin":  # accelerate's FSDP2 takes one model (with its optimizer) per prepare()
            model, optimizer = accelerator.prepare(model, optimizer)
            if with_baseline:
                base_model, base_opt = accelerator.prepare(base_model, base_opt)
        train_dl = accelerator.prepare(train_dl)  # this rank's share of every global batch, as in DDP
        check_sharded(accelerator.unwrap_model(model), "model")
        if with_baseline:
            check_sharded(accelerator.unwrap_model(base_model), "dense baseline")
    pairs = [(model, optimizer)] + ([(base_model, base_opt)] if with_baseline else [])
    steps_per_epoch = len(train_dl)
    global_batch = args.batch_size * accelerator.num_processes
    if steps_per_epoch == 0:
        raise JobError(f"{len(train_ds)} training rows are not enough for one global batch of {global_batch} "
                       f"(--batch-size {args.batch_size} x {accelerator.num_processes} processes)")
    tables = accelerator.unwrap_model(model).tables

    # ---- sparsity
    sp = sch = None
    if not args.dense:
        block = (1, args.dim) if args.prune == "rows" else (1, 4)  # --prune rows: whole rows
        sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=block)
        for name in TABLES:
            sp.add_data(name, tables[name])
        sch = distsparse.CubicScheduler(sp, final_value=args.final_sparsity, initial_value=0.0,
                                        start_step=args.start_step, ramp_steps=args.ramp_steps)
        if ramp_note(args):
            say(ramp_note(args))
        if args.fsdp2:  # the FSDP2 mode saves and loads distsparse's file itself (fsdp2_save_files)
            say("masks computed where the rows live (rows of each rank): " + " ".join(
                f"{n}->{'/'.join(str(b - a) for _, (a, b) in sorted(sp.assignment(n).items()))}" for n in TABLES))
        else:
            distsparse.register_for_checkpointing(accelerator, sp, sch)
            say("mask owners (rank computing each table's mask): "
                + " ".join(f"{n}->{sp.owner_of(n)}" for n in TABLES))

    if args.log_with:
        accelerator.init_trackers("distsparse_dlrm", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})
    from report import RunHistory  # examples/report.py: every accelerator.log row also goes to OUTPUT_DIR/history.jsonl
    accelerator.trackers.append(RunHistory(out))

    # ---- resume
    mode = "fsdp2" if args.fsdp2 else "ddp"
    load = write = None
    if args.fsdp2:
        def load(path):
            fsdp2_load_files(accelerator, path, pairs, sp, sch)

        def write(path):
            fsdp2_save_files(accelerator, path, pairs, sp, sch)
    else:
        def load(path):  # the DDP mode's files through accelerate; an FSDP2 folder's DCP checkpoint whole
            if (path / DCP_DIR).is_dir():
                load_dcp_files(accelerator, path, pairs, sp, sch)
            else:
                accelerator.load_state(str(path))
    resumed_path, st, distrusted = resume(accelerator, args, ckpt_root, sp is not None, with_baseline, say, load)
    distrusted = set(distrusted)
    step, dense_metrics, resumed_from, epoch, epoch_pos = 0, None, None, 0, 0
    if resumed_path is not None:
        step, dense_metrics, resumed_from = int(st["step"]), st.get("dense_metrics"), resumed_path.name
        epoch, epoch_pos, note = position_after_resume(st, len(train_ds), args.batch_size,
                                                       accelerator.num_processes, steps_per_epoch)
        say(f"resumed from {resumed_from} at step {step} (epoch {epoch}, sample {epoch_pos} of {len(train_ds)})")
        if note:
            say(note)
        if st.get("mode", "ddp") != mode:
            say(f"resume: {resumed_from} was written in the {st.get('mode', 'ddp')} mode and continues in the {mode} "
                f"mode (each mode reads the other's checkpoint: the DDP mode's files, the FSDP2 mode's DCP checkpoint; "
                "the masks reshard)")
    else:
        say("starting from scratch")

    say(f"train rows={len(train_ds)} val rows={n_val} global batch={global_batch} "
        f"steps/epoch={steps_per_epoch} max_steps={args.max_steps} "
        f"mode={'dense' if args.dense else f'sparse (cubic 0 -> {args.final_sparsity}, steps {args.start_step}..{args.start_step + args.ramp_steps})'}"
        + (" + dense baseline (same init, same batches, no sparsifier)" if with_baseline else ""))
    say(epochs_note(args.max_steps, step, steps_per_epoch, len(train_ds)))
    if sp is not None and args.start_step + args.ramp_steps > args.max_steps:
        say(f"warning: the sparsity ramp ends at step {args.start_step + args.ramp_steps}, after --max-steps "
            f"{args.max_steps}: the run stops below --final-sparsity {args.final_sparsity}")

    # the step-S0 reference is only computed without a baseline (the baseline replaces it)
    want_reference = sp is not None and not with_baseline
    if want_reference and step == 0 and args.start_step == 0:
        dense_metrics = evaluate(accelerator.unwrap_model(model), val, accelerator.device)

    def sparsities():
        if sp is not None and args.fsdp2:
            return sharded_sparsities(sp, accelerator.device)
        return {n: 1.0 - float(sp.get_mask(n).float().mean()) for n in TABLES} if sp else {}

    pbar = tqdm(total=args.max_steps, initial=step, disable=args.no_progress or not accelerator.is_local_main_process,
                mininterval=1.0, dynamic_ncols=True)
    run_t0 = time.perf_counter(); run_steps = 0
    win_t0, win_steps, win_loss = time.perf_counter(), 0, torch.zeros((), device=accelerator.device)
    win_base = torch.zeros((), device=accelerator.device)
    model.train()
    if base_model is not None:
        base_model.train()
    sampler.start_at(epoch, epoch_pos)
    while step < args.max_steps:
        # The data order is chosen here, on our own sampler: the prepared loader forwards
        # set_epoch to it too (and keeps its own epoch counter in step), and the sampler
        # starts a resumed epoch at the checkpoint's sample.
        train_dl.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for user, item, cats, hour, device, region, dense, label in train_dl:
            if sampler.epoch != epoch:
                raise RuntimeError(f"the data loader moved the sampler to epoch {sampler.epoch} during epoch {epoch}")
            logits = model(user, item, cats, hour, device, region, dense)
            loss = F.binary_cross_entropy_with_logits(logits, label)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if sp is not None:
                sp.step()          # masks from the current weights at the current level
                mask_level = _level(sp)
                sch.step()         # level for the next step
                sp.squash_mask()   # write masks into the live tables
            if base_model is not None:  # same batch, dense, no sparsifier
                base_loss = F.binary_cross_entropy_with_logits(
                    base_model(user, item, cats, hour, device, region, dense), label)
                base_opt.zero_grad(set_to_none=True)
                accelerator.backward(base_loss)
                base_opt.step()
                win_base += base_loss.detach()
            step += 1; run_steps += 1; win_steps += 1
            epoch_pos += global_batch
            win_loss += loss.detach()
            pbar.update(1)

            if (args.log_every > 0 and step % args.log_every == 0) or step == args.max_steps:
                mean_loss = accelerator.reduce(win_loss / win_steps, "mean").item()
                base_txt = ""
                if base_model is not None:
                    mean_base = accelerator.reduce(win_base / win_steps, "mean").item()
                    base_txt = f" (baseline {mean_base:.4f})"
                dt = time.perf_counter() - win_t0
                sps = win_steps * global_batch / dt
                spars = sparsities()
                # the level this step's masks were computed with, and the one the next step uses
                level, next_level = (mask_level, _level(sp)) if sp is not None else (0.0, 0.0)
                pbar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:.0f}", level=f"{level:.3f}")
                say(f"step {step:5d} loss {mean_loss:.4f}{base_txt} samples/s {sps:8.0f} level {level:.3f} "
                    f"(next {next_level:.3f}) sparsity " + " ".join(f"{k}={v:.3f}" for k, v in spars.items()))
                accelerator.log({"train/loss": mean_loss, "train/samples_per_s": sps, "sparsity/level": level,
                                 "sparsity/next_level": next_level, **{f"sparsity/{k}": v for k, v in spars.items()},
                                 **({"train/baseline_loss": mean_base} if base_model is not None else {})},
                                step=step)
                win_t0, win_steps = time.perf_counter(), 0
                win_loss = torch.zeros((), device=accelerator.device)
                win_base = torch.zeros((), device=accelerator.device)

            if want_reference and step == args.start_step and dense_metrics is None:
                dense_metrics = evaluate(accelerator.unwrap_model(model), val, accelerator.device)
                say(f"step {step:5d} dense reference (before the ramp, {step} steps): val loss {dense_metrics['loss']:.4f} "
                    f"AUC {dense_metrics['auc']:.4f}")
                accelerator.log({"val/dense_loss": dense_metrics["loss"], "val/dense_auc": dense_metrics["auc"]}, step=step)

            if (args.save_every > 0 and step % args.save_every == 0) or step == args.max_steps:
                p = save_checkpoint(accelerator, ckpt_root, step,
                                    {"step": step, "epoch": epoch, "epoch_position": epoch_pos,
                                     "world_size": accelerator.num_processes, "batch_size": args.batch_size,
                                     "dense_metrics": dense_metrics, "sparse": sp is not None,
                                     "baseline": with_baseline, "mode": mode},
                                    args.keep, distrusted, write)
                say(f"step {step:5d} saved checkpoint {p.resolve()}")

            if args.crash_at_step is not None and step == args.crash_at_step:
                say(f"step {step:5d} simulated crash (--crash-at-step)")
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(1)
            if step >= args.max_steps:
                break
        else:  # the epoch ran out: the next one starts at its first sample
            epoch, epoch_pos = epoch + 1, 0
    pbar.close()
    train_time = time.perf_counter() - run_t0
    summarize(args, accelerator, model, base_model, sp, sch, tables, val, dense_metrics, step, resumed_from,
              run_steps, train_time, global_batch, out, say)


# --------------------------------------------------------------------------- summary
def _level(sp) -> float:
    """The tables' sparsity_level now (one schedule drives them all)."""
    return float(next(iter(sp.data_groups.values()))["sparsity_level"])


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def model_digest(net: nn.Module, sharded: bool = False) -> str:
    """sha256 over the model's state dict; sharded (FSDP2): the full state dict, a collective
    whose result only rank 0 holds (the others' digest is of nothing)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = net.state_dict()
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode()); h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


PRUNED_NAME = "pruned_tables.safetensors"


def serve_pruned(net, sp, val: dict, trained: dict, out: Path, is_main: bool):
    """--prune rows: write the pruned tables (kept rows + int32 remap; sharded FSDP2 tables
    without gathering them), then on the main process rebuild the model with
    PrunedEmbedding / PrunedEmbeddingBag tables loaded from that file and evaluate it on
    the validation set. Returns (summary entry, summary lines); the served AUC must equal
    the trained masked model's (same vectors, same order: exact in float32)."""
    path = out / PRUNED_NAME
    out.mkdir(parents=True, exist_ok=True)
    distsparse.save_pruned_tables(str(path), sp, names=list(TABLES))
    rest = {k: full_tensor(v).detach().cpu() for k, v in net.state_dict().items()
            if not k.startswith("tables.")}  # a collective for FSDP2's DTensors: every rank
    if not is_main:
        return None, []
    pruned = distsparse.load_pruned_tables(path)
    served = DLRM(pruned["user"].rows, pruned["item"].rows, pruned["item_category"].rows - 1, pruned["user"].dim)
    served.load_state_dict(rest, strict=False)
    for name in TABLES:
        old = served.tables[name]
        if isinstance(old, nn.EmbeddingBag):
            served.tables[name] = distsparse.PrunedEmbeddingBag.from_pruned(pruned[name], mode=old.mode,
                                                                            padding_idx=old.padding_idx)
        else:
            served.tables[name] = distsparse.PrunedEmbedding.from_pruned(pruned[name])
    metrics = evaluate(served, val, torch.device("cpu"))
    dense_bytes = sum(t.rows * t.dim * 4 for t in pruned.values())
    served_bytes = sum(m.served_bytes() for m in served.tables.values())
    entry = {"path": str(path), "file_bytes": path.stat().st_size, "dense_bytes": dense_bytes,
             "served_bytes": served_bytes, "kept_rows": {n: t.kept for n, t in pruned.items()},
             "rows": {n: t.rows for n, t in pruned.items()}, "val": metrics,
             "auc_equal": metrics["auc"] == trained["auc"]}
    kept, rows = sum(entry["kept_rows"].values()), sum(entry["rows"].values())
    lines = [f"served from {PRUNED_NAME}: {kept} of {rows} rows kept; tables {served_bytes} B served vs "
             f"{dense_bytes} B dense ({served_bytes / dense_bytes:.3f}x), file {entry['file_bytes']} B",
             f"validation  served (pruned)  : loss {metrics['loss']:.4f}  AUC {metrics['auc']:.4f}   "
             f"({'equal to' if entry['auc_equal'] else 'DIFFERS from'} the trained masked model's AUC "
             f"{trained['auc']:.4f})"]
    return entry, lines


def summarize(args, accelerator, model, base_model, sp, sch, tables, val, dense_metrics, step, resumed_from,
              run_steps, train_time, global_batch, out: Path, say):
    """Evaluate, export the sparsified tables, print the summary and write summary.json."""
    net = accelerator.unwrap_model(model)
    final = evaluate(net, val, accelerator.device)
    accelerator.log({"val/loss": final["loss"], "val/auc": final["auc"]}, step=step)
    base_final = cost = None
    if base_model is not None:
        base_final = evaluate(accelerator.unwrap_model(base_model), val, accelerator.device)
        cost = {"loss": final["loss"] - base_final["loss"], "auc": final["auc"] - base_final["auc"]}
        accelerator.log({"val/baseline_loss": base_final["loss"], "val/baseline_auc": base_final["auc"]}, step=step)
    summary = {"final_step": step, "world_size": accelerator.num_processes, "resumed_from": resumed_from,
               "mode": "dense" if sp is None else "sparse", "parallelism": "fsdp2" if args.fsdp2 else "ddp",
               "val": final,
               "val_dense_baseline": base_final, "baseline_cost": cost,
               "dense_reference": dense_metrics,
               "train_seconds_this_run": train_time, "steps_this_run": run_steps,
               "samples_per_s": run_steps * global_batch / train_time if run_steps else None,
               "tables": {}, "mask_sha256": {}, "schedule": None, "schedule_last_epoch": None, "export": None}
    # FSDP2: the whole tables and masks, gathered once here for the figures and digests
    weights = {n: full_tensor(tables[n].weight.detach()) for n in TABLES}
    for name in TABLES:
        w = weights[name]
        m = full_tensor(sp.get_mask(name)) if sp is not None else torch.ones_like(w, dtype=torch.bool)
        summary["tables"][name] = {"shape": list(w.shape), **mask_stats(m, w),
                                   "weight_zeros": int((w == 0).sum()), "weight_sha256": tensor_digest(w)}
        if sp is not None:
            summary["mask_sha256"][name] = mask_digest(m)
    summary["model_sha256"] = model_digest(net, args.fsdp2)
    summary["baseline_model_sha256"] = None
    if base_model is not None:
        summary["baseline_model_sha256"] = model_digest(accelerator.unwrap_model(base_model), args.fsdp2)
    if sch is not None:
        summary["schedule"] = {k: float(v) for k, v in sch.get_last_param().items()}
        summary["schedule_last_epoch"] = sch.last_epoch
    if sp is not None:
        # the masked tables as a block-sparse file (collective; rank 0 writes it)
        export = out / EXPORT_NAME
        if args.fsdp2:
            export_sharded(export, sp, accelerator.is_main_process)
        else:
            distsparse.save_sparse_data(str(export), sp)
        dense_file = len(safetensors_bytes({n: weights[n].cpu().contiguous() for n in TABLES}))
        summary["export"] = {"path": str(export), "file_bytes": export.stat().st_size,
                             "dense_file_bytes": dense_file,
                             "dense_bytes": sum(t["dense_bytes"] for t in summary["tables"].values())}

    served_lines = []
    if sp is not None and args.prune == "rows":  # collective: every rank takes part in the save
        summary["served"], served_lines = serve_pruned(net, sp, val, final, out, accelerator.is_main_process)
    lines = ["", f"summary ({summary['mode']}{' + dense baseline' if base_model is not None else ''}, "
                 f"step {step}, world_size {accelerator.num_processes}{', FSDP2' if args.fsdp2 else ''})",
             *table_summary_lines(summary, out)]
    if base_final is not None:
        lines.append(f"validation  dense baseline @ step {step:<5}: loss {base_final['loss']:.4f}  AUC {base_final['auc']:.4f}"
                     f"   (same init, batches and steps, no sparsifier)")
    if dense_metrics is not None:
        lines.append(f"validation  dense warm-up  @ step {args.start_step:<5}: loss {dense_metrics['loss']:.4f}  AUC {dense_metrics['auc']:.4f}"
                     f"   (the sparse model before its ramp: fewer steps, rough reference only)")
    label = "sparse" if sp is not None else "dense"
    lines.append(f"validation  {label:<14} @ step {step:<5}: loss {final['loss']:.4f}  AUC {final['auc']:.4f}")
    if cost is not None:
        lines.append(f"cost of sparsity (sparse - baseline): loss {cost['loss']:+.4f}  AUC {cost['auc']:+.4f}")
    lines += served_lines
    if run_steps:
        lines.append(f"this run: {run_steps} steps in {train_time:.1f} s, {summary['samples_per_s']:.0f} samples/s"
                     + (" (each sample trains both models)" if base_model is not None else ""))
    say("\n".join(lines))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "summary.json.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, out / "summary.json")
        from report import write_report  # report.png: sparsity, loss vs the baseline, bytes per table
        say(f"report: {write_report(out)}")


if __name__ == "__main__":
    main()
