#!/usr/bin/env python
"""distsparse DataNormSparsifier.step() at world size 1 vs 2 (gloo on 127.0.0.1).

    python benchmarks/bench_distributed.py           # 8 x (250,000 x 64) float32 (~1 minute)
    python benchmarks/bench_distributed.py --quick   # 8 x (25,000 x 64)

Each world size is a fresh set of processes (``subprocess`` + ``MASTER_ADDR``,
``MASTER_PORT`` (a free port), ``RANK``, ``WORLD_SIZE``), one thread each
(``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), with a hard timeout on every
child. Every rank builds the same 8 tables from a fixed seed and adds them as
``nn.Parameter`` s, so they are *replicated* groups that distsparse shards across ranks.

Measured per world size:

* ``step()`` wall time: one warm-up step, then ``--steps`` steps, each preceded by a
  barrier; the time of a step is the max over ranks; the median over steps is reported;
* ``sp.last_step_stats`` after each step (``bytes_sent``, ``comm_seconds``,
  ``compute_seconds``, ...), median over steps, per rank;
* peak RSS growth during ``step()`` (``/proc/self/clear_refs`` + ``VmHWM``), per rank;
* whether every rank ends with the same masks, and whether they equal world 1's;
* ``LinearScheduler.step()`` time: ``--sched-steps`` calls, each preceded by a barrier,
  max over ranks per call, median reported.

Results are printed as markdown and written to ``benchmarks/results/distributed.md``
(``distributed_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

SEED = 777
TARGET_RATIO = 0.6
TARGET_SCHED_MS = 2.0
STAT_KEYS = ("bytes_sent", "bytes_received", "comm_seconds", "compute_seconds")


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
    t0 = time.perf_counter()
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg["pg_timeout"]))
    init_s = time.perf_counter() - t0

    import importlib

    distsparse = importlib.import_module(cfg.get("module", "distsparse"))
    DataNormSparsifier = distsparse.DataNormSparsifier

    names = [f"table_{i}" for i in range(cfg["tables"])]
    params = []
    for i in range(cfg["tables"]):
        g = torch.Generator().manual_seed(SEED + i)
        params.append(nn.Parameter(torch.randn(cfg["rows"], cfg["cols"], generator=g)))
    data_bytes = sum(p.numel() * p.element_size() for p in params)

    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L1")
    for n, p in zip(names, params):
        sp.add_data(n, p)
    if cfg.get("min_split") == 0:  # the cost model, with every split declined: tables computed everywhere
        from distsparse.distributed import planner
        planner.SplitCosts.split_pays = lambda self, numel, world_size: False
    elif cfg.get("min_split") is not None:  # the size rule instead of the cost model (measure a forced split)
        sp.min_split_elements = cfg["min_split"]

    owners, plans = {}, {}
    if hasattr(sp, "owner_of"):
        owners = {n: int(sp.owner_of(n)) for n in names}
    if world > 1 and hasattr(sp, "_plan"):
        for n in names:
            g = sp._plan().groups[n]
            plans[n] = g.kind if g.kind != "split" else "split " + "/".join(
                f"{b - a}" for _, (a, b) in sorted(g.ranges.items()))

    def barrier():
        dist.barrier()

    timers = _instrument(sp, distsparse) if cfg.get("breakdown", True) else None

    # warm-up
    barrier()
    t0 = time.perf_counter()
    sp.step()
    warm_s = time.perf_counter() - t0

    step_s, cpu_s, growth_kb, stats, step_breakdown = [], [], [], [], []
    for _ in range(cfg["steps"]):
        gc.collect()
        barrier()
        if timers is not None:
            timers.clear()
        dt, dc, grown = _common.timed_step(sp)
        cpu_s.append(dc)
        growth_kb.append(grown)
        step_s.append(dt)
        st = getattr(sp, "last_step_stats", None)
        stats.append(_jsonable(st) if st is not None else None)
        if timers is not None:
            step_breakdown.append(dict(timers))

    sha = hashlib.sha256()
    for n in names:
        sha.update(n.encode())
        sha.update(sp.get_mask(n).detach().to(torch.bool).contiguous().numpy().tobytes())

    # transport floor: a raw gloo all_gather of the same payload size as the mask exchange
    raw_ag_s, raw_ag_bytes = [], 0
    if world > 1 and owners:
        per_table = cfg["rows"] * cfg["cols"]
        owned = sum(1 for n in names if owners[n] == rank)
        raw_ag_bytes = (owned * per_table + 7) // 8
        sizes = [None] * world
        dist.all_gather_object(sizes, raw_ag_bytes)
        n_max = max(sizes)
        buf = torch.zeros(n_max, dtype=torch.uint8)
        outs = [torch.empty(n_max, dtype=torch.uint8) for _ in range(world)]
        for _ in range(4):
            barrier()
            t0 = time.perf_counter()
            dist.all_gather(outs, buf)
            raw_ag_s.append(time.perf_counter() - t0)
        raw_ag_s = raw_ag_s[1:]

    sched_s, sched_levels, sched_err, sched_breakdown = [], None, None, []
    if cfg["sched_steps"] > 0:
        try:
            sch = distsparse.LinearScheduler(sp, final_value=0.8, initial_value=0.0,
                                             start_step=0, ramp_steps=100)
            if timers is not None:
                _wrap(sch, "get_schedule_param", "scheduler: get_schedule_param", timers)
                _wrap(sch, "_validated", "scheduler: _validated (config checks)", timers)
            for _ in range(cfg["sched_steps"]):
                barrier()
                if timers is not None:
                    timers.clear()
                t0 = time.perf_counter()
                sch.step()
                sched_s.append(time.perf_counter() - t0)
                if timers is not None:
                    sched_breakdown.append(dict(timers))
            sched_levels = {n: float(sp.data_groups[n]["sparsity_level"]) for n in names}
        except Exception as e:  # report, don't hang the other rank: it hits the barrier timeout
            sched_err = f"{type(e).__name__}: {e}"

    barrier()
    dist.destroy_process_group()
    return dict(rank=rank, world=world, init_s=init_s, data_bytes=data_bytes, owners=owners, plans=plans,
                warmup_s=warm_s, step_s=step_s, step_cpu_s=cpu_s, raw_allgather_s=raw_ag_s,
                raw_allgather_bytes=raw_ag_bytes, step_breakdown=step_breakdown,
                sched_breakdown=sched_breakdown, step_growth_kb=growth_kb, stats=stats,
                has_stats=hasattr(sp, "last_step_stats"), mask_sha256=sha.hexdigest(),
                sched_s=sched_s, sched_levels=sched_levels, sched_error=sched_err,
                threads=torch.get_num_threads())


def _wrap(obj, attr, label, timers, stack=[]):  # noqa: B006 - one shared nesting stack
    """Replace obj.attr by a wrapper adding its *exclusive* wall time to timers[label]."""
    f = getattr(obj, attr, None)
    if f is None or not callable(f):
        return

    cpu_label = label + " [CPU]"

    def wrapper(*a, **k):
        stack.append([0.0, 0.0])
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            child = stack.pop()
            timers[label] = timers.get(label, 0.0) + dt - child[0]
            timers[cpu_label] = timers.get(cpu_label, 0.0) + dc - child[1]
            if stack:
                stack[-1][0] += dt
                stack[-1][1] += dc

    setattr(obj, attr, wrapper)


def _instrument(sp, distsparse) -> dict:
    """Time distsparse's internal phases (private names; whatever exists is wrapped)."""
    timers: dict = {}
    comm = getattr(sp, "_comm", None)
    for attr, label in (("_describe", "describe groups"), ("_ownership", "ownership"),
                        ("_compute_mask", "compute masks (owned groups)"),
                        ("_compute_split", "split groups: score rows, build mask rows"),
                        ("_exchange_masks", "exchange: other")):
        _wrap(sp, attr, label, timers)
    if comm is not None:
        for attr, label in (("begin", "collective: begin (operation frame + agreement)"),
                            ("finish", "collective: finish (commit point)"),
                            ("raise_if_any_failed", "collective: raise_if_any_failed"),
                            ("all_gather_tensor", "collective: all_gather_tensor"),
                            ("all_gather_bytes", "collective: all_gather_bytes"),
                            ("broadcast_bytes", "collective: broadcast_bytes"),
                            ("select_lowest", "split groups: selection rounds (incl. all-reduces)"),
                            ("all_reduce_sum", "collective: all_reduce_sum"),
                            ("run_on_coordinator", "collective: run_on_coordinator (other)"),
                            ("close", "collective: close (one-round frame, status, digests)")):
            _wrap(comm, attr, label, timers)
    norm = getattr(distsparse, "norm_sparsifier", None)
    if norm is not None:
        for attr, label in (("shard_block_scores", "split groups: score rows"),
                            ("shard_mask", "split groups: build mask rows")):
            _wrap(norm, attr, label, timers)
    mod = getattr(distsparse, "sparsifier", None)
    if mod is not None:
        for attr, label in (("pack_bits", "exchange: pack_bits"),
                            ("unpack_bits", "exchange: unpack_bits")):
            _wrap(mod, attr, label, timers)
    return timers


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    try:
        return float(x)
    except Exception:
        return repr(x)


