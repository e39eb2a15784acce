"""The sparsity state inside a ``torch.distributed.checkpoint`` (DCP) checkpoint, sharded like the model.

:func:`dcp_state` wraps a sparsifier (and its scheduler) as a DCP ``Stateful`` that goes in the
same ``dcp.save``/``dcp.load`` state dict as the model and the optimizer::

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "sparsity": distsparse.dcp_state(sparsifier, scheduler)}
    dcp.save(state, checkpoint_id=folder)          # or storage_writer=HuggingFaceStorageWriter(
    dcp.load(state, checkpoint_id=folder)          #      folder, save_distributed=True)

DCP's planner decides what each rank writes and reads; this module only says what the state is.
Every entry is a tensor, nothing is pickled (``<key>`` is relative to the Stateful's key):

* ``state`` — ``uint8``, :data:`STATE_BYTES` long: the JSON text of the shared facts, zero padded
  (same on every rank, so DCP writes it once)::

      {"format": "distsparse.dcp", "format_version": 1,
       "sparsifier": {"class": "DataNormSparsifier", "format_version": 1, "args": {...},
                      "defaults": {...}, "step_count": 12},
       "world_size": 4,
       "groups": {"emb.weight": {"layout": "rows", "replicated": true, "config": {...},
                                 "shape": [1000, 64], "global_zeros": 32000},
                  "batch": {"layout": "local", "replicated": false, "config": {...}}},
       "scheduler": {...BaseDataScheduler.state_dict()...} or null}

* ``rows/<group>`` — replicated and FSDP2/HSDP groups: the mask packed *per dim-0 row* (one bit
  per element, most significant first, each row zero padded to whole bytes), ``uint8`` of shape
  ``(shape[0], ceil(numel / shape[0] / 8))``. A replicated group's is a plain tensor (DCP writes
  it once); a sharded group's is a DTensor with the data's mesh and placements (``Shard(0)``,
  ``(Replicate(), Shard(0))``), each rank holding its own rows. So a mask saved on FSDP2 at one
  world size loads on another, on DDP-style replicated groups or in one process, and back:
  DCP's planner reads each rank's rows from whatever ranks wrote them.
* ``rects/<group>`` — tables sharded in rectangles (TorchRec): a ``ShardedTensor`` of ``uint8``
  0/1 (byte per element: rectangles need not start on a byte boundary) with the table's shards;
  another plan's shards read their rectangles from it.
* ``local/<rank>/<group>`` — a *local* group's mask on that rank, packed flat (``pack_bits``).

Loading validates as :func:`~distsparse.load_checkpoint` does: DCP reads into fresh buffers
(this rank's rows only), then every rank checks the header, the sparsifier's own validation
(class, arguments, configs, scopes, ``strict``), the scheduler state and the number of pruned
elements of every sharded group (one all-reduce); if any rank finds a problem every rank
raises :class:`~distsparse.CheckpointError` naming it and nothing changes.

Limitations:
    * DCP sizes every buffer from the live objects before it reads a byte, so keys and shapes
      come from the groups added *now*: add every group (with its layout) before ``dcp.load``.
      A group missing from the checkpoint, or one of another shape, fails inside ``dcp.load``
      with DCP's own ``CheckpointException`` (naming ``<key>.rows/<group>``) on every rank,
      before anything changes. A group in the checkpoint that is not added raises
      :class:`~distsparse.CheckpointError`.
    * Replicated/FSDP2 groups and TorchRec tables use different keys: a TorchRec table loads
      only into a TorchRec table (any plan, any world size). Use the single-file checkpoint
      (:func:`~distsparse.save_checkpoint`) to move masks between the two.
    * Local groups load only at the saved world size with the saved per-rank shapes.
    * ``HuggingFaceStorageWriter`` needs ``save_distributed=True``: with the default every
      rank writes the same file name and a sharded load comes back wrong. ``state_dict()``
      refuses that writer when it is called from ``dcp.save``; a load also checks the pruned
      counts, which catches such a file.
    * The JSON header holds at most :data:`STATE_BYTES` bytes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import CheckpointError, _check_scheduler, _scheduler_probe
from .distributed.comm import RemoteError, mark_raised_everywhere
from .sparsifier import check_config_source

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import BaseDataScheduler
    from .sparsifier import BaseDataSparsifier

__all__ = ["dcp_state", "DcpSparsityState", "STATE_BYTES", "FORMAT", "FORMAT_VERSION"]

#: ``state["format"]`` of the JSON header.
FORMAT = "distsparse.dcp"
#: The header's ``format_version`` written (and the only one read) by this version.
FORMAT_VERSION = 1
#: Capacity of the ``state`` tensor. DCP sizes buffers before reading, so the header's size
#: cannot depend on what was saved; 1 MiB holds the configs of thousands of groups.
STATE_BYTES = 1 << 20


def dcp_state(sparsifier: BaseDataSparsifier, scheduler: BaseDataScheduler | None = None, *,
              config: str = "sparsifier") -> DcpSparsityState:
    """The sparsifier's masks, configs and step count (and the scheduler's state) as a DCP
    ``Stateful``: put it in the state dict given to ``dcp.save`` / ``dcp.load``.

    ``config`` decides a load whose mask geometry (block shape, ``zeros_per_block``) differs
    from the sparsifier's, as in :func:`~distsparse.load_checkpoint`: ``"sparsifier"`` (default)
    refuses it with a ``CheckpointError`` naming the group and both values, ``"checkpoint"``
    adopts the checkpoint's.

    Both of its methods are *collectives* (DCP calls them on every rank). See this module's
    docstring for the layout, the validation and the limitations.
    """
    _check_scheduler(sparsifier, scheduler)
    check_config_source(config)
    return DcpSparsityState(sparsifier, scheduler, config=config)


# -- mask layouts ----------------------------------------------------------------------------


def _row_view(mask: torch.Tensor) -> torch.Tensor:
    """The mask as ``(shape[0], rest)`` (a 0-d mask is one row of one element)."""
    if mask.dim() == 0:
        return mask.reshape(1, 1)
    return mask.reshape(mask.shape[0], math.prod(mask.shape[1:]))


def _row_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one packed dim-0 row of a mask of ``shape``."""
    return (math.prod(shape[1:]) + 7) // 8 if shape else 1


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """``uint8 (shape[0], ceil(rest / 8))``: each dim-0 row bit-packed on its own (most
    significant bit first, like :func:`~distsparse.masks.pack_bits`), so dim-0 shards of the
    mask are dim-0 shards of the packed tensor. On the mask's device."""
    rows = _row_view(mask.detach()).to("cpu", torch.bool)
    packed = torch.from_numpy(np.packbits(rows.numpy(), axis=1)) if rows.shape[1] else \
        torch.zeros((rows.shape[0], 0), dtype=torch.uint8)
    return packed.to(mask.device)


