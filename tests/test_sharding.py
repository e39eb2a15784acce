"""The layout of DTensor groups and the sharded rows protocol, in one process.

``layout_of`` reads only a DTensor's shape, mesh and placements, so a stand-in object
exercises it without a process group. The sharded protocol (owned rows, row halos, scores,
mask rows, mask halos) is simulated over many virtual shards with arbitrary boundaries —
empty shards and shards thinner than a block included — and the concatenated mask must be
the single-process mask bit for bit."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from distsparse import DataNormSparsifier
from distsparse.masks import norm_block_mask, pack_bits
from distsparse.distributed.selection import ShardSelection, blocks_to_prune
from distsparse.distributed.sharding import ShardedRows, ShardLayout, layout_of, owned_rows


def _fake_dtensor(shape, mesh_shape, placements, mesh_ranks=None):
    n = 1
    for m in mesh_shape:
        n *= m
    ranks = torch.arange(n) if mesh_ranks is None else torch.tensor(mesh_ranks)
    mesh = SimpleNamespace(ndim=len(mesh_shape), shape=tuple(mesh_shape), mesh=ranks.reshape(mesh_shape))
    return SimpleNamespace(device_mesh=mesh, placements=tuple(placements), shape=torch.Size(shape))


# -- layout_of ---------------------------------------------------------------------------


def test_uneven_fsdp2_chunks_give_each_ranks_rows_of_the_2d_view():
    lay = layout_of("emb", _fake_dtensor((1001, 64), (2,), [Shard(0)]), [0, 1], 1)
    assert lay.sharded and lay.shard_rows == ((0, 501), (501, 1001))
    assert lay.row_range == (501, 1001) and lay.local_shape == (500, 64) and lay.dim0_offset == 501
    assert lay.contributes and lay.source == (0, 1)


def test_a_3d_tensor_counts_rows_of_the_flattened_leading_dims_and_trailing_shards_may_be_empty():
    lay = layout_of("t", _fake_dtensor((7, 3, 10), (3,), [Shard(0)]), [0, 1, 2], 2)
    assert lay.shard_rows == ((0, 9), (9, 18), (18, 21)) and lay.local_shape == (1, 3, 10)
    assert lay.dim0_offset == 6
    tiny = layout_of("t", _fake_dtensor((5, 4), (4,), [Shard(0)]), [0, 1, 2, 3], 3)
    assert tiny.shard_rows == ((0, 2), (2, 4), (4, 5), (5, 5)) and tiny.local_shape == (0, 4)


def test_hsdp_replicas_share_a_shard_and_only_replicate_coordinate_0_contributes():
    data = _fake_dtensor((10, 4), (2, 2), [Replicate(), Shard(0)])
    layouts = [layout_of("t", data, [0, 1, 2, 3], r) for r in range(4)]
    assert layouts[0].rank_shard == (0, 1, 0, 1) and layouts[0].source == (0, 1)
    assert [lay.contributes for lay in layouts] == [True, True, False, False]
    assert layouts[3].row_range == (5, 10)


def test_a_sparsifier_group_in_another_rank_order_maps_ranks_through_global_ranks():
    data = _fake_dtensor((10, 4), (2,), [Shard(0)], mesh_ranks=[5, 3])
    lay = layout_of("t", data, [3, 5], 0)  # group rank 0 is global rank 3: mesh coordinate 1
    assert lay.rank_shard == (1, 0) and lay.row_range == (5, 10) and lay.source == (1, 0)


def test_replicate_is_one_whole_shard():
    lay = layout_of("t", _fake_dtensor((6, 4), (3,), [Replicate()]), [0, 1, 2], 1)
    assert not lay.sharded and lay.row_range == (0, 6) and lay.local_shape == (6, 4)


@pytest.mark.parametrize("shape, mesh, placements", [
    ((10, 8), (2,), [Shard(1)]),
    ((10, 8), (2,), [Partial()]),
    ((16,), (2,), [Shard(0)]),
    ((10, 8), (2, 1), [Shard(0), Replicate()]),
    ((10, 8), (2, 1), [Replicate(), Replicate()]),
], ids=["shard1", "partial", "one-dim", "shard-then-replicate", "2d-replicate"])
def test_unsupported_placements_are_a_type_error_naming_group_placement_and_what_is_supported(shape, mesh,
                                                                                             placements):
    with pytest.raises(TypeError, match=r"group 'emb\.weight'.*not supported; supported:.*Shard\(dim=0\)"):
        layout_of("emb.weight", _fake_dtensor(shape, mesh, placements), list(range(2)), 0)


def test_a_mesh_over_other_ranks_than_the_sparsifiers_group_is_a_value_error():
    with pytest.raises(ValueError, match=r"group 't'.*mesh holds global ranks \[0, 1, 2\].*holds \[0, 1\]"):
        layout_of("t", _fake_dtensor((10, 8), (3,), [Shard(0)]), [0, 1], 0)


def test_owned_rows_start_at_the_first_block_starting_inside_the_shard():
    assert owned_rows(0, 501, 1001, 2) == (0, 502)
    assert owned_rows(501, 1001, 1001, 2) == (502, 1001)
    assert owned_rows(1, 2, 10, 4) == (4, 4)  # no block starts here
    assert owned_rows(5, 5, 5, 3) == (5, 5)


# -- the sharded protocol over virtual shards ------------------------------------------------


def _layouts(rows, cols, bounds):
    spans = tuple(zip(bounds, bounds[1:]))
    n = len(spans)
    return [ShardLayout(global_shape=(rows, cols), placements=("Shard(dim=0)",), mesh_shape=(n,), sharded=True,
                        rows=rows, cols=cols, shard_rows=spans, rank_shard=tuple(range(n)), source=tuple(range(n)),
                        rank=r, local_shape=(spans[r][1] - spans[r][0], cols)) for r in range(n)]


def _simulate(data, bounds, block, level, zeros):
    """Every virtual rank's part of one sharded step, the collectives replaced by lists/sums."""
    rows, cols = data.shape
    sp = DataNormSparsifier()
    config = {"sparsity_level": level, "sparse_block_shape": block, "zeros_per_block": zeros}
    layouts = _layouts(rows, cols, bounds)
    views = [ShardedRows(lay, data[lay.row_range[0]:lay.row_range[1]], block) for lay in layouts]
    if layouts[0].needs_halo(block[0]):
        halos = [v.first_rows_bytes() for v in views]
        assert len({h.numel() for h in halos}) == 1  # one size: no size exchange needed
        for v in views:
            v.take_halo(halos)
    n_blocks = -(-rows // block[0]) * -(-cols // block[1])
    k = blocks_to_prune(level, n_blocks)
    sels = [ShardSelection(v.scores(sp, "t", config), n_blocks, k, 8) for v in views]
    while not all(s.done for s in sels):
        total = torch.stack([s.histogram() for s in sels]).sum(0) if not sels[0].done else None
        for s in sels:
            s.advance(total)
    ties = [s.local_ties() if s.needs_tie_prefix else 0 for s in sels]
    outs = [torch.empty(lay.local_shape, dtype=torch.bool) for lay in layouts]
    sent = []
    for r, (v, s) in enumerate(zip(views, sels)):
        rows_out = v.build_mask(sp, "t", config, s.pruned(sum(ties[:r])), outs[r])
        packed = pack_bits(rows_out) if rows_out is not None and rows_out.numel() else torch.zeros(0, dtype=torch.uint8)
        sent.append(torch.cat([packed, torch.zeros(v.mask_halo_nbytes - packed.numel(), dtype=torch.uint8)]))
    for v, out in zip(views, outs):
        v.take_mask_halo(sent, out)
    return torch.cat(outs)


def _bounds(rows, n, rng):
    cuts = sorted(rng.randint(0, rows) for _ in range(n - 1))
    return [0, *cuts, rows]


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5), (4, 3)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("kind", ["random", "few_values", "constant"])
def test_virtual_shards_with_any_boundaries_give_the_single_process_mask(block, kind):
    rng = random.Random(hash((block, kind)) % 1000)
    gen = torch.Generator().manual_seed(3)
    for rows, n, level, zeros in itertools.product((1, 7, 23), (1, 2, 3, 7), (0.0, 0.3, 0.5, 1.0), (None, 1)):
        cols = 9
        data = {"random": torch.randn(rows, cols, generator=gen),
                "few_values": torch.randint(1, 4, (rows, cols), generator=gen).float(),
                "constant": torch.full((rows, cols), 2.0)}[kind]
        bounds = _bounds(rows, n, rng)
        mask = _simulate(data, bounds, block, level, zeros)
        zeros_n = block[0] * block[1] if zeros is None else zeros
        expected = norm_block_mask(data, level, block, zeros_n, "L1")
        assert torch.equal(mask, expected), (rows, bounds, level, zeros)


