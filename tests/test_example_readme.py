"""The README's "Use" script runs as printed, under torchrun with 2 gloo ranks.

* straight to step 100 with `add_data` before the DDP wrapping, as printed;
* the same script with `add_data` moved after the wrapping, stopped at step 40 and resumed
  to step 100 by a second launch: the same embedding weights bit for bit, and the
  restored counters continue (step_count 100, last_epoch 100).
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a hang guard per launch, not a speed target (each takes ~5-10 s, minutes at load 30)
ADD = 'sparsifier.add_data("emb", net.emb)'
WRAP = "model = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net\n"


def _readme_script() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith("# train.py:")]
    assert len(found) == 1, "the README's Use section has one block starting with '# train.py:'"
    return found[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(folder: Path, script: str, steps: int) -> str:
    (folder / "train.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "train.py", str(steps)]
    try:
        r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT}s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def test_readme_script_runs_and_resumes_exactly_with_add_data_before_or_after_ddp(tmp_path):
    script = _readme_script()
    add_line = next(line for line in script.splitlines(keepends=True) if line.startswith(ADD))
    assert WRAP in script and script.index(add_line) < script.index(WRAP)
    after = script.replace(add_line, "").replace(WRAP, WRAP + add_line)

    (tmp_path / "before").mkdir(); (tmp_path / "after").mkdir()
    straight = _torchrun(tmp_path / "before", script, 100)
    m = re.search(r"step 100: level 0\.800, zeros 0\.800, step_count 100, last_epoch 100, weights (\w+)", straight)
    assert m, straight

    first = _torchrun(tmp_path / "after", after, 40)
    assert "step 40: " in first and "step_count 40, last_epoch 40" in first, first
    resumed = _torchrun(tmp_path / "after", after, 100)   # resumes from ckpt/step_000040
    assert f"step 100: level 0.800, zeros 0.800, step_count 100, last_epoch 100, weights {m.group(1)}" in resumed, \
        (straight, resumed)
