"""The end of a run: evaluate, export the sparsified tables, print the summary, write summary.json
and report.png. Shared by both DLRM jobs; `summarize` is the main job's (accelerate, DDP or FSDP2).

* The sparsified tables are exported with `distsparse.save_sparse_data` to
  `OUTPUT_DIR/sparse_tables.safetensors` (kept (1,4) blocks' values + 1 bit per block). The
  summary: zeroed parameters per table, dense bytes vs the blocks' payload, the real export file
  size vs the same tables saved dense in safetensors, validation loss and AUC of each model and
  their difference; `OUTPUT_DIR/summary.json` holds it all with a sha256 digest of every mask, of
  every table's final weights, of both models' weights and the last scheduled values.
* `--prune rows`: `distsparse.save_pruned_tables` writes `OUTPUT_DIR/pruned_tables.safetensors`
  (kept rows + int32 remap; with `--fsdp2` from the sharded tables, none gathered), a one-process
  copy of the model with `distsparse.PrunedEmbedding` / `PrunedEmbeddingBag` tables loaded from
  it serves the validation set, and the summary prints the served size vs dense and the served
  AUC, equal to the trained masked model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

import distsparse

from dlrm.data import TABLES
from dlrm.fsdp2 import export_sharded, full_tensor
from dlrm.model import DLRM, evaluate, mask_digest, model_digest, tensor_digest
from dlrm.report import write_report
from dlrm.run_folder import EXPORT_NAME, PRUNED_NAME


def current_level(sp) -> float:
    """The tables' sparsity_level now (one schedule drives them all)."""
    return float(next(iter(sp.data_groups.values()))["sparsity_level"])


def table_summary_lines(summary: dict, folder: Path | None = None) -> list[str]:
    """The summary's per-table rows (shape, zeroed, sparsity, dense and kept-block bytes), the
    total and the exported file's size (its full path in ``folder``): shared by the main job
    and its TorchRec variant."""
    lines = [f"{'table':<14}{'shape':>12}{'zeroed':>18}{'sparsity':>10}{'dense B':>11}{'blocks B':>11}{'saved':>8}"]
    tot_d = tot_s = 0
    for name, t in summary["tables"].items():
        tot_d += t["dense_bytes"]; tot_s += t["blocks_bytes"]
        lines.append(f"{name:<14}{'x'.join(map(str, t['shape'])):>12}{t['zeroed']:>10}/{t['numel']:<7}"
                     f"{t['sparsity']:>10.3f}{t['dense_bytes']:>11}{t['blocks_bytes']:>11}"
                     f"{1 - t['blocks_bytes'] / t['dense_bytes']:>8.1%}")
    lines.append(f"{'all tables':<14}{'':>12}{'':>18}{'':>10}{tot_d:>11}{tot_s:>11}{1 - tot_s / tot_d:>8.1%}")
    if summary["export"] is not None:
        e = summary["export"]
        lines.append(f"saved file  {(folder / EXPORT_NAME).resolve() if folder else EXPORT_NAME}: "
                     f"{e['file_bytes']} B on disk vs {e['dense_file_bytes']} B for the "
                     f"same tables dense in safetensors ({1 - e['file_bytes'] / e['dense_file_bytes']:.1%} smaller)")
    return lines


