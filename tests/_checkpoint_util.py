"""Shared helpers of the checkpoint tests: deterministic sparsifier states and comparisons."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from distsparse import DataNormSparsifier, LinearScheduler
from distsparse.masks import pack_bits

# Group names deliberately hold "." and "/" (safetensors keys are arbitrary strings).
EMB = "model.emb.weight"
LAYER = "layers/0.weight"
ODD = "odd.sized/mask"
BATCH = "batch"


def model(seed: int = 0) -> dict[str, Any]:
    """The user's data: an embedding, a parameter, an oddly sized parameter (its packed
    mask needs padding bits) and a per-rank batch."""
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(40, 12)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(40, 12, generator=g))
    return {
        EMB: emb,
        LAYER: nn.Parameter(torch.randn(16, 8, generator=g)),
        ODD: nn.Parameter(torch.randn(7, 5, generator=g)),
        BATCH: torch.randn(6, 10, generator=g),
    }


def build(seed: int = 0, groups: tuple[str, ...] = (EMB, LAYER, ODD, BATCH), steps: int = 0,
          scheduler: bool = True) -> tuple[DataNormSparsifier, LinearScheduler | None, dict[str, Any]]:
    """A sparsifier (+ LinearScheduler) over ``groups`` of :func:`model`, stepped ``steps`` times."""
    data = model(seed)
    sp = DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(1, 4))
    for name in groups:
        if name == ODD:
            sp.add_data(name, data[name], sparse_block_shape=(2, 2), zeros_per_block=3)
        else:
            sp.add_data(name, data[name])
    sch = LinearScheduler(sp, final_value=0.9, initial_value=0.1, ramp_steps=8) if scheduler else None
    for _ in range(steps):
        sp.step()
        if sch is not None:
            sch.step()
    return sp, sch, data


def snapshot(sp: DataNormSparsifier, sch: Any = None) -> dict[str, Any]:
    """Everything observable about the state, with masks as exact bytes (comparable with ==)."""
    sd = sp.state_dict()
    masks = {n: (tuple(m.shape), hashlib.sha256(pack_bits(m).numpy().tobytes()).hexdigest())
             for n, m in sd.pop("masks").items()}
    return {
        "state": sd,
        "masks": masks,
        "data_groups": {n: dict(c) for n, c in sp.data_groups.items()},
        "pending": sorted(sp._pending),
        "scheduler": None if sch is None else sch.state_dict(),
        "last_param": None if sch is None else sch.get_last_param(),
    }


def mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(pack_bits(mask).numpy().tobytes()).hexdigest()
