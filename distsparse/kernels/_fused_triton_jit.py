"""The Triton kernels of :mod:`distsparse.kernels.fused_triton` (imported on first use, so
``import distsparse`` does not pay Triton's import). See that module for the design.

Data kinds (``KIND``): 0 float32, 1 float64, 2 float16, 3 bfloat16. bfloat16 data and scores
travel as their int16 bits and are converted with integer arithmetic (round to nearest
even, as ``c10::BFloat16``), which runs the same compiled and under the interpreter.
Launch every kernel with ``enable_fp_fusion=False``: a fused multiply-add of ``x*x`` into
the running sum would round once where torch rounds twice.
"""

import triton
import triton.language as tl


@triton.jit
def _bf16_round(v):
    """float32 -> the float32 value of its bfloat16 rounding (nearest, ties to even); v >= +0."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _magnitudes(x_ptr, offs, ok, KIND: tl.constexpr, l2):
    """|x| or x*x rounded to the data's dtype (as torch computes them), held in the
    accumulation dtype: float32 for the 16-bit kinds, else the data's own."""
    if KIND == 3:
        bits = tl.load(x_ptr + offs, mask=ok, other=0).to(tl.int32) & 0xFFFF
        v = (bits << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(x_ptr + offs, mask=ok, other=0)
        if KIND == 2:
            v = v.to(tl.float32)
    if l2:  # a runtime flag (uniform branch): one compiled kernel serves L1 and L2
        m = v * v
    else:
        m = tl.abs(v)
    if KIND == 2:
        m = m.to(tl.float16).to(tl.float32)
    if KIND == 3:
        m = _bf16_round(m)
    return m


@triton.jit
def _load_keys(keys_ptr, f, live, KIND: tl.constexpr):
    """Order keys of the scores (their bit patterns, sign bit cleared: scores are >= +0,
    a NaN's sign is meaningless), int32 for the 16/32-bit kinds, int64 for float64."""
    raw = tl.load(keys_ptr + f, mask=live, other=0)
    if KIND == 1:
        return raw & 0x7FFFFFFFFFFFFFFF
    elif KIND == 0:
        return raw & 0x7FFFFFFF
    else:
        return raw.to(tl.int32) & 0x7FFF


@triton.jit(do_not_specialize=["l2"])
def score_kernel(x_ptr, keys_ptr, hist_ptr, flag_ptr, rows, cols, stride_r, stride_c, n_bc, n_blocks, inf_key, l2,
                 BH: tl.constexpr, BW: tl.constexpr, BWP: tl.constexpr, KIND: tl.constexpr,
                 SHIFT: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """One read of the data: each block's score (sum from 0 in row-major order within the
    block, one correctly rounded division by its valid elements), its key, the first
    digit's histogram (one atomic add per non-empty bin per program) and the non-finite flag."""
    pid = tl.program_id(0)
    f = pid * BLOCK + tl.arange(0, BLOCK)
    live = f < n_blocks
    br = f // n_bc
    bc = f % n_bc
    r0 = br * BH
    c0 = bc * BW
    j = tl.arange(0, BWP)
    c = c0[:, None] + j[None, :]
    col_ok = live[:, None] & (j[None, :] < BW) & (c < cols)
    if KIND == 1:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for a in range(BH):
        r = r0 + a
        ok = col_ok & (r < rows)[:, None]
        offs = r.to(tl.int64)[:, None] * stride_r + c.to(tl.int64) * stride_c
        m = _magnitudes(x_ptr, offs, ok, KIND, l2)
        for b in range(BW):
            # the one element of column b (adding zeros to it is exact): the adds stay in order
            acc += tl.sum(tl.where(j[None, :] == b, m, 0.0), axis=1)
    count = (tl.minimum(r0 + BH, rows) - r0) * (tl.minimum(c0 + BW, cols) - c0)
    count = tl.where(live, count, 1)
    if KIND == 1:
        score = acc / count.to(tl.float64)  # float64 division is correctly rounded
        key = score.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        tl.store(keys_ptr + f, score.to(tl.int64, bitcast=True), mask=live)
    else:
        score = tl.div_rn(acc, count.to(tl.float32))  # `/` on float32 is an approximation on CUDA
        if KIND == 0:
            bits = score.to(tl.int32, bitcast=True)
            tl.store(keys_ptr + f, bits, mask=live)
            key = bits & 0x7FFFFFFF
        elif KIND == 2:
            bits = score.to(tl.float16).to(tl.int16, bitcast=True)
            tl.store(keys_ptr + f, bits, mask=live)
            key = bits.to(tl.int32) & 0x7FFF
        else:
            bits = _bf16_round(score).to(tl.int32, bitcast=True) >> 16
            tl.store(keys_ptr + f, bits.to(tl.int16), mask=live)
            key = bits & 0x7FFF
    bad = live & (key >= inf_key)
    tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))
    digit = (key >> SHIFT).to(tl.int32)
    h = tl.histogram(digit, BINS, mask=live)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), h, mask=h > 0)


@triton.jit(do_not_specialize=["k"])
def pick_kernel(hist_ptr, state_ptr, k, FIRST: tl.constexpr, WIDTH: tl.constexpr, BINS: tl.constexpr):
    """One program: the digit holding the remaining-th lowest candidate key, on the device.
    ``state``: [key prefix decided so far, keys still to prune among the candidates]."""
    if FIRST:
        prefix = tl.zeros([], dtype=tl.int64)
        remaining = tl.zeros([], dtype=tl.int64) + k
    else:
        prefix = tl.load(state_ptr)
        remaining = tl.load(state_ptr + 1)
    h = tl.load(hist_ptr + tl.arange(0, BINS)).to(tl.int64)
    cum = tl.cumsum(h, 0)
    lower = cum < remaining  # bins wholly pruned: the digit is the first bin not among them
    digit = tl.sum(lower.to(tl.int64), axis=0)
    below = tl.sum(tl.where(lower, h, 0), axis=0)
    tl.store(state_ptr, (prefix << WIDTH) | digit)
    tl.store(state_ptr + 1, remaining - below)
    if FIRST:  # the candidates' count: whether they fit the compacted buffer (refine_kernel)
        tl.store(state_ptr + 2, tl.sum(tl.where(tl.arange(0, BINS) == digit, h, 0), axis=0))


