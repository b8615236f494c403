"""The numba kernels behind layers/kernels/cpu_kernels.py, defined at module level.

Importing this module imports numba, so only ``cpu_kernels.kernels()`` imports it, the first
time a kernel is needed; cpu_kernels.py tells what each kernel replaces and when it runs.

Every kernel is a module-level function with ``cache=True``. numba keys its disk cache by
this file (its modification time and size), the function's name, line and bytecode, the
argument types and the CPU, so a later process loads the machine code instead of compiling it
again, and the cache folder (NUMBA_CACHE_DIR if set, else __pycache__ beside this file, or a
per-user folder where that is read-only) keeps one index and one object file per kernel and
signature. Keep it so: a kernel that captures another
jitted function in a closure (as those calling a helper did when the kernels were built inside
a function) gets a key that changes from process to process, so every run compiles it again
and adds a file to the cache. Closures over plain constants, and module globals naming jitted
functions, cache well. The ``inline="always"`` helpers are inlined into their callers' numba
IR and compiled with them, never on their own; they must stay in this file, since numba
checks only the caller's file for changes.
tests/layers/kernels/test_kernel_cache.py checks that a second process compiles nothing.
"""

import numpy
from numba import njit, uintp

# error_model numpy: x / 0 gives inf or NaN as in numpy and Caffe, instead of raising
jit = njit(cache=True, nogil=True, error_model="numpy")


@njit(cache=True, inline="always")
def window(i, stride, pad, kernel, extent):
    # output i's window along one axis (Caffe's rule): its (start, stop) clipped to the image,
    # and its length clipped to image + padding only (the AVE divisor)
    start = i * stride - pad
    end = min(start + kernel, extent + pad)
    return max(start, 0), min(end, extent), end - start


# The pooling kernels work in two steps instead of window by window (where the clipping and
# indexing cost several times the arithmetic): down the rows of a window for every image
# column at once (unit stride, so LLVM vectorizes it), then along the row of column results.


# the row of a column maximum that no image pixel gave: the -inf border of the rows below
_NO_ROW = 2147483647


@njit(cache=True, inline="always")
def _column_maxima(x, p, h0, h1, col_best, col_row):
    # down the window's rows h0..h1 of plane p: each image column's first maximum and its row
    # (strict '>': the earliest row wins a tie)
    W = col_best.shape[0]
    for w in range(W):
        col_best[w] = x[p, h0, w]
        col_row[w] = h0
    for h in range(h0 + 1, h1):
        for w in range(W):
            v = x[p, h, w]
            take = v > col_best[w]  # selects, not branches: they vectorize
            col_best[w] = v if take else col_best[w]
            col_row[w] = h if take else col_row[w]


@njit(cache=True, inline="always")
def _window_maxima(cb, cr, best, brow, bk, n, sw, kw):
    # for every window q at once, over columns q * sw .. + kw of the column maxima: a column
    # takes over when larger, or equal from an earlier row (bk: which column of the window)
    for q in range(n):
        best[q] = cb[q * sw]
        brow[q] = cr[q * sw]
        bk[q] = 0
    for k in range(1, kw):
        for q in range(n):
            v = cb[q * sw + k]
            r = cr[q * sw + k]
            take = (v > best[q]) | ((v == best[q]) & (r < brow[q]))
            best[q] = v if take else best[q]
            brow[q] = r if take else brow[q]
            bk[q] = k if take else bk[q]


