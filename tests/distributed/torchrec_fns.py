"""Rank functions: TorchRec sharded tables (row-, column-, table-, table-row-wise; fused and
dense kernels) and tables sharded in rectangles by hand (:class:`distsparse.distributed.rects.RectShards`).

Every check compares with the single-process mask of the *global* weight, which the test
(only the test) reassembles by an all-reduce of zero-filled copies of each rank's shards.
TorchRec imports are slow: each function runs several cases in one process."""

from __future__ import annotations

import random
import time

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.masks import norm_block_mask
from distsparse.distributed.rects import RectShards
from fsdp2_fns import _values  # the FSDP2 tests' tables: random, heavy ties or constant


def _whole(value, shape) -> torch.Tensor:
    """The global tensor from every rank's shards (a RectShards / ShardedTensor) or a plain
    (replicated) tensor — test-side only."""
    from distsparse.distributed.rects import as_rect_shards

    shards = as_rect_shards(value)
    if shards is None:
        return value.detach().clone()
    dtype = shards.dtype
    out = torch.zeros(tuple(shape), dtype=torch.float64)
    for (r, c), t in shards.local_shards():
        out[r : r + t.shape[0], c : c + t.shape[1]] = t.detach().to(torch.float64)
    dist.all_reduce(out)
    return out.to(torch.bool) if dtype == torch.bool else out.to(dtype)


def _reference(weight: torch.Tensor, level: float, block, zeros) -> torch.Tensor:
    zeros_n = block[0] * block[1] if zeros is None else zeros
    return norm_block_mask(weight, level, tuple(block), zeros_n, "L1")


# -- TorchRec models ------------------------------------------------------------------------------

# name: (rows, cols); plans choose a sharding per table.
TABLES = {"rw": (101, 8), "tw": (37, 12), "cw": (53, 12), "cwu": (45, 20), "twrw": (61, 8)}


def _plan_specs(world: int, kernel: str) -> dict:
    """Sharding per table: every type TorchRec allows on CPU for this kernel. Fused kernels
    need column shards of a multiple of 4 columns; dense ones take uneven ones (5 / 15)."""
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_row_wise, table_wise

    ck = "fused" if kernel == "fused" else "dense"
    if ck == "fused":  # column shards of 4 / 16 (world 2) or 4 / 8 / 8 columns
        uneven = [4] + [16 // (world - 1)] * (world - 1)
    else:  # 5 / 15 or 5 / 7 / 8: boundaries off the block edges, column halos
        uneven = [5, 15] if world == 2 else [5, 7, 8]
    return {
        "rw": row_wise(compute_kernel=ck),
        "tw": table_wise(rank=world - 1, compute_kernel=ck),
        "cw": column_wise(ranks=[0, world - 1, 0], compute_kernel=ck),  # 3 shards of 4 columns, rank 0 holds two
        "cwu": column_wise(size_per_rank=uneven, compute_kernel=ck),
        "twrw": table_row_wise(host_index=0),
    }


class _Model(nn.Module):
    def __init__(self, tables: dict, collection: str = "ebc") -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

        if collection == "ebc":
            configs = [EmbeddingBagConfig(name=n, embedding_dim=c, num_embeddings=r, feature_names=[f"f_{n}"])
                       for n, (r, c) in tables.items()]
            self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        else:
            configs = [EmbeddingConfig(name=n, embedding_dim=c, num_embeddings=r, feature_names=[f"f_{n}"])
                       for n, (r, c) in tables.items()]
            self.ebc = EmbeddingCollection(tables=configs, device=torch.device("meta"))

    def forward(self, kjt):
        return self.ebc(kjt)


def _dmp(tables: dict, specs: dict, kernel: str, optimizer: str = "sgd", collection: str = "ebc",
         output_dtensor: bool = False):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    world, rank = dist.get_world_size(), dist.get_rank()
    model = _Model(tables, collection)
    if kernel == "fused":
        opt = torch.optim.Adagrad if optimizer == "adagrad" else torch.optim.SGD
        apply_optimizer_in_backward(opt, model.ebc.parameters(), {"lr": 0.05})
    plan = construct_module_sharding_plan(model.ebc, specs, world_size=world, local_size=world, device_type="cpu")
    return DistributedModelParallel(model, env=ShardingEnv(world, rank, dist.group.WORLD, output_dtensor=output_dtensor),
                                    device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}))


