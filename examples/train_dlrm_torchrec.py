"""
    torchrun --nproc_per_node 2 examples/train_dlrm_torchrec.py          # 2 CPU processes (gloo), about a minute
    torchrun --nproc_per_node 8 examples/train_dlrm_torchrec.py          # 8 GPUs on one node (NCCL)
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank R --master_addr HOST --master_port 29500 \\
        examples/train_dlrm_torchrec.py                                  # 2 nodes x 8 GPUs, on node R
    python examples/train_dlrm_torchrec.py                               # 1 process, no launcher

Run from the repository root. TorchRec on CPU needs the CPU build of FBGEMM, installed
without letting pip pull the CUDA one:
    pip install fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics tqdm pyre-extensions
    pip install --no-deps torchrec==1.9.2
(on GPUs: torchrec with the fbgemm-gpu build matching your torch and CUDA.)

The main job (examples/train_dlrm.py) on TorchRec: the same DLRM-style click model, data,
sparsity ramp and summary, with the embedding tables sharded across ranks by TorchRec's
DistributedModelParallel and trained by a fused optimizer, sparsified by distsparse where
their rows live.

What it does
------------
* Data: the main job's deterministic synthetic click log (`synthetic_clicks`, 400k rows,
  90/10 train/validation split) and its `EpochSampler` (the order depends only on
  (seed, epoch)). Each step takes the next `--batch-size` x world samples of the epoch's
  permutation; rank r takes the r-th slice, as a KeyedJaggedTensor (one id per sample for
  `user`, `item`, `hour`, `device`, `region`, 1-3 ids for the `item_category` bag).
* Model: `torchrec.models.dlrm.DLRM` over an `EmbeddingBagCollection` with the main job's
  six tables (`item_category` mean-pooled), built on the meta device (no rank ever holds a
  whole table) and sharded by `DistributedModelParallel` with a plan from
  `construct_module_sharding_plan`: `--sharding auto` shards tables of at least
  `--row-wise-min-rows` rows row-wise over every rank and places the small ones whole
  (table-wise) on the least loaded rank; `row_wise`, `table_wise`, `column_wise` and
  `table_row_wise` apply one kind to every table. Tables start from the same seeded
  normal(0, 0.1) weights whatever the plan or world size (each rank writes its shards'
  part of the seeded table).
* Optimizers: the tables are trained by FBGEMM's fused Adagrad (`apply_optimizer_in_backward`,
  `--emb-optimizer`, `--emb-lr`): the update happens inside backward, there is no
  optimizer step to hook. The dense MLPs (DDP inside DistributedModelParallel) by Adam
  (`--lr`) through TorchRec's `KeyedOptimizerWrapper`.
* Sparsity: `distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))`
  with every sharded table added by `distsparse.integrations.torchrec.add_torchrec_tables`
  (group name = table name; each rank scores its own shards, the mask of every table is
  the single-process mask of the whole table, bit for bit) and `distsparse.CubicScheduler`
  0 -> `--final-sparsity` (0.8) over steps S0..S0+R. Every step: forward, backward (the
  fused update), dense optimizer step, `sp.step()`, `sch.step()`, `sp.squash_mask()`:
  the fused optimizer writes into pruned weights inside backward, so the masks are
  written back into the shards after every step. Pruned weights' optimizer state is kept
  (gradual magnitude pruning lets them regrow); `--zero-pruned-state` zeroes Adagrad's
  `momentum1` of pruned weights after each squash
  (`distsparse.integrations.torchrec.zero_pruned_optimizer_state`; no measurable change in
  AUC here).
* Dense baseline (default): a second DistributedModelParallel model with the same plan,
  initial weights and optimizers and no sparsifier, trained in the same loop on the same
  batches; `--no-baseline` skips it, `--dense` trains only a dense model.
* Checkpoints: every `--save-every` steps and at the end, into
  `OUTPUT_DIR/ckpt/step_NNNNNN/`: `model/` (torch.distributed.checkpoint (DCP) of both
  models' state_dicts — sharded tables as ShardedTensors, each rank writing its shards —
  the fused optimizers' state (Adagrad's `momentum1`, sharded like the tables) and the
  dense optimizers' state) and the sparsity (`distsparse.dcp_state`: each rank's shards of
  every mask, the configs and the schedule) -- ONE DCP checkpoint, each rank writing its own
  shards, no whole table or mask anywhere. After
  every rank finished writing, rank 0 writes `train_state.json` (step, epoch position,
  world size, plan, a sha256 of every DCP file: DCP carries no checksum) and a `COMPLETE`
  marker, then keeps the newest `--keep` complete folders (as the main job does).
* Resume (`--resume auto`, the default): the newest folder with `COMPLETE`, a readable
  `train_state.json` and matching file digests whose DCP checkpoint loads on every
  rank; each skipped folder is named with the reason. `--resume PATH` loads exactly PATH
  or stops; `--resume none` starts over. Same world size and batch size: the resumed run
  follows the uninterrupted one bit for bit (weights, optimizer state, masks, schedule).
  DCP reshards, so another `--sharding` or world size resumes too (the data position is
  kept in samples, as in the main job).
* Summary: validation loss and AUC of both models (every rank evaluates a slice; logits
  gathered), the cost of sparsity, and per table the sparsity and bytes. Rank 0 gathers
  the tables (`ShardedTensor.gather`) and the masks (one reduce per table), puts them in a
  one-process sparsifier over the tables, then exports the
  tables with `distsparse.save_sparse_data` to `OUTPUT_DIR/sparse_tables.safetensors`
  (kept (1,4) blocks + 1 bit per block) and writes `OUTPUT_DIR/summary.json` (the main
  job's fields, with sha256 digests of every mask, table and both models).
* `--prune rows`: whole rows are pruned (`(1, dim)` blocks, same schedule); at the end
  `distsparse.save_pruned_tables` writes `OUTPUT_DIR/pruned_tables.safetensors` from the
  sharded tables (rank 0 streams each rank's kept rows; column-wise shards are joined row by
  row) and rank 0 serves the validation set from a one-process DLRM whose embedding bags
  are `distsparse.PrunedEmbeddingBag`s over that file: served size vs dense, served AUC
  (equal to the trained model's).
* `--crash-at-step N` ends every rank with `os._exit(1)` right after step N (after that
  step's checkpoint, if any): used to test crash/resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dlrm import (  # noqa: E402  the main job's data, metrics and checkpoint conventions
    EXPORT_NAME, N_DENSE, EpochSampler, JobError, _HelpFormatter, _level, _number, _one_line, _Parser,
    all_ranks, auc_score, epochs_note, file_sha256, finished_message, inspect_checkpoint,
    list_checkpoints, mask_digest, mask_stats, position_after_resume, ramp_note, synthetic_clicks,
    table_summary_lines, tensor_digest)

import distsparse  # noqa: E402


TABLES = ("user", "item", "item_category", "hour", "device", "region")
SHARDINGS = ("auto", "row_wise", "table_wise", "column_wise", "table_row_wise")
EMB_OPTIMIZERS = {"adagrad": "Adagrad", "rowwise_adagrad": "RowWiseAdagrad", "sgd": "SGD", "adam": "Adam"}
CPU_EMB_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")  # FBGEMM's CPU kernels
EBC = "sparse_arch.embedding_bag_collection"
DCP_DIR = "model"


def say_on_rank0(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


# --------------------------------------------------------------------------- model
def table_rows(n_users: int, n_items: int, n_cats: int) -> dict[str, int]:
    return {"user": n_users, "item": n_items, "item_category": n_cats, "hour": 24, "device": 6, "region": 50}


def build_model(rows: dict[str, int], dim: int, device: torch.device, seed: int):
    """torchrec DLRM over the six tables; the tables on the meta device (sharding
    materializes only each rank's shards), the MLPs from `seed` (same on every rank)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import PoolingType

    configs = [EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=rows[n], feature_names=[n],
                                  pooling=PoolingType.MEAN if n == "item_category" else PoolingType.SUM)
               for n in TABLES]
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    return DLRM(embedding_bag_collection=ebc, dense_in_features=N_DENSE, dense_arch_layer_sizes=[32, dim],
                over_arch_layer_sizes=[64, 32, 1], dense_device=device)


