"""The TorchRec model of examples/dlrm/train_torchrec.py: the DLRM over an EmbeddingBagCollection
sharded by DistributedModelParallel, with its optimizers, its batches (KeyedJaggedTensors) and
its evaluation.

`--sharding auto` shards tables of at least `--row-wise-min-rows` rows row-wise over every rank
and places the small ones whole (table-wise) on the least loaded rank; `row_wise`, `table_wise`,
`column_wise` and `table_row_wise` apply one kind to every table. Tables start from the same
seeded normal(0, 0.1) weights whatever the plan or world size (each rank writes its shards' part
of the seeded table). The tables are trained by FBGEMM's fused optimizer
(`apply_optimizer_in_backward`): the update happens inside backward. The dense MLPs (DDP inside
DistributedModelParallel) by Adam through TorchRec's `KeyedOptimizerWrapper`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlrm.data import N_DENSE, TABLES
from dlrm.model import val_metrics

SHARDINGS = ("auto", "row_wise", "table_wise", "column_wise", "table_row_wise")
EMB_OPTIMIZERS = {"adagrad": "Adagrad", "rowwise_adagrad": "RowWiseAdagrad", "sgd": "SGD", "adam": "Adam"}
CPU_EMB_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")  # FBGEMM's CPU kernels
EBC = "sparse_arch.embedding_bag_collection"


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
    return val_metrics(torch.cat(gathered)[:n].cpu(), val["label"])