def _set_weights(model, tables: dict, kind: str, seed: int) -> dict:
    """Write deterministic global values into every rank's shards (in place); returns them."""
    values = {}
    sd = model.state_dict()
    with torch.no_grad():
        for i, (name, (rows, cols)) in enumerate(sorted(tables.items())):
            values[name] = _values(kind, rows, cols, seed + i)
            key = next(k for k in sd if k.endswith(f".{name}.weight"))
            weight = sd[key]
            from distsparse.distributed.rects import as_rect_shards

            shards = as_rect_shards(weight)
            if shards is None:
                weight.copy_(values[name])
                continue
            for (r, c), t in shards.local_shards():
                t.copy_(values[name][r : r + t.shape[0], c : c + t.shape[1]])
    return values


def _global_weights(model, tables: dict) -> dict:
    sd = model.state_dict()
    return {name: _whole(sd[next(k for k in sd if k.endswith(f".{name}.weight"))], shape)
            for name, shape in tables.items()}


def _forward_rows(model, tables: dict) -> dict:
    """Pooled embeddings of one id per bag: row ``b % rows`` of each table (what the next
    forward really uses)."""
    from torchrec import KeyedJaggedTensor

    batch = max(r for r, _ in tables.values())
    keys = [f"f_{n}" for n in tables]
    ids = torch.cat([torch.arange(batch) % tables[n][0] for n in tables])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=torch.ones(batch * len(keys),
                                                                                        dtype=torch.int32))
    with torch.no_grad():
        out = model(kjt).to_dict()
    return {n: out[f"f_{n}"][: tables[n][0]].detach().clone() for n in tables}


def sharding_cases(kernel: str, cases: list) -> dict:
    """Every sharding type in one model; per case ``[kind, level, block, zeros]``: weights set,
    step, every table's mask equals the single-process mask of its global weight, sparsity()
    is global and exact, squash_mask's zeros reach the next forward."""
    from distsparse.integrations.torchrec import add_torchrec_tables

    world = dist.get_world_size()
    tables = dict(TABLES)
    model = _dmp(tables, _plan_specs(world, kernel), kernel)
    out: dict = {"cases": []}
    for case_no, (kind, level, block, zeros) in enumerate(cases):
        values = _set_weights(model, tables, kind, 10 * case_no)
        sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block),
                                           zeros_per_block=zeros)
        names = add_torchrec_tables(sp, model)
        res: dict = {"names": names, "equal": {}, "sparsity_exact": {}, "forward_zeros": {}}
        sp.step()
        res["bytes_sent"] = sp.last_step_stats["bytes_sent"]
        res["selection_bytes"] = sp.last_step_stats["selection_bytes"]
        for name in names:
            mask = _whole(sp.get_mask(name), tables[name])
            ref = _reference(values[name], level, block, zeros)
            res["equal"][name] = bool(torch.equal(mask, ref))
            res["sparsity_exact"][name] = sp.sparsity(name)[name] == 1.0 - int(ref.sum()) / ref.numel()
        sp.squash_mask()
        rows = _forward_rows(model, tables)
        for name in names:
            ref = _reference(values[name], level, block, zeros)
            res["forward_zeros"][name] = bool(torch.equal(rows[name], torch.where(ref, values[name], 0.0)))
        out["cases"].append(res)
    out["layouts"] = {n: [list(o) + list(t.shape) for o, t in sp.get_mask(n).local_shards()]
                      for n in names if hasattr(sp.get_mask(n), "local_shards")}
    dist.barrier()
    return out


