#!/usr/bin/env python
"""Cost model of distsparse per rank, evaluated up to 1,024 ranks: a step of replicated
tables, a step of one sharded (FSDP2 / TorchRec) table, the framing of every operation, and
the checkpoints of a 1-billion-row x 128 table — with two constant sets, this machine's gloo
over loopback and GPUs over NCCL from published figures.

    python benchmarks/cost_model.py               # the model's tables (markdown), default constants
    python benchmarks/cost_model.py --out benchmarks/results/cost_model.md
    python benchmarks/cost_model.py --calibrate   # measure the gloo constants here first (~1 minute):
                                                  # gloo all-reduce/all-gather at world 2-4, one
                                                  # thread per process, and the single-process
                                                  # scoring and selection throughput

**Replicated tables' step.** For each world size and workload it models, per rank, the plan
of ``distsparse.distributed.planner`` (the same code the sparsifier runs) against whole-group ownership:

* compute elements: the most elements any rank scores (the step waits for the slowest);
* collectives: the begin/finish frames (two all-reduces of 16 bytes,
  ``distributed._frame``), the mask all-gather, and — when some group is split — a status
  all-reduce, the radix rounds (digit width from ``selection.choose_digit_bits``) and, with
  ties to split, one tie-count all-reduce (counted here: worst case);
* bytes sent per rank (received is the same for ring algorithms): a ring all-gather sends
  ``(N-1) × P`` (``P`` the longest rank's bit-packed masks: buffers are padded to it), a
  ring all-reduce of ``S`` bytes sends ``2(N-1)/N × S``;
* time: ``compute + Σ collective``, no overlap.

**Sharded table's step** (one FSDP2 ``Shard(0)`` / TorchRec row-wise table, rows on every
rank, blocks of one row: no halo): frames, the status all-reduce, the radix rounds of one
group, the tie counts (one int64 per rank), and the all-gather of each rank's status byte
and pruned count (9 bytes); masks stay where the rows are.

**Framing** per operation: today two all-reduces of 16 bytes; before, two all-gathers of a
4,208-byte frame (``N × 4,208`` bytes received each).

**Checkpoints** of a 1e9 x 128 table (packed mask ``P`` = 16 GB, bool mask 128 GB): the
single file (save: every rank sends its packed rows to the writer, which streams them into
the file and holds at most ``P``; load: every rank reads its own slice of the file,
memory-mapped, and unpacks it into its mask) against DCP (every rank writes and reads its
own shard file; the coordinator gathers only metadata). Time = the slowest rank's network
plus storage time at ``DISK_BYTES_PER_S`` per stream, capped by ``FS_AGGREGATE_BYTES_PER_S``
for all streams together; memory = the most extra bytes a rank holds during the call.

**Times.** gloo: ring terms ``(N-1)(α + P/β)`` (all-gather) and ``2(N-1)(α + S/(Nβ))``
(all-reduce), α and β measured here. NCCL (8 GPUs per node): all-reduce latency from NCCL's
tree tuning model ``6.8 + 2·((8−1)·0.6 + log2(nodes)·5.0)`` µs, all-gather latency
``6.8 + (N−1)·0.6 + nodes·5.0`` µs (ring), plus the bytes over nccl-tests bus bandwidth
(``t = S·2(N−1)/N / busbw`` for all-reduce, ``t = (N−1)·P / busbw`` for all-gather) — 450
GB/s in one node (NVSwitch), 35 GB/s across nodes (the figure nccl-tests users report for
2 nodes of 8 H200 over 4 ConnectX-7 RoCE ports).

Workloads: (a) the 26 Criteo Kaggle (Display Advertising Challenge) embedding tables —
cardinalities as in facebookresearch/dlrm's Kaggle preprocessing (33,762,577 rows in all),
16 wide (DLRM's Kaggle ``--arch-sparse-feature-size``); (b) one 1-billion-element table
(15,625,000 × 64); (c) 1,000 small tables of 10,000 × 64. Blocks (1, 4), float32.

Limits: α, β and the per-element cost are this 2-vCPU machine's loopback figures; the NCCL
set is published figures, not measured here; storage bandwidths are assumptions (stated in
the constants); gloo may pick other algorithms at scale (the model is ring-only). Compute is
assumed perfectly proportional to elements and single-threaded (GPU compute is not
modelled: the NCCL rows use the same compute); communication never overlaps compute; the
tie round is always counted.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distsparse.distributed.planner import GroupSpec, plan  # noqa: E402
from distsparse.distributed.selection import choose_digit_bits  # noqa: E402

# -- constants ------------------------------------------------------------------------------
# Measured with --calibrate on this project's 2-vCPU machine (gloo over loopback, one thread
# per process, world 2 — the only world with a core per rank here; the machine was shared,
# so worlds 3-4 and the compute figure read high). The per-element cost is the README's
# quiet-machine figure (0.36 s for a 1,000,000 x 64 float32 mask); the loaded run gave 11.9 ns.
#: Seconds per data element of a whole mask computation (scores, selection, mask), one thread.
SECONDS_PER_ELEMENT = 5.6e-9
#: gloo ring all-reduce: latency per ring step (8 B: 208 µs at world 2), and bytes per second.
ALLREDUCE_STEP_LATENCY_S = 104e-6
ALLREDUCE_BYTES_PER_S = 1.04e9
#: gloo all-gather: latency per ring step (8 B: 275 µs at world 2), and bytes per second.
ALLGATHER_STEP_LATENCY_S = 275e-6
ALLGATHER_BYTES_PER_S = 0.75e9
#: distributed._frame: a fingerprint and its negation (two int64), all-reduced at begin and finish.
FRAME_BYTES = 16
#: The frame before issue 18: magic, op name, counter, digest, 4 KiB inline, all-gathered.
OLD_FRAME_BYTES = 4208

#: NCCL (GPUs, 8 per node): NCCL's tree all-reduce latency model (µs) and nccl-tests bus bandwidths.
NCCL_GPUS_PER_NODE = 8
NCCL_BASE_LATENCY_US = 6.8
NCCL_INTRA_HOP_US = 0.6
NCCL_INTER_HOP_US = 5.0
NCCL_BUSBW_INTRA_NODE = 450e9
NCCL_BUSBW_INTER_NODE = 35e9

#: Checkpoint storage (assumed): one stream's write/read bandwidth, and the shared filesystem's total.
DISK_BYTES_PER_S = 2e9
FS_AGGREGATE_BYTES_PER_S = 200e9
#: The checkpointed table: 1e9 rows x 128 columns.
CKPT_ROWS, CKPT_COLS = 1_000_000_000, 128

CRITEO_KAGGLE_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                      27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
WORKLOADS = {
    "(a) 26 Criteo Kaggle tables x 16": [GroupSpec(f"C{i + 1:02d}", r, 16, (1, 4)) for i, r in enumerate(CRITEO_KAGGLE_ROWS)],
    "(b) one 1e9-element table": [GroupSpec("big", 15_625_000, 64, (1, 4))],
    "(c) 1,000 tables 10,000 x 64": [GroupSpec(f"t{i:04d}", 10_000, 64, (1, 4)) for i in range(1000)],
}
WORLDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _nccl_nodes(n: int) -> int:
    return max(1, math.ceil(n / NCCL_GPUS_PER_NODE))


def _nccl_busbw(n: int) -> float:
    return NCCL_BUSBW_INTRA_NODE if n <= NCCL_GPUS_PER_NODE else NCCL_BUSBW_INTER_NODE


def allreduce_s(n: int, nbytes: float, c: dict) -> float:
    if n == 1:
        return 0.0
    if c.get("kind") == "nccl":
        g = min(n, NCCL_GPUS_PER_NODE)
        lat = NCCL_BASE_LATENCY_US + 2 * ((g - 1) * NCCL_INTRA_HOP_US + math.log2(_nccl_nodes(n)) * NCCL_INTER_HOP_US)
        return lat * 1e-6 + nbytes * 2 * (n - 1) / n / _nccl_busbw(n)
    return 2 * (n - 1) * (c["ar_lat"] + nbytes / (n * c["ar_bw"]))


def allgather_s(n: int, nbytes: float, c: dict) -> float:
    """``nbytes``: each rank's contribution."""
    if n == 1:
        return 0.0
    if c.get("kind") == "nccl":
        lat = NCCL_BASE_LATENCY_US + (n - 1) * NCCL_INTRA_HOP_US + _nccl_nodes(n) * NCCL_INTER_HOP_US
        return lat * 1e-6 + (n - 1) * nbytes / _nccl_busbw(n)
    return (n - 1) * (c["ag_lat"] + nbytes / c["ag_bw"])