def sharding_plan(ebc, rows: dict[str, int], kind: str, min_rows: int, world: int, local_world: int,
                  device: torch.device):
    """{table: ParameterSharding}: `auto` = row-wise for tables with >= min_rows rows,
    table-wise (least loaded rank first, biggest table first) for the others."""
    from torchrec.distributed.sharding_plan import (
        column_wise, construct_module_sharding_plan, row_wise, table_row_wise, table_wise)

    per_table, load = {}, [0] * world
    for name in sorted(TABLES, key=lambda n: (-rows[n], n)):
        k = kind if kind != "auto" else ("row_wise" if rows[name] >= min_rows and world > 1 else "table_wise")
        if k == "table_wise":
            r = min(range(world), key=lambda i: (load[i], i))
            load[r] += rows[name]
            per_table[name] = table_wise(rank=r)
        elif k == "row_wise":
            per_table[name] = row_wise()
        elif k == "column_wise":
            per_table[name] = column_wise(ranks=list(range(world)))
        else:
            per_table[name] = table_row_wise(host_index=0)
    return construct_module_sharding_plan(ebc, {n: per_table[n] for n in TABLES}, world_size=world,
                                          local_size=local_world, device_type=device.type)


def sharded_tables(dmp) -> dict:
    """{table: ShardedTensor} from the model's state_dict (views into FBGEMM's storage)."""
    sd = dmp.state_dict()
    return {n: sd[f"{EBC}.embedding_bags.{n}.weight"] for n in TABLES}


@torch.no_grad()
def init_tables(dmp, rows: dict[str, int], dim: int, seed: int) -> None:
    """Every table = normal(0, 0.1) from (seed, table): each rank copies its shards' part,
    so the weights do not depend on the plan or the world size."""
    for i, (name, st) in enumerate(sharded_tables(dmp).items()):
        full = torch.randn(rows[name], dim, generator=torch.Generator().manual_seed(seed * 1000 + i)) * 0.1
        for shard in st.local_shards():
            (r0, c0), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r0:r0 + h, c0:c0 + w])