# -------------------------------------------------------------------------- parent


def launch_world(world: int, cfg: dict, timeout: float) -> list[dict]:
    """``world`` ranks of this script's child (``_common.launch_ranks``: free port, hard timeout)."""
    return _common.launch_ranks(__file__, f"w{world}", world, cfg, timeout)


def ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1000:.2f} ms" if x < 0.01 else f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def human_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def _median_dicts(dicts: list[dict], totals: list[float]) -> dict:
    if not dicts:
        return {}
    keys = sorted({k for d in dicts for k in d})
    out = {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in keys}
    rest = [t - sum(v for k, v in d.items() if not k.endswith(" [CPU]"))
            for d, t in zip(dicts, totals)]
    out["(not instrumented)"] = statistics.median(rest)
    out["(total)"] = statistics.median(totals[: len(dicts)])
    return out


def breakdown_table(summaries: dict, key: str) -> str:
    cols, labels = [], []
    for w in sorted(summaries):
        for rk in sorted(summaries[w][key]):
            if summaries[w][key][rk]:
                cols.append((w, rk))
                for lab in summaries[w][key][rk]:
                    if lab not in labels:
                        labels.append(lab)
    if not cols:
        return ""
    labels = sorted(lab for lab in labels
                    if not lab.startswith("(") and not lab.endswith(" [CPU]"))
    labels += ["(not instrumented)", "(total)"]

    def cell(d, lab):
        if lab not in d:
            return ""
        cpu = d.get(lab + " [CPU]")
        return ms(d[lab]) + (f" ({ms(cpu)} CPU)" if cpu is not None else "")

    rows = [[lab] + [cell(summaries[w][key][rk], lab) for w, rk in cols] for lab in labels]
    return _common.md_table(["phase: median per call, exclusive wall (thread CPU)"]
                            + [f"world {w} rank {rk}" for w, rk in cols], rows)


