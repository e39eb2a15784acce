"""Lightning callbacks with torch.ao's names and arguments, rank-aware and resumable.

Code using torch.ao's callbacks runs by changing the import::

    # from torch.ao.pruning._experimental.data_sparsifier.lightning.callbacks.data_sparsity import (
    from distsparse.integrations.lightning import PostTrainingDataSparsity, TrainingAwareDataSparsity

    cb = TrainingAwareDataSparsity(
        data_sparsifier_class=distsparse.DataNormSparsifier,
        data_sparsifier_args={"sparsity_level": 0.5, "sparse_block_shape": (1, 4)},
        data_scheduler_class=distsparse.CubicScheduler,
        data_scheduler_args={"final_value": 0.8, "ramp_steps": 10},
        every_n_train_steps=10,                  # distsparse only; None (default): once per epoch
    )
    trainer = lightning.pytorch.Trainer(callbacks=[cb], accelerator="cpu", devices=2, strategy="ddp")
    trainer.fit(module)                          # later: trainer.fit(module, ckpt_path="last.ckpt")

How it differs from torch.ao's (and why):

* :class:`TrainingAwareDataSparsity` sparsifies **the model being trained** — torch.ao
  deep-copies it every epoch and never touches the trained weights. After every sparsifier
  step the masks are squashed into the model's parameters in place; ``sparsified`` is the
  trained model itself. :class:`PostTrainingDataSparsity` works on a deep copy, as torch.ao
  does (``sparsified``), so the trained model stays dense for comparison.
* Group names are the parameters' own names with ``.`` kept (``"linears.0.weight"``);
  torch.ao renames them to ``"linears_0_weight"``.
* Which parameters: every parameter of the model, as torch.ao (``include`` and
  ``module_types`` select fewer). The model is ``pl_module.model`` when that attribute is
  an ``nn.Module`` (torch.ao's convention), otherwise the LightningModule itself.
* The sparsifier is built in ``on_fit_start``, on every rank, after the process group
  exists and after ``configure_model`` (where FSDP2 replaces parameters with DTensors). Under
  Lightning's DDP every mask is computed by one rank and every rank ends each step with the
  identical mask; the schedule is decided on rank 0.
* FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``): the sharded
  parameters become *sharded* groups (masks computed where their rows live, squashed into
  each rank's shard). Their masks are stored whole in the callback state (see
  :meth:`TrainingAwareDataSparsity.state_dict`), so a distributed checkpoint resumes exactly.
* The full state (masks bit-packed as ``uint8`` tensors, configs, step count, scheduler
  state, the callback's counters) travels in Lightning checkpoints through the callback's
  ``state_dict``/``load_state_dict``: plain tensors and JSON-able values only, so
  ``torch.load(ckpt, weights_only=True)`` loads it, and ``trainer.fit(ckpt_path=...)``
  resumes masks and schedule exactly. torch.ao keeps the state in memory only.
* Per-group sparsity (fraction of pruned elements) is logged with ``pl_module.log`` as
  ``sparsity/<name>``, from ``sparsifier.sparsity()`` — each rank's own mask tensors, never a
  collective (``mask.float().mean()`` of a DTensor mask is an all-reduce).

Lightning is imported from ``lightning.pytorch`` when installed, else ``pytorch_lightning``
(torch.ao's import); the callbacks subclass that package's ``Callback``.

Limitations:
    Replicated parameters (DDP) and FSDP2 ``Shard(0)`` DTensors; FSDP1 / DeepSpeed
    parameters are refused by ``add_data``, and so are 1-D sharded parameters (biases): select
    the tables with ``include``. A sharded group's logged figure is what ``sparsity()``
    reports for it on that rank. Between two sparsifier steps the optimizer may
    regrow pruned weights (they are zeroed again at the next step); pass
    ``every_n_train_steps=1`` to keep them pruned after every optimizer step. A resume
    must use the same callback class, parameters and constructor arguments.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

try:  # the unified package first; torch.ao's callbacks import pytorch_lightning
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ..sparsifier import pack_mask, unpack_mask

__all__ = ["PostTrainingDataSparsity", "TrainingAwareDataSparsity", "select_parameters", "STATE_FORMAT"]

#: ``format`` of the callback state inside a Lightning checkpoint.
STATE_FORMAT = "distsparse.lightning"
_STATE_VERSION = 1

logger = logging.getLogger(__name__)

ParamFilter = Callable[[str, nn.Parameter], bool] | str | Iterable[str] | None


def select_parameters(module: nn.Module, include: ParamFilter = None,
                      module_types: tuple[type, ...] | type | None = None) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``module`` the callbacks sparsify, in
    ``named_parameters`` order (shared parameters once, under their first name).

    Args:
        include: ``None`` keeps every parameter (torch.ao's behaviour); a callable
            ``(name, param) -> bool``; or one or several ``fnmatch`` patterns matched
            against the full name (``"*.weight"``, ``["emb*", "linears.*"]``).
        module_types: keep only parameters held directly by modules of these types
            (e.g. ``(nn.Linear, nn.Embedding)``).
    """
    if include is None:
        keep: Callable[[str, nn.Parameter], bool] = lambda name, param: True  # noqa: E731
    elif callable(include):
        keep = include
    else:
        patterns = [include] if isinstance(include, str) else list(include)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"include must be a callable, a pattern or a list of patterns, got {include!r}")
        keep = lambda name, param: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
    owners: dict[int, nn.Module] = {}
    if module_types is not None:
        types = module_types if isinstance(module_types, tuple) else (module_types,)
        for sub in module.modules():
            if isinstance(sub, types):
                for param in sub.parameters(recurse=False):
                    owners[id(param)] = sub
    selected = []
    for name, param in module.named_parameters():
        if module_types is not None and id(param) not in owners:
            continue
        if keep(name, param):
            selected.append((name, param))
    return selected


