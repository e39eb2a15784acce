"""The distributed engine: how ranks share one step's work and end with the same masks.

One concept per module, each depending only on those listed before it and on
``distsparse.masks`` / ``distsparse.kernels``:

* :mod:`~distsparse.distributed.comm` — every collective, behind :class:`Comm` (the only
  module that imports ``torch.distributed``; degrades to local with no process group).
* :mod:`~distsparse.distributed.planner` — who computes what: whole groups to owners,
  large replicated groups split into row ranges where the cost model says it pays.
* :mod:`~distsparse.distributed.selection` — the exact global k-lowest selection over
  score shards (radix rounds of histograms, ties to the lowest global block index).
* :mod:`~distsparse.distributed.sharding` — FSDP2/HSDP ``DTensor`` rows: who owns which
  block rows, halos.
* :mod:`~distsparse.distributed.rects` — tables sharded in rectangles (TorchRec).
* :mod:`~distsparse.distributed.step` — one sparsifier step across ranks, driving the
  modules above.

The public names (errors) are re-exported by :mod:`distsparse`.
"""

from .comm import CollectiveTimeoutError, Comm, RankDisagreementError, RemoteError

__all__ = ["Comm", "CollectiveTimeoutError", "RankDisagreementError", "RemoteError"]
