"""The run folder: step checkpoints, the COMPLETE marker, retention, and which checkpoint a run
resumes from. Shared by both DLRM jobs; what goes INTO a step folder is each job's writer's.

    OUTPUT_DIR/ckpt/step_000120/   the files of one step, then train_state.json and COMPLETE
    OUTPUT_DIR/summary.json        the finished run; sparse_tables.safetensors, pruned_tables.safetensors,
    OUTPUT_DIR/history.jsonl       report.png beside it

* Save (`save_checkpoint`): every rank writes its files; after every rank has finished
  (`wait_for_everyone`), the main process writes `train_state.json` (step, epoch position,
  world size, a sha256 of every file: accelerate's and DCP's files carry no checksum of their
  own, distsparse's file checks each of its tensors) and a `COMPLETE` marker, and only then
  deletes the complete checkpoints beyond the newest `--keep` among those at or before the
  step just written (a newer folder, e.g. one skipped as damaged, is never counted or
  deleted: it is replaced when the run reaches its step again).
* Resume (`--resume auto`, the default): the folders are tried newest first; a folder without
  `COMPLETE`, with an unreadable `train_state.json`, with a file that does not match its sha256,
  or whose files fail to load is skipped, and one line names each skipped folder and why. The
  run resumes from the newest one that loads, and stops with an error (deleting nothing) when
  complete checkpoints exist but none loads. `--resume PATH` loads exactly PATH or stops with
  one message; `--resume none` starts over. A finished run (summary.json at the newest
  checkpoint's step >= `--max-steps`) is not redone: it says so and exits 0.

Both functions take accelerate's `Accelerator` (or `TorchDistributed`, the same three members
over plain torch.distributed, for the TorchRec job): rank 0 decides, every rank follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from dlrm.config import JobError

CKPT_RE = re.compile(r"^step_(\d{6,})$")
EXPORT_NAME = "sparse_tables.safetensors"
PRUNED_NAME = "pruned_tables.safetensors"
MODES = ("ddp", "fsdp2")  # what train_state.json's "mode" may say (absent: ddp, written before --fsdp2)


class TorchDistributed:
    """What save_checkpoint and resume use of accelerate's Accelerator, over torch.distributed."""

    @property
    def is_main_process(self) -> bool:
        return dist.get_rank() == 0

    @property
    def num_processes(self) -> int:
        return dist.get_world_size()

    def wait_for_everyone(self) -> None:
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def list_checkpoints(root: Path, complete_only=True):
    """[(step, folder)] of `step_NNNNNN` folders, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / "COMPLETE").is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int, distrusted: set, write=None):
    """Write `root/step_NNNNNN` on every rank, mark it COMPLETE, then apply retention.

    `write(path)` writes the files on every rank (default: `accelerator.save_state`; the
    FSDP2 mode passes its own writer, same files).

    Retention counts only complete folders at or before `step` that are not `distrusted`
    (skipped as damaged when this run resumed): a folder newer than the run's position, or
    a damaged one, never pushes a good checkpoint out. Incomplete folders older than
    `step` are leftovers of interrupted saves and are removed.
    """
    path = root / f"step_{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():              # leftover of a crashed save or a damaged folder: replaced
            shutil.rmtree(path)
        path.mkdir(parents=True)
    distrusted.discard(path.name)
    accelerator.wait_for_everyone()
    if write is None:
        accelerator.save_state(str(path))  # every rank: model/optimizer (main), RNG (each), sparsity hook
    else:
        write(path)
    accelerator.wait_for_everyone()    # all ranks finished writing their files
    if accelerator.is_main_process:
        # accelerate's files carry no checksum (a flipped byte in model.safetensors would load
        # silently): record one per file; distsparse's own file checks each of its tensors
        state = dict(state, files={str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*"))
                                   if f.is_file() and not f.name.startswith("distsparse")})
        with open(path / "train_state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush(); os.fsync(f.fileno())
        with open(path / "COMPLETE", "w") as f:
            f.write(f"{step}\n"); f.flush(); os.fsync(f.fileno())
        trusted = [(s, p) for s, p in list_checkpoints(root) if s <= step and p.name not in distrusted]
        for _, p in trusted[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
        for s, p in list_checkpoints(root, complete_only=False):
            if s < step and not (p / "COMPLETE").is_file():
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def inspect_checkpoint(path: Path, sparse: bool, baseline: bool):
    """Rank 0's look at a folder before loading: ("ok", train_state), ("skip", why) for a
    folder that cannot be resumed from, or ("fatal", why) when it was written by a run
    configured differently (older folders were too: no point falling back)."""
    if not path.is_dir():
        return "skip", "not a folder"
    if not (path / "COMPLETE").is_file():
        return "skip", "no COMPLETE marker: its save did not finish"
    try:
        st = json.loads((path / "train_state.json").read_text())
        int(st["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return "skip", f"train_state.json unreadable ({type(exc).__name__}: {exc})"
    for name, digest in (st.get("files") or {}).items():
        if not (path / name).is_file():
            return "skip", f"{name} is missing"
        if file_sha256(path / name) != digest:
            return "skip", f"{name} does not match its sha256 in train_state.json (damaged file)"
    if "sparse" in st and bool(st["sparse"]) != sparse:
        return "fatal", (f"{path} was written by a {'sparse' if st['sparse'] else '--dense'} run; resume it "
                         f"{'without' if st['sparse'] else 'with'} --dense, or start over with "
                         f"--resume none / another --output-dir")
    if bool(st.get("baseline", False)) != baseline:
        return "fatal", (f"{path} was written {'with' if st.get('baseline') else 'without'} a dense "
                         f"baseline model; resume it {'without' if st.get('baseline') else 'with'} "
                         f"--no-baseline, or start over with --resume none / another --output-dir")
    mode = st.get("mode", "ddp")
    if mode not in MODES:
        return "fatal", (f"{path} was written in mode {mode!r}, which this script cannot resume (it resumes "
                         f"checkpoints of the modes {', '.join(MODES)}); start over with --resume none / another "
                         f"--output-dir")
    return "ok", st


def _one_line(exc: BaseException, folder: Path) -> str:
    """An exception as one short line, paths inside `folder` shown relative to it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.replace(str(folder) + os.sep, "")