def _target_module(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    if model_attr is not None:
        inner = getattr(pl_module, model_attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return pl_module


def _check_world(trainer: Any, sparsifier: Any, who: str) -> None:
    """Raise when Lightning and the sparsifier's process group disagree on the world size."""
    expected = getattr(trainer, "world_size", None)
    if not isinstance(expected, int):  # a test passing a stand-in trainer (torch.ao's tests pass 42)
        return
    actual = sparsifier.world_size
    if expected != actual:
        raise RuntimeError(
            f"{who}: Lightning runs {expected} process(es) but the sparsifier's process group has "
            f"{actual} rank(s) (torch.distributed world size {sparsifier.job_world_size}); masks would not be "
            "shared over the ranks training the model. Build the sparsifier on the whole world "
            "(no process_group= in data_sparsifier_args) and launch as many processes as Lightning "
            "expects (devices=N, num_nodes=M).")


def _group_sparsity(sparsifier: Any) -> dict[str, float]:
    """{name: fraction of pruned elements} of every group, from ``sparsifier.sparsity()``:
    computed on each rank's own mask tensors, never a collective. (``mask.float().mean()`` on
    a sharded group's DTensor mask would be one: an all-reduce that hangs or pairs with the
    wrong collective when ranks do not all log.)"""
    return sparsifier.sparsity()


def _add_module(sparsifier: Any, module: nn.Module, include: ParamFilter,
                module_types: tuple[type, ...] | type | None, who: str) -> None:
    params = select_parameters(module, include, module_types)
    if not params:
        raise ValueError(f"{who}: no parameter of {type(module).__name__} matches include={include!r}, "
                         f"module_types={module_types!r}; nothing to sparsify")
    for name, param in params:
        sparsifier.add_data(name, param)


class PostTrainingDataSparsity(pl.Callback):
    """Sparsify a copy of the trained model when ``fit`` ends (torch.ao's callback).

    ``on_fit_end`` deep-copies the model (``pl_module.model`` when present, else the
    LightningModule) in ``eval()`` mode, builds ``data_sparsifier_class(**data_sparsifier_args)``,
    adds the copy's parameters (names with ``.`` kept), steps once and squashes the masks
    into the copy. The trained model is not modified; the copy is ``self.sparsified``,
    the sparsifier ``self.data_sparsifier``. Under DDP every rank does this (``step()``
    is a collective) and every rank's copy carries the identical masks.

    Args:
        data_sparsifier_class: as torch.ao.
        data_sparsifier_args: as torch.ao.
        include: which parameters (see :func:`select_parameters`); default every parameter, as torch.ao.
        module_types: which parameters (see :func:`select_parameters`).
        model_attr: attribute of the LightningModule holding the model (torch.ao: ``model``);
            the LightningModule itself when absent or ``None``.
    """

    def __init__(self, data_sparsifier_class: type, data_sparsifier_args: Mapping[str, Any], *,
                 include: ParamFilter = None, module_types: tuple[type, ...] | type | None = None,
                 model_attr: str | None = "model") -> None:
        super().__init__()
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = dict(data_sparsifier_args)
        self.include, self.module_types, self.model_attr = include, module_types, model_attr
        self.data_sparsifier: Any = None
        self.sparsified: nn.Module | None = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        model = _target_module(pl_module, self.model_attr)
        self.sparsified = copy.deepcopy(model).eval()
        self.data_sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        _check_world(trainer, self.data_sparsifier, type(self).__name__)
        _add_module(self.data_sparsifier, self.sparsified, self.include, self.module_types, type(self).__name__)
        self.data_sparsifier.step()
        self.data_sparsifier.squash_mask()
        for name, level in _group_sparsity(self.data_sparsifier).items():
            logger.info("Sparsity in layer %s = %.2f%%", name, 100 * level)


class TrainingAwareDataSparsity(pl.Callback):
    """Sparsify the model being trained, on a schedule, under DDP, resumably.

    The sparsifier and scheduler are built from the classes and arguments (as torch.ao:
    ``data_scheduler_args`` without ``data_sparsifier``) in ``on_fit_start`` — on every rank,
    after Lightning created the process group and ran ``configure_model`` — with the model's
    parameters added under their own names. Then, every ``every_n_train_steps`` optimizer steps (or at the end of
    every training epoch when ``None``): ``data_sparsifier.step()`` (new masks from the
    current weights; collective), ``data_scheduler.step()`` (the next level, decided on
    rank 0), ``squash_mask()`` (pruned weights become 0 in place) and one
    ``pl_module.log("sparsity/<name>", ...)`` per group. ``on_train_end`` squashes again
    (torch.ao does).

    The state (see :meth:`state_dict`) is saved in Lightning checkpoints and restored by
    ``trainer.fit(ckpt_path=...)``; resuming from a checkpoint that lacks it raises
    ``ValueError`` instead of silently starting the masks and the schedule from scratch.

    Args:
        data_sparsifier_class: as torch.ao.
        data_sparsifier_args: as torch.ao.
        data_scheduler_class: as torch.ao.
        data_scheduler_args: as torch.ao.
        every_n_train_steps: step every N optimizer steps (``trainer.global_step``);
            ``None`` (default, torch.ao): once per epoch, in ``on_train_epoch_end``.
        include: which parameters (see :func:`select_parameters`).
        module_types: which parameters (see :func:`select_parameters`).
        model_attr: attribute holding the model (torch.ao: ``model``); the LightningModule
            itself when absent or ``None``.
        log_sparsity: log each group's sparsity with ``pl_module.log``.
    """

    def __init__(self, data_sparsifier_class: type, data_sparsifier_args: Mapping[str, Any],
                 data_scheduler_class: type, data_scheduler_args: Mapping[str, Any], *,
                 every_n_train_steps: int | None = None, include: ParamFilter = None,
                 module_types: tuple[type, ...] | type | None = None, model_attr: str | None = "model",
                 log_sparsity: bool = True) -> None:
        super().__init__()
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool)
                                                or not isinstance(every_n_train_steps, int)
                                                or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be a positive int or None, got {every_n_train_steps!r}")
        self.data_sparsifier_class = data_sparsifier_class
        self.data_sparsifier_args = dict(data_sparsifier_args)
        self.data_scheduler_class = data_scheduler_class
        self.data_scheduler_args = dict(data_scheduler_args)
        self.every_n_train_steps = every_n_train_steps
        self.include, self.module_types, self.model_attr = include, module_types, model_attr
        self.log_sparsity = log_sparsity
        self.data_sparsifier: Any = None
        self.data_scheduler: Any = None
        #: The sparsified model: the one being trained (torch.ao: a copy).
        self.sparsified: nn.Module | None = None
        #: ``trainer.global_step`` of the last sparsifier step (-1: none yet).
        self.last_step_at = -1
        #: ``{group: schedule value}`` the last sparsifier step's masks were computed with
        #: (``data_groups`` then holds the *next* step's values); None before the first step.
        self.mask_params: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._restored = False

    # -- building -------------------------------------------------------------------
    def _build(self, trainer: Any, pl_module: Any) -> None:
        who = type(self).__name__
        self.sparsified = _target_module(pl_module, self.model_attr)
        sparsifier = self.data_sparsifier_class(**self.data_sparsifier_args)
        _check_world(trainer, sparsifier, who)
        _add_module(sparsifier, self.sparsified, self.include, self.module_types, who)
        args = copy.deepcopy(self.data_scheduler_args)
        args["data_sparsifier"] = sparsifier
        self.data_sparsifier = sparsifier
        self.data_scheduler = self.data_scheduler_class(**args)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._restored = False  # set again if this fit restores a checkpoint

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Built here, not in ``setup``: ``configure_model`` runs after ``setup`` and FSDP2
        # (``fully_shard`` under ModelParallelStrategy) replaces the parameters with DTensors
        # there; ``on_fit_start`` sees the parameters the model trains. A later fit of the same
        # module continues with the same sparsifier; another model (the callback reused for a
        # new module) gets a fresh one.
        if self.data_sparsifier is None or self.sparsified is not _target_module(pl_module, self.model_attr):
            self._build(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.data_sparsifier is None:  # called without setup (torch.ao's tests do)
            self._build(trainer, pl_module)
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if ckpt_path and not self._restored:
            raise ValueError(
                f"{type(self).__name__}: resuming from {str(ckpt_path)!r}, which holds no "
                f"{type(self).__name__} state (saved without this callback, or by another distsparse "
                "version): the masks and the schedule cannot be resumed. Add the same callback to "
                "the run that writes the checkpoints, or start without ckpt_path.")

    # -- stepping -------------------------------------------------------------------
    def _sparsify(self, pl_module: Any, global_step: int) -> None:
        self.data_sparsifier.step()
        param = self.data_scheduler.schedule_param
        self.mask_params = {name: config[param] for name, config in self.data_sparsifier.data_groups.items()}
        self.data_scheduler.step()
        self.data_sparsifier.squash_mask()
        self.last_step_at = global_step
        self._log_sparsity(pl_module)

    def _log_sparsity(self, pl_module: Any) -> None:
        """``pl_module.log("sparsity/<name>", ...)`` per group: each rank's own figures, no
        collective (``sync_dist`` stays False), so ranks never wait on each other here;
        identical on every rank for replicated groups."""
        if self.log_sparsity and getattr(pl_module, "_trainer", None) is not None:
            for name, level in _group_sparsity(self.data_sparsifier).items():
                pl_module.log(f"sparsity/{name}", level)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        step = int(trainer.global_step)
        # global_step counts optimizer steps: with gradient accumulation several batches share one.
        if n is not None and step > self.last_step_at and step > 0 and step % n == 0:
            self._sparsify(pl_module, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_n_train_steps is None:
            self._sparsify(pl_module, int(getattr(trainer, "global_step", self.last_step_at + 1)))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.data_sparsifier.squash_mask()

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The callback's state as tensors and JSON-able values::

            {"format": "distsparse.lightning", "format_version": 1,
             "every_n_train_steps": 10, "last_step_at": 40,
             "sparsifier": {...data_sparsifier.state_dict() without "masks"...},
             "masks": {"linears.0.weight": <uint8 tensor, bit-packed (distsparse.sparsifier.pack_mask)>},
             "scheduler": {...data_scheduler.state_dict()...}}

        The model's weights are not in it (they are in the checkpoint's ``state_dict``).
        Empty before the sparsifier is built.

        A *sharded* group's mask (an FSDP2 ``DTensor`` parameter) is stored whole, gathered
        with ``full_tensor()``: Lightning keeps rank 0's callback state only (ModelParallelStrategy
        writes it beside the distributed weights), and a whole mask loads on any layout. So
        with sharded groups this is a collective: Lightning calls it on every rank
        (``trainer.save_checkpoint`` must run on all of them); it holds each whole mask
        transiently, 1 byte per element, on every rank.
        """
        if self.data_sparsifier is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        sd = self.data_sparsifier.state_dict()
        masks = {}
        for name, mask in sd.pop("masks").items():
            if sd["groups"][name].pop("sharded", None) is not None:  # this rank's rows only
                mask = self.data_sparsifier.get_mask(name).full_tensor()
            masks[name] = pack_mask(mask).cpu()
        scheduler = json.loads(json.dumps(self.data_scheduler.state_dict(), allow_nan=False))
        return {
            "format": STATE_FORMAT,
            "format_version": _STATE_VERSION,
            "every_n_train_steps": self.every_n_train_steps,
            "last_step_at": self.last_step_at,
            "sparsifier": json.loads(json.dumps(sd, allow_nan=False)),
            "masks": masks,
            "scheduler": scheduler,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (all or nothing); before the sparsifier
        exists it is kept and applied when it is built."""
        if not state_dict:
            return
        self._check_format(state_dict)
        self._restored = True
        if self.data_sparsifier is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def _check_format(self, state: Mapping[str, Any]) -> None:
        who = type(self).__name__
        if state.get("format") != STATE_FORMAT or state.get("format_version") != _STATE_VERSION:
            raise ValueError(f"{who}: checkpoint state has format {state.get('format')!r} version "
                             f"{state.get('format_version')!r}; this distsparse reads {STATE_FORMAT!r} "
                             f"version {_STATE_VERSION}")
        if state.get("every_n_train_steps") != self.every_n_train_steps:
            raise ValueError(f"{who}: the checkpoint was written with every_n_train_steps="
                             f"{state.get('every_n_train_steps')!r}, this callback has "
                             f"{self.every_n_train_steps!r}; the schedule would not resume exactly")

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        who = type(self).__name__
        sd = dict(state["sparsifier"])
        masks = {}
        for name, packed in state["masks"].items():
            entry = sd["groups"].get(name)
            if entry is None:
                raise ValueError(f"{who}: checkpoint holds a mask for {name!r} but no group entry")
            masks[name] = unpack_mask(packed, tuple(int(s) for s in entry["shape"]))
        sd["masks"] = masks
        # The sparsifier validates everything before changing anything; restore the
        # scheduler first and undo it if the sparsifier refuses.
        snapshot = self.data_scheduler.state_dict()
        try:
            self.data_scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
            self.data_sparsifier.load_state_dict(sd)
        except (TypeError, ValueError) as exc:
            self.data_scheduler.load_state_dict(snapshot)
            raise ValueError(f"{who}: the checkpoint's sparsity state does not fit this model and "
                             f"callback: {exc}") from exc
        self.last_step_at = int(state["last_step_at"])
