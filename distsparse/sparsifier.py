"""BaseDataSparsifier: named data groups, their masks and configs, the rank-aware step().

A *group* is a name, the user's tensor (held by reference, never copied), a ``bool`` mask
of the same shape on the same device, a config dict and a scope:

* *replicated* — the same tensor on every rank (parameters, embedding tables under DDP).
  Exactly one rank owns it and computes its mask; every rank receives it bit-packed.
* *local* — per-rank data (input batches): every rank computes its own mask.
* *sharded* — a ``DTensor`` whose rows are spread over the ranks (FSDP2 ``Shard(0)``, HSDP):
  each rank scores the blocks starting in its rows, the exact global selection picks the
  k lowest, each rank keeps its own mask rows (see :mod:`distsparse.distributed.sharding`). A
  ``Replicate()`` DTensor is an ordinary replicated group.
* *rectangle-sharded* — a table whose ranks hold rectangles of it (TorchRec's row-, column-,
  table- and table-row-wise shards, as a ``ShardedTensor``, a ``DTensor`` over a
  ``LocalShardsWrapper`` or a :class:`~distsparse.distributed.rects.RectShards`): the same protocol
  over rectangles, with row and column halos (see :mod:`distsparse.distributed.rects`).

Subclasses implement :meth:`update_mask` (one group's mask from its data and config) and
may validate configs and data. This module keeps the groups and runs ``step()``; the part of
the step that several ranks compute together (split, sharded and rectangle groups, the mask
exchange) is :mod:`distsparse.distributed.step`. All communication goes through :class:`~distsparse.distributed.comm.Comm`,
which is purely local when ``torch.distributed`` is not initialized.
"""

from __future__ import annotations

import abc
import copy
import json
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import step as distributed_step
from .distributed.comm import Comm
from .masks import as_matrix, pack_bits, unpack_bits
from .distributed.planner import DEFAULT_MIN_SPLIT_ELEMENTS, GroupSpec, Plan
from .distributed.planner import plan as plan_step
from .kernels.fused_cpu import available as fused_cpu_available
from .distributed.rects import RectLayout, RectShards, as_rect_shards, flat_views, layout_from_gathered
from .distributed.selection import DIGIT_BITS_CHOICES
from .distributed.sharding import ShardLayout, is_dtensor, layout_of

__all__ = ["BaseDataSparsifier", "STATE_FORMAT_VERSION", "pack_mask", "unpack_mask", "check_scheduler",
           "local_pieces", "is_dtensor"]

#: Version of the ``state_dict()`` layout (also written into checkpoints).
STATE_FORMAT_VERSION = 1

