"""The end of a TorchRec run: evaluate both models, gather the tables (`ShardedTensor.gather`) and
masks (one reduce per table) on rank 0, export them through a one-process sparsifier, serve the
validation set from the pruned tables (`--prune rows`), print the summary and write summary.json
with the main job's fields (summary.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

import distsparse

from dlrm.data import TABLES
from dlrm.model import mask_digest, state_digest, tensor_digest, val_metrics
from dlrm.run_folder import EXPORT_NAME, PRUNED_NAME
from dlrm.summary import (
    export_entry, mask_stats, run_line, served_entry, table_summary_lines, validation_lines, write_summary)
from dlrm.torchrec_model import EBC, batch_of, build_model, evaluate, sharded_tables


def gathered_masks(sp, dmp, device) -> dict[str, torch.Tensor] | None:
    """Whole masks on rank 0's CPU (None elsewhere), for the summary: each rank fills its
    shards into a zero table, one reduce per table (a collective)."""
    out = {}
    for name, st in sharded_tables(dmp).items():
        whole = torch.zeros(tuple(st.size()), dtype=torch.uint8, device=device)
        for (r, c), m in sp.get_mask(name).local_shards():
            whole[r : r + m.shape[0], c : c + m.shape[1]] = m.to(device=device, dtype=torch.uint8)
        dist.reduce(whole, dst=0)
        out[name] = whole.cpu().bool()
    return out if dist.get_rank() == 0 else None



def gathered_tables(dmp, device) -> dict[str, torch.Tensor] | None:
    """Whole tables on rank 0's CPU (None elsewhere); a collective (gathered on `device`,
    where NCCL needs the tensors)."""
    out = {}
    for name, st in sharded_tables(dmp).items():
        full = torch.empty(tuple(st.size()), dtype=st.dtype, device=device) if dist.get_rank() == 0 else None
        st.gather(dst=0, out=full)
        out[name] = full.cpu() if full is not None else None
    return out if dist.get_rank() == 0 else None


def model_digest(dense_sd: dict, tables: dict) -> str:
    """sha256 over every dense tensor and every whole table (rank 0)."""
    return state_digest({**{k: v for k, v in dense_sd.items() if isinstance(v, torch.Tensor)},
                         **{f"{EBC}.embedding_bags.{n}.weight": t for n, t in tables.items()}})


def dense_state(dmp) -> dict:
    return {k: v for k, v in dmp.state_dict().items() if ".embedding_bags." not in k}



def serve_pruned(args, sp, dense_sd: dict, val: dict, trained: dict, out: Path):
    """--prune rows: write the pruned tables (kept rows + int32 remap) from the sharded tables
    (a collective: rank 0 streams each rank's kept rows into the file, no table gathered),
    then on rank 0 serve the validation set from a one-process DLRM whose embedding bags
    are distsparse.PrunedEmbeddingBag modules over that file. Returns (summary entry,
    lines) on rank 0, (None, []) elsewhere."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    path = out / PRUNED_NAME
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    distsparse.save_pruned_tables(str(path), sp, names=list(TABLES))
    if dist.get_rank() != 0:
        return None, []
    pruned = distsparse.load_pruned_tables(path)

    class ServedBags(torch.nn.Module):
        """The EmbeddingBagCollection's forward (KJT -> KeyedTensor) over pruned tables."""

        def __init__(self):
            super().__init__()
            self.bags = torch.nn.ModuleDict({n: distsparse.PrunedEmbeddingBag.from_pruned(
                pruned[n], mode="mean" if n == "item_category" else "sum", include_last_offset=True)
                for n in TABLES})

        def forward(self, kjt):
            pooled = [self.bags[n](kjt[n].values(), kjt[n].offsets()) for n in TABLES]
            return KeyedTensor(keys=list(TABLES), length_per_key=[p.shape[1] for p in pooled],
                               values=torch.cat(pooled, dim=1))

    served = build_model({n: pruned[n].rows for n in TABLES}, args.dim, torch.device("cpu"), args.seed)
    served.sparse_arch.embedding_bag_collection = ServedBags()
    missing, unexpected = served.load_state_dict(dense_sd, strict=False)
    if unexpected or any(not k.startswith("sparse_arch.embedding_bag_collection") for k in missing):
        raise RuntimeError(f"serving: the dense state does not fit the model (missing {missing}, "
                           f"unexpected {unexpected})")
    served.eval()
    with torch.no_grad():
        logits = torch.cat([served(*batch_of(val, idx, torch.device("cpu"))[:2]).float().squeeze(-1)
                            for idx in torch.arange(val["label"].numel()).split(8192)])
    served_bytes = sum(b.served_bytes() for b in served.sparse_arch.embedding_bag_collection.bags.values())
    return served_entry(path, pruned, served_bytes, val_metrics(logits, val["label"]), trained,
                        " (written from the sharded tables)", order=TABLES)


def summarize(args, trainees, sp, sch, val, device, final_ckpt: Path, step, resumed_from, run_steps,
              train_time, global_batch, out: Path, say) -> None:
    model, base = trainees["model"], trainees.get("baseline")
    final = evaluate(model.dmp, val, device)
    base_final = evaluate(base.dmp, val, device) if base is not None else None
    tables = gathered_tables(model.dmp, device)
    base_tables = gathered_tables(base.dmp, device) if base is not None else None
    global_sparsity = sp.sparsity() if sp is not None else None
    dense_sd = {k: v.cpu() for k, v in dense_state(model.dmp).items()}
    base_dense_sd = {k: v.cpu() for k, v in dense_state(base.dmp).items()} if base is not None else None
    served, served_lines = None, []
    if sp is not None and args.prune == "rows":  # collective: the sharded tables are written where they live
        served, served_lines = serve_pruned(args, sp, dense_sd, val, final, out)
    whole_masks = gathered_masks(sp, model.dmp, device) if sp is not None else None
    # a one-process sparsifier on rank 0 over the gathered tables (every rank creates the group)
    solo_group = dist.new_group([0], backend="gloo") if sp is not None else None
    if dist.get_rank() != 0:
        return
    cost = None if base_final is None else {"loss": final["loss"] - base_final["loss"],
                                            "auc": final["auc"] - base_final["auc"]}
    summary = {"final_step": step, "world_size": dist.get_world_size(), "resumed_from": resumed_from,
               "mode": "dense" if sp is None else "sparse", "sharding": model.plan_text(),
               "val": final, "val_dense_baseline": base_final, "baseline_cost": cost,
               "train_seconds_this_run": train_time, "steps_this_run": run_steps,
               "samples_per_s": run_steps * global_batch / train_time if run_steps else None,
               "tables": {}, "mask_sha256": {}, "sparsity_from_sharded_run": global_sparsity,
               "schedule": None, "schedule_last_epoch": None, "export": None}
    masks = {n: torch.ones_like(tables[n], dtype=torch.bool) for n in TABLES}
    solo = None
    if sp is not None:
        solo = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4), process_group=solo_group)
        for n in TABLES:
            solo.add_data(n, tables[n], replicated=True)
        state = solo.state_dict()      # the sharded run's masks, configs and step count
        for n in TABLES:
            state["groups"][n]["config"] = json.loads(json.dumps(sp.data_groups[n]))
            state["masks"][n] = whole_masks[n]
        state["step_count"] = sp.step_count
        solo.load_state_dict(state, config="checkpoint")  # adopt the sharded run's configs (block shape)
        masks = {n: solo.get_mask(n) for n in TABLES}
    for n in TABLES:
        w, m = tables[n], masks[n]
        summary["tables"][n] = {"shape": list(w.shape), **mask_stats(m, w), "weight_zeros": int((w == 0).sum()),
                                "weight_sha256": tensor_digest(w)}
        if sp is not None:
            summary["mask_sha256"][n] = mask_digest(m)
    summary["model_sha256"] = model_digest(dense_sd, tables)
    summary["baseline_model_sha256"] = model_digest(base_dense_sd, base_tables) if base is not None else None
    if sch is not None:
        summary["schedule"] = {k: float(v) for k, v in sch.get_last_param().items()}
        summary["schedule_last_epoch"] = sch.last_epoch
    if solo is not None:
        export = out / EXPORT_NAME
        distsparse.save_sparse_data(str(export), solo)
        summary["export"] = export_entry(export, tables, summary)

    summary["served"] = served
    lines = ["", f"summary ({summary['mode']}{' + dense baseline' if base is not None else ''}, step {step}, "
                 f"world_size {dist.get_world_size()}, TorchRec sharding {summary['sharding']})",
             *table_summary_lines(summary, out),
             *validation_lines(summary, step, "same init, plan, batches and steps, no sparsifier"),
             *served_lines, *run_line(summary, base is not None)]
    say("\n".join(lines))
    write_summary(out, summary, say)
