"""File size and save/load time of :func:`distsparse.export.save_sparse_data` vs a dense
safetensors file of the same table.

    python benchmarks/bench_export.py                    # 1,000,000 x 64 float32, 80% (1, 4)
    python benchmarks/bench_export.py --rows 100000      # a quick run

One process, one thread. The sparse file is written from a DataNormSparsifier's masked
table (``get_data(name, return_original=False)``); the dense file is safetensors'
``save_file`` of that same masked table. Times are the best of ``--repeat`` runs and
include the sparse file's checksums and fsync; loads read the whole file and return dense
tensors (the dense one with ``safetensors.torch.load`` of the file's bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load, save_file

    from distsparse import DataNormSparsifier
    from distsparse.export import load_sparse_data, save_sparse_data

    torch.set_num_threads(1)
    table = torch.nn.Parameter(torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)))
    sp = DataNormSparsifier(sparsity_level=args.sparsity, sparse_block_shape=(1, 4))
    sp.add_data("table", table)
    sp.step()
    masked = sp.get_data("table", return_original=False).detach()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp:
        sparse, dense = os.path.join(tmp, "sparse.safetensors"), os.path.join(tmp, "dense.safetensors")
        t_save_sparse = best(lambda: save_sparse_data(sparse, sp))
        t_save_dense = best(lambda: save_file({"table": masked}, dense))
        t_load_sparse = best(lambda: load_sparse_data(sparse))
        # Read the bytes and decode, as load_sparse_data does (load_file's mmap would only
        # map the pages, not read them).
        t_load_dense = best(lambda: load(open(dense, "rb").read()))
        assert torch.equal(load_sparse_data(sparse)["table"].view(torch.int32), masked.view(torch.int32))
        size_sparse, size_dense = os.path.getsize(sparse), os.path.getsize(dense)

    print(f"table {args.rows:,} x {args.cols} float32, {args.sparsity:.0%} of (1, 4) blocks pruned, "
          f"torch {torch.__version__}, 1 thread, best of {args.repeat}")
    print("| file | size | save | load |")
    print("|---|---:|---:|---:|")
    print(f"| dense safetensors (`save_file`) | {size_dense / 2**20:,.1f} MiB | {t_save_dense:.2f} s | "
          f"{t_load_dense:.2f} s |")
    print(f"| distsparse block-sparse (`save_sparse_data`) | {size_sparse / 2**20:,.1f} MiB "
          f"({size_sparse / size_dense:.1%}) | {t_save_sparse:.2f} s | {t_load_sparse:.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