def mask_stats(mask: torch.Tensor, weight: torch.Tensor, block=4):
    """Zeroed params, dense bytes and the payload of a (1, block) block-sparse encoding:
    kept blocks' values plus a 1-bit-per-block bitmap (the export file adds its header)."""
    m = mask.detach().bool().cpu().reshape(-1, mask.shape[-1])
    rows, cols = m.shape
    nb = -(-cols // block)
    pad = nb * block - cols
    if pad:
        m = F.pad(m, (0, pad), value=False)
    kept_blocks = int(m.reshape(rows, nb, block).any(-1).sum())
    es = weight.element_size()
    return {
        "numel": weight.numel(),
        "zeroed": int((~mask.bool()).sum()),
        "sparsity": 1.0 - float(mask.float().mean()),
        "dense_bytes": weight.numel() * es,
        "blocks_bytes": kept_blocks * block * es + -(-(rows * nb) // 8),
        "kept_blocks": kept_blocks,
        "blocks": rows * nb,
    }



def export_entry(path: Path, tables: dict, summary: dict) -> dict:
    """summary.json's "export": the file's size against the same tables saved dense in safetensors."""
    dense_file = len(safetensors_bytes({n: tables[n].cpu().contiguous() for n in TABLES}))
    return {"path": str(path), "file_bytes": path.stat().st_size, "dense_file_bytes": dense_file,
            "dense_bytes": sum(t["dense_bytes"] for t in summary["tables"].values())}


def served_entry(path: Path, pruned: dict, served_bytes: int, metrics: dict, trained: dict, source: str = "",
                 order=None):
    """summary.json's "served" and its summary lines, for a model served from the pruned tables
    (`order`: of the tables in "rows", default the file's): its AUC must equal the trained masked
    model's (same vectors, same order: exact in float32)."""
    dense_bytes = sum(t.rows * t.dim * 4 for t in pruned.values())
    entry = {"path": str(path), "file_bytes": path.stat().st_size, "dense_bytes": dense_bytes,
             "served_bytes": served_bytes, "kept_rows": {n: t.kept for n, t in pruned.items()},
             "rows": {n: pruned[n].rows for n in (order or pruned)}, "val": metrics,
             "auc_equal": metrics["auc"] == trained["auc"]}
    kept, rows = sum(entry["kept_rows"].values()), sum(entry["rows"].values())
    lines = [f"served from {PRUNED_NAME}{source}: {kept} of {rows} rows kept; tables {served_bytes} B served vs "
             f"{dense_bytes} B dense ({served_bytes / dense_bytes:.3f}x), file {entry['file_bytes']} B",
             f"validation  served (pruned)  : loss {metrics['loss']:.4f}  AUC {metrics['auc']:.4f}   "
             f"({'equal to' if entry['auc_equal'] else 'DIFFERS from'} the trained masked model's AUC "
             f"{trained['auc']:.4f})"]
    return entry, lines


def validation_lines(summary: dict, step: int, baseline_note: str, warmup: tuple | None = None) -> list[str]:
    """The summary's validation figures: the baseline, the warm-up reference (start step,
    metrics), the trained model, the cost of sparsity."""
    final, base, cost = summary["val"], summary["val_dense_baseline"], summary["baseline_cost"]
    lines = []
    if base is not None:
        lines.append(f"validation  dense baseline @ step {step:<5}: loss {base['loss']:.4f}  AUC {base['auc']:.4f}"
                     f"   ({baseline_note})")
    if warmup is not None:
        start, m = warmup
        lines.append(f"validation  dense warm-up  @ step {start:<5}: loss {m['loss']:.4f}  AUC {m['auc']:.4f}"
                     f"   (the sparse model before its ramp: fewer steps, rough reference only)")
    label = summary["mode"]
    lines.append(f"validation  {label:<14} @ step {step:<5}: loss {final['loss']:.4f}  AUC {final['auc']:.4f}")
    if cost is not None:
        lines.append(f"cost of sparsity (sparse - baseline): loss {cost['loss']:+.4f}  AUC {cost['auc']:+.4f}")
    return lines


def run_line(summary: dict, with_baseline: bool) -> list[str]:
    """This run's speed, when it trained."""
    if not summary["steps_this_run"]:
        return []
    return [f"this run: {summary['steps_this_run']} steps in {summary['train_seconds_this_run']:.1f} s, "
            f"{summary['samples_per_s']:.0f} samples/s"
            + (" (each sample trains both models)" if with_baseline else "")]


def write_summary(out: Path, summary: dict, say) -> None:
    """summary.json (atomically), then report.png from it and the run's history (main process)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, out / "summary.json")
    say(f"report: {write_report(out)}")  # report.png: sparsity, loss vs the baseline, bytes per table


def serve_pruned(net, sp, val: dict, trained: dict, out: Path, is_main: bool):
    """--prune rows: write the pruned tables (kept rows + int32 remap; sharded FSDP2 tables
    without gathering them), then on the main process rebuild the model with
    PrunedEmbedding / PrunedEmbeddingBag tables loaded from that file and evaluate it on
    the validation set. Returns (summary entry, summary lines), (None, []) elsewhere."""
    path = out / PRUNED_NAME
    out.mkdir(parents=True, exist_ok=True)
    distsparse.save_pruned_tables(str(path), sp, names=list(TABLES))
    rest = {k: full_tensor(v).detach().cpu() for k, v in net.state_dict().items()
            if not k.startswith("tables.")}  # a collective for FSDP2's DTensors: every rank
    if not is_main:
        return None, []
    pruned = distsparse.load_pruned_tables(path)
    served = DLRM(pruned["user"].rows, pruned["item"].rows, pruned["item_category"].rows - 1, pruned["user"].dim)
    served.load_state_dict(rest, strict=False)
    for name in TABLES:
        old = served.tables[name]
        if isinstance(old, nn.EmbeddingBag):
            served.tables[name] = distsparse.PrunedEmbeddingBag.from_pruned(pruned[name], mode=old.mode,
                                                                            padding_idx=old.padding_idx)
        else:
            served.tables[name] = distsparse.PrunedEmbedding.from_pruned(pruned[name])
    metrics = evaluate(served, val, torch.device("cpu"))
    served_bytes = sum(m.served_bytes() for m in served.tables.values())
    return served_entry(path, pruned, served_bytes, metrics, trained)


def summarize(args, accelerator, model, base_model, sp, sch, tables, val, dense_metrics, step, resumed_from,
              run_steps, train_time, global_batch, out: Path, say):
    """The main job: evaluate, export the sparsified tables, print the summary and write summary.json."""
    net = accelerator.unwrap_model(model)
    final = evaluate(net, val, accelerator.device)
    accelerator.log({"val/loss": final["loss"], "val/auc": final["auc"]}, step=step)
    base_final = cost = None
    if base_model is not None:
        base_final = evaluate(accelerator.unwrap_model(base_model), val, accelerator.device)
        cost = {"loss": final["loss"] - base_final["loss"], "auc": final["auc"] - base_final["auc"]}
        accelerator.log({"val/baseline_loss": base_final["loss"], "val/baseline_auc": base_final["auc"]}, step=step)
    summary = {"final_step": step, "world_size": accelerator.num_processes, "resumed_from": resumed_from,
               "mode": "dense" if sp is None else "sparse", "parallelism": "fsdp2" if args.fsdp2 else "ddp",
               "val": final,
               "val_dense_baseline": base_final, "baseline_cost": cost,
               "dense_reference": dense_metrics,
               "train_seconds_this_run": train_time, "steps_this_run": run_steps,
               "samples_per_s": run_steps * global_batch / train_time if run_steps else None,
               "tables": {}, "mask_sha256": {}, "schedule": None, "schedule_last_epoch": None, "export": None}
    # FSDP2: the whole tables and masks, gathered once here for the figures and digests
    weights = {n: full_tensor(tables[n].weight.detach()) for n in TABLES}
    for name in TABLES:
        w = weights[name]
        m = full_tensor(sp.get_mask(name)) if sp is not None else torch.ones_like(w, dtype=torch.bool)
        summary["tables"][name] = {"shape": list(w.shape), **mask_stats(m, w),
                                   "weight_zeros": int((w == 0).sum()), "weight_sha256": tensor_digest(w)}
        if sp is not None:
            summary["mask_sha256"][name] = mask_digest(m)
    summary["model_sha256"] = model_digest(net, args.fsdp2)
    summary["baseline_model_sha256"] = None
    if base_model is not None:
        summary["baseline_model_sha256"] = model_digest(accelerator.unwrap_model(base_model), args.fsdp2)
    if sch is not None:
        summary["schedule"] = {k: float(v) for k, v in sch.get_last_param().items()}
        summary["schedule_last_epoch"] = sch.last_epoch
    if sp is not None:
        # the masked tables as a block-sparse file (collective; rank 0 writes it)
        export = out / EXPORT_NAME
        if args.fsdp2:
            export_sharded(export, sp, accelerator.is_main_process)
        else:
            distsparse.save_sparse_data(str(export), sp)
        summary["export"] = export_entry(export, weights, summary)

    served_lines = []
    if sp is not None and args.prune == "rows":  # collective: every rank takes part in the save
        summary["served"], served_lines = serve_pruned(net, sp, val, final, out, accelerator.is_main_process)
    lines = ["", f"summary ({summary['mode']}{' + dense baseline' if base_model is not None else ''}, "
                 f"step {step}, world_size {accelerator.num_processes}{', FSDP2' if args.fsdp2 else ''})",
             *table_summary_lines(summary, out),
             *validation_lines(summary, step, "same init, batches and steps, no sparsifier",
                               None if dense_metrics is None else (args.start_step, dense_metrics)),
             *served_lines, *run_line(summary, base_model is not None)]
    say("\n".join(lines))
    if accelerator.is_main_process:
        write_summary(out, summary, say)
