#!/usr/bin/env python
"""Checkpoints of one FSDP2-sharded table: distsparse's single file vs DCP, and DCP's own
figures for the table's weights beside them (issue 18 Targets).

    python benchmarks/bench_checkpoint_sharded.py            # 4,000,000 x 64, world 2 and 4 (~3-6 min)
    python benchmarks/bench_checkpoint_sharded.py --quick    # 400,000 x 64

One ``float32`` table (``torch.randn``, fixed seed), an ``nn.Embedding`` wrapped with
``fully_shard`` on a 1-D CPU mesh (gloo, one thread per rank), ``DataNormSparsifier``
sparsity 0.5 with ``(1, 4)`` blocks, one ``step()`` before anything is timed. Per world size
and per rank, for each operation:

* ``single file``: ``save_checkpoint`` then ``load_checkpoint`` into the same sparsifier
  (its masks already exist: a resume after ``add_data``);
* ``DCP (sparsity)``: ``dcp.save({"sparsity": distsparse.dcp_state(sp)})`` / ``dcp.load``
  (printed as "not available" while ``distsparse.dcp_state`` does not exist);
* ``DCP (weights)``: plain ``dcp.save`` / ``dcp.load`` of the sharded module's state dict,
  the anchor: DCP scales per shard.

Measured: wall time (max over ranks, after a barrier), each rank's process CPU time, peak
RSS growth (``/proc/self/clear_refs`` + ``VmHWM``: the most extra memory resident at any
moment of the call) and the bytes the rank received through ``torch.distributed``
(point-to-point receives, broadcasts from others, the others' parts of all-gathers and
gathers, all-reduce buffers: counted by wrapping those functions). Targets: peak RSS growth
at most the rank's own bool mask (rows/world x 64 B) + 48 MB (the single file's writer may
add the whole packed mask); load at world 4 no slower than at world 2; bytes received on load
at most 1.2x the rank's packed share plus metadata. Then one process, 1,000,000 x 64 (a
plain parameter): ``save_checkpoint`` + ``load_checkpoint``, first call each (target
0.15 s). Results: ``benchmarks/results/checkpoint_sharded.md`` (``_quick.md`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common  # noqa: E402

SEED = 4242
MB = 1e6


# --------------------------------------------------------------------------- child


class _Received:
    """Bytes this rank receives through torch.distributed (its Python API, wrapped)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes = 0
        self._dist = dist
        for name in ("irecv", "recv", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "all_reduce",
                     "scatter"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn):
        def nbytes(t) -> int:
            return t.numel() * t.element_size()

        def wrapped(*args, **kwargs):
            dist = self._dist
            me = dist.get_rank()
            if name in ("irecv", "recv", "all_reduce"):
                self.bytes += nbytes(args[0] if args else kwargs["tensor"])
            elif name == "broadcast":
                src = kwargs.get("src", args[1] if len(args) > 1 else None)
                if src is not None and src != me:
                    self.bytes += nbytes(args[0] if args else kwargs["tensor"])
            elif name == "all_gather":
                out = args[0] if args else kwargs["tensor_list"]
                self.bytes += sum(nbytes(t) for t in out) - nbytes(out[0])
            elif name == "all_gather_into_tensor":
                out, inp = (args[0], args[1]) if len(args) > 1 else (kwargs["output_tensor"], kwargs["input_tensor"])
                self.bytes += nbytes(out) - nbytes(inp)
            elif name == "gather":
                out = kwargs.get("gather_list", args[1] if len(args) > 1 else None)
                if out:
                    self.bytes += sum(nbytes(t) for t in out) - nbytes(out[0])
            elif name == "scatter":
                self.bytes += nbytes(args[0] if args else kwargs["tensor"])
            return fn(*args, **kwargs)

        return wrapped


def _measure(fn, received: _Received) -> dict:
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    rss = _common.proc_status_kb("VmRSS")
    _common.reset_peak_rss()
    got = received.bytes
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = dict(wall=wall, cpu=cpu, growth_mb=(_common.proc_status_kb("VmHWM") - rss) * 1024 / MB,
               received=received.bytes - got)
    dist.barrier()
    return out


def run_child(cfg: dict) -> dict:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg["pg_timeout"]))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distsparse
    from distsparse.masks import pack_bits

    received = _Received()
    rows, cols, folder = cfg["rows"], cfg["cols"], cfg["folder"]
    emb = nn.Embedding(rows, cols, _weight=torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED)))
    fully_shard(emb, mesh=init_device_mesh("cpu", (world,)))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("table", emb.weight)
    sp.step()
    local = sp.get_mask("table").to_local()
    digest = pack_bits(local).numpy().tobytes()
    out: dict = dict(rank=rank, world=world, local_rows=int(local.shape[0]))
    path = f"{folder}/w{world}.safetensors"
    out["single_save"] = _measure(lambda: distsparse.save_checkpoint(path, sp), received)
    out["single_load"] = _measure(lambda: distsparse.load_checkpoint(path, sp), received)
    out["single_exact"] = pack_bits(sp.get_mask("table").to_local()).numpy().tobytes() == digest
    if hasattr(distsparse, "dcp_state"):
        state = {"sparsity": distsparse.dcp_state(sp)}
        out["dcp_save"] = _measure(lambda: dcp.save(state, checkpoint_id=f"{folder}/dcp_sp_w{world}"), received)
        out["dcp_load"] = _measure(lambda: dcp.load(state, checkpoint_id=f"{folder}/dcp_sp_w{world}"), received)
        out["dcp_exact"] = pack_bits(sp.get_mask("table").to_local()).numpy().tobytes() == digest
    weights = emb.state_dict()
    out["weights_save"] = _measure(lambda: dcp.save(weights, checkpoint_id=f"{folder}/dcp_w_w{world}"), received)
    out["weights_load"] = _measure(lambda: dcp.load(weights, checkpoint_id=f"{folder}/dcp_w_w{world}"), received)
    dist.barrier()
    dist.destroy_process_group()
    return out


