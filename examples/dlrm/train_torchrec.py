"""
    torchrun --nproc_per_node 2 examples/dlrm/train_torchrec.py          # 2 CPU processes (gloo), about a minute
    torchrun --nproc_per_node 8 examples/dlrm/train_torchrec.py          # 8 GPUs on one node (NCCL)
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank R --master_addr HOST --master_port 29500 \\
        examples/dlrm/train_torchrec.py                                  # 2 nodes x 8 GPUs, on node R
    python examples/dlrm/train_torchrec.py                               # 1 process, no launcher

Run from the repository root. TorchRec on CPU needs the CPU build of FBGEMM, installed
without letting pip pull the CUDA one:
    pip install fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics tqdm pyre-extensions
    pip install --no-deps torchrec==1.9.2
(on GPUs: torchrec with the fbgemm-gpu build matching your torch and CUDA.)

The main job (examples/dlrm/train.py) on TorchRec: the same DLRM-style click model, data,
sparsity ramp and summary, with the embedding tables sharded across ranks by TorchRec's
DistributedModelParallel and trained by a fused optimizer, sparsified by distsparse where
their rows live.

What it does
------------
This file is the training loop and its checkpoint files; the TorchRec model, plan and batches are
in torchrec_model.py, the end of the run in torchrec_summary.py, and the rest is the main job's
own modules (data.py, run_folder.py, config.py, summary.py, report.py in examples/dlrm/).

* Data: the main job's synthetic click log and its `EpochSampler`. Each step takes the next
  `--batch-size` x world samples of the epoch's permutation; rank r takes the r-th slice, as
  a KeyedJaggedTensor (one id per sample for `user`, `item`, `hour`, `device`, `region`, 1-3
  ids for the `item_category` bag).
* Model: `torchrec.models.dlrm.DLRM` over an `EmbeddingBagCollection` with the main job's six
  tables (`item_category` mean-pooled), built on the meta device (no rank ever holds a whole
  table) and sharded by `DistributedModelParallel` with a plan from
  `construct_module_sharding_plan` (`--sharding`, see torchrec_model.py).
* Optimizers: the tables by FBGEMM's fused Adagrad (`--emb-optimizer`, `--emb-lr`): the update
  happens inside backward, there is no optimizer step to hook. The dense MLPs by Adam (`--lr`).
* Sparsity: `distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 4))`
  with every sharded table added by `distsparse.integrations.torchrec.add_torchrec_tables`
  (group name = table name; each rank scores its own shards, the mask of every table is the
  single-process mask of the whole table, bit for bit) and `distsparse.CubicScheduler` 0 ->
  `--final-sparsity` (0.8) over steps S0..S0+R. Every step: forward, backward (the fused
  update), dense optimizer step, `sp.step()`, `sch.step()`, `sp.squash_mask()`: the fused
  optimizer writes into pruned weights inside backward, so the masks are written back into
  the shards after every step. Pruned weights' optimizer state is kept (gradual magnitude
  pruning lets them regrow); `--zero-pruned-state` zeroes Adagrad's `momentum1` of pruned
  weights after each squash (`distsparse.integrations.torchrec.zero_pruned_optimizer_state`;
  no measurable change in AUC here).
* Dense baseline (default): a second DistributedModelParallel model with the same plan,
  initial weights and optimizers and no sparsifier, trained in the same loop on the same
  batches; `--no-baseline` skips it, `--dense` trains only a dense model.
* Checkpoints: every `--save-every` steps and at the end, into `OUTPUT_DIR/ckpt/step_NNNNNN/`:
  `model/`, ONE torch.distributed.checkpoint (DCP) of both models' state_dicts (sharded
  tables as ShardedTensors), the fused optimizers' state (Adagrad's `momentum1`, sharded like
  the tables), the dense optimizers' state and the sparsity (`distsparse.dcp_state`: each
  rank's shards of every mask, the configs and the schedule), each rank writing its own
  shards, no whole table or mask anywhere. Then `train_state.json`, `COMPLETE` and retention,
  and resume, as in the main job (run_folder.py). DCP reshards, so another `--sharding` or
  world size resumes too (the data position is kept in samples, as in the main job).
* Summary: validation loss and AUC of both models (every rank evaluates a slice; logits
  gathered), the cost of sparsity, and per table the sparsity and bytes. Rank 0 gathers the
  tables (`ShardedTensor.gather`) and the masks (one reduce per table), puts them in a
  one-process sparsifier over the tables, then exports the tables with
  `distsparse.save_sparse_data` to `OUTPUT_DIR/sparse_tables.safetensors` and writes
  `OUTPUT_DIR/summary.json` (the main job's fields).
* `--prune rows`: whole rows are pruned (`(1, dim)` blocks, same schedule); at the end
  `distsparse.save_pruned_tables` writes `OUTPUT_DIR/pruned_tables.safetensors` from the
  sharded tables (rank 0 streams each rank's kept rows; column-wise shards are joined row by
  row) and rank 0 serves the validation set from a one-process DLRM whose embedding bags are
  `distsparse.PrunedEmbeddingBag`s over that file: served size vs dense, served AUC (equal to
  the trained model's).
* `--crash-at-step N` ends every rank with `os._exit(1)` right after step N (after that
  step's checkpoint, if any): used to test crash/resume.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import distsparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: `dlrm` imports when run as a file
from dlrm.config import (  # noqa: E402
    JobError, _HelpFormatter, _number, _Parser, add_data_args, add_run_args, add_schedule_args, check_schedule_args,
    ramp_note)
from dlrm.data import TABLES, EpochSampler, epochs_note, position_after_resume, split, synthetic_clicks  # noqa: E402
from dlrm.report import log_run  # noqa: E402
from dlrm.run_folder import (  # noqa: E402
    EXPORT_NAME, TorchDistributed, broadcast, crash_if_asked, finished_message, resume, save_checkpoint)
from dlrm.summary import current_level  # noqa: E402
from dlrm.torchrec_model import (  # noqa: E402
    CPU_EMB_OPTIMIZERS, EMB_OPTIMIZERS, SHARDINGS, Trainee, batch_of, table_rows)
from dlrm.torchrec_summary import summarize  # noqa: E402

DCP_DIR = "model"


def say_on_rank0(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


# --------------------------------------------------------------------------- checkpoints
def app_state(trainees: dict, sp=None, sch=None) -> dict:
    """The one DCP state dict of a checkpoint: both models (sharded tables as ShardedTensors),
    their optimizers, and the sparsity (`distsparse.dcp_state`: each rank's shards of every
    mask, configs and schedule)."""
    state = {name: t.state_dict() for name, t in trainees.items()}
    if sp is not None:
        state["sparsity"] = distsparse.dcp_state(sp, sch)
    return state



def write_checkpoint(path: Path, trainees: dict, sp, sch) -> None:
    """Every rank: its shards of everything into the one DCP checkpoint `path/model`."""
    dcp.save(app_state(trainees, sp, sch), checkpoint_id=str(path / DCP_DIR))


def load_checkpoint(path: Path, trainees: dict, sp, sch) -> None:
    """DCP loads in place into the live state_dicts (each rank reads its shards, resharded
    if the plan or world size changed), the masks and schedule included (validated on every
    rank before any changes)."""
    for t in trainees.values():
        t.dense_opt.init_state()       # Adam's state is lazy: DCP needs the tensors to load into
    state = app_state(trainees, sp, sch)
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    for name, t in trainees.items():
        t.load_state_dict(state[name])



# --------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = _Parser(description=__doc__.split("What it does")[0].strip("\n"), formatter_class=_HelpFormatter,
                epilog="How it works (plan, optimizers, checkpoints, resume, summary): the docstrings of "
                       "examples/dlrm/train_torchrec.py and examples/dlrm/*.py.")
    count = _number(int, 1)
    positive = _number(float, 0.0, lo_open=True)
    add_run_args(p, "runs/dlrm_torchrec")
    p.add_argument("--lr", type=positive, default=4e-3, help="Adam learning rate of the dense MLPs")
    p.add_argument("--emb-optimizer", choices=sorted(EMB_OPTIMIZERS), default="adagrad",
                   help="fused optimizer of the tables (on CPU: adagrad, rowwise_adagrad or sgd)")
    p.add_argument("--emb-lr", type=positive, default=0.05, help="learning rate of the tables' fused optimizer")
    add_data_args(p)
    p.add_argument("--sharding", choices=SHARDINGS, default="auto",
                   help="auto: row-wise for tables of at least --row-wise-min-rows rows, table-wise for the others")
    p.add_argument("--row-wise-min-rows", type=count, default=1000, help="--sharding auto: the row-wise threshold")
    p.add_argument("--zero-pruned-state", action="store_true",
                   help="after each squash_mask(), zero the fused optimizer state (Adagrad's momentum1) of pruned "
                        "weights (distsparse.integrations.torchrec.zero_pruned_optimizer_state)")
    add_schedule_args(p, "do not train the dense baseline next to the sparse model")
    p.add_argument("--expect-world-size", type=count, default=None, help="exit with an error on another world size")
    p.add_argument("--prune", choices=("blocks", "rows"), default="blocks",
                   help="'blocks': (1, 4) blocks; 'rows': whole rows ((1, dim) blocks, same schedule), then write "
                        "the pruned tables from the sharded tables and serve the validation set from them")
    args = p.parse_args(argv)
    check_schedule_args(p, args)
    return args


# --------------------------------------------------------------------------- main
def init_distributed():
    """torchrun's environment, or a one-process group when started without a launcher."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return device


