#!/usr/bin/env python
"""Checkpoint size and save + load time: distsparse vs torch.ao's data sparsifier.

    python benchmarks/bench_checkpoint.py             # 1,000,000 x 64 float32 table (~1 minute)
    python benchmarks/bench_checkpoint.py --rows 100000   # smaller, seconds

One ``float32`` table, sparsity 0.5 with ``(1, 4)`` blocks. Each side runs in its own
fresh Python process with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)
and regenerates the same table from a fixed seed; the mask is computed (``step()``) before
any timing starts.

* **torch.ao**: ``torch.save(sparsifier.state_dict(), path)``; load is
  ``torch.load(path, weights_only=False)`` (its state holds a sparse COO mask and the data
  itself, so the safe ``weights_only=True`` cannot load it) + ``load_state_dict`` into a
  fresh sparsifier.
* **distsparse**: ``save_checkpoint(path, sparsifier)`` (atomic: temp file, fsync, rename,
  folder fsync — durability torch.save does not pay for); load is
  ``load_checkpoint(path, fresh_sparsifier)`` into a fresh sparsifier that already holds
  the table (the data belongs to the model's checkpoint), verifying every checksum.

Both sides write into a temporary folder on the same filesystem, deleted afterwards. Both
loaded masks are compared bit for bit. Results: a markdown table printed and written to
``benchmarks/results/checkpoint.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import child_env, machine_info, machine_info_md, md_table  # noqa: E402

SEED = 1234
SPARSITY, BLOCK = 0.5, (1, 4)


def _table(rows: int, cols: int):
    import torch

    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(SEED))


def _digest(mask) -> str:
    import numpy as np

    bits = np.packbits(mask.detach().to("cpu").bool().reshape(-1).numpy())
    return hashlib.sha256(bits.tobytes()).hexdigest()


def child(impl: str, rows: int, cols: int, folder: str) -> dict:
    import torch

    torch.set_num_threads(1)
    table = _table(rows, cols)
    if impl == "torchao":
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier

        def make():
            return DataNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=BLOCK)

        path = os.path.join(folder, "torchao.pt")
        sp = make()
        sp.add_data("table", table)
        sp.step()
        t0 = time.perf_counter()
        torch.save(sp.state_dict(), path)
        t1 = time.perf_counter()
        fresh = make()
        t2 = time.perf_counter()
        fresh.load_state_dict(torch.load(path, weights_only=False))
        t3 = time.perf_counter()
    else:
        from distsparse import DataNormSparsifier, load_checkpoint, save_checkpoint

        def make():
            return DataNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=BLOCK)

        path = os.path.join(folder, "distsparse.safetensors")
        sp = make()
        sp.add_data("table", torch.nn.Parameter(table))
        sp.step()
        t0 = time.perf_counter()
        save_checkpoint(path, sp)
        t1 = time.perf_counter()
        fresh = make()
        fresh.add_data("table", torch.nn.Parameter(table))  # the model's data, not timed
        t2 = time.perf_counter()
        load_checkpoint(path, fresh)
        t3 = time.perf_counter()
    return {
        "impl": impl,
        "bytes": os.path.getsize(path),
        "save_s": t1 - t0,
        "load_s": t3 - t2,
        "mask_saved": _digest(sp.get_mask("table")),
        "mask_loaded": _digest(fresh.get_mask("table")),
        "density": float(fresh.get_mask("table").float().mean()),
    }


def launch(impl: str, rows: int, cols: int, timeout: float) -> dict:
    folder = tempfile.mkdtemp(prefix=f"bench-ckpt-{impl}-", dir=os.environ.get("BENCH_TMPDIR"))
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", impl, "--rows", str(rows),
             "--cols", str(cols), "--folder", folder],
            capture_output=True, text=True, env=child_env(), timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{impl} child failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", choices=["torchao", "distsparse"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.cols, args.folder)))
        return 0

    info = machine_info()
    ao = launch("torchao", args.rows, args.cols, args.timeout)
    ds = launch("distsparse", args.rows, args.cols, args.timeout)
    same = ao["mask_loaded"] == ds["mask_loaded"] == ao["mask_saved"] == ds["mask_saved"]
    mb = 1e6

    def row(r: dict) -> list[str]:
        return [r["impl"], f"{r['bytes'] / mb:,.1f}", f"{r['save_s']:.3f}", f"{r['load_s']:.3f}",
                f"{r['save_s'] + r['load_s']:.3f}"]

    size_ratio = ao["bytes"] / ds["bytes"]
    time_ratio = (ao["save_s"] + ao["load_s"]) / (ds["save_s"] + ds["load_s"])
    table = md_table(["implementation", "file size (MB)", "save (s)", "load (s)", "save + load (s)"],
                     [row(ao), row(ds),
                      ["**torch.ao / distsparse**", f"**{size_ratio:,.1f}x**",
                       f"{ao['save_s'] / ds['save_s']:,.1f}x", f"{ao['load_s'] / ds['load_s']:,.1f}x",
                       f"**{time_ratio:,.1f}x**"]])
    data_mb = args.rows * args.cols * 4 / mb
    text = (
        f"# Checkpoint: distsparse vs torch.ao\n\n"
        f"`python benchmarks/bench_checkpoint.py --rows {args.rows} --cols {args.cols}`\n\n"
        f"One {args.rows:,} x {args.cols} float32 table ({data_mb:,.0f} MB of data), sparsity "
        f"{SPARSITY} with {BLOCK} blocks; each side in a fresh process, one thread.\n\n"
        f"{table}\n"
        f"- Targets: file >= 25x smaller, save + load >= 20x faster. "
        f"Met: size {'yes' if size_ratio >= 25 else 'NO'}, time {'yes' if time_ratio >= 20 else 'NO'}.\n"
        f"- Masks after load identical on both sides and to the saved ones: {'yes' if same else 'NO'} "
        f"(density {ds['density']:.4f}).\n"
        f"- torch.ao saves the data itself and a sparse COO mask with `torch.save` (pickle; loading "
        f"needs `weights_only=False`, i.e. runs code from the file). distsparse saves 1 bit per "
        f"element plus JSON, never the data, and its save is durable (fsync + atomic rename); "
        f"its load verifies a sha256 per tensor.\n"
        f"- Page cache warm (the file was just written); no `drop_caches`.\n\n"
        f"## Machine\n\n{machine_info_md(info)}"
    )
    print(text)
    out = args.out or os.path.join(HERE, "results", "checkpoint.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