@triton.jit(do_not_specialize=["cap"])
def refine_kernel(keys_ptr, cand_ptr, ncand_ptr, hist_ptr, state_ptr, n_blocks, cap, KIND: tl.constexpr,
                  HIGH: tl.constexpr, SHIFT: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
                  MODE: tl.constexpr):
    """Histogram of digit (SHIFT, log2 BINS) over the candidates: keys whose bits from
    HIGH up equal the prefix chosen so far. MODE 1 (the first refinement) scans every key
    and, when the first digit's candidates fit ``cap``, also appends them to ``cand``
    (any order: only their histograms are needed); MODE 2 (later rounds) then reads the
    ``cand`` list instead of every key — else it scans every key again."""
    pid = tl.program_id(0)
    f = pid * BLOCK + tl.arange(0, BLOCK)
    prefix = tl.load(state_ptr)
    compacted = tl.load(state_ptr + 2) <= cap
    if MODE == 2 and compacted:
        live = f < tl.load(ncand_ptr)
        key = tl.load(cand_ptr + f, mask=live, other=0)
    else:
        live = f < n_blocks
        key = _load_keys(keys_ptr, f, live, KIND)
    match = live & ((key >> HIGH) == prefix)
    digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
    h = tl.histogram(digit, BINS, mask=match)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), h, mask=h > 0)
    if MODE == 1 and compacted:
        hit = match.to(tl.int32)
        count = tl.sum(hit, axis=0)
        if count > 0:
            base = tl.atomic_add(ncand_ptr, count)
            tl.store(cand_ptr + base + tl.cumsum(hit, 0) - hit, key, mask=match)


@triton.jit
def ties_kernel(keys_ptr, state_ptr, counts_ptr, n_blocks, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Per program, how many keys equal the threshold (for the tie rank in block order)."""
    pid = tl.program_id(0)
    f = pid * BLOCK + tl.arange(0, BLOCK)
    live = f < n_blocks
    threshold = tl.load(state_ptr)
    key = _load_keys(keys_ptr, f, live, KIND)
    tl.store(counts_ptr + pid, tl.sum((live & (key == threshold)).to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["l2", "zeros"])
def mask_kernel(x_ptr, keys_ptr, state_ptr, ties_before_ptr, mask_ptr, rows, cols, stride_r, stride_c, n_bc,
                n_blocks, zeros, l2, BH: tl.constexpr, BW: tl.constexpr, BWP: tl.constexpr, PP: tl.constexpr,
                KIND: tl.constexpr, WHOLE: tl.constexpr, BLOCK: tl.constexpr):
    """One compare-and-write pass: a block is pruned when its key is below the threshold,
    or equal to it and among the first ``remaining`` equal keys in block order; a pruned
    block keeps all but its ``zeros`` smallest valid elements (ties to the lower position)."""
    pid = tl.program_id(0)
    f = pid * BLOCK + tl.arange(0, BLOCK)
    live = f < n_blocks
    threshold = tl.load(state_ptr)
    remaining = tl.load(state_ptr + 1)
    key = _load_keys(keys_ptr, f, live, KIND)
    tie = live & (key == threshold)
    tie64 = tie.to(tl.int64)
    rank = tl.load(ties_before_ptr + pid) + tl.cumsum(tie64, 0) - tie64
    pruned = live & ((key < threshold) | (tie & (rank < remaining)))
    br = f // n_bc
    bc = f % n_bc
    r0 = br * BH
    c0 = bc * BW
    if WHOLE:
        j = tl.arange(0, BWP)
        c = c0[:, None] + j[None, :]
        col_ok = live[:, None] & (j[None, :] < BW) & (c < cols)
        keep = tl.broadcast_to((~pruned)[:, None], [BLOCK, BWP]).to(tl.uint8)
        for a in range(BH):
            r = r0 + a
            ok = col_ok & (r < rows)[:, None]
            tl.store(mask_ptr + r.to(tl.int64)[:, None] * cols + c, keep, mask=ok)
    else:
        p = tl.arange(0, PP)
        r = r0[:, None] + (p // BW)[None, :]
        c = c0[:, None] + (p % BW)[None, :]
        ok = live[:, None] & (p < BH * BW)[None, :] & (r < rows) & (c < cols)
        m = _magnitudes(x_ptr, r.to(tl.int64) * stride_r + c.to(tl.int64) * stride_c, ok & pruned[:, None], KIND, l2)
        below = tl.zeros([BLOCK, PP], dtype=tl.int32)
        for q in range(BH * BW):
            rq = r0 + q // BW
            cq = c0 + q % BW
            ok_q = pruned & (rq < rows) & (cq < cols)
            mq = _magnitudes(x_ptr, rq.to(tl.int64) * stride_r + cq.to(tl.int64) * stride_c, ok_q, KIND, l2)
            before = (mq[:, None] < m) | ((mq[:, None] == m) & (q < p[None, :]))
            below += (before & ok_q[:, None]).to(tl.int32)
        zero = pruned[:, None] & (below < zeros)
        tl.store(mask_ptr + r.to(tl.int64) * cols + c, (~zero).to(tl.uint8), mask=ok)