class Trainee:
    """One DistributedModelParallel model with its fused (tables) and dense optimizers."""

    def __init__(self, args, rows, device, world, local_world):
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv, ShardingPlan
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.keyed import KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter
        import torchrec.optim as trec_optim

        model = build_model(rows, args.dim, device, args.seed)
        emb_opt = getattr(trec_optim, EMB_OPTIMIZERS[args.emb_optimizer])
        apply_optimizer_in_backward(emb_opt, model.sparse_arch.parameters(), {"lr": args.emb_lr})
        ebc = model.sparse_arch.embedding_bag_collection
        self.plan = sharding_plan(ebc, rows, args.sharding, args.row_wise_min_rows, world, local_world, device)
        self.dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                            device=device, plan=ShardingPlan({EBC: self.plan}))
        init_tables(self.dmp, rows, args.dim, args.seed)
        self.dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(self.dmp.named_parameters())),
                                               lambda params: torch.optim.Adam(params, lr=args.lr))

    def train_step(self, dense, kjt, label) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self.dmp(dense, kjt).squeeze(-1), label)
        self.dense_opt.zero_grad()
        loss.backward()          # the tables' fused optimizer updates here
        self.dense_opt.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"model": self.dmp.state_dict(), "fused_optim": self.dmp.fused_optimizer.state_dict(),
                "dense_optim": self.dense_opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.dmp.load_state_dict(sd["model"])
        self.dmp.fused_optimizer.load_state_dict(sd["fused_optim"])
        self.dense_opt.load_state_dict(sd["dense_optim"])

    def plan_text(self) -> str:
        return " ".join(f"{n}:{self.plan[n].sharding_type}@{sorted(set(self.plan[n].ranks or []))}" for n in TABLES)


# --------------------------------------------------------------------------- data
def batch_of(data: dict, idx: torch.Tensor, device: torch.device):
    """(dense features, KeyedJaggedTensor, labels) of rows `idx`."""
    from torchrec import KeyedJaggedTensor

    b = idx.numel()
    cats = data["cats"][idx]
    present = cats > 0                       # 0 is the main job's padding id
    ones = torch.ones(b, dtype=torch.long)
    lengths = torch.cat([ones, ones, present.sum(1), ones, ones, ones])
    values = torch.cat([data["user"][idx], data["item"][idx], cats[present] - 1,
                        data["hour"][idx], data["device"][idx], data["region"][idx]])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(TABLES), values=values, lengths=lengths)
    return data["dense"][idx].to(device), kjt.to(device), data["label"][idx].to(device)


