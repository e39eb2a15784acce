"""The command line of the DLRM jobs (argparse, the options both jobs share in one place) and
the launch mistakes refused before any work: a wrong world size, accelerate's one-process CPU
launcher, FSDP turned on by the launch config without `--fsdp2`, FSDP1.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

import torch.distributed as dist


class JobError(Exception):
    """A refusal with a message for the user: printed once, no traceback, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written, and every option's default."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # every rank parses the same arguments: only one of them prints the usage error
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _number(kind, lo=None, hi=None, lo_open=False):
    """argparse type: a `kind` number in [lo, hi] ((lo, hi] with lo_open), finite."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{text} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None
                else f"{text} must be {'>' if lo_open else '>='} {lo:g}")
        return v
    parse.__name__ = kind.__name__
    return parse


def add_run_args(p, output_dir: str) -> None:
    """--output-dir, --max-steps, --batch-size."""
    count = _number(int, 1)
    p.add_argument("--output-dir", default=output_dir, help="checkpoints (ckpt/), summary.json and the exported tables")
    p.add_argument("--max-steps", type=count, default=600, help="training steps in all (a resumed run counts on)")
    p.add_argument("--batch-size", type=count, default=512, help="per process; the global batch is this x processes")


def add_data_args(p) -> None:
    """The synthetic data and the model's size."""
    count = _number(int, 1)
    p.add_argument("--seed", type=_number(int, 0), default=0, help="data, split, initial weights and data order")
    p.add_argument("--rows", type=_number(int, 20), default=400_000, help="synthetic rows (train+validation)")
    p.add_argument("--num-users", type=count, default=6000, help="synthetic users")
    p.add_argument("--num-items", type=count, default=2000, help="synthetic items")
    p.add_argument("--num-categories", type=count, default=120, help="item categories")
    p.add_argument("--dim", type=count, default=16, help="embedding dimension")


def add_schedule_args(p, baseline_help: str) -> None:
    """Dense or sparse (with or without the baseline), the ramp, checkpoints, resume, logging."""
    count = _number(int, 1)
    p.add_argument("--dense", action="store_true", help="train only a dense model: no sparsifier, no baseline")
    p.add_argument("--no-baseline", action="store_true", help=baseline_help)
    p.add_argument("--final-sparsity", type=_number(float, 0.0, 1.0), default=0.8,
                   help="sparsity level at the end of the ramp, in [0, 1]")
    p.add_argument("--start-step", type=_number(int, 0), default=100, help="S0: dense warm-up steps before the ramp")
    p.add_argument("--ramp-steps", type=count, default=300, help="R: cubic ramp length in steps")
    p.add_argument("--save-every", type=_number(int, 0), default=200,
                   help="checkpoint interval in steps; 0: only at the end")
    p.add_argument("--keep", type=count, default=2, help="complete checkpoints to keep")
    p.add_argument("--resume", default="auto",
                   help="'auto': the newest checkpoint that loads; 'none': start over; or a checkpoint folder "
                        "(loaded exactly, no fallback)")
    p.add_argument("--crash-at-step", type=count, default=None,
                   help="os._exit(1) on every rank after this step (tests)")
    p.add_argument("--log-every", type=_number(int, 0), default=50, help="steps between log lines; 0: only at the end")


def check_schedule_args(p, args) -> None:
    """Usage errors no single option's type can see."""
    if args.resume not in ("auto", "none") and not os.path.isdir(args.resume):
        p.error(f"argument --resume: {args.resume!r} is neither 'auto', 'none' nor a checkpoint folder")
    if args.crash_at_step is not None and args.crash_at_step > args.max_steps:
        p.error(f"argument --crash-at-step: {args.crash_at_step} is after --max-steps {args.max_steps}: "
                "it would never crash")


def parse_args(argv=None, doc: str = ""):
    """The main job's options (examples/dlrm/train.py; `doc`: its docstring, for --help)."""
    p = _Parser(description=doc.split("What it does")[0].strip("\n"), formatter_class=_HelpFormatter,
                epilog="How it works (data order, checkpoints, resume, summary): the docstrings of "
                       "examples/dlrm/*.py.")
    count = _number(int, 1)
    add_run_args(p, "runs/dlrm")
    p.add_argument("--lr", type=_number(float, 0.0, lo_open=True), default=4e-3, help="Adam learning rate")
    add_data_args(p)
    p.add_argument("--csv", default=None, help="read user,item,label rows (labels 0/1) instead of synthetic data")
    add_schedule_args(p, "do not train the same-length dense baseline next to the sparse model (faster)")
    p.add_argument("--log-with", default=None, help="accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--expect-world-size", type=count, default=None, help="exit with an error on another world size")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    p.add_argument("--fsdp2", action="store_true",
                   help="shard the tables (and MLPs, and the baseline) with FSDP2 fully_shard instead of DDP "
                        "(see examples/dlrm/fsdp2.py)")
    p.add_argument("--prune", choices=("blocks", "rows"), default="blocks",
                   help="'blocks': (1, 4) blocks; 'rows': whole rows ((1, dim) blocks, same schedule), then write "
                        "the pruned tables (kept rows + int32 remap) and serve the validation set from them")
    args = p.parse_args(argv)
    if args.csv is not None and not os.path.isfile(args.csv):
        p.error(f"argument --csv: {args.csv!r} is not a file")
    check_schedule_args(p, args)
    return args


