"""Jobs shared by several test modules: each runs once per pytest session."""

from __future__ import annotations

import pytest

from launcher import run_ranks_once


def healthy_section(world_size: int, section: str) -> list:
    """Per-rank results of one section of rank_fns.healthy_run (one job per world size,
    shared by every test that asks); fails the test with the ranks' tracebacks if that
    section raised."""
    import rank_fns

    results = run_ranks_once(rank_fns.healthy_run, world_size)
    errors = [res[section]["error"] for res in results if "error" in res[section]]
    if errors:
        pytest.fail(f"section {section!r} of healthy_run raised on world_size={world_size}:\n"
                    + "\n".join(errors), pytrace=False)
    return [res[section] for res in results]
