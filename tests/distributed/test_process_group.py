"""A sparsifier bound to a sub-group (process_group=) only talks to that sub-group."""

from __future__ import annotations

import group_and_timeout_fns
from launcher import run_ranks


def test_sparsifiers_on_two_subgroups_share_masks_schedules_and_checkpoints_within_their_group(tmp_path):
    results = run_ranks(group_and_timeout_fns.masks_and_schedule_in_two_subgroups, 4, str(tmp_path), timeout=90)
    assert [r["group_rank"] for r in results] == [0, 1, 0, 1]
    for first, second in ((0, 1), (2, 3)):
        a, b = results[first], results[second]
        # Identical within a sub-group, and equal to single-process masks on the same data.
        assert a["mask_sha256"] == b["mask_sha256"] == a["single_process_sha256"]
        assert a["owners"] == b["owners"]
        assert set(a["owners"].values()) <= {0, 1}  # ranks of the sub-group, not global ranks
        assert a["levels"] == b["levels"]
        assert a["checkpoint_exists"] and b["checkpoint_exists"]
    # Each sub-group took its own rank 0's value: global rank 0 -> 0.25, global rank 2 -> 0.45.
    assert set(results[0]["levels"].values()) == {0.25}
    assert set(results[2]["levels"].values()) == {0.25 + 0.1 * 2}
    assert results[0]["mask_sha256"] != results[2]["mask_sha256"]  # different data per group

