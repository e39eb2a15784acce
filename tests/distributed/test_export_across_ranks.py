"""save_sparse_data on 2 gloo ranks: rank 0 writes the replicated groups; local groups are
refused on every rank with an error naming them."""

from __future__ import annotations

import export_fns
from launcher import run_ranks


def test_export_writes_replicated_groups_once_and_refuses_local_groups_on_every_rank(tmp_path):
    results = run_ranks(export_fns.export_replicated_refuse_local, 2, str(tmp_path), timeout=90)
    for r in results:
        assert r["all"]["type"] in ("ValueError", "RemoteError"), r["all"]
        assert "local groups ['batch']" in r["all"]["message"]
        assert r["exact"]
        assert r["files"] == ["tables.safetensors"]
        assert r["disagree"] is not None and r["disagree"]["type"] == "RankDisagreementError", r["disagree"]
        assert "batch" in r["disagree"]["message"]
