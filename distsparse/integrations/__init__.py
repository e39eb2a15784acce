"""Integrations with training frameworks. Each one imports its framework lazily: accelerate
here, Lightning, transformers and TorchRec (``distsparse.integrations.torchrec``:
``add_torchrec_tables``) only when their module is imported."""

from .accelerate import register_for_checkpointing

__all__ = ["register_for_checkpointing"]