def all_ranks(obj):
    """Every rank's `obj`, in rank order (a collective when distributed)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def resume(accelerator, args, ckpt_root: Path, sparse: bool, baseline: bool, say, load=None):
    """Load the checkpoint to continue from on every rank; return (folder, train_state,
    skipped names) or (None, None, skipped names) to start from scratch.

    `load(path)` loads a folder on every rank (default `accelerator.load_state`; the FSDP2
    mode passes its own loader, which reads the same files).

    Every decision is rank 0's (broadcast), and a load counts only if it succeeded on
    every rank (gathered), so all ranks always agree. A failed `load_state` may have
    changed some state (weights, optimizer) before raising; the next candidate's
    `load_state` overwrites all of it, and with no candidate left the run stops.
    """
    if args.resume == "none":
        return None, None, []
    explicit = args.resume != "auto"
    names = broadcast(([args.resume] if explicit else
                       [str(p) for _, p in reversed(list_checkpoints(ckpt_root, complete_only=False))])
                      if accelerator.is_main_process else None)
    skipped, complete_seen = [], False
    for name in names:
        path = Path(name)
        kind, detail = broadcast(inspect_checkpoint(path, sparse, baseline) if accelerator.is_main_process else None)
        if kind == "fatal":
            raise JobError(detail)
        if kind == "ok":
            complete_seen = True
            try:
                if load is None:
                    accelerator.load_state(str(path))
                else:
                    load(path)
                error = None
            except Exception as exc:  # any failure: damaged file, missing file, shape change...
                error = _one_line(exc, path)
            errors = [(r, e) for r, e in enumerate(all_ranks(error)) if e is not None]
            if not errors:
                if skipped:
                    say(f"resume: skipped {'; '.join(skipped)}; resuming from {path.name}")
                return path, detail, [s.split(" ", 1)[0] for s in skipped]
            rank, detail = errors[0]
            if accelerator.num_processes > 1 and len(errors) < accelerator.num_processes:
                detail += f" (on rank{'s' if len(errors) > 1 else ''} {', '.join(str(r) for r, _ in errors)})"
        if explicit:
            raise JobError(f"cannot resume from {path}: {detail}. `--resume PATH` never falls back; "
                           f"use --resume auto to take the newest checkpoint that loads, or --resume none")
        skipped.append(f"{path.name} ({detail})")
    if complete_seen:
        raise JobError(f"no checkpoint in {ckpt_root} can be resumed from: {'; '.join(skipped)}. Nothing was "
                       f"deleted; start over with --resume none or another --output-dir")
    if skipped:
        say(f"resume: skipped {'; '.join(skipped)}; no complete checkpoint, starting from scratch")
    return None, None, [s.split(" ", 1)[0] for s in skipped]


def finished_message(args, out: Path, ckpt_root: Path):
    """Rank 0: a message when this output folder already holds the finished run, else None."""
    if args.resume != "auto" or not (out / "summary.json").is_file():
        return None
    try:
        final = int(json.loads((out / "summary.json").read_text())["final_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ckpts = list_checkpoints(ckpt_root)
    if final < args.max_steps or not ckpts or ckpts[-1][0] != final:
        return None
    export = out / EXPORT_NAME
    return (f"already finished: step {final} (--max-steps {args.max_steps}); the summary is {out / 'summary.json'}"
            + (f", the exported tables {export}" if export.is_file() else "")
            + ". Nothing to do: pass a larger --max-steps to train on, or --resume none (or another "
              "--output-dir) to start over.")



def crash_if_asked(args, step: int, say) -> None:
    """--crash-at-step N: end every rank right after step N (after that step's checkpoint, if
    any), as a crash would: the tests resume from what it leaves."""
    if args.crash_at_step is not None and step == args.crash_at_step:
        say(f"step {step:5d} simulated crash (--crash-at-step)")
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(1)