def training_loop(kernel: str, steps: int = 4) -> dict:
    """forward, backward (fused: the optimizer steps inside), sp.step(), scheduler.step(),
    squash_mask() every step; after each: masks equal the single-process masks of the
    global weights, the forward sees the zeros; fused Adagrad's momentum1 of pruned elements
    is zeroed by zero_pruned_optimizer_state."""
    from torchrec import KeyedJaggedTensor

    from distsparse.integrations.torchrec import add_torchrec_tables, zero_pruned_optimizer_state

    world, rank = dist.get_world_size(), dist.get_rank()
    tables = dict(TABLES)
    model = _dmp(tables, _plan_specs(world, kernel), kernel, optimizer="adagrad")
    _set_weights(model, tables, "random", 7)
    dense_opt = None if kernel == "fused" else torch.optim.SGD(model.parameters(), lr=0.05)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(2, 4))
    names = add_torchrec_tables(sp, model)
    sch = distsparse.LinearScheduler(sp, final_value=0.6, ramp_steps=steps - 1)
    gen = torch.Generator().manual_seed(rank)
    out = {"equal": [], "forward_zeros": [], "sparsity": [], "momentum_zeroed": []}
    keys = [f"f_{n}" for n in tables]
    for _ in range(steps):
        ids = torch.cat([torch.randint(0, tables[n][0], (16,), generator=gen) for n in tables])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=torch.ones(16 * len(keys),
                                                                                            dtype=torch.int32))
        loss = sum(v.pow(2).sum() for v in model(kjt).to_dict().values())
        loss.backward()
        if dense_opt is not None:
            dense_opt.step()
            dense_opt.zero_grad()
        weights = _global_weights(model, tables)  # what this step's masks are computed on
        level = sp.data_groups[names[0]]["sparsity_level"]
        sp.step()
        sch.step()
        sp.squash_mask()
        if kernel == "fused":
            out["momentum_zeroed"].append(zero_pruned_optimizer_state(sp, model.fused_optimizer))
        masks = {n: _whole(sp.get_mask(n), tables[n]) for n in names}
        out["equal"].append(all(torch.equal(masks[n], _reference(weights[n], level, (2, 4), None)) for n in names))
        rows = _forward_rows(model, tables)
        out["forward_zeros"].append(all(bool((rows[n][~masks[n]] == 0).all()) for n in names))
        out["sparsity"].append(sp.sparsity())
    if kernel == "fused":  # this rank's state of pruned elements is zero after zero_pruned_optimizer_state
        from distsparse.distributed.rects import as_rect_shards

        state = model.fused_optimizer.state_dict()["state"]
        zero, seen = True, 0
        for per_param in state.values():
            for key, value in per_param.items():
                table = key.rsplit(".", 1)[0]
                if table in names and key.endswith("momentum1"):
                    local_masks = dict(sp.get_mask(table).local_shards())
                    for offset, t in as_rect_shards(value).local_shards():
                        zero &= bool((t[~local_masks[offset]] == 0).all())
                        seen += int((~local_masks[offset]).sum())
        out["momentum_of_pruned_zero"] = zero and seen > 0
    dist.barrier()
    return out


