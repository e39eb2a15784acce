#!/usr/bin/env python
"""distsparse DataNormSparsifier.step() on one big table: FSDP2-sharded vs replicated vs whole.

    python benchmarks/bench_fsdp2.py           # one 4,000,000 x 64 float32 table (~2-4 min)
    python benchmarks/bench_fsdp2.py --quick   # 400,000 x 64

Three runs of the same table (``torch.randn`` from a fixed seed), block (1, 4), sparsity 0.5,
L1, each a fresh set of gloo processes on 127.0.0.1 with one thread each:

* ``whole``: world 1, the table a plain ``nn.Parameter``;
* ``replicated``: world 2, every rank holds the whole table as a plain ``nn.Parameter``
  (DDP-style); distsparse splits it over the ranks and all-gathers the bit-packed mask rows;
* ``sharded``: world 2, the table is an ``nn.Embedding`` wrapped with
  ``torch.distributed.fsdp.fully_shard`` on a 1-D mesh, so its weight is a ``Shard(0)``
  ``DTensor`` and each rank holds half the rows; only the selection's histograms travel.

Measured per run, per rank (after one warm-up step, ``--steps`` timed steps, each preceded
by a barrier):

* ``step()`` wall time: max over ranks per step, median over steps; each rank's process CPU
  time (median);
* ``sp.last_step_stats``: ``bytes_sent`` (what bench_distributed.py reports: every
  all-gather and all-reduce payload this rank sends, ring model), ``selection_bytes``,
  ``bytes_received``, median over steps;
* peak RSS growth during ``step()`` (``/proc/self/clear_refs`` + ``VmHWM``, see
  ``_common.timed_step``), max over steps;
* the masks: sha256 of each world-2 chunk of rows (the FSDP2 chunks), which must be the same
  in every run;
* the load average when the run starts.

Beside the world-2 / world-1 wall-time ratios the report prints the no-communication floor
(``bench_distributed.parallel_floor``: one process scoring the whole table vs two concurrent
processes scoring half each), since two processes on a 2-vCPU machine do not each run at full
speed. Results go to ``benchmarks/results/fsdp2.md`` (``fsdp2_quick.md`` with ``--quick``).
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
import bench_distributed as _bd  # noqa: E402  (ms, human_bytes, parallel_floor)

SEED = 777
TARGET_BYTES = 64 * 1024
TARGET_GROWTH_RATIO = 0.6
RUNS = (("whole", 1), ("replicated", 2), ("sharded", 2))
STAT_KEYS = ("bytes_sent", "selection_bytes", "bytes_received", "comm_seconds", "compute_seconds")


# --------------------------------------------------------------------------- child


def run_child(cfg: dict) -> dict:
    import gc
    import hashlib
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg["pg_timeout"]))
    import distsparse

    rows, cols = cfg["rows"], cfg["cols"]
    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED))
    half = -(-rows // 2)  # torch's chunk size for 2 shards: the rows of FSDP2's rank 0
    if cfg["mode"] == "sharded":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        emb = nn.Embedding(rows, cols, _weight=table)
        del table
        fully_shard(emb, mesh=init_device_mesh("cpu", (world,)))
        data = emb.weight  # a Shard(0) DTensor: this rank's rows only
        local_rows = data.to_local().shape[0]
        offset = rank * half
        assert type(data).__name__ == "DTensor" and local_rows == min(half, rows - offset), \
            (type(data), local_rows)
    else:
        data = nn.Parameter(table)
        del table
        local_rows, offset = rows, 0
    gc.collect()
    data_bytes_rank = local_rows * cols * 4

    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L1")
    sp.add_data("table", data)
    rss_after_add_kb = _common.proc_status_kb("VmRSS")

    dist.barrier()
    t0 = time.perf_counter()
    sp.step()
    warm_s = time.perf_counter() - t0

    step_s, cpu_s, growth_kb, stats = [], [], [], []
    for _ in range(cfg["steps"]):
        gc.collect()
        dist.barrier()
        dt, dc, grown = _common.timed_step(sp)
        step_s.append(dt)
        cpu_s.append(dc)
        growth_kb.append(grown)
        stats.append({k: float(v) for k, v in sp.last_step_stats.items()})

    # Hash each world-2 chunk of mask rows this rank holds (no gathering).
    mask = sp.get_mask("table")
    local_mask = mask.to_local() if cfg["mode"] == "sharded" else mask
    hashes = {}
    for start, stop in ((0, half), (half, rows)):
        a, b = max(start, offset), min(stop, offset + local_rows)
        if a >= b or (a, b) != (start, stop):
            continue
        piece = local_mask[a - offset:b - offset].to(torch.bool).contiguous()
        hashes[f"{start}:{stop}"] = hashlib.sha256(piece.numpy().tobytes()).hexdigest()
    kept = 1.0 - sp.sparsity()["table"]

    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, world=world, local_rows=local_rows, data_bytes_rank=data_bytes_rank,
                rss_after_add_kb=rss_after_add_kb, warmup_s=warm_s, step_s=step_s, step_cpu_s=cpu_s,
                step_growth_kb=growth_kb, stats=stats, hashes=hashes, kept_fraction_local=kept,
                placements=str(getattr(data, "placements", "plain tensor")))


# -------------------------------------------------------------------------- parent


def summarize(results: list[dict]) -> dict:
    n = len(results[0]["step_s"])
    per_step = [max(r["step_s"][i] for r in results) for i in range(n)]
    s = dict(step_median=statistics.median(per_step), step_all=per_step,
             warmup=max(r["warmup_s"] for r in results),
             cpu={r["rank"]: statistics.median(r["step_cpu_s"]) for r in results},
             growth_kb={r["rank"]: max(r["step_growth_kb"]) for r in results},
             data_bytes={r["rank"]: r["data_bytes_rank"] for r in results},
             rss_after_add_kb={r["rank"]: r["rss_after_add_kb"] for r in results},
             placements=results[0]["placements"], hashes={})
    s["stats"] = {r["rank"]: {k: statistics.median(x.get(k, 0.0) for x in r["stats"]) for k in STAT_KEYS}
                  for r in results}
    for r in results:
        s["hashes"].update(r["hashes"])
    s["hashes_agree"] = all(s["hashes"][k] == v for r in results for k, v in r["hashes"].items())
    return s


def _per_rank(d: dict, fmt) -> str:
    return " / ".join(f"r{rk}: {fmt(v)}" for rk, v in sorted(d.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x fewer rows (400,000)")
    ap.add_argument("--rows", type=int, default=None, help="rows of the table (4,000,000)")
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed step() calls after a warm-up")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--runs", default="whole,replicated,sharded", help="which runs (comma-separated)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    rows = args.rows or (400_000 if args.quick else 4_000_000)
    cfg = dict(rows=rows, cols=args.cols, steps=args.steps, pg_timeout=max(60.0, args.timeout / 2))
    out = args.out or os.path.join(HERE, "results", "fsdp2_quick.md" if args.quick else "fsdp2.md")
    info = _common.machine_info()
    t_start = time.perf_counter()
    summaries, errors, loads = {}, [], {}
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - {m for m, _ in RUNS})
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {[m for m, _ in RUNS]}")
    runs = [(m, w) for m, w in RUNS if m in wanted]
    for mode, world in runs:
        loads[mode] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"[{mode}, world {world}] launching (load {loads[mode]}) ...", file=sys.stderr, flush=True)
        res = _common.launch_ranks(__file__, mode, world, cfg, args.timeout)
        bad = [r for r in res if "error" in r]
        if bad:
            errors += [f"{mode} rank {r['rank']}: {r['error']}" for r in bad]
            print("  ERROR: " + "; ".join(r["error"][:2000] for r in bad), file=sys.stderr)
            continue
        summaries[mode] = summarize(res)
        print(f"  step median {_bd.ms(summaries[mode]['step_median'])}", file=sys.stderr, flush=True)
    loads["floor"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    floor = _bd.parallel_floor(argparse.Namespace(tables=1, rows=rows, cols=args.cols, steps=args.steps,
                                                   timeout=args.timeout, quick=False))

    modes = [m for m, _ in runs]
    whole = summaries.get("whole")

    def cell(mode, f):
        return f(summaries[mode]) if mode in summaries else "error"

    packed = rows * args.cols / 8
    table = [
        ["run"] + [f"{m}, world {w}" for m, w in runs],
        ["data layout per rank"] + [cell(m, lambda s: f"{s['placements']}; "
                                         + _per_rank(s["data_bytes"], lambda b: f"{b / 1e6:.0f} MB"))
                                    for m in modes],
        ["load average (1/5/15 min) when the run started"] + [loads.get(m, "?") for m in modes],
        [f"step() wall time (median of {args.steps}; max over ranks)"]
        + [cell(m, lambda s: _bd.ms(s["step_median"])) for m in modes],
        ["step() all timed calls"] + [cell(m, lambda s: " / ".join(_bd.ms(x) for x in s["step_all"]))
                                      for m in modes],
        ["step() wall ratio to world 1"] + [cell(m, lambda s: f"{s['step_median'] / whole['step_median']:.2f}"
                                                 if whole else "n/a") for m in modes],
        ["step() process CPU time per rank (median)"] + [cell(m, lambda s: _per_rank(s["cpu"], _bd.ms))
                                                         for m in modes],
        ["CPU-time ratio to world 1 (busiest rank)"]
        + [cell(m, lambda s: f"{max(s['cpu'].values()) / max(whole['cpu'].values()):.2f}" if whole else "n/a")
           for m in modes],
        ["bytes sent per rank per step (median)"]
        + [cell(m, lambda s: _per_rank({rk: v["bytes_sent"] for rk, v in s["stats"].items()},
                                       lambda b: f"{b:,.0f} B")) for m in modes],
        ["  of which selection histograms"]
        + [cell(m, lambda s: _per_rank({rk: v["selection_bytes"] for rk, v in s["stats"].items()},
                                       lambda b: f"{b:,.0f} B")) for m in modes],
        ["communication / compute time per rank (median, last_step_stats)"]
        + [cell(m, lambda s: _per_rank(s["stats"], lambda v: f"{_bd.ms(v['comm_seconds'])} / "
                                                             f"{_bd.ms(v['compute_seconds'])}")) for m in modes],
        ["peak RSS growth during step(), per rank (max over steps)"]
        + [cell(m, lambda s: _per_rank(s["growth_kb"], lambda kb: f"{kb * 1024 / 1e6:.0f} MB")) for m in modes],
        ["  as a multiple of world 1's growth"]
        + [cell(m, lambda s: _per_rank(s["growth_kb"], lambda kb: f"{kb / max(whole['growth_kb'].values()):.2f}x")
                if whole else "n/a") for m in modes],
        ["RSS after add_data (table + mask), per rank"]
        + [cell(m, lambda s: _per_rank(s["rss_after_add_kb"], lambda kb: f"{kb * 1024 / 1e6:.0f} MB"))
           for m in modes],
        ["masks: every world-2 chunk of rows identical in all runs"]
        + [cell(m, lambda s: "yes" if all(o["hashes"].get(k, v) == v for o in summaries.values()
                                           for k, v in s["hashes"].items()) else "NO") for m in modes],
        ["step() warm-up call (max over ranks)"] + [cell(m, lambda s: _bd.ms(s["warmup"])) for m in modes],
    ]
    checks = []
    if "sharded" in summaries:
        def most_sent(mode: str) -> float:
            return max(v["bytes_sent"] for v in summaries[mode]["stats"].values())

        sent = most_sent("sharded")
        checks.append(f"sharded bytes sent per rank per step {sent:,.0f} B < {TARGET_BYTES:,} B (64 KiB): "
                      + ("PASS" if sent < TARGET_BYTES else "FAIL")
                      + f" (the whole mask bit-packed: {packed:,.0f} B"
                      + (f"; replicated sends {most_sent('replicated'):,.0f} B" if "replicated" in summaries else "")
                      + ")")
        if whole:
            ratio = max(summaries["sharded"]["growth_kb"].values()) / max(whole["growth_kb"].values())
            checks.append(f"sharded peak RSS growth during step(), worst rank / world 1: {ratio:.2f} <= "
                          f"{TARGET_GROWTH_RATIO}: " + ("PASS" if ratio <= TARGET_GROWTH_RATIO else "FAIL"))
    if floor is not None:
        solo, pair = floor
        checks.append(f"no-communication floor (load {loads['floor']}): one process scores the whole table in "
                      f"{_bd.ms(solo)}, two concurrent processes half each in {_bd.ms(pair)} (ratio "
                      f"{pair / solo:.2f}): the best world-2 wall ratio this machine allows")
    else:
        checks.append("no-communication floor: failed or timed out")
    checks += errors

    total = time.perf_counter() - t_start
    cmd = "python benchmarks/bench_fsdp2.py" + (" --quick" if args.quick else "")
    md = [f"# distsparse step(): one {rows:,} x {args.cols} table, FSDP2-sharded vs replicated vs whole"
          f"{' (--quick)' if args.quick else ''}\n",
          f"Rerun (from the repository root, on a quiet machine): `{cmd}`\n",
          f"Generated on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One float32 table of "
          f"{rows:,} x {args.cols} ({rows * args.cols * 4 / 1e6:.0f} MB; its mask bit-packed "
          f"{packed / 1e6:.1f} MB), block (1,4), sparsity 0.5, L1; gloo on 127.0.0.1, 1 thread per "
          f"process; {args.steps} timed steps after a warm-up. Every world-2 ratio must be read beside the "
          "no-communication floor and the per-rank CPU times: this machine's 2 vCPUs do not run two "
          "processes at full speed side by side.\n",
          _common.machine_info_md(info),
          _common.md_table(table[0], table[1:]),
          "\n" + "\n".join(f"- {c}" for c in checks) + "\n"]
    _common.write_report(md, out, total)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