def allreduce_bytes(n: int, nbytes: float) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes


def framing_cost(world: int, c: dict) -> dict:
    """Per operation (begin + finish), per rank: bytes sent + received, and time."""
    new = 2 * 2 * allreduce_bytes(world, FRAME_BYTES)
    old = 0.0 if world == 1 else 2 * 2 * (world - 1) * OLD_FRAME_BYTES
    return {"bytes": new, "time": 2 * allreduce_s(world, FRAME_BYTES, c),
            "old_bytes": old, "old_time": 2 * allgather_s(world, OLD_FRAME_BYTES, c)}


def step_cost(world: int, specs: list[GroupSpec], c: dict, *, split: bool = True) -> dict:
    """Modelled per-rank figures of one step (see the module docstring)."""
    if not split:  # today: every group whole, LPT by size
        specs = [GroupSpec(s.name, s.rows, s.cols, s.block_shape, splittable=False) for s in specs]
    p = plan(world, specs)
    by_name = {s.name: s for s in specs}
    payload = [0] * world  # bit-packed mask bytes per rank
    keys = [0] * world  # block keys per rank in split groups
    for name, gp in p.groups.items():
        s = by_name[name]
        for r, (a, b) in gp.ranges.items():
            payload[r] += math.ceil((b - a) * s.cols / 8)
            if gp.kind == "split":
                keys[r] += math.ceil((b - a) / s.block_shape[0]) * math.ceil(s.cols / s.block_shape[1])
    n_split = len(p.split_names)
    compute = max(p.loads) * c["sec_per_elem"]
    collectives = 0 if world == 1 else 3  # begin, masks, finish
    sent = 0.0 if world == 1 else 2 * allreduce_bytes(world, FRAME_BYTES) + (world - 1) * max(payload)
    comm = 0.0 if world == 1 else 2 * allreduce_s(world, FRAME_BYTES, c) + allgather_s(world, max(payload), c)
    rounds = bits = 0
    if n_split:
        bits = choose_digit_bits(world, n_split, 32, max(keys), step_latency_s=c["ar_lat"],
                                 bytes_per_s=c["ar_bw"], seconds_per_key_pass=c.get("sec_per_key", 3e-9))
        rounds = math.ceil(32 / bits)
        hist = 8 * (1 + n_split * (1 << bits))
        ties = 8 * n_split * world
        collectives += 1 + rounds + 1
        sent += 2 * (world - 1) / world * (8 + rounds * hist + ties)
        comm += allreduce_s(world, 8, c) + rounds * allreduce_s(world, hist, c) + allreduce_s(world, ties, c)
    return {"elements": max(p.loads), "split": n_split, "bits": bits, "rounds": rounds,
            "collectives": collectives, "sent": sent, "compute": compute, "comm": comm, "total": compute + comm}


