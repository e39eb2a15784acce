"""End-to-end: `--prune rows` in examples/dlrm/train.py (one process, DDP and FSDP2 with 2 gloo
ranks under torchrun) and examples/dlrm/train_torchrec.py: row blocks, the pruned tables
written at the end (FSDP2/TorchRec: from the sharded tables), the validation set served from
them with the same AUC as the trained masked model, and the served size printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import distsparse

from _example_runner import MAIN as SCRIPT, TORCHREC, ok, run, torchrun

TINY = ["--rows", "6000", "--num-users", "300", "--num-items", "120", "--num-categories", "20",
        "--batch-size", "128", "--max-steps", "40", "--save-every", "0", "--start-step", "5", "--ramp-steps", "15",
        "--final-sparsity", "0.75", "--log-every", "20", "--seed", "3", "--no-progress", "--no-baseline",
        "--prune", "rows"]


def _run(cmd):
    return ok(run(cmd))


def _torchrun(script, out_dir, *args):
    return ok(torchrun(script, "--output-dir", out_dir, *args))


def _check_served(out_dir: Path, stdout: str, dim: int) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    served = summary["served"]
    assert served["auc_equal"] and served["val"]["auc"] == summary["val"]["auc"], served
    assert served["val"]["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-6)
    assert "equal to the trained masked model's AUC" in stdout, stdout[-3000:]
    assert "served from pruned_tables.safetensors" in stdout
    tables = distsparse.load_pruned_tables(out_dir / "pruned_tables.safetensors")
    for name, t in tables.items():
        stats = summary["tables"][name]
        assert stats["zeroed"] % dim == 0, (name, stats)  # whole rows pruned
        assert t.kept == t.rows - stats["zeroed"] // dim, (name, t.kept, stats)
    assert served["served_bytes"] < served["dense_bytes"]
    return summary


@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp2"])
def test_prune_rows_serves_the_validation_set_with_the_trained_auc(tmp_path, mode):
    out = tmp_path / mode
    if mode == "single":
        r = _run([sys.executable, str(SCRIPT), "--output-dir", str(out), *TINY])
    else:
        r = _torchrun(SCRIPT, out, *TINY, *(["--fsdp2"] if mode == "fsdp2" else []), "--expect-world-size", "2")
    summary = _check_served(out, r.stdout, 16)
    assert summary["world_size"] == (1 if mode == "single" else 2)


@pytest.mark.parametrize("sharding", ["auto", "column_wise"])
def test_torchrec_prune_rows_writes_from_the_sharded_tables_and_serves_with_the_trained_auc(tmp_path, sharding):
    out = tmp_path / sharding
    args = [a for a in TINY if a != "--no-progress"]  # the TorchRec job has no progress bar
    r = _torchrun(TORCHREC, out, *args, "--sharding", sharding,
                  "--row-wise-min-rows", "100", "--expect-world-size", "2")
    summary = _check_served(out, r.stdout, 16)
    assert ("column_wise" if sharding == "column_wise" else "row_wise") in summary["sharding"], summary["sharding"]
