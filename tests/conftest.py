"""Shared fixtures of the single-process tests (kept minimal)."""

import pytest
import torch


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
