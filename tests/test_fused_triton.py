"""The fused Triton kernels (distsparse.kernels.fused_triton) give the torch path's scores and
masks bit for bit — run on CPU tensors under Triton's interpreter.

Triton fixes its mode (compiled or interpreted) for the whole process when it is imported,
so the cases run in a child process started with ``TRITON_INTERPRET=1``
(:func:`test_under_the_triton_interpreter`); nothing in this process imports triton. The
reference is ``masks.norm_block_mask`` / ``masks.block_scores`` on CPU with the numba
kernel off (``DISTSPARSE_FUSED_CPU=0``): the torch path, checked against torch.ao elsewhere.
Shapes are small (the interpreter runs numpy per program), and the kernels run with small
programs (``_BLOCK``) so that ties and histograms cross program boundaries.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
COMPILING = not INTERPRETED and os.environ.get("DISTSPARSE_TEST_TRITON_COMPILE") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _child(env_update: dict, timeout: float) -> None:
    env = dict(os.environ, **env_update)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]


if not INTERPRETED and not COMPILING:
    needs_triton = pytest.mark.skipif(not HAS_TRITON,
                                      reason="triton is not installed (pyproject extra 'gpu'; 'test' installs it)")

    @needs_triton
    def test_under_the_triton_interpreter():
        _child(dict(TRITON_INTERPRET="1", DISTSPARSE_FUSED_CPU="0"), timeout=540)

    @needs_triton
    def test_compiled_for_a_gpu():
        _child(dict(TRITON_INTERPRET="0", DISTSPARSE_TEST_TRITON_COMPILE="1"), timeout=540)

elif COMPILING:
    # Ahead-of-time compilation to PTX/cubin for an H100/H200 (sm_90) needs no GPU (ptxas ships
    # with triton): the kernels compile, and the score arithmetic is what the interpreter
    # cannot show — no fused multiply-add, a correctly rounded division.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distsparse.kernels import _fused_triton_jit as jit
    from distsparse.kernels import fused_triton

    PTR = {0: "*fp32", 1: "*fp64", 2: "*fp16", 3: "*i16"}
    KEYS = {0: "*i32", 1: "*i64", 2: "*i16", 3: "*i16"}

    def compile_ptx(fn, signature, constants):
        src = ASTSource(fn=fn, signature=dict(signature, **{k: "constexpr" for k in constants}), constexprs=constants)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]

    @pytest.mark.parametrize("kind,block", [(0, (1, 4)), (1, (2, 2)), (2, (3, 5)), (3, (4, 1))])
    def test_kernels_compile_without_fma_and_with_a_rounded_division(kind, block):
        bh, bw = block
        rounds = fused_triton.digit_rounds(fused_triton._KEY_BITS[kind])
        shift, width = rounds[0]
        ptx = compile_ptx(jit.score_kernel, dict(
            x_ptr=PTR[kind], keys_ptr=KEYS[kind], hist_ptr="*i32", flag_ptr="*i32", rows="i32", cols="i32",
            stride_r="i32", stride_c="i32", n_bc="i32", n_blocks="i32", inf_key="i64" if kind == 1 else "i32",
            l2="i32"), dict(BH=bh, BW=bw, BWP=triton.next_power_of_2(bw), KIND=kind, SHIFT=shift, BINS=1 << width,
                            BLOCK=1024))
        assert "fma." not in ptx and ".ftz" not in ptx  # no contraction, no flushing of subnormals
        assert "div.rn." in ptx and "div.full" not in ptx and "div.approx" not in ptx
        for whole in (True, False):
            compile_ptx(jit.mask_kernel, dict(
                x_ptr=PTR[kind], keys_ptr=KEYS[kind], state_ptr="*i64", ties_before_ptr="*i64", mask_ptr="*u8",
                rows="i32", cols="i32", stride_r="i32", stride_c="i32", n_bc="i32", n_blocks="i32", zeros="i32",
                l2="i32"), dict(BH=bh, BW=bw, BWP=triton.next_power_of_2(bw), PP=triton.next_power_of_2(bh * bw),
                                KIND=kind, WHOLE=whole, BLOCK=1024))
        for i, (shift, width) in enumerate(rounds[:3]):
            compile_ptx(jit.pick_kernel, dict(hist_ptr="*i32", state_ptr="*i64", k="i64"),
                        dict(FIRST=i == 0, WIDTH=width, BINS=1 << width))
            if i:
                compile_ptx(jit.refine_kernel, dict(keys_ptr=KEYS[kind], cand_ptr="*i64" if kind == 1 else "*i32",
                                                    ncand_ptr="*i32", hist_ptr="*i32", state_ptr="*i64",
                                                    n_blocks="i32", cap="i32"),
                            dict(KIND=kind, HIGH=shift + width, SHIFT=shift, BINS=1 << width, BLOCK=1024, MODE=i))
        compile_ptx(jit.ties_kernel, dict(keys_ptr=KEYS[kind], state_ptr="*i64", counts_ptr="*i64", n_blocks="i32"),
                    dict(KIND=kind, BLOCK=1024))

else:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from distsparse import masks
    from distsparse.kernels import fused_triton

    DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    BLOCKS = [(1, 4), (2, 2), (3, 5), (4, 1)]

    @pytest.fixture(autouse=True)
    def small_programs(monkeypatch):
        """64 blocks per program: every shape below spans several programs."""
        monkeypatch.setattr(fused_triton, "_BLOCK", 64)

    def n_blocks(x, block):
        m = masks.as_matrix(x)
        return -(-m.shape[0] // block[0]) * -(-m.shape[1] // block[1])

    def fused(x, k, block, zeros, norm):
        out = fused_triton.fused_block_mask(masks.as_matrix(x), k, block, zeros, norm,
                                            lambda: masks._check_finite(x))
        assert out is not None, "the Triton kernels did not run"
        return out.reshape(x.shape)

    def reference(x, k, block, zeros, norm):
        """The torch path's mask for exactly k pruned blocks (a level that rounds to k)."""
        n = n_blocks(x, block)
        level = k / n if k else 0.25 / n  # > 0, rounds to 0: the full path, nothing pruned
        assert round(level * n) == k
        return masks.norm_block_mask(x, level, block, zeros, norm)

    def tied(shape, dtype, seed):
        """Small integers: many blocks with exactly equal scores."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(-3, 4, shape, generator=g).to(dtype)

    def same_bits(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))

    def test_digit_rounds_cover_the_key_bits():
        assert fused_triton.digit_rounds(32) == [(20, 11), (10, 10), (0, 10)]
        assert fused_triton.digit_rounds(16) == [(7, 8), (0, 7)]
        assert [w for _, w in fused_triton.digit_rounds(64)] == [11, 11, 11, 10, 10, 10]

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("norm", ["L1", "L2"])
    def test_scores_bit_equal(dtype, norm):
        g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, norm)).encode()))
        for block in BLOCKS:
            # (12, 20) tiles every block shape (the strided-add path); (13, 11) cuts them all
            for shape in [(12, 20), (13, 11)]:
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
                got = fused_triton.block_scores(x, block, norm)
                assert same_bits(got, masks.block_scores(x, block, norm)), (block, shape)

    def test_scores_of_a_strided_view():
        x = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
        for view in (x.t(), x[:, 1::3], x[2:17]):
            for block in BLOCKS:
                assert same_bits(fused_triton.block_scores(view, block, "L2"), masks.block_scores(view, block, "L2"))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("norm", ["L1", "L2"])
    @pytest.mark.parametrize("block", BLOCKS)
    def test_masks_bit_equal(dtype, norm, block):
        g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, norm, block)).encode()))
        values = block[0] * block[1]
        x = torch.randn(29, 23, generator=g, dtype=torch.float64).to(dtype)  # ragged for every block shape
        n = n_blocks(x, block)
        for data, k in ((x, n // 2), (tied(x.shape, dtype, 1), (3 * n) // 5)):
            for zeros in sorted({values, max(1, values // 2)}):
                assert torch.equal(fused(data, k, block, zeros, norm), reference(data, k, block, zeros, norm)), \
                    (k, zeros)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_ties_go_to_the_lowest_block_index(dtype):
        x = torch.ones(40, 16, dtype=dtype)  # 160 equal (1, 4) blocks over 3 programs
        x[7, :4] = 0.5  # one block below the tie
        for k in (1, 33, 65, 160):
            got = fused(x, k, (1, 4), 4, "L1").reshape(-1, 4)[:, 0]
            want = torch.ones(160, dtype=torch.bool)
            want[28] = False
            want[[i for i in range(160) if i != 28][: k - 1]] = False
            assert torch.equal(got, want), k
            assert torch.equal(fused(x, k, (1, 4), 4, "L1"), reference(x, k, (1, 4), 4, "L1"))

    def test_zeros_per_block_ties_to_the_lower_position():
        x = torch.tensor([[2.0, -1.0, 1.0, 1.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
        for zeros, want in ((1, [1, 0, 1, 1, 1, 1]), (2, [1, 0, 0, 1, 1, 1]), (3, [1, 0, 0, 0, 1, 1])):
            got = fused(x, 1, (2, 3), zeros, "L1")  # block 0 (left) has the lower score: pruned
            assert got[0].tolist() == [bool(v) for v in want[:3]] + [True] * 3
            assert torch.equal(got, reference(x, 1, (2, 3), zeros, "L1"))
        # a block cut by the edge keeps all but its zeros smallest *valid* elements
        y = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
        for zeros in (1, 2, 3):
            assert torch.equal(fused(y, 2, (2, 3), zeros, "L2"), reference(y, 2, (2, 3), zeros, "L2")), zeros

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_nothing_and_everything(dtype):
        x = torch.randn(9, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
        for block in ((2, 2), (3, 5)):
            n = n_blocks(x, block)
            assert bool(fused(x, 0, block, 4, "L2").all())
            assert torch.equal(fused(x, n, block, 2, "L1"), reference(x, n, block, 2, "L1"))
            assert not bool(fused(x, n, block, block[0] * block[1], "L1").any())

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
    def test_k_at_histogram_bin_boundaries(dtype):
        """k ending exactly at the last key of a first- or second-round digit, and one either side."""
        x = torch.rand(24, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype) ** 4
        scores = masks.block_scores(x, (2, 2), "L1")
        keys = scores.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[scores.element_size()])
        keys = keys.to(torch.int64).sort().values
        rounds = fused_triton.digit_rounds(8 * scores.element_size())
        boundaries = []
        for shift, _ in rounds[:2]:
            digits = keys >> shift
            ends = torch.nonzero(digits[1:] != digits[:-1]).reshape(-1) + 1  # k = ends: a digit's last key
            assert ends.numel() >= 2, shift
            boundaries += [int(ends[0]), int(ends[ends.numel() // 2])]
        for k in sorted(set(boundaries)):
            for kk in (k - 1, k, k + 1):
                assert torch.equal(fused(x, kk, (2, 2), 4, "L1"), reference(x, kk, (2, 2), 4, "L1")), kk

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_nonfinite_data_is_refused_with_the_torch_paths_error(bad):
        x = torch.randn(10, 12, generator=torch.Generator().manual_seed(9))
        x[3, 5] = bad
        with pytest.raises(ValueError) as want:
            masks.norm_block_mask(x, 0.5, (2, 2), 4, "L1")
        with pytest.raises(ValueError) as got:
            fused(x, 15, (2, 2), 4, "L1")
        assert str(got.value) == str(want.value) and "NaN/Inf" in str(got.value)

    def test_overflowing_squares_rank_last_and_are_not_refused():
        """Finite float16 data whose squares overflow: +inf scores, no error, same mask."""
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(11)).to(torch.float16)
        x[0, :4] = 60000.0
        x[5, 2] = -300.0
        called = []
        out = fused_triton.fused_block_mask(x, 40, (1, 4), 2, "L2", lambda: called.append(1))
        assert called == [1]
        assert torch.equal(out, reference(x, 40, (1, 4), 2, "L2"))

    def test_disabled_by_the_environment(monkeypatch):
        monkeypatch.setenv("DISTSPARSE_FUSED_TRITON", "0")
        assert fused_triton.fused_block_mask(torch.ones(4, 4), 1, (2, 2), 4, "L1", lambda: None) is None

    def test_unsupported_inputs_fall_back():
        assert fused_triton.fused_block_mask(torch.ones(4, 4, dtype=torch.int32), 1, (2, 2), 4, "L1",
                                             lambda: None) is None
        assert fused_triton.fused_block_mask(torch.ones(64, 64), 1, (64, 64), 4, "L1", lambda: None) is None

    def test_repeated_launches_reuse_their_buffers():
        """The graph-capturable step reset its counters each launch: new data, new correct mask."""
        x = torch.randn(20, 24, generator=torch.Generator().manual_seed(13))
        step = fused_triton.GraphedBlockMask(x, 30, (2, 3), 6, "L2", graph=False)
        for seed in (1, 2):
            first = step().clone()
            assert torch.equal(first, reference(x, 30, (2, 3), 6, "L2"))
            assert int(step.nonfinite) == 0
            x.copy_(torch.randn(20, 24, generator=torch.Generator().manual_seed(seed)))
        x[0, 0] = float("nan")
        step()
        assert int(step.nonfinite) == 1

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_later_rounds_read_the_compacted_candidates_or_every_key(monkeypatch, dtype):
        x = torch.randn(40, 36, generator=torch.Generator().manual_seed(17), dtype=dtype) ** 2
        for k in (1, 150, 359):
            plan = fused_triton._Plan(x, k, (2, 2), 4, "L1")
            plan.launch()
            assert 0 < int(plan.ncand) == int(plan.state[2]) <= plan.cap  # the first digit's candidates, compacted
            assert torch.equal(plan.mask, reference(x, k, (2, 2), 4, "L1"))
        monkeypatch.setattr(fused_triton, "_candidate_capacity", lambda n: 1)  # they never fit: scan every key
        for k in (1, 150, 359):
            plan = fused_triton._Plan(x, k, (2, 2), 4, "L1")
            plan.launch()
            assert int(plan.ncand) == 0 or int(plan.state[2]) <= 1
            assert torch.equal(plan.mask, reference(x, k, (2, 2), 4, "L1")), k

    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.integers(1, 30), cols=st.integers(1, 30), bh=st.integers(1, 4), bw=st.integers(1, 5),
           dtype=st.sampled_from(DTYPES), norm=st.sampled_from(["L1", "L2"]), ties=st.booleans(),
           fraction=st.floats(0, 1), zeros_fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
    def test_property_bit_equal(rows, cols, bh, bw, dtype, norm, ties, fraction, zeros_fraction, seed):
        x = tied((rows, cols), dtype, seed) if ties else \
            torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        n = n_blocks(x, (bh, bw))
        k = round(fraction * n)
        zeros = max(1, round(zeros_fraction * bh * bw))
        assert torch.equal(fused(x, k, (bh, bw), zeros, norm), reference(x, k, (bh, bw), zeros, norm))