def test_selection_digit_bits_accepts_none_8_11_16_and_refuses_other_values():
    sp = DataNormSparsifier()
    assert sp.selection_digit_bits is None
    for bits in (8, 11, 16, None):
        sp.selection_digit_bits = bits
        assert sp.selection_digit_bits == bits
    for bad in (12, 0, True, "11"):
        with pytest.raises(ValueError, match="selection_digit_bits must be None or one of"):
            sp.selection_digit_bits = bad


# -- tables sharded in rectangles (TorchRec layouts), in one process ------------------------------


from distsparse.distributed.rects import RectShards, layout_from_gathered  # noqa: E402


def test_owned_regions_reach_into_the_rectangles_below_and_to_the_right():
    # 10 x 10 in four rectangles cut at row 5 and column 6, blocks (2, 4)
    lay = layout_from_gathered("t", (10, 10), [[[0, 0, 5, 6], [5, 6, 5, 4]], [[0, 6, 5, 4], [5, 0, 5, 6]]], 1)
    assert [(r.row, r.col, r.holder) for r in lay.rects] == [(0, 0, 0), (5, 6, 0), (0, 6, 1), (5, 0, 1)]
    assert lay.owned(0, (2, 4)) == (0, 6, 0, 8)  # one block row and the block column straddle
    assert lay.owned(2, (2, 4)) == (0, 6, 8, 10)
    assert lay.owned(1, (2, 4)) == (6, 10, 8, 10) and lay.owned(3, (2, 4)) == (6, 10, 0, 8)
    assert lay.pieces((2, 4)) == [(0, 1, (5, 6, 6, 8)), (0, 2, (0, 5, 6, 8)), (0, 3, (5, 6, 0, 6)),
                                  (2, 1, (5, 6, 8, 10)), (3, 1, (6, 10, 6, 8))]
    assert lay.mine() == [2, 3] and not lay.row_ordered
    assert layout_from_gathered("t", (10, 4), [[[5, 0, 5, 4]], [[0, 0, 5, 4]]], 0).row_ordered