def summarize(results: list[dict]) -> dict:
    world = len(results)
    nsteps = len(results[0]["step_s"])
    per_step_max = [max(r["step_s"][i] for r in results) for i in range(nsteps)]
    s = dict(world=world, step_median=statistics.median(per_step_max),
             step_all=per_step_max, warmup=max(r["warmup_s"] for r in results))
    s["growth_kb"] = [max(r["step_growth_kb"]) for r in results]
    s["cpu_median"] = {r["rank"]: statistics.median(r["step_cpu_s"]) for r in results}
    s["breakdown"] = {r["rank"]: _median_dicts(r["step_breakdown"], r["step_s"]) for r in results}
    s["sched_breakdown"] = {r["rank"]: _median_dicts(r["sched_breakdown"], r["sched_s"])
                            for r in results}
    s["raw_ag"] = {r["rank"]: (statistics.median(r["raw_allgather_s"]), r["raw_allgather_bytes"])
                   for r in results if r["raw_allgather_s"]}
    s["data_bytes"] = results[0]["data_bytes"]
    s["sha_same"] = len({r["mask_sha256"] for r in results}) == 1
    s["sha"] = results[0]["mask_sha256"]
    s["has_stats"] = all(r["has_stats"] for r in results)
    stats = {}
    keys_seen = set()
    for r in results:
        per_rank = {}
        steps = [x for x in r["stats"] if isinstance(x, dict)]
        for x in steps:
            keys_seen.update(x.keys())
        for k in STAT_KEYS:
            vals = [x[k] for x in steps if isinstance(x.get(k), (int, float))]
            per_rank[k] = statistics.median(vals) if vals else None
        stats[r["rank"]] = per_rank
    s["stats"] = stats
    s["stat_keys"] = sorted(keys_seen)
    s["last_stats"] = {r["rank"]: (r["stats"][-1] if r["stats"] else None) for r in results}
    if results[0]["sched_s"]:
        n = len(results[0]["sched_s"])
        per_call = [max(r["sched_s"][i] for r in results) for i in range(n)]
        s["sched_median"] = statistics.median(per_call)
        s["sched_max"] = max(per_call)
        s["sched_first"] = per_call[0]
        s["sched_levels_same"] = len({json.dumps(r["sched_levels"], sort_keys=True)
                                      for r in results}) == 1
        s["sched_level_final"] = sorted(set(results[0]["sched_levels"].values()))
    else:
        s["sched_median"] = None
    s["sched_errors"] = [f"rank {r['rank']}: {r['sched_error']}" for r in results
                         if r.get("sched_error")]
    owners = results[0]["owners"]
    if owners:
        owned = {}
        for n, o in owners.items():
            owned.setdefault(o, []).append(n)
        s["owned"] = {rk: len(v) for rk, v in sorted(owned.items())}
        per_table_bits = results[0]["data_bytes"] // 4 // len(owners)
        s["owned_packed_bytes"] = {rk: len(owned.get(rk, [])) * per_table_bits / 8
                                   for rk in range(world)}
        s["owners_agree"] = all(r["owners"] == owners for r in results)
    else:
        s["owned"], s["owners_agree"], s["owned_packed_bytes"] = None, None, None
    return s


