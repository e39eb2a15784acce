"""The main job's picture of the run (issue 21 item 5): report.png in the run folder, a PNG with three panels
(level and measured sparsity per table, sparse loss against the dense baseline, bytes per table), fed by the
rows the job logs through accelerate; a resumed run replaces the rows from its resume step on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from dlrm import report  # noqa: E402

TINY = ["--rows", "4000", "--num-users", "200", "--num-items", "100", "--num-categories", "10",
        "--batch-size", "128", "--max-steps", "24", "--save-every", "12", "--keep", "2",
        "--start-step", "2", "--ramp-steps", "10", "--final-sparsity", "0.75",
        "--log-every", "4", "--seed", "3", "--no-progress"]
TABLES = ("user", "item", "item_category", "hour", "device", "region")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "dlrm"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dlrm" / "train.py"), "--output-dir", str(out), *TINY],
                       env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"report: {out / 'report.png'}" in r.stdout
    return out


def test_the_main_job_writes_a_png_report_in_its_run_folder(run_folder):
    png = (run_folder / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height > 0    # three panels side by side


def test_the_report_has_three_panels_each_drawn_from_the_runs_figures(run_folder):
    rows = report.read_history(run_folder)
    assert [r["step"] for r in rows] == list(range(4, 25, 4))
    assert all({"train/loss", "train/baseline_loss", "sparsity/level"} <= set(r) for r in rows)
    assert rows[-1]["sparsity/level"] == pytest.approx(0.75)
    fig = report.draw(run_folder)
    sparsity, loss, size = fig.axes
    assert len(fig.axes) == 3
    assert {line.get_label() for line in sparsity.get_lines()} == {"scheduled level", *TABLES}
    assert {line.get_label() for line in loss.get_lines()} == {"sparse model", "dense baseline"}
    summary = json.loads((run_folder / "summary.json").read_text())
    heights = [p.get_height() for p in size.patches]
    assert len(heights) == 2 * len(TABLES) and size.get_ylabel() == "KiB"
    assert heights[len(TABLES):] == pytest.approx([summary["tables"][t]["blocks_bytes"] / 2**10 for t in TABLES])


def test_a_resumed_run_replaces_the_history_from_its_resume_step_on(tmp_path):
    first = report.RunHistory(tmp_path)
    for step in (10, 20, 30):
        first.log({"train/loss": float(step), "sparsity/level": 0.1}, step=step)
    resumed = report.RunHistory(tmp_path)            # a crash after step 30, resumed from the checkpoint at 20
    resumed.log({"train/loss": -20.0}, step=20)
    resumed.log({"train/loss": -40.0}, step=40)
    assert [(r["step"], r["train/loss"]) for r in report.read_history(tmp_path)] == [(10, 10.0), (20, -20.0),
                                                                                     (40, -40.0)]


def test_the_torchrec_job_writes_the_same_three_panel_report(tmp_path):
    out = tmp_path / "torchrec"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [a for a in TINY if a != "--no-progress"]
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "dlrm" / "train_torchrec.py"), "--output-dir", str(out),
                        *args], env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["step"] for row in report.read_history(out)] == list(range(4, 25, 4))
    fig = report.draw(out)
    assert len(fig.axes) == 3
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"scheduled level", *TABLES}
    assert {line.get_label() for line in fig.axes[1].get_lines()} == {"sparse model", "dense baseline"}