#: distributed.step.digit_bits_for: the radix digit of any step with a sharded table.
SHARDED_DIGIT_BITS = 8


def sharded_step_cost(world: int, rows: int, cols: int, c: dict, bits: int = SHARDED_DIGIT_BITS) -> dict:
    """Modelled per-rank figures of one step of one sharded table (module docstring)."""
    compute = rows * cols / world * c["sec_per_elem"]
    if world == 1:
        return {"bits": 0, "rounds": 0, "collectives": 0, "sent": 0.0, "received": 0.0, "compute": compute,
                "comm": 0.0, "total": compute}
    rounds = math.ceil(32 / bits)
    hist = 8 * (1 + (1 << bits))
    reduces = [FRAME_BYTES, FRAME_BYTES, 8] + [hist] * rounds + [8 * world]  # frames, status, rounds, ties
    sent = sum(allreduce_bytes(world, b) for b in reduces) + (world - 1) * 9  # + status/count all-gather
    comm = sum(allreduce_s(world, b, c) for b in reduces) + allgather_s(world, 9, c)
    return {"bits": bits, "rounds": rounds, "collectives": len(reduces) + 1, "sent": sent, "received": sent,
            "compute": compute, "comm": comm, "total": compute + comm}


def _storage_s(nbytes: float, streams: int) -> float:
    """Seconds to move ``nbytes`` per stream with ``streams`` streams at once."""
    return nbytes / min(DISK_BYTES_PER_S, FS_AGGREGATE_BYTES_PER_S / max(streams, 1))


