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

import gc
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402
import _one_table as one  # noqa: E402  (the three runs, timing, hashes and report rows bench_torchrec.py shares)

TARGET_BYTES = 64 * 1024
TARGET_GROWTH_RATIO = 0.6


# --------------------------------------------------------------------------- child


def run_child(cfg: dict) -> dict:
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
    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(one.SEED))
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
    timed = one.timed_steps(sp, cfg["steps"])
    mask = sp.get_mask("table")
    hashes = one.chunk_hashes(mask.to_local() if cfg["mode"] == "sharded" else mask, offset, local_rows, rows)
    kept = 1.0 - sp.sparsity()["table"]

    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, world=world, local_rows=local_rows, data_bytes_rank=data_bytes_rank,
                rss_after_add_kb=rss_after_add_kb, **timed, hashes=hashes, kept_fraction_local=kept,
                placements=str(getattr(data, "placements", "plain tensor")))


# -------------------------------------------------------------------------- parent


def summarize(results: list[dict]) -> dict:
    s = dict(one.summarize(results), placements=results[0]["placements"])
    s["hashes_agree"] = all(s["hashes"][k] == v for r in results for k, v in r["hashes"].items())
    return s


def main() -> int:
    ap = one.arg_parser(__doc__, 4_000_000)
    ap.add_argument("--runs", default="whole,replicated,sharded", help="which runs (comma-separated)")
    args = ap.parse_args()
    if one.run_as_child(args, run_child):
        return 0

    rows = args.rows or (400_000 if args.quick else 4_000_000)
    cfg = dict(rows=rows, cols=args.cols, steps=args.steps, pg_timeout=max(60.0, args.timeout / 2))
    out = args.out or os.path.join(HERE, "results", "fsdp2_quick.md" if args.quick else "fsdp2.md")
    info = _common.machine_info()
    t_start = time.perf_counter()
    wanted = args.runs.split(",")
    unknown = sorted(set(wanted) - {m for m, _ in one.RUNS})
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {[m for m, _ in one.RUNS]}")
    runs = [(m, w) for m, w in one.RUNS if m in wanted]
    summaries, errors, loads, floor = one.launch_runs(__file__, runs, cfg, args.timeout, summarize)

    whole = summaries.get("whole")
    packed = rows * args.cols / 8
    common = one.common_rows(summaries, runs, loads, args.steps, "histograms")
    row = common["row"]
    table = [
        common["run"],
        row("data layout per rank",
            lambda s: f"{s['placements']}; " + one.per_rank(s["data_bytes"], lambda b: f"{b / 1e6:.0f} MB")),
        *(common[k] for k in ("load", "wall", "all", "ratio", "cpu", "cpu_ratio", "sent", "selection", "comm",
                              "growth")),
        row("  as a multiple of world 1's growth",
            lambda s: one.per_rank(s["growth_kb"], lambda kb: f"{kb / max(whole['growth_kb'].values()):.2f}x")
            if whole else "n/a"),
        common["rss"]("RSS after add_data (table + mask), per rank"),
        common["masks"], common["warmup"],
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
    checks.append(one.floor_note(floor, loads))

    title = f"distsparse step(): one {rows:,} x {args.cols} table, FSDP2-sharded vs replicated vs whole"
    return one.write_report(title, "bench_fsdp2.py", args, rows, info, table, checks, errors, out, t_start)


if __name__ == "__main__":
    sys.exit(main())
