"""save_checkpoint / load_checkpoint on one process: round trips, format, strictness, atomic writes."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import distsparse
from _checkpoint_util import BATCH, EMB, LAYER, ODD, build, snapshot
from distsparse import CheckpointError, DataNormSparsifier, GammaScheduler, load_checkpoint, save_checkpoint
from distsparse.checkpoint import FORMAT, FORMAT_VERSION, CheckpointNotFoundError
from distsparse.masks import packed_size


@pytest.fixture
def saved(tmp_path):
    sp, sch, data = build(steps=3)
    path = tmp_path / "sparsity.safetensors"
    save_checkpoint(path, sp, sch)
    return path, sp, sch


def test_round_trip_restores_masks_bit_for_bit_configs_step_count_and_schedule(saved):
    path, sp, sch = saved
    sp2, sch2, _ = build(seed=1)  # other data: fresh masks differ from the saved ones
    assert snapshot(sp2, sch2) != snapshot(sp, sch)
    load_checkpoint(path, sp2, sch2)
    assert snapshot(sp2, sch2) == snapshot(sp, sch)
    for name in (EMB, LAYER, ODD, BATCH):
        assert torch.equal(sp2.get_mask(name), sp.get_mask(name))
        assert sp2.get_mask(name).dtype == torch.bool
    assert sp2.step_count == 3 and sch2.last_epoch == 3
    assert sp2.data_groups[ODD]["sparse_block_shape"] == (2, 2)


def test_resumed_scheduler_and_sparsifier_continue_exactly_like_the_original(saved):
    path, sp, sch = saved
    sp2, sch2, _ = build(seed=0)
    load_checkpoint(path, sp2, sch2)
    for _ in range(4):
        for s, c in ((sp, sch), (sp2, sch2)):
            s.step()
            c.step()
        assert snapshot(sp2, sch2) == snapshot(sp, sch)


def test_loading_keeps_the_users_tensors_attached(saved):
    path, sp, _ = saved
    sp2, sch2, data = build(seed=0)
    load_checkpoint(path, sp2, sch2)
    sp2.squash_mask()
    assert torch.equal(data[EMB].weight == 0, ~sp.get_mask(EMB))


def test_file_holds_bit_packed_masks_checksums_and_versioned_json_but_not_the_data(saved):
    path, sp, sch = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION == "2"
    assert keys == {f"mask/{EMB}", f"mask/{LAYER}", f"mask/{ODD}", f"local/0/{BATCH}"}
    for key, t in tensors.items():
        assert t.dtype == torch.uint8 and t.dim() == 1
    assert tensors[f"mask/{ODD}"].numel() == packed_size(35) == 5
    state = json.loads(meta["state"])
    assert set(state["checksums"]) == keys
    assert state["world_size"] == 1
    assert state["sparsifier"]["class"] == "DataNormSparsifier" and state["sparsifier"]["step_count"] == 3
    assert state["groups"][EMB] == {"scope": "replicated", "shape": [40, 12],
                                    "config": {"sparsity_level": sp.data_groups[EMB]["sparsity_level"],
                                               "sparse_block_shape": [1, 4], "zeros_per_block": None}}
    assert state["groups"][BATCH]["scope"] == "local" and state["groups"][BATCH]["shapes"] == [[6, 10]]
    assert state["scheduler"] == sch.state_dict()
    # Masks only: about 1 bit per element, far smaller than the float32 data.
    data_bytes = 4 * (40 * 12 + 16 * 8 + 7 * 5 + 6 * 10)
    assert sum(t.numel() for t in tensors.values()) * 30 < data_bytes


def test_pending_groups_are_saved_and_apply_when_added_later(saved, tmp_path):
    path, sp, sch = saved
    sp2, sch2, data = build(seed=5, groups=(EMB, LAYER, ODD))  # the batch comes later
    load_checkpoint(path, sp2, sch2)
    assert BATCH in sp2._pending
    second = tmp_path / "again.safetensors"
    save_checkpoint(second, sp2, sch2)  # pending groups travel on
    sp3, sch3, _ = build(seed=6, groups=(EMB, LAYER, ODD))
    load_checkpoint(second, sp3, sch3)
    sp3.add_data(BATCH, torch.randn(6, 10))
    assert torch.equal(sp3.get_mask(BATCH), sp.get_mask(BATCH))
    assert sp3.data_groups[BATCH] == sp.data_groups[BATCH]


def test_strict_load_refuses_a_checkpoint_lacking_a_group_and_non_strict_keeps_its_mask(saved):
    path, sp, sch = saved
    sp2, sch2, _ = build(seed=1, steps=1)
    sp2.add_data("extra.weight", torch.nn.Parameter(torch.randn(4, 8)))
    sp2.step()
    before = snapshot(sp2, sch2)
    with pytest.raises(CheckpointError, match=r"extra\.weight") as info:
        load_checkpoint(path, sp2, sch2)
    assert str(path) in str(info.value)
    assert snapshot(sp2, sch2) == before
    extra_mask = sp2.get_mask("extra.weight").clone()
    load_checkpoint(path, sp2, sch2, strict=False)
    assert torch.equal(sp2.get_mask("extra.weight"), extra_mask)
    assert torch.equal(sp2.get_mask(EMB), sp.get_mask(EMB))


@pytest.mark.parametrize("strict", [True, False])
def test_a_group_held_with_another_shape_is_refused_in_both_modes(saved, strict):
    path, _, _ = saved
    sp2 = DataNormSparsifier(sparsity_level=0.2)
    sp2.add_data(EMB, torch.nn.Embedding(41, 12))
    before = snapshot(sp2)
    with pytest.raises(CheckpointError, match=r"model\.emb\.weight.*shape"):
        load_checkpoint(path, sp2, strict=strict)
    assert snapshot(sp2) == before


def test_an_invalid_scheduler_state_changes_neither_the_scheduler_nor_the_sparsifier(saved):
    path, _, _ = saved
    sp2, _, _ = build(seed=1, scheduler=False)
    other = GammaScheduler(sp2, gamma=2.0, threshold=0.8)  # saved was a LinearScheduler
    sp2.step()
    other.step()
    before = snapshot(sp2, other)
    with pytest.raises(CheckpointError, match="LinearScheduler"):
        load_checkpoint(path, sp2, other)
    assert snapshot(sp2, other) == before


def test_a_checkpoint_without_scheduler_state_is_refused_when_a_scheduler_is_given(tmp_path):
    sp, _, _ = build(steps=1, scheduler=False)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, sp)
    sp2, sch2, _ = build(seed=1)
    before = snapshot(sp2, sch2)
    with pytest.raises(CheckpointError, match="no scheduler state"):
        load_checkpoint(path, sp2, sch2)
    assert snapshot(sp2, sch2) == before
    load_checkpoint(path, sp2)  # the sparsifier alone loads
    assert snapshot(sp2)["masks"] == snapshot(sp)["masks"]


def test_loading_without_a_scheduler_ignores_the_saved_schedule(saved):
    path, sp, _ = saved
    sp2, sch2, _ = build(seed=1)
    epoch = sch2.last_epoch
    load_checkpoint(path, sp2)
    assert sch2.last_epoch == epoch
    assert snapshot(sp2)["masks"] == snapshot(sp)["masks"]


def test_a_scheduler_of_another_sparsifier_is_refused(tmp_path):
    sp, sch, _ = build()
    other, _, _ = build(scheduler=False)
    with pytest.raises(ValueError, match="another sparsifier"):
        save_checkpoint(tmp_path / "c.safetensors", other, sch)
    assert not list(tmp_path.iterdir())


def test_the_sparsifier_class_must_match(saved):
    path, _, _ = saved

    class OtherSparsifier(DataNormSparsifier):
        pass

    sp2 = OtherSparsifier()
    with pytest.raises(CheckpointError, match="DataNormSparsifier"):
        load_checkpoint(path, sp2)


def test_empty_and_single_element_groups_round_trip(tmp_path):
    sp = DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 1))
    sp.add_data("empty", torch.nn.Parameter(torch.zeros(0, 4)))
    sp.add_data("one", torch.nn.Parameter(torch.ones(1)))
    sp.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, sp)
    sp2 = DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 1))
    sp2.add_data("empty", torch.nn.Parameter(torch.zeros(0, 4)))
    sp2.add_data("one", torch.nn.Parameter(torch.ones(1)))
    load_checkpoint(path, sp2)
    assert sp2.get_mask("empty").shape == (0, 4)
    assert sp2.get_mask("one").tolist() == [False]


def test_saving_replaces_the_previous_file_and_leaves_no_temporary_files(saved):
    path, sp, sch = saved
    sp.step()
    sch.step()
    save_checkpoint(str(path), sp, sch)  # str paths work too
    assert sorted(os.listdir(path.parent)) == [path.name]
    sp2, sch2, _ = build(seed=1)
    load_checkpoint(path, sp2, sch2)
    assert sp2.step_count == 4 and snapshot(sp2, sch2) == snapshot(sp, sch)


def test_stale_temporary_files_of_killed_saves_are_removed_by_the_next_save(saved):
    """A temp file is stale when nobody holds its lock (its writer died, whatever its pid
    or host); a locked one is a live save and stays, even when it carries our own pid."""
    path, sp, sch = saved
    folder = path.parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    stale = folder / f".{path.name}.tmp-{dead.pid}-0123abcd"
    stale.write_bytes(b"half a checkpoint")
    own_stale = folder / f".{path.name}.tmp-{os.getpid()}-01234567"  # an aborted save of ours
    own_stale.write_bytes(b"half")
    live = folder / f".{path.name}.tmp-{os.getpid()}-89abcdef"  # another thread's live save
    live.write_bytes(b"in progress")
    other_target = folder / f".other.safetensors.tmp-{dead.pid}-0123abcd"
    other_target.write_bytes(b"not ours")
    fd = os.open(live, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_checkpoint(path, sp, sch)
        assert not stale.exists() and not own_stale.exists()
        assert live.exists() and other_target.exists()
    finally:
        os.close(fd)
    save_checkpoint(path, sp, sch)  # unlocked now: its writer is gone
    assert not live.exists() and other_target.exists()


def test_a_failed_write_raises_and_leaves_the_previous_checkpoint_whole(saved, monkeypatch):
    path, sp, sch = saved
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    sp.step()
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, sp, sch)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_saving_into_a_missing_folder_says_which_folder(tmp_path):
    sp, sch, _ = build()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "c.safetensors", sp, sch)


def test_a_missing_file_raises_checkpoint_not_found_naming_it(tmp_path):
    sp, sch, _ = build()
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors") as info:
        load_checkpoint(missing, sp, sch)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_public_names_are_exported():
    for name in ("save_checkpoint", "load_checkpoint", "CheckpointError", "register_for_checkpointing"):
        assert name in distsparse.__all__ and hasattr(distsparse, name)


def test_no_pickle_or_torch_load_in_the_checkpoint_code():
    import inspect

    import distsparse.checkpoint as ckpt
    import distsparse.integrations.accelerate as acc

    for module in (ckpt, acc):
        source = inspect.getsource(module)
        assert "import pickle" not in source and "pickle." not in source
        assert "torch.load(" not in source
