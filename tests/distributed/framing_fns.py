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


def one_round_step() -> dict:
    """A step whose every mask comes from the rank's own data — one replicated table (computed
    everywhere) and a local group: its collectives, recorded, and whether its masks are the
    single-process ones."""
    from distsparse.masks import norm_block_mask

    rank = dist.get_rank()
    table = nn.Parameter(torch.randn(389, 37, generator=torch.Generator().manual_seed(11)))
    batch = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 + rank))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("table", table)
    sp.add_data("batch", batch, replicated=False)
    kind = sp._plan().groups["table"].kind
    sp.step()
    framing_before = sp.comm.framing_bytes_sent
    with _Recorder() as step:
        sp.step()
    expected = {"table": table.detach(), "batch": batch}
    return {"kind": kind, "step": step.calls, "framing_bytes": sp.comm.framing_bytes_sent - framing_before,
            "bytes_sent": sp.last_step_stats["bytes_sent"],
            "single_process": {n: bool(torch.equal(sp.get_mask(n), norm_block_mask(d, 0.5, (1, 4), 4, "L1")))
                               for n, d in expected.items()}}


def one_round_mismatches() -> dict:
    """A rank in a one-round step() meets (a) a rank in scheduler.step(), (b) a rank whose
    description differs (another min_split_elements): every rank raises, naming it; no mask
    changes."""
    rank = dist.get_rank()
    out = {}
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("table", nn.Parameter(torch.randn(389, 37, generator=torch.Generator().manual_seed(11))))
    sch = distsparse.LinearScheduler(sp, final_value=0.8, ramp_steps=10)
    out["kind"] = sp._plan().groups["table"].kind
    before = sp.get_mask("table").clone()
    out["step_vs_scheduler"] = capture_error(sp.step if rank == 0 else sch.step)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("table", nn.Parameter(torch.randn(389, 37, generator=torch.Generator().manual_seed(11))))
    if rank == 1:
        sp.min_split_elements = 1000
    out["kinds_by_rank"] = sp._plan().groups["table"].kind
    out["differing_description"] = capture_error(sp.step)
    out["unchanged"] = bool(torch.equal(sp.get_mask("table"), before))
    return out
