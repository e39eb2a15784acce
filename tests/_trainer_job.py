"""A tiny GPT-2 trained by ``transformers.Trainer`` with DataSparsityCallback: the helpers
of tests/test_transformers_integration.py, and its 2-process body under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_trainer_job.py OUT_DIR

Every rank runs, in step, and writes what it saw to ``OUT_DIR/rank<r>.json``:

* ``full``: 8 steps, the sparsifier stepped every 2, checkpoints at 4 and 8;
* ``resumed``: the same run stopped after the checkpoint at step 4, then a new Trainer
  resumes it (``resume_from_checkpoint=True``) to step 8;
* ``wrong_world``: a sparsifier bound to a one-rank group under the 2-process Trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import distsparse
from distsparse.integrations.transformers import DataSparsityCallback


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def sparsity(net: GPT2LMHeadModel, process_group: Any = None, ramp_steps: int = 3):
    sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4), process_group=process_group)
    for name, param in net.named_parameters():
        if param.dim() == 2:
            sp.add_data(name, param)
    sch = distsparse.LinearScheduler(sp, final_value=0.7, initial_value=0.1, ramp_steps=ramp_steps)
    return sp, sch


class StopAt(TrainerCallback):
    """Simulates an interruption: training stops after step ``step`` (its checkpoint saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def trainer(out: str, callbacks: list, net: GPT2LMHeadModel, max_steps: int = 8) -> Trainer:
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=4, logging_steps=2,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, log_level="error")
    return Trainer(model=net, args=args, train_dataset=dataset(), callbacks=callbacks)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def summary(t: Trainer, cb: DataSparsityCallback) -> dict:
    sp, sch = cb.sparsifier, cb.scheduler
    net = t.model
    return {
        "masks": {n: digest(sp.get_mask(n)) for n in sorted(sp.data_groups)},
        "weights": {n: digest(p) for n, p in net.named_parameters()},
        "weights_match_masks": all(bool((p.detach()[~sp.get_mask(n)] == 0).all())
                                   for n, p in net.named_parameters() if n in sp.data_groups),
        "step_count": sp.step_count, "scheduler": sch.state_dict(), "global_step": t.state.global_step,
        "logged": [{k: v for k, v in e.items() if k.startswith("sparsity/") or k == "step"}
                   for e in t.state.log_history if "loss" in e],
        "restored_from": cb.restored_from,
        "owners": sorted({sp.owner_of(n) for n in sp.data_groups}),
    }


def run(out: str, stop_at: int | None = None, resume: Any = None, every_n_steps: int = 2) -> tuple[Trainer, DataSparsityCallback]:
    net = model()
    sp, sch = sparsity(net)
    cb = DataSparsityCallback(sp, sch, every_n_steps=every_n_steps)
    t = trainer(out, [cb] + ([StopAt(stop_at)] if stop_at else []), net)
    t.train(resume_from_checkpoint=resume)
    return t, cb


def main(out: str) -> None:
    hf_logging.set_verbosity_error()
    result: dict = {}
    t, cb = run(f"{out}/full")
    rank = dist.get_rank()
    result["full"] = summary(t, cb)
    t, cb = run(f"{out}/resumed", stop_at=4)
    result["part"] = summary(t, cb)
    t, cb = run(f"{out}/resumed", resume=True)
    result["resumed"] = summary(t, cb)

    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    net = model()
    sp, sch = sparsity(net, process_group=groups[rank])
    try:
        trainer(f"{out}/bad", [DataSparsityCallback(sp, sch)], net).train()
        result["wrong_world"] = "no error"
    except RuntimeError as exc:
        result["wrong_world"] = str(exc)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    os.environ.setdefault("DISTSPARSE_COLLECTIVE_TIMEOUT", "60")
    main(sys.argv[1])
