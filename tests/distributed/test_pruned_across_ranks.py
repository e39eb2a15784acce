"""Pruned tables from sharded groups on real gloo processes: the file written by FSDP2 (world 2,
3; HSDP 2x2) and by TorchRec (world 2: row-, table-, column-, table-row-wise) equals the
one-process file of the same tables byte for byte, in every encoding."""

from __future__ import annotations

import pytest

import distsparse
import pruned_fns
from launcher import run_ranks

JOB_TIMEOUT = 240


def _same_files(folder, kind: str, tag: str) -> None:
    for encoding in pruned_fns.ENCODINGS:
        single = (folder / f"{kind}-single-{encoding}.safetensors").read_bytes()
        sharded = (folder / f"{kind}-{tag}{encoding}.safetensors").read_bytes()
        assert sharded == single, (kind, tag, encoding)
        tables = distsparse.load_pruned_tables(folder / f"{kind}-{tag}{encoding}.safetensors")
        assert all(0 < t.kept < t.rows for t in tables.values()), {n: t.kept for n, t in tables.items()}


@pytest.mark.parametrize("mesh_shape", [[2], [3], [2, 2]], ids=["fsdp2-ws2", "fsdp2-ws3", "hsdp-2x2"])
def test_fsdp2_files_equal_the_one_process_file_bit_for_bit(tmp_path, mesh_shape):
    run_ranks(pruned_fns.one_process, 1, str(tmp_path), "fsdp2", timeout=JOB_TIMEOUT)
    world = 1
    for m in mesh_shape:
        world *= m
    results = run_ranks(pruned_fns.fsdp2_pruned, world, str(tmp_path), mesh_shape, 1001, 18, 37,
                        timeout=JOB_TIMEOUT)
    assert [r["world"] for r in results] == [world] * world
    assert sum(r["local_rows"] for r in results) == 1001 * (2 if len(mesh_shape) == 2 else 1)
    _same_files(tmp_path, "fsdp2", "x".join(map(str, mesh_shape)) + "-")


def test_torchrec_files_equal_the_one_process_file_bit_for_bit_column_wise_included(tmp_path):
    run_ranks(pruned_fns.one_process, 1, str(tmp_path), "torchrec", timeout=JOB_TIMEOUT)
    results = run_ranks(pruned_fns.torchrec_pruned, 2, str(tmp_path), 16, timeout=JOB_TIMEOUT)
    assert [r["world"] for r in results] == [2, 2]
    cw = [s for r in results for s in r["shards"]["cw"]]
    assert sorted(s[1] for s in cw) == [0, 4, 8] and all(s[3] == 4 for s in cw)  # rows split across ranks
    _same_files(tmp_path, "torchrec", "")


def test_a_local_group_is_refused_on_every_rank(tmp_path):
    results = run_ranks(pruned_fns.local_group_refused, 2, str(tmp_path), timeout=JOB_TIMEOUT)
    for res in results:
        assert res["error_type"] in ("ValueError", "RemoteError"), res
        assert "'batch'" in res["message"], res
    assert not (tmp_path / "local.safetensors").exists()
