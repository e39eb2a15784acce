#!/usr/bin/env python
"""Per-operation overhead of distsparse's framing: ``scheduler.step()`` and a tiny ``step()``.

    python benchmarks/bench_comm.py                       # worlds 2,4, ~20 s
    python benchmarks/bench_comm.py --source /other/checkout --label before

``scheduler.step()`` moves a few hundred bytes of values, so its time is almost all the
framing every distsparse operation pays (begin + finish) plus one decision on rank 0.
A ``step()`` on 8 tiny replicated tables shows the same overhead on the sparsifier.
Beside them: the time of one raw gloo all-reduce of 8 int64 (the transport floor) and the
framing bytes this rank sent per operation (``Comm.framing_bytes_sent`` where present).

Each world size is a fresh set of processes (gloo on 127.0.0.1, one thread each, a hard
timeout); each call is preceded by a barrier, its time is the max over ranks, the median
over calls is reported. ``--source`` imports distsparse from another checkout (for a
before/after). Written to ``benchmarks/results/comm.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

TARGET_SCHED_MS = 1.5


def run_child(cfg: dict) -> dict:
    if cfg.get("source"):
        sys.path.insert(0, cfg["source"])
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn

    import distsparse

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    gen = torch.Generator().manual_seed(5)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    for i in range(cfg["tables"]):
        sp.add_data(f"t{i}", nn.Parameter(torch.randn(64, 16, generator=gen)))
    sch = distsparse.LinearScheduler(sp, final_value=0.8, initial_value=0.0, start_step=0, ramp_steps=10_000)
    comm = sp.comm

    def timed(fn, n):
        out, framing = [], []
        for _ in range(n):
            dist.barrier()
            before = getattr(comm, "framing_bytes_sent", None)
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            if before is not None:
                framing.append(comm.framing_bytes_sent - before)
        return out, framing

    sp.step()
    sch.step()
    sched_s, sched_framing = timed(sch.step, cfg["calls"])
    step_s, step_framing = timed(sp.step, cfg["calls"])
    buf = torch.zeros(8, dtype=torch.int64)
    floor_s, _ = timed(lambda: dist.all_reduce(buf, op=dist.ReduceOp.MIN), cfg["calls"])
    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, sched_s=sched_s, step_s=step_s, floor_s=floor_s,
                sched_framing=sched_framing, step_framing=step_framing, module=distsparse.__file__)


def _median_of_max(results: list[dict], key: str) -> float:
    per_call = [max(vals) for vals in zip(*(r[key] for r in results))]
    return statistics.median(per_call)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--source", default=None, help="checkout to import distsparse from")
    ap.add_argument("--label", default=None, help="name of this run in the report")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "comm.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    cfg = dict(calls=args.calls, tables=args.tables, source=os.path.abspath(args.source) if args.source else None)
    info = _common.machine_info()
    started = time.perf_counter()
    rows, errors = [], []
    for world in [int(w) for w in args.worlds.split(",")]:
        results = _common.launch_ranks(__file__, "comm", world, cfg, args.timeout)
        bad = [r for r in results if "error" in r]
        if bad:
            errors += [f"world {world} rank {r['rank']}: {r['error']}" for r in bad]
            continue
        framing = results[0]["sched_framing"]
        rows.append([world, f"{_median_of_max(results, 'sched_s') * 1e3:.2f}",
                     f"{_median_of_max(results, 'step_s') * 1e3:.2f}",
                     f"{_median_of_max(results, 'floor_s') * 1e3:.3f}",
                     f"{statistics.median(framing):.0f}" if framing else "n/a",
                     f"{statistics.median(results[0]['step_framing']):.0f}" if framing else "n/a"])
    label = args.label or "this checkout"
    md = [f"# distsparse framing overhead ({label})\n", _common.machine_info_md(info),
          f"- distsparse imported from: {args.source or _common.REPO_ROOT}; {args.calls} calls per figure, "
          f"{args.tables} tables of 64 x 16; median over calls of the max over ranks\n",
          _common.md_table(["world", "scheduler.step() ms", "step() ms (8 tiny tables)",
                            "raw all_reduce(8 x int64) ms", "framing bytes sent / scheduler.step()",
                            "framing bytes sent / step()"], rows),
          f"Target: scheduler.step() at world 2 <= {TARGET_SCHED_MS} ms (median, gloo).\n"]
    if errors:
        md.append("Errors:\n\n" + "\n".join(f"- {e}" for e in errors) + "\n")
    _common.write_report(md, args.out, time.perf_counter() - started)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
