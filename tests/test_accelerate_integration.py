"""register_for_checkpointing: accelerate's save_state/load_state carry the sparsity state,
on one process and on two gloo ranks started by ``accelerate launch --multi_gpu``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _checkpoint_util import build, snapshot
from fake_accelerator import FakeAccelerator
from distsparse import register_for_checkpointing

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB = HERE / "_accelerate_job.py"
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(done: subprocess.CompletedProcess, folder: Path, ranks: int) -> list[dict]:
    files = [folder / f"result-{r}.json" for r in range(ranks)]
    assert done.returncode == 0 and all(f.exists() for f in files), \
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [json.loads(f.read_text()) for f in files]


def _launch(tmp_path: Path, *extra: str) -> list[dict]:
    if ACCELERATE is None:
        pytest.skip("the accelerate CLI is not installed")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(JOB), "--folder", str(tmp_path), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180, cwd=REPO)
    return _results(done, tmp_path, 2)


# -- fast, in-process -------------------------------------------------------------------

def test_hooks_save_into_and_load_from_the_state_folder_and_can_be_removed(tmp_path):
    sp, sch, _ = build(steps=2)
    acc = FakeAccelerator()
    save_handle, load_handle = register_for_checkpointing(acc, sp, sch, filename="sparsity.safetensors")
    acc.save_state(str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path / "ckpt") == ["sparsity.safetensors"]
    saved = snapshot(sp, sch)
    sp.step()
    sch.step()
    assert snapshot(sp, sch) != saved
    acc.load_state(str(tmp_path / "ckpt"))
    assert snapshot(sp, sch) == saved
    save_handle.remove()
    load_handle.remove()
    acc.save_state(str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == []


def test_loading_a_folder_without_the_sparsity_file_names_the_file(tmp_path):
    from distsparse.checkpoint import CheckpointNotFoundError

    sp, sch, _ = build()
    acc = FakeAccelerator()
    register_for_checkpointing(acc, sp, sch)
    with pytest.raises(CheckpointNotFoundError, match="distsparse_state.safetensors"):
        acc.load_state(str(tmp_path))


@pytest.mark.parametrize("filename", ["custom_checkpoint_0.pkl", "sub/x.safetensors", "", ".."])
def test_file_names_that_collide_or_leave_the_folder_are_refused(filename):
    sp, sch, _ = build()
    with pytest.raises(ValueError, match="filename"):
        register_for_checkpointing(FakeAccelerator(), sp, sch, filename=filename)


def test_a_process_count_mismatch_says_to_pass_cpu_true():
    sp, sch, _ = build()
    with pytest.raises(RuntimeError, match=r"Accelerator\(cpu=True\).*--multi_gpu"):
        register_for_checkpointing(FakeAccelerator(num_processes=2), sp, sch)


def test_an_object_without_state_hooks_is_refused():
    sp, sch, _ = build()
    with pytest.raises(TypeError, match="register_save_state_pre_hook"):
        register_for_checkpointing(object(), sp, sch)


def test_importing_distsparse_does_not_import_accelerate_or_safetensors():
    code = "import sys, distsparse; print('accelerate' in sys.modules, 'safetensors' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


# -- real accelerate ----------------------------------------------------------------------

def test_single_process_accelerator_save_state_and_load_state_restore_masks_and_schedule(tmp_path):
    done = subprocess.run([sys.executable, str(JOB), "--folder", str(tmp_path), "--expect-world", "1"],
                          capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO)
    (result,) = _results(done, tmp_path, 1)
    assert result["world"] == 1 and result["moved"] and result["restored"]
    assert "distsparse_state.safetensors" in result["files"]
    assert not [f for f in result["files"] if f.startswith("custom_checkpoint")]
    assert "distsparse_state.safetensors" not in result["unhooked_files"]


def test_two_ranks_under_accelerate_launch_multi_gpu_restore_every_ranks_own_state(tmp_path):
    results = _launch(tmp_path, "--expect-world", "2")
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["moved"] and r["restored"] for r in results)
    # One file, written once, visible to every rank when save_state returns.
    assert all("distsparse_state.safetensors" in r["files"] for r in results)
    assert not [f for f in os.listdir(tmp_path / "step3") if f.startswith("custom_checkpoint")]
    assert [f for f in os.listdir(tmp_path / "step3") if "distsparse" in f] == ["distsparse_state.safetensors"]
    # The replicated table's mask is shared; the per-rank batch masks are each rank's own.
    assert results[0]["table_mask"] == results[1]["table_mask"]
    assert results[0]["batch_mask"] != results[1]["batch_mask"]


def test_accelerate_launch_without_cpu_true_is_detected_on_every_rank(tmp_path):
    results = _launch(tmp_path, "--no-cpu")
    assert len(results) == 2
    for r in results:
        assert r["mismatch"] and "Accelerator(cpu=True)" in r["mismatch"]


def test_two_sparsifiers_with_one_file_name_are_refused_and_a_removed_registration_frees_it(tmp_path):
    first, _, _ = build(steps=1)
    second, _, _ = build(seed=1, steps=1)
    acc = FakeAccelerator()
    handles = register_for_checkpointing(acc, first)
    with pytest.raises(ValueError, match="'distsparse_state.safetensors' is already used by another sparsifier"):
        register_for_checkpointing(acc, second)
    register_for_checkpointing(acc, second, filename="second.safetensors")  # a distinct name is fine
    with pytest.raises(ValueError, match="already registered on this accelerator"):
        register_for_checkpointing(acc, first, filename="again.safetensors")  # same sparsifier twice
    acc.save_state(str(tmp_path / "s"))
    assert sorted(os.listdir(tmp_path / "s")) == ["distsparse_state.safetensors", "second.safetensors"]
    for h in handles:
        h.remove()
    third, _, _ = build(seed=2)
    register_for_checkpointing(acc, third)  # the default name is free again
    register_for_checkpointing(FakeAccelerator(), first)  # another accelerator has its own registry


def test_the_default_file_name_is_the_old_one_for_the_whole_world():
    from distsparse.integrations.accelerate import DEFAULT_FILENAME, default_filename

    sp, _, _ = build()
    assert default_filename(sp) == DEFAULT_FILENAME == "distsparse_state.safetensors"
