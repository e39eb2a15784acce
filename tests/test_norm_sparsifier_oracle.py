"""DataNormSparsifier masks are bit-identical to torch.ao's on tie-free data (DESIGN.md, Masks).

torch.ao's ``DataNormSparsifier`` is the oracle. It is imported inside a fixture under
``warnings.catch_warnings`` because its module calls ``warnings.simplefilter("once")`` at
import time. Known torch.ao quirks worked around here (not copied by distsparse):

* (n, 1) data is squeezed by torch.ao into a row and the mask comes back with the wrong
  shape, so our (n, 1) mask is compared with torch.ao run on the transposed (1, n) data
  with the transposed block shape, transposed back;
* 1-D data gets a (1, n) mask from torch.ao; it is compared after reshaping;
* torch.ao freezes ``zeros_per_block=None`` to the block size at construction, so the
  oracle is always given an explicit count.
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from distsparse import DataNormSparsifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ao_cls():
    with warnings.catch_warnings():
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AO

    return AO


def ours(data, level, block, zeros, norm):
    sp = DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
    sp.add_data("x", data)
    sp.step()
    return sp.get_mask("x")


def _ao_raw(ao_cls, data, level, block, zeros, norm):
    values = block[0] * block[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = ao_cls(sparsity_level=level, sparse_block_shape=tuple(block),
                    zeros_per_block=values if zeros is None else zeros, norm=norm)
        sp.add_data("x", data.clone())
        sp.step()
        return sp.get_mask("x").detach().clone()


def oracle(ao_cls, data, level, block, zeros, norm):
    """torch.ao's mask for ``data`` as a bool tensor of data's shape."""
    if data.dim() == 2 and data.shape[1] == 1 and data.shape[0] > 1:
        m = _ao_raw(ao_cls, data.t().contiguous(), level, (block[1], block[0]), zeros, norm)
        return m.reshape(1, -1).t().contiguous().bool()
    m = _ao_raw(ao_cls, data, level, block, zeros, norm)
    return m.reshape(data.shape).bool()


def assert_same(ours_mask, ao_mask):
    assert ours_mask.dtype == torch.bool
    assert ours_mask.shape == ao_mask.shape
    diff = (ours_mask != ao_mask).nonzero().tolist()
    assert not diff, f"masks differ at {len(diff)} positions, first {diff[:5]}"


SHAPES = [
    (8, 16),   # whole blocks
    (7, 13),   # partial edge blocks in both directions
    (1, 17),   # one row
    (17, 1),   # one column (torch.ao gets it wrong; compared transposed)
    (3, 2),    # blocks larger than the data
    (5, 33),
    (2, 9),
]
BLOCKS = [(1, 4), (2, 2), (4, 1), (3, 5), (1, 1), (8, 8)]
LEVELS = [0.0, 0.2, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "b" + "x".join(map(str, b)))
def test_masks_equal_torch_ao_across_shapes_blocks_levels_and_norms(ao_cls, shape, block, norm):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, block, norm)).encode()))
    data = torch.randn(shape, generator=gen)
    for level in LEVELS:
        assert_same(ours(data, level, block, None, norm), oracle(ao_cls, data, level, block, None, norm))


@pytest.mark.parametrize("block", [(1, 4), (2, 3), (3, 3)], ids=lambda b: "b" + "x".join(map(str, b)))
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_masks_equal_torch_ao_for_every_zeros_per_block(ao_cls, block, norm):
    values = block[0] * block[1]
    gen = torch.Generator().manual_seed(7)
    data = torch.randn(11, 14, generator=gen)
    for zeros in [0, 1, values // 2, values - 1, values, None]:
        for level in (0.3, 0.5, 1.0):
            assert_same(ours(data, level, block, zeros, norm),
                        oracle(ao_cls, data, level, block, zeros, norm))


def test_zeros_per_block_partial_zeroes_exactly_that_many_in_each_pruned_block(ao_cls):
    data = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    mask = ours(data, 0.5, (2, 4), 3, "L1")
    blocks = mask.view(4, 2, 2, 4).permute(0, 2, 1, 3).reshape(8, 8)
    zeros = (~blocks).sum(dim=1)
    assert sorted(zeros.tolist()) == [0] * 4 + [3] * 4
    assert_same(mask, oracle(ao_cls, data, 0.5, (2, 4), 3, "L1"))


@pytest.mark.parametrize("n", [3, 4, 10, 37])
def test_one_dimensional_data_is_one_row_and_matches_torch_ao(ao_cls, n):
    data = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for level in LEVELS:
        for block in [(1, 4), (1, 3), (2, 2)]:
            mask = ours(data, level, block, None, "L1")
            assert mask.shape == (n,)
            assert_same(mask, oracle(ao_cls, data, level, block, None, "L1"))
            assert_same(mask, ours(data.reshape(1, n), level, block, None, "L1").reshape(n))


def test_column_data_keeps_its_shape_and_matches_transposed_torch_ao(ao_cls):
    data = torch.randn(23, 1, generator=torch.Generator().manual_seed(11))
    for level in (0.25, 0.5, 0.9):
        for block in [(4, 1), (3, 1), (1, 4), (2, 2)]:
            mask = ours(data, level, block, None, "L2")
            assert mask.shape == (23, 1)
            assert_same(mask, oracle(ao_cls, data, level, block, None, "L2"))


def test_levels_where_python_round_is_half_to_even_match_torch_ao(ao_cls):
    # 0.5 of 5 blocks -> round(2.5) == 2; 0.5 of 7 -> round(3.5) == 4; 0.3 of 5 -> 2 (1.5 -> 2)
    for cols, level, expected in [(20, 0.5, 2), (28, 0.5, 4), (20, 0.3, 2), (36, 0.5, 4), (44, 0.5, 6)]:
        data = torch.randn(1, cols, generator=torch.Generator().manual_seed(cols))
        mask = ours(data, level, (1, 4), None, "L1")
        assert expected == round(level * (cols // 4))  # Python's round, half to even
        assert int((~mask).sum()) == 4 * expected
        assert_same(mask, oracle(ao_cls, data, level, (1, 4), None, "L1"))


@pytest.mark.parametrize("level", [i / 20 for i in range(21)])
def test_every_level_in_steps_of_five_percent_matches_torch_ao(ao_cls, level):
    data = torch.randn(9, 20, generator=torch.Generator().manual_seed(int(level * 100)))
    assert_same(ours(data, level, (1, 4), None, "L1"), oracle(ao_cls, data, level, (1, 4), None, "L1"))
    assert_same(ours(data, level, (3, 3), 4, "L2"), oracle(ao_cls, data, level, (3, 3), 4, "L2"))


def test_float64_data_matches_torch_ao(ao_cls):
    data = torch.randn(13, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for block, zeros, norm, level in itertools.product([(1, 4), (2, 3)], [None, 2], ["L1", "L2"], [0.3, 0.5, 0.8]):
        assert_same(ours(data, level, block, zeros, norm), oracle(ao_cls, data, level, block, zeros, norm))


def _bf16_tie_free(shape, block, seed):
    """bfloat16 data whose magnitudes are distinct and whose bf16 block scores (L1 and L2,
    computed the way torch.ao does) are distinct; None if this seed has ties."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    magnitudes = (torch.randperm(200, generator=gen)[:n] + 1).to(torch.float32) / 8
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    data = (magnitudes * signs).reshape(shape).to(torch.bfloat16)
    if data.abs().unique().numel() != n:
        return None
    for mag in (data.abs(), data * data):
        if (mag.unique().numel() != n):
            return None
        scores = F.avg_pool2d(mag.reshape(-1, shape[-1])[None, None], block, block, ceil_mode=True).flatten()
        if scores.unique().numel() != scores.numel():
            return None
    return data


