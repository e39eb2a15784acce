"""Rank functions: what the framing of every distsparse operation (Comm.begin / finish)
sends on the success path, and that every mismatch still fails on every rank, named."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import distsparse
from distsparse.distributed.comm import Comm
from rank_fns import capture_error

_RECORDED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "barrier")


class _Recorder:
    """Wraps torch.distributed's collectives; records (name, bytes of the local tensor)."""

    def __init__(self):
        self.calls: list[list] = []
        self._saved = {}

    def __enter__(self):
        for name in _RECORDED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                tensor = args[1] if _name.startswith("all_gather") else (args[0] if args else None)
                size = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else None
                self.calls.append([_name, size])
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _sparsifier(groups: int = 3):
    gen = torch.Generator().manual_seed(3)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    for i in range(groups):
        sp.add_data(f"t{i}", nn.Parameter(torch.randn(32, 16, generator=gen)))
    return sp


def success_path() -> dict:
    """The collectives of one scheduler.step() and the framing of one step(), recorded."""
    sp = _sparsifier()
    sch = distsparse.LinearScheduler(sp, final_value=0.8, ramp_steps=10)
    sp.step()
    comm = sp.comm
    framing_before = comm.framing_bytes_sent
    with _Recorder() as sched:
        sch.step()
    sched_framing = comm.framing_bytes_sent - framing_before
    framing_before = comm.framing_bytes_sent
    with _Recorder() as step:
        sp.step()
    return {"scheduler": sched.calls, "scheduler_framing_bytes": sched_framing,
            "step": step.calls, "step_framing_bytes": comm.framing_bytes_sent - framing_before,
            "levels": {n: sp.data_groups[n]["sparsity_level"] for n in sorted(sp.data_groups)}}


def mismatches() -> dict:
    """Comm-level cases: a rank in ``finish`` meets a rank in another ``begin``; inline
    payloads of different lengths; a decided value over 4 KiB from rank 1; rank 1's
    decision raising; one rank's local error in raise_if_any_failed."""
    rank = dist.get_rank()
    out = {}
    comm = Comm()
    comm.begin("A")
    if rank == 0:
        out["finish_vs_begin"] = capture_error(comm.finish, "A")
    else:
        out["finish_vs_begin"] = capture_error(comm.begin, "B")
    out["calls_after"] = comm.calls

    comm = Comm()
    inline = bytes(range(rank * 3 % 256)) * (rank + 1)
    out["inline"] = [list(p) for p in comm.begin("with inline", {"x": {"same": 1}}, inline)]
    comm.finish("with inline")
    out["empty_inline"] = [list(p) for p in comm.begin("no inline")]
    comm.finish("no inline")
    out["inline_on_rank_0_only"] = capture_error(comm.begin, "odd", None, b"x" if rank == 0 else None)

    big = {f"group_{i:05d}": i / 7 for i in range(400)}  # ~8 kB of JSON

    def decide():
        import json

        with comm.decided_operation("decide", {}, lambda: big if dist.get_rank() == 1 else None,
                                    lambda v: json.dumps(v).encode(), json.loads, src=1) as value:
            comm.finish("decide")
        return value

    out["decided_equal"] = decide() == big

    def boom():
        raise ValueError("no decision from rank 1")

    def failing_decision():
        with comm.decided_operation("decide", {}, boom, lambda v: b"", lambda b: None, src=1):
            comm.finish("decide")

    out["decided_error"] = capture_error(failing_decision)
    errors = ["rank 1's disk is full"] if rank == 1 else []
    local = OSError("rank 1's disk is full") if rank == 1 else None
    out["any_failed"] = capture_error(comm.raise_if_any_failed, errors, "writing", local_error=local)
    out["usable"] = comm.broken is None
    return out