def checkpoint_cost(world: int, c: dict, rows: int = CKPT_ROWS, cols: int = CKPT_COLS) -> dict:
    """Per-rank bytes, memory and time of save and load, single file vs DCP (module docstring)."""
    packed = rows * cols / 8
    share = packed / world
    bool_share = rows * cols / world
    gather = 0.0 if world == 1 else (world - 1) * share / (_nccl_busbw(world) if c.get("kind") == "nccl"
                                                            else c["ag_bw"])
    single = {
        # writer: receives every other rank's packed rows, writes the whole file
        "save_bytes_writer": (world - 1) * share + packed, "save_bytes_other": share,
        "save_mem_writer": packed, "save_mem_other": share,
        "save_s": gather + _storage_s(packed, 1),
        "load_bytes": share, "load_mem": share, "load_s": _storage_s(share, world),
    }
    dcp = {
        "save_bytes": share, "save_mem": share, "save_s": _storage_s(share, world) + allgather_s(world, 1024, c),
        "load_bytes": share, "load_mem": share, "load_s": _storage_s(share, world) + allgather_s(world, 1024, c),
    }
    return {"packed": packed, "share": share, "bool_share": bool_share, "single": single, "dcp": dcp}


def framing_table(sets: dict) -> str:
    lines = ["| ranks | framing bytes sent + received / operation | before (two 4,208-byte all-gathers) | "
             + " | ".join(f"framing time ({k})" for k in sets) + " |",
             "|---:|---:|---:|" + "---:|" * len(sets)]
    for n in WORLDS:
        f = {k: framing_cost(n, c) for k, c in sets.items()}
        first = next(iter(f.values()))
        lines.append(f"| {n} | {_fmt_bytes(first['bytes'])} | {_fmt_bytes(first['old_bytes'])} | "
                     + " | ".join(f"{v['time'] * 1e6:,.0f} µs (was {v['old_time'] * 1e6:,.0f} µs)"
                                  for v in f.values())
                     + " |")
    return "\n".join(lines)


