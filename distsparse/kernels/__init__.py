"""Compute kernels under the mask functions: they import nothing else from the package.

* :mod:`.radix` — order-preserving score keys and the exact radix selection (torch ops);
* :mod:`.fused_cpu` — (1,4)-like blocks: one read of the data writing the mask words outside a
  sampled bracket around the cut and gathering the few inside it; else one pass for scores, keys
  and first histogram, refinement over candidates, one mask write. Compiled with numba (optional:
  the torch path is the fallback, and runs wherever it measured faster);
* :mod:`.fused_triton` — the three-pass design on CUDA in Triton (kernels in ``_fused_triton_jit``):
  digit choice and counts stay on the device; optional (the torch path is the fallback).
"""