def refusals() -> dict:
    """Bad input: not a module, a module without TorchRec tables, a table that does not
    exist, two collections with the same table name, an unsupported tensor."""
    from rank_fns import capture_error

    from distsparse.integrations.torchrec import add_torchrec_table, add_torchrec_tables

    tables = {"rw": (20, 8), "tw": (9, 8)}
    specs = _plan_specs_small(dist.get_world_size())
    model = _dmp(tables, specs, "dense")
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    twins = nn.Module()
    twins.a = _Model({"t": (5, 4)})
    twins.b = _Model({"t": (6, 4)})
    for m in (twins.a, twins.b):
        m.ebc = m.ebc.to_empty(device="cpu")
    out = {
        "not_a_module": capture_error(add_torchrec_tables, sp, torch.zeros(3)),
        "no_tables": capture_error(add_torchrec_tables, sp, nn.Linear(2, 2)),
        "missing_table": capture_error(add_torchrec_tables, sp, model, ["rw", "nope"]),
        "twins": capture_error(add_torchrec_tables, sp, twins),
        "unsupported": capture_error(add_torchrec_table, sp, "x", [1, 2]),
        "module_to_add_data": capture_error(sp.add_data, "ebc", model.module.ebc),
        "groups_after_errors": sorted(sp.data_groups),
        "twins_named": add_torchrec_tables(distsparse.DataNormSparsifier(), twins,
                                           group_name=lambda path, table: f"{path}.{table}"),
        "only_rw": add_torchrec_tables(sp, model, ["rw"]),
    }
    sp.step()
    dist.barrier()
    return out


def _plan_specs_small(world: int) -> dict:
    from torchrec.distributed.sharding_plan import row_wise, table_wise

    return {"rw": row_wise(compute_kernel="dense"), "tw": table_wise(rank=world - 1, compute_kernel="dense")}


# -- checkpoints across runs -----------------------------------------------------------------------

CKPT_TABLES = {"rw": (101, 12), "tw": (37, 12), "cw": (53, 12)}


def checkpoint_save_torchrec(folder: str, level: float, block: list) -> dict:
    """TorchRec run (plan 0): step, save; returns the global masks."""
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables

    world = dist.get_world_size()
    specs = {"rw": row_wise(compute_kernel="fused"), "tw": table_wise(rank=world - 1, compute_kernel="fused"),
             "cw": column_wise(ranks=[0, world - 1, 0], compute_kernel="fused")}
    model = _dmp(CKPT_TABLES, specs, "fused")
    _set_weights(model, CKPT_TABLES, "few_values", 3)
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=tuple(block))
    add_torchrec_tables(sp, model)
    sp.step()
    distsparse.save_checkpoint(f"{folder}/torchrec.safetensors", sp)
    dist.barrier()
    return {n: _whole(sp.get_mask(n), CKPT_TABLES[n]) for n in CKPT_TABLES}


def checkpoint_load_replicated(folder: str, src: str, dst: str) -> dict:
    """Plain replicated tables (a single process, or DDP-style): load, save again."""
    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 1))
    for name, (rows, cols) in sorted(CKPT_TABLES.items()):
        sp.add_data(name, nn.Parameter(torch.ones(rows, cols)))
    distsparse.load_checkpoint(f"{folder}/{src}", sp, config="checkpoint")  # the file's (2, 3) blocks
    distsparse.save_checkpoint(f"{folder}/{dst}", sp)
    masks = {n: sp.get_mask(n).clone() for n in CKPT_TABLES}
    masks["sparsity"] = sp.sparsity()
    return masks


def checkpoint_load_torchrec(folder: str, src: str) -> dict:
    """TorchRec run with another plan and world size, tables as DTensors (``output_dtensor``,
    placements not trusted): load; global masks and sparsity."""
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from distsparse.integrations.torchrec import add_torchrec_tables

    world = dist.get_world_size()
    specs = {"rw": column_wise(ranks=[world - 1, 0, 1], compute_kernel="dense"),
             "tw": row_wise(compute_kernel="dense"), "cw": table_wise(rank=1, compute_kernel="dense")}
    model = _dmp(CKPT_TABLES, specs, "dense", output_dtensor=True)
    from torch.distributed.tensor import DTensor

    sp = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 1))
    add_torchrec_tables(sp, model, ["rw", "cw"])
    distsparse.load_checkpoint(f"{folder}/{src}", sp, config="checkpoint")
    add_torchrec_tables(sp, model, ["tw"])  # restored pending: takes its shards' parts when added
    out = {n: _whole(sp.get_mask(n), CKPT_TABLES[n]) for n in CKPT_TABLES}
    out["sparsity"] = sp.sparsity()
    out["config"] = sp.data_groups["rw"]["sparse_block_shape"]
    out["dtensor"] = isinstance(sp.get_data("tw"), DTensor)
    dist.barrier()
    return out


