#!/usr/bin/env python
"""CUDA checks and timings, for a machine with a GPU (CI has none; the CPU suite covers logic).

    python benchmarks/gpu_checks.py              # on a CUDA machine: every check + timings
    python benchmarks/gpu_checks.py --device cpu --quick   # dry run of the same code on CPU

What it checks (each prints one ``PASS``/``FAIL`` line; the exit status is 1 on any FAIL):

* **Masks on CUDA equal masks on CPU**, bit for bit, for float32/float64/float16/bfloat16,
  L1/L2, tiled and ragged block shapes, ``zeros_per_block`` and tied data; torch.ao's CUDA
  masks are compared with its CPU masks too (so a difference inherent to CUDA's
  ``avg_pool2d`` is told apart from ours). Masks, ``squash_mask`` and a checkpoint
  round trip stay on the data's device.
* **Distributed on CUDA**: NCCL at world 1 (one GPU here; NCCL refuses two ranks on one
  device) and gloo at world 2 with CUDA data, each with a table split across ranks, small
  whole tables, a scheduler, ``squash_mask`` and a checkpoint round trip, and under NCCL an
  FSDP2 (``fully_shard``) table: every mask equals the single-process CPU mask of the same
  weights. (FSDP2 over gloo with CUDA tensors is left out: torch 2.11's own
  ``DTensor.full_tensor()`` segfaults there.)
* **Phases**: where ``step()``'s time goes on the device (scores, selection, fill).
* **Fused Triton kernels** (``--only fused``; issue 22): ``norm_block_mask`` with the
  Triton kernels (``distsparse.kernels.fused_triton``) against today's CUDA path
  (``DISTSPARSE_FUSED_TRITON=0``) and torch.ao's ``step()``, at 1M/4M/16M × 64 float32,
  block (1,4), 50 % (16M skipped when the GPU has under 24 GiB free), beside the table's
  read-once time (``x.sum()``, the floor) on the same GPU; the CUDA-graph variant
  (``GraphedBlockMask``: replay, no host sync); peak memory growth (× table bytes, with and
  without the mask the step returns); every mask equal to the CPU mask; the kernels' block
  scores equal the CPU's bit for bit (4 dtypes, 4 block shapes, L1/L2). With
  ``--device cpu`` it runs only under ``TRITON_INTERPRET=1`` (tiny sizes: a dry run).
* **Timings** (CUDA events, median of 5 after a warm-up): ``step()`` of one 1M×64 and one
  4M×64 table, block (1,4), 50 %, distsparse against torch.ao's ``DataNormSparsifier`` on
  the same GPU and data, and peak CUDA memory growth during ``step()`` in multiples of the
  table's bytes.

Every spawned rank has a hard timeout. Results go to stdout and, with ``--out DIR``, to
``DIR/gpu_checks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import distsparse  # noqa: E402
from distsparse import DataNormSparsifier  # noqa: E402

RESULTS: list[dict] = []


def record(name: str, ok: bool, **info) -> None:
    RESULTS.append(dict(check=name, ok=bool(ok), **info))
    print(("PASS " if ok else "FAIL ") + name + (" " + json.dumps(info) if info else ""), flush=True)


def check(name: str):
    def wrap(fn):
        def run(*a, **k):
            try:
                fn(*a, **k)
            except Exception as exc:  # noqa: BLE001 - a check that raises is a FAIL line
                record(name, False, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc()[-1500:])
        return run
    return wrap


def _data(shape, dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=g).to(torch.float32)
    else:
        x = torch.randn(shape, generator=g)
    return x.to(dtype)


def _ao_mask(x, level, block, zeros, norm):
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AO

    sp = AO(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
    sp.add_data("x", x.clone())
    sp.step()
    return sp.get_mask("x").to(torch.bool)


def _ds_mask(x, level, block, zeros, norm):
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
    sp.add_data("x", x)
    sp.step()
    return sp.get_mask("x")


def masks_match(device, quick):
    # (3000, 60): every block shape tiles it (the strided-add score path, whose division by
    # 15 for (3,5) blocks CUDA's scalar divide turns into a reciprocal multiply)
    shapes = [(257, 64), (1000, 37), (64, 64, 8), (300, 60)] if quick else \
        [(4097, 64), (10_000, 37), (300, 64, 8), (65_536, 128), (3000, 60)]
    cases = [((1, 4), None), ((2, 2), None), ((3, 5), None), ((1, 4), 2), ((4, 1), 3)]
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    bad, bad_ao, bad_old, n, n_ao = [], [], [], 0, 0
    for shape in shapes:
        for dtype in dtypes:
            for kind in ("randn", "ties"):
                for norm in ("L1", "L2"):
                    for block, zeros in cases:
                        x = _data(shape, dtype, kind, seed=n)
                        zeros_ = zeros if zeros is not None else block[0] * block[1]
                        cpu = _ds_mask(x, 0.5, block, zeros_, norm)
                        gpu = _ds_mask(x.to(device), 0.5, block, zeros_, norm)
                        n += 1
                        where = dict(shape=list(shape), dtype=str(dtype), kind=kind, norm=norm, block=list(block), zeros=zeros_)
                        if gpu.device.type != torch.device(device).type or gpu.dtype != torch.bool:
                            bad.append(dict(where, problem=f"mask on {gpu.device} as {gpu.dtype}"))
                        elif not torch.equal(cpu, gpu.cpu()):
                            bad.append(dict(where, differing=int((cpu != gpu.cpu()).sum())))
                        if device == "cuda":  # today's CUDA path (the Triton kernels off), information
                            with _fused_triton_off():
                                old = _ds_mask(x.to(device), 0.5, block, zeros_, norm)
                            if not torch.equal(cpu, old.cpu()):
                                bad_old.append(dict(where, differing=int((cpu != old.cpu()).sum())))
                        if len(shape) == 2 and dtype in (torch.float32, torch.float64) and zeros is None:
                            n_ao += 1
                            ao_cpu, ao_gpu = _ao_mask(x, 0.5, block, zeros_, norm), _ao_mask(x.to(device), 0.5, block, zeros_, norm)
                            if not torch.equal(ao_cpu, ao_gpu.cpu()):
                                bad_ao.append(dict(where, differing=int((ao_cpu != ao_gpu.cpu()).sum())))
    record("masks: CUDA == CPU (distsparse)", not bad, cases=n, mismatches=bad[:8], n_mismatch=len(bad))
    record("masks: CUDA path without the Triton kernels vs CPU (information)", True, n_mismatch=len(bad_old),
           examples=bad_old[:8])
    record("masks: torch.ao CUDA vs CPU (information)", True, n_mismatch=len(bad_ao), cases=n_ao,
           by_kind={k: sum(b["kind"] == k for b in bad_ao) for k in ("randn", "ties")}, examples=bad_ao[:4])


@contextlib.contextmanager
def _fused_triton_off():
    """Today's CUDA path: the Triton kernels switched off (read at every call)."""
    old = os.environ.get("DISTSPARSE_FUSED_TRITON")
    os.environ["DISTSPARSE_FUSED_TRITON"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISTSPARSE_FUSED_TRITON"]
        else:
            os.environ["DISTSPARSE_FUSED_TRITON"] = old


def device_residency(device, quick):
    from distsparse import CubicScheduler, load_checkpoint, save_checkpoint

    emb = torch.nn.Embedding(5000, 32).to(device)
    sp = DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    sp.add_data("emb", emb)
    sch = CubicScheduler(sp, final_value=0.8, initial_value=0.0, start_step=0, ramp_steps=4)
    for _ in range(5):
        sp.step()
        sch.step()
    sp.squash_mask()
    mask = sp.get_mask("emb")
    weight = sp.get_data("emb")
    ok = mask.device.type == weight.device.type == torch.device(device).type
    zeros = float((weight == 0).float().mean())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sp.safetensors")
        save_checkpoint(path, sp, sch)
        sp2 = DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
        sp2.add_data("emb", torch.nn.Embedding(5000, 32).to(device))
        sch2 = CubicScheduler(sp2, final_value=0.8, initial_value=0.0, start_step=0, ramp_steps=4)
        load_checkpoint(path, sp2, sch2)
        loaded = sp2.get_mask("emb")
    record("masks, squash_mask and a checkpoint round trip stay on the device",
           ok and loaded.device.type == mask.device.type and torch.equal(loaded.cpu(), mask.cpu()),
           mask_device=str(mask.device), loaded_device=str(loaded.device), zero_fraction=round(zeros, 4),
           sparsity=sp.sparsity())


# ------------------------------------------------------------------------- distributed


def rank_main(args):
    """One rank: NCCL or gloo with CUDA data; returns its findings as JSON on stdout."""
    import torch.distributed as dist

    from distsparse import CubicScheduler, load_checkpoint, save_checkpoint

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(args.backend, init_method=f"file://{args.init}", rank=args.rank,
                            world_size=args.world)
    assert dist.get_world_size() == args.world
    out = {}

    def mark(what):
        print(f"rank {args.rank}: {what}", flush=True)

    mark("initialised")
    tables = {"big": (40_000, 64), "a": (3000, 16), "b": (1000, 32), "c": (777, 12)}
    weights = {n: _data(s, torch.float32, "ties" if n == "c" else "randn", seed=i).to(device)
               for i, (n, s) in enumerate(tables.items())}
    sp = DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    sp.min_split_elements = 10_000
    for n, w in weights.items():
        sp.add_data(n, torch.nn.Parameter(w.clone()))
    sch = CubicScheduler(sp, final_value=0.8, initial_value=0.0, start_step=0, ramp_steps=3)
    t0 = time.perf_counter()
    for _ in range(4):
        sp.step()
        sch.step()
    sp.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["five_steps_s"] = time.perf_counter() - t0
    mark("stepped")
    out["split"] = {n: len(sp.assignment(n)) for n in tables}
    mism = {}
    for n in tables:
        m = sp.get_mask(n)
        level = sp.data_groups[n]["sparsity_level"]
        ref = _ds_mask(weights[n].cpu(), level, (1, 4), 4, "L1")
        if m.device.type != device.type or not torch.equal(m.cpu(), ref):
            mism[n] = f"{m.device} {int((m.cpu() != ref).sum())} differ"
    out["mask_mismatch"] = mism
    sp.squash_mask()
    out["squashed_on_device"] = all(sp.get_data(n).device.type == device.type for n in tables)
    folder = os.path.dirname(args.init)
    path = os.path.join(folder, "ck.safetensors")
    save_checkpoint(path, sp, sch)
    sp2 = DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))
    sp2.min_split_elements = 10_000
    for n, w in weights.items():
        sp2.add_data(n, torch.nn.Parameter(torch.zeros_like(w)))
    sch2 = CubicScheduler(sp2, final_value=0.8, initial_value=0.0, start_step=0, ramp_steps=3)
    mark("saved")
    load_checkpoint(path, sp2, sch2)
    mark("loaded")
    out["checkpoint_equal"] = all(torch.equal(sp2.get_mask(n).cpu(), sp.get_mask(n).cpu())
                                  and sp2.get_mask(n).device.type == device.type for n in tables)
    # FSDP2
    try:
        if args.no_fsdp2:
            raise RuntimeError("skipped by --no-fsdp2")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10_001, 32)).to(device)
        with torch.no_grad():
            model[0].weight.copy_(_data((10_001, 32), torch.float32, "randn", seed=9).to(device))
        mesh = init_device_mesh(device.type, (args.world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        mark("fully_shard done")
        full = model[0].weight.full_tensor().detach().cpu()
        fsp = DataNormSparsifier(sparsity_level=0.7, sparse_block_shape=(2, 2))
        fsp.add_data("emb", model[0].weight)
        mark("fsdp2 add_data")
        fsp.step()
        mark("fsdp2 stepped")
        mask = fsp.get_mask("emb")
        ref = _ds_mask(full, 0.7, (2, 2), 4, "L1")
        out["fsdp2_mask_type"] = type(mask).__name__
        out["fsdp2_local_device"] = str(mask.to_local().device)
        out["fsdp2_equal"] = bool(torch.equal(mask.full_tensor().cpu(), ref))
        fsp.squash_mask()
        out["fsdp2_squashed_zeros"] = float((model[0].weight.full_tensor() == 0).float().mean())
    except Exception as exc:  # noqa: BLE001
        out["fsdp2_error"] = f"{type(exc).__name__}: {exc}"[:600]
    dist.barrier()
    dist.destroy_process_group()
    print("RESULT " + json.dumps(out), flush=True)


def distributed(device, backend, world, timeout, fsdp2=True):
    name = f"distributed: {backend} world {world}, data on {device}" + ("" if fsdp2 else ", no FSDP2")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rdv")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs = [subprocess.Popen([sys.executable, "-X", "faulthandler", __file__, "--rank", str(r), "--world", str(world), "--backend", backend,
                                   "--init", init, "--device", device] + ([] if fsdp2 else ["--no-fsdp2"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env) for r in range(world)]
        deadline = time.monotonic() + timeout
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                outs.append(p.communicate()[0] + "\n[killed: timeout]")
        results = []
        for p, text in zip(procs, outs):
            lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
            results.append(json.loads(lines[-1][7:]) if lines and p.returncode == 0 else {"rc": p.returncode, "tail": text[-2500:]})
        ok = all("rc" not in r and not r["mask_mismatch"] and r["squashed_on_device"] and r["checkpoint_equal"]
                 and (r.get("fsdp2_equal") or not fsdp2) for r in results)
        record(name, ok, ranks=results)


# --------------------------------------------------------------------------- timings


def timings(device, quick):
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AO

    sizes = [(100_000, 64)] if quick else [(1_000_000, 64), (4_000_000, 64)]
    rows = []
    for shape in sizes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        row = dict(shape=list(shape))
        masks = {}
        for impl, cls in (("distsparse", DataNormSparsifier), ("torch.ao", AO)):
            sp = cls(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
            sp.add_data("x", x.clone())
            sp.step()  # warm-up
            times = []
            for _ in range(5):
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                sp.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            times.sort()
            row[impl + "_ms"] = round(times[len(times) // 2] * 1e3, 2)
            if device == "cuda":
                row[impl + "_peak_x_data"] = round((torch.cuda.max_memory_allocated() - base) / (x.numel() * 4), 3)
            masks[impl] = sp.get_mask("x").to(torch.bool).cpu()
            del sp
        row["speedup_vs_ao"] = round(row["torch.ao_ms"] / row["distsparse_ms"], 2)
        row["masks_equal_ao"] = bool(torch.equal(masks["distsparse"], masks["torch.ao"]))
        row["masks_equal_cpu"] = bool(torch.equal(masks["distsparse"], _ds_mask(x.cpu(), 0.5, (1, 4), 4, "L1")))
        rows.append(row)
    record("timings: step() on " + device, all(r["masks_equal_cpu"] for r in rows), rows=rows,
           gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__)


def _median_ms(fn, device, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(times[len(times) // 2] * 1e3, 2)


def phases(device, quick):
    """Where step() spends its time on this device, and what the alternatives would cost."""
    from distsparse import masks as M

    sizes = [(100_000, 64)] if quick else [(1_000_000, 64), (4_000_000, 64)]
    rows = []
    for shape in sizes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        k = round(0.5 * x.numel() / 4)
        row = dict(shape=list(shape))
        row["scores_ms"] = _median_ms(lambda: M.block_scores(x, (1, 4), "L1"), device)
        row["norm_block_mask_ms"] = _median_ms(lambda: M.norm_block_mask(x, 0.5, (1, 4), 4, "L1"), device)
        scores = M.block_scores(x, (1, 4), "L1")
        row["select_radix_ms"] = _median_ms(lambda: M._lowest_blocks_consuming(scores.clone(), k), device)
        row["select_lowest_blocks_ms"] = _median_ms(lambda: M.lowest_blocks(scores.clone(), k), device)
        row["clone_ms"] = _median_ms(lambda: scores.clone(), device)
        row["topk_ms"] = _median_ms(lambda: torch.topk(scores.reshape(-1), k, largest=False), device)
        pruned = M.lowest_blocks(scores.clone(), k)
        same = torch.equal(pruned, M._lowest_blocks_consuming(scores.clone(), k))
        row["radix_equals_lowest_blocks"] = bool(same)
        mask = torch.empty(shape, dtype=torch.bool, device=device)
        row["fill_ms"] = _median_ms(lambda: M._fill_blocks(mask, ~pruned, (1, 4)), device)
        rows.append(row)
    record("phases on " + device, True, rows=rows)


def _peak_growth(fn, device):
    """(result, peak bytes allocated above the start) of one call."""
    if device != "cuda":
        return fn(), 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def fused(device, quick):
    """Issue 22's GPU figures: the fused Triton step against today's CUDA path, torch.ao and
    the read-once floor, the CUDA-graph variant, peak memory, masks equal to the CPU's."""
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AO

    from distsparse import masks as M
    from distsparse.kernels import fused_triton as FT

    if device != "cuda" and not FT.interpreting():
        record("fused Triton kernels", True, skipped="needs CUDA (or TRITON_INTERPRET=1 for a CPU dry run)")
        return
    if not FT.available():
        record("fused Triton kernels", False, error="triton is not importable or DISTSPARSE_FUSED_TRITON=0")
        return
    if device != "cuda":
        sizes = [(2_000, 64)]
    elif quick:
        sizes = [(1_000_000, 64)]
    else:
        free = torch.cuda.mem_get_info()[0]
        sizes = [(1_000_000, 64), (4_000_000, 64)] + ([(16_000_000, 64)] if free > 24 * 2**30 else [])
    # the compiled score arithmetic (division, no FMA, float16/bfloat16 rounding) bit for bit against the CPU's
    score_bad, score_cases = [], 0
    for shape in ([(300, 60), (101, 37)] if quick else [(3000, 60), (1001, 37)]):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = (_data(shape, torch.float64, "randn", seed=score_cases) * 40).to(dtype)  # float16 squares overflow
            for blk in ((1, 4), (2, 2), (3, 5), (4, 1)):
                for nrm in ("L1", "L2"):
                    score_cases += 1
                    want = M.block_scores(x, blk, nrm)
                    got = FT.block_scores(x.to(device), blk, nrm).cpu()
                    if not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                        score_bad.append(dict(shape=list(shape), dtype=str(dtype), block=list(blk), norm=nrm,
                                              differing=int((got.view(torch.uint8) != want.view(torch.uint8)).sum())))
    record("fused Triton scores == CPU scores, bit for bit", not score_bad, cases=score_cases,
           mismatches=score_bad[:8], n_mismatch=len(score_bad))
    block, level, zeros, norm = (1, 4), 0.5, 4, "L1"
    rows = []
    for shape in sizes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        table = x.numel() * x.element_size()
        n_blocks = -(-shape[0] // block[0]) * -(-shape[1] // block[1])
        k = round(level * n_blocks)
        row = dict(shape=list(shape), table_mib=round(table / 2**20, 1))
        direct = lambda: FT.fused_block_mask(M.as_matrix(x), k, block, zeros, norm, lambda: None)  # noqa: E731
        # on CUDA norm_block_mask dispatches to the kernels (its time ~ the direct call's); the CPU dry run
        # (interpreter) calls them directly
        run = (lambda: M.norm_block_mask(x, level, block, zeros, norm)) if device == "cuda" else direct  # noqa: E731
        row["read_once_sum_ms"] = _median_ms(lambda: x.sum(), device)
        row["fused_ms"] = _median_ms(run, device)
        row["fused_direct_call_ms"] = _median_ms(direct, device)
        with _fused_triton_off():
            row["current_cuda_path_ms"] = _median_ms(lambda: M.norm_block_mask(x, level, block, zeros, norm), device)
            current, current_peak = _peak_growth(lambda: M.norm_block_mask(x, level, block, zeros, norm), device)
        mask, peak = _peak_growth(run, device)
        if device == "cuda":
            row["fused_peak_x_table"] = round(peak / table, 3)
            row["fused_peak_without_mask_x_table"] = round((peak - mask.numel()) / table, 3)
            row["current_peak_x_table"] = round(current_peak / table, 3)
        if device == "cuda":
            graphed = FT.GraphedBlockMask(M.as_matrix(x), k, block, zeros, norm)
            row["graph_replay_ms"] = _median_ms(graphed, device)
            graph_mask = graphed().clone()
            row["graph_nonfinite_flag"] = int(graphed.nonfinite.item())
            del graphed
        else:
            graph_mask = FT.GraphedBlockMask(M.as_matrix(x), k, block, zeros, norm, graph=False)().clone()
        ao = AO(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
        ao.add_data("x", x.clone())
        row["torch_ao_step_ms"] = _median_ms(ao.step, device)
        ao_mask = ao.get_mask("x").to(torch.bool).cpu()
        del ao
        with _fused_triton_off():
            sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
            sp.add_data("x", x.clone())
            row["step_current_ms"] = _median_ms(sp.step, device)
            del sp
        sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
        sp.add_data("x", x.clone())
        row["step_fused_ms"] = _median_ms(sp.step, device)
        step_mask = sp.get_mask("x").cpu()
        del sp
        cpu = M.norm_block_mask(x.cpu(), level, block, zeros, norm)
        row["fused_over_floor"] = round(row["fused_ms"] / row["read_once_sum_ms"], 2)
        row["speedup_vs_current"] = round(row["current_cuda_path_ms"] / row["fused_ms"], 2)
        row["speedup_step_vs_ao"] = round(row["torch_ao_step_ms"] / row["step_fused_ms"], 2)
        row["masks_equal_cpu"] = dict(fused=bool(torch.equal(mask.cpu(), cpu)),
                                      current=bool(torch.equal(current.cpu(), cpu)),
                                      graph=bool(torch.equal(graph_mask.cpu(), cpu)),
                                      step=bool(torch.equal(step_mask, cpu)),
                                      torch_ao=bool(torch.equal(ao_mask, cpu)))
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
        del x, mask, current, graph_mask, cpu
        if device == "cuda":
            torch.cuda.empty_cache()
    ok = all(all(v for key, v in r["masks_equal_cpu"].items() if key != "torch_ao") for r in rows)
    record("fused Triton kernels: " + device, ok, rows=rows, triton=_triton_version(),
           gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)", torch=torch.__version__)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--backend", default="nccl")
    p.add_argument("--init", default=None)
    p.add_argument("--no-fsdp2", action="store_true")
    p.add_argument("--only", default=None, help="comma list: masks,residency,nccl,gloo,timings,phases,fused")
    args = p.parse_args()
    if args.rank is not None:
        return rank_main(args)
    print(f"torch {torch.__version__}, distsparse {distsparse.__version__}, device {args.device}", flush=True)
    t0 = time.time()
    every = {"masks", "residency", "nccl", "gloo", "timings", "phases", "fused"}
    only = set(args.only.split(",")) if args.only else every
    if "masks" in only:
        check("masks")(masks_match)(args.device, args.quick)
    if "residency" in only:
        check("residency")(device_residency)(args.device, args.quick)
    if args.device == "cuda" and "nccl" in only:
        check("nccl world 1")(distributed)("cuda", "nccl", 1, args.timeout)
    if "gloo" in only:
        # FSDP2 over gloo with CUDA tensors is not a torch configuration: torch 2.11's own
        # DTensor.full_tensor() segfaults there (seen on an H100), so only NCCL runs FSDP2.
        check("gloo world 2")(distributed)(args.device, "gloo", 2, args.timeout, args.device != "cuda")
    if "timings" in only:
        check("timings")(timings)(args.device, args.quick)
    if "phases" in only:
        check("phases")(phases)(args.device, args.quick)
    if "fused" in only:
        check("fused")(fused)(args.device, args.quick)
    print(f"total {time.time() - t0:.1f} s; {sum(not r['ok'] for r in RESULTS)} failed", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_checks.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 1 if any(not r["ok"] for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
