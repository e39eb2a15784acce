"""Mask semantics of DataNormSparsifier that hold on any data, ties included (DESIGN.md, Masks)."""

from __future__ import annotations

import math

import pytest
import torch

from distsparse import DataNormSparsifier
from distsparse import masks
from distsparse.masks import pack_bits, packed_size, unpack_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def mask_of(data, **config):
    sp = DataNormSparsifier(**config)
    sp.add_data("x", data)
    sp.step()
    return sp.get_mask("x")


def pruned_blocks(mask2d, block):
    """Bool tensor (block rows, block cols): True where the whole block is zero (padding ignored)."""
    rows, cols = mask2d.shape
    bh, bw = block
    out = torch.zeros(math.ceil(rows / bh), math.ceil(cols / bw), dtype=torch.bool)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = not bool(mask2d[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].any())
    return out


@pytest.mark.parametrize("shape,block", [((10, 12), (1, 4)), ((7, 9), (2, 2)), ((5, 5), (3, 2)), ((1, 30), (1, 4))])
def test_exactly_round_level_times_blocks_are_pruned(shape, block):
    data = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    n_blocks = math.ceil(shape[0] / block[0]) * math.ceil(shape[1] / block[1])
    for i in range(21):
        level = i / 20
        mask = mask_of(data, sparsity_level=level, sparse_block_shape=block)
        assert int(pruned_blocks(mask, block).sum()) == round(level * n_blocks), level


def test_half_way_counts_round_half_to_even():
    # 5 blocks at 0.5 -> 2 (not 3); 7 blocks at 0.5 -> 4; 3 blocks at 0.5 -> 2; 1 block at 0.5 -> 0
    for n_blocks, expected in [(5, 2), (7, 4), (3, 2), (1, 0), (9, 4)]:
        data = torch.randn(1, 4 * n_blocks, generator=torch.Generator().manual_seed(n_blocks))
        mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 4))
        assert int(pruned_blocks(mask, (1, 4)).sum()) == expected, n_blocks


def test_equal_blocks_prune_the_lowest_row_major_block_indices_first():
    data = torch.ones(4, 8)
    for k in range(9):
        mask = mask_of(data, sparsity_level=k / 8, sparse_block_shape=(2, 2))
        flat = pruned_blocks(mask, (2, 2)).reshape(-1)
        assert flat.tolist() == [True] * k + [False] * (8 - k), k


def test_all_equal_data_with_partial_edge_blocks_prunes_lowest_indices_first():
    data = torch.full((5, 7), 2.0)  # edge blocks have the same mean as whole blocks
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(2, 3))  # 3x3 = 9 blocks -> 4
    assert pruned_blocks(mask, (2, 3)).reshape(-1).tolist() == [True] * 4 + [False] * 5


def test_within_block_ties_zero_the_lower_positions_first():
    data = torch.ones(2, 8)
    mask = mask_of(data, sparsity_level=1.0, sparse_block_shape=(2, 4), zeros_per_block=3)
    # each block's positions in row-major order: (0,0) (0,1) (0,2) (0,3) (1,0) ...
    expected = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 1],
                             [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_within_block_smallest_magnitudes_are_zeroed_not_the_first_positions():
    data = torch.tensor([[5.0, -1.0, 3.0, 0.5, 9.0, 8.0, 7.0, 6.0]])
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    assert mask.tolist() == [[True, False, True, False, True, True, True, True]]


def test_the_same_input_gives_the_same_mask_on_repeated_runs():
    data = torch.randint(0, 3, (16, 16), generator=torch.Generator().manual_seed(0)).float()  # many ties
    first = mask_of(data, sparsity_level=0.45, sparse_block_shape=(2, 2), zeros_per_block=2)
    for _ in range(3):
        assert torch.equal(mask_of(data.clone(), sparsity_level=0.45, sparse_block_shape=(2, 2),
                                   zeros_per_block=2), first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mask_is_bool_with_the_data_shape_and_device(dtype):
    data = torch.randn(6, 10).to(dtype)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("x", data)
    for _ in range(2):  # before and after a step
        mask = sp.get_mask("x")
        assert mask.dtype == torch.bool
        assert mask.shape == data.shape
        assert mask.device == data.device
        sp.step()


def test_mask_before_any_step_keeps_everything():
    sp = DataNormSparsifier(sparsity_level=0.9)
    sp.add_data("x", torch.randn(4, 8))
    assert bool(sp.get_mask("x").all())


def test_level_zero_keeps_everything_and_level_one_prunes_everything():
    data = torch.randn(7, 9)
    assert bool(mask_of(data, sparsity_level=0.0).all())
    assert not bool(mask_of(data, sparsity_level=1.0).any())
    assert bool(mask_of(data, sparsity_level=1.0, zeros_per_block=0).all())


def test_l1_and_l2_rank_blocks_by_the_mean_of_abs_and_square():
    # block A: |x| mean 1.0, x^2 mean 2.0 ; block B: |x| mean 1.1, x^2 mean 1.21
    data = torch.tensor([[0.0, 2.0, 1.1, 1.1]])
    assert mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 2), norm="L1").tolist() == [[False, False, True, True]]
    assert mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 2), norm="L2").tolist() == [[True, True, False, False]]


