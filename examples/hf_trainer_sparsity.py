"""A tiny GPT-2 (built from a config, nothing downloaded) trained by transformers.Trainer
with its weight matrices sparsified on a schedule, resumable.

    python examples/hf_trainer_sparsity.py                                          # 1 CPU process
    torchrun --nproc_per_node 2 examples/hf_trainer_sparsity.py                     # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 examples/hf_trainer_sparsity.py --max-steps 120     # resumes from the newest checkpoint

DataSparsityCallback steps the sparsifier and a cubic schedule (0 -> 70 %) every 5
optimizer steps, squashes the masks into the model, writes
``checkpoint-<step>/distsparse_state.safetensors`` beside the Trainer's files and restores
it when the Trainer resumes. The per-group sparsity appears in the Trainer's logs.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import distsparse
from distsparse.integrations.transformers import DataSparsityCallback


def data(n: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Sequences counting up from a random start (mod 128): learnable next-token targets."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 128, (n, 1), generator=g)
    ids = (start + torch.arange(32)) % 128
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=80, help="train up to this optimizer step (default 80)")
    parser.add_argument("--out", default="runs/hf_trainer", help="output_dir (default runs/hf_trainer)")
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=16, learning_rate=3e-3,
        save_steps=40, logging_steps=20, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # before the sparsifier: under torchrun this creates the process group
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0))

    sparsifier = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    for name, param in model.named_parameters():
        if param.dim() == 2:  # embeddings and weight matrices; the tied lm_head is wte
            sparsifier.add_data(name, param)
    scheduler = distsparse.CubicScheduler(sparsifier, final_value=0.7, ramp_steps=10)  # 10 steps x 5 = 50 optimizer steps
    trainer = Trainer(model=model, args=training_args, train_dataset=data(),
                      callbacks=[DataSparsityCallback(sparsifier, scheduler, every_n_steps=5)])
    last = get_last_checkpoint(args.out) if os.path.isdir(args.out) else None
    trainer.train(resume_from_checkpoint=last)

    if trainer.is_world_process_zero():
        print(f"world_size={training_args.world_size} global_step={trainer.state.global_step} "
              f"sparsifier steps={sparsifier.step_count} resumed from={last}")
        for name in sparsifier.data_groups:
            weight = sparsifier.get_data(name)
            print(f"  {name:36s} {tuple(weight.shape)!s:10s} zeros {float((weight == 0).float().mean()):.3f}")


if __name__ == "__main__":
    main()
