"""save_sparse_data of FSDP2 and TorchRec tables on 2 gloo ranks: each rank writes its own
rows, rank 0 an index; the export loads in one process bit-exactly (equal to a one-process
export of the same data), by row range for another world size, and identical content gives
identical files."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import distsparse
import export_shards_fns
from distsparse.checkpoint import CheckpointError, CheckpointNotFoundError
from distsparse.export import load_sparse_data, save_sparse_data
from launcher import run_ranks

JOB_TIMEOUT = 240


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def _one_process_export(tables: dict, folder) -> dict:
    """The same masked data exported by a one-process sparsifier (level 0: nothing more is pruned)."""
    sp = distsparse.DataNormSparsifier(sparsity_level=0.0, sparse_block_shape=(1, 1))
    for name, value in tables.items():
        sp.add_data(name, nn.Parameter(value.clone()))
    path = os.path.join(folder, "one_process.safetensors")
    save_sparse_data(path, sp)
    return load_sparse_data(path)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp2_export")
    return folder, run_ranks(export_shards_fns.fsdp2_export, 2, str(folder), timeout=JOB_TIMEOUT)


@pytest.fixture(scope="module")
def torchrec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchrec_export")
    return folder, run_ranks(export_shards_fns.torchrec_export, 2, str(folder), timeout=JOB_TIMEOUT)


@pytest.mark.parametrize("case", ["fsdp2", "torchrec"])
def test_a_sharded_export_loads_in_one_process_equal_to_the_one_process_export(case, request, tmp_path):
    folder, results = request.getfixturevalue(case)
    tables = results[0]["tables"]
    loaded = load_sparse_data(results[0]["path"])
    assert sorted(loaded) == sorted(tables)
    reference = _one_process_export(tables, tmp_path)
    for name, want in tables.items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(want)), name
        assert torch.equal(_bits(loaded[name]), _bits(reference[name])), name


@pytest.mark.parametrize("case", ["fsdp2", "torchrec"])
def test_every_rank_writes_its_own_part_and_identical_content_gives_identical_files(case, request):
    folder, results = request.getfixturevalue(case)
    files = results[0]["first"]
    parts = [f for f in files if f != "sparse.safetensors"]
    assert len(parts) == 2 and sorted(p.split(".")[2][:5] for p in parts) == ["00000", "00001"], files
    for res in results:
        assert res["first"] == res["second"] == files  # same names, same bytes, nothing left over


def test_each_fsdp2_part_holds_only_its_ranks_rows(fsdp2):
    folder, results = fsdp2
    parts = sorted(f for f in results[0]["first"] if f != "sparse.safetensors")
    for rank, part in enumerate(parts):
        pieces = load_sparse_data(folder / part)  # a part is itself a sparse data file
        emb = [k for k in pieces if k.startswith("emb.weight@")]
        assert len(emb) == 1 and pieces[emb[0]].shape[0] == results[rank]["local_rows"], sorted(pieces)
        assert ("plain@0,0" in pieces) == (rank == 0)


def test_row_ranges_load_for_another_world_size_reading_only_the_parts_that_hold_them(fsdp2, tmp_path):
    folder, results = fsdp2
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    whole = results[0]["tables"]["emb.weight"]
    cuts = [0, 334, 668, 1001]  # three ranks
    pieces = [load_sparse_data(copy / "sparse.safetensors", rows=(a, b)) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(_bits(torch.cat([p["emb.weight"] for p in pieces])), _bits(whole))
    small = results[0]["tables"]["small.weight"]  # 13 rows: the ranges clip like slices
    assert torch.equal(_bits(torch.cat([p["small.weight"] for p in pieces])), _bits(small))
    (copy / sorted(f for f in results[0]["first"] if f.endswith(".safetensors") and ".00001-" in f)[0]).unlink()
    first_rows = load_sparse_data(copy / "sparse.safetensors", names=["emb.weight"], rows=(0, 300))  # rank 0's
    assert torch.equal(_bits(first_rows["emb.weight"]), _bits(whole[:300]))
    with pytest.raises(CheckpointNotFoundError, match="00001-"):
        load_sparse_data(copy / "sparse.safetensors")


def test_a_part_from_another_export_is_refused_naming_it(fsdp2, tmp_path):
    folder, results = fsdp2
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    parts = sorted(f for f in results[0]["first"] if f != "sparse.safetensors")
    shutil.copy(copy / parts[0], copy / parts[1])  # rank 1's part replaced by rank 0's
    with pytest.raises(CheckpointError, match="not the part this index names"):
        load_sparse_data(copy / "sparse.safetensors")