def test_edge_blocks_are_scored_by_the_mean_over_their_valid_elements():
    # blocks of (1,4) over 6 columns: [1,1,1,1] mean 1.0 and the edge [1.5, 1.5] mean 1.5
    data = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.5, 1.5]])
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 4))
    assert mask.tolist() == [[False] * 4 + [True] * 2]


def test_three_dimensional_data_is_masked_as_prod_of_leading_dims_by_last_dim():
    data = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(2, 4))
    assert mask.shape == (2, 3, 8)
    assert torch.equal(mask.reshape(6, 8), mask_of(data.reshape(6, 8), sparsity_level=0.5, sparse_block_shape=(2, 4)))
    # blocks run across the flattened leading dims: rows 2k and 2k+1 of the (6, 8) view share blocks
    view = mask.reshape(3, 2, 2, 4)
    assert torch.equal(view[:, 0], view[:, 1])


def test_four_dimensional_data_gets_a_mask_of_its_own_shape():
    data = torch.randn(2, 2, 3, 4)
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 2))
    assert mask.shape == data.shape
    assert int((~mask).sum()) == 2 * round(0.5 * 24)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0), (0, 0, 5)])
def test_empty_tensors_get_an_empty_mask_and_step_works(shape):
    data = torch.empty(shape)
    sp = DataNormSparsifier(sparsity_level=0.5)
    out = sp.add_data("x", data)
    sp.step()
    mask = sp.get_mask("x")
    assert mask.shape == data.shape and mask.dtype == torch.bool and out.shape == data.shape


def test_huge_finite_values_whose_squares_overflow_are_not_an_error():
    data = torch.tensor([[3e38, 3e38, 1.0, 1.0]], dtype=torch.float32)
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 2), norm="L2")
    assert mask.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 11), (0,)])
def test_packed_masks_use_one_bit_per_element_and_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(mask.numel()) == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_packed_bits_are_most_significant_first():
    mask = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_bits(mask).tolist() == [0b10000001, 0b10000000]


def test_unpacking_with_the_wrong_length_is_an_error():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), (3, 7))


def _block_constant_mask(shape, block, seed):
    (rows, cols), (bh, bw) = shape, block
    flags = torch.rand(-(-rows // bh), -(-cols // bw), generator=torch.Generator().manual_seed(seed)) < 0.5
    return flags, flags.repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols].contiguous()


@pytest.mark.parametrize("shape, block", [((8, 16), (1, 4)), ((3, 9), (1, 4)), ((7, 13), (2, 3)), ((9, 10), (4, 1)),
                                          ((5, 5), (3, 5)), ((6, 8), (2, 2)), ((4, 7), (2, 8)), ((33, 64), (1, 8)),
                                          ((5, 6), (1, 2)), ((4, 4), (1, 1)), ((0, 8), (1, 4))])
def test_block_bits_carry_one_bit_per_block_in_pack_bits_layout_and_round_trip(shape, block):
    from distsparse.kernels.unpack_rows import unpack_blocks_into
    from distsparse.masks import block_bits_size, pack_block_bits, unpack_block_bits

    flags, mask = _block_constant_mask(shape, block, seed=sum(shape) + block[1])
    packed = pack_block_bits(mask, block)
    assert packed.dtype == torch.uint8 and packed.numel() == block_bits_size(shape, block)
    assert torch.equal(packed, pack_bits(flags))  # the fast path and the generic one agree bit for bit
    assert torch.equal(unpack_block_bits(packed, shape, block), mask)
    for start in (torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)):
        if unpack_blocks_into(packed, start, block):  # False only where numba is absent
            assert torch.equal(start, mask)


