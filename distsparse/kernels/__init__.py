"""Compute kernels under the mask functions: they import nothing else from the package.

* :mod:`.radix` — order-preserving score keys and the exact radix selection (torch ops);
* :mod:`.fused_cpu` — one-pass block scores + keys + first histogram, then refinement over
  candidates and one mask write, compiled with numba (optional: the torch path is the fallback);
* :mod:`.fused_triton` — the same design on CUDA in Triton (kernels in ``_fused_triton_jit``):
  digit choice and counts stay on the device; optional (the torch path is the fallback).
"""
