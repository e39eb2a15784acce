"""One rank of a :func:`launcher.run_ranks` job. Not for direct use.

``python _worker.py JOB_JSON RANK``: joins the gloo group through the job's file
rendezvous, checks rank and world size, imports and calls the rank function, writes its
return value as JSON next to the job file, and exits 0. On an exception it writes the
traceback to ``rank{r}.error.txt`` and exits 1. ``SIGUSR1`` dumps every
thread's Python stack to stderr (the launcher sends it to hung ranks before killing them).
"""

from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _load_target(target: dict):
    file, module, qualname = target["file"], target["module"], target["qualname"]
    mod = None
    if module and module != "__main__":
        if file:
            # Put the folder that makes the dotted module name importable on sys.path:
            # file .../a/b/c.py with module "b.c" -> .../a ; "c" -> .../a/b.
            root = Path(file).parent
            depth = module.count(".") + (1 if Path(file).name == "__init__.py" else 0)
            for _ in range(depth):
                root = root.parent
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
        mod = importlib.import_module(module)
    else:
        if not file:
            raise ValueError(f"cannot locate the rank function {qualname!r}")
        sys.path.insert(0, str(Path(file).parent))
        spec = importlib.util.spec_from_file_location("_rank_target", file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_rank_target"] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main() -> int:
    job_path, rank = Path(sys.argv[1]), int(sys.argv[2])
    tmpdir = job_path.parent
    error_path = tmpdir / f"rank{rank}.error.txt"
    result_path = tmpdir / f"rank{rank}.result.json"
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    try:
        job = json.loads(job_path.read_text())
        world_size = int(job["world_size"])

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        sys.path.insert(0, str(_HERE))
        from launcher import decode, encode  # noqa: E402  (same folder)

        dist.init_process_group(
            "gloo",
            init_method=job["init_method"],
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=float(job["pg_timeout"])),
        )
        assert dist.get_world_size() == world_size, (
            f"rank {rank}: torch.distributed reports world size {dist.get_world_size()}, "
            f"the launcher started {world_size}"
        )
        assert dist.get_rank() == rank, f"rank {rank}: torch.distributed says rank {dist.get_rank()}"

        fn = _load_target(job["target"])
        args = decode(job["args"])
        result = fn(*args)
        payload = json.dumps({"rank": rank, "result": encode(result)})
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(payload)
        os.replace(tmp, result_path)
    except BaseException as exc:  # noqa: BLE001 - report everything, SystemExit included
        tb = traceback.format_exc()
        # The traceback goes to the error file only (the launcher puts it in the failure
        # message); stderr keeps warnings and faulthandler dumps.
        error_path.write_text(f"[rank {rank}] {type(exc).__name__} in rank function:\n{tb}")
        return 1
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown noise is not a test failure
        pass
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown (gloo threads at exit can hang or crash).
    os._exit(code)