@torch.no_grad()
def evaluate(dmp, val: dict, device, batch=8192) -> dict:
    """Loss and AUC on the whole validation set: every rank scores a slice (padded by
    wrapping so that all ranks run the same number of forwards), logits all-gathered."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = val["label"].numel()
    per = -(-n // world)
    idx = torch.arange(rank * per, (rank + 1) * per) % n
    dmp.eval()
    logits = torch.cat([dmp(*batch_of(val, idx[s:s + batch], device)[:2]).float().squeeze(-1)
                        for s in range(0, per, batch)])
    dmp.train()
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits)
    logits = torch.cat(gathered)[:n].cpu()
    loss = F.binary_cross_entropy_with_logits(logits, val["label"]).item()
    return {"loss": loss, "auc": auc_score(logits, val["label"])}


# --------------------------------------------------------------------------- checkpoints
def app_state(trainees: dict, sp=None, sch=None) -> dict:
    """The one DCP state dict of a checkpoint: both models (sharded tables as ShardedTensors),
    their optimizers, and the sparsity (`distsparse.dcp_state`: each rank's shards of every
    mask, configs and schedule)."""
    state = {name: t.state_dict() for name, t in trainees.items()}
    if sp is not None:
        state["sparsity"] = distsparse.dcp_state(sp, sch)
    return state


def save_checkpoint(root: Path, step: int, state: dict, keep: int, distrusted: set, trainees: dict, sp, sch) -> Path:
    """Write `root/step_NNNNNN` (DCP + distsparse) on every rank, then rank 0 records the
    files' digests, marks it COMPLETE and applies the main job's retention rule."""
    path = root / f"step_{step:06d}"
    dist.barrier()
    if dist.get_rank() == 0:
        if path.exists():              # leftover of a crashed save or a damaged folder: replaced
            shutil.rmtree(path)
        path.mkdir(parents=True)
    distrusted.discard(path.name)
    dist.barrier()
    dcp.save(app_state(trainees, sp, sch), checkpoint_id=str(path / DCP_DIR))
    dist.barrier()                     # every rank finished writing
    if dist.get_rank() == 0:
        files = {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
        with open(path / "train_state.json", "w") as f:
            json.dump(dict(state, files=files), f, indent=1)
            f.flush(); os.fsync(f.fileno())
        with open(path / "COMPLETE", "w") as f:
            f.write(f"{step}\n"); f.flush(); os.fsync(f.fileno())
        trusted = [(s, p) for s, p in list_checkpoints(root) if s <= step and p.name not in distrusted]
        for _, p in trusted[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for s, p in list_checkpoints(root, complete_only=False):
            if s < step and not (p / "COMPLETE").is_file():
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path: Path, trainees: dict, sp, sch) -> None:
    """DCP loads in place into the live state_dicts (each rank reads its shards, resharded
    if the plan or world size changed), the masks and schedule included (validated on every
    rank before any changes)."""
    for t in trainees.values():
        t.dense_opt.init_state()       # Adam's state is lazy: DCP needs the tensors to load into
    state = app_state(trainees, sp, sch)
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    for name, t in trainees.items():
        t.load_state_dict(state[name])


def gathered_masks(sp, dmp, device) -> dict[str, torch.Tensor] | None:
    """Whole masks on rank 0's CPU (None elsewhere), for the summary: each rank fills its
    shards into a zero table, one reduce per table (a collective)."""
    out = {}
    for name, st in sharded_tables(dmp).items():
        whole = torch.zeros(tuple(st.size()), dtype=torch.uint8, device=device)
        for (r, c), m in sp.get_mask(name).local_shards():
            whole[r : r + m.shape[0], c : c + m.shape[1]] = m.to(device=device, dtype=torch.uint8)
        dist.reduce(whole, dst=0)
        out[name] = whole.cpu().bool()
    return out if dist.get_rank() == 0 else None


def broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resume(args, ckpt_root: Path, trainees: dict, sp, sch, say):
    """The main job's resume rule on DCP checkpoints: (folder, train_state, skipped names)
    or (None, None, skipped) to start from scratch. Rank 0 decides, every rank loads, a
    load counts only if it succeeded on every rank."""
    if args.resume == "none":
        return None, None, []
    explicit = args.resume != "auto"
    names = broadcast(([args.resume] if explicit else
                       [str(p) for _, p in reversed(list_checkpoints(ckpt_root, complete_only=False))])
                      if dist.get_rank() == 0 else None)
    skipped, complete_seen = [], False
    for name in names:
        path = Path(name)
        kind, detail = broadcast(inspect_checkpoint(path, sp is not None, "baseline" in trainees)
                                 if dist.get_rank() == 0 else None)
        if kind == "fatal":
            raise JobError(detail)
        if kind == "ok":
            complete_seen = True
            try:
                load_checkpoint(path, trainees, sp, sch)
                error = None
            except Exception as exc:  # damaged or missing file, changed shapes, ...
                error = _one_line(exc, path)
            errors = [(r, e) for r, e in enumerate(all_ranks(error)) if e is not None]
            if not errors:
                if skipped:
                    say(f"resume: skipped {'; '.join(skipped)}; resuming from {path.name}")
                return path, detail, [s.split(" ", 1)[0] for s in skipped]
            rank, detail = errors[0]
            if dist.get_world_size() > 1 and len(errors) < dist.get_world_size():
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


# --------------------------------------------------------------------------- summary
def gathered_tables(dmp, device) -> dict[str, torch.Tensor] | None:
    """Whole tables on rank 0's CPU (None elsewhere); a collective (gathered on `device`,
    where NCCL needs the tensors)."""
    out = {}
    for name, st in sharded_tables(dmp).items():
        full = torch.empty(tuple(st.size()), dtype=st.dtype, device=device) if dist.get_rank() == 0 else None
        st.gather(dst=0, out=full)
        out[name] = full.cpu() if full is not None else None
    return out if dist.get_rank() == 0 else None


def model_digest(dense_sd: dict, tables: dict) -> str:
    """sha256 over every dense tensor and every whole table (rank 0)."""
    h = hashlib.sha256()
    items = {**{k: v for k, v in dense_sd.items() if isinstance(v, torch.Tensor)},
             **{f"{EBC}.embedding_bags.{n}.weight": t for n, t in tables.items()}}
    for k, v in sorted(items.items()):
        h.update(k.encode()); h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dense_state(dmp) -> dict:
    return {k: v for k, v in dmp.state_dict().items() if ".embedding_bags." not in k}


PRUNED_NAME = "pruned_tables.safetensors"


def serve_pruned(args, sp, dense_sd: dict, val: dict, trained: dict, out: Path):
    """--prune rows: write the pruned tables (kept rows + int32 remap) from the sharded tables
    (a collective: rank 0 streams each rank's kept rows into the file, no table gathered),
    then on rank 0 serve the validation set from a one-process DLRM whose embedding bags
    are distsparse.PrunedEmbeddingBag modules over that file. Returns (summary entry,
    lines) on rank 0, (None, []) elsewhere."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    path = out / PRUNED_NAME
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    distsparse.save_pruned_tables(str(path), sp, names=list(TABLES))
    if dist.get_rank() != 0:
        return None, []
    pruned = distsparse.load_pruned_tables(path)

    class ServedBags(torch.nn.Module):
        """The EmbeddingBagCollection's forward (KJT -> KeyedTensor) over pruned tables."""

        def __init__(self):
            super().__init__()
            self.bags = torch.nn.ModuleDict({n: distsparse.PrunedEmbeddingBag.from_pruned(
                pruned[n], mode="mean" if n == "item_category" else "sum", include_last_offset=True)
                for n in TABLES})

        def forward(self, kjt):
            pooled = [self.bags[n](kjt[n].values(), kjt[n].offsets()) for n in TABLES]
            return KeyedTensor(keys=list(TABLES), length_per_key=[p.shape[1] for p in pooled],
                               values=torch.cat(pooled, dim=1))

    rows = {n: pruned[n].rows for n in TABLES}
    served = build_model(rows, args.dim, torch.device("cpu"), args.seed)
    served.sparse_arch.embedding_bag_collection = ServedBags()
    missing, unexpected = served.load_state_dict(dense_sd, strict=False)
    if unexpected or any(not k.startswith("sparse_arch.embedding_bag_collection") for k in missing):
        raise RuntimeError(f"serving: the dense state does not fit the model (missing {missing}, "
                           f"unexpected {unexpected})")
    served.eval()
    with torch.no_grad():
        logits = torch.cat([served(*batch_of(val, idx, torch.device("cpu"))[:2]).float().squeeze(-1)
                            for idx in torch.arange(val["label"].numel()).split(8192)])
    metrics = {"loss": F.binary_cross_entropy_with_logits(logits, val["label"]).item(),
               "auc": auc_score(logits, val["label"])}
    dense_bytes = sum(t.rows * t.dim * 4 for t in pruned.values())
    served_bytes = sum(b.served_bytes() for b in served.sparse_arch.embedding_bag_collection.bags.values())
    entry = {"path": str(path), "file_bytes": path.stat().st_size, "dense_bytes": dense_bytes,
             "served_bytes": served_bytes, "kept_rows": {n: t.kept for n, t in pruned.items()}, "rows": rows,
             "val": metrics, "auc_equal": metrics["auc"] == trained["auc"]}
    kept = sum(entry["kept_rows"].values())
    lines = [f"served from {PRUNED_NAME} (written from the sharded tables): {kept} of {sum(rows.values())} rows "
             f"kept; tables {served_bytes} B served vs {dense_bytes} B dense ({served_bytes / dense_bytes:.3f}x), "
             f"file {entry['file_bytes']} B",
             f"validation  served (pruned)  : loss {metrics['loss']:.4f}  AUC {metrics['auc']:.4f}   "
             f"({'equal to' if entry['auc_equal'] else 'DIFFERS from'} the trained masked model's AUC "
             f"{trained['auc']:.4f})"]
    return entry, lines


def summarize(args, trainees, sp, sch, val, device, final_ckpt: Path, step, resumed_from, run_steps,
              train_time, global_batch, out: Path, say) -> None:
    model, base = trainees["model"], trainees.get("baseline")
    final = evaluate(model.dmp, val, device)
    base_final = evaluate(base.dmp, val, device) if base is not None else None
    tables = gathered_tables(model.dmp, device)
    base_tables = gathered_tables(base.dmp, device) if base is not None else None
    global_sparsity = sp.sparsity() if sp is not None else None
    dense_sd = {k: v.cpu() for k, v in dense_state(model.dmp).items()}
    base_dense_sd = {k: v.cpu() for k, v in dense_state(base.dmp).items()} if base is not None else None
    served, served_lines = None, []
    if sp is not None and args.prune == "rows":  # collective: the sharded tables are written where they live
        served, served_lines = serve_pruned(args, sp, dense_sd, val, final, out)
    whole_masks = gathered_masks(sp, model.dmp, device) if sp is not None else None
    # a one-process sparsifier on rank 0 over the gathered tables (every rank creates the group)
    solo_group = dist.new_group([0], backend="gloo") if sp is not None else None
    if dist.get_rank() != 0:
        return
    cost = None if base_final is None else {"loss": final["loss"] - base_final["loss"],
                                            "auc": final["auc"] - base_final["auc"]}
    summary = {"final_step": step, "world_size": dist.get_world_size(), "resumed_from": resumed_from,
               "mode": "dense" if sp is None else "sparse", "sharding": model.plan_text(),
               "val": final, "val_dense_baseline": base_final, "baseline_cost": cost,
               "train_seconds_this_run": train_time, "steps_this_run": run_steps,
               "samples_per_s": run_steps * global_batch / train_time if run_steps else None,
               "tables": {}, "mask_sha256": {}, "sparsity_from_sharded_run": global_sparsity,
               "schedule": None, "schedule_last_epoch": None, "export": None}
    masks = {n: torch.ones_like(tables[n], dtype=torch.bool) for n in TABLES}
    solo = None
    if sp is not None:
        solo = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4), process_group=solo_group)
        for n in TABLES:
            solo.add_data(n, tables[n], replicated=True)
        state = solo.state_dict()      # the sharded run's masks, configs and step count
        for n in TABLES:
            state["groups"][n]["config"] = json.loads(json.dumps(sp.data_groups[n]))
            state["masks"][n] = whole_masks[n]
        state["step_count"] = sp.step_count
        solo.load_state_dict(state, config="checkpoint")  # adopt the sharded run's configs (block shape)
        masks = {n: solo.get_mask(n) for n in TABLES}
    for n in TABLES:
        w, m = tables[n], masks[n]
        summary["tables"][n] = {"shape": list(w.shape), **mask_stats(m, w), "weight_zeros": int((w == 0).sum()),
                                "weight_sha256": tensor_digest(w)}
        if sp is not None:
            summary["mask_sha256"][n] = mask_digest(m)
    summary["model_sha256"] = model_digest(dense_sd, tables)
    summary["baseline_model_sha256"] = model_digest(base_dense_sd, base_tables) if base is not None else None
    if sch is not None:
        summary["schedule"] = {k: float(v) for k, v in sch.get_last_param().items()}
        summary["schedule_last_epoch"] = sch.last_epoch
    if solo is not None:
        from safetensors.torch import save as safetensors_bytes

        export = out / EXPORT_NAME
        distsparse.save_sparse_data(str(export), solo)
        dense_file = len(safetensors_bytes({n: tables[n].contiguous() for n in TABLES}))
        summary["export"] = {"path": str(export), "file_bytes": export.stat().st_size,
                             "dense_file_bytes": dense_file,
                             "dense_bytes": sum(t["dense_bytes"] for t in summary["tables"].values())}

    summary["served"] = served
    lines = ["", f"summary ({summary['mode']}{' + dense baseline' if base is not None else ''}, step {step}, "
                 f"world_size {dist.get_world_size()}, TorchRec sharding {summary['sharding']})",
             *table_summary_lines(summary, out)]
    if base_final is not None:
        lines.append(f"validation  dense baseline @ step {step:<5}: loss {base_final['loss']:.4f}  "
                     f"AUC {base_final['auc']:.4f}"
                     f"   (same init, plan, batches and steps, no sparsifier)")
    label = "sparse" if sp is not None else "dense"
    lines.append(f"validation  {label:<14} @ step {step:<5}: loss {final['loss']:.4f}  AUC {final['auc']:.4f}")
    if cost is not None:
        lines.append(f"cost of sparsity (sparse - baseline): loss {cost['loss']:+.4f}  AUC {cost['auc']:+.4f}")
    lines += served_lines
    if run_steps:
        lines.append(f"this run: {run_steps} steps in {train_time:.1f} s, {summary['samples_per_s']:.0f} samples/s"
                     + (" (each sample trains both models)" if base is not None else ""))
    say("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, out / "summary.json")
    from report import write_report  # report.png: sparsity, loss vs the baseline, bytes per table
    say(f"report: {write_report(out)}")


# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = _Parser(description=__doc__.split("What it does")[0].strip("\n"), formatter_class=_HelpFormatter,
                epilog="How it works (plan, optimizers, checkpoints, resume, summary): the docstring of "
                       "examples/train_dlrm_torchrec.py.")
    count = _number(int, 1)
    positive = _number(float, 0.0, lo_open=True)
    p.add_argument("--output-dir", default="runs/dlrm_torchrec",
                   help="checkpoints (ckpt/), summary.json and the exported tables")
    p.add_argument("--max-steps", type=count, default=600, help="training steps in all (a resumed run counts on)")
    p.add_argument("--batch-size", type=count, default=512, help="per process; the global batch is this x processes")
    p.add_argument("--lr", type=positive, default=4e-3, help="Adam learning rate of the dense MLPs")
    p.add_argument("--emb-optimizer", choices=sorted(EMB_OPTIMIZERS), default="adagrad",
                   help="fused optimizer of the tables (on CPU: adagrad, rowwise_adagrad or sgd)")
    p.add_argument("--emb-lr", type=positive, default=0.05, help="learning rate of the tables' fused optimizer")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="data, split, initial weights and data order")
    p.add_argument("--rows", type=_number(int, 20), default=400_000, help="synthetic rows (train+validation)")
    p.add_argument("--num-users", type=count, default=6000, help="synthetic users")
    p.add_argument("--num-items", type=count, default=2000, help="synthetic items")
    p.add_argument("--num-categories", type=count, default=120, help="item categories")
    p.add_argument("--dim", type=count, default=16, help="embedding dimension")
    p.add_argument("--sharding", choices=SHARDINGS, default="auto",
                   help="auto: row-wise for tables of at least --row-wise-min-rows rows, table-wise for the others")
    p.add_argument("--row-wise-min-rows", type=count, default=1000, help="--sharding auto: the row-wise threshold")
    p.add_argument("--zero-pruned-state", action="store_true",
                   help="after each squash_mask(), zero the fused optimizer state (Adagrad's momentum1) of pruned "
                        "weights (distsparse.integrations.torchrec.zero_pruned_optimizer_state)")
    p.add_argument("--dense", action="store_true", help="train only a dense model: no sparsifier, no baseline")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not train the dense baseline next to the sparse model")
    p.add_argument("--final-sparsity", type=_number(float, 0.0, 1.0), default=0.8,
                   help="sparsity level at the end of the ramp, in [0, 1]")
    p.add_argument("--start-step", type=_number(int, 0), default=100, help="S0: dense warm-up steps before the ramp")
    p.add_argument("--ramp-steps", type=count, default=300, help="R: cubic ramp length in steps")
    p.add_argument("--save-every", type=_number(int, 0), default=200,
                   help="checkpoint interval in steps; 0: only at the end")
    p.add_argument("--keep", type=count, default=2, help="complete checkpoints to keep")
    p.add_argument("--resume", default="auto",
                   help="'auto': the newest checkpoint that loads; 'none': start over; or a checkpoint folder "
                        "(loaded exactly, no fallback)")
    p.add_argument("--crash-at-step", type=count, default=None,
                   help="os._exit(1) on every rank after this step (tests)")
    p.add_argument("--log-every", type=_number(int, 0), default=50, help="steps between log lines; 0: only at the end")
    p.add_argument("--expect-world-size", type=count, default=None, help="exit with an error on another world size")
    p.add_argument("--prune", choices=("blocks", "rows"), default="blocks",
                   help="'blocks': (1, 4) blocks; 'rows': whole rows ((1, dim) blocks, same schedule), then write "
                        "the pruned tables from the sharded tables and serve the validation set from them")
    args = p.parse_args(argv)
    if args.resume not in ("auto", "none") and not os.path.isdir(args.resume):
        p.error(f"argument --resume: {args.resume!r} is neither 'auto', 'none' nor a checkpoint folder")
    if args.crash_at_step is not None and args.crash_at_step > args.max_steps:
        p.error(f"argument --crash-at-step: {args.crash_at_step} is after --max-steps {args.max_steps}: "
                "it would never crash")
    return args