@pytest.mark.parametrize("shape,block", [((6, 10), (1, 4)), ((5, 7), (2, 2)), ((1, 24), (1, 3)), ((9, 4), (3, 2))])
def test_bfloat16_data_without_ties_matches_torch_ao(ao_cls, shape, block):
    checked = 0
    for seed in range(200):
        data = _bf16_tie_free(shape, block, seed)
        if data is None:
            continue
        for norm, level, zeros in itertools.product(["L1", "L2"], [0.25, 0.5, 1.0], [None, 1]):
            assert_same(ours(data, level, block, zeros, norm), oracle(ao_cls, data, level, block, zeros, norm))
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "could not build tie-free bfloat16 data (test setup)"


def test_three_dimensional_data_is_masked_as_its_flattened_leading_dimensions(ao_cls):
    data = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(9))
    for block, level in [((1, 4), 0.5), ((2, 2), 0.4), ((3, 3), 0.7)]:
        mask = ours(data, level, block, None, "L1")
        assert mask.shape == (3, 5, 8)
        flat = data.reshape(15, 8)
        assert_same(mask.reshape(15, 8), ours(flat, level, block, None, "L1"))
        assert_same(mask.reshape(15, 8), oracle(ao_cls, flat, level, block, None, "L1"))


def test_mask_is_identical_after_many_steps_on_the_same_data(ao_cls):
    data = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    sp = DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(2, 2))
    sp.add_data("x", data)
    masks = []
    for _ in range(3):
        sp.step()
        masks.append(sp.get_mask("x").clone())
    for m in masks:
        assert_same(m, oracle(ao_cls, data, 0.6, (2, 2), None, "L1"))


def test_data_spanning_several_scoring_chunks_matches_torch_ao(ao_cls):
    # > 2**20 elements, rows not a multiple of the block height: exercises chunked scoring
    data = torch.randn(1201, 1000, generator=torch.Generator().manual_seed(12))
    for block, zeros, level in [((3, 4), None, 0.55), ((2, 5), 3, 0.3)]:
        assert_same(ours(data, level, block, zeros, "L1"), oracle(ao_cls, data, level, block, zeros, "L1"))


def test_non_contiguous_data_matches_torch_ao_on_the_same_values(ao_cls):
    base = torch.randn(12, 9, generator=torch.Generator().manual_seed(13))
    data = base.t()  # (9, 12), not contiguous
    assert not data.is_contiguous()
    mask = ours(data, 0.5, (2, 3), None, "L2")
    assert mask.shape == (9, 12)
    assert_same(mask, oracle(ao_cls, data.contiguous(), 0.5, (2, 3), None, "L2"))
