#!/usr/bin/env python
"""distsparse on one big table: TorchRec row-wise sharded vs replicated (DDP-style) vs whole.

    python benchmarks/bench_torchrec.py           # one 2,000,000 x 64 float32 table (~40 s on a quiet machine)
    python benchmarks/bench_torchrec.py --quick   # 200,000 x 64

Needs TorchRec (CPU recipe in the README). Three runs of the same table (seeded
``torch.randn``), block (1, 4), sparsity 0.5, L1, each a fresh set of gloo processes on
127.0.0.1 with one thread each:

* ``whole``: world 1, the table a plain tensor (``add_data(..., replicated=True)``);
* ``replicated``: world 2, every rank holds the whole table as a plain tensor added with
  ``replicated=True`` (what a DDP job does): distsparse splits it in row ranges over the
  ranks and all-gathers the bit-packed mask rows, so every rank ends with the whole mask;
* ``sharded``: world 2, the table is the only table of a TorchRec ``EmbeddingBagCollection``
  sharded row-wise by ``DistributedModelParallel`` (``construct_module_sharding_plan`` with
  ``row_wise()``, fused SGD kernel), each rank holding half the rows in FBGEMM's buffer, added
  with ``distsparse.integrations.torchrec.add_torchrec_tables``: every rank scores its own
  rows, only the selection's counts (and rows of blocks straddling a shard boundary) travel.

Measured per run, per rank (one warm-up step, then ``--steps`` timed steps, each after a
barrier), as ``bench_distributed.py`` / ``bench_fsdp2.py`` do:

* ``step()`` wall time: max over ranks per step, median over steps; each rank's process CPU
  time (median);
* bytes sent / received per rank per step: ``sp.last_step_stats`` (``bytes_sent``,
  ``selection_bytes``, ``bytes_received``; every all-gather and all-reduce payload this rank
  sends, ring model: the method of ``bench_distributed.py``), median over steps;
* ``squash_mask()`` wall time (a TorchRec run with a fused optimizer calls it every step);
* peak RSS growth during ``step()`` (``_common.timed_step``), max over steps;
* the masks: sha256 of each world-2 chunk of rows (TorchRec's row-wise shards), which must be
  identical in all three runs;
* for context, the sharded run's training step (forward + backward with the fused update) on
  ``--batch`` ids per rank;
* the load average when each run starts.

Beside the ratios the report prints the no-communication floor
(``bench_distributed.parallel_floor``: one process scoring the whole table vs two concurrent
processes scoring half each): this machine's two vCPUs do not run two processes at full speed
side by side. Results go to ``benchmarks/results/torchrec.md`` (``torchrec_quick.md`` with
``--quick``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402
import _one_table as one  # noqa: E402  (the three runs, timing, hashes and report rows bench_fsdp2.py shares)
import bench_distributed as _bd  # noqa: E402  (ms)

SEED = one.SEED
RUNS = one.RUNS


# --------------------------------------------------------------------------- child


def _sharded_table(rows: int, cols: int, rank: int, world: int, table):
    """A TorchRec DMP holding `table` row-wise over the ranks: (dmp, ShardedTensor, row offset,
    local rows). The EBC is built on the meta device, so no rank allocates the whole table
    for TorchRec; each rank copies its rows of `table` into its shard."""
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="table", embedding_dim=cols, num_embeddings=rows,
                                                            feature_names=["f"])], device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.01})  # the fused kernel
    plan = construct_module_sharding_plan(ebc, {"table": row_wise()}, world_size=world, local_size=world,
                                          device_type="cpu")
    dmp = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=ShardingPlan({"": plan}))
    st = dmp.state_dict()["embedding_bags.table.weight"]
    (shard,) = st.local_shards()
    offset, local_rows = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
    with torch.no_grad():
        shard.tensor.copy_(table[offset:offset + local_rows])
    return dmp, st, offset, local_rows


def _local_mask(mask, offset: int):
    """This rank's rows of a group's mask: a plain tensor, or a sharded group's
    ``RectShards`` (``local_shards()``: ``[((row, col), mask)]``), one shard at ``offset``."""
    if hasattr(mask, "local_shards"):
        ((start, local),) = mask.local_shards()
        assert tuple(start) == (offset, 0), (start, offset)
        return local
    return mask


def _train_step_times(dmp, rows: int, batch: int, steps: int) -> list[float]:
    """Forward + backward (the fused update inside) of `batch` single-id bags per rank."""
    import torch
    import torch.distributed as dist
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(SEED + dist.get_rank())
    times = []
    for _ in range(steps + 1):
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.randint(0, rows, (batch,), generator=g),
                                                  lengths=torch.ones(batch, dtype=torch.long))
        dist.barrier()
        t0 = time.perf_counter()
        dmp(kjt).values().sum().backward()
        times.append(time.perf_counter() - t0)
    return times[1:]


def run_child(cfg: dict) -> dict:
    import gc
    import warnings
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchRec / ShardedTensor deprecation chatter
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg["pg_timeout"]))
    import distsparse

    rows, cols = cfg["rows"], cfg["cols"]
    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED))
    half = -(-rows // 2)  # TorchRec's row-wise block for 2 ranks: the rows of rank 0
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), norm="L1")
    dmp = None
    if cfg["mode"] == "sharded":
        from distsparse.integrations.torchrec import add_torchrec_tables

        dmp, st, offset, local_rows = _sharded_table(rows, cols, rank, world, table)
        del table
        assert offset == rank * half and local_rows == min(half, rows - offset), (offset, local_rows)
        names = add_torchrec_tables(sp, dmp)
        assert names == ["table"], names
        layout = "TorchRec row_wise ShardedTensor (FBGEMM buffer)"
    else:
        sp.add_data("table", table, replicated=True)
        offset, local_rows = 0, rows
        layout = "plain tensor, replicated=True"
    gc.collect()
    data_bytes_rank = local_rows * cols * 4
    rss_after_add_kb = _common.proc_status_kb("VmRSS")

    squash_s = []

    def timed_squash():
        dist.barrier()
        t0 = time.perf_counter()
        sp.squash_mask()
        squash_s.append(time.perf_counter() - t0)

    timed = one.timed_steps(sp, cfg["steps"], after_step=timed_squash)
    local = _local_mask(sp.get_mask("table"), offset)
    hashes = one.chunk_hashes(local, offset, local_rows, rows)
    # the zeros reached the table TorchRec reads from (the shard is a view into FBGEMM's buffer)
    if dmp is not None:
        (shard,) = dmp.state_dict()["embedding_bags.table.weight"].local_shards()
        zeros_ok = bool(torch.equal(shard.tensor == 0, ~local.to(torch.bool)))
        train_s = _train_step_times(dmp, rows, cfg["batch"], cfg["train_steps"])
    else:
        zeros_ok, train_s = None, []
    global_sparsity = sp.sparsity()["table"]

    dist.barrier()
    dist.destroy_process_group()
    return dict(rank=rank, world=world, offset=offset, local_rows=local_rows, data_bytes_rank=data_bytes_rank,
                rss_after_add_kb=rss_after_add_kb, **timed, squash_s=squash_s, hashes=hashes, layout=layout,
                zeros_ok=zeros_ok, train_s=train_s, sparsity=global_sparsity)


# -------------------------------------------------------------------------- parent


def summarize(results: list[dict]) -> dict:
    n = len(results[0]["step_s"])
    s = dict(one.summarize(results),
             rows={r["rank"]: (r["offset"], r["offset"] + r["local_rows"]) for r in results},
             squash=statistics.median(max(r["squash_s"][i] for r in results) for i in range(n)),
             layout=results[0]["layout"], zeros_ok=[r["zeros_ok"] for r in results],
             sparsity={r["rank"]: r["sparsity"] for r in results})
    if results[0]["train_s"]:
        k = len(results[0]["train_s"])
        s["train"] = statistics.median(max(r["train_s"][i] for r in results) for i in range(k))
    return s


def main() -> int:
    ap = one.arg_parser(__doc__, 2_000_000)
    ap.add_argument("--batch", type=int, default=16384, help="ids per rank in the context training step")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps (context)")
    args = ap.parse_args()
    if one.run_as_child(args, run_child):
        return 0

    rows = args.rows or (200_000 if args.quick else 2_000_000)
    cfg = dict(rows=rows, cols=args.cols, steps=args.steps, batch=args.batch, train_steps=args.train_steps,
               pg_timeout=max(60.0, args.timeout / 2))
    out = args.out or os.path.join(HERE, "results", "torchrec_quick.md" if args.quick else "torchrec.md")
    info = _common.machine_info()
    t_start = time.perf_counter()
    summaries, errors, loads, floor = one.launch_runs(__file__, RUNS, cfg, args.timeout, summarize)

    packed = rows * args.cols / 8
    common = one.common_rows(summaries, RUNS, loads, args.steps, "counts")
    row = common["row"]
    table = [
        common["run"],
        row("data layout per rank", lambda s: f"{s['layout']}; " + " / ".join(
            f"r{rk}: rows {a:,}..{b:,} ({s['data_bytes'][rk] / 1e6:.0f} MB)"
            for rk, (a, b) in sorted(s["rows"].items()))),
        *(common[k] for k in ("load", "wall", "all", "ratio", "cpu", "cpu_ratio", "sent", "selection", "received",
                              "comm")),
        row("squash_mask() wall time (median; max over ranks)", lambda s: _bd.ms(s["squash"])),
        common["growth"], common["rss"]("RSS after add_data, per rank"),
        row("sparsity() per rank (global figure)", lambda s: one.per_rank(s["sparsity"], lambda v: f"{v:.4f}")),
        common["masks"],
        row("zeros written into TorchRec's shard = pruned elements",
            lambda s: "n/a" if s["zeros_ok"][0] is None else ("yes" if all(s["zeros_ok"]) else "NO")),
        common["warmup"],
        row(f"context: TorchRec forward + backward (fused SGD), {args.batch:,} ids per rank (median)",
            lambda s: _bd.ms(s["train"]) if "train" in s else ""),
    ]
    notes = []
    if "sharded" in summaries and "replicated" in summaries:
        sh = max(v["bytes_sent"] for v in summaries["sharded"]["stats"].values())
        rep = max(v["bytes_sent"] for v in summaries["replicated"]["stats"].values())
        notes.append(f"bytes sent per rank per step: sharded {sh:,.0f} B vs replicated {rep:,.0f} B "
                     f"({rep / max(sh, 1):.0f}x less; the whole mask bit-packed is {packed:,.0f} B)")
        notes.append(f"step() wall time: sharded {_bd.ms(summaries['sharded']['step_median'])} vs replicated "
                     f"{_bd.ms(summaries['replicated']['step_median'])} (ratio "
                     f"{summaries['sharded']['step_median'] / summaries['replicated']['step_median']:.2f})")
    notes.append(one.floor_note(floor, loads))
    noisy = [m for m, l in loads.items() if float(l.split(" / ")[0]) > 1.5]
    if noisy:
        notes.append(f"load average above 1.5 when {', '.join(noisy)} started: wall times are noisy, "
                     "CPU times and bytes are not")

    title = f"distsparse step(): one {rows:,} x {args.cols} table, TorchRec row-wise sharded vs replicated vs whole"
    return one.write_report(title, "bench_torchrec.py", args, rows, info, table, notes, errors, out, t_start)


if __name__ == "__main__":
    sys.exit(main())