def one_process(rows: int, cols: int, folder: str) -> dict:
    """Fresh interpreter: first-call save_checkpoint + load_checkpoint of a plain table."""
    import torch

    torch.set_num_threads(1)
    import distsparse

    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED))
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("table", table)
    sp.step()
    fresh = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    fresh.add_data("table", table)
    path = f"{folder}/one.safetensors"
    c0, t0 = time.process_time(), time.perf_counter()
    distsparse.save_checkpoint(path, sp)
    t1 = time.perf_counter()
    distsparse.load_checkpoint(path, fresh)
    t2, c2 = time.perf_counter(), time.process_time()
    assert torch.equal(fresh.get_mask("table"), sp.get_mask("table"))
    return dict(save=t1 - t0, load=t2 - t1, cpu=c2 - c0)


# -------------------------------------------------------------------------- parent


def _fmt_ranks(results: list[dict], key: str, f) -> str:
    return " / ".join(f"r{r['rank']}: {f(r[key])}" if key in r else f"r{r['rank']}: n/a" for r in results)


def main() -> int:
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x fewer rows (400,000)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--cols", type=int, default=64)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--one-rows", type=int, default=1_000_000)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if args.one is not None:
        cfg = json.loads(args.one)
        print("RESULT " + json.dumps(one_process(cfg["rows"], cfg["cols"], cfg["folder"])), flush=True)
        return 0

    rows = args.rows or (400_000 if args.quick else 4_000_000)
    out = args.out or os.path.join(HERE, "results", "checkpoint_sharded_quick.md" if args.quick
                                   else "checkpoint_sharded.md")
    info = _common.machine_info()
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="distsparse_bench_ckpt_")
    runs, loads, errors = {}, {}, []
    try:
        for world in [int(w) for w in args.worlds.split(",")]:
            loads[world] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"[world {world}] launching (load {loads[world]}) ...", file=sys.stderr, flush=True)
            cfg = dict(rows=rows, cols=args.cols, folder=folder, pg_timeout=max(60.0, args.timeout / 2))
            res = _common.launch_ranks(__file__, "fsdp2", world, cfg, args.timeout)
            bad = [r for r in res if "error" in r]
            if bad:
                errors += [f"world {world} rank {r['rank']}: {r['error']}" for r in bad]
                print("  ERROR: " + "; ".join(r["error"][:2000] for r in bad), file=sys.stderr)
                continue
            runs[world] = sorted(res, key=lambda r: r["rank"])
        loads["one"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one",
                               json.dumps(dict(rows=args.one_rows, cols=args.cols, folder=folder))],
                              env=_common.child_env(), capture_output=True, text=True, timeout=args.timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        one = json.loads(lines[-1][7:]) if lines else None
        if one is None:
            errors.append(f"one process: {proc.stderr[-2000:]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    md = [f"# Checkpoints of an FSDP2-sharded {rows:,} x {args.cols} table: single file vs DCP\n",
          _common.machine_info_md(info), ""]
    ops = [("single file", "single"), ("DCP (sparsity: distsparse.dcp_state)", "dcp"), ("DCP (weights)", "weights")]
    header = ["world", "operation", "wall (max over ranks)", "per-rank CPU", "per-rank peak RSS growth",
              "per-rank bytes received", "per-rank target growth (own bool mask + 48 MB)"]
    table = []
    for world, res in runs.items():
        own = [r["local_rows"] * args.cols / MB + 48 for r in res]
        target = " / ".join(f"r{r['rank']}: {t:.0f} MB" for r, t in zip(res, own))
        for label, key in ops:
            for phase in ("save", "load"):
                k = f"{key}_{phase}"
                if not all(k in r for r in res):
                    table.append([str(world), f"{label} {phase}", "not available", "", "", "", ""])
                    continue
                table.append([str(world), f"{label} {phase}", f"{max(r[k]['wall'] for r in res):.2f} s",
                              _fmt_ranks(res, k, lambda v: f"{v['cpu']:.2f} s"),
                              _fmt_ranks(res, k, lambda v: f"{v['growth_mb']:.0f} MB"),
                              _fmt_ranks(res, k, lambda v: f"{v['received'] / MB:.1f} MB"), target])
        share = " / ".join(f"r{r['rank']}: {r['local_rows'] * args.cols / 8 / MB:.1f} MB" for r in res)
        table.append([str(world), "(own packed share, for the bytes target)", "", "", "", share, ""])
        table.append([str(world), "loads bit-exact (single file / DCP)",
                      " / ".join(str(all(r[f"{k}_exact"] for r in res)) if f"{k}_exact" in res[0] else "n/a"
                                 for k in ("single", "dcp")),
                      "", "", "", ""])
    md.append(_common.md_table(header, table))
    md.append("Load average (1/5/15 min) when each run started: "
              + "; ".join(f"{k if k == 'one' else f'world {k}'}: {v}" for k, v in loads.items()) + "\n")
    if one is not None:
        md.append(f"One process, {args.one_rows:,} x {args.cols} plain table, first call each: save_checkpoint "
                  f"{one['save']:.3f} s + load_checkpoint {one['load']:.3f} s = **{one['save'] + one['load']:.3f} s**"
                  f" (process CPU {one['cpu']:.3f} s; target 0.15 s).\n")
    if errors:
        md.append("Errors:\n\n" + "\n".join(f"- {e}" for e in errors) + "\n")
    _common.write_report(md, out, time.perf_counter() - started)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
