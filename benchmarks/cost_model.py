#!/usr/bin/env python
"""Cost model of one ``DataNormSparsifier.step()`` per rank, evaluated up to 1,024 ranks.

    python benchmarks/cost_model.py               # the model's table (markdown), default constants
    python benchmarks/cost_model.py --calibrate   # measure the constants here first (~1 minute):
                                                  # gloo all-reduce/all-gather at world 2-4, one
                                                  # thread per process, and the single-process
                                                  # scoring and selection throughput

For each world size and workload it models, per rank, the plan of ``distsparse.planner``
(the same code the sparsifier runs) against today's whole-group ownership:

* compute elements: the most elements any rank scores (the step waits for the slowest);
* collectives: begin/finish frames (two all-gathers of 4,208 bytes), the mask all-gather,
  and — when some group is split — a status all-reduce, the radix rounds (digit width from
  ``selection.choose_digit_bits``) and, with ties to split, one tie-count all-reduce
  (counted here: worst case);
* bytes sent per rank (received is the same for ring algorithms): a ring all-gather sends
  ``(N-1) × P`` (``P`` the longest rank's bit-packed masks: buffers are padded to it), a
  ring all-reduce of ``S`` bytes sends ``2(N-1)/N × S``;
* time: ``compute + Σ collective`` with ring terms ``(N-1)(α + P/β)`` (all-gather) and
  ``2(N-1)(α + S/(Nβ))`` (all-reduce), no overlap.

Workloads: (a) the 26 Criteo Kaggle (Display Advertising Challenge) embedding tables —
cardinalities as in facebookresearch/dlrm's Kaggle preprocessing (33,762,577 rows in all),
16 wide (DLRM's Kaggle ``--arch-sparse-feature-size``); (b) one 1-billion-element table
(15,625,000 × 64); (c) 1,000 small tables of 10,000 × 64. Blocks (1, 4), float32.

Limits: α, β and the per-element cost are this 2-vCPU machine's loopback figures; a real
network has other latency and bandwidth, and gloo may pick other algorithms at scale
(the model is ring-only). Compute is assumed perfectly proportional to elements and
single-threaded; communication never overlaps compute; the tie round is always counted.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distsparse.planner import GroupSpec, plan  # noqa: E402
from distsparse.selection import choose_digit_bits  # noqa: E402

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
FRAME_BYTES = 4208  # distributed._frame: magic, op name, counter, digest, 4 KiB inline

CRITEO_KAGGLE_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                      27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
WORKLOADS = {
    "(a) 26 Criteo Kaggle tables x 16": [GroupSpec(f"C{i + 1:02d}", r, 16, (1, 4)) for i, r in enumerate(CRITEO_KAGGLE_ROWS)],
    "(b) one 1e9-element table": [GroupSpec("big", 15_625_000, 64, (1, 4))],
    "(c) 1,000 tables 10,000 x 64": [GroupSpec(f"t{i:04d}", 10_000, 64, (1, 4)) for i in range(1000)],
}
WORLDS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def allreduce_s(n: int, nbytes: float, c: dict) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) * (c["ar_lat"] + nbytes / (n * c["ar_bw"]))


def allgather_s(n: int, nbytes: float, c: dict) -> float:
    return 0.0 if n == 1 else (n - 1) * (c["ag_lat"] + nbytes / c["ag_bw"])


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
    sent = 0.0 if world == 1 else 2 * (world - 1) * FRAME_BYTES + (world - 1) * max(payload)
    comm = 0.0 if world == 1 else 2 * allgather_s(world, FRAME_BYTES, c) + allgather_s(world, max(payload), c)
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


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def table(c: dict) -> str:
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
    from distsparse.selection import ShardSelection, blocks_to_prune

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
    return {"sec_per_elem": SECONDS_PER_ELEMENT, "ar_lat": ALLREDUCE_STEP_LATENCY_S, "ar_bw": ALLREDUCE_BYTES_PER_S,
            "ag_lat": ALLGATHER_STEP_LATENCY_S, "ag_bw": ALLGATHER_BYTES_PER_S}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*(int(a) for a in sys.argv[2:6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="measure the constants on this machine first")
    args = parser.parse_args()
    c = calibrate() if args.calibrate else defaults()
    print(f"\nconstants: {c['sec_per_elem'] * 1e9:.2f} ns/element; all-reduce α {c['ar_lat'] * 1e6:.0f} µs/step, "
          f"β {c['ar_bw'] / 1e9:.2f} GB/s; all-gather α {c['ag_lat'] * 1e6:.0f} µs/step, β {c['ag_bw'] / 1e9:.2f} GB/s")
    print(table(c))


if __name__ == "__main__":
    main()
