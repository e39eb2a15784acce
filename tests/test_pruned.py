"""Pruned tables: the file (kept rows + int32 remap), its checks, and the serving modules
against the masked dense ``nn.EmbeddingBag`` / ``nn.Embedding``."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distsparse
from distsparse import CheckpointError, PrunedEmbedding, PrunedEmbeddingBag, load_pruned_tables, save_pruned_tables
from distsparse.quantization import dequantize_rows, quantize_rows

ROWS, DIM = 97, 12


def _sparsifier(weight: torch.Tensor, level: float = 0.6, block=(1, DIM), name: str = "emb"):
    sp = distsparse.DataNormSparsifier(sparsity_level=level, sparse_block_shape=block)
    sp.add_data(name, nn.Parameter(weight))
    sp.step()
    return sp


def _masked(sp, name="emb") -> torch.Tensor:
    return sp.get_data(name, return_original=False).detach().clone()


def _table(tmp_path, sp, dtype=None, name="emb"):
    path = tmp_path / f"t-{dtype}.safetensors"
    save_pruned_tables(path, sp, dtype=dtype)
    return load_pruned_tables(path)[name], path


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(ROWS, DIM)


# -- the file -------------------------------------------------------------------------------------


def test_fully_pruned_rows_are_dropped_and_partly_pruned_rows_kept_with_their_zeros(tmp_path, weight):
    sp = _sparsifier(weight, level=0.5, block=(1, 4))  # (1, 4) blocks: many rows only partly pruned
    mask = sp.get_mask("emb")
    table, _ = _table(tmp_path, sp)
    kept_rows = mask.any(dim=1)
    assert table.kept == int(kept_rows.sum()) and table.shape == (ROWS, DIM)
    assert table.remap.dtype == torch.int32
    assert torch.equal(table.remap >= 0, kept_rows)
    assert torch.equal(table.weight, _masked(sp)[kept_rows])
    partly = kept_rows & ~mask.all(dim=1)
    assert int(partly.sum()) > 0 and bool((table.weight[table.remap[partly].long()] == 0).any())
    assert torch.equal(table.dense(), _masked(sp))


def test_identical_content_gives_identical_bytes_and_the_metadata_names_the_format(tmp_path, weight):
    sp = _sparsifier(weight)
    save_pruned_tables(tmp_path / "a", sp)
    save_pruned_tables(tmp_path / "b", _sparsifier(weight.clone()))
    blob = (tmp_path / "a").read_bytes()
    assert blob == (tmp_path / "b").read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert header["__metadata__"]["format"] == "distsparse.pruned_tables"
    assert header["__metadata__"]["format_version"] == "1"
    from safetensors.torch import load_file

    plain = load_file(tmp_path / "a")  # a plain safetensors file
    assert set(plain) == {"remap/emb", "weight/emb"}


@pytest.mark.parametrize("dtype,encoding,stored", [
    (None, "float32", torch.float32), (torch.float16, "float16", torch.float16),
    ("bfloat16", "bfloat16", torch.bfloat16), ("int8", "int8", torch.uint8), ("int4", "int4", torch.uint8)])
def test_every_encoding_round_trips(tmp_path, weight, dtype, encoding, stored):
    sp = _sparsifier(weight)
    table, _ = _table(tmp_path, sp, dtype)
    assert table.encoding == encoding and table.weight.dtype == stored
    kept = _masked(sp)[table.remap >= 0]
    if table.bits:
        assert torch.equal(table.weight, quantize_rows(kept, table.bits))
    else:
        assert torch.equal(table.weight, kept.to(stored))


def test_names_selects_tables_and_bad_arguments_raise_naming_them(tmp_path, weight):
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, DIM))
    sp.add_data("a", nn.Parameter(weight.clone()))
    sp.add_data("b.weight", nn.Parameter(weight[:10].clone()))
    sp.step()
    save_pruned_tables(tmp_path / "f", sp, names=["b.weight"])
    assert set(load_pruned_tables(tmp_path / "f")) == {"b.weight"}
    with pytest.raises(ValueError, match="nope"):
        save_pruned_tables(tmp_path / "g", sp, names=["nope"])
    with pytest.raises(ValueError, match="int3"):
        save_pruned_tables(tmp_path / "g", sp, dtype="int3")
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="not a pruned-table encoding"):
        save_pruned_tables(tmp_path / "g", sp, dtype=torch.int32)
    assert sorted(os.listdir(tmp_path)) == ["f"]  # nothing half-written, no temporary left


def test_the_remap_edge_cases_all_pruned_none_pruned_and_the_last_row(tmp_path, weight):
    for level in (1.0, 0.0):
        table, _ = _table(tmp_path, _sparsifier(weight, level=level))
        assert table.kept == (0 if level == 1.0 else ROWS)
        ids = torch.arange(ROWS)
        bag = PrunedEmbeddingBag.from_pruned(table)
        expect = torch.zeros(ROWS, DIM) if level == 1.0 else weight
        assert torch.equal(bag(ids, torch.arange(ROWS)), expect)
    w = weight.clone()
    w[-1] *= 100  # the last row survives, the one before it not
    w[-2] *= 0.001
    table, _ = _table(tmp_path, _sparsifier(w, level=0.5))
    assert int(table.remap[-1]) == table.kept - 1 and int(table.remap[-2]) == -1
    emb = PrunedEmbedding.from_pruned(table)
    assert torch.equal(emb(torch.tensor([ROWS - 1, ROWS - 2])), torch.stack([w[-1], torch.zeros(DIM)]))


def test_nd_and_1d_data_prune_rows_of_their_2d_view(tmp_path):
    torch.manual_seed(1)
    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 5))
    sp.add_data("three", torch.randn(4, 3, 5), replicated=True)
    sp.add_data("one", torch.randn(5), replicated=True)
    sp.step()
    save_pruned_tables(tmp_path / "f", sp)
    tables = load_pruned_tables(tmp_path / "f")
    assert tables["three"].shape == (4, 3, 5) and tables["three"].rows == 12
    assert torch.equal(tables["three"].dense(), _masked(sp, "three").reshape(12, 5))
    assert tables["one"].rows == 1 and tables["one"].kept == 1


# -- damage ---------------------------------------------------------------------------------------


def _header(blob: bytes) -> tuple[int, dict]:
    n = int.from_bytes(blob[:8], "little")
    return n, json.loads(blob[8 : 8 + n])


def test_a_flipped_data_bit_a_truncation_or_another_format_raise_checkpoint_error_naming_it(tmp_path, weight):
    _, path = _table(tmp_path, _sparsifier(weight))
    blob = bytearray(path.read_bytes())
    n, header = _header(bytes(blob))
    start = 8 + n + header["weight/emb"]["data_offsets"][0]
    blob[start + 3] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"'emb'.*'weight/emb'.*sha256"):
        load_pruned_tables(path)
    blob[start + 3] ^= 0x10
    path.write_bytes(bytes(blob[:-5]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_pruned_tables(path)
    distsparse.save_sparse_data(tmp_path / "other", _sparsifier(weight))
    with pytest.raises(CheckpointError, match="not a distsparse pruned tables file"):
        load_pruned_tables(tmp_path / "other")
    with pytest.raises(distsparse.CheckpointNotFoundError):
        load_pruned_tables(tmp_path / "missing")


def test_a_remap_out_of_order_is_refused_even_with_valid_checksums(tmp_path, weight):
    from safetensors.torch import load_file

    from distsparse.file_state import tensor_digest as _tensor_digest
    from distsparse.pruned import _metadata
    from distsparse.safetensors_stream import StreamingSafetensorsWriter

    _, path = _table(tmp_path, _sparsifier(weight))
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # no mmap of a file rewritten below
    remap = tensors["remap/emb"].clone()
    kept = (remap >= 0).nonzero().flatten()
    remap[kept[0]], remap[kept[1]] = remap[kept[1]].clone(), remap[kept[0]].clone()  # swap two kept rows
    tensors["remap/emb"] = remap
    _, header = _header(path.read_bytes())
    tables = json.loads(header["__metadata__"]["state"])["tables"]
    specs = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in ("remap/emb", "weight/emb")]
    meta = _metadata(tables, {k: _tensor_digest(tensors[k]) for k in tensors})
    with open(tmp_path / "tampered", "wb") as f:
        w = StreamingSafetensorsWriter(f, specs, meta)
        for k, _, _ in specs:
            w.write(k, tensors[k])
        w.close(meta)
    with pytest.raises(CheckpointError, match=r"'emb': the remap"):
        load_pruned_tables(tmp_path / "tampered")


# -- serving modules ------------------------------------------------------------------------------


def _bags(n_bags: int = 40, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (n_bags,), generator=g)
    lengths[5] = 0  # an empty bag
    ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)[:-1]])
    weights = torch.rand(ids.numel(), generator=g)
    return ids, offsets, weights


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
def test_bags_equal_the_masked_dense_embedding_bag_exactly(tmp_path, weight, mode, padding_idx):
    sp = _sparsifier(weight)
    table, _ = _table(tmp_path, sp)
    ids, offsets, psw = _bags()
    ids[:4] = 3  # the padding row, pruned or not, in a bag
    ids[-1] = ROWS - 1
    dense = nn.EmbeddingBag.from_pretrained(_masked(sp), mode=mode, padding_idx=padding_idx)
    served = PrunedEmbeddingBag.from_pruned(table, mode=mode, padding_idx=padding_idx)
    # Same vectors (a pruned id: a zero row on both sides), pooled in the same order: bit-equal.
    assert torch.equal(served(ids, offsets), dense(ids, offsets))
    if mode == "sum":
        assert torch.equal(served(ids, offsets, per_sample_weights=psw), dense(ids, offsets, per_sample_weights=psw))
    two_d = ids[:30].reshape(6, 5)
    assert torch.equal(served(two_d), dense(two_d))
    last = torch.cat([offsets, torch.tensor([ids.numel()])])
    inc = PrunedEmbeddingBag.from_pruned(table, mode=mode, padding_idx=padding_idx, include_last_offset=True)
    dense_inc = nn.EmbeddingBag.from_pretrained(_masked(sp), mode=mode, padding_idx=padding_idx,
                                                include_last_offset=True)
    assert torch.equal(inc(ids, last), dense_inc(ids, last))


def test_a_padding_row_that_was_pruned_is_still_skipped_by_mean_bags(tmp_path, weight):
    sp = _sparsifier(weight, level=0.5)
    table, _ = _table(tmp_path, sp)
    pruned = int((table.remap < 0).nonzero()[0])
    ids = torch.tensor([pruned, pruned, 0])
    dense = nn.EmbeddingBag.from_pretrained(_masked(sp), mode="mean", padding_idx=pruned)
    served = PrunedEmbeddingBag.from_pruned(table, mode="mean", padding_idx=pruned)
    assert torch.equal(served(ids, torch.tensor([0])), dense(ids, torch.tensor([0])))
    no_pad = PrunedEmbeddingBag.from_pruned(table, mode="mean")  # counted: (0 + 0 + row 0) / 3
    assert torch.equal(no_pad(ids, torch.tensor([0])),
                       nn.EmbeddingBag.from_pretrained(_masked(sp), mode="mean")(ids, torch.tensor([0])))


def test_embedding_equals_the_masked_dense_embedding(tmp_path, weight):
    sp = _sparsifier(weight)
    table, _ = _table(tmp_path, sp)
    ids = torch.randint(0, ROWS, (5, 7))
    assert torch.equal(PrunedEmbedding.from_pruned(table, padding_idx=2)(ids),
                       nn.Embedding.from_pretrained(_masked(sp), padding_idx=2)(ids))


def test_an_id_out_of_range_raises_index_error_as_nn_embedding_does(tmp_path, weight):
    table, _ = _table(tmp_path, _sparsifier(weight))
    for bad in (ROWS, -1):
        with pytest.raises(IndexError, match="index out of range in self"):
            nn.Embedding.from_pretrained(weight)(torch.tensor([0, bad]))
        with pytest.raises(IndexError, match="index out of range in self"):
            PrunedEmbedding.from_pruned(table)(torch.tensor([0, bad]))
        with pytest.raises(IndexError, match="index out of range in self"):
            PrunedEmbeddingBag.from_pruned(table)(torch.tensor([0, bad]), torch.tensor([0]))


@pytest.mark.parametrize("encoding", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_quantized_bags_equal_the_same_quantization_of_the_dense_masked_table(tmp_path, weight, encoding, mode):
    sp = _sparsifier(weight)
    table, _ = _table(tmp_path, sp, encoding)
    bits = 8 if encoding == "int8" else 4
    masked = _masked(sp)
    dense_q = dequantize_rows(quantize_rows(masked, bits), bits, DIM)  # the dense masked table, quantized
    assert torch.equal(dense_q[table.remap < 0], torch.zeros(int((table.remap < 0).sum()), DIM))
    ids, offsets, psw = _bags()
    ids[:3] = 3
    ref = nn.EmbeddingBag.from_pretrained(dense_q, mode=mode, padding_idx=3)
    served = PrunedEmbeddingBag.from_pruned(table, mode=mode, padding_idx=3)
    assert torch.allclose(served(ids, offsets), ref(ids, offsets), rtol=0, atol=1e-6)
    if mode == "sum":
        assert torch.allclose(served(ids, offsets, per_sample_weights=psw), ref(ids, offsets, per_sample_weights=psw),
                              rtol=0, atol=1e-6)
    # ... and within the quantization error of the unquantized masked table.
    # Each value is off by at most half a step (plus float16 scale/bias rounding); a bag
    # holds at most 6 ids.
    step = (masked.amax(1) - masked.amin(1)).max() / (2**bits - 1)
    exact = nn.EmbeddingBag.from_pretrained(masked, mode=mode, padding_idx=3)(ids, offsets)
    assert (served(ids, offsets) - exact).abs().max() <= (6 if mode == "sum" else 1) * step
    emb = PrunedEmbedding.from_pruned(table)
    assert torch.equal(emb(ids), F.embedding(ids, dense_q))


def test_quantize_rows_matches_fbgemms_reference_arithmetic():
    """FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` (scale/bias last) holds the
    same bytes as ours (scale/bias first)."""
    pytest.importorskip("fbgemm_gpu")
    torch.manual_seed(4)
    x = torch.randn(33, 16) * 3
    x[0] = 0.0  # a constant row
    x[1] = 2.5
    for bits in (8, 4):
        ours = quantize_rows(x, bits)
        theirs = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(x, bits)
        assert torch.equal(ours[:, 4:], theirs[:, :-4]) and torch.equal(ours[:, :4], theirs[:, -4:])


def test_served_bytes_hold_the_kept_rows_and_one_byte_per_row(tmp_path, weight):
    sp = _sparsifier(weight, level=0.8)
    table, _ = _table(tmp_path, sp)
    bag = PrunedEmbeddingBag.from_pruned(table)
    assert bag.served_bytes() == (table.kept + 1) * DIM * 4 + ROWS + -(-ROWS // 128) * 8


@pytest.mark.parametrize("rows,level", [(1000, 0.5), (128 * 3, 0.0), (129, 1.0), (128 * 5 + 1, 0.9)])
def test_the_compact_remap_serves_the_int32_remap_over_many_row_groups(tmp_path, rows, level):
    torch.manual_seed(rows)
    table, _ = _table(tmp_path, _sparsifier(torch.randn(rows, DIM), level=level))
    bag = PrunedEmbeddingBag.from_pruned(table)
    served = bag._remap(torch.arange(rows))
    expect = torch.where(table.remap >= 0, table.remap.long(), torch.full((rows,), table.kept))
    assert torch.equal(served, expect)
