"""
    accelerate launch --config_file launch/cpu_2proc.yaml examples/dlrm/train.py     # 2 CPU processes (gloo)
    accelerate launch --config_file launch/single_gpu.yaml examples/dlrm/train.py    # 1 GPU
    accelerate launch --config_file launch/multi_gpu.yaml examples/dlrm/train.py     # N GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/dlrm/train.py                                # same as the first line
    python examples/dlrm/train.py                                                     # 1 process, no launcher
    torchrun --nproc_per_node 2 examples/dlrm/train.py --fsdp2                        # tables sharded by FSDP2 (CPU: gloo)
    accelerate launch --config_file launch/fsdp2_gpu.yaml examples/dlrm/train.py --fsdp2  # N GPUs, accelerate's FSDP2 plugin

Run from the repository root. By default the run trains the sparse model AND a dense
baseline side by side and reports what sparsity cost; `--no-baseline` skips the baseline,
`--dense` trains only a dense model (no sparsifier), `--csv PATH` trains on your own
`user,item,label` rows, `--fsdp2` shards the tables instead of replicating them. Every
option and its default is listed below.

DLRM-style click model whose embedding tables are sparsified during training by
distsparse, trained with HuggingFace accelerate (DDP; FSDP2 with --fsdp2), resumable
after a crash.

What it does
------------
This file is the training loop, top to bottom; each other part has its module in examples/dlrm/:
data.py (the click log, the epoch order, where a resumed run re-enters it), model.py (DLRM,
AUC, digests), run_folder.py (checkpoints, retention, resume), fsdp2.py (--fsdp2), config.py
(options, launch checks), summary.py (evaluation, export, summary.json) and report.py (report.png).

* Sparsity: `distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))`
  with every table added by `sp.add_data(name, table)` (embedding tables are "replicated"
  groups: each table's mask is computed by one owning rank and shared), and
  `distsparse.CubicScheduler(sp, final_value=0.8, initial_value=0.0, start_step=S0,
  ramp_steps=R)`. Every training step: optimizer step, `sp.step()` (new masks from the
  current weights), `sch.step()` (next sparsity level), `sp.squash_mask()` (the masks are
  multiplied into the live embedding weights, so the next forward pass uses them). Pruned
  weights may regrow through the optimizer and be pruned again at the next step (gradual
  magnitude pruning); after the ramp the level stays at `--final-sparsity`. `--prune rows`
  prunes whole rows (`sparse_block_shape=(1, dim)`, same schedule).
* Dense baseline (default): a second model, a `copy.deepcopy` of the sparse model taken
  before training (same initial weights) with its own Adam optimizer (same hyper-parameters)
  and no sparsifier, trained in the same loop on the same batches for the same number of
  steps. Both models (and optimizers) are prepared by accelerate and are in every checkpoint
  (`model.safetensors` / `model_1.safetensors`, `optimizer.bin` / `optimizer_1.bin`), so a
  resumed run continues both exactly. `--no-baseline` trains the sparse model alone and
  reports the sparse model at step S0 = `--start-step` (still dense then, fewer steps: only
  a rough reference). A checkpoint written with a baseline can only be resumed with one, and
  vice versa.
* Checkpoints: `accelerator.save_state()` every `--save-every` steps into
  `OUTPUT_DIR/ckpt/step_000120/` (model, optimizer, RNG states, plus distsparse's safetensors
  sparsity state through `distsparse.register_for_checkpointing`); the FSDP2 mode writes one
  DCP checkpoint instead. `--resume auto` (the default) continues from the newest one that loads.
* Output: a tqdm bar on the local main process; every `--log-every` steps a line with loss,
  throughput and per-table sparsity (also sent to `accelerator.log`, with trackers when
  `--log-with` is given, and to OUTPUT_DIR/history.jsonl); at the end the summary, the
  exported tables, summary.json and report.png.
* `--crash-at-step N` ends every rank with `os._exit(1)` right after step N (after that
  step's checkpoint, if any): used to test crash/resume.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from accelerate import Accelerator
from accelerate.utils import set_seed

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: a no-op stand-in
    class tqdm:  # type: ignore[no-redef]
        def __init__(self, *a, **k): pass
        def update(self, n=1): pass
        def set_postfix(self, *a, **k): pass
        def close(self): pass
        @staticmethod
        def write(s): print(s, flush=True)

import distsparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: `dlrm` imports when run as a file
from dlrm.config import JobError, check_launch, launch_mistake, parse_args, ramp_note  # noqa: E402
from dlrm.data import TABLES, EpochSampler, csv_clicks, epochs_note, position_after_resume, split  # noqa: E402
from dlrm.data import synthetic_clicks  # noqa: E402
from dlrm.fsdp2 import (  # noqa: E402
    DCP_DIR, check_sharded, fsdp2_load_files, fsdp2_save_files, load_dcp_files, shard_model, sharded_sparsities)
from dlrm.model import DLRM, evaluate  # noqa: E402
from dlrm.report import RunHistory  # noqa: E402
from dlrm.run_folder import (  # noqa: E402
    EXPORT_NAME, broadcast, crash_if_asked, finished_message, resume, save_checkpoint)
from dlrm.summary import current_level, summarize  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, __doc__)
    if args.expect_world_size != 1:
        mistake = launch_mistake(argv)
        if mistake:
            print(f"error: {mistake}", file=sys.stderr)
            raise SystemExit(2)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              log_with=args.log_with, project_dir=args.output_dir)
    if args.fsdp2 and accelerator.num_processes == 1 and not dist.is_initialized():
        # no launcher: fully_shard needs a process group (and a device mesh over it), so open
        # a 1-rank one here (an in-process store: nothing listens on a port)
        dist.init_process_group("cuda:nccl,cpu:gloo" if accelerator.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    try:
        run(args, accelerator)
        # Leave together; drop accelerate's references to the DDP models (they hold the process
        # group) before end_training destroys the group. A DDP module or a rank that outlives
        # the group can be aborted by gloo at interpreter exit ("terminate called without an
        # active exception", SIGABRT: seen in ~15 % of 2-rank runs of the README script).
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        accelerator.end_training()
    except JobError as exc:
        # every rank reaches the same refusal (rank 0 decided and broadcast): one message
        if accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if args.fsdp2 and accelerator.num_processes == 1 and dist.is_initialized():
            dist.destroy_process_group()  # the 1-rank group opened above (end_training may have)


def run(args, accelerator):
    say = (lambda s: tqdm.write(s)) if accelerator.is_main_process else (lambda s: None)
    route = check_launch(args, accelerator, say)
    out = Path(args.output_dir); ckpt_root = out / "ckpt"
    say(f"run folder {out.resolve()} (checkpoints in {ckpt_root.resolve()})")
    done = broadcast(finished_message(args, out, ckpt_root) if accelerator.is_main_process else None)
    if done:
        say(done)
        return
    set_seed(args.seed)
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in (out / "summary.json", out / EXPORT_NAME):  # describe a finished run only
            if stale.is_file():
                stale.unlink()
    accelerator.wait_for_everyone()

    # ---- data (identical on every rank)
    if args.csv:
        try:
            data = csv_clicks(args.csv, args.num_categories)
        except (OSError, ValueError) as exc:
            raise JobError(str(exc)) from None
    else:
        data = synthetic_clicks(args.rows, args.num_users, args.num_items, args.num_categories, args.seed)
    tr, val = split(data, args.seed)
    keys = ("user", "item", "cats", "hour", "device", "region", "dense", "label")
    train_ds = TensorDataset(*(tr[k] for k in keys))
    sampler = EpochSampler(len(train_ds), args.seed)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    n_users = int(data["user"].max()) + 1; n_items = int(data["item"].max()) + 1

    model = DLRM(n_users, n_items, args.num_categories, args.dim)
    with_baseline = not args.dense and not args.no_baseline
    # the baseline: same initial weights (copied before any sharding), own optimizer with the
    # same hyper-parameters, no sparsifier; prepared after the sparse model, so checkpoints
    # hold it as model_1 / optimizer_1
    base_model = copy.deepcopy(model) if with_baseline else None
    if route is not None:
        # FSDP2 warns that the root returns a view (the logits' squeeze): an in-place op on it
        # would skip the backward all-gather. This job never modifies the logits in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    if route == "direct":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        for net in (model, base_model):
            if net is not None:
                shard_model(net, mesh)
    # built on the sharded parameters when sharded above (FSDP2 replaces them); the plugin's
    # prepare() moves them onto its sharded parameters itself
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    base_opt = torch.optim.Adam(base_model.parameters(), lr=args.lr) if with_baseline else None
    if route is None:  # DDP
        if with_baseline:
            model, optimizer, base_model, base_opt, train_dl = accelerator.prepare(
                model, optimizer, base_model, base_opt, train_dl)
        else:
            model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    else:
        if route == "plugin":  # accelerate's FSDP2 takes one model (with its optimizer) per prepare()
            model, optimizer = accelerator.prepare(model, optimizer)
            if with_baseline:
                base_model, base_opt = accelerator.prepare(base_model, base_opt)
        train_dl = accelerator.prepare(train_dl)  # this rank's share of every global batch, as in DDP
        check_sharded(accelerator.unwrap_model(model), "model")
        if with_baseline:
            check_sharded(accelerator.unwrap_model(base_model), "dense baseline")
    pairs = [(model, optimizer)] + ([(base_model, base_opt)] if with_baseline else [])
    steps_per_epoch = len(train_dl)
    global_batch = args.batch_size * accelerator.num_processes
    if steps_per_epoch == 0:
        raise JobError(f"{len(train_ds)} training rows are not enough for one global batch of {global_batch} "
                       f"(--batch-size {args.batch_size} x {accelerator.num_processes} processes)")
    tables = accelerator.unwrap_model(model).tables

    # ---- sparsity
    sp = sch = None
    if not args.dense:
        block = (1, args.dim) if args.prune == "rows" else (1, 4)  # --prune rows: whole rows
        sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=block)
        for name in TABLES:
            sp.add_data(name, tables[name])
        sch = distsparse.CubicScheduler(sp, final_value=args.final_sparsity, initial_value=0.0,
                                        start_step=args.start_step, ramp_steps=args.ramp_steps)
        if ramp_note(args):
            say(ramp_note(args))
        if args.fsdp2:  # the FSDP2 mode saves and loads distsparse's file itself (fsdp2_save_files)
            say("masks computed where the rows live (rows of each rank): " + " ".join(
                f"{n}->{'/'.join(str(b - a) for _, (a, b) in sorted(sp.assignment(n).items()))}" for n in TABLES))
        else:
            distsparse.register_for_checkpointing(accelerator, sp, sch)
            say("mask owners (rank computing each table's mask): "
                + " ".join(f"{n}->{sp.owner_of(n)}" for n in TABLES))

    if args.log_with:
        accelerator.init_trackers("distsparse_dlrm", config={k: v for k, v in vars(args).items()
                                                              if isinstance(v, (int, float, str, bool))})
    # every accelerator.log row also goes to OUTPUT_DIR/history.jsonl (report.py draws report.png from it)
    accelerator.trackers.append(RunHistory(out))

    # ---- resume
    mode = "fsdp2" if args.fsdp2 else "ddp"
    load = write = None
    if args.fsdp2:
        def load(path):
            fsdp2_load_files(accelerator, path, pairs, sp, sch)

        def write(path):
            fsdp2_save_files(accelerator, path, pairs, sp, sch)
    else:
        def load(path):  # the DDP mode's files through accelerate; an FSDP2 folder's DCP checkpoint whole
            if (path / DCP_DIR).is_dir():
                load_dcp_files(accelerator, path, pairs, sp, sch)
            else:
                accelerator.load_state(str(path))
    resumed_path, st, distrusted = resume(accelerator, args, ckpt_root, sp is not None, with_baseline, say, load)
    distrusted = set(distrusted)
    step, dense_metrics, resumed_from, epoch, epoch_pos = 0, None, None, 0, 0
    if resumed_path is not None:
        step, dense_metrics, resumed_from = int(st["step"]), st.get("dense_metrics"), resumed_path.name
        epoch, epoch_pos, note = position_after_resume(st, len(train_ds), args.batch_size,
                                                       accelerator.num_processes, steps_per_epoch)
        say(f"resumed from {resumed_from} at step {step} (epoch {epoch}, sample {epoch_pos} of {len(train_ds)})")
        if note:
            say(note)
        if st.get("mode", "ddp") != mode:
            say(f"resume: {resumed_from} was written in the {st.get('mode', 'ddp')} mode and continues in the {mode} "
                f"mode (each mode reads the other's checkpoint: the DDP mode's files, the FSDP2 mode's DCP checkpoint; "
                "the masks reshard)")
    else:
        say("starting from scratch")

    say(f"train rows={len(train_ds)} val rows={val['label'].numel()} global batch={global_batch} "
        f"steps/epoch={steps_per_epoch} max_steps={args.max_steps} "
        f"mode={'dense' if args.dense else f'sparse (cubic 0 -> {args.final_sparsity}, steps {args.start_step}..{args.start_step + args.ramp_steps})'}"
        + (" + dense baseline (same init, same batches, no sparsifier)" if with_baseline else ""))
    say(epochs_note(args.max_steps, step, steps_per_epoch, len(train_ds)))
    if sp is not None and args.start_step + args.ramp_steps > args.max_steps:
        say(f"warning: the sparsity ramp ends at step {args.start_step + args.ramp_steps}, after --max-steps "
            f"{args.max_steps}: the run stops below --final-sparsity {args.final_sparsity}")

    # the step-S0 reference is only computed without a baseline (the baseline replaces it)
    want_reference = sp is not None and not with_baseline
    if want_reference and step == 0 and args.start_step == 0:
        dense_metrics = evaluate(accelerator.unwrap_model(model), val, accelerator.device)

    def sparsities():
        if sp is not None and args.fsdp2:
            return sharded_sparsities(sp, accelerator.device)
        return {n: 1.0 - float(sp.get_mask(n).float().mean()) for n in TABLES} if sp else {}

    pbar = tqdm(total=args.max_steps, initial=step, disable=args.no_progress or not accelerator.is_local_main_process,
                mininterval=1.0, dynamic_ncols=True)
    run_t0 = time.perf_counter(); run_steps = 0
    win_t0, win_steps, win_loss = time.perf_counter(), 0, torch.zeros((), device=accelerator.device)
    win_base = torch.zeros((), device=accelerator.device)
    model.train()
    if base_model is not None:
        base_model.train()
    sampler.start_at(epoch, epoch_pos)
    while step < args.max_steps:
        # The data order is chosen here, on our own sampler: the prepared loader forwards
        # set_epoch to it too (and keeps its own epoch counter in step), and the sampler
        # starts a resumed epoch at the checkpoint's sample.
        train_dl.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for user, item, cats, hour, device, region, dense, label in train_dl:
            if sampler.epoch != epoch:
                raise RuntimeError(f"the data loader moved the sampler to epoch {sampler.epoch} during epoch {epoch}")
            logits = model(user, item, cats, hour, device, region, dense)
            loss = F.binary_cross_entropy_with_logits(logits, label)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if sp is not None:
                sp.step()          # masks from the current weights at the current level
                mask_level = current_level(sp)
                sch.step()         # level for the next step
                sp.squash_mask()   # write masks into the live tables
            if base_model is not None:  # same batch, dense, no sparsifier
                base_loss = F.binary_cross_entropy_with_logits(
                    base_model(user, item, cats, hour, device, region, dense), label)
                base_opt.zero_grad(set_to_none=True)
                accelerator.backward(base_loss)
                base_opt.step()
                win_base += base_loss.detach()
            step += 1; run_steps += 1; win_steps += 1
            epoch_pos += global_batch
            win_loss += loss.detach()
            pbar.update(1)

            if (args.log_every > 0 and step % args.log_every == 0) or step == args.max_steps:
                mean_loss = accelerator.reduce(win_loss / win_steps, "mean").item()
                base_txt = ""
                if base_model is not None:
                    mean_base = accelerator.reduce(win_base / win_steps, "mean").item()
                    base_txt = f" (baseline {mean_base:.4f})"
                dt = time.perf_counter() - win_t0
                sps = win_steps * global_batch / dt
                spars = sparsities()
                # the level this step's masks were computed with, and the one the next step uses
                level, next_level = (mask_level, current_level(sp)) if sp is not None else (0.0, 0.0)
                pbar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:.0f}", level=f"{level:.3f}")
                say(f"step {step:5d} loss {mean_loss:.4f}{base_txt} samples/s {sps:8.0f} level {level:.3f} "
                    f"(next {next_level:.3f}) sparsity " + " ".join(f"{k}={v:.3f}" for k, v in spars.items()))
                accelerator.log({"train/loss": mean_loss, "train/samples_per_s": sps, "sparsity/level": level,
                                 "sparsity/next_level": next_level, **{f"sparsity/{k}": v for k, v in spars.items()},
                                 **({"train/baseline_loss": mean_base} if base_model is not None else {})},
                                step=step)
                win_t0, win_steps = time.perf_counter(), 0
                win_loss = torch.zeros((), device=accelerator.device)
                win_base = torch.zeros((), device=accelerator.device)

            if want_reference and step == args.start_step and dense_metrics is None:
                dense_metrics = evaluate(accelerator.unwrap_model(model), val, accelerator.device)
                say(f"step {step:5d} dense reference (before the ramp, {step} steps): val loss {dense_metrics['loss']:.4f} "
                    f"AUC {dense_metrics['auc']:.4f}")
                accelerator.log({"val/dense_loss": dense_metrics["loss"], "val/dense_auc": dense_metrics["auc"]}, step=step)

            if (args.save_every > 0 and step % args.save_every == 0) or step == args.max_steps:
                p = save_checkpoint(accelerator, ckpt_root, step,
                                    {"step": step, "epoch": epoch, "epoch_position": epoch_pos,
                                     "world_size": accelerator.num_processes, "batch_size": args.batch_size,
                                     "dense_metrics": dense_metrics, "sparse": sp is not None,
                                     "baseline": with_baseline, "mode": mode},
                                    args.keep, distrusted, write)
                say(f"step {step:5d} saved checkpoint {p.resolve()}")

            crash_if_asked(args, step, say)
            if step >= args.max_steps:
                break
        else:  # the epoch ran out: the next one starts at its first sample
            epoch, epoch_pos = epoch + 1, 0
    pbar.close()
    train_time = time.perf_counter() - run_t0
    summarize(args, accelerator, model, base_model, sp, sch, tables, val, dense_metrics, step, resumed_from,
              run_steps, train_time, global_batch, out, say)



if __name__ == "__main__":
    main()