def quiet_third_party_warnings() -> None:
    """TorchRec 1.9 / torch 2.13 deprecation chatter (ShardedTensor, DDP and c10d argument
    names, fx tracing), printed by every rank on every run: not this example's to fix."""
    for pattern in (r".*ShardedTensor", r".*broadcast_buffers", r".*torch\.distributed\.\w+ is deprecated"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_third_party_warnings()
    device = init_distributed()
    try:
        run(args, device)
        dist.barrier()   # leave together: a rank that outlives the group can be aborted by gloo
    except JobError as exc:
        if dist.get_rank() == 0:       # every rank reaches the same refusal: one message
            print(f"error: {exc}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        raise SystemExit(2) from None
    dist.destroy_process_group()


def run(args, device):
    say = say_on_rank0
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    say(f"world_size={world} backend={dist.get_backend()} device={device}")
    if args.expect_world_size is not None and world != args.expect_world_size:
        raise JobError(f"expected world size {args.expect_world_size}, got {world}")
    if device.type == "cpu" and args.emb_optimizer not in CPU_EMB_OPTIMIZERS:
        raise JobError(f"--emb-optimizer {args.emb_optimizer} needs GPUs: FBGEMM's CPU kernels support "
                       f"{', '.join(CPU_EMB_OPTIMIZERS)}")
    if args.dense and args.no_baseline:
        raise JobError("--dense trains no baseline anyway; pass only one of --dense / --no-baseline")

    out = Path(args.output_dir); ckpt_root = out / "ckpt"
    say(f"run folder {out.resolve()} (checkpoints in {ckpt_root.resolve()})")
    done = broadcast(finished_message(args, out, ckpt_root) if rank == 0 else None)
    if done:
        say(done)
        return
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in (out / "summary.json", out / EXPORT_NAME):  # describe a finished run only
            if stale.is_file():
                stale.unlink()
    dist.barrier()

    # ---- data (identical on every rank)
    data = synthetic_clicks(args.rows, args.num_users, args.num_items, args.num_categories, args.seed)
    tr, val = split(data, args.seed)
    n_train = tr["label"].numel()
    global_batch = args.batch_size * world
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise JobError(f"{n_train} training rows are not enough for one global batch of {global_batch} "
                       f"(--batch-size {args.batch_size} x {world} processes)")
    sampler = EpochSampler(n_train, args.seed)
    rows = table_rows(int(data["user"].max()) + 1, int(data["item"].max()) + 1, args.num_categories)

    # ---- models: the sparse one and (default) the dense baseline, same plan and initial weights
    with_baseline = not args.dense and not args.no_baseline
    trainees = {"model": Trainee(args, rows, device, world, local_world)}
    if with_baseline:
        trainees["baseline"] = Trainee(args, rows, device, world, local_world)
    model = trainees["model"]
    say(f"TorchRec plan: {model.plan_text()}; tables trained by fused {EMB_OPTIMIZERS[args.emb_optimizer]} "
        f"(lr {args.emb_lr}), MLPs by Adam (lr {args.lr})")

    # ---- sparsity
    sp = sch = None
    if not args.dense:
        from distsparse.integrations.torchrec import add_torchrec_tables, zero_pruned_optimizer_state

        block = (1, args.dim) if args.prune == "rows" else (1, 4)  # --prune rows: whole rows
        sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=block)
        names = add_torchrec_tables(sp, model.dmp)
        if sorted(names) != sorted(TABLES):
            raise RuntimeError(f"add_torchrec_tables added {names}, expected {list(TABLES)}")
        sch = distsparse.CubicScheduler(sp, final_value=args.final_sparsity, initial_value=0.0,
                                        start_step=args.start_step, ramp_steps=args.ramp_steps)
        if ramp_note(args):
            say(ramp_note(args))

    # ---- resume
    resumed_path, st, distrusted = resume(TorchDistributed(), args, ckpt_root, sp is not None, "baseline" in trainees,
                                          say, lambda path: load_checkpoint(path, trainees, sp, sch))
    distrusted = set(distrusted)
    step, resumed_from, epoch, epoch_pos = 0, None, 0, 0
    if resumed_path is not None:
        step, resumed_from = int(st["step"]), resumed_path.name
        epoch, epoch_pos, note = position_after_resume(st, n_train, args.batch_size, world, steps_per_epoch)
        say(f"resumed from {resumed_from} at step {step} (epoch {epoch}, sample {epoch_pos} of {n_train})")
        if note:
            say(note)
        if st.get("sharding") != model.plan_text():
            say(f"resharded: the checkpoint's plan was {st.get('sharding')}")
    else:
        say("starting from scratch")
    say(f"train rows={n_train} val rows={val['label'].numel()} global batch={global_batch} "
        f"steps/epoch={steps_per_epoch} "
        f"max_steps={args.max_steps} mode="
        + ("dense" if args.dense else f"sparse (cubic 0 -> {args.final_sparsity}, steps "
                                      f"{args.start_step}..{args.start_step + args.ramp_steps})")
        + (" + dense baseline (same init, same batches, no sparsifier)" if with_baseline else ""))
    say(epochs_note(args.max_steps, step, steps_per_epoch, n_train))

    run_t0 = time.perf_counter(); run_steps = 0
    win_t0, win_steps = time.perf_counter(), 0
    win_loss = {k: torch.zeros((), device=device) for k in trainees}
    final_ckpt = None
    while step < args.max_steps:
        sampler.start_at(epoch, epoch_pos)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)  # the rest of this epoch's permutation
        for s in range(0, order.numel() - global_batch + 1, global_batch):
            idx = order[s + rank * args.batch_size: s + (rank + 1) * args.batch_size]
            dense, kjt, label = batch_of(tr, idx, device)
            for key, t in trainees.items():
                win_loss[key] += t.train_step(dense, kjt, label)
                if key == "model" and sp is not None:
                    sp.step()          # masks from the current weights, where the rows live
                    mask_level = current_level(sp)
                    sch.step()         # level for the next step
                    sp.squash_mask()   # zeros back into the shards: the fused optimizer regrew them
                    if args.zero_pruned_state:
                        zero_pruned_optimizer_state(sp, model.dmp.fused_optimizer)
            step += 1; run_steps += 1; win_steps += 1
            epoch_pos += global_batch

            if (args.log_every > 0 and step % args.log_every == 0) or step == args.max_steps:
                losses = torch.stack([win_loss[k] / win_steps for k in trainees])
                dist.all_reduce(losses)
                losses = (losses / world).tolist()
                sps = win_steps * global_batch / (time.perf_counter() - win_t0)
                # the level this step's masks were computed with, and the one the next step uses
                level, next_level = (mask_level, current_level(sp)) if sp is not None else (0.0, 0.0)
                spars = sp.sparsity() if sp is not None else {}
                say(f"step {step:5d} loss {losses[0]:.4f}" + (f" (baseline {losses[1]:.4f})" if with_baseline else "")
                    + f" samples/s {sps:8.0f} level {level:.3f} (next {next_level:.3f})"
                    + (" sparsity " + " ".join(f"{k}={spars[k]:.3f}" for k in TABLES) if spars else ""))
                if rank == 0:  # the rows report.py draws report.png from
                    log_run(out, step, {"train/loss": losses[0], "sparsity/level": level,
                                        **({"train/baseline_loss": losses[1]} if with_baseline else {}),
                                        **{f"sparsity/{k}": v for k, v in spars.items()}})
                win_t0, win_steps = time.perf_counter(), 0
                win_loss = {k: torch.zeros((), device=device) for k in trainees}

            if (args.save_every > 0 and step % args.save_every == 0) or step == args.max_steps:
                final_ckpt = save_checkpoint(
                    TorchDistributed(), ckpt_root, step,
                    {"step": step, "epoch": epoch, "epoch_position": epoch_pos, "world_size": world,
                     "batch_size": args.batch_size, "sharding": model.plan_text(), "sparse": sp is not None,
                     "baseline": with_baseline},
                    args.keep, distrusted, lambda path: write_checkpoint(path, trainees, sp, sch))
                say(f"step {step:5d} saved checkpoint {final_ckpt.resolve()}")

            crash_if_asked(args, step, say)
            if step >= args.max_steps:
                break
        else:  # the epoch ran out: the next one starts at its first sample
            epoch, epoch_pos = epoch + 1, 0
    train_time = time.perf_counter() - run_t0
    if final_ckpt is None:  # resumed from the last step's checkpoint: nothing trained
        final_ckpt = resumed_path
    summarize(args, trainees, sp, sch, val, device, final_ckpt, step, resumed_from, run_steps, train_time,
              global_batch, out, say)


if __name__ == "__main__":
    main()
