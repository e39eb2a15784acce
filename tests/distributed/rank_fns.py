"""Per-rank functions for the distributed tests (run inside each rank by launcher.run_ranks).

Each function holds the library calls of one scenario and returns what the thin pytest
tests compare across ranks; expected exceptions are caught (``capture_error``) and
returned, so a test can check that *every* rank raised. The data builders and
``single_process_masks`` are also used by the tests themselves, in the pytest process,
to compute reference masks without torch.distributed.
"""

from __future__ import annotations

import random
import time
import zlib

import torch
import torch.distributed as dist
from torch import nn


# ---------------------------------------------------------------- launcher self-checks

def all_reduce_sum(value: float) -> dict:
    t = torch.tensor([value * (dist.get_rank() + 1)], dtype=torch.float64)
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
            "sum": t.item(), "threads": torch.get_num_threads()}


def echo_tensors(payload: dict) -> dict:
    return {"rank": dist.get_rank(), "payload": payload,
            "made_here": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3,
            "mask": torch.tensor([[True, False], [False, True]])}


def raise_on_rank(bad_rank: int) -> str:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {bad_rank}")
    return "ok"


def hang_on_rank(bad_rank: int) -> str:
    if dist.get_rank() == bad_rank:
        time.sleep(600)
    return "ok"


def crash_on_rank(bad_rank: int) -> str:
    import os
    import signal

    if dist.get_rank() == bad_rank:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok"


def raise_on_rank_others_sleep(bad_rank: int) -> str:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {bad_rank}")
    time.sleep(600)
    return "ok"


# ======================================================================================
# distsparse scenarios
#
# The data builders below are shared with the tests (the pytest process rebuilds the same
# tensors to compute single-process reference masks), so keep them deterministic: every
# tensor comes from its own seeded generator, never from global RNG state.
# ======================================================================================

# (name, kind, shape, config overrides) of the replicated groups: varied shapes (1-D,
# partial edge blocks), block shapes, levels (0.0 and 1.0 included), zeros_per_block and
# norms, over nn.Parameter, nn.Embedding and nn.EmbeddingBag.
REPLICATED = [
    ("layer1.weight", "param", (16, 12), {}),
    ("layer2.weight", "param", (10, 7),
     {"sparsity_level": 0.3, "sparse_block_shape": (2, 3), "norm": "L2"}),
    ("emb", "embedding", (20, 8), {"sparsity_level": 0.7, "zeros_per_block": 2}),
    ("bag", "embedding_bag", (15, 6),
     {"sparsity_level": 0.25, "sparse_block_shape": (3, 2), "zeros_per_block": 3, "norm": "L2"}),
    ("head.bias", "param", (9,), {"sparsity_level": 0.4, "sparse_block_shape": (1, 2)}),
    ("layer3.weight", "param", (32, 16), {"sparsity_level": 0.9, "sparse_block_shape": (4, 4)}),
    ("tiny.full", "param", (3, 3), {"sparsity_level": 1.0, "sparse_block_shape": (1, 1)}),
    ("tiny.none", "param", (2, 5), {"sparsity_level": 0.0}),
]

# Local groups: each rank's data differs (seeded by rank).
#   name, kind, shape, config, replicated flag passed to add_data (None = default)
LOCAL = [
    ("batch.x", "tensor", (6, 8), {"sparsity_level": 0.5}, None),
    ("local.param", "param", (5, 4), {"sparsity_level": 0.6, "norm": "L2"}, False),
]
# A plain tensor made replicated explicitly (same data on every rank).
REPLICATED_TENSOR = ("shared.buf", "tensor", (8, 8), {"sparsity_level": 0.45}, True)

SEED = 20261125


