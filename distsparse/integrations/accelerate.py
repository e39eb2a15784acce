"""Carry the sparsity state in ``accelerator.save_state`` / ``load_state`` checkpoints.

::

    accelerator = Accelerator(cpu=True)          # cpu=True on CPU-only hosts, see below
    sparsifier = DataNormSparsifier(...); scheduler = CubicScheduler(sparsifier, ...)
    register_for_checkpointing(accelerator, sparsifier, scheduler)
    accelerator.save_state("ckpt/step_100")      # also writes ckpt/step_100/distsparse_state.safetensors
    accelerator.load_state("ckpt/step_100")      # also restores masks, configs and the schedule

File names never collide: a sparsifier on the whole world writes ``distsparse_state.safetensors``;
one bound to a sub-group (``process_group=``) writes ``distsparse_state.ranks<a>-<b>.safetensors``
(its global ranks, see :func:`default_filename`). Each accelerator keeps a registry of its
registrations: a second sparsifier with a file name already taken, or the same sparsifier
registered twice, is refused with ``ValueError`` (remove the first registration's handles
to register again). And :func:`distsparse.save_checkpoint` itself refuses to overwrite a
file that another process group of the same job wrote.

It hooks accelerate's save/load *pre-hooks*, which run on every rank, and calls the
collectives :func:`distsparse.save_checkpoint` / :func:`distsparse.load_checkpoint` there.
accelerate's own ``Accelerator.register_for_checkpointing`` is deliberately not used: it
pickles (``custom_checkpoint_<i>.pkl``, loaded with ``weights_only=False``) from the main
process only, so per-rank (local) masks would be lost.

accelerate is never imported here: the functions only call methods of the accelerator
object they are given.

Limitations:
    On a CPU-only host, ``accelerate launch --multi_gpu --num_processes N`` starts N gloo
    ranks only with ``Accelerator(cpu=True)``; without it accelerate believes it runs one
    process while ``torch.distributed`` has N. :func:`register_for_checkpointing` and the
    hooks detect that and raise. ``--cpu --num_processes N`` starts a single process.
    The load pre-hook runs before accelerate loads the model weights; the sparsity state
    does not touch the weights, so the order does not matter.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from ..sparsifier import check_scheduler
from ..checkpoint import load_checkpoint, save_checkpoint

__all__ = ["register_for_checkpointing", "default_filename", "DEFAULT_FILENAME"]

#: File written into every ``save_state`` folder by a sparsifier on the whole world.
DEFAULT_FILENAME = "distsparse_state.safetensors"

_ACCELERATE_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Attribute of the accelerator holding {file name: sparsifier} of the live registrations.
_REGISTRY = "_distsparse_registrations"


def default_filename(sparsifier: Any) -> str:
    """The file a sparsifier's state goes to when ``filename`` is not given.

    ``distsparse_state.safetensors`` when the sparsifier spans every rank (no
    ``process_group=``, or the whole world — so existing checkpoints keep loading);
    for a sub-group, its global ranks: ``distsparse_state.ranks2-3.safetensors`` (a
    contiguous range), ``distsparse_state.ranks0_2_5.safetensors`` (up to 8 others), else
    ``distsparse_state.ranks-<12 hex of their sha256>.safetensors``.
    """
    ranks = sparsifier.global_ranks
    if ranks == list(range(sparsifier.job_world_size)):
        return DEFAULT_FILENAME
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        tag = f"ranks{ranks[0]}-{ranks[-1]}"
    elif len(ranks) <= 8:
        tag = "ranks" + "_".join(str(r) for r in ranks)
    else:
        tag = "ranks-" + hashlib.sha256(",".join(str(r) for r in ranks).encode()).hexdigest()[:12]
    return f"distsparse_state.{tag}.safetensors"


class _Handle:
    """accelerate's ``RemovableHandle``; ``remove()`` also frees the registration's file name."""

    def __init__(self, handle: Any, release: Any) -> None:
        self._handle, self._release = handle, release

    @property
    def id(self) -> int:
        return self._handle.id

    def remove(self) -> None:
        self._handle.remove()
        self._release()

    def __enter__(self) -> "_Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _check_world(accelerator: Any, sparsifier: Any) -> None:
    """Raise when accelerate and torch.distributed disagree on the number of processes."""
    dist_world = sparsifier.job_world_size
    acc_world = int(getattr(accelerator, "num_processes", 1))
    if dist_world != acc_world:
        raise RuntimeError(
            f"accelerate reports {acc_world} process(es) but torch.distributed has {dist_world} "
            "ranks, so every rank would act as the main process. On a CPU-only machine pass "
            "Accelerator(cpu=True) and launch with `accelerate launch --multi_gpu --num_processes "
            f"{dist_world} ...` (not `--cpu --num_processes N`, which starts a single process); "
            "`torchrun --nproc_per_node N` works too."
        )


def register_for_checkpointing(accelerator: Any, sparsifier: Any, scheduler: Any | None = None,
                               filename: str | None = None) -> tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` / ``load_state(dir)`` save and restore the
    sparsifier (and scheduler) as ``dir/<filename>`` (format: :mod:`distsparse.checkpoint`).

    Call it on every rank, once per sparsifier. ``save_state``/``load_state`` must then be
    called on every rank too (as accelerate requires anyway): the hooks are collectives.
    Loading a folder without the file raises
    :class:`~distsparse.checkpoint.CheckpointNotFoundError`. ``filename`` defaults to
    :func:`default_filename` (distinct per process group).

    Returns:
        ``(save_handle, load_handle)`` — handles like ``torch.utils.hooks.RemovableHandle``;
        call ``.remove()`` on both to unregister (either frees the file name).

    Raises:
        RuntimeError: accelerate and ``torch.distributed`` disagree on the number of
            processes (CPU-only host without ``Accelerator(cpu=True)``).
        ValueError: ``filename`` is not a plain file name, is one accelerate reserves, is
            already taken by another sparsifier registered on this accelerator, or this
            sparsifier is registered on it already.
    """
    check_scheduler(sparsifier, scheduler)  # validate the pair now rather than at the first save
    if filename is None:
        filename = default_filename(sparsifier)
    if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename \
            or filename in (".", ".."):
        raise ValueError(f"filename must be a plain file name inside the checkpoint folder, got {filename!r}")
    if _ACCELERATE_CUSTOM.match(filename):
        raise ValueError(f"filename {filename!r} collides with accelerate's custom_checkpoint_<n>.pkl files")
    for method in ("register_save_state_pre_hook", "register_load_state_pre_hook"):
        if not callable(getattr(accelerator, method, None)):
            raise TypeError(f"accelerator has no {method}() (accelerate >= 0.28 is needed), "
                            f"got {type(accelerator).__name__}")
    _check_world(accelerator, sparsifier)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        _check_world(accelerator, sparsifier)
        save_checkpoint(os.path.join(output_dir, filename), sparsifier, scheduler)

    def load_hook(models: list, input_dir: str) -> None:
        _check_world(accelerator, sparsifier)
        load_checkpoint(os.path.join(input_dir, filename), sparsifier, scheduler)

    registry: dict[str, Any] = getattr(accelerator, _REGISTRY, None) or {}
    for taken, other in registry.items():
        if other is sparsifier:
            raise ValueError(
                f"this sparsifier is already registered on this accelerator (file {taken!r}); registering "
                "it again would save and load it twice. Call .remove() on the handles the first "
                "register_for_checkpointing returned to register it anew.")
    if filename in registry:
        raise ValueError(
            f"file name {filename!r} is already used by another sparsifier registered on this accelerator; "
            "its checkpoints would overwrite each other. Pass a distinct filename= to one of them.")
    registry[filename] = sparsifier
    setattr(accelerator, _REGISTRY, registry)

    def release() -> None:
        if registry.get(filename) is sparsifier:
            del registry[filename]

    save_handle = accelerator.register_save_state_pre_hook(save_hook)
    load_handle = accelerator.register_load_state_pre_hook(load_hook)
    return _Handle(save_handle, release), _Handle(load_handle, release)
