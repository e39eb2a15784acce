"""Run one function on ``world_size`` real gloo processes and bring the results back.

This is the single entry point of the multi-process test layer: a pytest test calls
:func:`run_ranks`, which spawns fresh Python interpreters (one per rank), joins them in a
gloo process group on CPU, runs the same *rank function* in each and returns what each
rank returned. Per-rank functions hold the assertions and the library calls; tests stay
thin and compare ranks (STYLE.md item 11)::

    from launcher import run_ranks          # tests/distributed is on sys.path under pytest
    import rank_fns

    def test_all_reduce_sums_over_every_rank():
        results = run_ranks(rank_fns.all_reduce_sum, 3, 1.5)
        assert results == [4.5, 4.5, 4.5]   # results[r] is what rank r returned

From another test folder (the checkpoint resume tests, say) import it by path, e.g. put
``tests/distributed`` on ``sys.path`` in a ``conftest.py`` and ``from launcher import
run_ranks``; the rank function can live in any importable module or file.

What each rank gets
-------------------
* A fresh interpreter (``subprocess.Popen``; nothing is inherited from the pytest process
  except the environment) with ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
  ``CUDA_VISIBLE_DEVICES=""``, ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set, and
  ``torch.set_num_threads(1)``. Each rank gets a different ``PYTHONHASHSEED`` (derived
  from ``hash_seed`` and the rank), so code that iterates a ``set`` of names in hash order
  disagrees across ranks instead of passing by luck.
* ``torch.distributed.init_process_group("gloo", init_method="file://<tmp>/rendezvous",
  rank=r, world_size=world_size, timeout=timedelta(seconds=pg_timeout))``. A file
  rendezvous in a fresh temporary folder: no ports, so no port races between jobs.
* The worker asserts ``dist.get_world_size() == world_size`` and
  ``dist.get_rank() == r`` before calling the function.
* ``fn(*args)`` is then called. ``args`` must be JSON-able (strings, numbers, lists,
  dicts, ``None``; tensors are accepted too, see below). A rank that needs its rank or the
  world size asks ``torch.distributed``. Pass a folder (``str(tmp_path)``) as an argument
  when ranks must share files (checkpoints).
* The return value must be JSON-able; ``torch.Tensor`` values anywhere inside lists and
  dicts are carried exactly (dtype, shape and every bit of every element — floats go
  through Python's round-tripping ``repr``), and come back as CPU tensors. No pickle.

What the test gets
------------------
``run_ranks`` returns ``[result_of_rank_0, result_of_rank_1, ...]``. It raises
:class:`RankFailure` (an ``AssertionError``, so pytest reports a plain test failure) when

* any rank exits with a non-zero or negative (signal) exit code — an exception in ``fn``
  included; the message holds each failing rank's exit code, Python traceback and the tail
  of its stderr/stdout;
* the job runs past ``timeout`` seconds — every rank still running is sent ``SIGUSR1``
  (each worker registers :mod:`faulthandler` for it, so its Python stack is dumped to its
  stderr), then killed; the message says which ranks hung and shows where they were;
* a rank fails and the others are still running ``grace`` seconds later (they would
  otherwise wait in a collective for the pg timeout) — they are killed and named as hung
  after the failure.

Rank functions that *expect* an exception should catch it and return a description
(``{"error_type": ..., "message": ...}``) so the test can assert on every rank; see
``rank_fns.capture_error``.

The function may be given as a callable (it is re-imported in each rank from its module
— it must be a module-level function, not a lambda or closure) or as a string
``"package.module:qualname"`` or ``"/path/to/file.py:qualname"``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

__all__ = ["run_ranks", "run_ranks_once", "RankFailure", "encode", "decode"]

_HERE = Path(__file__).resolve().parent
_WORKER = _HERE / "_worker.py"
_TAIL_CHARS = 4000


class RankFailure(AssertionError):
    """A multi-process job failed: a rank raised, crashed, or hung. The message says which."""


# ----------------------------------------------------------------------------------------
# JSON with exact tensors (shared by the launcher and the worker)
# ----------------------------------------------------------------------------------------

_TENSOR_KEY = "__tensor__"


def encode(obj: Any) -> Any:
    """Turn ``obj`` into JSON-able data; tensors become exact, tagged dicts."""
    import torch  # local import: the launcher itself does not need torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            payload = t.view(torch.int16).numpy().tobytes()
        else:
            payload = t.numpy().tobytes()
        return {
            _TENSOR_KEY: {
                "dtype": str(t.dtype).replace("torch.", ""),
                "shape": list(t.shape),
                "device": str(obj.device),
                "b64": base64.b64encode(payload).decode("ascii"),
            }
        }
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"result dict keys must be str for JSON, got {k!r}")
            out[k] = encode(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot carry a {type(obj).__name__} between processes: return JSON-able values "
        "(str, int, float, bool, None, list, dict) or torch.Tensor"
    )


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`: tagged dicts become CPU tensors again."""
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_KEY}:
            import torch

            spec = obj[_TENSOR_KEY]
            dtype = getattr(torch, spec["dtype"])
            payload = base64.b64decode(spec["b64"])
            shape = spec["shape"]
            if not payload:
                flat = torch.empty(0, dtype=dtype)
            elif dtype == torch.bfloat16:
                flat = torch.frombuffer(bytearray(payload), dtype=torch.int16).view(dtype)
            else:
                flat = torch.frombuffer(bytearray(payload), dtype=dtype)
            return flat.reshape(shape)
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def _target_spec(fn: Union[str, Callable[..., Any]]) -> dict:
    """Describe where a worker can import ``fn`` from."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"function spec must be 'module:qualname' or 'file.py:qualname', got {fn!r}")
        where, qualname = fn.rsplit(":", 1)
        if where.endswith(".py"):
            return {"file": str(Path(where).resolve()), "module": None, "qualname": qualname}
        return {"file": None, "module": where, "qualname": qualname}
    if not callable(fn):
        raise TypeError(f"run_ranks needs a function or a 'module:qualname' string, got {fn!r}")
    import inspect

    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ValueError(
            f"{qualname!r} cannot be re-imported in a worker process: define the rank "
            "function at module level"
        )
    return {
        "file": str(Path(inspect.getfile(fn)).resolve()),
        "module": fn.__module__,
        "qualname": qualname,
    }


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    result_path: Path
    error_path: Path
    killed: str = ""  # why the launcher killed it, if it did


def _tail(path: Path, n: int = _TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text if len(text) <= n else "...\n" + text[-n:]


def _kill(r: _Rank) -> None:
    if r.proc.poll() is not None:
        return
    try:
        os.killpg(r.proc.pid, signal.SIGKILL)  # the rank is the leader of its own session
    except (ProcessLookupError, PermissionError):
        try:
            r.proc.kill()
        except ProcessLookupError:
            pass
    try:
        r.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _dump_stacks_and_kill(ranks: Sequence[_Rank], why: str) -> None:
    alive = [r for r in ranks if r.proc.poll() is None]
    for r in alive:
        try:
            os.kill(r.proc.pid, signal.SIGUSR1)  # faulthandler in the worker dumps stacks
        except ProcessLookupError:
            pass
    if alive:
        time.sleep(1.0)
    for r in alive:
        r.killed = why
        _kill(r)


def _report(fn_name: str, world_size: int, ranks: Sequence[_Rank], headline: str) -> str:
    lines = [f"{headline} [{fn_name} on world_size={world_size}]"]
    for r in ranks:
        code = r.proc.returncode
        if r.killed:
            status = f"HUNG: {r.killed}"
        elif code == 0:
            status = "ok"
        elif code is not None and code < 0:
            status = f"killed by signal {-code} ({signal.Signals(-code).name})"
        else:
            status = f"exit code {code}"
        lines.append(f"--- rank {r.rank}: {status}")
        if code == 0 and not r.killed:
            continue
        if r.error_path.exists():
            lines.append(r.error_path.read_text(errors="replace").rstrip())
        err = _tail(r.stderr_path)
        if err.strip():
            lines.append(f"  [rank {r.rank} stderr tail]\n{err.rstrip()}")
        out = _tail(r.stdout_path, 1500)
        if out.strip():
            lines.append(f"  [rank {r.rank} stdout tail]\n{out.rstrip()}")
    return "\n".join(lines)


def run_ranks(
    fn: Union[str, Callable[..., Any]],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    pg_timeout: float = 30.0,
    grace: float = 10.0,
    hash_seed: int = 0,
    env: dict | None = None,
) -> list:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks (real processes); return per-rank results.

    Args:
        fn: module-level function, or ``"module:qualname"`` / ``"/path/file.py:qualname"``.
        world_size: number of processes (>= 1).
        *args: JSON-able arguments (tensors allowed), the same for every rank.
        timeout: hard limit in seconds for the whole job, start-up included; on expiry
            every rank still running is stack-dumped and killed and the test fails,
            naming them.
        pg_timeout: ``init_process_group(timeout=...)`` in seconds (collective timeout).
        grace: after one rank fails, how long the others may keep running before they
            are killed and reported as hung.
        hash_seed: varies each rank's ``PYTHONHASHSEED`` (rank r gets
            ``1 + 1000 * hash_seed + r``); use two values to check "same across runs".
        env: extra environment variables for every rank.

    Returns:
        ``[result of rank 0, ..., result of rank world_size - 1]``.

    Raises:
        RankFailure: a rank raised, crashed or hung; the message holds every failing
            rank's traceback and output tail.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    target = _target_spec(fn)
    fn_name = target["qualname"]
    payload_args = encode(list(args))

    with tempfile.TemporaryDirectory(prefix="distsparse-ranks-") as tmp:
        tmpdir = Path(tmp)
        ranks: list[_Rank] = []
        failure_order: list[int] = []  # ranks in the order their failure was seen
        base_env = dict(os.environ)
        for var in ("MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                    "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU"):
            base_env.pop(var, None)
        # The repo root goes on the path so "tests.x.y:fn" strings and `import distsparse`
        # work from a checkout even without an editable install.
        repo_root = str(_HERE.parent.parent)
        base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo_root, base_env.get("PYTHONPATH", "")) if p
        )
        base_env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
        )
        if env:
            base_env.update({k: str(v) for k, v in env.items()})
        job = {
            "target": target,
            "args": payload_args,
            "world_size": world_size,
            "init_method": (tmpdir / "rendezvous").as_uri(),
            "pg_timeout": pg_timeout,
        }
        job_path = tmpdir / "job.json"
        job_path.write_text(json.dumps(job))

        try:
            for rank in range(world_size):
                rank_env = dict(base_env)
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank),
                                PYTHONHASHSEED=str(1 + 1000 * hash_seed + rank))
                r = _Rank(
                    rank=rank,
                    proc=None,  # type: ignore[arg-type]
                    stdout_path=tmpdir / f"rank{rank}.stdout",
                    stderr_path=tmpdir / f"rank{rank}.stderr",
                    result_path=tmpdir / f"rank{rank}.result.json",
                    error_path=tmpdir / f"rank{rank}.error.txt",
                )
                with open(r.stdout_path, "wb") as out, open(r.stderr_path, "wb") as err:
                    r.proc = subprocess.Popen(
                        [sys.executable, str(_WORKER), str(job_path), str(rank)],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        env=rank_env, cwd=repo_root, start_new_session=True,
                    )
                ranks.append(r)

            deadline = time.monotonic() + timeout
            first_failure_at: float | None = None
            failed_rank: int | None = None
            while True:
                codes = [r.proc.poll() for r in ranks]
                now = time.monotonic()
                for r, c in zip(ranks, codes):
                    if c is not None and c != 0 and r.rank not in failure_order:
                        failure_order.append(r.rank)
                if first_failure_at is None and failure_order:
                    first_failure_at, failed_rank = now, failure_order[0]
                if all(c is not None for c in codes):
                    break
                if first_failure_at is not None and now - first_failure_at > grace:
                    _dump_stacks_and_kill(
                        ranks, f"still running {grace:g}s after rank {failed_rank} failed")
                    break
                if now > deadline:
                    hung = [r.rank for r in ranks if r.proc.poll() is None]
                    _dump_stacks_and_kill(ranks, f"still running at the {timeout:g}s job timeout")
                    raise RankFailure(_report(
                        fn_name, world_size, ranks,
                        f"job timed out after {timeout:g}s; ranks {hung} hung "
                        "(their Python stacks are in the stderr tails below)"))
                time.sleep(0.02)
        finally:
            for r in ranks:
                _kill(r)

        bad = [r for r in ranks if r.killed or r.proc.returncode != 0]
        if bad:
            first = f" (first seen failing: rank {failure_order[0]})" if failure_order else ""
            raise RankFailure(_report(
                fn_name, world_size, ranks,
                f"ranks {[r.rank for r in bad]} failed{first}"))

        results = []
        for r in ranks:
            if not r.result_path.exists():
                raise RankFailure(_report(fn_name, world_size, ranks,
                                          f"rank {r.rank} exited 0 but wrote no result"))
            results.append(decode(json.loads(r.result_path.read_text())["result"]))
        # Show the ranks' output in pytest's "captured stdout" if a later assert fails.
        for r in ranks:
            for label, p in (("stdout", r.stdout_path), ("stderr", r.stderr_path)):
                text = _tail(p, 2000)
                if text.strip():
                    print(f"[rank {r.rank} {label}]\n{text.rstrip()}")
        return results


_ONCE_CACHE: dict = {}


def run_ranks_once(fn: Union[str, Callable[..., Any]], world_size: int, *args: Any, **kwargs: Any) -> list:
    """:func:`run_ranks`, memoized for the pytest session by (function, world size, args).

    For several thin tests asserting different behaviours of one (expensive) job. A
    failing job is not cached: each test that needs it reports the failure.
    """
    target = _target_spec(fn)
    key = json.dumps([target, world_size, encode(list(args)), sorted(kwargs.items())],
                     sort_keys=True, default=repr)
    if key not in _ONCE_CACHE:
        _ONCE_CACHE[key] = run_ranks(fn, world_size, *args, **kwargs)
    return _ONCE_CACHE[key]