@njit(cache=True, inline="always")
def _max_pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, plane_budget):
    # idx: flat h * W + w of the first maximum in row-major window order (Caffe's mask). Down
    # the window's rows, each image column keeps its first maximum and that row; then along
    # rows of these column maxima (pw columns of -inf before the image's, more after), every
    # window at once: a column takes over when it is larger, or equal from an earlier row, so
    # the first in row-major order wins. The border never wins, not even a tie: its row is
    # _NO_ROW. Each row of column maxima holds a whole number of strides, so output j of
    # buffer row u reads from (u * wide + j) * sw: the windows of several output rows (a whole
    # plane, when it fits ``plane_budget`` elements) take one pass of unit-stride loops, which
    # LLVM vectorizes. (A loop per output, or per output row on small planes, spends more on
    # loop setup than on the comparisons: 2x slower.) A NaN can win only as the first element
    # its window compares (Caffe never lets one win); checking every element for NaN would
    # triple the cost.
    planes, H, W = x.shape
    oh, ow = y.shape[1], y.shape[2]
    length, wide, rows = _pool_rows(ow, sw, pw, kw, W, oh, plane_budget)
    cb = numpy.empty(rows * length + kw, dtype=x.dtype)
    cr = numpy.empty(rows * length + kw, dtype=numpy.int32)
    for t in range(cb.shape[0]):  # the border: -inf, from no row
        cb[t] = -numpy.inf
        cr[t] = _NO_ROW
    best = numpy.empty(rows * wide, dtype=x.dtype)
    brow = numpy.empty(rows * wide, dtype=numpy.int32)
    bk = numpy.empty(rows * wide, dtype=numpy.int32)
    for p in range(planes):
        for i0 in range(0, oh, rows):
            i1 = min(oh, i0 + rows)
            for i in range(i0, i1):
                at = (i - i0) * length + pw
                col_best, col_row = cb[at:at + W], cr[at:at + W]
                h0, h1, _ = window(i, sh, ph, kh, H)
                if h1 <= h0:  # an empty window: only the border, -inf and Caffe's mask -1
                    for w in range(W):
                        col_best[w] = -numpy.inf
                        col_row[w] = _NO_ROW
                else:
                    _column_maxima(x, p, h0, h1, col_best, col_row)
            n = (i1 - i0 - 1) * wide + ow  # (the last row's outputs past ow are not needed)
            _window_maxima(cb, cr, best, brow, bk, n, sw, kw)
            for i in range(i0, i1):
                first = (i - i0) * wide
                y_row, idx_row = y[p, i], idx[p, i]
                for j in range(ow):
                    q = first + j
                    if brow[q] == _NO_ROW:  # a window past the image (ceil mode), or empty
                        y_row[j] = -numpy.inf
                        idx_row[j] = -1
                    else:
                        y_row[j] = best[q]
                        idx_row[j] = brow[q] * W + j * sw - pw + bk[q]


@jit
def max_pool_backward(dy, idx, dx):
    # dx: (planes, H * W), overwritten
    planes, oh, ow = dy.shape
    for p in range(planes):
        row = dx[p]
        row[:] = 0
        for i in range(oh):
            for j in range(ow):
                if idx[p, i, j] >= 0:
                    row[idx[p, i, j]] += dy[p, i, j]