def test_block_bits_are_a_bh_times_bw_fraction_of_element_bits():
    from distsparse.masks import block_bits_size

    assert block_bits_size((4096, 8), (1, 4)) * 4 == packed_size(4096 * 8)
    assert block_bits_size((4096, 32), (2, 8)) * 16 == packed_size(4096 * 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("zeros", [1, 2, 5])
def test_every_pruned_whole_block_has_exactly_zeros_per_block_zeros_even_with_ties(dtype, zeros):
    data = torch.randint(-2, 3, (8, 12), generator=torch.Generator().manual_seed(zeros)).to(dtype)
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(2, 3), zeros_per_block=zeros)
    per_block = (~mask).view(4, 2, 4, 3).permute(0, 2, 1, 3).reshape(16, 6).sum(dim=1)
    assert sorted(per_block.tolist()) == [0] * 8 + [zeros] * 8


def test_edge_blocks_zero_at_most_their_valid_elements_and_never_the_padding():
    # (1, 4) blocks over 6 columns: the edge block has 2 valid elements
    data = torch.tensor([[9.0, 9.0, 9.0, 9.0, 0.2, 0.1]])
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=3)
    assert mask.tolist() == [[True, True, True, True, False, False]]
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=1)
    assert mask.tolist() == [[True, True, True, True, True, False]]


def test_within_block_ties_in_an_edge_block_zero_the_lower_positions_first():
    data = torch.ones(3, 5)  # (2, 2) blocks: the corner block (2, 2) holds one element
    mask = mask_of(data, sparsity_level=1.0, sparse_block_shape=(2, 2), zeros_per_block=1)
    expected = torch.ones(3, 5, dtype=torch.bool)
    for r, c in [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4)]:
        expected[r, c] = False  # the first valid position of each block
    assert torch.equal(mask, expected)


def test_negative_values_are_ranked_by_magnitude():
    data = torch.tensor([[-5.0, -5.0, 0.1, 0.1, -0.2, 0.3, 4.0, -4.0]])
    mask = mask_of(data, sparsity_level=0.5, sparse_block_shape=(1, 2))
    assert mask.tolist() == [[True, True, False, False, False, False, True, True]]


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (1, 8), (4, 4), (3, 1), (1, 3)])
@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_scores_of_exactly_tiled_data_equal_avg_pool2d_bit_for_bit(block, norm, dtype):
    # The fast strided-add path must reproduce torch.ao's avg_pool2d arithmetic exactly,
    # also across several scoring chunks (2**20 elements each).
    gen = torch.Generator().manual_seed(7)
    rows = 12 * 4096 * block[0] // math.gcd(12, block[0])
    x = torch.randn(rows, 48 * block[1], generator=gen, dtype=dtype)
    magnitude = x.abs() if norm == "L1" else x * x
    expected = torch.nn.functional.avg_pool2d(magnitude[None, None], block, block, ceil_mode=True)[0, 0]
    assert torch.equal(masks.block_scores(x, block, norm), expected)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("values", [None, 7], ids=["continuous", "heavy-ties"])
def test_the_radix_path_for_big_score_tensors_equals_lowest_blocks_bit_for_bit(dtype, values):
    from distsparse.masks import _RADIX_MIN_BLOCKS, _lowest_blocks_consuming, lowest_blocks

    gen = torch.Generator().manual_seed(3)
    n = _RADIX_MIN_BLOCKS + 12_345
    scores = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    if values:
        scores = torch.randint(0, values, (n,), generator=gen).to(dtype) / values
    scores = scores.reshape(-1, 5) if n % 5 == 0 else scores
    for k in (1, n // 3, n // 2, n - 1):
        assert torch.equal(_lowest_blocks_consuming(scores.clone(), k), lowest_blocks(scores, k)), k


def test_kth_smallest_by_topk_is_exact_on_either_side_and_with_ties():
    """The CUDA selection path (topk of the smaller side), run here on CPU: equal to sorting."""
    g = torch.Generator().manual_seed(5)
    for values in (torch.randn(1001, generator=g), torch.randint(0, 7, (1000,), generator=g).float()):
        ordered = values.sort().values
        for k in (1, 2, 499, 500, 501, 502, 999, values.numel()):
            assert masks._kth_smallest_by_topk(values, k) == ordered[k - 1], k