_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class _Group:
    data: torch.Tensor  # the user's own tensor (an embedding's .weight), shared storage
    mask: torch.Tensor  # bool, the local data's shape and device; True keeps
    replicated: bool
    #: DTensor groups: where the rows live (None for plain tensors).
    layout: ShardLayout | None = None
    _mask_dtensor: Any = None  # get_mask's DTensor (or RectShards), built once over ``mask``
    #: Rectangle-sharded groups (TorchRec): this rank's shards; ``mask`` is then 1-D, every
    #: shard's mask one after the other (see :meth:`shard_masks`).
    rects: RectShards | None = None
    #: Their global layout, learnt at the first step (None until then).
    rect_layout: RectLayout | None = None
    #: Sharded and rectangle-sharded groups: pruned elements over all ranks, recorded when a
    #: step or a load commits (``sparsity()`` needs no collective).
    global_zeros: int | None = None

    @property
    def local(self) -> torch.Tensor:
        """The tensor this rank computes on: the data, or a DTensor's local part (a view of
        the real storage; FSDP2 keeps it across steps)."""
        return self.data.to_local() if self.layout is not None else self.data

    @property
    def sharded(self) -> bool:
        return self.layout is not None and self.layout.sharded

    @property
    def distributed_rows(self) -> bool:
        """Whether this rank holds only part of the group (FSDP2 rows or TorchRec rectangles)."""
        return self.sharded or self.rects is not None

    def shard_masks(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """A rectangle-sharded group's per-shard 2-D masks: views into ``flat`` (default: the mask)."""
        assert self.rects is not None
        return flat_views(self.mask if flat is None else flat, [tuple(t.shape) for t in self.rects.tensors])

    def as_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` (this rank's part, the local shape) as a DTensor of the data's layout;
        ``local`` itself for plain groups. No copy: the DTensor holds ``local``."""
        if self.layout is None:
            return local
        from torch.distributed.tensor import DTensor

        data = self.data
        return DTensor.from_local(local, data.device_mesh, data.placements, run_check=False,
                                  shape=data.shape, stride=data.stride())


@dataclass
class _PendingGroup:
    """A group restored from a state dict before ``add_data`` added it (an input batch
    added inside the training loop). Its config and mask apply when it is added."""

    config: dict[str, Any]
    shape: tuple[int, ...]
    replicated: bool
    mask: torch.Tensor | None  # None: start fresh (local mask from another world size)


def _memory_spans(data: Any) -> list[tuple[str, int, int]]:
    """(device, first byte, end byte) of the memory each local tensor of a group's data spans:
    a DTensor's local part, each rectangle shard, or the tensor. Tensors without memory
    (meta, fake, empty) span nothing."""
    tensors = list(data.tensors) if isinstance(data, RectShards) else \
        [data.to_local()] if is_dtensor(data) else [data]
    spans = []
    for t in tensors:
        if t.numel() == 0 or t.device.type == "meta":
            continue
        try:
            start = t.data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (fake / functional tensors)
            continue
        if start == 0:
            continue
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
        spans.append((str(t.device), start, start + extent * t.element_size()))
    return spans


def _shape_text(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _layout_text(layout: ShardLayout | None) -> str:
    if layout is None:
        return "a plain tensor"
    return f"placements {', '.join(layout.placements)} on mesh {tuple(layout.mesh_shape)}, rows {layout.row_range}"


def _rows_of(mask: torch.Tensor, layout: ShardLayout | None, rects: RectShards | None = None) -> torch.Tensor:
    """This rank's part of a whole mask (``mask`` itself for an unsharded group, or when it
    already has the local shape: a state_dict saved by a rank of the same layout). For a
    rectangle-sharded group: its shards' parts, flattened one after the other."""
    if rects is not None:
        if tuple(mask.shape) != tuple(rects.shape):  # already this rank's flat parts
            return mask
        parts = [mask[r : r + t.shape[0], c : c + t.shape[1]].reshape(-1) for (r, c), t in rects.local_shards()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=mask.dtype, device=mask.device)
    if layout is None or not layout.sharded or tuple(mask.shape) == layout.local_shape:
        return mask
    start = layout.dim0_offset
    return mask.narrow(0, start, layout.local_shape[0])


def _zeros(mask: torch.Tensor) -> int:
    return int(mask.numel() - int(mask.count_nonzero()))


def _apply(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``data`` with pruned elements zeroed; differentiable w.r.t. ``data``.

    ``torch.where`` rather than ``data * mask``: multiplying by a bool mask materialises a
    float copy of the mask first (2× the data in peak memory instead of 1×).
    """
    return torch.where(mask, data, 0.0)


def _group_error(name: str, exc: BaseException) -> BaseException:
    """``exc`` in words that name the group, as the same kind of error.

    ``ValueError``/``TypeError`` (and their subclasses) become a plain ``ValueError``/
    ``TypeError``, anything else a ``RuntimeError``, each chained to the original
    (``__cause__``): rebuilding ``type(exc)(message)`` fails for exception types whose
    constructors take other arguments.
    """
    text = str(exc)
    if repr(name) in text:
        message = text
    elif type(exc) in (ValueError, TypeError):
        message = f"group {name!r}: {text}"
    else:
        message = f"group {name!r}: {type(exc).__name__}: {text}"
    kind = ValueError if isinstance(exc, ValueError) else TypeError if isinstance(exc, TypeError) else RuntimeError
    wrapped = kind(message)
    wrapped.__cause__ = exc
    return wrapped


#: Values of the ``config`` keyword of ``load_state_dict`` / ``load_checkpoint``.
CONFIG_SOURCES = ("sparsifier", "checkpoint")


def check_config_source(config: Any) -> None:
    """``config`` names whose geometry wins on load: one of :data:`CONFIG_SOURCES`."""
    if config not in CONFIG_SOURCES:
        raise ValueError(f"config must be one of {CONFIG_SOURCES} (whose sparse_block_shape, zeros_per_block... "
                         f"win when a state's differ), got {config!r}")


def _to_json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config as JSON-able values (tuples become lists); raises TypeError otherwise."""
    out = json.loads(json.dumps(dict(config)))
    return out


class BaseDataSparsifier(abc.ABC):
    r"""Base class of data sparsifiers: holds named data, their masks and configs.

    Args:
        data_list: optional ``[(name, data), ...]`` added with the default config.
        process_group: keyword-only; the group masks are shared over. ``None`` uses the
            default group when ``torch.distributed`` is initialized, else runs locally.
        **defaults: the default config of every group; ``add_data(..., **config)``
            overrides it per group.

    Subclasses implement :meth:`update_mask`. ``step()`` is a *collective* when
    distributed: every rank must call it, in the same order as its other collectives.

    Limitations:
        Tensor subclasses other than ``DTensor`` are refused, and so are DTensors with
        placements other than ``Shard(0)`` (1-D mesh), ``(Replicate(), Shard(0))`` (2-D
        HSDP mesh) and ``Replicate()`` (see :mod:`distsparse.distributed.sharding`).
    """

    def __init__(self, data_list: Iterable[tuple[str, Any]] | None = None, *,
                 process_group: Any | None = None, **defaults: Any) -> None:
        self.defaults: dict[str, Any] = self._canonical_config("<defaults>", dict(defaults))
        self.data_groups: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, _Group] = {}
        self._pending: dict[str, _PendingGroup] = {}
        #: ``{name: {"mask": the group's mask, ...}}`` as in torch.ao: subclasses may keep
        #: per-group scratch values here. Held in memory only (checkpoints save masks and
        #: configs, never this dict's other entries).
        self.state: defaultdict[str, dict[str, Any]] = defaultdict(dict)
        self._comm = Comm(process_group)
        #: Number of ``step()`` calls so far (the scheduler reads it for its order warning).
        self.step_count = 0
        #: Figures of the last ``step()``: seconds computing and communicating (waiting for
        #: the slowest rank included), bytes sent and received by this rank (all-gathers and
        #: all-reduces; ``selection_bytes``: the part that the selection's counts took).
        self.last_step_stats: dict[str, float] = {}
        #: When replicated groups are split into row ranges computed by several ranks (see
        #: :meth:`assignment`). ``None`` (the default): only where the cost model
        #: (:class:`~distsparse.distributed.planner.SplitCosts`) predicts the busiest rank finishes sooner;
        #: an int ``n``: the older size rule, any group of at least ``n`` elements when balance
        #: needs it. Must be equal on every rank.
        self.min_split_elements = DEFAULT_MIN_SPLIT_ELEMENTS
        self._selection_digit_bits: int | None = None
        self._plan_key: tuple | None = None
        self._plan_cache: Plan | None = None
        for name, data in data_list or ():
            self.add_data(name, data)

    # -- subclass hooks ---------------------------------------------------------------
    @abc.abstractmethod
    def update_mask(self, name: str, data: torch.Tensor, **config: Any) -> torch.Tensor | None:
        """Return the new mask of group ``name`` (bool, ``data``'s shape and device).

        Called under ``torch.no_grad()`` on the rank that computes the group. Returning
        ``None`` means the subclass updated ``self.get_mask(name)`` in place (torch.ao style).
        Raise ``ValueError`` for bad data; the step then changes no mask on any rank.
        """

    def _canonical_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """Validate a group's config and return it normalised. Override to check keys."""
        try:
            _to_json_config(config)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"group {name!r}: config must hold JSON-able values ({exc})") from None
        return config

    def _check_data(self, name: str, data: torch.Tensor) -> None:
        """Refuse data this sparsifier cannot handle. Override to add checks."""

    def _sparsifier_args(self) -> dict[str, Any]:
        """Constructor arguments outside the config that change masks (e.g. ``norm``):
        saved in the state and checked on load, so an L2 state never loads into L1."""
        return {}

    # -- groups -----------------------------------------------------------------------
    @staticmethod
    def _extract_tensor(name: str, data: Any) -> tuple[torch.Tensor, bool]:
        shards = as_rect_shards(data)
        if shards is not None:  # TorchRec tables: a ShardedTensor or a DTensor over local shards
            return shards, True  # type: ignore[return-value]
        if isinstance(data, _EMBEDDING_TYPES):
            return BaseDataSparsifier._extract_tensor(name, data.weight)[0], True
        if isinstance(data, nn.Module):
            raise TypeError(
                f"group {name!r}: unsupported data type {type(data).__name__}; pass a tensor, "
                "nn.Parameter, nn.Embedding or nn.EmbeddingBag (for other modules, add their "
                "weight parameters; for TorchRec collections and models use "
                "distsparse.integrations.torchrec.add_torchrec_tables)"
            )
        if isinstance(data, torch.Tensor):
            if is_dtensor(data):  # FSDP2 parameters and other DTensors: layout checked in add_data
                return data, True
            if type(data) not in (torch.Tensor, nn.Parameter):
                # DTensor (FSDP2), nn.Parameter(DTensor), UninitializedParameter, other subclasses.
                raise TypeError(
                    f"group {name!r}: tensor subclass {type(data).__module__}.{type(data).__name__} is not "
                    "supported; pass a plain torch.Tensor or nn.Parameter holding the whole data, or a "
                    "DTensor (FSDP2 parameter) with a supported placement"
                )
            return data, isinstance(data, nn.Parameter)
        raise TypeError(
            f"group {name!r}: unsupported data type {type(data).__name__}; expected torch.Tensor, "
            "nn.Parameter, nn.Embedding or nn.EmbeddingBag"
        )

    def add_data(self, name: str, data: Any, reuse_mask: bool = True,
                 replicated: bool | None = None, **config: Any) -> torch.Tensor:
        """Add (or replace) group ``name`` and return its data with the current mask applied.

        ``data`` is a tensor, ``nn.Parameter``, ``nn.Embedding`` or ``nn.EmbeddingBag``
        (its ``weight``); it is held by reference, never copied. Parameters and embeddings
        are *replicated* by default, plain tensors *local*; ``replicated=`` overrides.

        Re-adding an existing name replaces the data, keeps the group's config (updated by
        ``config``) and — with ``reuse_mask=True`` — its mask, which needs the same shape;
        a different shape raises ``ValueError`` and leaves the group untouched (pass
        ``reuse_mask=False`` to start the new data with a fresh mask). Re-adding every batch
        is the intended use and warns nothing.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"group name must be a non-empty string, got {name!r}")
        # A validation pass may add a batch under torch.inference_mode(): its mask must stay
        # a normal tensor, or every later step() fails updating it in place.
        with torch.inference_mode(False):
            return self._add_data(name, data, reuse_mask, replicated, config)

    def _add_data(self, name: str, data: Any, reuse_mask: bool, replicated: bool | None,
                  config: dict[str, Any]) -> torch.Tensor:
        tensor, default_replicated = self._extract_tensor(name, data)
        self._check_own_memory(name, tensor)
        if isinstance(tensor, RectShards):
            return self._add_rects(name, tensor, reuse_mask, replicated, config)
        layout = self._layout_of(name, tensor, replicated)
        local = tensor.to_local() if layout is not None else tensor
        self._check_data(name, local)
        old = self._groups.get(name)
        pending = self._pending.get(name)
        if old is not None:
            merged = self._canonical_config(name, {**self.data_groups[name], **config})
            scope = old.replicated if replicated is None else bool(replicated)
            if reuse_mask:
                if tuple(tensor.shape) != tuple(old.data.shape):
                    raise ValueError(
                        f"group {name!r}: new data has shape {_shape_text(tensor.shape)} but the "
                        f"mask to reuse has shape {_shape_text(old.data.shape)}; pass "
                        "reuse_mask=False to start this data with a fresh mask (e.g. a smaller "
                        "last batch), or use drop_last=True in the DataLoader"
                    )
                if (old.layout, layout) != (None, None) and (old.layout is None or layout is None or (
                        old.layout.describe(), old.layout.row_range) != (layout.describe(), layout.row_range)):
                    raise ValueError(
                        f"group {name!r}: new data has another layout ({_layout_text(layout)}) than the mask "
                        f"to reuse ({_layout_text(old.layout)}); pass reuse_mask=False")
                mask = old.mask if old.mask.device == local.device and not old.mask.is_inference() \
                    else old.mask.to(local.device).clone()
            else:
                mask = torch.ones(local.shape, dtype=torch.bool, device=local.device)
        elif pending is not None:
            merged = self._canonical_config(name, {**self.defaults, **pending.config, **config})
            scope = pending.replicated if replicated is None else bool(replicated)
            if tuple(tensor.shape) != pending.shape and not (pending.mask is None and not pending.replicated):
                raise ValueError(
                    f"group {name!r}: data has shape {_shape_text(tensor.shape)} but the loaded "
                    f"state holds this group with shape {_shape_text(pending.shape)}"
                )
            if scope != pending.replicated:
                raise ValueError(
                    f"group {name!r}: added as {'replicated' if scope else 'local'} but the loaded "
                    f"state holds it as {'replicated' if pending.replicated else 'local'}"
                )
            mask = (pending.mask.to(local.device) if pending.mask is not None
                    else torch.ones(local.shape, dtype=torch.bool, device=local.device))
            if layout is not None and layout.sharded:
                mask = _rows_of(mask, layout).clone()  # this rank's rows of the whole restored mask
        else:
            merged = self._canonical_config(name, {**self.defaults, **config})
            scope = default_replicated if replicated is None else bool(replicated)
            mask = torch.ones(local.shape, dtype=torch.bool, device=local.device)
        group = _Group(data=tensor, mask=mask, replicated=scope, layout=layout)
        if old is not None and mask is old.mask and layout is not None:
            group._mask_dtensor = old._mask_dtensor  # the same mask: get_mask stays the same object
        if group.sharded:  # the global count sparsity() reports
            group.global_zeros = (old.global_zeros if old is not None and mask is old.mask
                                  else _zeros(pending.mask) if old is None and pending is not None
                                  and pending.mask is not None else 0)
        masked = group.as_dtensor(_apply(local, mask))
        # Everything validated and built: commit.
        self._groups[name] = group
        self.state[name]["mask"] = mask
        self.data_groups[name] = merged
        self._pending.pop(name, None)
        return masked

    def _check_own_memory(self, name: str, data: Any) -> None:
        """One storage is one group: a second name for the same tensor, a view of it or any
        overlapping memory would be masked twice (the data ends at the higher level while
        ``sparsity()`` reports each group's own). Re-adding under the same name replaces."""
        spans = _memory_spans(data)
        if not spans:
            return
        for other, group in self._groups.items():
            if other == name:
                continue
            for device, start, end in _memory_spans(group.data):
                if any(d == device and s < end and start < e for d, s, e in spans):
                    raise ValueError(
                        f"group {name!r}: its data overlaps the memory of group {other!r} (the same tensor, "
                        "module or parameter, a view of it, or overlapping storage); one storage is one group: "
                        "add it once, or add a copy (.clone()) to mask a separate tensor")

    def _add_rects(self, name: str, shards: RectShards, reuse_mask: bool, replicated: bool | None,
                   config: dict[str, Any]) -> RectShards:
        """``add_data`` of a table sharded in rectangles (TorchRec): its mask is this rank's
        shards' masks, flat; the global layout is learnt at the first step (single process:
        now). Returns the shards with the current mask applied (a :class:`RectShards`)."""
        if replicated is False:
            raise ValueError(f"group {name!r}: a sharded table is shared by the ranks holding its shards; "
                             "replicated=False (per-rank data) does not apply to it")
        self._check_data(name, torch.empty(0, 0, dtype=shards.dtype))
        old = self._groups.get(name)
        pending = self._pending.get(name)
        local_shape = (shards.local_numel(),)
        device = shards.device
        rects = [[r, c, int(t.shape[0]), int(t.shape[1])] for (r, c), t in shards.local_shards()]
        zeros: int | None = 0
        layout = None
        if old is not None:
            merged = self._canonical_config(name, {**self.data_groups[name], **config})
            if not reuse_mask:
                mask = torch.ones(local_shape, dtype=torch.bool, device=device)
            else:
                old_rects = None if old.rects is None else [
                    [r, c, int(t.shape[0]), int(t.shape[1])] for (r, c), t in old.rects.local_shards()]
                if tuple(shards.shape) != tuple(old.data.shape) or old_rects != rects:
                    raise ValueError(
                        f"group {name!r}: new data (shape {_shape_text(shards.shape)}, local shards {rects}) has "
                        f"another shape or layout than the mask to reuse (shape {_shape_text(old.data.shape)}, "
                        f"{'local shards ' + str(old_rects) if old_rects is not None else _layout_text(old.layout)}); "
                        "pass reuse_mask=False")
                mask, zeros, layout = old.mask, old.global_zeros, old.rect_layout
        elif pending is not None:
            merged = self._canonical_config(name, {**self.defaults, **pending.config, **config})
            if not pending.replicated or tuple(shards.shape) != pending.shape:
                raise ValueError(
                    f"group {name!r}: data is a sharded table of shape {_shape_text(shards.shape)} but the loaded "
                    f"state holds this group as {'replicated' if pending.replicated else 'local'} with shape "
                    f"{_shape_text(pending.shape)}")
            assert pending.mask is not None
            zeros = _zeros(pending.mask)
            mask = _rows_of(pending.mask.to(device), None, shards).to(torch.bool).clone()
        else:
            merged = self._canonical_config(name, {**self.defaults, **config})
            mask = torch.ones(local_shape, dtype=torch.bool, device=device)
        if layout is None and not (self._comm.is_distributed and self._comm.world_size > 1):
            layout = layout_from_gathered(name, shards.shape, [rects], 0)  # one process holds every shard
        group = _Group(data=shards, mask=mask, replicated=True, rects=shards, rect_layout=layout,
                       global_zeros=zeros)
        if old is not None and mask is old.mask:
            group._mask_dtensor = old._mask_dtensor
        masked = shards.with_tensors([_apply(t, m) for t, m in zip(shards.tensors, group.shard_masks())])
        self._groups[name] = group
        self.state[name]["mask"] = mask
        self.data_groups[name] = merged
        self._pending.pop(name, None)
        return masked

    def _layout_of(self, name: str, tensor: torch.Tensor, replicated: bool | None) -> ShardLayout | None:
        """The layout of a DTensor group (None for a plain tensor); refuses unsupported
        placements (TypeError), meshes other than this sparsifier's ranks and local
        DTensor groups (ValueError)."""
        if not is_dtensor(tensor):
            return None
        if replicated is False:
            raise ValueError(f"group {name!r}: a DTensor group is shared by the ranks of its mesh; "
                             "replicated=False (per-rank data) does not apply to it")
        if not self._comm.is_distributed:
            raise ValueError(f"group {name!r}: a DTensor needs torch.distributed initialized (its mesh's ranks)")
        layout = layout_of(name, tensor, self._comm.global_ranks(), self._comm.rank)
        local_shape = tuple(tensor.to_local().shape)
        if local_shape != layout.local_shape:
            raise ValueError(f"group {name!r}: the DTensor's local part has shape {_shape_text(local_shape)}, "
                             f"its layout gives {_shape_text(layout.local_shape)}")
        return layout

    def _group(self, name: str) -> _Group:
        try:
            return self._groups[name]
        except KeyError:
            raise ValueError(
                f"data with name {name!r} does not exist; known groups: {sorted(self._groups)}"
            ) from None

    def get_data(self, name: str, return_original: bool = True) -> torch.Tensor:
        """The user's own tensor (``return_original=True``, shared storage) or ``data * mask``."""
        group = self._group(name)
        if group.rects is not None:
            if return_original:
                return group.rects.source if group.rects.source is not None else group.rects
            return group.rects.with_tensors([_apply(t, m) for t, m in zip(group.rects.tensors, group.shard_masks())])
        return group.data if return_original else group.as_dtensor(_apply(group.local, group.mask))

    def get_mask(self, name: str) -> torch.Tensor:
        """The group's mask: ``bool``, the data's shape and device; True keeps.

        The same tensor object across steps: ``step()`` and ``load_state_dict()`` update it
        in place (as torch.ao does), so a parametrization or hook holding it stays current.
        ``.clone()`` it to keep a snapshot.

        A DTensor group's mask is a DTensor with the data's mesh and placements, built once
        over this rank's local ``bool`` mask (``.to_local()``; ``.full_tensor()`` is the
        global mask, a collective) and kept current the same way.

        A table sharded in rectangles (TorchRec) has a :class:`~distsparse.distributed.rects.RectShards`
        of ``bool`` masks: ``local_shards()`` gives ``[((row, col), mask), ...]``, one per
        local shard of the table with its global offset (views of one flat mask, updated in
        place by every step).
        """
        group = self._group(name)
        if group.rects is not None:
            if group._mask_dtensor is None:
                group._mask_dtensor = group.rects.with_tensors(group.shard_masks(), torch.bool)
            return group._mask_dtensor
        if group.layout is None:
            return group.mask
        if group._mask_dtensor is None:
            group._mask_dtensor = group.as_dtensor(group.mask)
        return group._mask_dtensor

    def sparsity(self, names: Iterable[str] | str | None = None) -> dict[str, float]:
        """``{name: fraction of the group's elements its mask prunes}`` (every group by
        default). Masks are ``bool``: torch.ao code computing ``1 - mask.mean()`` needs
        ``1 - mask.float().mean()``, or this. A sharded group's figure (FSDP2, TorchRec) is
        global and exact, with no collective here: the step (or load) that set the masks
        recorded the global count of pruned elements."""
        if isinstance(names, str):
            names = [names]
        selected = sorted(self._groups) if names is None else list(names)
        out = {}
        for name in selected:
            group = self._group(name)
            if group.distributed_rows and group.global_zeros is not None:
                numel = math.prod(group.data.shape)
                out[name] = 1.0 - (numel - group.global_zeros) / numel if numel else 0.0  # the plain groups' arithmetic
                continue
            mask = group.mask
            out[name] = 1.0 - int(mask.count_nonzero()) / mask.numel() if mask.numel() else 0.0
        return out

    def _store_mask(self, name: str, mask: torch.Tensor) -> None:
        """Make ``mask`` the group's mask while keeping the mask tensor object (torch.ao's
        ``mask.data = new``): ``set_`` swaps the storage, no copy."""
        group = self._groups[name]
        current = group.mask
        if group.layout is not None or group.rects is not None:  # get_mask's view holds this very tensor
            with torch.no_grad():
                current.copy_(mask)
            return
        if current.dtype == mask.dtype and current.device == mask.device and not current.is_inference() \
                and not mask.is_inference():
            with torch.no_grad():
                current.set_(mask)
        else:
            group.mask = mask.to(device=group.local.device, dtype=torch.bool, copy=True)
            self.state[name]["mask"] = group.mask

    def squash_mask(self, names: Iterable[str] | None = None, leave_parametrized: bool = True) -> None:
        """Write the masks into the user's tensors in place (pruned elements become 0).

        Unlike torch.ao, the groups stay registered (masks and configs kept), so ``step()``
        and checkpoints keep working afterwards. ``leave_parametrized=False`` leaves the data
        unchanged (torch.ao's meaning: drop the masking without applying it).
        """
        if isinstance(names, str):
            names = [names]
        selected = list(self._groups) if names is None else list(names)
        for name in selected:
            self._group(name)  # validate all names before touching anything
        if not leave_parametrized:
            return
        with torch.no_grad():
            for name in selected:
                group = self._groups[name]
                if group.rects is not None:  # TorchRec: views of the FBGEMM storage
                    for tensor, mask in zip(group.rects.tensors, group.shard_masks()):
                        tensor.masked_fill_(mask.logical_not(), 0)
                    continue
                # A DTensor's local part is a view of FSDP2's real storage: the next forward
                # all-gathers the zeros.
                group.local.masked_fill_(group.mask.logical_not(), 0)

    # -- ranks ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def global_ranks(self) -> list[int]:
        """The global rank of every rank of this sparsifier's process group, in group-rank order
        (``[0]`` when not distributed): which processes share its masks."""
        return self._comm.global_ranks()

    @property
    def job_world_size(self) -> int:
        """Processes in the whole job (``torch.distributed``'s default group; 1 when not
        distributed): integrations compare it with their framework's process count."""
        return self._comm.job_world_size()

    @property
    def comm(self) -> Comm:
        """The collective channel of this sparsifier (its process group, call counter and
        backstop timeout); schedulers and checkpoints run their collectives through it."""
        return self._comm

    @property
    def selection_digit_bits(self) -> int | None:
        """Radix digit width of the exact selection of split and sharded groups: ``None``
        (default) lets :func:`~distsparse.distributed.selection.choose_digit_bits` minimise the modelled
        time, except that a step with sharded (FSDP2, TorchRec) groups uses 8 bits (4 rounds of
        2 KiB per group, so nothing near table-sized is sent, even at 1,024 ranks); 8, 11 or 16
        fixes it — e.g. 16 for fewer rounds on a fast network. Must be equal on every rank
        (the step checks it); masks are the same either way."""
        return self._selection_digit_bits

    @selection_digit_bits.setter
    def selection_digit_bits(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or value not in DIGIT_BITS_CHOICES):
            raise ValueError(f"selection_digit_bits must be None or one of {DIGIT_BITS_CHOICES}, got {value!r}")
        self._selection_digit_bits = value

    # -- sharded protocol (optional) ----------------------------------------------------
    def _block_shape(self, name: str) -> tuple[int, int] | None:
        """The block shape of group ``name`` if this sparsifier can compute the group in
        row ranges on several ranks (the sharded protocol: :meth:`_shard_scores`,
        :meth:`_blocks_to_prune`, :meth:`_shard_mask`), else ``None`` (whole groups only,
        through :meth:`update_mask`)."""
        return None

    def _shard_scores(self, name: str, matrix: torch.Tensor, row_start: int, row_stop: int,
                      config: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def _blocks_to_prune(self, n_blocks: int, config: dict[str, Any]) -> int:
        raise NotImplementedError

    def _shard_mask(self, name: str, matrix: torch.Tensor, row_start: int, row_stop: int,
                    pruned: torch.Tensor, config: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
        """Write the mask of rows ``[row_start, row_stop)`` into ``out`` (those rows of the
        whole mask's 2-D view) and return it."""
        raise NotImplementedError

    # -- who computes what ------------------------------------------------------------
    def _plan(self) -> Plan:
        """This step's plan (see :mod:`distsparse.distributed.planner`): whole groups with an owner
        (or computed everywhere), big splittable groups in row ranges. Identical on every rank: it depends only on
        names, shapes, block shapes, scopes, the world size and ``min_split_elements``,
        which the step's agreement check covers. Recomputed when any of them changes."""
        specs = []
        for name in sorted(self._groups):
            group = self._groups[name]
            if group.distributed_rows:  # computed where its rows live, never planned
                continue
            rows, cols = as_matrix(group.local).shape if group.data.dim() else (1, 1)
            block = self._block_shape(name) if group.replicated else None
            specs.append(GroupSpec(name, int(rows), int(cols), block or (1, 1), group.replicated, block is not None))
        key = (self.world_size, self.min_split_elements, tuple(specs))
        if key != self._plan_key:
            self._plan_cache = plan_step(self.world_size, specs, min_split_elements=self.min_split_elements)
            self._plan_key = key
        return self._plan_cache

    def owner_of(self, name: str) -> int:
        """Rank that computes group ``name``'s mask (0 when not distributed; this rank for
        a local group, whose mask every rank computes from its own data). For a group
        split into row ranges (see :meth:`assignment`), the rank holding its first rows."""
        group = self._group(name)
        if not group.replicated:
            return self.rank
        if group.sharded:  # the rank contributing its first rows
            return group.layout.source[0]
        if group.rects is not None:  # the rank holding element (0, 0); 0 before the first step
            lay = group.rect_layout
            return 0 if lay is None else next(
                (r.holder for r in lay.rects if r.row == 0 and r.col == 0 and r.rows and r.cols), 0)
        return self._plan().owner_of(name)

    def assignment(self, name: str) -> dict[int, tuple[int, int]]:
        """``{rank: (row_start, row_stop)}``: which rows of group ``name``'s 2-D view each
        rank computes. One entry covering every row for a group computed whole; one per
        rank for a group split across ranks (a replicated group whose sparsifier supports
        it, where the planner predicts a gain, or of at least ``min_split_elements``
        elements when that is set and balance needs it); ``{}`` for a local group (every
        rank computes its own data). For a sharded DTensor group, the rows each
        contributing rank holds (it scores the blocks starting there)."""
        group = self._group(name)
        if group.sharded:
            lay = group.layout
            return {lay.source[j]: rows for j, rows in enumerate(lay.shard_rows)}
        if group.rects is not None:  # rows spanned by each rank's rectangles (this rank's before the first step)
            rects = group.rect_layout.rects if group.rect_layout is not None else \
                group.rects.local_rects(self.rank)
            out: dict[int, tuple[int, int]] = {}
            for r in rects:
                if r.rows and r.cols:
                    lo, hi = out.get(r.holder, (r.row, r.stop_row))
                    out[r.holder] = (min(lo, r.row), max(hi, r.stop_row))
            return dict(sorted(out.items()))
        return self._plan().assignment(name)

    def _describe(self) -> dict[str, dict[str, Any]]:
        """What every rank must agree on before a step: names, scopes, configs, and for
        replicated groups shapes and dtypes (local data may differ per rank)."""
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(self._groups):
            group = self._groups[name]
            facts: dict[str, Any] = {
                "scope": "replicated" if group.replicated else "local",
                "config": _to_json_config(self.data_groups[name]),
            }
            if group.replicated:
                facts["shape"] = list(group.data.shape)
                facts["dtype"] = str(group.data.dtype).replace("torch.", "")
            if group.layout is not None:
                facts.update(group.layout.describe())
            if group.rects is not None:
                facts["rects"] = "learnt at this step" if group.rect_layout is None else group.rect_layout.describe()
            out[name] = facts
        out["<sparsifier>"] = {"min_split_elements": self.min_split_elements}
        if not fused_cpu_available():  # split groups run another kernel: every rank must do the same
            out["<sparsifier>"]["fused_cpu"] = False
        if self._selection_digit_bits is not None:
            out["<sparsifier>"]["selection_digit_bits"] = self._selection_digit_bits
        return out

    # -- step -------------------------------------------------------------------------
    def _compute_mask(self, name: str) -> torch.Tensor:
        group = self._groups[name]
        config = self.data_groups[name]
        self._canonical_config(name, dict(config))  # a hand-edited data_groups entry is caught here
        local = group.local
        result = self.update_mask(name, local.detach(), **config)
        mask = group.mask if result is None else result
        if is_dtensor(mask):
            mask = mask.to_local()
        if tuple(mask.shape) != tuple(local.shape):
            raise ValueError(f"group {name!r}: update_mask returned shape {_shape_text(mask.shape)}, "
                             f"data has {_shape_text(local.shape)}")
        return mask.to(dtype=torch.bool, device=local.device)

    def step(self) -> None:
        """Recompute every group's mask. *Collective* when distributed.

        Replicated groups are computed by their owner and shared bit-packed in one
        all-gather, or (where that costs no rank more) by every rank from its own copy with
        only a mask digest compared, or split in row ranges (see :meth:`assignment`); local groups by every rank from its own data; sharded DTensor groups
        by the ranks holding their rows, each keeping its own mask rows (only selection
        counts and the rows of blocks straddling shard boundaries travel). Ranks first check that
        they are in the same call and hold the same groups (:class:`RankDisagreementError`
        naming the group otherwise). If any group fails — any exception in
        ``update_mask``, NaN/Inf data, a bad config — every rank raises and no mask
        changes anywhere: masks are committed only after every rank reached the end.
        """
        comm = self._comm
        op = f"{type(self).__name__}.step()"
        started = time.perf_counter()
        rank, distributed = comm.rank, comm.world_size > 1
        plan = self._plan() if distributed else None
        # Every mask computed from this rank's own data (computed everywhere, or local): the
        # step's only collective is its closing frame (Comm.close), which also compares digests.
        one_round = plan is not None and all(
            not g.distributed_rows and (not g.replicated or plan.groups[n].kind == "everywhere")
            for n, g in self._groups.items())
        # Masks are plain tensors even when step() runs under torch.inference_mode().
        with torch.inference_mode(False), torch.no_grad(), comm.operation(op, self._describe(), deferred=one_round):
            names = sorted(self._groups)
            sharded = [n for n in names if self._groups[n].sharded]
            rects = [n for n in names if self._groups[n].rects is not None]
            if plan is None:
                whole, split = [n for n in names if not self._groups[n].distributed_rows], []
            else:
                whole = [n for n in names if not self._groups[n].replicated
                         or (not self._groups[n].distributed_rows
                             and (plan.groups[n].kind == "everywhere"
                                  or (plan.groups[n].kind == "whole" and plan.groups[n].owner == rank)))]
                split = plan.split_names
            new_masks: dict[str, torch.Tensor] = {}
            pieces: dict[str, torch.Tensor] = {}  # split groups: the new whole masks
            errors: list[str] = []
            first_error: BaseException | None = None

            def fail(name: str, exc: BaseException) -> None:
                nonlocal first_error
                wrapped = _group_error(name, exc)
                errors.append(str(wrapped))
                first_error = first_error or wrapped

            for name in whole:
                try:
                    new_masks[name] = self._compute_mask(name)
                except Exception as exc:  # noqa: BLE001 - every error goes through the status exchange
                    fail(name, exc)
            # aborted: some rank failed before the selection, which every rank then skipped.
            aborted, spread_bytes = False, 0
            reduced_before = comm.all_reduce_bytes_sent
            if split or sharded or rects:
                aborted, spread_bytes = self._compute_split(plan, split, sharded, pieces, new_masks, fail, errors,
                                                            rects)
            selection_bytes = comm.all_reduce_bytes_sent - reduced_before  # the selection's counts
            spread_bytes += selection_bytes
            computed = time.perf_counter()
            bytes_sent = bytes_received = spread_bytes
            counted = sharded + rects  # their global zero counts ride along with the masks
            if not distributed:
                if first_error is not None:
                    raise first_error
                zeros = {n: _zeros(new_masks[n]) for n in counted}
            elif one_round:
                zeros = {}
                bytes_sent = bytes_received = distributed_step.close_everywhere(self, plan, op, new_masks, errors,
                                                                                first_error)
            else:
                sent, received, zeros = self._exchange_masks(plan, new_masks, pieces, errors, first_error, aborted,
                                                             counted)
                bytes_sent, bytes_received = bytes_sent + sent, bytes_received + received
            comm.finish(op)
            # Every rank succeeded: commit, in place (see get_mask).
            for name, mask in new_masks.items():
                self._store_mask(name, mask)
            for name, count in zeros.items():
                self._groups[name].global_zeros = count
        self.step_count += 1
        finished = time.perf_counter()
        self.last_step_stats = {
            "compute_seconds": computed - started,
            "comm_seconds": finished - computed,
            "bytes_sent": float(bytes_sent),
            "selection_bytes": float(selection_bytes),
            "bytes_received": float(bytes_received),
            "groups_computed": float(len(whole) + sum(1 for n in split if rank in plan.groups[n].ranges)),
        }

    def _compute_split(self, *args: Any, **kwargs: Any) -> tuple[bool, int]:
        """Split, sharded and rectangle groups' part of the step (:func:`distributed_step.compute_split`)."""
        return distributed_step.compute_split(self, *args, **kwargs)

    def _exchange_masks(self, *args: Any, **kwargs: Any) -> tuple[int, int, dict[str, int]]:
        """The step's closing all-gather of status and masks (:func:`distributed_step.exchange_masks`)."""
        return distributed_step.exchange_masks(self, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Masks and configs — never the user's data. For example::

            {
                "format_version": 1,
                "sparsifier": "DataNormSparsifier",
                "sparsifier_args": {"norm": "L1"},
                "defaults": {"sparsity_level": 0.5, "sparse_block_shape": [1, 4], ...},
                "groups": {"emb.weight": {"config": {...}, "shape": [1000, 64],
                                          "replicated": True}, ...},
                "masks": {"emb.weight": <bool tensor (1000, 64)>, ...},
                "world_size": 2, "rank": 0, "step_count": 12,
            }

        Values are tensors or JSON-able. Groups restored by ``load_state_dict`` but not yet
        added again are included. Local groups' masks are this rank's.

        A *sharded* DTensor group (FSDP2 ``Shard(0)``, HSDP) holds only this rank's rows:
        ``masks[name]`` has the local shape and its group entry adds ``"sharded":
        {"dim0_offset": 501, "local_shape": [500, 64], "contributes": True, "placements":
        [...], "mesh_shape": [2]}``. ``load_state_dict`` takes such a state back on a rank of
        the same layout, and a *whole* mask (the global shape) on any layout — that is what
        :func:`~distsparse.save_checkpoint` writes (it gathers the rows).

        A table sharded in rectangles (TorchRec) likewise holds this rank's shards' masks,
        flat (one after the other), and its entry adds ``"rects": {"shards": [[row, col,
        rows, cols], ...], "global_zeros": n}``. Sharded entries record ``global_zeros``
        (pruned elements over all ranks) for :meth:`sparsity`.
        """
        return self._state(clone=True)

    def _state(self, clone: bool) -> dict[str, Any]:
        """:meth:`state_dict`; ``clone=False`` hands out the live masks (to read at once:
        a checkpoint packs them without a full-size copy)."""
        groups: dict[str, Any] = {}
        masks: dict[str, torch.Tensor] = {}
        for name, pend in self._pending.items():
            groups[name] = {"config": _to_json_config(pend.config), "shape": list(pend.shape),
                            "replicated": pend.replicated}
            if pend.mask is not None:
                masks[name] = pend.mask.clone() if clone else pend.mask
        for name, group in self._groups.items():
            groups[name] = {"config": _to_json_config(self.data_groups[name]),
                            "shape": list(group.data.shape), "replicated": group.replicated}
            if group.sharded:
                lay = group.layout
                groups[name]["sharded"] = {"dim0_offset": lay.dim0_offset, "local_shape": list(lay.local_shape),
                                           "contributes": lay.contributes, **lay.describe(),
                                           "global_zeros": group.global_zeros}
            if group.rects is not None:
                groups[name]["rects"] = {"shards": [[r, c, int(t.shape[0]), int(t.shape[1])]
                                                    for (r, c), t in group.rects.local_shards()],
                                         "global_zeros": group.global_zeros}
            masks[name] = group.mask.clone() if clone else group.mask
        return {
            "format_version": STATE_FORMAT_VERSION,
            "sparsifier": type(self).__name__,
            "sparsifier_args": self._sparsifier_args(),
            "defaults": _to_json_config(self.defaults),
            "groups": {n: groups[n] for n in sorted(groups)},
            "masks": {n: masks[n] for n in sorted(masks)},
            "world_size": self.world_size,
            "rank": self.rank,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, *,
                        config: str = "sparsifier") -> None:
        """Restore masks and configs into the groups already added; validate, then mutate.

        The user's tensors stay attached (``squash_mask`` after a resume changes the live
        model). A group in ``state_dict`` that was not added yet is kept pending and applies
        when ``add_data`` adds that name with the same shape. ``strict=True`` refuses a
        state that lacks a group this sparsifier has; any group held with another shape or
        scope is refused either way. Local masks saved on another world size are dropped
        with a warning (the group starts with a fresh mask). On any error nothing changes.

        ``config`` says whose *geometry* wins where the state's differs from a group's or
        the defaults' (every config key but the scheduled ``sparsity_level``, e.g.
        ``sparse_block_shape``, ``zeros_per_block``): ``"sparsifier"`` (default) raises
        ``ValueError`` naming the group, the field and both values; ``"checkpoint"`` takes
        the state's. ``sparsity_level`` always comes from the state (torch.optim restores
        hyperparameters the same way).
        """
        self._load_state_dict(state_dict, strict, config=config)

    def _load_state_dict(self, state_dict: Mapping[str, Any], strict: bool, config: str = "sparsifier",
                         fill: Mapping[str, Callable[[_Group], int | None]] | None = None) -> None:
        """:meth:`load_state_dict`; ``fill[name](group)`` writes that group's mask in place
        (a checkpoint unpacking into the existing mask) and returns its global zero count,
        instead of copying ``state_dict["masks"][name]`` (then a stand-in of the right shape)."""
        plan = self._validate_state(state_dict, strict, config=config, count_zeros=fill is None)
        defaults, updates, pending, fresh_local = plan
        if fresh_local:
            warnings.warn(
                f"local groups {fresh_local} were saved on {state_dict['world_size']} ranks and "
                f"this run has {self.world_size}: their per-rank masks start fresh",
                UserWarning,
                stacklevel=2,
            )
        self.defaults = defaults
        for name, (group_config, mask, zeros) in updates.items():
            group = self._groups[name]
            self.data_groups[name] = group_config
            if fill is not None and name in fill:
                with torch.no_grad():
                    zeros = fill[name](group)
                if group.distributed_rows:
                    group.global_zeros = zeros
                continue
            if group.rects is not None:  # _store_mask copies into the mask: no intermediate copy
                self._store_mask(name, _rows_of(mask, None, group.rects).to(device=group.rects.device,
                                                                            dtype=torch.bool))
                group.global_zeros = zeros
                continue
            local = group.local
            # A plain group's mask takes the new storage (set_): a copy, so it never aliases the
            # caller's state; a DTensor group's is copied into by _store_mask.
            self._store_mask(name, _rows_of(mask, group.layout).to(device=local.device, dtype=torch.bool,
                                                                   copy=group.layout is None)
                             if mask is not None else torch.ones(local.shape, dtype=torch.bool, device=local.device))
            if group.sharded:
                group.global_zeros = zeros
        self._pending = pending if strict else {**self._pending, **pending}
        self.step_count = int(state_dict.get("step_count", self.step_count))

    def _validate_state(self, sd: Mapping[str, Any], strict: bool, config: str = "sparsifier",
                        count_zeros: bool = True):
        """Everything :meth:`load_state_dict` checks, changing nothing; returns its plan.
        ``count_zeros=False``: masks are stand-ins (their zeros are counted at commit)."""
        check_config_source(config)
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(sd).__name__}")
        for key in ("format_version", "sparsifier", "defaults", "groups", "masks", "world_size", "rank"):
            if key not in sd:
                raise ValueError(f"state_dict is missing key {key!r}")
        if sd["format_version"] != STATE_FORMAT_VERSION:
            raise ValueError(f"unsupported state format_version {sd['format_version']!r} "
                             f"(this distsparse reads {STATE_FORMAT_VERSION})")
        if sd["sparsifier"] != type(self).__name__:
            raise ValueError(f"state_dict was saved by {sd['sparsifier']!r}, not {type(self).__name__!r}")
        args = sd.get("sparsifier_args", {})
        if args != self._sparsifier_args():
            raise ValueError(f"state_dict was saved by {sd['sparsifier']}({args}), this sparsifier is "
                             f"{type(self).__name__}({self._sparsifier_args()}); build it with the same arguments")
        if not isinstance(sd["defaults"], Mapping):
            raise TypeError(f"state_dict 'defaults' must be a mapping, got {type(sd['defaults']).__name__}")
        defaults = self._canonical_config("<defaults>", dict(copy.deepcopy(sd["defaults"])))
        groups, masks = sd["groups"], sd["masks"]
        if not isinstance(groups, Mapping) or not isinstance(masks, Mapping):
            raise TypeError("state_dict 'groups' and 'masks' must be mappings")
        same_world = int(sd["world_size"]) == self.world_size and int(sd["rank"]) == self.rank
        updates: dict[str, tuple[dict[str, Any], torch.Tensor | None]] = {}
        pending: dict[str, _PendingGroup] = {}
        fresh_local: list[str] = []
        for name in sorted(groups):
            entry = groups[name]
            if not isinstance(entry, Mapping) or not {"config", "shape", "replicated"} <= set(entry):
                raise ValueError(f"group {name!r}: state entry must hold config, shape and replicated")
            if not isinstance(entry["config"], Mapping):
                raise TypeError(f"group {name!r}: config must be a mapping, got {type(entry['config']).__name__}")
            group_config = self._canonical_config(name, dict(copy.deepcopy(entry["config"])))
            if not isinstance(entry["shape"], (list, tuple)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"]):
                raise ValueError(f"group {name!r}: shape must be a list of ints >= 0, got {entry['shape']!r}")
            shape = tuple(int(s) for s in entry["shape"])
            if not isinstance(entry["replicated"], bool):
                raise TypeError(f"group {name!r}: 'replicated' must be a bool, got {entry['replicated']!r}")
            replicated = entry["replicated"]
            mask = masks.get(name)
            if mask is not None:
                if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, torch.uint8, torch.int8):
                    raise TypeError(f"group {name!r}: mask must be a bool tensor, got {type(mask).__name__} "
                                    f"{getattr(mask, 'dtype', '')}")
                rows_only = entry.get("sharded")
                rects_only = entry.get("rects")
                if tuple(mask.shape) != shape and not (
                        isinstance(rows_only, Mapping) and list(mask.shape) == list(rows_only.get("local_shape", ()))
                ) and not isinstance(rects_only, Mapping):
                    raise ValueError(f"group {name!r}: mask has shape {_shape_text(mask.shape)}, "
                                     f"group shape is {_shape_text(shape)}")
                if tuple(mask.shape) != shape and isinstance(rects_only, Mapping):  # this rank's shards only
                    self._check_rects_only(name, rects_only, mask, self._groups.get(name))
                elif tuple(mask.shape) != shape:  # this rank's rows of a sharded group only
                    self._check_rows_only(name, rows_only, self._groups.get(name))
            elif replicated:
                raise ValueError(f"group {name!r}: state holds no mask for this replicated group")
            if not replicated and not same_world:
                fresh_local.append(name)
                mask = None
            current = self._groups.get(name)
            if current is None:
                # A copy: once added, this mask is updated in place and must not alias the caller's state.
                pending[name] = _PendingGroup(config=group_config, shape=shape, replicated=replicated,
                                              mask=None if mask is None else mask.to(torch.bool, copy=True))
                continue
            if tuple(current.data.shape) != shape:
                raise ValueError(f"group {name!r}: state holds shape {_shape_text(shape)}, "
                                 f"the data added has shape {_shape_text(current.data.shape)}")
            if current.replicated != replicated:
                raise ValueError(f"group {name!r}: state holds it as {'replicated' if replicated else 'local'}, "
                                 f"it was added as {'replicated' if current.replicated else 'local'}")
            if config == "sparsifier":
                self._check_geometry(f"group {name!r}", self.data_groups[name], group_config)
            zeros = None
            if current.distributed_rows and mask is not None and count_zeros:
                if tuple(mask.shape) == shape:  # a whole mask: count it
                    zeros = _zeros(mask.to(torch.bool))
                else:  # this rank's part: the count recorded with it
                    saved = entry.get("rects") or entry.get("sharded") or {}
                    zeros = saved.get("global_zeros") if isinstance(saved, Mapping) else None
            updates[name] = (group_config, mask, zeros)
        if config == "sparsifier":  # after the groups: a group's mismatch is the clearer message
            self._check_geometry("the defaults", self.defaults, defaults)
        if strict:
            missing = sorted(set(self._groups) - set(groups))
            if missing:
                raise ValueError(f"state_dict lacks groups {missing} that this sparsifier has "
                                 "(pass strict=False to keep their current masks)")
        return defaults, updates, pending, fresh_local

    #: Config keys a schedule drives: restored from a state whatever ``config`` says. Every
    #: other key shapes the mask (its *geometry*) and must match unless ``config="checkpoint"``.
    _SCHEDULED_KEYS: tuple[str, ...] = ("sparsity_level",)

    def _check_geometry(self, what: str, mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
        """Refuse a state whose geometry differs from this sparsifier's, naming both values."""
        for key in sorted(set(mine) | set(theirs)):
            if key in self._SCHEDULED_KEYS:
                continue
            a, b = _to_json_config({key: mine.get(key)}), _to_json_config({key: theirs.get(key)})
            if a != b:
                raise ValueError(
                    f"{what}: the state has {key}={b[key]!r} but this sparsifier has {key}={a[key]!r}; "
                    "the mask's geometry would change silently. Build the sparsifier with the saved value, "
                    "or load with config=\"checkpoint\" to adopt the state's")

    @staticmethod
    def _check_rows_only(name: str, saved: Mapping[str, Any], current: _Group | None) -> None:
        """A state holding only one rank's rows of a sharded group loads only into a group
        with the same layout and rows (a checkpoint file holds whole masks: use it)."""
        lay = None if current is None else current.layout
        if lay is None or not lay.sharded:
            raise ValueError(f"group {name!r}: the state holds only rows of a sharded group (rows from dim-0 "
                             f"offset {saved.get('dim0_offset')}); the group here is not sharded — load a "
                             "checkpoint file (whole masks) instead")
        mine = {"dim0_offset": lay.dim0_offset, "local_shape": list(lay.local_shape), **lay.describe()}
        theirs = {k: saved.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"group {name!r}: the state holds the rows of another layout ({theirs}), this rank "
                             f"holds {mine}; load a checkpoint file (whole masks) instead")

    @staticmethod
    def _check_rects_only(name: str, saved: Mapping[str, Any], mask: torch.Tensor, current: _Group | None) -> None:
        """A state holding only one rank's shards of a table loads only into a group with the
        same local shards (a checkpoint file holds whole masks: use it)."""
        mine = None if current is None or current.rects is None else [
            [r, c, int(t.shape[0]), int(t.shape[1])] for (r, c), t in current.rects.local_shards()]
        theirs = saved.get("shards")
        if mine is None or theirs != mine or mask.dim() != 1 or mask.numel() != current.rects.local_numel():
            raise ValueError(f"group {name!r}: the state holds this rank's shards {theirs} of a sharded table; the "
                             f"group here holds {'no sharded table' if mine is None else 'shards ' + str(mine)} — "
                             "load a checkpoint file (whole masks) instead")

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(rank {self.rank} of {self.world_size}, {len(self._groups)} groups"]
        for name in sorted(self._groups):
            group = self._groups[name]
            config = ", ".join(f"{k}={v!r}" for k, v in sorted(self.data_groups[name].items()))
            density = float(group.mask.float().mean()) if group.mask.numel() else math.nan
            scope = "sharded" if group.distributed_rows else "replicated" if group.replicated else "local"
            lines.append(f"  {name!r}: {_shape_text(group.data.shape)} {scope}, {config}, "
                         f"kept {density:.1%}")
        for name in sorted(self._pending):
            lines.append(f"  {name!r}: pending (restored, waiting for add_data)")
        return "\n".join(lines) + ")"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ``bool`` mask as 1 bit per element: 1-D ``uint8``, row-major, most significant bit
    first, last byte zero-padded, 1 keeps — the encoding of distsparse checkpoints, for
    integrations that keep masks in their framework's own checkpoints."""
    return pack_bits(mask)


def unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The ``bool`` mask of ``shape`` that :func:`pack_mask` packed."""
    return unpack_bits(packed, shape)


def local_pieces(data: Any) -> RectShards | None:
    """This rank's rectangles of a table sharded in rectangles (a TorchRec ``ShardedTensor``,
    a ``DTensor`` over TorchRec's ``LocalShardsWrapper``, or a sharded group's mask), as
    :class:`~distsparse.distributed.rects.RectShards` (``local_shards()``: ``[((row, col),
    tensor), ...]``, no copy), else ``None``: how integrations tell a sharded table from a
    replicated one."""
    return as_rect_shards(data)


def check_scheduler(sparsifier: Any, scheduler: Any) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``sparsifier`` is a distsparse sparsifier and
    ``scheduler`` is ``None`` or a distsparse scheduler built on it: the pair the checkpoint
    functions accept, checked early by the integrations."""
    from .checkpoint import _check_scheduler

    _check_scheduler(sparsifier, scheduler)