@pytest.mark.parametrize("per_rank, message", [
    ([[[0, 0, 6, 4]], [[5, 0, 5, 4]]], "shards overlap"),
    ([[[0, 0, 4, 4]], [[5, 0, 5, 4]]], "cover 36 of the table's 40 elements"),
    ([[[0, 0, 5, 4]], [[5, 1, 5, 4]]], "lies outside"),
])
def test_rectangles_that_do_not_tile_the_table_are_a_value_error_naming_the_group(per_rank, message):
    with pytest.raises(ValueError, match=rf"group 'emb\.t'.*{message}"):
        layout_from_gathered("emb.t", (10, 4), per_rank, 0)


def _rect_groups(data, cuts_r, cuts_c):
    return [((r0, c0), data[r0:r1, c0:c1]) for r0, r1 in zip(cuts_r, cuts_r[1:]) for c0, c1 in zip(cuts_c, cuts_c[1:])]


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("kind", ["random", "few_values"])
def test_one_process_holding_every_rectangle_gets_the_single_process_mask(block, kind):
    gen = torch.Generator().manual_seed(1)
    for rows, cols in ((23, 19), (7, 5), (1, 9)):
        data = torch.randn(rows, cols, generator=gen) if kind == "random" else \
            torch.randint(1, 4, (rows, cols), generator=gen).float()
        shards = _rect_groups(data, [0, rows // 3, rows // 3 + 1, rows], [0, 2, cols // 2 + 1, cols])
        for level, zeros in ((0.5, None), (0.37, 1), (1.0, None)):
            sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros)
            masked = sp.add_data("t", RectShards((rows, cols), shards[::-1]))
            assert isinstance(masked, RectShards)
            sp.step()
            whole = torch.empty(rows, cols, dtype=torch.bool)
            for (r, c), m in sp.get_mask("t").local_shards():
                assert m.dtype == torch.bool
                whole[r : r + m.shape[0], c : c + m.shape[1]] = m
            expected = norm_block_mask(data, level, block, block[0] * block[1] if zeros is None else zeros, "L1")
            assert torch.equal(whole, expected), (rows, cols, level)
            assert sp.sparsity("t")["t"] == 1.0 - int(expected.sum()) / expected.numel()


# A one-row rectangle is a one-row slice of a wider mask: "contiguous" whatever its row stride.
ONE_ROW_LAYOUTS = {
    "1x9 cut at column 5": ((1, 9), [0, 1], [0, 5, 9]),
    "8x9 with its bottom row cut at column 5": ((8, 9), [0, 7, 8], [0, 5, 9]),
}


@pytest.mark.parametrize("layout", ONE_ROW_LAYOUTS, ids=list(ONE_ROW_LAYOUTS))
@pytest.mark.parametrize("block", [(1, 4), (1, 2), (1, 8), (2, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_one_row_rectangles_of_a_wider_table_get_the_single_process_mask(layout, block):
    (rows, cols), cuts_r, cuts_c = ONE_ROW_LAYOUTS[layout]
    data = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2))
    shards = _rect_groups(data, cuts_r, cuts_c)
    if rows == 8:  # the top 7 rows stay one rectangle
        shards = [((0, 0), data[:7])] + [s for s in shards if s[0][0] == 7]
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=block)
    sp.add_data("t", RectShards((rows, cols), shards))
    sp.step()
    whole = torch.empty(rows, cols, dtype=torch.bool)
    for (r, c), m in sp.get_mask("t").local_shards():
        whole[r : r + m.shape[0], c : c + m.shape[1]] = m
    assert torch.equal(whole, norm_block_mask(data, 0.5, block, block[0] * block[1], "L1"))


def test_squash_writes_into_the_shards_and_checkpoints_hold_the_whole_mask(tmp_path):
    import distsparse

    data = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    table = data.clone()
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 3))
    sp.add_data("t", RectShards((12, 8), _rect_groups(table, [0, 5, 12], [0, 3, 8])))
    sp.step()
    sp.squash_mask()
    expected = norm_block_mask(data, 0.5, (2, 3), 6, "L1")
    assert torch.equal(table, torch.where(expected, data, 0.0))  # the shards are views of `table`
    distsparse.save_checkpoint(tmp_path / "c.safetensors", sp)
    plain = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(2, 3))
    plain.add_data("t", torch.nn.Parameter(torch.ones(12, 8)))
    distsparse.load_checkpoint(tmp_path / "c.safetensors", plain)
    assert torch.equal(plain.get_mask("t"), expected)
    # and back into other rectangles (state restored as pending until added)
    other = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(2, 3))
    distsparse.load_checkpoint(tmp_path / "c.safetensors", other, strict=False)
    other.add_data("t", RectShards((12, 8), _rect_groups(torch.ones(12, 8), [0, 12], [0, 1, 8])))
    got = dict(other.get_mask("t").local_shards())
    assert torch.equal(got[(0, 0)], expected[:, :1]) and torch.equal(got[(0, 1)], expected[:, 1:])
    assert other.sparsity("t")["t"] == 1.0 - int(expected.sum()) / expected.numel()
    # a state_dict of this rank's shards loads only into the same shards
    with pytest.raises(ValueError, match=r"group 't'.*load a checkpoint file"):
        plain.load_state_dict(sp.state_dict())


def test_rect_shards_refuse_bad_shapes_and_offsets():
    with pytest.raises(ValueError, match="must be 2-D"):
        RectShards((3, 4, 5), [])
    with pytest.raises(ValueError, match="lies outside"):
        RectShards((3, 4), [((2, 0), torch.zeros(2, 4))])
    sp = DataNormSparsifier()
    with pytest.raises(ValueError, match=r"group 't'.*replicated=False"):
        sp.add_data("t", RectShards((3, 4), [((0, 0), torch.zeros(3, 4))]), replicated=False)
    with pytest.raises(TypeError, match=r"group 't'.*floating-point"):
        sp.add_data("t", RectShards((3, 4), [((0, 0), torch.zeros(3, 4, dtype=torch.int64))]))