# -- tables sharded in rectangles by hand (no TorchRec) ----------------------------------------------


def _random_layout(rows: int, cols: int, world: int, rng: random.Random) -> list:
    """Rectangles tiling the table (row and column cuts, some thin, some empty) dealt to
    random ranks: a rank may hold none, one or several."""
    rcuts = sorted({0, rows, *(rng.randint(0, rows) for _ in range(rng.randint(0, 3)))})
    ccuts = sorted({0, cols, *(rng.randint(0, cols) for _ in range(rng.randint(0, 3)))})
    rects = [(r0, c0, r1 - r0, c1 - c0) for r0, r1 in zip(rcuts, rcuts[1:]) for c0, c1 in zip(ccuts, ccuts[1:])]
    return [(rect, rng.randrange(world)) for rect in rects]


def rect_shards_random(n_cases: int, seed: int) -> dict:
    """Random layouts of RectShards groups (the same on every rank): every mask equals the
    single-process mask, sparsity() is global, state_dict round-trips on the same layout."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rng = random.Random(seed)
    failures = []
    bytes_max = 0.0
    for case in range(n_cases):
        rows, cols = rng.randint(1, 40), rng.randint(1, 23)
        kind = rng.choice(["random", "few_values", "constant"])
        block = rng.choice([(1, 4), (2, 2), (3, 5), (4, 3), (1, 1), (5, 2)])
        level, zeros = rng.choice([0.0, 0.3, 0.5, 0.77, 1.0]), rng.choice([None, 1])
        data = _values(kind, rows, cols, case)
        layout = _random_layout(rows, cols, world, rng)
        mine = [((r, c), data[r : r + n, c : c + m].clone()) for (r, c, n, m), holder in layout if holder == rank]
        sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
        sp.add_data("t", RectShards((rows, cols), mine))
        sp.add_data("plain", nn.Parameter(data.clone()))  # a replicated group in the same steps
        sp.step()
        ref = _reference(data, level, block, zeros)
        got = _whole(sp.get_mask("t"), (rows, cols))
        exact = sp.sparsity("t")["t"] == 1.0 - int(ref.sum()) / ref.numel()
        if not (torch.equal(got, ref) and torch.equal(sp.get_mask("plain"), ref) and exact):
            failures.append({"case": case, "rows": rows, "cols": cols, "kind": kind, "block": list(block),
                             "level": level, "zeros": zeros, "layout": [list(r) + [h] for r, h in layout],
                             "sparsity_exact": exact})
        again = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
        again.add_data("t", RectShards((rows, cols), mine))
        again.add_data("plain", nn.Parameter(data.clone()))
        again.load_state_dict(sp.state_dict())
        if not torch.equal(_whole(again.get_mask("t"), (rows, cols)), ref) or again.sparsity("t") != sp.sparsity("t"):
            failures.append({"case": case, "state_dict_round_trip": False})
        bytes_max = max(bytes_max, sp.last_step_stats["bytes_sent"])
    dist.barrier()
    return {"failures": failures, "bytes_max": bytes_max}


def rect_one_row_layouts() -> dict:
    """World 2, (1, 4) blocks, one-row rectangles: a 1x9 table cut at column 5 (rank 0 holds
    columns 0-4, rank 1 columns 5-8) and an 8x9 table whose bottom row is cut the same way
    below rank 0's 7 rows. Returns, per case, whether the mask is the single-process one
    (or the error raised)."""
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    out = {}
    for rows in (1, 8):
        data = torch.randn(rows, 9, generator=torch.Generator().manual_seed(rows))
        top = [((0, 0), data[: rows - 1].clone())] if rows > 1 else []
        layout = {0: top + [((rows - 1, 0), data[rows - 1 :, :5].clone())],
                  1: [((rows - 1, 5), data[rows - 1 :, 5:].clone())]}
        sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
        sp.add_data("t", RectShards((rows, 9), layout[rank]))
        try:
            sp.step()
            out[f"{rows}x9"] = torch.equal(_whole(sp.get_mask("t"), (rows, 9)), _reference(data, 0.5, (1, 4), None))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[f"{rows}x9"] = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    return out


def rect_bad_layouts() -> dict:
    """Shards that overlap or leave a gap: the first step raises ValueError naming the group
    on every rank, fast, and changes no mask."""
    from rank_fns import capture_error

    rank = dist.get_rank()
    out = {}
    for kind in ("overlap", "gap"):
        data = torch.randn(10, 8)
        if kind == "overlap":
            mine = [((0, 0), data[:6])] if rank == 0 else [((5, 0), data[5:])]
        else:
            mine = [((0, 0), data[:4])] if rank == 0 else [((5, 0), data[5:])]
        sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
        sp.add_data("bad.table", RectShards((10, 8), mine))
        started = time.perf_counter()
        out[kind] = {**capture_error(sp.step), "seconds": time.perf_counter() - started,
                     "mask_untouched": bool(sp.get_mask("bad.table").local_shards()[0][1].all())}
    dist.barrier()
    return out


def row_wise_bytes(rows: int, cols: int, repeats: int) -> dict:
    """Bytes sent per rank per step and step time: one row-wise sharded table against the same
    table replicated (DDP-style), (1, 4) blocks, level 0.5."""
    per = -(-rows // dist.get_world_size())
    rank = dist.get_rank()
    start, stop = min(rows, rank * per), min(rows, (rank + 1) * per)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(rows, cols, generator=gen)
    sharded = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sharded.add_data("t", RectShards((rows, cols), [((start, 0), full[start:stop].clone())]))
    replicated = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    replicated.add_data("t", nn.Parameter(full))
    out = {}
    for label, sp in (("sharded", sharded), ("replicated", replicated)):
        sp.step()  # warm-up (learns the layout)
        times, sent = [], []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            sp.step()
            times.append(time.perf_counter() - started)
            sent.append(sp.last_step_stats["bytes_sent"])
        out[label] = {"seconds": sorted(times)[len(times) // 2], "bytes_sent": max(sent)}
    dist.barrier()
    return out


# -- sparsity() of sharded groups: global and exact, no collective ----------------------------------


def fsdp2_global_sparsity(folder: str) -> dict:
    """An FSDP2 table (uneven rows, straddling blocks): sparsity() equals the exact global
    figure of the whole mask on every rank, after a step and after loading a checkpoint,
    without a collective at call time (the Comm's call counter does not move)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    emb = nn.Embedding(1001, 10)
    with torch.no_grad():
        emb.weight.copy_(_values("few_values", 1001, 10, 4))
    fully_shard(emb, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.41, sparse_block_shape=(3, 4))
    sp.add_data("emb", emb.weight)
    before = sp.sparsity()["emb"]
    sp.step()
    whole = sp.get_mask("emb").full_tensor()
    calls = sp.comm.calls
    out = {"initial": before, "after_step": sp.sparsity()["emb"], "exact": 1.0 - int(whole.sum()) / whole.numel(),
           "no_collective": sp.comm.calls == calls}
    distsparse.save_checkpoint(f"{folder}/fsdp2.safetensors", sp)
    again = distsparse.DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(3, 4))
    again.add_data("emb", emb.weight)
    distsparse.load_checkpoint(f"{folder}/fsdp2.safetensors", again)
    out["after_load"] = again.sparsity()["emb"]
    dist.barrier()
    return out
