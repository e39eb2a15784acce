"""The picture of a run: `report.png` in the run folder, drawn from what the job already logs.

    python examples/dlrm/report.py runs/dlrm         # (re)draw runs/dlrm/report.png from its history and summary

Three panels:
  1. the scheduled sparsity level and each table's measured sparsity against the step;
  2. the training loss of the sparse model against the dense baseline (same batches);
  3. the bytes of each table: dense, and block-sparse as exported (kept (1,4) blocks + 1 bit per block).

`RunHistory` is an accelerate tracker: the main job appends it to `accelerator.trackers`, so every
`accelerator.log(...)` line (train/loss, train/baseline_loss, sparsity/level, sparsity/<table>) also lands in
`RUN/history.jsonl` — on the main process only, since accelerate logs there only. A resumed run appends; rows from
the step it resumed at on replace the earlier run's. `write_report(RUN)` reads that file and `RUN/summary.json`.
matplotlib (the `examples` extra) is imported only to draw, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HISTORY = "history.jsonl"
REPORT = "report.png"
LOSS, BASELINE, LEVEL, SPARSITY = "train/loss", "train/baseline_loss", "sparsity/level", "sparsity/"
NEXT_LEVEL = "sparsity/next_level"  # the level the next step will use: not a table


class RunHistory:
    """Keeps every logged row in `folder/history.jsonl` (an accelerate `GeneralTracker` by duck typing: accelerate
    calls `log(values, step=...)` and, at `end_training`, `finish()`)."""

    name = "distsparse_report"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, folder: str | os.PathLike[str]):
        self.path = Path(folder) / HISTORY
        self._first = True

    @property
    def tracker(self) -> RunHistory:
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items() if isinstance(v, (int, float))}}
        rows = read_history(self.path.parent) if self._first else []
        if self._first:  # a resumed (or restarted) run replaces what the previous one logged from here on
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] < step))
            self._first = False
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        pass


_RUNS: dict[Path, RunHistory] = {}


def log_run(folder: str | os.PathLike[str], step: int, values: dict[str, Any]) -> None:
    """`RunHistory(folder).log(values, step)` for a job without accelerate trackers (call it on one rank)."""
    _RUNS.setdefault(Path(folder), RunHistory(folder)).log(values, step=step)


def read_history(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The logged rows in step order, the last row of each step winning."""
    path = Path(folder) / HISTORY
    if not path.is_file():
        return []
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


def draw(folder: str | os.PathLike[str]) -> Any:
    """The report's matplotlib figure (three axes) from `folder/history.jsonl` and `folder/summary.json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = read_history(folder)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    tables = sorted({k[len(SPARSITY):] for r in rows for k in r
                     if k.startswith(SPARSITY) and k not in (LEVEL, NEXT_LEVEL)})

    fig, (ax_sp, ax_loss, ax_bytes) = plt.subplots(1, 3, figsize=(16, 4.6))
    steps = [r["step"] for r in rows]
    ax_sp.plot(steps, [r.get(LEVEL, float("nan")) for r in rows], "k--", lw=2, zorder=3, label="scheduled level")
    for t in tables:
        ax_sp.plot(steps, [r.get(SPARSITY + t, float("nan")) for r in rows], marker=".", label=t)
    ax_sp.set(title="sparsity", xlabel="step", ylabel="fraction of weights pruned", ylim=(-0.02, 1.0))
    ax_sp.legend(fontsize=8)

    ax_loss.plot(steps, [r.get(LOSS, float("nan")) for r in rows], marker=".", label="sparse model")
    if any(BASELINE in r for r in rows):
        ax_loss.plot(steps, [r.get(BASELINE, float("nan")) for r in rows], marker=".", label="dense baseline")
    ax_loss.set(title="training loss (mean since the previous log line)", xlabel="step", ylabel="BCE loss")
    ax_loss.legend(fontsize=8)

    per_table = summary.get("tables", {})
    names = list(per_table)
    xs = range(len(names))
    unit, scale = ("MiB", 2**20) if any(per_table[n]["dense_bytes"] >= 2**20 for n in names) else ("KiB", 2**10)
    dense = [per_table[n]["dense_bytes"] / scale for n in names]
    kept = [per_table[n]["blocks_bytes"] / scale for n in names]
    ax_bytes.bar([x - 0.2 for x in xs], dense, width=0.4, label="dense")
    ax_bytes.bar([x + 0.2 for x in xs], kept, width=0.4, label="block-sparse")
    for x, d, k in zip(xs, dense, kept):
        ax_bytes.annotate(f"-{1 - k / d:.0%}" if d else "", (x + 0.2, k), ha="center", va="bottom", fontsize=8)
    ax_bytes.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax_bytes.set(title="bytes per table (dense vs exported)", ylabel=unit)
    ax_bytes.legend(fontsize=8)

    step = summary.get("final_step", steps[-1] if steps else 0)
    fig.suptitle(f"{folder.name}: step {step}, world size {summary.get('world_size', '?')}")
    fig.tight_layout()
    return fig


def write_report(folder: str | os.PathLike[str]) -> Path:
    """Draw `folder/report.png` (written atomically); return its path."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    fig = draw(folder)
    target = folder / REPORT
    tmp = folder / (REPORT + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    print(write_report(sys.argv[1] if len(sys.argv) > 1 else "runs/dlrm"))
