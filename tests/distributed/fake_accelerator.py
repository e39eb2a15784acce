"""A stand-in for accelerate.Accelerator's save/load pre-hook registries, shared by the
single-process accelerate tests and the multi-process checkpoint-collision rank functions."""

from __future__ import annotations

import os
from collections import OrderedDict

from torch.utils.hooks import RemovableHandle


class FakeAccelerator:
    """Just the two hook registries of accelerate.Accelerator (1.15), run the same way."""

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes = num_processes
        self._save_model_state_pre_hook: OrderedDict = OrderedDict()
        self._load_model_state_pre_hook: OrderedDict = OrderedDict()

    def register_save_state_pre_hook(self, hook):
        handle = RemovableHandle(self._save_model_state_pre_hook)
        self._save_model_state_pre_hook[handle.id] = hook
        return handle

    def register_load_state_pre_hook(self, hook):
        handle = RemovableHandle(self._load_model_state_pre_hook)
        self._load_model_state_pre_hook[handle.id] = hook
        return handle

    def save_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        for hook in self._save_model_state_pre_hook.values():
            hook([], [], output_dir)

    def load_state(self, input_dir):
        for hook in self._load_model_state_pre_hook.values():
            hook([], input_dir)
