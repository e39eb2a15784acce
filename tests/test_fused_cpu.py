"""The fused CPU kernel (distsparse.kernels.fused_cpu) gives the torch path's masks bit for bit.

The reference is ``masks.norm_block_mask`` with the kernel switched off
(``DISTSPARSE_FUSED_CPU=0``): the torch path, itself checked against torch.ao elsewhere.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from distsparse import masks
from distsparse.kernels import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="numba is not installed")

BLOCKS = [(1, 4), (2, 2), (3, 5), (4, 1), (1, 1), (1, 8), (2, 4)]


def torch_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setenv("DISTSPARSE_FUSED_CPU", "0")
        return masks.norm_block_mask(*args)


def fused(x, level, block, zeros, norm, threads=None):
    matrix = masks.as_matrix(x)
    n = -(-matrix.shape[0] // block[0]) * -(-matrix.shape[1] // block[1])
    out = fused_cpu.fused_block_mask(matrix, round(level * n), block, zeros, norm,
                                     lambda: masks._check_finite(x), threads, force=True)
    assert out is not None, "the fused kernel did not run"
    return out.reshape(x.shape)


def tied(shape, dtype, seed):
    """Data with many exact ties: small integers, so block scores repeat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("block", BLOCKS)
def test_bit_equal_to_the_torch_path(monkeypatch, dtype, norm, block):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, norm, block)).encode()))
    values = block[0] * block[1]
    # (37, 23) with (3, 5) blocks: 0.9 * 13 * 5 rounds up, 0.9 * 65 rounds to even — k is the latter
    for shape in [(64, 40), (37, 23), (1, 50), (5, 3), (130,), (3, 7, 11)]:
        for data in (torch.randn(shape, generator=g, dtype=dtype), tied(shape, dtype, len(shape))):
            for level in (0.0001, 0.3, 0.5, 0.9, 1.0):
                for zeros in sorted({values, 1, max(1, values // 2)}):
                    want = torch_path(monkeypatch, data, level, block, zeros, norm)
                    got = fused(data, level, block, zeros, norm)
                    assert torch.equal(got, want), (shape, level, zeros)
                    assert torch.equal(masks.norm_block_mask(data, level, block, zeros, norm), want)


def test_ties_go_to_the_lowest_block_index(monkeypatch):
    data = torch.ones(6, 8)  # every block ties
    got = fused(data, 0.5, (1, 4), 4, "L1")
    want = torch.ones(6, 8, dtype=torch.bool)
    want.view(-1)[:24] = False  # the 6 lowest flat block indices
    assert torch.equal(got, want)
    assert torch.equal(got, torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L1"))


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5)])
def test_threads_do_not_change_the_mask(block):
    g = torch.Generator().manual_seed(3)
    for data in (torch.randn(301, 64, generator=g), tied((301, 64), torch.float32, 4)):
        one = fused(data, 0.5, block, 2, "L2", threads=1)
        for threads in (2, 3, 7):
            assert torch.equal(fused(data, 0.5, block, 2, "L2", threads=threads), one), threads


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_data_is_refused_like_the_torch_path(monkeypatch, bad):
    data = torch.randn(16, 12)
    data[5, 7] = bad
    with pytest.raises(ValueError) as want:
        torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L1")
    with pytest.raises(ValueError) as got:
        masks.norm_block_mask(data, 0.5, (1, 4), 4, "L1")
    assert str(got.value) == str(want.value) and "(5, 7)" in str(got.value)


def test_overflowing_squares_rank_last(monkeypatch):
    data = torch.randn(32, 16, dtype=torch.float32)
    data[3, :8] = 3e20  # finite, but x*x overflows to inf in float32
    got = fused(data, 0.5, (1, 4), 2, "L2")
    assert torch.equal(got, torch_path(monkeypatch, data, 0.5, (1, 4), 2, "L2"))
    assert got[3, :8].all()  # inf scores are kept


def test_other_inputs_take_the_torch_path(monkeypatch):
    for data in (torch.randn(8, 12, dtype=torch.float16), torch.randn(8, 12, dtype=torch.bfloat16),
                 torch.randn(12, 8).t()):
        assert fused_cpu.fused_block_mask(data, 4, (1, 4), 4, "L1", lambda: None) is None
        assert torch.equal(masks.norm_block_mask(data, 0.5, (1, 4), 2, "L1"),
                           torch_path(monkeypatch, data, 0.5, (1, 4), 2, "L1"))
    monkeypatch.setenv("DISTSPARSE_FUSED_CPU", "0")
    assert not fused_cpu.available()


def test_a_forked_child_gets_its_own_threads():
    import os

    data = torch.randn(300, 64)
    want = fused(data, 0.5, (1, 4), 4, "L1", threads=2)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads do not exist here
        ok = torch.equal(fused(data, 0.5, (1, 4), 4, "L1", threads=2), want)
        os._exit(0 if ok else 1)
    deadline = __import__("time").monotonic() + 120
    while __import__("time").monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        __import__("time").sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in the fused kernel")


# -- the one-read path (whole one-row blocks one key wide: (1,4) float32, (1,8) float64) -----------


@pytest.fixture
def one_read(monkeypatch):
    """Small inputs take the one-read path (a 64-block sample); records its outcomes
    (True: it made the mask, False: its bracket missed, the three-pass path ran)."""
    monkeypatch.setattr(fused_cpu, "_BRACKET_MIN_BLOCKS", 1)
    monkeypatch.setattr(fused_cpu, "_SAMPLE", 64)
    monkeypatch.setattr(fused_cpu, "_MAX_SHARE", 1.0)  # a 64-block sample's bracket is wide
    outcomes = []
    real = fused_cpu._bracket_mask

    def recording(*args):
        outcomes.append(real(*args))
        return outcomes[-1]

    monkeypatch.setattr(fused_cpu, "_bracket_mask", recording)
    return outcomes


def test_the_one_read_path_covers_whole_one_row_one_key_wide_blocks_of_large_tables():
    """``fused_cpu.one_read_applies`` with the real minimum (2**18 blocks): the one
    condition of the whole-table kernel and of split shards (``fused_shard`` re-exports it)."""
    from distsparse.kernels import fused_shard

    assert fused_shard.one_read_applies is fused_cpu.one_read_applies
    big, n = (1 << 16, 16), 1 << 18  # (1,4) blocks: exactly 2**18
    for shape, block, zeros, nbytes, k, applies in [
            (big, (1, 4), 4, 4, n // 2, True), (big, (1, 4), 4, 4, 1, True), (big, (1, 4), 4, 4, n - 1, True),
            ((1 << 15, 64), (1, 8), 8, 8, n // 2, True),  # float64: (1,8) is one key wide
            (big, (1, 4), 4, 4, 0, False), (big, (1, 4), 4, 4, n, False),  # nothing or everything pruned
            (((1 << 16) - 1, 16), (1, 4), 4, 4, n // 2, False),  # 4 blocks short of the minimum
            ((1 << 16, 18), (1, 4), 4, 4, n // 2, False),  # cols % bw != 0 (with more blocks than the minimum)
            (big, (1, 4), 3, 4, n // 2, False),  # blocks pruned partly
            (big, (2, 2), 4, 4, n // 8, False), ((1 << 17, 16), (2, 2), 4, 4, n // 2, False),
            ((1 << 17, 16), (2, 4), 8, 4, n // 2, False),  # one key wide, but two rows
            (big, (1, 4), 4, 8, n // 2, False),  # float64 (1,4): half a key wide
            (big, (1, 2), 2, 4, n // 2, False), ((1 << 16, 32), (1, 8), 8, 4, n // 2, False)]:  # float32
        assert fused_cpu.one_read_applies(shape, block, zeros, nbytes, k) is applies, (shape, block, zeros, nbytes, k)


def test_the_kernel_takes_the_one_read_path_exactly_where_it_applies(one_read):
    data = torch.randn(40, 24, generator=torch.Generator().manual_seed(15))
    cases = [(data, (1, 4), 4, 100, True), (data, (1, 4), 4, 0, False), (data, (1, 4), 4, 240, False),
             (data, (1, 4), 2, 100, False), (data[:, :22].contiguous(), (1, 4), 4, 100, False),
             (data.double(), (1, 8), 8, 60, True), (data.double(), (1, 4), 4, 100, False)]
    for x, block, zeros, k, applies in cases:
        assert fused_cpu.one_read_applies(tuple(x.shape), block, zeros, x.element_size(), k) is applies
        one_read.clear()
        assert fused_cpu.fused_block_mask(x, k, block, zeros, "L1", lambda: None, force=True) is not None
        assert len(one_read) == applies, (tuple(x.shape), block, zeros, k)


@pytest.mark.parametrize("dtype, block", [(torch.float32, (1, 4)), (torch.float64, (1, 8))])
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_one_read_path_is_bit_equal(monkeypatch, one_read, dtype, norm, block):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, norm)).encode()))
    for shape in [(400, 64), (37, 24), (1, 64), (3, 7, 16)]:
        for data in (torch.randn(shape, generator=g, dtype=dtype), tied(shape, dtype, len(shape))):
            for level in (0.0001, 0.3, 0.5, 0.9, 0.9999, 1.0):
                want = torch_path(monkeypatch, data, level, block, block[1], norm)
                for threads in (1, 2, 3):
                    got = fused(data, level, block, block[1], norm, threads=threads)
                    assert torch.equal(got, want), (shape, level, threads)
    assert True in one_read  # the one-read path made masks (misses: the tests below)


def test_one_read_path_makes_the_mask_on_tie_free_data(one_read):
    data = torch.randn(2000, 64, generator=torch.Generator().manual_seed(5))
    for level in (0.1, 0.5, 0.77):
        assert torch.equal(fused(data, level, (1, 4), 4, "L1"),
                           fused(data, level, (1, 4), 4, "L1", threads=2))
    assert one_read == [True] * 6  # the sample's bracket held the cut every time


@pytest.mark.parametrize("wrong", ["low", "high", "narrow"])
def test_a_missed_bracket_falls_back_to_the_same_mask(monkeypatch, one_read, wrong):
    data = torch.randn(500, 64, generator=torch.Generator().manual_seed(6))
    keys = masks.block_scores(data, (1, 4), "L1").reshape(-1).numpy().view("int32").astype("int64")
    k = round(0.5 * keys.size)
    ordered = keys[keys.argsort(kind="stable")]
    kth, above = int(ordered[k - 1]), int(ordered[k])  # tie-free data: kth < above
    # low: k - 1 keys at most inside or below it; high: k + 1 below it
    brackets = {"low": (0, kth - 1), "high": (above + 1, 1 << 40), "narrow": (kth, kth)}
    monkeypatch.setattr(fused_cpu, "bracket", lambda *args: brackets[wrong])
    want = torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L1")
    assert torch.equal(fused(data, 0.5, (1, 4), 4, "L1"), want)
    assert one_read == [wrong == "narrow"]  # the narrow bracket holds exactly the k-th key


def test_more_candidates_than_planned_fall_back(monkeypatch, one_read):
    monkeypatch.setattr(fused_cpu, "_CAP_SLACK", 0.0)
    monkeypatch.setattr(fused_cpu, "_CAP_EXTRA", 8)  # room for none: the kernel keeps 8 spare
    data = tied((300, 64), torch.float32, 9)
    want = torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L2")
    for threads in (1, 2):
        assert torch.equal(fused(data, 0.5, (1, 4), 4, "L2", threads=threads), want)
    assert one_read == [False, False]


def test_a_heavily_tied_cut_takes_the_three_passes(monkeypatch, one_read):
    """Data already masked at the level (squash_mask, then step): half the blocks score 0."""
    monkeypatch.setattr(fused_cpu, "_SAMPLE", 6400)  # every block: a tight bracket
    monkeypatch.setattr(fused_cpu, "_MAX_SHARE", 0.05)
    data = torch.randn(400, 64, generator=torch.Generator().manual_seed(10))
    data[~torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L1")] = 0
    for level in (0.4, 0.5, 0.6):
        want = torch_path(monkeypatch, data, level, (1, 4), 4, "L1")
        assert torch.equal(fused(data, level, (1, 4), 4, "L1"), want), level
    assert one_read[:2] == [False, False]  # (at 60 % the cut is among nonzero scores: either path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_read_path_refuses_non_finite_data(monkeypatch, one_read, bad):
    data = torch.randn(64, 64)
    data[40, 9] = bad
    with pytest.raises(ValueError) as want:
        torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L1")
    with pytest.raises(ValueError) as got:
        fused(data, 0.5, (1, 4), 4, "L1")
    assert str(got.value) == str(want.value)
    # overflowing squares of finite data: inf scores, ranked last, no error
    data = torch.randn(64, 64)
    data[7, :8] = 3e20
    assert torch.equal(fused(data, 0.5, (1, 4), 4, "L2"), torch_path(monkeypatch, data, 0.5, (1, 4), 4, "L2"))
    assert one_read[-1] is True


def test_a_reused_mask_buffer_is_never_one_still_referenced(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_SPARE_MIN_BYTES", 1)
    monkeypatch.setattr(fused_cpu, "_SPARES", {})
    g = torch.Generator().manual_seed(8)
    data = [torch.randn(64, 32, generator=g) for _ in range(4)]
    want = [torch_path(monkeypatch, d, 0.5, (1, 4), 4, "L1") for d in data]
    first = fused(data[0], 0.5, (1, 4), 4, "L1")
    view = fused(data[1], 0.5, (1, 4), 4, "L1")[3:, :8]  # a view keeps its buffer in use too
    third = fused(data[2], 0.5, (1, 4), 4, "L1")  # both kept buffers in use: a new one
    assert len({first.data_ptr(), view.data_ptr() - view.storage_offset(), third.data_ptr()}) == 3
    assert torch.equal(first, want[0]) and torch.equal(view, want[1][3:, :8]) and torch.equal(third, want[2])
    ptr = first.data_ptr()
    del first
    fourth = fused(data[3], 0.5, (1, 4), 4, "L1")  # the first one's buffer, free again
    assert fourth.data_ptr() == ptr and torch.equal(fourth, want[3])
    assert torch.equal(view, want[1][3:, :8]) and torch.equal(third, want[2])
    monkeypatch.setenv("DISTSPARSE_FUSED_CPU_REUSE", "0")
    del fourth
    assert fused(data[3], 0.5, (1, 4), 4, "L1").data_ptr() != ptr


def test_the_kernel_runs_only_where_it_beats_the_torch_path(monkeypatch):
    data = torch.randn(64, 64)
    for block, zeros, dtype, runs in [((1, 4), 4, torch.float32, True), ((1, 4), 2, torch.float32, True),
                                      ((1, 8), 8, torch.float64, True), ((1, 8), 4, torch.float32, True),
                                      ((1, 8), 8, torch.float32, False), ((2, 2), 4, torch.float32, False),
                                      ((2, 2), 2, torch.float32, False), ((4, 1), 4, torch.float32, False)]:
        x = data.to(dtype)
        out = fused_cpu.fused_block_mask(x, 100, block, zeros, "L1", lambda: None)
        assert (out is not None) == runs, (block, zeros, dtype)
        assert torch.equal(masks.norm_block_mask(x, 0.5, block, zeros, "L1"),
                           torch_path(monkeypatch, x, 0.5, block, zeros, "L1"))


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_the_smallest_one_read_table_samples_one_block_in_sixteen_and_matches_the_torch_path(monkeypatch, norm):
    """2**18 blocks (1M float32 elements) with the real constants: a 2**14-block sample,
    whose bracket holds the cut, and the torch path's mask."""
    assert fused_cpu.sample_size(1 << 18) == 1 << 14 and fused_cpu.sample_size(1 << 22) == fused_cpu._SAMPLE
    outcomes = []
    real = fused_cpu._bracket_mask
    monkeypatch.setattr(fused_cpu, "_bracket_mask", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    data = torch.randn(1 << 16, 16, generator=torch.Generator().manual_seed(12))
    for level in (0.05, 0.5, 0.93):
        want = torch_path(monkeypatch, data, level, (1, 4), 4, norm)
        assert torch.equal(fused(data, level, (1, 4), 4, norm), want), level
    assert outcomes == [True] * 3


# -- split shards on the one-read path (distsparse.kernels.fused_shard.OneReadShard) -----------------------------


def _simulated_selection(sels):
    """comm.select_lowest's rounds with the all-reduces as plain sums (shards in row order)."""
    while not all(s.done for s in sels):
        total = torch.stack([s.histogram() for s in sels]).sum(0)
        for s in sels:
            s.advance(total)
    if not sels[0].needs_tie_prefix:
        return [0] * len(sels)
    counts = [s.local_ties() for s in sels]
    return [sum(counts[:i]) for i in range(len(sels))]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", ["random", "rounded"])
def test_one_read_shards_and_the_exact_selection_give_the_whole_mask(monkeypatch, threads, kind):
    """Three shards (one of a single row) of a 2**18-block table, each sampling the whole
    table: their summed counts hold the cut, and the candidates' selection settles the
    torch path's mask, ties (rounded data) to the lowest block index across shards."""
    from distsparse.kernels import fused_shard
    from distsparse.kernels.radix import ShardSelection

    g = torch.Generator().manual_seed(13)
    data = torch.randn(65_539, 16, generator=g)
    if kind == "rounded":  # ~800 distinct scores: ties at the cut, spread over the shards
        data = (data * 100).round() / 100
    n = data.numel() // 4
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for norm, level in (("L1", 0.5), ("L2", 0.9)):
            k = round(level * n)
            out = torch.empty(data.shape, dtype=torch.bool)
            ranges = [(0, 20_000), (20_000, 20_001), (20_001, 65_539)]
            shards = [fused_shard.OneReadShard(data, a, b, (1, 4), norm, out[a:b], k) for a, b in ranges]
            held, need, n_cand = fused_shard.OneReadShard.holds_cut(sum(s.status for s in shards), k)
            assert held and 0 < need < n_cand < n // 10, (need, n_cand)
            sels = [ShardSelection(s.candidates(), n_cand, need, 11) for s in shards]
            for shard, sel, before in zip(shards, sels, _simulated_selection(sels)):
                shard.settle(sel.pruned(before))
            assert torch.equal(out, torch_path(monkeypatch, data, level, (1, 4), 4, norm)), (norm, level)
    finally:
        torch.set_num_threads(old_threads)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_a_nan_with_its_sign_bit_set_is_refused_on_every_path(monkeypatch, norm):
    """-nan: its square keeps the sign bit (L2), so its score's key is negative, not above +inf's."""
    from distsparse.kernels import fused_shard

    data = torch.randn(1 << 16, 16, generator=torch.Generator().manual_seed(14))  # 2**18 blocks: one read
    data[40_000, 9] = -float("nan")
    assert int(data[40_000, 9].view(torch.int32)) < 0
    with pytest.raises(ValueError) as want:
        torch_path(monkeypatch, data, 0.5, (1, 4), 4, norm)
    for blocks in (1 << 18, (1 << 18) + 1):  # the one read; the three passes (one-read minimum above the table)
        monkeypatch.setattr(fused_cpu, "_BRACKET_MIN_BLOCKS", blocks)
        with pytest.raises(ValueError) as got:
            fused(data, 0.5, (1, 4), 4, norm)
        assert str(got.value) == str(want.value), blocks
    k = data.numel() // 8
    out = torch.empty(data.shape, dtype=torch.bool)
    assert fused_shard.OneReadShard(data, 30_000, 50_000, (1, 4), norm, out[30_000:50_000], k).nonfinite
    assert not fused_shard.OneReadShard(data, 0, 30_000, (1, 4), norm, out[:30_000], k).nonfinite
    assert fused_shard.FusedShard(data, 30_000, 50_000, (1, 4), norm, out[30_000:50_000]).nonfinite
