"""The numba kernels of :mod:`distsparse.kernels.fused_cpu` (imported on first use, so
``import distsparse`` does not pay numba's import). See that module for the design."""

import numpy as np
from numba import njit

@njit(cache=True, inline="always")
def _magnitude(v, l2):
    return v * v if l2 else abs(v)

@njit(cache=True, inline="always")
def _load_key(mode, kview, buf, side, r0, c0, j, bw, nbytes, flat):
    # mode 0: an integer view of the mask holds the key in the block's first row;
    # 1: its bytes, row-major over the block's region; 2: a side array.
    if mode == 0:
        return np.int64(kview[r0, j])
    if mode == 2:
        return side[flat]
    key = np.int64(0)
    a = 0
    b = 0
    for t in range(nbytes):  # byte t at (t // bw, t % bw), without a division per byte
        key |= np.int64(buf[r0 + a, c0 + b]) << (8 * t)
        b += 1
        if b == bw:
            b = 0
            a += 1
    return key

@njit(cache=True, nogil=True)
def _score_flat(xb, b0, b1, bw, l2, mode, divisors, acc, keys, kflat, side, shift, inf_key, h):
    """Blocks ``[b0, b1)`` of one-row blocks tiling the data (``xb``: blocks × bw): a
    long loop the compiler vectorises across blocks, same adds in the same order."""
    bad = 0
    step = acc.size
    div = divisors[bw]
    for s0 in range(b0, b1, step):
        m = min(step, b1 - s0)
        xs = xb[s0 : s0 + m]  # a slice: the compiler then knows the indices are in range
        # 0 + m0 = m0 (magnitudes are >= +0), so each sum starts at its first element;
        # explicit widths let the compiler vectorise across blocks.
        if bw == 4:
            for j in range(m):
                acc[j] = (_magnitude(xs[j, 0], l2) + _magnitude(xs[j, 1], l2)
                          + _magnitude(xs[j, 2], l2) + _magnitude(xs[j, 3], l2)) / div
        elif bw == 2:
            for j in range(m):
                acc[j] = (_magnitude(xs[j, 0], l2) + _magnitude(xs[j, 1], l2)) / div
        elif bw == 8:
            for j in range(m):
                acc[j] = (_magnitude(xs[j, 0], l2) + _magnitude(xs[j, 1], l2)
                          + _magnitude(xs[j, 2], l2) + _magnitude(xs[j, 3], l2)
                          + _magnitude(xs[j, 4], l2) + _magnitude(xs[j, 5], l2)
                          + _magnitude(xs[j, 6], l2) + _magnitude(xs[j, 7], l2)) / div
        else:
            for j in range(m):
                t = divisors[0]
                for b in range(bw):
                    t += _magnitude(xs[j, b], l2)
                acc[j] = t / div
        for j in range(m):
            key = np.int64(keys[j])
            bad += (key >= inf_key) | (key < 0)  # < 0: a NaN whose sign survived (L2: -nan * -nan)
            h[j & 3, key >> shift] += 1
        if mode == 0:
            kf = kflat[s0 : s0 + m]
            for j in range(m):
                kf[j] = keys[j]
        else:
            sd = side[s0 : s0 + m]
            for j in range(m):
                sd[j] = keys[j]
    return bad

