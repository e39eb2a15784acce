"""The sparsity state in a DCP checkpoint (``distsparse.dcp_state``) on real gloo processes: it
saves beside an FSDP2 model and reshards bit-exactly FSDP2(4) → FSDP2(2) → one process, between
replicated groups and FSDP2, through DCP's FileSystemWriter and HuggingFaceStorageWriter
(save_distributed=True), and between two TorchRec plans; a mismatched checkpoint raises on every
rank and changes nothing; the shared-file HuggingFace writer is refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import dcp_fns
import distsparse
from launcher import run_ranks

JOB_TIMEOUT = 180


def _same(a: dict, b: dict) -> None:
    assert sorted(a["masks"]) == sorted(b["masks"])
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    assert a["sparsity"] == b["sparsity"]
    assert a["step_count"] == b["step_count"]
    assert a["configs"] == b["configs"]
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("kind", ["fs", "hf"])
def test_fsdp2_masks_reshard_from_4_to_2_ranks_to_one_process(tmp_path, kind):
    saved = run_ranks(dcp_fns.save, 4, str(tmp_path / "w4"), "fsdp2", kind, timeout=JOB_TIMEOUT)
    assert all(torch.equal(r["masks"]["emb.weight"], saved[0]["masks"]["emb.weight"]) for r in saved)
    assert 0.1 < saved[0]["sparsity"]["emb.weight"] < 0.7  # the masks prune
    two = run_ranks(dcp_fns.load, 2, str(tmp_path / "w4"), "fsdp2", kind, str(tmp_path / "w2"),
                    timeout=JOB_TIMEOUT)
    for res in two:
        _same(res, saved[0])
        assert res["step_after_load"]
    # One process, no process group at all: plain replicated tables.
    sp = dcp_fns._sparsifier(0.1)
    model = dcp_fns._replicated_groups(sp)
    sched = dcp_fns._scheduler(sp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "torch.distributed is ... uninitialized"
        torch.distributed.checkpoint.load({"sparsity": distsparse.dcp_state(sp, sched)},
                                          storage_reader=dcp_fns._reader(str(tmp_path / "w2"), kind))
    _same(dcp_fns._summary(sp, sched), saved[0])
    assert model["emb"].weight.shape == (dcp_fns.ROWS, dcp_fns.COLS)


@pytest.mark.parametrize("src, dst, world_src, world_dst", [("replicated", "fsdp2", 2, 3),
                                                            ("fsdp2", "replicated", 3, 1),
                                                            ("hsdp", "fsdp2", 4, 2)])
def test_masks_move_between_replicated_groups_fsdp2_and_hsdp(tmp_path, src, dst, world_src, world_dst):
    saved = run_ranks(dcp_fns.save, world_src, str(tmp_path / "a"), src, "fs", timeout=JOB_TIMEOUT)
    loaded = run_ranks(dcp_fns.load, world_dst, str(tmp_path / "a"), dst, "fs", None, False, timeout=JOB_TIMEOUT)
    for res in loaded:
        _same(res, saved[0])


@pytest.mark.parametrize("mode, world", [("fsdp2", 2), ("replicated", 2)])
def test_a_mismatched_checkpoint_raises_on_every_rank_and_changes_nothing(tmp_path, mode, world):
    run_ranks(dcp_fns.save, world, str(tmp_path / "a"), mode, "fs", timeout=JOB_TIMEOUT)
    results = run_ranks(dcp_fns.load_refusals, world, str(tmp_path / "a"), mode, timeout=JOB_TIMEOUT)
    for res in results:
        assert res["norm"]["error_type"] == "CheckpointError", res["norm"]
        assert "L1" in res["norm"]["message"] and "L2" in res["norm"]["message"]
        assert res["not_added"]["error_type"] == "CheckpointError", res["not_added"]
        assert "small.weight" in res["not_added"]["message"]
        # Another shape: DCP sizes its buffers from the live groups and refuses first, naming the key.
        assert res["shape"]["error_type"] is not None, res["shape"]
        assert "emb.weight" in res["shape"]["message"]
        assert all(case["unchanged"] for case in res.values()), res


def test_the_shared_file_huggingface_writer_is_refused_on_every_rank(tmp_path):
    results = run_ranks(dcp_fns.save_refused_with_shared_file, 2, str(tmp_path / "hf"), timeout=JOB_TIMEOUT)
    for res in results:
        assert res["error_type"] == "ValueError", res
        assert "save_distributed=True" in res["message"]


def test_torchrec_masks_move_to_another_plan_and_world_size(tmp_path):
    pytest.importorskip("torchrec")
    saved = run_ranks(dcp_fns.torchrec_save, 2, str(tmp_path / "tr"), timeout=240)
    loaded = run_ranks(dcp_fns.torchrec_load, 3, str(tmp_path / "tr"), timeout=240)
    for res in loaded:
        for name in ("rw", "tw", "cw"):
            assert torch.equal(res[name], saved[0][name]), name
        assert res["sparsity"] == saved[0]["sparsity"]
        assert res["config"] == [2, 3]


def test_a_rank_killed_during_a_dcp_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    with pytest.raises(AssertionError) as failed:  # launcher.RankFailure: rank 1's exit code 17
        run_ranks(dcp_fns.save_then_die, 2, str(tmp_path), timeout=JOB_TIMEOUT, grace=5)
    assert "exit code 17" in str(failed.value), str(failed.value)
    assert not (tmp_path / "step_2" / "COMPLETE").exists() and not (tmp_path / "step_2" / ".metadata").exists()
    assert (tmp_path / "step_2").is_dir()  # rank 1's data file may be there: the folder is incomplete
    for res in run_ranks(dcp_fns.resume_newest_complete, 2, str(tmp_path), timeout=JOB_TIMEOUT):
        assert res["folder"] == "step_1" and res["step_count"] == 1
        for name, mask in res["expected_masks"].items():
            assert torch.equal(res["masks"][name], mask), name
