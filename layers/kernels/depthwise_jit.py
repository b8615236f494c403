"""The numba kernels of depthwise convolution (layers/kernels/depthwise.py imports this lazily).

Each kernel handles the channels [c0, c1) of every sample, so callers split the channels across
brewnet's threads and no two threads ever write the same output (the weight gradient of a
channel included). A sample's channel plane is first copied into a zero-bordered buffer, so the
inner loops run along an output row with no bounds checks. The buffer keeps each row's columns
by phase (column w at [w % sw, w // sw], sw the horizontal stride), so that at any stride the
loops read and write contiguous runs, which LLVM vectorizes (MobileNet's stride-2 layers,
batch 8: backward 1.7-2.5x faster than with loops over every other column). As cpu_jit.py
explains, every kernel is a module-level function with ``cache=True`` so numba's disk cache
keeps it between processes.
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy")

# the unit-stride backward in wide rows up to planes of this many padded-width positions: its
# weight-gradient lanes (one per kernel offset, as long as the plane) then stay in cache.
# MobileNet's 3x3 layers at batch 8, ms, rows of the output against wide rows: 512 channels at
# 14x14 9.0 / 2.3, 128 at 56x56 12.1 / 8.1; but 32 at 112x112 (12768 positions) 5.8 / 7.5
WIDE_BACKWARD_MAX = 4096


@jit
def _fill_padded(plane, padded, ph, pw):
    # padded (Hp, sw, ceil(Wp / sw)): padded column pw + w of row ph + h at [(pw + w) % sw,
    # (pw + w) // sw]; the border was zeroed when ``padded`` was made and is never written
    H, W = plane.shape
    sw = padded.shape[1]
    for h in range(H):
        src = plane[h]
        if sw == 1:  # (spelled out: a unit-stride copy vectorizes)
            dst = padded[ph + h, 0, pw:]
            for w in range(W):
                dst[w] = src[w]
            continue
        for q in range(sw):
            w0 = (q - pw) % sw  # the first image column of phase q
            dst = padded[ph + h, q, (pw + w0) // sw:]
            every = src[w0:]
            if sw == 2:  # (a constant stride: LLVM vectorizes the strided reads)
                for t in range((W - w0 + 1) // 2):
                    dst[t] = every[2 * t]
                continue
            for t in range((W - w0 + sw - 1) // sw):
                dst[t] = every[t * sw]


@jit
def _unfill_padded(dpadded, plane, ph, pw):
    # the inside of a phased padded plane (as _fill_padded writes it) back into plane (H, W)
    H, W = plane.shape
    sw = dpadded.shape[1]
    for h in range(H):
        dst = plane[h]
        if sw == 1:
            src = dpadded[ph + h, 0, pw:]
            for w in range(W):
                dst[w] = src[w]
            continue
        for q in range(sw):
            w0 = (q - pw) % sw
            src = dpadded[ph + h, q, (pw + w0) // sw:]
            every = dst[w0:]
            if sw == 2:
                for t in range((W - w0 + 1) // 2):
                    every[2 * t] = src[t]
                continue
            for t in range((W - w0 + sw - 1) // sw):
                every[t * sw] = src[t]


@njit(cache=True, inline="always")
def _lanes_to_weight_grad(lanes, dW, c, mult, kh, kw):
    # channel c's weight gradient: each kernel offset's lane of per-position sums, added up
    for k in range(mult):
        for i in range(kh):
            for j in range(kw):
                total = 0.0
                lane = lanes[k, i * kw + j]
                for t in range(lane.shape[0]):
                    total += lane[t]
                dW[c * mult + k, 0, i, j] = total


@njit(cache=True, inline="always")
def _column_offsets(kw, dw, sw):
    # kernel column j reads padded column j * dw + ow * sw: phase (j * dw) % sw, from position
    # (j * dw) // sw on. Computed once: the integer division inside the loops kept LLVM from
    # vectorizing them (4x slower)
    phase = numpy.empty(kw, dtype=numpy.intp)
    start = numpy.empty(kw, dtype=numpy.intp)
    for j in range(kw):
        phase[j] = (j * dw) % sw
        start[j] = (j * dw) // sw
    return phase, start


# At unit stride the output is computed in rows as wide as the padded image (the columns past
# the output's are junk, dropped when copied out), so every kernel offset is one run of Oh * Wp
# over the flat padded plane instead of Oh runs of Ow: on MobileNet's 14x14 and 7x7 planes the
# loops' start-up cost more than their arithmetic. The padded plane has a spare zero row below,
# where the last offsets' runs end.


@jit
def _forward_unit_stride(x, w, bias, y, c0, c1, ph, pw, dh, dw, padded):
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = y.shape[2], y.shape[3]
    Wp = padded.shape[2]
    flat = padded.reshape(-1)
    wide = numpy.empty(Oh * Wp, dtype=y.dtype)
    for c in range(c0, c1):
        for b in range(n):
            _fill_padded(x[b, c], padded, ph, pw)
            for m in range(c * mult, (c + 1) * mult):
                start = bias[m]
                for t in range(wide.shape[0]):
                    wide[t] = start
                for i in range(kh):
                    for j in range(kw):
                        wv = w[m, 0, i, j]
                        run = flat[i * dh * Wp + j * dw:]
                        for t in range(wide.shape[0]):
                            wide[t] += wv * run[t]
                for oh in range(Oh):
                    row = y[b, m, oh]
                    src = wide[oh * Wp:]
                    for ow in range(Ow):
                        row[ow] = src[ow]


@jit
def _backward_unit_stride(x, w, dy, dx, dW, c0, c1, ph, pw, dh, dw, need_dx, need_dw, padded, dpadded):
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = dy.shape[2], dy.shape[3]
    Wp = padded.shape[2]
    flat, dflat = padded.reshape(-1), dpadded.reshape(-1)
    L = Oh * Wp
    g = numpy.zeros(L, dtype=x.dtype)  # dy in wide rows: the junk columns stay zero
    lanes = numpy.zeros((mult, kh * kw, L), dtype=x.dtype)
    for c in range(c0, c1):
        if need_dw:
            lanes[:, :, :] = 0
        for b in range(n):
            if need_dw:
                _fill_padded(x[b, c], padded, ph, pw)
            if need_dx:
                dpadded[:, :, :] = 0
            for k in range(mult):
                m = c * mult + k
                for oh in range(Oh):
                    src = dy[b, m, oh]
                    dst = g[oh * Wp:]
                    for ow in range(Ow):
                        dst[ow] = src[ow]
                for i in range(kh):
                    for j in range(kw):
                        off = i * dh * Wp + j * dw
                        if need_dw:
                            lane = lanes[k, i * kw + j]
                            run = flat[off:]
                            for t in range(L):
                                lane[t] += g[t] * run[t]
                        if need_dx:
                            wv = w[m, 0, i, j]
                            drun = dflat[off:]
                            for t in range(L):
                                drun[t] += wv * g[t]
            if need_dx:
                _unfill_padded(dpadded, dx[b, c], ph, pw)
        if need_dw:
            _lanes_to_weight_grad(lanes, dW, c, mult, kh, kw)


@jit
def forward(x, w, bias, y, c0, c1, sh, sw, ph, pw, dh, dw, padded):
    # x (n, C, H, W); w (C * mult, 1, kh, kw); y (n, C * mult, Oh, Ow); bias (C * mult,), zeros for none
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = y.shape[2], y.shape[3]
    if sh == 1 and sw == 1:
        _forward_unit_stride(x, w, bias, y, c0, c1, ph, pw, dh, dw, padded)
        return
    col_phase, col_start = _column_offsets(kw, dw, sw)
    for c in range(c0, c1):
        for b in range(n):
            _fill_padded(x[b, c], padded, ph, pw)
            for m in range(c * mult, (c + 1) * mult):
                start = bias[m]
                for oh in range(Oh):
                    row = y[b, m, oh]
                    for ow in range(Ow):
                        row[ow] = start
                    for i in range(kh):
                        src = padded[oh * sh + i * dh]
                        for j in range(kw):
                            wv = w[m, 0, i, j]
                            # 1-D views indexed from 0: LLVM vectorizes these loops (not
                            # src[off + ow], whose sign it cannot prove)
                            run = src[col_phase[j], col_start[j]:]
                            for ow in range(Ow):
                                row[ow] += wv * run[ow]


@jit
def backward(x, w, dy, dx, dW, c0, c1, sh, sw, ph, pw, dh, dw, need_dx, need_dw, padded, dpadded):
    # dx (n, C, H, W) written when need_dx; dW (C * mult, 1, kh, kw) rows c0*mult.. written
    # (not added to) when need_dw; padded/dpadded: phased planes as _fill_padded writes them,
    # padded's border zero
    n, H, W = x.shape[0], x.shape[2], x.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = dy.shape[2], dy.shape[3]
    if sh == 1 and sw == 1 and Oh * padded.shape[2] <= WIDE_BACKWARD_MAX:
        _backward_unit_stride(x, w, dy, dx, dW, c0, c1, ph, pw, dh, dw, need_dx, need_dw, padded, dpadded)
        return
    # the weight gradient's products, summed per output column (vectorizable: a dot product's
    # single running sum is not) and only then across the row
    lanes = numpy.zeros((mult, kh * kw, Ow), dtype=x.dtype)
    col_phase, col_start = _column_offsets(kw, dw, sw)
    for c in range(c0, c1):
        if need_dw:
            lanes[:, :, :] = 0
        for b in range(n):
            if need_dw:
                _fill_padded(x[b, c], padded, ph, pw)
            if need_dx:
                dpadded[:, :, :] = 0
            for k in range(mult):
                m = c * mult + k
                for oh in range(Oh):
                    g = dy[b, m, oh]
                    for i in range(kh):
                        r = oh * sh + i * dh
                        src = padded[r]
                        dst = dpadded[r]
                        for j in range(kw):
                            lane = lanes[k, i * kw + j]
                            wv = w[m, 0, i, j]
                            # contiguous runs of the phased rows, as in forward
                            q, at = col_phase[j], col_start[j]
                            if need_dw:
                                run = src[q, at:]
                                for ow in range(Ow):
                                    lane[ow] += g[ow] * run[ow]
                            if need_dx:
                                drun = dst[q, at:]
                                for ow in range(Ow):
                                    drun[ow] += wv * g[ow]
            if need_dx:
                _unfill_padded(dpadded, dx[b, c], ph, pw)
        if need_dw:
            _lanes_to_weight_grad(lanes, dW, c, mult, kh, kw)