@njit(cache=True, inline="always")
def _pool_rows(ow, sw, pw, kw, W, oh, plane_budget):
    # the row buffer of the vectorized pooling passes: each row holds pw border columns, the
    # image's W and more border, in a whole number of strides (length = wide * sw), so output
    # j of buffer row u starts at (u * wide + j) * sw; ``rows`` output rows go in at once (a
    # whole plane when it fits plane_budget elements, else one)
    length = max((ow - 1) * sw + kw, W + pw) + pw
    length = -(-length // sw) * sw
    rows = oh if oh * length <= plane_budget else 1
    return length, length // sw, rows


@njit(cache=True, inline="always")
def _ave_divisors(ow, sw, pw, kw, W):
    # AVE pooling along a row: each output column's divisor width (window()'s third value)
    width = numpy.empty(ow, dtype=numpy.float64)
    for j in range(ow):
        width[j] = window(j, sw, pw, kw, W)[2]
    return width


@njit(cache=True, inline="always")
def _window_sums(col_sum, total, n, sw, kw):
    # total[q] = sum of col_sum[q * sw + k] over k = 0..kw-1, in that order
    for q in range(n):
        total[q] = col_sum[q * sw]
    for k in range(1, kw):
        for q in range(n):
            total[q] += col_sum[q * sw + k]


@njit(cache=True, inline="always")
def _spread(g, col_grad, n, sw, kw):
    # col_grad[q * sw + k] += g[q] for every window q, kernel columns last to first: each column
    # receives its shares in output order, as window by window
    for k in range(kw - 1, -1, -1):
        for q in range(n):
            col_grad[q * sw + k] += g[q]


@njit(cache=True, inline="always")
def _ave_pool_forward(x, y, kh, kw, sh, sw, ph, pw, plane_budget):
    # divisor: the window clipped to image + padding, before clipping to the image (Caffe).
    # Rows are summed down a window into a zero-bordered row first (the row buffer of
    # _pool_rows: several output rows at once); then, for each kernel column k in turn, every
    # output adds its k-th entry: unit-stride loops that vectorize, adding in each window's own
    # left-to-right order (the borders add zeros).
    planes, H, W = x.shape
    oh, ow = y.shape[1], y.shape[2]
    width = _ave_divisors(ow, sw, pw, kw, W)
    length, wide, rows = _pool_rows(ow, sw, pw, kw, W, oh, plane_budget)
    col_sum = numpy.zeros(rows * length + kw, dtype=x.dtype)
    total = numpy.empty(rows * wide, dtype=x.dtype)
    for p in range(planes):
        for i0 in range(0, oh, rows):
            i1 = min(oh, i0 + rows)
            for i in range(i0, i1):
                at = (i - i0) * length + pw
                h0, h1, _ = window(i, sh, ph, kh, H)
                for w in range(W):
                    col_sum[at + w] = 0
                for h in range(h0, h1):
                    for w in range(W):
                        col_sum[at + w] += x[p, h, w]
            n = (i1 - i0 - 1) * wide + ow  # (the last row's outputs past ow are not needed)
            _window_sums(col_sum, total, n, sw, kw)
            for i in range(i0, i1):
                size_h = window(i, sh, ph, kh, H)[2]
                first = (i - i0) * wide
                for j in range(ow):
                    y[p, i, j] = total[first + j] / (size_h * width[j])


@njit(cache=True, inline="always")
def _ave_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw, plane_budget):
    # dx: (planes, H, W), overwritten. Each output's share goes to its window's columns of a
    # zero-bordered row buffer (several output rows at once, as in forward), then down the
    # window's rows, output row by output row.
    planes, H, W = dx.shape
    oh, ow = dy.shape[1], dy.shape[2]
    width = _ave_divisors(ow, sw, pw, kw, W)
    length, wide, rows = _pool_rows(ow, sw, pw, kw, W, oh, plane_budget)
    col_grad = numpy.zeros(rows * length + kw, dtype=dx.dtype)
    g = numpy.zeros(rows * wide, dtype=dx.dtype)  # outputs past ow stay 0: they add nothing
    for p in range(planes):
        dx[p] = 0
        for i0 in range(0, oh, rows):
            i1 = min(oh, i0 + rows)
            for t in range(col_grad.shape[0]):
                col_grad[t] = 0
            for i in range(i0, i1):
                size_h = window(i, sh, ph, kh, H)[2]
                first = (i - i0) * wide
                for j in range(ow):
                    g[first + j] = dy[p, i, j] / (size_h * width[j])
            n = (i1 - i0 - 1) * wide + ow  # (the last row's outputs past ow are not needed)
            _spread(g, col_grad, n, sw, kw)
            for i in range(i0, i1):
                h0, h1, _ = window(i, sh, ph, kh, H)
                at = (i - i0) * length + pw
                for h in range(h0, h1):
                    for w in range(W):
                        dx[p, h, w] += col_grad[at + w]


# The pooling kernels, one per horizontal stride class: 1 and 2 as literals (LLVM vectorizes
# the windows' strided loops only for a constant stride), any other as an argument. Each is
# compiled the first time a net uses it, so a net with only stride-2 pools compiles a third of
# the code (layers/kernels/pooling.py picks them).

@jit
def max_pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, plane_budget):
    _max_pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, plane_budget)


@jit
def max_pool_forward_sw1(x, y, idx, kh, kw, sh, sw, ph, pw, plane_budget):
    _max_pool_forward(x, y, idx, kh, kw, sh, 1, ph, pw, plane_budget)


@jit
def max_pool_forward_sw2(x, y, idx, kh, kw, sh, sw, ph, pw, plane_budget):
    _max_pool_forward(x, y, idx, kh, kw, sh, 2, ph, pw, plane_budget)


