"""FBGEMM's inference TBE built from pruned tables (CPU, fbgemm-gpu-cpu) against the masked
dense ``nn.EmbeddingBag``."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import distsparse
from distsparse.quantization import dequantize_rows, quantize_rows

pytest.importorskip("fbgemm_gpu")

from distsparse.integrations.fbgemm import build_inference_tbe, tbe_table_order  # noqa: E402

SHAPES = {"a": (97, 16), "b.weight": (40, 8)}


@pytest.fixture(scope="module")
def sparsifier():
    torch.manual_seed(0)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4))
    for name, shape in SHAPES.items():
        sp.add_data(name, nn.Parameter(torch.randn(*shape)))
    sp.step()
    return sp


def _batch(batch: int = 16, seed: int = 1):
    """FBGEMM's flat (indices, offsets) over the tables in order, plus each table's own bags."""
    g = torch.Generator().manual_seed(seed)
    per_table, flat, lengths = {}, [], []
    for name in tbe_table_order(SHAPES):
        rows = SHAPES[name][0]
        lens = torch.randint(0, 6, (batch,), generator=g)
        lens[2] = 0  # an empty bag
        ids = torch.randint(0, rows, (int(lens.sum()),), generator=g)
        ids[:1] = rows - 1
        per_table[name] = (ids, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)[:-1]]))
        flat.append(ids)
        lengths.append(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.cat(lengths), 0)])
    return torch.cat(flat).int(), offsets.int(), per_table


def _reference(sp, per_table, encoding, mode="sum"):
    outs = []
    for name in tbe_table_order(SHAPES):
        masked = sp.get_data(name, return_original=False).detach()
        if encoding in ("int8", "int4"):
            bits = 8 if encoding == "int8" else 4
            masked = dequantize_rows(quantize_rows(masked, bits), bits, masked.shape[1])
        elif encoding == "float16":
            masked = masked.half().float()
        outs.append(nn.EmbeddingBag.from_pretrained(masked, mode=mode)(*per_table[name]))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("encoding", [None, "float16", "int8", "int4"])
def test_the_tbe_equals_the_masked_dense_embedding_bag(tmp_path, sparsifier, encoding, mode):
    distsparse.save_pruned_tables(tmp_path / "t", sparsifier, dtype=encoding)
    tables = distsparse.load_pruned_tables(tmp_path / "t")
    tbe = build_inference_tbe(tables, pooling=mode)
    indices, offsets, per_table = _batch()
    out = tbe(indices, offsets)
    ref = _reference(sparsifier, per_table, encoding, mode)  # a pruned id counts in a mean bag here too
    assert out.shape == ref.shape and out.dtype == torch.float32
    # float32 rows: FBGEMM's kernel sums in another order (vectorised); quantized rows:
    # it dequantizes with fused multiply-adds. Both stay within float32 rounding.
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert (tbe(indices, offsets) != 0).any()


def test_weighted_tbe_bags_equal_weighted_masked_dense_bags(tmp_path, sparsifier):
    distsparse.save_pruned_tables(tmp_path / "t", sparsifier)
    tbe = build_inference_tbe(distsparse.load_pruned_tables(tmp_path / "t"), pooling="sum")
    indices, offsets, per_table = _batch()
    weights = torch.rand(indices.numel(), generator=torch.Generator().manual_seed(7))
    outs, at = [], 0
    for name in tbe_table_order(SHAPES):
        ids, offs = per_table[name]
        masked = sparsifier.get_data(name, return_original=False).detach()
        w = weights[at : at + ids.numel()]
        at += ids.numel()
        outs.append(nn.EmbeddingBag.from_pretrained(masked, mode="sum")(ids, offs, per_sample_weights=w))
    assert torch.allclose(tbe(indices, offsets, per_sample_weights=weights), torch.cat(outs, dim=1),
                          rtol=1e-5, atol=1e-5)


def test_a_fully_pruned_table_serves_zeros_and_bad_requests_are_refused(tmp_path):
    sp = distsparse.DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 8))
    sp.add_data("z", nn.Parameter(torch.randn(10, 8)))
    sp.step()
    distsparse.save_pruned_tables(tmp_path / "z", sp)
    tables = distsparse.load_pruned_tables(tmp_path / "z")
    tbe = build_inference_tbe(tables)
    out = tbe(torch.tensor([1, 9, 3], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32))
    assert torch.equal(out, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="max"):
        build_inference_tbe(tables, pooling="max")
    distsparse.save_pruned_tables(tmp_path / "bf", sp, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'z'.*bfloat16"):
        build_inference_tbe(distsparse.load_pruned_tables(tmp_path / "bf"))


def test_the_core_never_imports_fbgemm():
    import subprocess

    code = ("import sys, distsparse, torch; from torch import nn; "
            "assert not any(m.startswith('fbgemm_gpu') for m in sys.modules), 'fbgemm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