def floor_child(spec: str, args) -> dict:
    """No communication at all: time step() of a plain single-process sparsifier on
    ``spec`` = "<tables>:<rows>" tables. Run alone (all tables) and as two concurrent
    processes (half the tables each; half the rows of a single table), it measures how
    well this machine runs two processes in parallel."""
    import torch
    import distsparse
    torch.set_num_threads(1)
    n_tables, rows = (int(x) for x in spec.split(":"))
    gen = torch.Generator().manual_seed(0)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    for i in range(n_tables):
        sp.add_data(f"t{i}", torch.randn(rows, args.cols, generator=gen))
    sp.step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        sp.step()
        times.append(time.perf_counter() - t)
    return {"median": sorted(times)[len(times) // 2]}


def both_whole_floor(args) -> float | None:
    """The slower of two concurrent processes each stepping the whole single table (no
    communication): the floor of an ``everywhere`` plan on this machine."""
    rows = args.rows or (25_000 if args.quick else 250_000)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--floor-child", f"1:{rows}",
                               "--cols", str(args.cols), "--steps", str(args.steps)],
                              stdout=subprocess.PIPE, text=True, env=_common.child_env()) for _ in range(2)]
    medians = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=args.timeout)
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            medians.append(json.loads(line[-1][7:])["median"] if line else None)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return None
    return None if None in medians else max(medians)