@njit(cache=True, nogil=True)
def _score_rows(x, i0, i1, bh, bw, l2, mode, nbytes, divisors, acc, keys, kview, buf, side, shift, inf_key, h):
    rows, cols = x.shape
    n_bc = -(-cols // bw)
    full = cols // bw
    bad = 0
    for i in range(i0, i1):
        r0 = i * bh
        r1 = min(rows, r0 + bh)
        for j in range(n_bc):
            acc[j] = divisors[0]
        for r in range(r0, r1):
            row = x[r]
            for j in range(full):
                s = acc[j]
                for b in range(bw):
                    s += _magnitude(row[j * bw + b], l2)
                acc[j] = s
            if full < n_bc:
                s = acc[full]
                for col in range(full * bw, cols):
                    s += _magnitude(row[col], l2)
                acc[full] = s
        div = divisors[(r1 - r0) * bw]
        for j in range(full):
            acc[j] = acc[j] / div
        if full < n_bc:
            acc[full] = acc[full] / divisors[(r1 - r0) * (cols - full * bw)]
        for j in range(n_bc):
            key = np.int64(keys[j])
            bad += (key >= inf_key) | (key < 0)  # < 0: a NaN whose sign survived (L2: -nan * -nan)
            h[j & 3, key >> shift] += 1
        if mode == 0:
            for j in range(n_bc):
                kview[r0, j] = keys[j]
        elif mode == 2:
            for j in range(n_bc):
                side[i * n_bc + j] = keys[j]
        else:
            for j in range(n_bc):
                key = np.int64(keys[j])
                a = 0
                b = 0
                for t in range(nbytes):  # byte t at (t // bw, t % bw), without a division per byte
                    buf[r0 + a, j * bw + b] = np.uint8((key >> (8 * t)) & 0xFF)
                    b += 1
                    if b == bw:
                        b = 0
                        a += 1
    return bad

@njit(cache=True, nogil=True)
def _gather_rows(mode, kview, buf, side, i0, i1, bh, bw, n_bc, nbytes, shift, digit, o, cand_keys, cand_idx):
    if mode == 0 and bh == 1:
        kf = kview.reshape(-1)
        for f in range(i0 * n_bc, i1 * n_bc):
            key = np.int64(kf[f])
            if key >> shift == digit:
                cand_keys[o] = key
                cand_idx[o] = f
                o += 1
        return
    for i in range(i0, i1):
        for j in range(n_bc):
            flat = i * n_bc + j
            key = _load_key(mode, kview, buf, side, i * bh, j * bw, j, bw, nbytes, flat)
            if key >> shift == digit:
                cand_keys[o] = key
                cand_idx[o] = flat
                o += 1

@njit(cache=True, nogil=True)
def _write_rows(x, i0, i1, mode, kview, buf, side, bh, bw, l2, nbytes, ones, threshold, last_tie, zeros):
    rows, cols = x.shape
    n_bc = buf.shape[1] // bw
    values = bh * bw
    if zeros >= values and mode == 0 and bh == 1:  # one key-wide word per block, flat
        kf = kview.reshape(-1)
        for f in range(i0 * n_bc, i1 * n_bc):
            key = np.int64(kf[f])
            kf[f] = ones * (1 - ((key < threshold) | ((key == threshold) & (f <= last_tie))))
        return
    if zeros >= values:  # whole blocks: a branch-free compare and store
        for i in range(i0, i1):
            r0 = i * bh
            for j in range(n_bc):
                flat = i * n_bc + j
                key = _load_key(mode, kview, buf, side, r0, j * bw, j, bw, nbytes, flat)
                keep = 1 - ((key < threshold) | ((key == threshold) & (flat <= last_tie)))
                if mode == 0:
                    for a in range(bh):
                        kview[r0 + a, j] = ones * keep
                else:
                    for a in range(bh):
                        for b in range(bw):
                            buf[r0 + a, j * bw + b] = np.uint8(keep)
        return
    pos_a = np.empty(values, np.int64)
    pos_b = np.empty(values, np.int64)
    mags = np.empty(values, x.dtype)
    for i in range(i0, i1):
        r0 = i * bh
        for j in range(n_bc):
            c0 = j * bw
            flat = i * n_bc + j
            key = _load_key(mode, kview, buf, side, r0, c0, j, bw, nbytes, flat)
            for a in range(bh):
                for b in range(bw):
                    buf[r0 + a, c0 + b] = 1
            if not (key < threshold or (key == threshold and flat <= last_tie)):
                continue
            # pruned: zero the `zeros` smallest valid elements (ties to the lower position)
            n = 0
            for a in range(bh):
                for b in range(bw):
                    if r0 + a < rows and c0 + b < cols:
                        mags[n] = _magnitude(x[r0 + a, c0 + b], l2)
                        pos_a[n] = r0 + a
                        pos_b[n] = c0 + b
                        n += 1
            for e in range(n):  # branch-free ranks: random data mispredicts every branch
                below = 0
                for f in range(n):
                    below += (mags[f] < mags[e]) | ((f < e) & (mags[f] == mags[e]))
                buf[pos_a[e], pos_b[e]] = below >= zeros

@njit(cache=True, nogil=True)
def _sample_scores(xb, n_blocks, bw, l2, divisors, scores):
    """The scores of ``scores.size`` blocks spread evenly over the one-row blocks ``xb``
    (block ``s * n_blocks // size`` for sample ``s``), same arithmetic as the full pass."""
    size = scores.size
    div = divisors[bw]
    for s in range(size):
        f = s * n_blocks // size
        t = divisors[0]
        for b in range(bw):
            t += _magnitude(xb[f, b], l2)
        scores[s] = t / div

@njit(cache=True, nogil=True)
def _bracket_flat(xb, b0, b1, bw, l2, divisors, acc, keys, flags, words8, busy, kflat, ones, hi, lo_key, hi_key,
                  cand_keys, cand_idx):
    """One read of blocks ``[b0, b1)`` of one-row, one-key-wide blocks (``xb``: blocks ×
    bw; ``kflat``: one mask word per block) with a bracket ``[lo_key, hi_key]`` around
    the k-th lowest key: writes the final word of every block outside it (0 below, all
    ones above: ``hi`` is ``hi_key``'s score, scores ``>= +0`` compare as their keys), 0
    for the blocks inside it, whose keys and flat indices it gathers in row-major order.
    ``keys`` is the integer view of the scratch ``acc``; ``flags`` ``acc.size`` (rounded
    up to 8) bytes of scratch, ``words8`` the same as uint64, ``busy`` int64 scratch as
    long as ``words8``. Returns (the largest key,
    or a negative key when some key is: non-finite scores when ``>=`` +inf's or negative,
    blocks below the bracket, blocks inside it),
    the latter counted past ``cand_keys.size`` (then the caller falls back)."""
    top = lo_key - lo_key  # 0 in the keys' type
    sign = top  # the keys OR-ed: negative when some key is (a NaN keeping its sign bit: L2's -nan * -nan)
    below = 0
    n = 0
    cap = cand_keys.size
    step = acc.size
    div = divisors[bw]
    zero = ones - ones  # in the words' type
    x1 = xb.reshape(-1)  # flat indexing: the compiler vectorises it better than [j, b]
    for s0 in range(b0, b1, step):
        m = min(step, b1 - s0)
        xs = x1[s0 * bw : (s0 + m) * bw]
        kf = kflat[s0 : s0 + m]
        # Branch-free loops the compiler vectorises; the sum starts at the first magnitude
        # (0 + m0 = m0: magnitudes are >= +0), in the torch path's order.
        if bw == 4:
            for j in range(m):
                t = (_magnitude(xs[4 * j], l2) + _magnitude(xs[4 * j + 1], l2)
                     + _magnitude(xs[4 * j + 2], l2) + _magnitude(xs[4 * j + 3], l2)) / div
                acc[j] = t
                kf[j] = ones if t > hi else zero
        elif bw == 8:
            for j in range(m):
                t = (_magnitude(xs[8 * j], l2) + _magnitude(xs[8 * j + 1], l2)
                     + _magnitude(xs[8 * j + 2], l2) + _magnitude(xs[8 * j + 3], l2)
                     + _magnitude(xs[8 * j + 4], l2) + _magnitude(xs[8 * j + 5], l2)
                     + _magnitude(xs[8 * j + 6], l2) + _magnitude(xs[8 * j + 7], l2)) / div
                acc[j] = t
                kf[j] = ones if t > hi else zero
        else:
            for j in range(m):
                t = divisors[0]
                for b in range(bw):
                    t += _magnitude(xs[bw * j + b], l2)
                t = t / div
                acc[j] = t
                kf[j] = ones if t > hi else zero
        inside = 0
        for j in range(m):  # in the keys' own width (lo_key, hi_key: the same type)
            key = keys[j]
            top = max(top, key)
            sign |= key
            below += key < lo_key
            hit = (key >= lo_key) & (key <= hi_key)
            inside += hit
            flags[j] = hit
        if inside == 0:
            continue
        if n + inside + 8 > cap:  # more than planned: count only (the caller falls back)
            n += inside
            continue
        # Candidates are ~2 %: list the 8-flag words holding any (branch-free: no
        # mispredictions), then compact those words' flags.
        nw = 0
        for w in range((m + 7) // 8):
            busy[nw] = w
            nw += words8[w] != 0
        for i in range(nw):
            w = busy[i]
            for j in range(8 * w, min(8 * w + 8, m)):
                cand_keys[n] = keys[j]
                cand_idx[n] = s0 + j
                n += flags[j]
    return (sign if sign < 0 else top), below, n

@njit(cache=True, nogil=True)
def _settle(cand_keys, cand_idx, need, kflat, ones):
    """Prune the ``need`` lowest candidates (keys, flat indices in row-major order; ties
    to the lowest index) and keep the others: writes every candidate's word (the read
    wrote 0 for them). The k-th key is found by one histogram of the candidates (at most
    2**14 bins over their range) and a partition of its bin only."""
    lo = cand_keys.min()
    span = cand_keys.max() - lo
    shift = 0
    while (span >> shift) >= (1 << 14):
        shift += 1
    counts = np.zeros((span >> shift) + 1, dtype=np.int64)
    for key in cand_keys:
        counts[(key - lo) >> shift] += 1
    below = 0  # candidates in the bins before the one holding the need-th lowest
    b = 0
    while below + counts[b] < need:
        below += counts[b]
        b += 1
    in_bin = np.empty(counts[b], dtype=cand_keys.dtype)
    n = 0
    for key in cand_keys:
        if (key - lo) >> shift == b:
            in_bin[n] = key
            n += 1
    threshold = np.partition(in_bin, need - below - 1)[need - below - 1]
    for key in in_bin:
        below += key < threshold
    ties = need - below  # >= 1: pruned among the keys equal to the threshold, lowest index first
    seen = 0
    for c in range(cand_keys.size):  # branch-free
        key = cand_keys[c]
        equal = key == threshold
        seen += equal
        keep = (key > threshold) | (equal & (seen > ties))
        kflat[cand_idx[c]] = ones * keep
