"""Per-rank functions of the distributed checkpoint fault tests (run by launcher.run_ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from _checkpoint_util import build, snapshot
from distsparse import load_checkpoint, save_checkpoint


def _capture(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "value_error": isinstance(exc, ValueError)}


def faults(folder: str) -> dict:
    """Every failure mode of a distributed save/load raises on every rank and changes nothing."""
    rank = dist.get_rank()
    folder_path = Path(folder)
    out: dict = {"rank": rank}

    # Ranks that disagree (one has an extra group): every rank raises, no file is written.
    sp_bad, sch_bad, _ = build(steps=1)
    if rank == 1:
        sp_bad.add_data("only.on.rank1", nn.Parameter(torch.randn(4, 4)))
    try:
        save_checkpoint(folder_path / "disagree.safetensors", sp_bad, sch_bad)
        out["disagree"] = None
    except Exception as exc:  # noqa: BLE001
        out["disagree"] = _capture(exc)
    dist.barrier()
    out["disagree_file"] = (folder_path / "disagree.safetensors").exists()

    # A good save; every rank sees the complete file on return.
    sp, sch, _ = build(steps=3)
    good = folder_path / "good.safetensors"
    save_checkpoint(good, sp, sch)
    out["good_size_on_return"] = good.stat().st_size
    good_bytes = good.read_bytes()

    # The writer fails (rename refused on rank 0 only): every rank raises, the file stays.
    sp.step()
    real_replace = os.replace
    if rank == 0:
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied (injected)")
        os.replace = refuse
    try:
        save_checkpoint(good, sp, sch)
        out["write_error"] = None
    except Exception as exc:  # noqa: BLE001
        out["write_error"] = _capture(exc)
    finally:
        os.replace = real_replace
    dist.barrier()
    out["good_unchanged"] = good.read_bytes() == good_bytes
    out["leftovers"] = sorted(p.name for p in folder_path.iterdir() if p.name.startswith("."))

    # Only rank 1 cannot take the file (strict, it holds a group the file lacks): every
    # rank raises and neither changes anything.
    target, target_sch, _ = build(seed=3, steps=1)
    if rank == 1:
        target.add_data("extra.weight", nn.Parameter(torch.randn(4, 8)))
    before = snapshot(target, target_sch)
    try:
        load_checkpoint(good, target, target_sch)
        out["load_error"] = None
    except Exception as exc:  # noqa: BLE001
        out["load_error"] = _capture(exc)
    out["load_unchanged"] = snapshot(target, target_sch) == before

    # A missing file: every rank raises CheckpointNotFoundError.
    try:
        load_checkpoint(folder_path / "missing.safetensors", target, target_sch)
        out["missing"] = None
    except Exception as exc:  # noqa: BLE001
        out["missing"] = _capture(exc)

    # And the good file loads on every rank.
    fresh, fresh_sch, _ = build(seed=4, steps=1)
    sp_saved, sch_saved, _ = build(steps=3)
    load_checkpoint(good, fresh, fresh_sch)
    out["loaded_equal"] = snapshot(fresh, fresh_sch) == snapshot(sp_saved, sch_saved)
    return out