def sharded_table(sets: dict, rows: int, cols: int) -> str:
    lines = [f"\n**one sharded table, {rows:,} x {cols}** (FSDP2 Shard(0) / TorchRec row-wise, blocks (1, 4))\n",
             "| ranks | digit bits / rounds | collectives | bytes sent / rank (received: same) | "
             "same with 8-bit digits | compute | "
             + " | ".join(f"comm ({k}) | step ({k})" for k in sets) + " |",
             "|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(sets)]
    for n in WORLDS:
        m = {k: sharded_step_cost(n, rows, cols, c) for k, c in sets.items()}
        first = next(iter(m.values()))
        narrow = sharded_step_cost(n, rows, cols, next(iter(sets.values())), bits=8)
        rb = f"{first['bits']} / {first['rounds']}" if first["rounds"] else "-"
        lines.append(f"| {n} | {rb} | {first['collectives']} | {_fmt_bytes(first['sent'])} | "
                     f"{_fmt_bytes(narrow['sent'])} | {first['compute']:.3f} s | "
                     + " | ".join(f"{v['comm'] * 1e3:.2f} ms | {v['total']:.3f} s" for v in m.values()) + " |")
    return "\n".join(lines)


def checkpoint_table(sets: dict) -> str:
    first = checkpoint_cost(8, next(iter(sets.values())))
    lines = [f"\n**checkpoint of a {CKPT_ROWS:,} x {CKPT_COLS} table** (packed mask {_fmt_bytes(first['packed'])}; "
             f"storage {DISK_BYTES_PER_S / 1e9:g} GB/s per stream, {FS_AGGREGATE_BYTES_PER_S / 1e9:g} GB/s in all)\n",
             "| ranks | own bool mask | single file save: writer bytes / memory | others: bytes / memory | "
             "load: bytes / memory per rank | "
             + " | ".join(f"single save / load ({k}) | DCP save / load ({k})" for k in sets) + " |",
             "|---:|---:|---:|---:|---:|" + "---:|---:|" * len(sets)]
    for n in [w for w in WORLDS if w >= 8]:
        m = {k: checkpoint_cost(n, c) for k, c in sets.items()}
        a = next(iter(m.values()))
        s1 = a["single"]
        lines.append(
            f"| {n} | {_fmt_bytes(a['bool_share'])} | {_fmt_bytes(s1['save_bytes_writer'])} / "
            f"{_fmt_bytes(s1['save_mem_writer'])} | {_fmt_bytes(s1['save_bytes_other'])} / "
            f"{_fmt_bytes(s1['save_mem_other'])} | {_fmt_bytes(s1['load_bytes'])} / {_fmt_bytes(s1['load_mem'])} | "
            + " | ".join(f"{v['single']['save_s']:.1f} s / {v['single']['load_s']:.2f} s | "
                         f"{v['dcp']['save_s']:.2f} s / {v['dcp']['load_s']:.2f} s" for v in m.values()) + " |")
    lines.append("\nDCP: every rank writes and reads only its own shard "
                 "(bytes and memory = the load column's, for save and load alike).")
    return "\n".join(lines)


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def table(c: dict) -> str:
    """The replicated tables' step (``c``: one constant set)."""
    lines = []
    for title, specs in WORKLOADS.items():
        total = sum(s.numel for s in specs)
        lines += [f"\n**{title}** — {total / 1e6:,.0f} M elements\n",
                  "| ranks | split groups | digit bits / rounds | collectives | max elements / rank | "
                  "bytes sent / rank | compute | comm | step (model) | today: step, bytes sent |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in WORLDS:
            m = step_cost(n, specs, c)
            t = step_cost(n, specs, c, split=False)
            rb = f"{m['bits']} / {m['rounds']}" if m["rounds"] else "-"
            lines.append(f"| {n} | {m['split']} | {rb} | {m['collectives']} | {m['elements'] / 1e6:,.2f} M | "
                         f"{_fmt_bytes(m['sent'])} | {m['compute']:.3f} s | {m['comm']:.3f} s | "
                         f"{m['total']:.3f} s | {t['total']:.3f} s, {_fmt_bytes(t['sent'])} |")
    return "\n".join(lines)


# -- calibration ---------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, reps: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = []
    for nbytes in (8, 1 << 22):
        for op in ("all_reduce", "all_gather"):
            x = torch.ones(nbytes // 8, dtype=torch.int64)
            gathered = torch.empty(world * x.numel(), dtype=torch.int64)
            times = []
            for _ in range(reps):
                dist.barrier()
                t = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(x)
                else:
                    dist.all_gather_into_tensor(gathered, x)
                times.append(time.perf_counter() - t)
            out.append((op, nbytes, sorted(times)[len(times) // 2]))
    if rank == 0:
        for op, nbytes, t in out:
            print(f"{op} {nbytes} {t}", flush=True)
    dist.destroy_process_group()


def _measure_collectives(world: int, reps: int, timeout: float = 120.0) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import child_env, free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), str(port),
                               str(reps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"calibration workers failed: {[o[1][-500:] for o in outputs]}")
    res = {}
    for line in outputs[0][0].splitlines():
        op, nbytes, t = line.split()
        res[(op, int(nbytes))] = float(t)
    return res


def calibrate() -> dict:
    import torch

    from distsparse import masks
    from distsparse.distributed.selection import ShardSelection, blocks_to_prune

    torch.set_num_threads(1)
    c = {}
    data = torch.randn(1_000_000, 64, generator=torch.Generator().manual_seed(0))
    best = min(_timed(lambda: masks.norm_block_mask(data, 0.5, (1, 4), 4, "L1")) for _ in range(3))
    c["sec_per_elem"] = best / data.numel()
    scores = masks.block_scores(data, (1, 4), "L1")

    def select():
        s = ShardSelection(scores.clone(), scores.numel(), blocks_to_prune(0.5, scores.numel()), 16)
        while not s.done:
            s.advance(s.histogram())
        s.pruned()

    c["sec_per_key"] = min(_timed(select) for _ in range(3)) / scores.numel() / 2  # ~2 passes
    print(f"single process, one thread: {best:.3f} s per 64M-element mask "
          f"({c['sec_per_elem'] * 1e9:.2f} ns/element); selection {c['sec_per_key'] * 1e9:.2f} ns/key/pass")
    print("\n| world | all-reduce 8 B | all-reduce 4 MiB | all-gather 8 B | all-gather 4 MiB/rank |")
    print("|---:|---:|---:|---:|---:|")
    fits = []
    for world in (2, 3, 4):
        m = _measure_collectives(world, reps=30 if world == 2 else 15)
        big = 1 << 22
        print(f"| {world} | {m[('all_reduce', 8)] * 1e6:.0f} µs | {m[('all_reduce', big)] * 1e3:.2f} ms | "
              f"{m[('all_gather', 8)] * 1e6:.0f} µs | {m[('all_gather', big)] * 1e3:.2f} ms |")
        ar_lat = m[("all_reduce", 8)] / (2 * (world - 1))
        ar_bw = 2 * (world - 1) / world * big / max(m[("all_reduce", big)] - m[("all_reduce", 8)], 1e-9)
        ag_lat = m[("all_gather", 8)] / (world - 1)
        ag_bw = (world - 1) * big / max(m[("all_gather", big)] - m[("all_gather", 8)], 1e-9)
        fits.append((world, ar_lat, ar_bw, ag_lat, ag_bw))
    # World 2 is the only one with a core per rank on this 2-vCPU machine: use its fit.
    _, c["ar_lat"], c["ar_bw"], c["ag_lat"], c["ag_bw"] = fits[0]
    for world, *f in fits:
        print(f"world {world}: all-reduce α {f[0] * 1e6:.0f} µs/step, β {f[1] / 1e9:.2f} GB/s; "
              f"all-gather α {f[2] * 1e6:.0f} µs/step, β {f[3] / 1e9:.2f} GB/s")
    return c


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def defaults() -> dict:
    return {"kind": "gloo", "sec_per_elem": SECONDS_PER_ELEMENT, "ar_lat": ALLREDUCE_STEP_LATENCY_S,
            "ar_bw": ALLREDUCE_BYTES_PER_S, "ag_lat": ALLGATHER_STEP_LATENCY_S, "ag_bw": ALLGATHER_BYTES_PER_S}


def nccl(gloo: dict) -> dict:
    """The NCCL constant set: published latency model and bus bandwidths; the same compute
    and a per-step latency for choose_digit_bits (NCCL's inter-node hop)."""
    return {**gloo, "kind": "nccl", "ar_lat": NCCL_INTER_HOP_US * 1e-6, "ar_bw": NCCL_BUSBW_INTER_NODE}


def report(c: dict) -> str:
    sets = {"gloo": c, "NCCL": nccl(c)}
    fr = framing_cost(1024, c)
    sh = sharded_step_cost(1024, 15_625_000, 64, c)

    def verdict(b: float, limit: float) -> str:
        return "met" if b <= limit else "MISSED"

    hist = 8 * (1 + (1 << SHARDED_DIGIT_BITS))
    sh11 = sharded_step_cost(1024, 15_625_000, 64, c, bits=11)
    checks = [f"- framing at 1,024 ranks: {fr['bytes']:.0f} bytes sent + received per operation "
              f"(target <= 1 kB: {verdict(fr['bytes'], 1000)}; before: {_fmt_bytes(fr['old_bytes'])})",
              f"- one sharded table's step at 1,024 ranks ({SHARDED_DIGIT_BITS}-bit digits, as "
              f"distributed.step.digit_bits_for picks): {_fmt_bytes(sh['sent'])} sent + "
              f"{_fmt_bytes(sh['received'])} received per rank = {_fmt_bytes(sh['sent'] + sh['received'])} "
              f"(target <= 100 kB: {verdict(sh['sent'] + sh['received'], 100e3)}; {sh['rounds']} all-reduced "
              f"histograms of {hist:,} bytes)",
              f"- the same with the earlier 11-bit digits (3 rounds of 16 kB histograms): "
              f"{_fmt_bytes(sh11['sent'] + sh11['received'])} sent + received "
              f"(target: {verdict(sh11['sent'] + sh11['received'], 100e3)})"]
    return "\n".join([
        "# distsparse cost model (benchmarks/cost_model.py)\n",
        f"constants: gloo {c['sec_per_elem'] * 1e9:.2f} ns/element; all-reduce α {c['ar_lat'] * 1e6:.0f} µs/step, "
        f"β {c['ar_bw'] / 1e9:.2f} GB/s; all-gather α {c['ag_lat'] * 1e6:.0f} µs/step, "
        f"β {c['ag_bw'] / 1e9:.2f} GB/s. "
        f"NCCL: {NCCL_GPUS_PER_NODE} GPUs per node, tree latency 6.8 + 2((g-1)·0.6 + log2(nodes)·5.0) µs, "
        f"busbw {NCCL_BUSBW_INTRA_NODE / 1e9:g} GB/s in a node, {NCCL_BUSBW_INTER_NODE / 1e9:g} GB/s across nodes.\n",
        *checks, "\n## Framing per operation (begin + finish)\n", framing_table(sets),
        "\n## A sharded table's step\n", sharded_table(sets, 15_625_000, 64),
        sharded_table(sets, CKPT_ROWS, CKPT_COLS),
        "\n## Checkpoints\n", checkpoint_table(sets),
        "\n## Replicated tables' step (gloo constants)\n", table(c),
        "\n## Replicated tables' step (NCCL constants)\n", table(nccl(c)), ""])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*(int(a) for a in sys.argv[2:6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="measure the constants on this machine first")
    parser.add_argument("--out", default=None, help="also write the report to this markdown file")
    args = parser.parse_args()
    c = {**defaults(), **calibrate()} if args.calibrate else defaults()
    text = report(c)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
