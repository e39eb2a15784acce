"""How the example tests launch the DLRM jobs (examples/dlrm/): one process, torchrun or
`accelerate launch`, each with a hard timeout, and what they read back from a run folder.

Output goes to files (a worker that outlived its launcher cannot block the read); on timeout
the launcher gets SIGTERM, which torchrun passes on to its workers (they run in sessions of
their own), then its session gets SIGKILL. The launcher variables of the calling shell are
dropped, so a test never joins a group it did not start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "examples" / "dlrm" / "train.py"
TORCHREC = ROOT / "examples" / "dlrm" / "train_torchrec.py"
TIMEOUT = 600  # a hang guard per launch, not a speed target (each takes ~10-30 s, minutes at load 30)
TABLES = ("user", "item", "item_category", "hour", "device", "region")
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root with a hard timeout (pytest.fail when it passes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p))
    for k in LAUNCHER_VARS:
        env.pop(k, None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        out.seek(0); err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        pytest.fail(f"timed out after {TIMEOUT}s: {' '.join(map(str, cmd))}\nstdout:\n{stdout[-4000:]}\n"
                    f"stderr:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def single(script: Path, *args) -> subprocess.CompletedProcess:
    """One process, no launcher: `python examples/dlrm/<script>`."""
    return run([sys.executable, str(script), *map(str, args)])


def torchrun(script: Path, *args, nproc: int = 2) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), str(script), *map(str, args)])


def accelerate(script: Path, *args, launcher=()) -> subprocess.CompletedProcess:
    """`accelerate launch` with the launcher's own options (a --config_file, say)."""
    return run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                "--main_process_port", str(free_port()), str(script), *map(str, args)])


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def summary(out_dir) -> dict:
    return json.loads((Path(out_dir) / "summary.json").read_text())


def complete_ckpts(out_dir) -> list[str]:
    return sorted(p.name for p in (Path(out_dir) / "ckpt").iterdir() if (p / "COMPLETE").is_file())


def ckpt(step: int) -> str:
    return f"step_{step:06d}"
