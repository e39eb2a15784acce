"""accelerate save_state/load_state carry the sparsity state (run by test_accelerate_integration.py).

    python tests/_accelerate_job.py --folder DIR --expect-world 1
    accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_job.py --folder DIR --expect-world 2
    accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_job.py --folder DIR --no-cpu   # mismatch

Each rank writes its findings to ``DIR/result-<rank>.json`` (files, not a shared stdout
that two ranks could interleave).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
from torch import nn


def _digest(mask: torch.Tensor) -> str:
    from distsparse.masks import pack_bits

    return hashlib.sha256(pack_bits(mask).numpy().tobytes()).hexdigest()


def _report(folder: str, result: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(folder, f"result-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--expect-world", type=int, default=1)
    parser.add_argument("--no-cpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from accelerate import Accelerator

    from distsparse import DataNormSparsifier, LinearScheduler, register_for_checkpointing

    accelerator = Accelerator() if args.no_cpu else Accelerator(cpu=True)
    sp = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 4))
    if args.no_cpu:
        try:
            register_for_checkpointing(accelerator, sp)
        except RuntimeError as exc:
            _report(args.folder, {"mismatch": str(exc)})
            return 0
        _report(args.folder, {"mismatch": None})
        return 0

    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == args.expect_world, (world, args.expect_world)
    torch.manual_seed(0)  # the same model on every rank
    model = accelerator.prepare(nn.Sequential(nn.Embedding(48, 16), nn.Linear(16, 4)))
    inner = accelerator.unwrap_model(model)
    sp.add_data("0.weight", inner[0])
    sp.add_data("1.weight", inner[1].weight)
    g = torch.Generator().manual_seed(100 + rank)
    sp.add_data("batch", torch.randn(6, 8, generator=g))  # per-rank data: a local group
    sch = LinearScheduler(sp, final_value=0.8, initial_value=0.1, ramp_steps=10)
    save_handle, load_handle = register_for_checkpointing(accelerator, sp, sch)

    def state() -> dict:
        return {"masks": {n: _digest(sp.get_mask(n)) for n in sorted(sp.data_groups)},
                "scheduler": sch.state_dict(), "step_count": sp.step_count,
                "levels": {n: c["sparsity_level"] for n, c in sorted(sp.data_groups.items())}}

    for _ in range(3):
        with torch.no_grad():
            inner[0].weight.add_(torch.randn(48, 16, generator=torch.Generator().manual_seed(_)))
        sp.step()
        sch.step()
    saved = state()
    checkpoint = os.path.join(args.folder, "step3")
    accelerator.save_state(checkpoint)
    files = sorted(os.listdir(checkpoint))
    for _ in range(2):  # move on, then go back
        sp.step()
        sch.step()
    moved = state()
    accelerator.load_state(checkpoint)
    restored = state()
    save_handle.remove()
    load_handle.remove()
    accelerator.wait_for_everyone()
    without = os.path.join(args.folder, "unhooked")
    accelerator.save_state(without)
    _report(args.folder, {
        "rank": rank, "world": world, "files": files, "restored": restored == saved,
        "moved": moved != saved, "unhooked_files": sorted(os.listdir(without)),
        "batch_mask": saved["masks"]["batch"], "table_mask": saved["masks"]["0.weight"],
    })
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