@jit
def ave_pool_forward(x, y, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_forward(x, y, kh, kw, sh, sw, ph, pw, plane_budget)


@jit
def ave_pool_forward_sw1(x, y, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_forward(x, y, kh, kw, sh, 1, ph, pw, plane_budget)


@jit
def ave_pool_forward_sw2(x, y, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_forward(x, y, kh, kw, sh, 2, ph, pw, plane_budget)


@jit
def ave_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw, plane_budget)


@jit
def ave_pool_backward_sw1(dy, dx, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_backward(dy, dx, kh, kw, sh, 1, ph, pw, plane_budget)


@jit
def ave_pool_backward_sw2(dy, dx, kh, kw, sh, sw, ph, pw, plane_budget):
    _ave_pool_backward(dy, dx, kh, kw, sh, 2, ph, pw, plane_budget)


@jit
def col2im_channels_last(dcol, acc, sh, sw, dh, dw):
    # dcol (G, n, oh, ow, kh, kw, Cg): a convolution's column diff in layout A;
    # acc (n, Hp, Wp, G * Cg), the padded image, receives every column back (+=)
    groups, n, oh, ow, kh, kw, cg = dcol.shape
    for s in range(n):
        for i in range(oh):
            for j in range(ow):
                for a in range(kh):
                    for b in range(kw):
                        row = acc[s, i * sh + a * dh, j * sw + b * dw]
                        for g in range(groups):
                            src = dcol[g, s, i, j, a, b]
                            base = g * cg
                            for c in range(cg):
                                row[base + c] += src[c]


@jit
def sgd_l2_step(diff, data, history, decay, rate, momentum):
    # Caffe's regularize (L2), SGD momentum rule and Net::Update, one sweep over memory:
    # the same float32 operations in the same order (no fused multiply-add: bit-identical)
    for i in range(diff.size):
        g = diff[i] + decay * data[i]
        v = momentum * history[i] + rate * g
        history[i] = v
        diff[i] = v
        data[i] -= v


# -- Winograd convolution (layers/kernels/winograd.py): linear transforms of image tiles. Every
# inner loop runs over a contiguous run with unsigned indices: numba then drops its
# negative-index check and LLVM vectorizes the loop (signed offsets measured 7x slower).
# Long runs are cut into blocks of this many elements, so that the few rows one output combines
# are read from L1 again for the next output (tile_rows 1.1-2x, tile_pairs 1.4-1.9x faster)
TRANSFORM_BLOCK = 256


@njit(cache=True, inline="always")
def combine_runs(dst, at, coefs, src, frm, offsets, length):
    # dst[at:at + length] = sum_i coefs[i] * src[frm + offsets[i]:... + length], on flat
    # arrays with unsigned offsets; zeros if every coef is 0
    first = True
    for i in range(coefs.shape[0]):
        coef = coefs[i]
        if coef != 0:
            start = frm + offsets[i]
            if first:
                for q in range(length):
                    dst[at + q] = coef * src[start + q]
                first = False
            else:
                for q in range(length):
                    dst[at + q] += coef * src[start + q]
    if first:
        for q in range(length):
            dst[at + q] = 0


@njit(cache=True, inline="always")
def strided_offsets(count, stride):
    offsets = numpy.empty(count, dtype=numpy.uintp)
    for i in range(count):
        offsets[i] = uintp(i * stride)
    return offsets


@jit
def phase_image(x, buf, r0, c0):
    # x (n, C, H, W) -> buf (n, Hb, m, Q, C), channels last: pixel (h, w) at row r0 + h and
    # column v = c0 + w, stored by phase (column v at (v % m, v // m)); zeros everywhere else.
    # A transpose: 16 channels at a time, so the reads run along 16 rows and the writes fill
    # whole cache lines
    n, C, H, W = x.shape
    Hb, m, Q = buf.shape[1], buf.shape[2], buf.shape[3]
    src, dst = x.ravel(), buf.ravel()
    row_len = m * Q * C
    plane = H * W
    for s in range(n):
        for hb in range(Hb):
            at = (s * Hb + hb) * row_len
            h = hb - r0
            if h < 0 or h >= H:
                for i in range(row_len):
                    dst[uintp(at + i)] = 0
                continue
            for v in range(m * Q):
                if v < c0 or v >= c0 + W:
                    to = at + ((v % m) * Q + v // m) * C
                    for c in range(C):
                        dst[uintp(to + c)] = 0
            for cb in range(0, C, 16):
                ce = min(cb + 16, C)
                for w in range(W):
                    v = c0 + w
                    to = uintp(at + ((v % m) * Q + v // m) * C)
                    frm = uintp((s * C * H + h) * W + w)
                    for c in range(cb, ce):
                        dst[to + uintp(c)] = src[frm + uintp(c * plane)]


@jit
def tile_rows(src, mat, out, step):
    # src (n, H, L), mat (ta, k), out (n, ta, tiles, L):
    # out[s, a, r] = sum_i mat[a, i] * src[s, r * step + i], i.e. mat applied down each tile.
    # All ta outputs of a tile row, a block of columns at a time: its k source rows stay in L1
    n, H, L = src.shape
    ta, tiles = out.shape[1], out.shape[2]
    src_flat, out_flat = src.ravel(), out.ravel()
    down = strided_offsets(mat.shape[1], L)
    for s in range(n):
        for r in range(tiles):
            for c0 in range(0, L, TRANSFORM_BLOCK):
                width = uintp(min(TRANSFORM_BLOCK, L - c0))
                for a in range(ta):
                    combine_runs(out_flat, uintp(((s * ta + a) * tiles + r) * L + c0), mat[a], src_flat,
                                 uintp((s * H + r * step) * L + c0), down, width)


@jit
def tile_cols(rows, mat, out, step, tiles_w, channels):
    # rows (n, ta, tiles_h, step * Q * C) from tile_rows, each row's columns stored by phase:
    # column w = q * step + ph at (ph, q). mat (tb, k), out (ta * tb, T * C), tiles T = (s, r, t)
    # row-major: out[a * tb + b, T, c] = sum_j mat[b, j] * (column t * step + j of row (s, a, r)).
    # Column t * step + j is at (j % step, t + j // step): for all t at once one contiguous run,
    # so the loops here run over tiles_w * C instead of C.
    n, ta, tiles_h, width = rows.shape
    tb, k = mat.shape
    per_row = out.shape[1]
    rows_flat, out_flat = rows.ravel(), out.ravel()
    q_count = width // (step * channels)
    across = numpy.empty(k, dtype=numpy.uintp)
    for j in range(k):
        across[j] = uintp(((j % step) * q_count + j // step) * channels)
    run = uintp(tiles_w * channels)
    for s in range(n):
        for a in range(ta):
            for r in range(tiles_h):
                frm = uintp(((s * ta + a) * tiles_h + r) * width)
                at = (s * tiles_h + r) * tiles_w * channels
                for b in range(tb):
                    combine_runs(out_flat, uintp((a * tb + b) * per_row + at), mat[b], rows_flat, frm, across, run)


@jit
def tile_pairs(src, mat, scratch, out):
    # src (k * k, L), mat (t, k), scratch (t, k, B), out (t * t, L):
    # out[a * t + b] = sum_ij mat[a, i] mat[b, j] src[i * k + j] (mat on both tile axes), B
    # columns at a time so that the scratch rows stay in L1 between the two passes
    t, k = mat.shape
    L = src.shape[1]
    block = scratch.shape[2]
    src_flat, scratch_flat, out_flat = src.ravel(), scratch.ravel(), out.ravel()
    down, along = strided_offsets(k, k * L), strided_offsets(k, block)
    for c0 in range(0, L, block):
        width = uintp(min(block, L - c0))
        for a in range(t):
            for j in range(k):
                combine_runs(scratch_flat, uintp((a * k + j) * block), mat[a], src_flat, uintp(j * L + c0),
                             down, width)
        for a in range(t):
            for b in range(t):
                combine_runs(out_flat, uintp((a * t + b) * L + c0), mat[b], scratch_flat, uintp(a * k * block),
                             along, width)


@jit
def tiles_to_image(tiles, y, m, tiles_h, tiles_w, bias):
    # tiles (m * m, T, M) of m x m outputs each -> y (n, M, H, W), cropped, + bias (M,).
    # A transpose: for each output row, 16 channels at a time, so the reads are whole cache
    # lines of a tile's channels and the writes 16 rows filling up along w
    n, channels, H, W = y.shape
    count = tiles.shape[1]
    src = tiles.ravel()
    dst = y.ravel()
    plane = H * W
    for s in range(n):
        for h in range(H):
            r = h // m
            first = ((h - r * m) * m * count + (s * tiles_h + r) * tiles_w) * channels
            for c0 in range(0, channels, 16):
                c1 = min(c0 + 16, channels)
                for t in range(tiles_w):
                    for u in range(min(m, W - t * m)):
                        # output (h, t * m + u): tile element ((h % m) * m + u), tile T0 + t
                        at = uintp(first + (u * count + t) * channels)
                        to = uintp(s * channels * plane + h * W + t * m + u)
                        for ch in range(c0, c1):
                            dst[to + uintp(ch * plane)] = src[at + uintp(ch)] + bias[ch]