def parallel_floor(args) -> tuple[float, float] | None:
    """(one process, all tables; two concurrent processes, half each): step medians."""
    rows = args.rows or (25_000 if args.quick else 250_000)

    def start(n, r=rows):
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--floor-child", f"{n}:{r}",
                                 "--cols", str(args.cols), "--steps", str(args.steps)],
                                stdout=subprocess.PIPE, text=True, env=_common.child_env())

    def result(p):
        out, _ = p.communicate(timeout=args.timeout)
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        return json.loads(line[-1][7:])["median"] if line else None

    try:
        solo = result(start(args.tables))
        if args.tables == 1:  # one table: each process scores half its rows
            pair = [start(1, rows // 2), start(1, rows - rows // 2)]
        else:
            pair = [start(args.tables // 2), start(args.tables - args.tables // 2)]
        halves = [result(p) for p in pair]
    except subprocess.TimeoutExpired:
        return None
    if solo is None or None in halves:
        return None
    return solo, max(halves)


def _elements(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) << 20 if text.endswith("M") else int(text)


def sweep(args) -> int:
    """One replicated table per (elements, dim): world 1 and world 2 wall time, each
    rank's CPU time, the no-communication floor and the plan; appended to the results file
    (issue 22 item 5 targets: world 2 / world 1 <= 1.05 everywhere, <= 0.75 from 32M up)."""
    out = args.out or os.path.join(HERE, "results", "distributed_sweep.md")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    header = ["elements", "rows x dim", "plan (world 2)", "world 1 wall", "world 2 wall", "ratio",
              "target", "floor (1 proc vs 2 halves)", "floor, everywhere (2 procs whole each)", "CPU w1",
              "CPU w2 per rank", "busiest CPU ratio", "masks = w1", "load"]
    rows_md = []
    for size in args.sizes.split(","):
        numel = _elements(size)
        for dim in (int(d) for d in args.dims.split(",")):
            rows = numel // dim
            cfg = dict(tables=1, rows=rows, cols=dim, steps=args.steps, sched_steps=0, pg_timeout=120,
                       module=args.module, breakdown=False, min_split=args.min_split)
            res = {w: launch_world(w, cfg, args.timeout) for w in (1, 2)}
            bad = [f"w{w} r{r['rank']}: {r['error'][-300:]}" for w in res for r in res[w] if "error" in r]
            load = os.getloadavg()[0]
            if bad:
                rows_md.append([size, f"{rows:,} x {dim}", "error: " + "; ".join(bad)] + [""] * 10 + [f"{load:.1f}"])
                print(rows_md[-1], file=sys.stderr, flush=True)
                continue
            s = {w: summarize(res[w]) for w in res}
            fargs = argparse.Namespace(**{**vars(args), "tables": 1, "rows": rows, "cols": dim})
            floor = parallel_floor(fargs)
            both = both_whole_floor(fargs)
            ratio = s[2]["step_median"] / s[1]["step_median"]
            target = 0.75 if numel >= 32 << 20 else 1.05
            cpu1 = max(s[1]["cpu_median"].values())
            cpu2 = s[2]["cpu_median"]
            rows_md.append([
                size, f"{rows:,} x {dim}", res[2][0]["plans"].get("table_0", "?"),
                ms(s[1]["step_median"]), ms(s[2]["step_median"]), f"{ratio:.2f}",
                f"<= {target} {'PASS' if ratio <= target else 'FAIL'}",
                f"{ms(floor[0])} vs {ms(floor[1])} ({floor[1] / floor[0]:.2f})" if floor else "n/a",
                f"{ms(both)} ({both / floor[0]:.2f})" if floor and both else "n/a",
                ms(cpu1), " / ".join(ms(v) for _, v in sorted(cpu2.items())),
                f"{max(cpu2.values()) / cpu1:.2f}", "yes" if s[2]["sha"] == s[1]["sha"] and s[2]["sha_same"]
                else "NO", f"{load:.1f}"])
            print(" | ".join(rows_md[-1]), file=sys.stderr, flush=True)
    md = [f"\n## {args.label or 'sweep'} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
          f"`python benchmarks/bench_distributed.py --sweep --steps {args.steps} --sizes {args.sizes} "
          f"--dims {args.dims}`: one replicated float32 table, block (1,4), sparsity 0.5, L1, gloo on 127.0.0.1, "
          f"1 thread per process; wall = median over {args.steps} steps of the max over ranks. Load average "
          f"at the start {' / '.join(f'{x:.2f}' for x in load_start)}. *floor, everywhere*: two concurrent "
          "processes each scoring the whole table, no communication (the slower one; ratio to one process "
          "alone): the best an `everywhere` plan can do on this machine.\n",
          _common.md_table(header, rows_md),
          f"\nSweep wall time {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}.\n"]
    text = "\n".join(md)
    print(text, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not os.path.exists(out):
        text = ("# distsparse step(): one replicated table, world 2 vs world 1 (issue 22 item 5)\n\n"
                "Target: world 2 / world 1 wall <= 1.05 for every table from 1M to 64M elements and dims "
                "8-128, <= 0.75 from 32M up. *floor*: no communication, one process scoring the whole "
                "table vs two concurrent processes scoring half the rows each (what this machine allows).\n"
                + text)
    with open(out, "a") as f:
        f.write(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller tables")
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=None, help="rows per table (250,000)")
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed step() calls after a warm-up")
    ap.add_argument("--sched-steps", type=int, default=50)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per world size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-breakdown", action="store_true",
                    help="don't time distsparse's internal phases")
    ap.add_argument("--sweep", action="store_true",
                    help="one replicated table per size x dim (issue 22 item 5): world 1 vs 2 per cell")
    ap.add_argument("--sizes", default="1M,4M,16M,32M,64M", help="--sweep: elements per table (M = 2**20)")
    ap.add_argument("--dims", default="8,32,128", help="--sweep: columns per table")
    ap.add_argument("--label", default="", help="--sweep: a heading for this run (e.g. before/after)")
    ap.add_argument("--min-split", type=int, default=None,
                    help="set sp.min_split_elements (the size rule instead of the cost model: 1 forces splits); "
                         "0: the cost model declining every split (single tables computed everywhere)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--module", default="distsparse", help=argparse.SUPPRESS)  # harness dev
    args = ap.parse_args()

    if args.floor_child is not None:
        print("RESULT " + json.dumps(floor_child(args.floor_child, args)), flush=True)
        return 0
    if args.child is not None:
        res = run_child(json.loads(args.child))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.sweep:
        return sweep(args)

    rows = args.rows or (25_000 if args.quick else 250_000)
    cfg = dict(tables=args.tables, rows=rows, cols=args.cols, steps=args.steps,
               sched_steps=args.sched_steps, pg_timeout=60, module=args.module,
               breakdown=not args.no_breakdown, min_split=args.min_split)
    out = args.out or os.path.join(
        HERE, "results", "distributed_quick.md" if args.quick else "distributed.md")
    info = _common.machine_info()
    worlds = [int(w) for w in args.worlds.split(",")]
    summaries, errors = {}, []
    t_start = time.perf_counter()
    for w in worlds:
        print(f"[world {w}] launching {w} gloo process(es) ...", file=sys.stderr, flush=True)
        res = launch_world(w, cfg, args.timeout)
        bad = [r for r in res if "error" in r]
        if bad:
            errors += [f"world {w} rank {r['rank']}: {r['error']}" for r in bad]
            print("  ERROR: " + "; ".join(r["error"][:2000] for r in bad), file=sys.stderr)
            continue
        summaries[w] = s = summarize(res)
        summaries[w]["raw"] = res
        print(f"  step median {ms(s['step_median'])}, sched median {ms(s['sched_median'])}",
              file=sys.stderr, flush=True)

    def cell(w, f):
        return f(summaries[w]) if w in summaries else "error"

    table = []
    hdr = ["metric"] + [f"world {w}" for w in worlds] + ["target / check"]
    table.append(["step() wall time (median of %d; max over ranks)" % args.steps]
                 + [cell(w, lambda s: ms(s["step_median"])) for w in worlds] + [""])
    table.append(["step() all timed calls (max over ranks)"]
                 + [cell(w, lambda s: " / ".join(ms(x) for x in s["step_all"])) for w in worlds]
                 + [""])
    ratio = None
    if 1 in summaries and 2 in summaries:
        ratio = summaries[2]["step_median"] / summaries[1]["step_median"]
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        table.append(["step() time ratio world 2 / world 1"] + ["" for _ in worlds[:-1]]
                     + [f"{ratio:.2f}", f"<= {TARGET_RATIO} : {verdict}"])
        best = min(summaries[2]["step_all"]) / min(summaries[1]["step_all"])
        table.append(["same ratio on the fastest step of each (less load noise)"]
                     + ["" for _ in worlds[:-1]] + [f"{best:.2f}", ""])
    floor = parallel_floor(args) if 1 in summaries and 2 in summaries else None
    if floor is not None:
        solo, pair = floor
        table.append(["hardware floor: no communication, 1 process all tables vs 2 concurrent "
                      "processes half each (ratio)"] + ["" for _ in worlds[:-1]]
                     + [f"{ms(solo)} vs {ms(pair)} ({pair / solo:.2f})",
                        "the best ratio this machine allows"])
    table.append(["step() process CPU time per rank (median)"]
                 + [cell(w, lambda s: " / ".join(f"r{k}: {ms(v)}" for k, v in s["cpu_median"].items()))
                    for w in worlds] + [""])
    if 1 in summaries and 2 in summaries:
        cratio = (max(summaries[2]["cpu_median"].values())
                  / max(summaries[1]["cpu_median"].values()))
        table.append(["CPU-time ratio world 2 / world 1 (busiest rank; less sensitive to load)"]
                     + ["" for _ in worlds[:-1]] + [f"{cratio:.2f}", ""])
    for key, label, fmt in (("bytes_sent", "bytes sent per step, per rank", human_bytes),
                            ("bytes_received", "bytes received per step, per rank", human_bytes),
                            ("comm_seconds", "communication time per step, per rank", ms),
                            ("compute_seconds", "compute time per step, per rank", ms)):
        def f(s, key=key, fmt=fmt):
            if not s["has_stats"]:
                return "no sp.last_step_stats"
            vals = [s["stats"][rk][key] for rk in sorted(s["stats"])]
            if all(v is None for v in vals):
                return f"(no '{key}' key)"
            return " / ".join(f"r{rk}: {fmt(v)}" for rk, v in zip(sorted(s["stats"]), vals))
        table.append([label + " (median)"] + [cell(w, f) for w in worlds] + [""])
    table.append(["raw gloo all_gather of the same payload (transport floor, median of 3)"]
                 + [cell(w, lambda s: " / ".join(f"r{k}: {ms(t)} for {human_bytes(b)}"
                                                 for k, (t, b) in s["raw_ag"].items())
                         if s["raw_ag"] else "n/a") for w in worlds] + [""])
    table.append(["groups owned per rank"]
                 + [cell(w, lambda s: ", ".join(f"r{k}: {v}" for k, v in s["owned"].items())
                         if s["owned"] else "no owner_of") for w in worlds] + [""])
    table.append(["bit-packed size of the masks each rank owns (reference)"]
                 + [cell(w, lambda s: " / ".join(f"r{k}: {human_bytes(v)}"
                                                 for k, v in s["owned_packed_bytes"].items())
                         if s["owned_packed_bytes"] else "no owner_of") for w in worlds] + [""])
    table.append(["peak RSS growth during step(), per rank (x data)"]
                 + [cell(w, lambda s: " / ".join(
                     f"r{i}: {g * 1024 / 1e6:.0f} MB ({g * 1024 / s['data_bytes']:.2f}x)"
                     for i, g in enumerate(s["growth_kb"]))) for w in worlds] + [""])
    same_as_w1 = None
    if 1 in summaries:
        same_as_w1 = {w: summaries[w]["sha"] == summaries[1]["sha"] for w in summaries}
    table.append(["masks identical on all ranks / equal to world 1's"]
                 + [cell(w, lambda s: ("yes" if s["sha_same"] else "NO") + " / " + (
                     ("yes" if same_as_w1[s["world"]] else "NO") if same_as_w1 else "?"))
                    for w in worlds] + [""])
    table.append([f"LinearScheduler.step() per call (median of {args.sched_steps}; max over ranks)"]
                 + [cell(w, lambda s: ms(s["sched_median"]) if s["sched_median"] is not None
                         else "error") for w in worlds]
                 + [(f"world 2 <= {TARGET_SCHED_MS:g} ms : "
                     + ("PASS" if summaries[2]["sched_median"] * 1000 <= TARGET_SCHED_MS
                        else "FAIL"))
                    if 2 in summaries and summaries[2]["sched_median"] is not None else ""])
    table.append(["LinearScheduler.step() first / slowest call"]
                 + [cell(w, lambda s: f"{ms(s['sched_first'])} / {ms(s['sched_max'])}"
                         if s["sched_median"] is not None else "error") for w in worlds] + [""])
    table.append(["scheduled sparsity_level after the calls (same on all ranks?)"]
                 + [cell(w, lambda s: (f"{s['sched_level_final']} "
                                       f"({'yes' if s['sched_levels_same'] else 'NO'})")
                         if s["sched_median"] is not None else "error") for w in worlds] + [""])
    table.append(["step() warm-up call (max over ranks)"]
                 + [cell(w, lambda s: ms(s["warmup"])) for w in worlds] + [""])

    notes = list(errors)
    for w, s in summaries.items():
        notes += s["sched_errors"]
        if s["owners_agree"] is False:
            notes.append(f"world {w}: ranks disagree on owner_of()")
        if s["stat_keys"]:
            notes.append(f"world {w}: sp.last_step_stats keys: {', '.join(s['stat_keys'])}; "
                         f"last step: " + "; ".join(f"r{rk}: {json.dumps(v)}"
                                                    for rk, v in s["last_stats"].items()))
        elif not s["has_stats"]:
            notes.append(f"world {w}: the sparsifier has no `last_step_stats` attribute")
    total = time.perf_counter() - t_start
    data_mb = rows * args.cols * 4 * args.tables / 1e6
    md = [f"# distsparse step(): world size 1 vs 2{' (--quick sizes)' if args.quick else ''}\n",
          f"Generated by `python benchmarks/bench_distributed.py{' --quick' if args.quick else ''}`"
          f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.tables} replicated "
          f"`nn.Parameter` tables of {rows:,} x {args.cols} float32 ({data_mb:.0f} MB per rank), "
          f"block (1,4), sparsity 0.5, L1; gloo on 127.0.0.1; 1 thread per process.\n",
          _common.machine_info_md(info),
          _common.md_table(hdr, table)]
    bd = breakdown_table(summaries, "breakdown")
    if bd:
        md += ["\nWhere step() spends its time (distsparse internals wrapped with timers; "
               "collectives include waiting for the other rank):\n", bd]
    bd = breakdown_table(summaries, "sched_breakdown")
    if bd:
        md += ["\nWhere LinearScheduler.step() spends its time:\n", bd]
    if notes:
        md.append("\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    _common.write_report(md, out, total)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
