"""Make this folder's helpers importable as ``launcher`` and ``rank_fns`` under any pytest import mode."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

from shared_runs import healthy_section  # noqa: E402

WORLD_SIZES = [1, 2, 3, 4]


@pytest.fixture(scope="session", params=WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def happy_path(request):
    """(world_size, per-rank results of rank_fns.replicated_and_local_masks)."""
    return request.param, healthy_section(request.param, "masks")


@pytest.fixture(scope="session", params=WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def scheduled(request):
    """(world_size, per-rank results of rank_fns.rank_dependent_random_schedule)."""
    return request.param, healthy_section(request.param, "schedule")