def make_tensor(name: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def make_data(name: str, kind: str, shape, seed: int):
    t = make_tensor(name, shape, seed)
    if kind == "tensor":
        return t
    if kind == "param":
        return nn.Parameter(t)
    if kind == "embedding":
        m = nn.Embedding(*shape)
    elif kind == "embedding_bag":
        m = nn.EmbeddingBag(*shape)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        m.weight.copy_(t)
    return m


def weight_of(data) -> torch.Tensor:
    return data.weight if isinstance(data, (nn.Embedding, nn.EmbeddingBag)) else data


def local_seed(seed: int, rank: int) -> int:
    return seed + 1000 * (rank + 1)


def jsonable(value):
    """A config value as JSON-able data (tuples -> lists, anything odd -> repr)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Size):
        return list(value)
    return repr(value)


def split_norm(cfg: dict):
    """``norm`` is a sparsifier argument (as in torch.ao), not a group config: split it off."""
    cfg = dict(cfg)
    return cfg.pop("norm", "L1"), cfg


NORMS = ("L1", "L2")


def norm_of(name: str) -> str:
    for n, _, _, cfg in REPLICATED:
        if n == name:
            return split_norm(cfg)[0]
    for n, _, _, cfg, _ in LOCAL + [REPLICATED_TENSOR]:
        if n == name:
            return split_norm(cfg)[0]
    raise KeyError(name)


class Sparsifiers:
    """One DataNormSparsifier per norm; groups routed by their spec's ``norm``."""

    def __init__(self):
        import distsparse

        self.by_norm = {norm: distsparse.DataNormSparsifier(norm=norm) for norm in NORMS}
        self.where = {}

    def add_data(self, name, data, **cfg):
        norm, cfg = split_norm(cfg)
        self.where[name] = self.by_norm[norm]
        return self.by_norm[norm].add_data(name, data, **cfg)

    def step(self):
        for norm in NORMS:  # the same order on every rank
            self.by_norm[norm].step()

    def get_mask(self, name):
        return self.where[name].get_mask(name)

    def owner_of(self, name):
        return self.where[name].owner_of(name)

    def config(self, name):
        return self.where[name].data_groups[name]


def capture_error(fn, *args, **kwargs) -> dict:
    """Run ``fn``; describe the outcome (error type, its MRO, message, seconds taken)."""
    start = time.monotonic()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test decides what was expected
        return {
            "raised": True,
            "error_type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc),
            "seconds": time.monotonic() - start,
        }
    return {"raised": False, "value": repr(value), "seconds": time.monotonic() - start}


def _mask_report(sp, names, datas) -> dict:
    out = {"masks": {}, "mask_dtype": {}, "mask_device": {}, "data_device": {}}
    for name in names:
        mask = sp.get_mask(name)
        out["masks"][name] = mask.detach().clone()
        out["mask_dtype"][name] = str(mask.dtype)
        out["mask_device"][name] = str(mask.device)
        out["data_device"][name] = str(weight_of(datas[name]).device)
    return out


def healthy_run(seed: int = SEED) -> dict:
    """Everything that should just work, in one job (process start-up is the dominant cost).

    ``masks``: replicated_and_local_masks(); ``schedule``: rank_dependent_random_schedule()
    on other sparsifiers. A section that raises is reported as ``{"error": traceback}``
    so the other section's tests still say something.
    """
    import traceback

    out = {}
    for section, fn in (("masks", replicated_and_local_masks),
                        ("schedule", rank_dependent_random_schedule)):
        try:
            out[section] = fn(seed)
        except Exception:  # noqa: BLE001 - reported to the tests of that section
            out[section] = {"error": f"[rank {dist.get_rank()}] {traceback.format_exc()}"}
    return out


def replicated_and_local_masks(seed: int = SEED) -> dict:
    """Replicated groups (same data everywhere) + local groups (per-rank data); one step."""
    rank = dist.get_rank()
    sp = Sparsifiers()
    datas = {}
    for name, kind, shape, cfg in REPLICATED:
        datas[name] = make_data(name, kind, shape, seed)
        sp.add_data(name, datas[name], **cfg)
    for name, kind, shape, cfg, replicated in LOCAL:
        datas[name] = make_data(name, kind, shape, local_seed(seed, rank))
        sp.add_data(name, datas[name], replicated=replicated, **cfg)
    name, kind, shape, cfg, replicated = REPLICATED_TENSOR
    datas[name] = make_data(name, kind, shape, seed)
    sp.add_data(name, datas[name], replicated=replicated, **cfg)

    start = time.monotonic()
    sp.step()
    seconds = time.monotonic() - start
    replicated_names = [n for n, *_ in REPLICATED] + [REPLICATED_TENSOR[0]]
    out = _mask_report(sp, list(datas), datas)
    out.update(
        rank=rank,
        step_seconds=seconds,
        owners={n: sp.owner_of(n) for n in replicated_names},
        configs={n: jsonable(dict(sp.config(n))) for n in datas},
    )
    return out


def owners_only(seed: int = SEED) -> dict:
    """Same groups as replicated_and_local_masks; report owner_of after step()."""
    rank = dist.get_rank()
    sp = Sparsifiers()
    for name, kind, shape, cfg in REPLICATED:
        sp.add_data(name, make_data(name, kind, shape, seed), **cfg)
    for name, kind, shape, cfg, replicated in LOCAL:
        sp.add_data(name, make_data(name, kind, shape, local_seed(seed, rank)),
                    replicated=replicated, **cfg)
    name, kind, shape, cfg, replicated = REPLICATED_TENSOR
    sp.add_data(name, make_data(name, kind, shape, seed), replicated=replicated, **cfg)
    sp.step()
    replicated_names = [n for n, *_ in REPLICATED] + [REPLICATED_TENSOR[0]]
    return {"owners": {n: sp.owner_of(n) for n in replicated_names}}


def few_groups(n_groups: int, seed: int = SEED) -> dict:
    """Only the first ``n_groups`` replicated groups: some ranks own nothing."""
    sp = Sparsifiers()
    datas = {}
    for name, kind, shape, cfg in REPLICATED[:n_groups]:
        datas[name] = make_data(name, kind, shape, seed)
        sp.add_data(name, datas[name], **cfg)
    sp.step()
    sp.step()  # a second step: ranks owning nothing stay in step with the others
    out = _mask_report(sp, list(datas), datas)
    out["owners"] = {n: sp.owner_of(n) for n in datas}
    return out


def local_shapes_and_differing_replicas(seed: int = SEED) -> dict:
    """Two independent sparsifiers (each section's error is captured, not raised):

    ``local_shapes``: a local input batch whose row count differs per rank (a short last
    batch, say) next to a replicated parameter.
    ``differing_replica``: replicated=True on a plain tensor whose copies differ per rank —
    the owner's copy decides every rank's mask.
    """
    import distsparse

    rank = dist.get_rank()
    out = {}

    def local_shapes():
        sp = distsparse.DataNormSparsifier()
        datas = {}
        name, kind, shape, cfg = REPLICATED[0]
        datas[name] = make_data(name, kind, shape, seed)
        sp.add_data(name, datas[name], **cfg)
        datas["batch.x"] = make_data("batch.x", "tensor", (4 + rank, 8), local_seed(seed, rank))
        sp.add_data("batch.x", datas["batch.x"], sparsity_level=0.5)
        sp.step()
        out["local_shapes"] = _mask_report(sp, list(datas), datas)

    def differing_replica():
        sp = distsparse.DataNormSparsifier()
        data = make_data("shared.buf", "tensor", (8, 8), local_seed(seed, rank))
        sp.add_data("shared.buf", data, replicated=True, sparsity_level=0.45)
        sp.step()
        out["differing_replica"] = _mask_report(sp, ["shared.buf"], {"shared.buf": data})
        out["differing_replica"]["owner"] = sp.owner_of("shared.buf")

    for section, fn in (("local_shapes", local_shapes), ("differing_replica", differing_replica)):
        outcome = capture_error(fn)
        if outcome["raised"]:
            out[section] = {"error": f"[rank {rank}] {outcome['error_type']}: {outcome['message']}"}
    return out


# ------------------------------------------------------------------ schedulers

SCHEDULED = [REPLICATED[0], REPLICATED[2], REPLICATED[4], REPLICATED[5]]  # all L1
SCHEDULED_LOCAL = ("batch.x", "tensor", (6, 8), {"sparsity_level": 0.5})


def _scheduled_sparsifier(seed: int):
    import distsparse

    rank = dist.get_rank()
    sp = distsparse.DataNormSparsifier()
    for name, kind, shape, cfg in SCHEDULED:
        sp.add_data(name, make_data(name, kind, shape, seed), **cfg)
    name, kind, shape, cfg = SCHEDULED_LOCAL
    sp.add_data(name, make_data(name, kind, shape, local_seed(seed, rank)), **cfg)
    return sp


def rank_dependent_random_schedule(seed: int = SEED) -> dict:
    """get_schedule_param returns rank-dependent and random floats; ranks must hold rank 0's."""
    import distsparse

    rank = dist.get_rank()
    random.seed(1234 + rank)

    class RankDependentScheduler(distsparse.BaseDataScheduler):
        def __init__(self, data_sparsifier):
            self.calls = []
            super().__init__(data_sparsifier, "sparsity_level")

        def get_schedule_param(self):
            values = {}
            for i, name in enumerate(sorted(self.data_sparsifier.data_groups)):
                if i % 2 == 0:
                    values[name] = 0.1 + rank * 1e-9 + 0.2 * len(self.calls)
                else:
                    values[name] = random.random() * 0.9
            self.calls.append(values)
            return values

    sp = _scheduled_sparsifier(seed)
    sch = RankDependentScheduler(sp)  # performs the first step (a collective)
    records = []
    for epoch in range(3):
        if epoch:
            sch.step()
        sp.step()
        records.append({
            "last_epoch": sch.last_epoch,
            "levels": {n: sp.data_groups[n]["sparsity_level"] for n in sp.data_groups},
            "level_types": {n: type(sp.data_groups[n]["sparsity_level"]).__name__
                            for n in sp.data_groups},
            "last_param": dict(sch.get_last_param()),
            "masks": {n: sp.get_mask(n).detach().clone() for n, *_ in SCHEDULED},
        })
    return {"rank": rank, "calls": sch.calls, "records": records}


def scheduler_raising_on_rank0(raise_at_call: int, seed: int = SEED) -> dict:
    """get_schedule_param raises on rank 0 at its ``raise_at_call``-th call (0 = constructor)."""
    import distsparse

    rank = dist.get_rank()

    class FailingScheduler(distsparse.BaseDataScheduler):
        def __init__(self, data_sparsifier):
            self.n_calls = 0
            super().__init__(data_sparsifier, "sparsity_level")

        def get_schedule_param(self):
            call = self.n_calls
            self.n_calls += 1
            if rank == 0 and call == raise_at_call:
                raise ValueError(f"boom from rank 0 at call {call}")
            return {n: 0.5 for n in self.data_sparsifier.data_groups}

    sp = _scheduled_sparsifier(seed)

    def run():
        sch = FailingScheduler(sp)
        sp.step()
        for _ in range(raise_at_call):
            sch.step()
            sp.step()

    return capture_error(run)


# ------------------------------------------------------------------ diverging ranks

def diverging_ranks(kind: str, odd_rank: int, seed: int = SEED) -> dict:
    """Rank ``odd_rank`` disagrees with the others; every rank must raise, naming the group.

    kind: "extra_group" (odd rank adds "extra.weight"), "shape" ("layer2.weight" is
    10x8 instead of 10x7 there), "config" ("layer2.weight" at sparsity_level 0.35
    instead of 0.3 there).
    """
    rank = dist.get_rank()
    odd = rank == odd_rank

    def run():
        sp = Sparsifiers()
        for name, kind_, shape, cfg in REPLICATED[:4]:
            cfg = dict(cfg)
            if name == "layer2.weight" and odd and kind == "shape":
                shape = (10, 8)
            if name == "layer2.weight" and odd and kind == "config":
                cfg["sparsity_level"] = 0.35
            sp.add_data(name, make_data(name, kind_, shape, seed), **cfg)
        if odd and kind == "extra_group":
            sp.add_data("extra.weight", make_data("extra.weight", "param", (4, 4), seed))
        sp.step()

    return capture_error(run)


# ------------------------------------------------------------------ NaN on the owner

def nan_in_group_owned_by_rank1(only_on_owner: bool, seed: int = SEED) -> dict:
    """A NaN in the replicated group that rank 1 owns; every rank must raise, naming it.

    Ownership is read from a clean sparsifier with the same groups (ownership depends only
    on names and sizes), then a second sparsifier gets the NaN data.
    """
    rank = dist.get_rank()
    clean = Sparsifiers()
    for name, kind, shape, cfg in REPLICATED:
        clean.add_data(name, make_data(name, kind, shape, seed), **cfg)
    clean.step()
    owned_by_1 = [n for n, *_ in REPLICATED if clean.owner_of(n) == 1]
    nan_group = owned_by_1[0]

    def run():
        sp = Sparsifiers()
        for name, kind, shape, cfg in REPLICATED:
            data = make_data(name, kind, shape, seed)
            if name == nan_group and (rank == 1 or not only_on_owner):
                with torch.no_grad():
                    weight_of(data).view(-1)[0] = float("nan")
            sp.add_data(name, data, **cfg)
        sp.step()

    out = capture_error(run)
    out["nan_group"] = nan_group
    return out


# ------------------------------------------------------------------ references (pytest side)

def single_process_masks(entries) -> dict:
    """Masks of a non-distributed sparsifier; ``entries``: (name, data, config) triples.

    Called in the pytest process, where torch.distributed is not initialized.
    """
    assert not (dist.is_available() and dist.is_initialized())
    sp = Sparsifiers()
    for name, data, cfg in entries:
        sp.add_data(name, data, **cfg)
    sp.step()
    return {name: sp.get_mask(name).detach().clone() for name, _, _ in entries}


def happy_path_reference(world_size: int, seed: int = SEED) -> list:
    """Per rank, the single-process masks that replicated_and_local_masks must produce."""
    shared = [(n, make_data(n, k, s, seed), c) for n, k, s, c in REPLICATED]
    n, k, s, c, _ = REPLICATED_TENSOR
    shared.append((n, make_data(n, k, s, seed), c))
    refs = []
    for rank in range(world_size):
        local = [(n, make_data(n, k, s, local_seed(seed, rank)), c) for n, k, s, c, _ in LOCAL]
        refs.append(single_process_masks(shared + local))
    return refs
