"""The README's accelerate script and the docs' plain-torch script run as printed, on 2 gloo ranks.

* README (`# train.py:`): `accelerate launch --multi_gpu --num_processes 2` with
  `Accelerator(cpu=True)`: straight to step 100; and stopped at step 40, then resumed to step
  100 by a second launch from accelerate's newest automatically named checkpoint: the same
  embedding weights bit for bit, the restored counters continue, and only `total_limit`
  checkpoints remain, the last one a valid distsparse file.
* docs/integrations.md (`# train_ddp.py:`, under torchrun): straight to step 100 with
  `add_data` before the DDP wrapping, as printed; the same script with `add_data` moved after
  the wrapping, stopped at step 40 and resumed to step 100: the same weights bit for bit.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distsparse.cli import inspect_file, verify_file

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a hang guard per launch, not a speed target (each takes ~10-30 s, minutes at load 30)
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
ADD = 'sparsifier.add_data("emb", net.emb)'
WRAP = "model = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net\n"
DONE = r"step 100: level 0\.800, zeros 0\.800, step_count 100, last_epoch 100, weights (\w+)"


def script(page: str, first_line: str) -> str:
    """The one ```python block of `page` that starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"{page} has one python block starting with {first_line!r}"
    return found[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    return env


def _run(folder: Path, name: str, text: str, launcher: list[str], steps: int) -> str:
    (folder / name).write_text(text)
    cmd = [*launcher, "--main_process_port" if launcher[0] == ACCELERATE else "--master_port", str(_free_port()),
           name, str(steps)]
    try:
        r = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT}s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def _accelerate(folder: Path, text: str, steps: int) -> str:
    if ACCELERATE is None:
        pytest.fail("the accelerate CLI is not installed (it comes with the package's dependencies)")
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    return _run(folder, "train.py", text, launcher, steps)


def _torchrun(folder: Path, text: str, steps: int) -> str:
    return _run(folder, "train_ddp.py", text, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
                steps)


def test_readme_accelerate_script_resumes_exactly_from_its_newest_automatic_checkpoint(tmp_path):
    text = script("README.md", "# train.py:")
    assert "automatic_checkpoint_naming=True, total_limit=3" in text and "register_for_checkpointing" in text
    (tmp_path / "straight").mkdir(); (tmp_path / "resumed").mkdir()
    straight = _accelerate(tmp_path / "straight", text, 100)
    m = re.search(DONE, straight)
    assert m, straight

    first = _accelerate(tmp_path / "resumed", text, 40)
    assert "step 40: " in first and "step_count 40, last_epoch 40" in first, first
    resumed = _accelerate(tmp_path / "resumed", text, 100)   # from run/checkpoints/checkpoint_40
    assert f"step 100: level 0.800, zeros 0.800, step_count 100, last_epoch 100, weights {m.group(1)}" in resumed, \
        (straight, resumed)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "run" / "checkpoints").iterdir())
    assert kept == ["checkpoint_100", "checkpoint_60", "checkpoint_80"]
    state = tmp_path / "resumed" / "run" / "checkpoints" / "checkpoint_100" / "distsparse_state.safetensors"
    verify_file(state)
    info = inspect_file(state)
    assert info["world_size"] == 2 and info["groups"]["emb"]["sparsity"] == pytest.approx(0.8)
    assert info["scheduler"]["last_epoch"] == 100


def test_docs_plain_torch_script_runs_and_resumes_exactly_with_add_data_before_or_after_ddp(tmp_path):
    text = script("docs/integrations.md", "# train_ddp.py:")
    add_line = next(line for line in text.splitlines(keepends=True) if line.startswith(ADD))
    assert WRAP in text and text.index(add_line) < text.index(WRAP)
    after = text.replace(add_line, "").replace(WRAP, WRAP + add_line)

    (tmp_path / "before").mkdir(); (tmp_path / "after").mkdir()
    straight = _torchrun(tmp_path / "before", text, 100)
    m = re.search(DONE, straight)
    assert m, straight

    first = _torchrun(tmp_path / "after", after, 40)
    assert "step 40: " in first and "step_count 40, last_epoch 40" in first, first
    resumed = _torchrun(tmp_path / "after", after, 100)   # resumes from ckpt/step_000040
    assert f"step 100: level 0.800, zeros 0.800, step_count 100, last_epoch 100, weights {m.group(1)}" in resumed, \
        (straight, resumed)
