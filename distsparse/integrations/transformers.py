"""A Hugging Face ``transformers.Trainer`` callback: step, squash, checkpoint and resume a
distsparse sparsifier (and scheduler) with the Trainer's own loop and checkpoints.

::

    model = GPT2LMHeadModel(GPT2Config(...))
    sparsifier = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    for name, param in model.named_parameters():
        if param.dim() == 2:
            sparsifier.add_data(name, param)          # the model's own parameters, "." kept
    scheduler = distsparse.CubicScheduler(sparsifier, final_value=0.8, ramp_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[DataSparsityCallback(sparsifier, scheduler, every_n_steps=10)])
    trainer.train()                                   # later: trainer.train(resume_from_checkpoint=True)

What it does, on every rank (the sparsifier calls are collectives under ``torchrun`` /
``accelerate launch``; the Trainer calls every hook below on every rank):

* ``on_step_end`` — after the optimizer step and ``global_step += 1``, every
  ``every_n_steps`` steps: ``sparsifier.step()``, ``scheduler.step()``,
  ``sparsifier.squash_mask()`` (pruned weights become 0 in place, so the model the Trainer
  saves next is the sparsified one);
* ``on_save`` — right after the Trainer wrote ``<output_dir>/checkpoint-<step>``:
  :func:`distsparse.save_checkpoint` into ``checkpoint-<step>/distsparse_state.safetensors``
  (masks bit-packed, configs, step count, scheduler state; no pickle);
* ``on_train_begin`` — re-adds groups whose parameters the Trainer replaced while preparing
  the model (FSDP2 shards it inside ``train()``); when the Trainer resumed (``global_step > 0``):
  :func:`distsparse.load_checkpoint` from that checkpoint folder, after the Trainer loaded the
  weights; a folder without the file raises :class:`~distsparse.CheckpointNotFoundError`
  saying so;
* ``on_log`` — ``sparsity/<name>`` (fraction of pruned elements, ``sparsifier.sparsity()``:
  each rank's own masks, no collective) of every group into the logs (and
  ``trainer.state.log_history``); it never waits on the other ranks.

Which folder a resume loads: the ``resume_from_checkpoint`` given to this callback, else
``args.resume_from_checkpoint`` when it is a path, else ``<output_dir>/checkpoint-<global_step>``
— what ``trainer.train(resume_from_checkpoint=True)`` and
``trainer.train(resume_from_checkpoint="<output_dir>/checkpoint-N")`` load. The Trainer does not
tell callbacks the path it was given: for a folder outside ``output_dir`` pass it to the
callback too.

Limitations:
    Hyperparameter search (per-trial run folders) and ``load_best_model_at_end`` (the best
    weights come back, the sparsity state stays at the last step) are not handled.
    FSDP2 parameters (``DTensor`` ``Shard(0)``) are *sharded* groups; the Trainer shards the
    model inside ``train()``, after the sparsifier was built, so ``on_train_begin`` re-adds the
    groups whose parameters it replaced (see :meth:`DataSparsityCallback._adopt_replaced_parameters`).
    FSDP1 / DeepSpeed parameters are refused by ``add_data``. Integrations listed
    in ``report_to`` run their ``on_log`` before user callbacks and do not see the
    sparsity values; the console printer and ``log_history`` do.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from ..sparsifier import check_scheduler
from ..checkpoint import CheckpointNotFoundError, load_checkpoint, save_checkpoint

__all__ = ["DataSparsityCallback", "STATE_FILENAME"]

#: File written into every ``checkpoint-<step>`` folder.
STATE_FILENAME = "distsparse_state.safetensors"


class DataSparsityCallback(TrainerCallback):
    """Drive a distsparse sparsifier (and scheduler) from ``transformers.Trainer``.

    Args:
        sparsifier: a :class:`~distsparse.BaseDataSparsifier` holding the model's own
            parameters (``add_data(name, param)``; pass the parameters of the model given
            to the Trainer, before or after wrapping: DDP keeps the same ``Parameter`` objects).
        scheduler: a :class:`~distsparse.BaseDataScheduler` of that sparsifier, or ``None``.
        every_n_steps: step the sparsifier and scheduler every N optimizer steps (``1``).
        filename: the state file inside each checkpoint folder.
        resume_from_checkpoint: the folder to restore from when the Trainer resumes, if it is
            not ``<output_dir>/checkpoint-<global_step>`` (see the module docstring).
        log_sparsity: add ``sparsity/<name>`` to the Trainer's logs.

    Every rank must hold the same groups; the hooks are collectives. A Trainer running
    another number of processes than the sparsifier's process group is refused at
    ``on_train_begin`` with ``RuntimeError``.
    """

    def __init__(self, sparsifier: Any, scheduler: Any | None = None, *, every_n_steps: int = 1,
                 filename: str = STATE_FILENAME, resume_from_checkpoint: str | os.PathLike[str] | None = None,
                 log_sparsity: bool = True) -> None:
        check_scheduler(sparsifier, scheduler)
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
            raise ValueError(f"filename must be a plain file name inside the checkpoint folder, got {filename!r}")
        self.sparsifier, self.scheduler = sparsifier, scheduler
        self.every_n_steps, self.filename = every_n_steps, filename
        self.resume_from_checkpoint = resume_from_checkpoint
        self.log_sparsity = log_sparsity
        #: The folder the state was restored from at the last ``on_train_begin`` (or None).
        self.restored_from: str | None = None

    # -- checks ---------------------------------------------------------------------
    def _check_world(self, args: Any) -> None:
        trainer_world = int(getattr(args, "world_size", 1))
        if trainer_world != self.sparsifier.world_size:
            raise RuntimeError(
                f"DataSparsityCallback: the Trainer runs {trainer_world} process(es) but the sparsifier's "
                f"process group has {self.sparsifier.world_size} rank(s) (torch.distributed world size "
                f"{self.sparsifier.job_world_size}); masks would not be shared over the ranks training the model. Build "
                "the sparsifier on the whole world (no process_group=), and launch with `torchrun "
                "--nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` (on CPU: "
                "TrainingArguments(use_cpu=True)).")

    def _resume_folder(self, args: Any, global_step: int) -> str:
        if self.resume_from_checkpoint is not None:
            return os.fspath(self.resume_from_checkpoint)
        given = getattr(args, "resume_from_checkpoint", None)
        if isinstance(given, (str, os.PathLike)) and os.path.isdir(given) and \
                _saved_step(os.fspath(given)) == global_step:
            return os.fspath(given)
        return os.path.join(args.output_dir, f"checkpoint-{global_step}")

    # -- hooks ----------------------------------------------------------------------
    def _adopt_replaced_parameters(self, model: Any) -> None:
        """Re-add every group whose parameter the Trainer replaced while preparing the model.

        With FSDP2 (``accelerate``'s ``fsdp_version: 2``) the Trainer calls ``fully_shard``
        inside ``train()``, after the sparsifier was built: the model's parameters become new
        ``DTensor`` objects and the ones added earlier are no longer trained. A group named
        like a parameter of ``model`` that is not that very parameter is re-added with it (its
        mask kept when the layout is the same, else a fresh one; a resume loads the saved masks
        right after). DDP keeps the same ``Parameter`` objects: nothing changes there.
        """
        if model is None or not hasattr(model, "named_parameters"):
            return
        params = dict(model.named_parameters())
        for name in list(self.sparsifier.data_groups):
            param = params.get(name)
            if param is None:
                continue
            held = self.sparsifier.get_data(name, return_original=True)
            if held is param:
                continue
            same_layout = type(held) is type(param) and tuple(held.shape) == tuple(param.shape) and \
                getattr(held, "placements", None) == getattr(param, "placements", None)
            self.sparsifier.add_data(name, param, reuse_mask=same_layout)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check_world(args)
        self._adopt_replaced_parameters(kwargs.get("model"))
        self.restored_from = None
        if state.global_step <= 0:
            return
        folder = self._resume_folder(args, state.global_step)
        path = os.path.join(folder, self.filename)
        try:
            load_checkpoint(path, self.sparsifier, self.scheduler)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"DataSparsityCallback: the Trainer resumed at step {state.global_step} but {path!r} does not "
                "exist, so the masks and the schedule cannot be resumed (was the checkpoint written without "
                "this callback, or is the folder outside output_dir? then pass "
                "DataSparsityCallback(..., resume_from_checkpoint=<folder>)). "
                f"Original error: {exc}") from None
        self.restored_from = folder

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every_n_steps == 0:
            self.sparsifier.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.sparsifier.squash_mask()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_checkpoint(os.path.join(folder, self.filename), self.sparsifier, self.scheduler)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not self.log_sparsity or logs is None:
            return
        # sparsity() counts each rank's own mask tensors: never a collective, so ranks that log
        # at different moments cannot hang (``mask.float().mean()`` of a sharded group's DTensor
        # mask would all-reduce). A sharded group's figure is this rank's rows.
        values = {f"sparsity/{name}": level for name, level in self.sparsifier.sparsity().items()}
        logs.update(values)
        # The Trainer appended a copy of these logs to log_history just before on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _saved_step(folder: str) -> int | None:
    """``global_step`` recorded in a checkpoint folder's ``trainer_state.json`` (None if unreadable)."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
