"""Shared fixtures of the single-process tests (kept minimal)."""

import sys
from pathlib import Path

import pytest
import torch

# Helpers shared with the multi-process tests (launcher, fake_accelerator) live in tests/distributed.
_DISTRIBUTED = str(Path(__file__).resolve().parent / "distributed")
if _DISTRIBUTED not in sys.path:
    sys.path.insert(0, _DISTRIBUTED)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensor ops on one intra-op thread.

    On a loaded 2-core machine, torch's thread pool makes a 10x14 ``avg_pool2d`` cost
    milliseconds instead of microseconds; results are identical either way.
    Restored afterwards, so other modules see torch's default.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