# --------------------------------------------------------------------------- main
def init_distributed():
    """torchrun's environment, or a one-process group when started without a launcher."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return device


def quiet_third_party_warnings() -> None:
    """TorchRec 1.9 / torch 2.13 deprecation chatter (ShardedTensor, DDP and c10d argument
    names, fx tracing), printed by every rank on every run: not this example's to fix."""
    for pattern in (r".*ShardedTensor", r".*broadcast_buffers", r".*torch\.distributed\.\w+ is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_third_party_warnings()
    device = init_distributed()
    try:
        run(args, device)
        dist.barrier()   # leave together: a rank that outlives the group can be aborted by gloo
    except JobError as exc:
        if dist.get_rank() == 0:       # every rank reaches the same refusal: one message
            print(f"error: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    dist.destroy_process_group()


def run(args, device):
    say = say_on_rank0
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    say(f"world_size={world} backend={dist.get_backend()} device={device}")
    if args.expect_world_size is not None and world != args.expect_world_size:
        raise JobError(f"expected world size {args.expect_world_size}, got {world}")
    if device.type == "cpu" and args.emb_optimizer not in CPU_EMB_OPTIMIZERS:
        raise JobError(f"--emb-optimizer {args.emb_optimizer} needs GPUs: FBGEMM's CPU kernels support "
                       f"{', '.join(CPU_EMB_OPTIMIZERS)}")
    if args.dense and args.no_baseline:
        raise JobError("--dense trains no baseline anyway; pass only one of --dense / --no-baseline")

    out = Path(args.output_dir); ckpt_root = out / "ckpt"
    say(f"run folder {out.resolve()} (checkpoints in {ckpt_root.resolve()})")
    done = broadcast(finished_message(args, out, ckpt_root) if rank == 0 else None)
    if done:
        say(done)
        return
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in (out / "summary.json", out / EXPORT_NAME):  # describe a finished run only
            if stale.is_file():
                stale.unlink()
    dist.barrier()

    # ---- data (identical on every rank)
    data = synthetic_clicks(args.rows, args.num_users, args.num_items, args.num_categories, args.seed)
    n = data["label"].numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))
    n_val = max(1, n // 10)
    val = {k: v[perm[:n_val]] for k, v in data.items()}
    tr = {k: v[perm[n_val:]] for k, v in data.items()}
    n_train = tr["label"].numel()
    global_batch = args.batch_size * world
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise JobError(f"{n_train} training rows are not enough for one global batch of {global_batch} "
                       f"(--batch-size {args.batch_size} x {world} processes)")
    sampler = EpochSampler(n_train, args.seed)
    rows = table_rows(int(data["user"].max()) + 1, int(data["item"].max()) + 1, args.num_categories)

    # ---- models: the sparse one and (default) the dense baseline, same plan and initial weights
    with_baseline = not args.dense and not args.no_baseline
    trainees = {"model": Trainee(args, rows, device, world, local_world)}
    if with_baseline:
        trainees["baseline"] = Trainee(args, rows, device, world, local_world)
    model = trainees["model"]
    say(f"TorchRec plan: {model.plan_text()}; tables trained by fused {EMB_OPTIMIZERS[args.emb_optimizer]} "
        f"(lr {args.emb_lr}), MLPs by Adam (lr {args.lr})")

    # ---- sparsity
    sp = sch = None
    if not args.dense:
        from distsparse.integrations.torchrec import add_torchrec_tables, zero_pruned_optimizer_state

        block = (1, args.dim) if args.prune == "rows" else (1, 4)  # --prune rows: whole rows
        sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=block)
        names = add_torchrec_tables(sp, model.dmp)
        if sorted(names) != sorted(TABLES):
            raise RuntimeError(f"add_torchrec_tables added {names}, expected {list(TABLES)}")
        sch = distsparse.CubicScheduler(sp, final_value=args.final_sparsity, initial_value=0.0,
                                        start_step=args.start_step, ramp_steps=args.ramp_steps)
        if ramp_note(args):
            say(ramp_note(args))

    # ---- resume
    resumed_path, st, distrusted = resume(args, ckpt_root, trainees, sp, sch, say)
    distrusted = set(distrusted)
    step, resumed_from, epoch, epoch_pos = 0, None, 0, 0
    if resumed_path is not None:
        step, resumed_from = int(st["step"]), resumed_path.name
        epoch, epoch_pos, note = position_after_resume(st, n_train, args.batch_size, world, steps_per_epoch)
        say(f"resumed from {resumed_from} at step {step} (epoch {epoch}, sample {epoch_pos} of {n_train})")
        if note:
            say(note)
        if st.get("sharding") != model.plan_text():
            say(f"resharded: the checkpoint's plan was {st.get('sharding')}")
    else:
        say("starting from scratch")
    say(f"train rows={n_train} val rows={n_val} global batch={global_batch} steps/epoch={steps_per_epoch} "
        f"max_steps={args.max_steps} mode="
        + ("dense" if args.dense else f"sparse (cubic 0 -> {args.final_sparsity}, steps "
                                      f"{args.start_step}..{args.start_step + args.ramp_steps})")
        + (" + dense baseline (same init, same batches, no sparsifier)" if with_baseline else ""))
    say(epochs_note(args.max_steps, step, steps_per_epoch, n_train))

    run_t0 = time.perf_counter(); run_steps = 0
    win_t0, win_steps = time.perf_counter(), 0
    win_loss = {k: torch.zeros((), device=device) for k in trainees}
    final_ckpt = None
    while step < args.max_steps:
        sampler.start_at(epoch, epoch_pos)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)  # the rest of this epoch's permutation
        for s in range(0, order.numel() - global_batch + 1, global_batch):
            idx = order[s + rank * args.batch_size: s + (rank + 1) * args.batch_size]
            dense, kjt, label = batch_of(tr, idx, device)
            for key, t in trainees.items():
                win_loss[key] += t.train_step(dense, kjt, label)
                if key == "model" and sp is not None:
                    sp.step()          # masks from the current weights, where the rows live
                    mask_level = _level(sp)
                    sch.step()         # level for the next step
                    sp.squash_mask()   # zeros back into the shards: the fused optimizer regrew them
                    if args.zero_pruned_state:
                        zero_pruned_optimizer_state(sp, model.dmp.fused_optimizer)
            step += 1; run_steps += 1; win_steps += 1
            epoch_pos += global_batch

            if (args.log_every > 0 and step % args.log_every == 0) or step == args.max_steps:
                losses = torch.stack([win_loss[k] / win_steps for k in trainees])
                dist.all_reduce(losses)
                losses = (losses / world).tolist()
                sps = win_steps * global_batch / (time.perf_counter() - win_t0)
                # the level this step's masks were computed with, and the one the next step uses
                level, next_level = (mask_level, _level(sp)) if sp is not None else (0.0, 0.0)
                spars = sp.sparsity() if sp is not None else {}
                say(f"step {step:5d} loss {losses[0]:.4f}" + (f" (baseline {losses[1]:.4f})" if with_baseline else "")
                    + f" samples/s {sps:8.0f} level {level:.3f} (next {next_level:.3f})"
                    + (" sparsity " + " ".join(f"{k}={spars[k]:.3f}" for k in TABLES) if spars else ""))
                if rank == 0:  # the rows examples/report.py draws report.png from
                    from report import log_run
                    log_run(out, step, {"train/loss": losses[0], "sparsity/level": level,
                                        **({"train/baseline_loss": losses[1]} if with_baseline else {}),
                                        **{f"sparsity/{k}": v for k, v in spars.items()}})
                win_t0, win_steps = time.perf_counter(), 0
                win_loss = {k: torch.zeros((), device=device) for k in trainees}

            if (args.save_every > 0 and step % args.save_every == 0) or step == args.max_steps:
                final_ckpt = save_checkpoint(
                    ckpt_root, step, {"step": step, "epoch": epoch, "epoch_position": epoch_pos, "world_size": world,
                                      "batch_size": args.batch_size, "sharding": model.plan_text(),
                                      "sparse": sp is not None, "baseline": with_baseline},
                    args.keep, distrusted, trainees, sp, sch)
                say(f"step {step:5d} saved checkpoint {final_ckpt.resolve()}")

            if args.crash_at_step is not None and step == args.crash_at_step:
                say(f"step {step:5d} simulated crash (--crash-at-step)")
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(1)
            if step >= args.max_steps:
                break
        else:  # the epoch ran out: the next one starts at its first sample
            epoch, epoch_pos = epoch + 1, 0
    train_time = time.perf_counter() - run_t0
    if final_ckpt is None:  # resumed from the last step's checkpoint: nothing trained
        final_ckpt = resumed_path
    summarize(args, trainees, sp, sch, val, device, final_ckpt, step, resumed_from, run_steps, train_time,
              global_batch, out, say)


if __name__ == "__main__":
    main()
