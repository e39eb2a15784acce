"""DataNormSparsifier: block L1/L2-norm masks, bit-identical to torch.ao's on tie-free data."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from .masks import norm_block_mask
from .distributed.selection import blocks_to_prune, shard_block_scores, shard_mask
from .sparsifier import BaseDataSparsifier

__all__ = ["DataNormSparsifier"]

_CONFIG_KEYS = ("sparsity_level", "sparse_block_shape", "zeros_per_block")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DataNormSparsifier(BaseDataSparsifier):
    r"""Zeroes the blocks of lowest mean magnitude.

    Each block of ``sparse_block_shape`` (blocks start at index 0; edge blocks are partial)
    is scored by the mean over its valid elements of ``|x|`` (``norm="L1"``) or ``x²``
    (``"L2"``); exactly ``round(sparsity_level × number_of_blocks)`` lowest-scoring blocks
    are pruned (Python's round, half to even, as torch.ao), and inside each of those its
    ``zeros_per_block`` smallest elements (all of them when ``None``) are zeroed. Ties go
    to the lower row-major index, so masks are deterministic on every rank and run.

    Data: floating-point tensors with at least one dimension. 1-D data is one row; N-D
    data (N > 2) is viewed as ``(prod(shape[:-1]), shape[-1])``, blocks running along the
    last dimension. Empty tensors get an empty mask. Integer, bool, complex and 0-d data
    raise ``TypeError``/``ValueError`` at ``add_data``.

    Args:
        data_list: optional ``[(name, data), ...]``.
        sparsity_level: fraction of blocks to prune, in [0, 1] (out-of-range values raise,
            where torch.ao clamps).
        sparse_block_shape: ``(block_rows, block_cols)``, positive.
        zeros_per_block: zeros inside a pruned block, 0 … block size; ``None`` = the block.
        norm: ``"L1"`` or ``"L2"``.
        process_group: keyword-only, see :class:`BaseDataSparsifier`.

    Differences from torch.ao (deliberate): ``zeros_per_block=None`` means "the whole
    block" for every group, also one that overrides ``sparse_block_shape`` (torch.ao
    freezes the default block's size); data of shape ``(n, 1)`` is a column (torch.ao
    squeezes it into a row and returns a mask of the wrong shape); NaN/Inf raise
    ``ValueError`` (torch.ao never prunes them).
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        sparsity_level: float = 0.5,
        sparse_block_shape: tuple[int, int] = (1, 4),
        zeros_per_block: int | None = None,
        norm: str = "L1",
        *,
        process_group: Any | None = None,
    ) -> None:
        if norm not in ("L1", "L2"):
            raise ValueError(f"norm must be 'L1' or 'L2', got {norm!r}")
        self.norm = norm
        super().__init__(
            data_list,
            process_group=process_group,
            sparsity_level=sparsity_level,
            sparse_block_shape=sparse_block_shape,
            zeros_per_block=zeros_per_block,
        )

    def _canonical_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"group {name!r}: unknown config key(s) {unknown}; "
                             f"DataNormSparsifier takes {list(_CONFIG_KEYS)}")
        out = dict(config)
        level = config.get("sparsity_level", 0.5)
        if isinstance(level, bool) or not isinstance(level, numbers.Real):
            raise TypeError(f"group {name!r}: sparsity_level must be a real number, got {level!r}")
        level = float(level)
        if not (0.0 <= level <= 1.0):  # also refuses NaN
            raise ValueError(f"group {name!r}: sparsity_level must be in [0, 1], got {level!r}")
        out["sparsity_level"] = level
        block = config.get("sparse_block_shape", (1, 4))
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in block)):
            raise TypeError(f"group {name!r}: sparse_block_shape must be two integers, got {block!r}")
        block = (int(block[0]), int(block[1]))
        if block[0] <= 0 or block[1] <= 0:
            raise ValueError(f"group {name!r}: sparse_block_shape must be positive, got {block!r}")
        out["sparse_block_shape"] = block
        zeros = config.get("zeros_per_block")
        if zeros is not None:
            if isinstance(zeros, bool) or not isinstance(zeros, numbers.Integral):
                raise TypeError(f"group {name!r}: zeros_per_block must be an integer or None, got {zeros!r}")
            zeros = int(zeros)
            if not 0 <= zeros <= block[0] * block[1]:
                raise ValueError(f"group {name!r}: zeros_per_block must be in [0, {block[0] * block[1]}] "
                                 f"for block shape {block}, got {zeros}")
        out["zeros_per_block"] = zeros
        return out

    def _check_data(self, name: str, data: torch.Tensor) -> None:
        if data.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"group {name!r}: DataNormSparsifier needs floating-point data "
                            f"(float16/bfloat16/float32/float64), got {data.dtype}")
        if data.dim() == 0:
            raise ValueError(f"group {name!r}: 0-d (scalar) data has no blocks to sparsify; "
                             "reshape it to at least 1-D")

    def _sparsifier_args(self) -> dict[str, Any]:
        return {"norm": self.norm}

    def update_mask(self, name: str, data: torch.Tensor, sparsity_level: float,
                    sparse_block_shape: tuple[int, int], zeros_per_block: int | None,
                    **kwargs: Any) -> torch.Tensor:
        values_per_block = math.prod(sparse_block_shape)
        zeros = values_per_block if zeros_per_block is None else zeros_per_block
        return norm_block_mask(data, sparsity_level, tuple(sparse_block_shape), zeros, self.norm)

    # -- sharded protocol: a big replicated group computed in row ranges by several ranks --
    def _block_shape(self, name: str) -> tuple[int, int] | None:
        # A subclass that overrides update_mask computes whole groups only.
        if type(self).update_mask is not DataNormSparsifier.update_mask:
            return None
        return tuple(self.data_groups[name]["sparse_block_shape"])  # type: ignore[return-value]

    def _shard_scores(self, name: str, matrix: torch.Tensor, row_start: int, row_stop: int,
                      config: dict[str, Any]) -> torch.Tensor:
        return shard_block_scores(matrix, row_start, row_stop, tuple(config["sparse_block_shape"]), self.norm)

    def _blocks_to_prune(self, n_blocks: int, config: dict[str, Any]) -> int:
        return blocks_to_prune(config["sparsity_level"], n_blocks)

    def _shard_mask(self, name: str, matrix: torch.Tensor, row_start: int, row_stop: int,
                    pruned: torch.Tensor, config: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
        block = tuple(config["sparse_block_shape"])
        zeros = config["zeros_per_block"]
        zeros = math.prod(block) if zeros is None else zeros
        return shard_mask(matrix, row_start, row_stop, pruned, block, zeros, self.norm, out)  # type: ignore[arg-type]
