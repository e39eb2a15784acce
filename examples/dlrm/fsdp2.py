"""FSDP2 mode (`--fsdp2`): the tables (and the MLPs) sharded by rows with PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`) instead of replicated by DDP, and its checkpoint files.

Each table module is wrapped itself, then the root (a root-only wrap leaves the parameters
unsharded after a `no_grad` forward, e.g. the evaluation, until `reshard()`), and the dense
baseline is sharded the same way. Each table weight is then a `DTensor` (`Shard(0)`), which
`sp.add_data(name, table)` takes as a *sharded* group: every rank computes the mask of its own
rows and only the selection's counts travel (never the data or a mask).

* Who calls `fully_shard`: accelerate's FSDP2 plugin when it is on
  (`accelerator.distributed_type == FSDP`, i.e. `accelerate launch --config_file
  launch/fsdp2_gpu.yaml`: `fsdp_version: 2`, each `Embedding`/`EmbeddingBag` wrapped by
  `fsdp_transformer_layer_cls_to_wrap`; accelerate's `prepare()` shards); otherwise the job,
  on a 1-D device mesh over all ranks (`torchrun`, or `accelerate launch` on CPU, where
  accelerate 1.15 has no FSDP and its plugin falls back to DDP). `python
  examples/dlrm/train.py --fsdp2` (no launcher) opens a 1-rank process group itself. Either
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
  the whole gathered weights; gradients halved, then summed over 2 ranks; elementwise Adam),
  so at world 2 on gloo (tests/test_example_fsdp2.py) and at world 1 on one GPU (checked on an
  H100) the FSDP2 mode ends bit-identical to the DDP mode: weights, masks, validation figures.
  It is slower on CPU (all-gathers and reduce-scatters per table).
* Resuming a DDP folder in the FSDP2 mode passes the full state through rank 0's CPU memory
  once (that folder holds full tensors). The summary at the end gathers the tables and masks
  (`full_tensor()`) for its figures, digests and the export (`distsparse.save_sparse_data`
  does not take DTensor groups: the masked tables are gathered and exported by rank 0 through
  a one-rank sparsifier).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import distsparse
from distsparse.integrations.accelerate import default_filename

from dlrm.config import JobError
from dlrm.data import TABLES
from dlrm.run_folder import _one_line, all_ranks


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


def shard_model(model: nn.Module, mesh) -> None:
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

