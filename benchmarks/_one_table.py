"""What bench_fsdp2.py and bench_torchrec.py share: one big table scored by distsparse in three
runs (``whole`` at world 1, ``replicated`` and ``sharded`` at world 2), each a fresh set of gloo
processes. The child side times the steps and hashes the mask rows it holds; the parent side
launches the runs, summarizes them and builds the report's common rows and paragraphs. Each
benchmark keeps only what differs: how the sharded table is built and its own rows."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import time

import _common
import bench_distributed as _bd  # ms, parallel_floor

SEED = 777
RUNS = (("whole", 1), ("replicated", 2), ("sharded", 2))
STAT_KEYS = ("bytes_sent", "selection_bytes", "bytes_received", "comm_seconds", "compute_seconds")


def arg_parser(doc: str, rows: int) -> argparse.ArgumentParser:
    """The options both benchmarks take (`rows`: the table's rows without --quick)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"10x fewer rows ({rows // 10:,})")
    ap.add_argument("--rows", type=int, default=None, help=f"rows of the table ({rows:,})")
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed step() calls after a warm-up")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def run_as_child(args, run_child) -> bool:
    """With --child this process is one rank of a run: it prints its RESULT line (for
    _common.launch_ranks) and the benchmark returns."""
    if args.child is None:
        return False
    print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
    return True


# --------------------------------------------------------------------------- child
def timed_steps(sp, steps: int, after_step=None) -> dict:
    """One warm-up step(), then `steps` timed ones, each after a barrier (`after_step()` after
    each): wall and CPU time, peak RSS growth, the sparsifier's last_step_stats."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    sp.step()
    out = dict(warmup_s=time.perf_counter() - t0, step_s=[], step_cpu_s=[], step_growth_kb=[], stats=[])
    for _ in range(steps):
        gc.collect()
        dist.barrier()
        dt, dc, grown = _common.timed_step(sp)
        out["step_s"].append(dt)
        out["step_cpu_s"].append(dc)
        out["step_growth_kb"].append(grown)
        out["stats"].append({k: float(v) for k, v in sp.last_step_stats.items()})
        if after_step is not None:
            after_step()
    return out


def chunk_hashes(local_mask, offset: int, local_rows: int, rows: int) -> dict:
    """sha256 of each world-2 chunk of mask rows this rank holds whole (no gathering)."""
    import torch

    half = -(-rows // 2)
    hashes = {}
    for start, stop in ((0, half), (half, rows)):
        a, b = max(start, offset), min(stop, offset + local_rows)
        if a >= b or (a, b) != (start, stop):
            continue
        piece = local_mask[a - offset:b - offset].to(torch.bool).contiguous()
        hashes[f"{start}:{stop}"] = hashlib.sha256(piece.numpy().tobytes()).hexdigest()
    return hashes


# -------------------------------------------------------------------------- parent
def summarize(results: list[dict]) -> dict:
    """Per step the slowest rank, then medians; per rank CPU, growth, bytes and stats; all hashes."""
    n = len(results[0]["step_s"])
    per_step = [max(r["step_s"][i] for r in results) for i in range(n)]
    s = dict(step_median=statistics.median(per_step), step_all=per_step,
             warmup=max(r["warmup_s"] for r in results),
             cpu={r["rank"]: statistics.median(r["step_cpu_s"]) for r in results},
             growth_kb={r["rank"]: max(r["step_growth_kb"]) for r in results},
             data_bytes={r["rank"]: r["data_bytes_rank"] for r in results},
             rss_after_add_kb={r["rank"]: r["rss_after_add_kb"] for r in results}, hashes={})
    s["stats"] = {r["rank"]: {k: statistics.median(x.get(k, 0.0) for x in r["stats"]) for k in STAT_KEYS}
                  for r in results}
    for r in results:
        s["hashes"].update(r["hashes"])
    return s


def per_rank(d: dict, fmt) -> str:
    return " / ".join(f"r{rk}: {fmt(v)}" for rk, v in sorted(d.items()))


def launch_runs(script: str, runs, cfg: dict, timeout: float, summarize_run):
    """Each run's ranks (the load average noted when it starts), then the no-communication floor:
    (summaries by mode, errors, loads, floor)."""
    summaries, errors, loads = {}, [], {}
    for mode, world in runs:
        loads[mode] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"[{mode}, world {world}] launching (load {loads[mode]}) ...", file=sys.stderr, flush=True)
        res = _common.launch_ranks(script, mode, world, cfg, timeout)
        bad = [r for r in res if "error" in r]
        if bad:
            errors += [f"{mode} rank {r['rank']}: {r['error']}" for r in bad]
            print("  ERROR: " + "; ".join(r["error"][:2000] for r in bad), file=sys.stderr)
            continue
        summaries[mode] = summarize_run(res)
        print(f"  step median {_bd.ms(summaries[mode]['step_median'])}", file=sys.stderr, flush=True)
    loads["floor"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    floor = _bd.parallel_floor(argparse.Namespace(tables=1, rows=cfg["rows"], cols=cfg["cols"], steps=cfg["steps"],
                                                   timeout=timeout, quick=False))
    return summaries, errors, loads, floor


def common_rows(summaries: dict, runs, loads: dict, steps: int, selection: str) -> dict:
    """The report rows both benchmarks print, by name (each assembles its table in its own order)."""
    modes = [m for m, _ in runs]
    whole = summaries.get("whole")

    def row(label, f):
        return [label] + [f(summaries[m]) if m in summaries else "error" for m in modes]

    def stat(key):
        return lambda s: per_rank({rk: v[key] for rk, v in s["stats"].items()}, lambda b: f"{b:,.0f} B")

    def mb(kb):
        return f"{kb * 1024 / 1e6:.0f} MB"

    return {
        "row": row,  # row(label, f): f(summary) per run, "error" for a run that failed
        "run": ["run"] + [f"{m}, world {w}" for m, w in runs],
        "load": ["load average (1/5/15 min) when the run started"] + [loads.get(m, "?") for m in modes],
        "wall": row(f"step() wall time (median of {steps}; max over ranks)", lambda s: _bd.ms(s["step_median"])),
        "all": row("step() all timed calls", lambda s: " / ".join(_bd.ms(x) for x in s["step_all"])),
        "ratio": row("step() wall ratio to world 1",
                     lambda s: f"{s['step_median'] / whole['step_median']:.2f}" if whole else "n/a"),
        "cpu": row("step() process CPU time per rank (median)", lambda s: per_rank(s["cpu"], _bd.ms)),
        "cpu_ratio": row("CPU-time ratio to world 1 (busiest rank)",
                         lambda s: f"{max(s['cpu'].values()) / max(whole['cpu'].values()):.2f}" if whole else "n/a"),
        "sent": row("bytes sent per rank per step (median)", stat("bytes_sent")),
        "selection": row(f"  of which selection {selection}", stat("selection_bytes")),
        "received": row("bytes received per rank per step (median)", stat("bytes_received")),
        "comm": row("communication / compute time per rank (median, last_step_stats)",
                    lambda s: per_rank(s["stats"], lambda v: f"{_bd.ms(v['comm_seconds'])} / "
                                                             f"{_bd.ms(v['compute_seconds'])}")),
        "growth": row("peak RSS growth during step(), per rank (max over steps)",
                      lambda s: per_rank(s["growth_kb"], mb)),
        "rss": lambda label: row(label, lambda s: per_rank(s["rss_after_add_kb"], mb)),
        "masks": row("masks: every world-2 chunk of rows identical in all runs",
                     lambda s: "yes" if all(o["hashes"].get(k, v) == v for o in summaries.values()
                                            for k, v in s["hashes"].items()) else "NO"),
        "warmup": row("step() warm-up call (max over ranks)", lambda s: _bd.ms(s["warmup"])),
    }


def floor_note(floor, loads: dict) -> str:
    if floor is None:
        return "no-communication floor: failed or timed out"
    solo, pair = floor
    return (f"no-communication floor (load {loads['floor']}): one process scores the whole table in "
            f"{_bd.ms(solo)}, two concurrent processes half each in {_bd.ms(pair)} (ratio "
            f"{pair / solo:.2f}): the best world-2 wall ratio this machine allows")


def write_report(title: str, script: str, args, rows: int, info: dict, table: list, notes: list[str],
                 errors: list[str], out: str, t_start: float) -> int:
    """The report: title, rerun command, setup paragraph, machine, the table, the notes and the
    errors; the benchmark's exit code (1 when a run failed)."""
    total = time.perf_counter() - t_start
    cmd = f"python benchmarks/{script}" + (" --quick" if args.quick else "")
    md = [f"# {title}{' (--quick)' if args.quick else ''}\n",
          f"Rerun (from the repository root, on a quiet machine): `{cmd}`\n",
          f"Generated on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. One float32 table of "
          f"{rows:,} x {args.cols} ({rows * args.cols * 4 / 1e6:.0f} MB; its mask bit-packed "
          f"{rows * args.cols / 8 / 1e6:.1f} MB), block (1,4), sparsity 0.5, L1; gloo on 127.0.0.1, 1 thread per "
          f"process; {args.steps} timed steps after a warm-up. Every world-2 ratio must be read beside the "
          "no-communication floor and the per-rank CPU times: this machine's 2 vCPUs do not run two "
          "processes at full speed side by side.\n",
          _common.machine_info_md(info),
          _common.md_table(table[0], table[1:]),
          "\n" + "\n".join(f"- {c}" for c in notes + errors) + "\n"]
    _common.write_report(md, out, total)
    return 1 if errors else 0
