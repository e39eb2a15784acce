"""Carry the sparsity state in ``accelerator.save_state`` / ``load_state`` checkpoints.

::

    accelerator = Accelerator(cpu=True)          # cpu=True on CPU-only hosts, see below
    sparsifier = DataNormSparsifier(...); scheduler = CubicScheduler(sparsifier, ...)
    register_for_checkpointing(accelerator, sparsifier, scheduler)
    accelerator.save_state("ckpt/step_100")      # also writes ckpt/step_100/distsparse_state.safetensors
    accelerator.load_state("ckpt/step_100")      # also restores masks, configs and the schedule

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

import os
import re
from typing import Any

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import Comm

__all__ = ["register_for_checkpointing", "DEFAULT_FILENAME"]

#: File written into every ``save_state`` folder.
DEFAULT_FILENAME = "distsparse_state.safetensors"

_ACCELERATE_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def _check_world(accelerator: Any) -> None:
    """Raise when accelerate and torch.distributed disagree on the number of processes."""
    dist_world = Comm().world_size
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
                               filename: str = DEFAULT_FILENAME) -> tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` / ``load_state(dir)`` save and restore the
    sparsifier (and scheduler) as ``dir/<filename>`` (format: :mod:`distsparse.checkpoint`).

    Call it on every rank, once. ``save_state``/``load_state`` must then be called on every
    rank too (as accelerate requires anyway): the hooks are collectives. Loading a folder
    without the file raises :class:`~distsparse.checkpoint.CheckpointNotFoundError`.

    Returns:
        ``(save_handle, load_handle)`` — ``torch.utils.hooks.RemovableHandle``\\ s; call
        ``.remove()`` on both to unregister.

    Raises:
        RuntimeError: accelerate and ``torch.distributed`` disagree on the number of
            processes (CPU-only host without ``Accelerator(cpu=True)``).
        ValueError: ``filename`` is not a plain file name, or is one accelerate reserves.
    """
    if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename \
            or filename in (".", ".."):
        raise ValueError(f"filename must be a plain file name inside the checkpoint folder, got {filename!r}")
    if _ACCELERATE_CUSTOM.match(filename):
        raise ValueError(f"filename {filename!r} collides with accelerate's custom_checkpoint_<n>.pkl files")
    for method in ("register_save_state_pre_hook", "register_load_state_pre_hook"):
        if not callable(getattr(accelerator, method, None)):
            raise TypeError(f"accelerator has no {method}() (accelerate >= 0.28 is needed), "
                            f"got {type(accelerator).__name__}")
    _check_world(accelerator)
    # Validate the pair now rather than at the first save.
    from ..checkpoint import _check_scheduler

    _check_scheduler(sparsifier, scheduler)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        _check_world(accelerator)
        save_checkpoint(os.path.join(output_dir, filename), sparsifier, scheduler)

    def load_hook(models: list, input_dir: str) -> None:
        _check_world(accelerator)
        load_checkpoint(os.path.join(input_dir, filename), sparsifier, scheduler)

    save_handle = accelerator.register_save_state_pre_hook(save_hook)
    load_handle = accelerator.register_load_state_pre_hook(load_hook)
    return save_handle, load_handle
