"""Checkpoint files of sparsifiers on different sub-groups are distinct, and a collision is
refused instead of silently overwriting (issue 10 item 4)."""

from __future__ import annotations

import checkpoint_collision_fns
from launcher import run_ranks


def test_subgroups_get_distinct_default_files_and_a_save_over_another_groups_file_is_refused(tmp_path):
    results = run_ranks(checkpoint_collision_fns.two_subgroups_save_and_collide, 4, str(tmp_path), timeout=120)
    for r in results:
        # One file per sub-group, named by its global ranks; each restores its own masks.
        assert r["files"] == ["distsparse_state.ranks0-1.safetensors", "distsparse_state.ranks2-3.safetensors"]
        assert r["restored_own_masks"]
        assert r["twice"]["type"] == "ValueError" and "already registered" in r["twice"]["message"]
        assert r["race_files"] == ["race.safetensors"]  # no temp file left behind
    # Sub-group {2, 3} cannot replace the file sub-group {0, 1} wrote; {0, 1} can.
    for r in results[2:]:
        assert r["second_group"] is not None, r
        assert "global ranks [0, 1]" in r["second_group"]["message"]
        assert "global ranks [2, 3]" in r["second_group"]["message"]
    assert results[2]["second_group"]["type"] == "CheckpointError"  # the writer's own error
    for r in results[:2]:
        assert r["owner_overwrite"] is None and r["shared_holds_group0"]
    # The race: exactly one sub-group's save went through, the other was refused on both its ranks.
    failed = {r["subgroup"] for r in results if r["race"] is not None}
    assert len(failed) == 1, [r["race"] for r in results]
    loser = failed.pop()
    assert all(r["race"] is not None for r in results if r["subgroup"] == loser)