def unpack_rows(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: a ``bool`` tensor of ``shape`` (on CPU)."""
    rest = math.prod(shape[1:]) if shape else 1
    bits = np.unpackbits(packed.detach().to("cpu").contiguous().numpy(), axis=1, count=rest)
    return torch.from_numpy(bits).view(torch.bool).reshape(shape)


def _refuse_shared_file_writer() -> None:
    """Raise when called from ``dcp.save`` with a ``HuggingFaceStorageWriter`` whose
    ``save_distributed`` is False (every rank would write the same file). Every rank sees the
    same writer type and flag, so every rank raises alike."""
    from torch.distributed.checkpoint import state_dict_saver

    saver = state_dict_saver.__file__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == saver and "storage_writer" in frame.f_code.co_varnames:
            writer = frame.f_locals.get("storage_writer")
            if getattr(writer, "save_distributed", True) is False and \
                    type(writer).__name__ == "HuggingFaceStorageWriter":
                raise mark_raised_everywhere(ValueError(
                    "distsparse.dcp_state: HuggingFaceStorageWriter(save_distributed=False) makes every rank write "
                    "the same safetensors file name, and a sharded load then comes back wrong; pass "
                    "HuggingFaceStorageWriter(path, save_distributed=True)"))
            return
        frame = frame.f_back


# -- the Stateful ----------------------------------------------------------------------------


class DcpSparsityState:
    """A sparsifier (and scheduler) as a DCP ``Stateful``; build it with :func:`dcp_state`.

    ``Stateful`` is a runtime-checkable protocol (``state_dict`` + ``load_state_dict``): this
    class is one without importing ``torch.distributed.checkpoint``, whose import changes the
    process's warning filters (importing distsparse must not).

    ``state_dict()`` returns fresh tensors (this rank's packed rows, never a whole sharded
    mask) that DCP writes or fills; ``load_state_dict()`` validates what DCP read on every
    rank, then commits. Neither keeps references between calls.
    """

    def __init__(self, sparsifier: BaseDataSparsifier, scheduler: BaseDataScheduler | None = None, *,
                 config: str = "sparsifier") -> None:
        self.sparsifier = sparsifier
        self.scheduler = scheduler
        self.config = config

    # -- save side (and the buffers a load fills) ---------------------------------------
    def _header(self, sd: dict[str, Any]) -> dict[str, Any]:
        sp = self.sparsifier
        groups: dict[str, Any] = {}
        for name in sorted(sp._groups):
            group = sp._groups[name]
            entry = sd["groups"][name]
            layout = "rects" if group.rects is not None else "rows" if group.replicated else "local"
            info: dict[str, Any] = {"layout": layout, "replicated": bool(entry["replicated"]),
                                    "config": entry["config"]}
            if layout != "local":
                info["shape"] = [int(s) for s in entry["shape"]]
                info["global_zeros"] = None  # filled in by state_dict() (one all-reduce)
            groups[name] = info
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "sparsifier": {"class": sd["sparsifier"], "format_version": sd["format_version"],
                           "args": sd["sparsifier_args"], "defaults": sd["defaults"],
                           "step_count": int(sd["step_count"])},
            "world_size": sp.world_size,
            "groups": groups,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"state": uint8 header, "rows/<g>": ..., "rects/<g>": ..., "local/<rank>/<g>": ...}``
        (see the module docstring). *Collective*: checks that the ranks share the header."""
        _refuse_shared_file_writer()
        sp = self.sparsifier
        if sp._pending:
            raise ValueError(f"groups {sorted(sp._pending)} were restored but not added again; add them "
                             "before saving or loading a DCP checkpoint (DCP needs every group's layout)")
        sd = _live_state(sp)
        header = self._header(sd)
        comm = sp.comm
        description = {f"group {n}": g for n, g in header["groups"].items()}
        description["<sparsifier>"] = {k: v for k, v in header.items() if k != "groups"}
        with comm.operation("dcp_state.state_dict", description):
            self._fill_zeros(header, sd)
            text = json.dumps(header, sort_keys=True).encode()
            if len(text) > STATE_BYTES:
                raise mark_raised_everywhere(ValueError(
                    f"distsparse.dcp_state: the JSON state is {len(text)} bytes, over the {STATE_BYTES}-byte "
                    "header of a DCP checkpoint (too many groups or large configs)"))
            out = {"state": torch.zeros(STATE_BYTES, dtype=torch.uint8)}
            out["state"][: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
            for name in sorted(sp._groups):
                out.update(self._mask_entry(name, sd["masks"][name]))
            comm.finish("dcp_state.state_dict")
        return out

    def _fill_zeros(self, header: dict[str, Any], sd: dict[str, Any]) -> None:
        """Every non-local group's pruned elements over the whole tensor, into the header
        (sharded groups: one all-reduce of the rows each rank contributes); a load checks
        what it read against them and ``sparsity()`` reports them."""
        sp = self.sparsifier
        distributed = [n for n in sorted(sp._groups) if sp._groups[n].distributed_rows]
        local = torch.tensor([_own_zeros(sp._groups[n], sd["masks"][n]) for n in distributed], dtype=torch.int64)
        if distributed:
            local = sp.comm.all_reduce_sum(local, "all_reduce (dcp_state pruned counts)")
        for name, zeros in zip(distributed, local.tolist()):
            header["groups"][name]["global_zeros"] = int(zeros)
        for name, info in header["groups"].items():
            if info["layout"] != "local" and name not in distributed:
                info["global_zeros"] = _zeros(sd["masks"][name])

    def _mask_entry(self, name: str, mask: torch.Tensor) -> dict[str, Any]:
        sp = self.sparsifier
        group = sp._groups[name]
        if group.rects is not None:
            return {f"rects/{name}": self._rects_tensor(name, mask)}
        if not group.replicated:
            from .masks import pack_bits

            return {f"local/{sp.rank}/{name}": pack_bits(mask).cpu()}
        packed = pack_rows(mask)
        if group.layout is None:
            return {f"rows/{name}": packed}
        from torch.distributed.tensor import DTensor

        data = group.data
        shape = (int(data.shape[0]) if data.dim() else 1, _row_bytes(tuple(data.shape)))
        return {f"rows/{name}": DTensor.from_local(packed, data.device_mesh, data.placements, run_check=False,
                                                   shape=torch.Size(shape), stride=(shape[1], 1))}

    def _rects_tensor(self, name: str, flat: torch.Tensor) -> Any:
        """This rank's shards of a TorchRec table's mask as a ``ShardedTensor`` of uint8 0/1."""
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

        sp = self.sparsifier
        group = sp._groups[name]
        views = group.shard_masks(flat)
        device = group.rects.device
        shards = [Shard(tensor=m.to(torch.uint8).contiguous(),
                        metadata=ShardMetadata(shard_offsets=[r, c], shard_sizes=[int(m.shape[0]), int(m.shape[1])],
                                               placement=f"rank:{sp.comm.rank}/{device}"))
                  for ((r, c), _), m in zip(group.rects.local_shards(), views)]
        rows, cols = (int(s) for s in group.rects.shape)
        return init_from_local_shards(shards, rows, cols, process_group=sp.comm.group)

    # -- load side --------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Validate what DCP read on every rank, then commit (masks, configs, step count,
        scheduler). *Collective*. Raises :class:`~distsparse.CheckpointError` on every rank,
        with nothing changed, when any rank finds a problem."""
        sp, scheduler = self.sparsifier, self.scheduler
        comm = sp.comm
        where = "DCP checkpoint"
        with comm.operation("dcp_state.load_state_dict"):
            error: Exception | None = None
            plan = None
            try:
                plan = self._prepare(state_dict, where)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                error = exc
            try:
                comm.raise_if_any_failed([str(error)] if error else [], "dcp_state.load_state_dict",
                                         local_error=error)
            except RemoteError as exc:
                raise mark_raised_everywhere(
                    CheckpointError(f"{where}: another rank refused it, nothing was loaded:\n{exc}")) from None
            assert plan is not None
            sd, scheduler_state, counts = plan
            self._check_counts(sd, counts, where)
            comm.finish("dcp_state.load_state_dict")
        snapshot = scheduler.state_dict() if scheduler is not None else None
        if scheduler is not None:
            scheduler.load_state_dict(scheduler_state)
        try:
            sp.load_state_dict(sd, strict=True, config=self.config)
        except BaseException:
            if scheduler is not None:
                scheduler.load_state_dict(snapshot)
            raise

    def _prepare(self, loaded: Mapping[str, Any], where: str):
        """Everything local: parse the header, build the sparsifier state (this rank's parts),
        validate it and the scheduler's. Changes nothing."""
        header = _parse_header(loaded.get("state"), where)
        sp = self.sparsifier
        live = _live_state(sp)
        extra = sorted(set(header["groups"]) - set(sp._groups))
        if extra:
            raise CheckpointError(f"{where}: groups {extra} are in the checkpoint but not added to the sparsifier; "
                                  "add every group before dcp.load (DCP needs each group's layout)")
        groups: dict[str, Any] = {}
        masks: dict[str, torch.Tensor] = {}
        counts: dict[str, tuple[int, int | None]] = {}  # name: (this rank's pruned elements, saved total)
        same_world = header["world_size"] == sp.world_size
        for name in sorted(header["groups"]):
            saved = header["groups"][name]
            group = sp._groups[name]
            entry = dict(live["groups"][name])
            entry["config"] = saved["config"]
            entry["replicated"] = saved["replicated"]
            mine = "rects" if group.rects is not None else "rows" if group.replicated else "local"
            if saved["layout"] != mine:
                raise CheckpointError(f"{where}: group {name!r} was saved as a {saved['layout']!r} group and is "
                                      f"a {mine!r} group here (TorchRec tables load only into TorchRec tables)")
            if mine != "local" and list(saved["shape"]) != [int(s) for s in group.data.shape]:
                raise CheckpointError(f"{where}: group {name!r} has shape {saved['shape']} in the checkpoint and "
                                      f"{list(group.data.shape)} here")
            if mine == "rects":
                mask = _rects_local(loaded.get(f"rects/{name}"), name, where)
                entry["rects"] = dict(entry["rects"], global_zeros=saved["global_zeros"])
                counts[name] = (_zeros(mask), saved["global_zeros"])
            elif mine == "rows":
                mask = self._rows_local(loaded.get(f"rows/{name}"), name, where)
                if group.sharded:
                    entry["sharded"] = dict(entry["sharded"], global_zeros=saved["global_zeros"])
                    counts[name] = (_own_zeros(group, mask), saved["global_zeros"])
                elif saved.get("global_zeros") is not None and _zeros(mask) != saved["global_zeros"]:
                    raise CheckpointError(f"{where}: group {name!r}: the mask read prunes {_zeros(mask)} elements, "
                                          f"{saved['global_zeros']} were saved (damaged checkpoint, or a file several "
                                          "ranks wrote under one name)")
            else:
                mask = None
                if same_world:
                    from .masks import unpack_bits

                    packed = loaded.get(f"local/{sp.rank}/{name}")
                    mask = unpack_bits(packed.cpu(), tuple(group.mask.shape)) if packed is not None else None
            if mask is not None:
                masks[name] = mask
            groups[name] = entry
        sp_info = header["sparsifier"]
        sd = {"format_version": sp_info["format_version"], "sparsifier": sp_info["class"],
              "sparsifier_args": sp_info["args"], "defaults": sp_info["defaults"], "groups": groups,
              "masks": masks, "world_size": header["world_size"], "rank": sp.rank,
              "step_count": sp_info["step_count"]}
        try:
            sp._validate_state(sd, True, self.config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        return sd, self._scheduler_state(header, where), counts

    def _rows_local(self, packed: Any, name: str, where: str) -> torch.Tensor:
        """This rank's bool rows of a ``rows/<name>`` entry (the local part of a DTensor)."""
        group = self.sparsifier._groups[name]
        if packed is None:
            raise CheckpointError(f"{where}: group {name!r}: the checkpoint holds no mask for it")
        local = packed.to_local() if hasattr(packed, "to_local") else packed
        shape = tuple(group.local.shape) if group.layout is not None else tuple(group.data.shape)
        return unpack_rows(local, shape)

    def _scheduler_state(self, header: dict[str, Any], where: str) -> dict[str, Any] | None:
        """The saved scheduler state, tried on a copy of the scheduler (nothing changes)."""
        scheduler = self.scheduler
        if scheduler is None:
            return None
        state = header["scheduler"]
        if state is None:
            raise CheckpointError(f"{where}: the checkpoint holds no scheduler state (it was saved without one); "
                                  "load it with dcp_state(sparsifier) alone")
        _scheduler_probe(scheduler, state, where)
        return state

    def _check_counts(self, sd: dict[str, Any], counts: dict[str, tuple[int, int | None]], where: str) -> None:
        """One all-reduce: the pruned elements loaded over all ranks equal what was saved for
        every sharded group (a file written by several ranks under one name fails here)."""
        names = sorted(counts)
        if not names:
            return
        local = torch.tensor([counts[n][0] for n in names], dtype=torch.int64)
        total = self.sparsifier.comm.all_reduce_sum(local, "all_reduce (dcp_state pruned counts)")
        wrong = [f"group {n!r}: {int(t)} pruned elements loaded over all ranks, {counts[n][1]} saved"
                 for n, t in zip(names, total.tolist()) if counts[n][1] is not None and int(t) != counts[n][1]]
        if wrong:
            raise mark_raised_everywhere(CheckpointError(
                f"{where}: the masks read do not match the saved counts (a file several ranks wrote under one "
                "name, e.g. HuggingFaceStorageWriter without save_distributed=True?): " + "; ".join(wrong)))


def _live_state(sp: BaseDataSparsifier) -> dict[str, Any]:
    """What ``sp.state_dict()`` returns for the groups added, with the live mask tensors instead
    of copies (read here, never changed): a save or load then costs no copy of any mask."""
    from .sparsifier import STATE_FORMAT_VERSION, _to_json_config

    groups: dict[str, Any] = {}
    for name in sorted(sp._groups):
        group = sp._groups[name]
        entry: dict[str, Any] = {"config": _to_json_config(sp.data_groups[name]),
                                 "shape": list(group.data.shape), "replicated": group.replicated}
        if group.sharded:
            lay = group.layout
            entry["sharded"] = {"dim0_offset": lay.dim0_offset, "local_shape": list(lay.local_shape),
                                "contributes": lay.contributes, **lay.describe(), "global_zeros": group.global_zeros}
        if group.rects is not None:
            entry["rects"] = {"shards": [[r, c, int(t.shape[0]), int(t.shape[1])]
                                         for (r, c), t in group.rects.local_shards()],
                              "global_zeros": group.global_zeros}
        groups[name] = entry
    return {"format_version": STATE_FORMAT_VERSION, "sparsifier": type(sp).__name__,
            "sparsifier_args": sp._sparsifier_args(), "defaults": _to_json_config(sp.defaults), "groups": groups,
            "masks": {n: sp._groups[n].mask for n in groups}, "world_size": sp.world_size, "rank": sp.rank,
            "step_count": sp.step_count}


def _zeros(mask: torch.Tensor) -> int:
    return int(mask.numel() - int(mask.count_nonzero()))


def _own_zeros(group: Any, mask: torch.Tensor) -> int:
    """Pruned elements this rank counts once for a sharded group: its rectangles, or its rows
    when it is its shard's contributing replica (HSDP replicas hold the same rows)."""
    if group.rects is not None or group.layout.contributes:
        return _zeros(mask)
    return 0


def _parse_header(tensor: Any, where: str) -> dict[str, Any]:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError(f"{where}: the sparsity 'state' entry is missing or not a 1-D uint8 tensor")
    raw = tensor.cpu().numpy().tobytes().rstrip(b"\0")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the sparsity state is not valid JSON ({exc}; damaged checkpoint)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{where}: the sparsity state is not a {FORMAT!r} header")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: sparsity state format_version {header.get('format_version')!r} is not "
                              f"supported; this distsparse reads {FORMAT_VERSION}")
    for key in ("sparsifier", "world_size", "groups", "scheduler"):
        if key not in header:
            raise CheckpointError(f"{where}: the sparsity state lacks {key!r} (damaged checkpoint)")
    return header


def _rects_local(value: Any, name: str, where: str) -> torch.Tensor:
    """This rank's shards of a ``rects/<name>`` ShardedTensor, flat, one after the other (the
    order of the group's shards: the ShardedTensor was built from them)."""
    if value is None or not hasattr(value, "local_shards"):
        raise CheckpointError(f"{where}: group {name!r}: the checkpoint holds no sharded table mask for it")
    parts = [s.tensor.reshape(-1).to("cpu", torch.bool) for s in value.local_shards()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