def launch_mistake(argv):
    """A message when `accelerate launch` was asked for several CPU processes but started
    one (`--cpu --num_processes N`, `use_cpu: true` / `distributed_type: MULTI_CPU` in a
    config without mpirun), else None.

    accelerate 1.15's single-process launcher (`simple_launcher`) sets ACCELERATE_USE_CPU,
    sets MASTER_ADDR/MASTER_PORT only when more than one process (or machine) was asked
    for, and no WORLD_SIZE; its multi-process launcher (torchrun) always sets WORLD_SIZE.
    """
    env = os.environ
    if "WORLD_SIZE" in env or "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env:
        return None
    script = "examples/dlrm/train.py " + shlex.join(argv)
    return ("accelerate launch started ONE process although several were asked for: with --cpu (or use_cpu: "
            "true / distributed_type: MULTI_CPU in the config) accelerate uses its single-process launcher "
            "(that path expects mpirun). For N processes on CPU run\n"
            f"    accelerate launch --config_file launch/cpu_2proc.yaml {script}\n"
            f"or  accelerate launch --multi_gpu --num_processes N {script}\n"
            "(this script passes Accelerator(cpu=True) when there is no CUDA, which makes them gloo CPU ranks; "
            "see launch/README.md). To run one process on purpose, leave out --num_processes or pass "
            "--expect-world-size 1.")


def ramp_note(args) -> str | None:
    """A warning when the schedule's final level comes after the last step. Step k's masks use
    the level of scheduler epoch k - 1, so the final level first shapes the masks at step
    start_step + ramp_steps + 1."""
    first_final = args.start_step + args.ramp_steps + 1
    if args.dense or first_final <= args.max_steps:
        return None
    return (f"warning: the masks reach --final-sparsity {args.final_sparsity} at step {first_final} (--start-step "
            f"{args.start_step} + --ramp-steps {args.ramp_steps} + 1), after --max-steps {args.max_steps}: the run "
            "ends below it")


def fsdp2_route(accelerator) -> str:
    """'plugin' when accelerate's FSDP plugin is on (its prepare() calls fully_shard), else
    'direct' (the job calls fully_shard: torchrun, CPU, one process)."""
    from accelerate.utils import DistributedType

    return "plugin" if accelerator.distributed_type == DistributedType.FSDP else "direct"


def check_launch(args, accelerator, say) -> str | None:
    """Refuse a launch that is not what the options ask for; return who calls fully_shard
    under --fsdp2 ('plugin' or 'direct'), None in the DDP mode."""
    # world size: accelerate and torch.distributed must agree (REFERENCE 2.3)
    env_ws = int(os.environ.get("WORLD_SIZE", "1"))
    dist_ws = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    if not (accelerator.num_processes == env_ws == dist_ws):
        raise JobError(f"world size mismatch: accelerate={accelerator.num_processes} WORLD_SIZE={env_ws} "
                       f"torch.distributed={dist_ws}; on CPU launch with --multi_gpu --num_processes N "
                       f"and Accelerator(cpu=True) (see launch/README.md)")
    say(f"world_size={accelerator.num_processes} backend={backend} "
        f"distributed_type={accelerator.distributed_type.value} device={accelerator.device}")
    if args.expect_world_size is not None and accelerator.num_processes != args.expect_world_size:
        raise JobError(f"expected world size {args.expect_world_size}, got {accelerator.num_processes}")
    fsdp_config = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    route = fsdp2_route(accelerator) if args.fsdp2 else None
    if not args.fsdp2 and (fsdp_config or fsdp2_route(accelerator) == "plugin"):
        raise JobError("the launch config turns on accelerate's FSDP (distributed_type: FSDP) but --fsdp2 is not "
                       "given: pass --fsdp2 to shard the tables, or launch with launch/multi_gpu.yaml (GPUs) or "
                       "launch/cpu_2proc.yaml (CPU) for the DDP mode")
    if route == "plugin" and not accelerator.is_fsdp2:
        raise JobError("--fsdp2 under accelerate's FSDP1 plugin (fsdp_version: 1): set fsdp_version: 2 in the launch "
                       "config (launch/fsdp2_gpu.yaml)")
    if args.fsdp2:
        say(f"fsdp2: tables sharded by rows over {accelerator.num_processes} rank(s) on {accelerator.device.type}, "
            + ("fully_shard called by accelerate's FSDP2 plugin (prepare)" if route == "plugin" else
               "fully_shard called by this script" + (" (accelerate's FSDP plugin is off: accelerate 1.15 has "
                                                     "no FSDP on CPU)" if fsdp_config else "")))
    return route
