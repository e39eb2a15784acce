"""distsparse: exact, rank-aware data sparsification for PyTorch.

Public names are re-exported here; importing has no side effects (no warning filters,
no process-group calls).
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint, save_checkpoint
from .dcp import dcp_state
from .export import load_sparse_data, save_sparse_data
from .distributed.comm import CollectiveTimeoutError, RankDisagreementError, RemoteError
from .integrations.accelerate import register_for_checkpointing
from .norm_sparsifier import DataNormSparsifier
from .pruned import PrunedTable, load_pruned_tables, save_pruned_tables
from .scheduler import (
    BaseDataScheduler,
    CubicScheduler,
    GammaScheduler,
    LambdaScheduler,
    LinearScheduler,
)
from .serving import PrunedEmbedding, PrunedEmbeddingBag
from .sparsifier import BaseDataSparsifier

try:
    __version__ = _version("distsparse")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0.1.0+unknown"

__all__ = [
    "BaseDataSparsifier",
    "DataNormSparsifier",
    "BaseDataScheduler",
    "GammaScheduler",
    "LambdaScheduler",
    "LinearScheduler",
    "CubicScheduler",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "dcp_state",
    "save_sparse_data",
    "load_sparse_data",
    "save_pruned_tables",
    "load_pruned_tables",
    "PrunedTable",
    "PrunedEmbeddingBag",
    "PrunedEmbedding",
    "RankDisagreementError",
    "RemoteError",
    "CollectiveTimeoutError",
    "register_for_checkpointing",
]

