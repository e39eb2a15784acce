"""Integrations with training frameworks. Each one imports its framework lazily."""

from .accelerate import register_for_checkpointing

__all__ = ["register_for_checkpointing"]
