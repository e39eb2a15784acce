"""Exact global selection over shards (issue 11), proven on simulated worlds in one process.

Each virtual rank holds one row range of every group, builds its ShardSelection, packs
its histograms into one tensor per round; the "all-reduce" is a plain sum over the ranks.
The concatenated shard masks must equal masks.norm_block_mask of the whole tensor bit for
bit — the same protocol the sparsifier runs over torch.distributed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from distsparse import masks
from distsparse.masks import as_matrix, block_scores, lowest_blocks, norm_block_mask
from distsparse.distributed.selection import (
    KEY_BITS,
    ShardSelection,
    blocks_to_prune,
    choose_digit_bits,
    combine_histograms,
    digit_schedule,
    pack_histograms,
    pick,
    score_keys,
    shard_block_scores,
    shard_mask,
    tie_shares,
    unpack_histograms,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# -- the simulated world -------------------------------------------------------------------


@dataclass
class Case:
    data: torch.Tensor
    level: float
    block: tuple[int, int]
    zeros: int
    norm: str
    bounds: list[tuple[int, int]]  # one row range per virtual rank, ascending

    @property
    def matrix(self) -> torch.Tensor:
        return as_matrix(self.data)

    @property
    def n_blocks(self) -> int:
        rows, cols = self.matrix.shape
        return -(-rows // self.block[0]) * -(-cols // self.block[1])


def random_bounds(rows: int, bh: int, world: int, rng: random.Random) -> list[tuple[int, int]]:
    """``world`` contiguous row ranges at block-row boundaries; empty ones likely."""
    n_br = -(-rows // bh)
    cuts = sorted(rng.randint(0, n_br) for _ in range(world - 1))
    edges = [0] + [min(rows, c * bh) for c in cuts] + [rows]
    return [(edges[i], edges[i + 1]) for i in range(world)]


def run_world(cases: list[Case], world: int, digit_bits: int) -> tuple[list[torch.Tensor], int]:
    """Every virtual rank runs the protocol for all groups at once; returns each group's
    mask (rows concatenated, data's shape) and the number of collective calls made."""
    ranks = []
    for r in range(world):
        ranks.append([ShardSelection(shard_block_scores(c.matrix, *c.bounds[r], c.block, c.norm),
                                     c.n_blocks, blocks_to_prune(c.level, c.n_blocks), digit_bits)
                      for c in cases])
    collectives = 0
    for _ in range(max([s.rounds for s in ranks[0]], default=0)):
        if all(s.done for s in ranks[0]):
            break
        flats = [pack_histograms([s.histogram() for s in mine]) for mine in ranks]
        total = combine_histograms(flats)  # the all-reduce
        collectives += 1
        for mine in ranks:
            for s, h in zip(mine, unpack_histograms(total, [s.histogram_size for s in mine])):
                s.advance(h)
    # Every rank holds the same outcome.
    for mine in ranks[1:]:
        assert [(s.threshold, s.ties, s.done) for s in mine] == [(s.threshold, s.ties, s.done) for s in ranks[0]]
    need = [i for i, s in enumerate(ranks[0]) if s.needs_tie_prefix]
    before = [[0] * len(cases) for _ in range(world)]
    if need:
        counts = torch.zeros(len(need), world, dtype=torch.int64)
        for r, mine in enumerate(ranks):  # each rank fills its column; the all-reduce sums
            counts[:, r] = torch.tensor([mine[i].local_ties() for i in need])
        collectives += 1
        for j, i in enumerate(need):
            prefix = 0
            for r in range(world):  # ranks hold the ranges in row order
                before[r][i] = prefix
                prefix += int(counts[j, r])
            assert sum(tie_shares(counts[j].tolist(), ranks[0][i].ties)) == ranks[0][i].ties
    out = []
    for i, c in enumerate(cases):
        parts = [shard_mask(c.matrix, *c.bounds[r], ranks[r][i].pruned(before[r][i]), c.block, c.zeros, c.norm)
                 for r in range(world)]
        out.append(torch.cat(parts).reshape(c.data.shape))
    return out, collectives


def assert_same_as_whole(cases: list[Case], world: int, digit_bits: int = 11) -> int:
    got, collectives = run_world(cases, world, digit_bits)
    for c, mask in zip(cases, got):
        want = norm_block_mask(c.data, c.level, c.block, c.zeros, c.norm)
        assert mask.dtype == torch.bool
        assert torch.equal(mask, want), (f"world {world}, shape {tuple(c.data.shape)}, {c.data.dtype}, "
                                         f"block {c.block}, level {c.level}, zeros {c.zeros}, {c.norm}: "
                                         f"{int((mask != want).sum())} elements differ")
    return collectives


def make_data(kind: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "constant":
        return torch.full(shape, 0.75, dtype=dtype)
    if kind == "zeros":  # scores all +0.0; data mixes -0.0 and +0.0
        signs = torch.randint(0, 2, shape, generator=gen).bool()
        return torch.where(signs, torch.tensor(-0.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    if kind == "repeated":  # a few distinct magnitudes, both signs
        values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=dtype)
        return values[torch.randint(0, 5, shape, generator=gen)]
    if kind == "few":
        return torch.randint(-3, 4, shape, generator=gen).to(dtype) * 0.5
    return torch.randn(shape, generator=gen).to(dtype)


# -- worlds of 1 … 1,000 ranks -------------------------------------------------------------

LEVELS = [0.0, 1e-4, 0.5, 1.0, 0.37]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 64, 1000])
def test_masks_of_simulated_worlds_equal_the_whole_tensor_mask(world):
    rng = random.Random(world)
    gen = torch.Generator().manual_seed(world)
    cases = []
    for block in [(1, 4), (2, 2), (3, 5)]:
        for dtype in DTYPES:
            for kind in ["random", "constant", "repeated", "few", "zeros"]:
                rows = rng.choice([1, 7, 40, 301])
                cols = rng.choice([4, 9, 13])
                data = make_data(kind, (rows, cols), dtype, gen)
                level = rng.choice(LEVELS + [rng.random()])
                zeros = rng.choice([block[0] * block[1], 1, 0])
                norm = rng.choice(["L1", "L2"])
                cases.append(Case(data, level, block, zeros, norm, random_bounds(rows, block[0], world, rng)))
    if world >= 64:  # keep the suite fast: every block shape, dtype and data kind still appears
        cases = cases[::5] + cases[2::11]
    # All groups of the step share the rounds: 3 for float32 keys with 11-bit digits, 6 for float64.
    collectives = assert_same_as_whole(cases, world)
    assert collectives <= 6 + 1


def test_one_big_table_at_1000_ranks_with_heavy_ties():
    """Every block in a handful of score values: the tie prefix decides across ranks."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    data = make_data("few", (3000, 16), torch.float32, gen)
    cases = [Case(data, level, (1, 4), 4, "L1", random_bounds(3000, 1, 1000, rng))
             for level in (1e-4, 0.5, 0.999)]
    assert_same_as_whole(cases, 1000)


def test_a_tiny_level_prunes_exactly_one_block_across_ranks():
    data = torch.full((400, 8), 1.0)  # 800 equal blocks; round(0.0013 × 800) = 1 → block 0
    case = Case(data, 0.0013, (1, 4), 4, "L1", random_bounds(400, 1, 7, random.Random(0)))
    assert blocks_to_prune(0.0013, 800) == 1
    (mask,), _ = run_world([case], 7, 11)
    assert int((~mask).sum()) == 4 and not bool(mask[0, :4].any())


@pytest.mark.parametrize("shape", [(50,), (4, 6, 10)])
def test_one_dimensional_and_nd_data_use_the_2d_view(shape):
    gen = torch.Generator().manual_seed(3)
    data = make_data("repeated", shape, torch.float32, gen)
    rows = as_matrix(data).shape[0]
    for world in (1, 3, 64):
        bounds = random_bounds(rows, 2, world, random.Random(world))
        assert_same_as_whole([Case(data, 0.5, (2, 3), 6, "L2", bounds)], world)


def test_float16_squares_that_overflow_rank_last():
    """Finite float16 data whose L2 scores overflow to +inf: the inf blocks are kept."""
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(60, 8, generator=gen).to(torch.float16)
    data[::3] = 300.0  # 300² = 90000 > float16 max
    scores = block_scores(data, (1, 4), "L2")
    assert bool(torch.isinf(scores).any())
    for level in (0.5, 0.66, 0.9):
        assert_same_as_whole([Case(data, level, (1, 4), 4, "L2", random_bounds(60, 1, 5, random.Random(1)))], 5)


def test_groups_with_16_32_and_64_bit_keys_share_rounds_and_finish_at_different_rounds():
    """Constant data: every group needs all its rounds (then splits its ties); half keys
    are decided after 2 rounds of 11 bits, float32 after 3, float64 after 6."""
    rng = random.Random(9)
    cases = [Case(torch.full((90, 12), 0.5, dtype=dtype), 0.5, (1, 4), 4, "L1", random_bounds(90, 1, 7, rng))
             for dtype in (torch.float16, torch.float32, torch.float64)]
    collectives = assert_same_as_whole(cases, 7, digit_bits=11)
    assert collectives == 6 + 1  # rounds of the widest keys, plus the tie counts
    assert [ShardSelection(torch.zeros(2, dtype=c.data.dtype), 2, 1, 11).rounds for c in cases] == [2, 3, 6]


def test_a_group_is_decided_early_when_a_whole_digit_is_pruned():
    # 24 distinct block scores, small integers: their float32 keys differ in the top 16
    # bits, so one round of 16-bit digits decides (not 2).
    data = torch.arange(1.0, 97.0).reshape(8, 12)
    cases = [Case(data, 0.5, (1, 4), 4, "L1", random_bounds(8, 1, 3, random.Random(2)))]
    assert assert_same_as_whole(cases, 3, digit_bits=16) == 1


@pytest.mark.parametrize("digit_bits", [8, 11, 16, 5])
def test_every_digit_width_gives_the_same_masks(digit_bits):
    gen = torch.Generator().manual_seed(digit_bits)
    rng = random.Random(digit_bits)
    cases = [Case(make_data(kind, (120, 10), dtype, gen), 0.5, (2, 2), 4, "L1", random_bounds(120, 2, 9, rng))
             for kind in ("random", "few") for dtype in DTYPES]
    collectives = assert_same_as_whole(cases, 9, digit_bits)
    assert collectives <= math.ceil(64 / digit_bits) + 1


def test_fast_paths_need_no_rounds():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(30, 8, generator=gen)
    for level in (0.0, 1.0):
        bounds = random_bounds(30, 1, 4, random.Random(0))
        collectives = assert_same_as_whole([Case(data, level, (1, 4), 4, "L1", bounds)], 4)
        assert collectives == 0


def test_pruned_flags_equal_lowest_blocks_of_the_whole_scores():
    gen = torch.Generator().manual_seed(4)
    scores_all = torch.randint(0, 6, (200, 5), generator=gen).float() / 4  # heavy ties
    for k in (0, 1, 333, 500, 999, 1000):
        rng = random.Random(k)
        bounds = random_bounds(200, 1, 13, rng)
        sels = [ShardSelection(scores_all[a:b].clone(), 1000, k, 11) for a, b in bounds]
        for _ in range(max(s.rounds for s in sels)):
            if sels[0].done:
                break
            total = combine_histograms([s.histogram() for s in sels])
            for s in sels:
                s.advance(total)
        counts = [s.local_ties() for s in sels] if sels[0].needs_tie_prefix else [0] * len(sels)
        befores = [sum(counts[:i]) for i in range(len(sels))]
        got = torch.cat([s.pruned(b) for s, b in zip(sels, befores)])
        assert torch.equal(got, lowest_blocks(scores_all, k))


# -- block scores of a slice ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,shape", [((3, 5), (100, 10)), ((3, 5), (101, 12)), ((2, 2), (33, 7)), ((1, 4), (9, 16))])
def test_block_scores_of_a_block_row_slice_are_bit_identical(dtype, block, shape, monkeypatch):
    """Slices starting at a block row, with chunks far smaller than the data (so slice and
    whole tensor chunk differently), and slices that take the strided-add fast path while
    the whole tensor takes avg_pool2d (rows not a multiple of the block height)."""
    monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(shape, generator=gen).to(dtype)
    bh = block[0]
    for norm in ("L1", "L2"):
        whole = block_scores(matrix, block, norm)
        n_br = whole.shape[0]
        for a in range(0, n_br + 1, 2):
            for b in range(a, n_br + 1, 3):
                stop = min(shape[0], b * bh)
                part = shard_block_scores(matrix, min(shape[0], a * bh), stop, block, norm)
                assert part.dtype == whole.dtype
                assert torch.equal(part.view(-1).view(_int(dtype)), whole[a:b].reshape(-1).view(_int(dtype)))


def test_block_scores_slices_across_real_chunk_boundaries():
    """The default chunk size (2**20 elements): 209,715 rows per chunk for 5 columns and (3, 5) blocks."""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.rand(300_001, 5, generator=gen)  # rows % 3 != 0: the whole tensor uses avg_pool2d
    whole = block_scores(matrix, (3, 5), "L1")
    for a, b in [(0, 69_905), (69_903, 100_000), (69_900, 100_001)]:
        part = shard_block_scores(matrix, a * 3, min(300_001, b * 3), (3, 5), "L1")
        assert torch.equal(part.view(torch.int32), whole[a:b].view(torch.int32))


def _int(dtype):
    return {16: torch.int16, 32: torch.int32, 64: torch.int64}[KEY_BITS[dtype]]


# -- keys, rounds, picks -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_order_exactly_as_torch_compares_the_floats(dtype):
    gen = torch.Generator().manual_seed(7)
    finfo = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), finfo.tiny, -finfo.tiny, finfo.max,
                            -finfo.max, finfo.tiny / 4, -finfo.tiny / 4, 1.0, -1.0, 1.0], dtype=dtype)
    values = torch.cat([special, (torch.randn(150, generator=gen) * 10).to(dtype)])
    keys = score_keys(values)
    assert keys.dtype == _int(dtype) and values.numel() == keys.numel()
    a, b = values[:, None], values[None, :]
    ka, kb = keys[:, None], keys[None, :]
    assert torch.equal(a < b, ka < kb)
    assert torch.equal(a == b, ka == kb)  # -0.0 == +0.0: one key


def test_keys_in_place_reuse_the_scores_memory_and_leave_them_when_asked_not_to():
    scores = torch.tensor([0.5, -0.0, 2.0])
    copy = score_keys(scores)
    assert scores[1].item() == 0.0 and torch.signbit(scores[1])  # untouched
    inplace = score_keys(scores, inplace=True)
    assert inplace.data_ptr() == scores.data_ptr() and torch.equal(inplace, copy)


def test_digit_schedule_covers_the_key_bits_most_significant_first():
    assert digit_schedule(32, 11) == [(21, 11), (10, 11), (0, 10)]
    assert digit_schedule(16, 11) == [(5, 11), (0, 5)]
    assert digit_schedule(64, 16) == [(48, 16), (32, 16), (16, 16), (0, 16)]
    with pytest.raises(ValueError, match="digit_bits"):
        digit_schedule(32, 0)


def test_digit_width_follows_the_bytes_versus_rounds_model():
    assert choose_digit_bits(2, 1, 32, keys_per_rank=8_000_000) == 16  # big shard: fewer candidates left
    assert choose_digit_bits(2, 1, 32, keys_per_rank=100_000) == 11  # small shard: 512 KiB histograms cost more
    assert choose_digit_bits(2, 200, 32, keys_per_rank=1_000_000) < 16  # many groups: bytes dominate
    assert choose_digit_bits(1024, 1) == 16  # latency-bound: 2 rounds beat 3
    assert choose_digit_bits(1024, 26, 32, keys_per_rank=500_000) == 16
    assert all(choose_digit_bits(n, g, b, keys) in (8, 11, 16) for n in (1, 2, 3, 7, 64, 1000) for g in (0, 1, 3, 100)
               for b in (16, 32, 64) for keys in (0, 10**6))
    with pytest.raises(ValueError, match="world_size"):
        choose_digit_bits(0, 1)


def test_pick_finds_the_digit_of_the_remaining_th_key():
    hist = torch.tensor([2, 0, 3, 1])
    assert pick(hist, 1).digit == 0
    p = pick(hist, 4)
    assert (p.digit, p.below, p.in_digit, p.remaining) == (2, 2, 3, 2)
    assert pick(hist, 6).digit == 3
    with pytest.raises(RuntimeError, match="fewer than the 7"):
        pick(hist, 7)


def test_tie_shares_go_to_the_earliest_shards():
    assert tie_shares([2, 0, 3, 4], 4) == [2, 0, 2, 0]
    assert tie_shares([0, 0], 0) == [0, 0]
    assert tie_shares([5], 5) == [5]


def test_pack_and_unpack_many_groups_in_one_tensor():
    hs = [torch.arange(4), torch.zeros(0, dtype=torch.int64), torch.ones(8, dtype=torch.int64)]
    flat = pack_histograms(hs)
    assert flat.dtype == torch.int64 and flat.numel() == 12
    back = unpack_histograms(flat, [4, 0, 8])
    assert all(torch.equal(x, y) for x, y in zip(back, hs))
    with pytest.raises(ValueError, match="expected 13"):
        unpack_histograms(flat, [4, 1, 8])


# -- misuse is loud ------------------------------------------------------------------------


def test_overlapping_or_missing_shards_are_detected_in_the_first_round():
    scores = torch.rand(10, 3)
    a = ShardSelection(scores[:6].clone(), 30, 10)
    b = ShardSelection(scores[4:].clone(), 30, 10)  # rows 4-5 twice
    total = combine_histograms([a.histogram(), b.histogram()])
    with pytest.raises(RuntimeError, match="hold 36 candidate blocks, expected 30"):
        a.advance(total)


def test_a_shard_must_be_whole_block_rows():
    matrix = torch.rand(10, 4)
    with pytest.raises(ValueError, match="multiple of the block height 3"):
        shard_block_scores(matrix, 2, 9, (3, 2), "L1")
    with pytest.raises(ValueError, match="outside"):
        shard_block_scores(matrix, 0, 11, (1, 2), "L1")
    shard_block_scores(matrix, 9, 10, (3, 2), "L1")  # the last, partial block row


def test_nan_in_a_shard_is_refused_naming_its_row_in_the_2d_view():
    matrix = torch.rand(12, 4)
    matrix[7, 2] = float("nan")
    with pytest.raises(ValueError, match="row 7, column 2"):
        shard_block_scores(matrix, 6, 12, (2, 2), "L1")


def test_results_before_the_rounds_end_are_refused():
    s = ShardSelection(torch.rand(4, 4), 16, 5)
    with pytest.raises(RuntimeError, match="before the selection finished"):
        s.pruned()
    with pytest.raises(ValueError, match=r"k must be in \[0, 16\]"):
        ShardSelection(torch.rand(4, 4), 16, 17)


# -- property test against the oracle -----------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(0, 40),
    cols=st.integers(1, 17),
    block=st.sampled_from([(1, 4), (2, 2), (3, 5), (1, 1), (4, 3)]),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["random", "constant", "repeated", "few", "zeros"]),
    level=st.one_of(st.sampled_from([0.0, 1e-4, 0.5, 1.0]), st.floats(0, 1)),
    world=st.integers(1, 12),
    zeros_frac=st.sampled_from([0.0, 0.5, 1.0]),
    norm=st.sampled_from(["L1", "L2"]),
    digit_bits=st.sampled_from([8, 11, 16]),
    seed=st.integers(0, 2**16),
)
def test_property_any_sharding_gives_the_single_process_mask(rows, cols, block, dtype, kind, level, world,
                                                             zeros_frac, norm, digit_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    data = make_data(kind, (rows, cols), dtype, gen)
    zeros = round(zeros_frac * block[0] * block[1])
    bounds = random_bounds(rows, block[0], world, random.Random(seed))
    assert_same_as_whole([Case(data, level, block, zeros, norm, bounds)], world, digit_bits)
