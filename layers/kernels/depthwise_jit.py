"""The numba kernels of depthwise convolution (layers/kernels/depthwise.py imports this lazily).

Each kernel handles the channels [c0, c1) of every sample, so callers split the channels across
brewnet's threads and no two threads ever write the same output (the weight gradient of a
channel included). A sample's channel plane is first copied into a zero-bordered buffer kept by
phase: padded pixel (R, C) at [R % sh, C % sw, R // sh, C // sw], (sh, sw) the stride. Output
(oh, ow) under kernel tap (i, j) then reads phase plane ((i dh) % sh, (j dw) % sw) at
(oh + (i dh) // sh, ow + (j dw) // sw): a unit-stride shift at any stride. The output is computed
in "wide" rows as long as a phase plane's (the columns past the output's are junk, dropped when
copied out), so each tap is one loop over the whole plane with no bounds checks, which LLVM
vectorizes, instead of a short loop per output row (MobileNet's 14x14 and 7x7 planes: 2-3x
faster; its stride-2 layers: 3-4x faster than loops over every other column). Each phase plane
has a spare zero row below, where the last taps' runs end.

As cpu_jit.py explains, every kernel is a module-level function with ``cache=True`` so numba's
disk cache keeps it between processes.
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy")

# wide positions per block of the weight gradient's lanes (one lane per tap, summed over the
# samples and blocks, then across): enough to vectorize, small enough to stay in cache
LANE_BLOCK = 2048


@jit
def _fill_padded(plane, padded, ph, pw):
    # plane (H, W) into the phase planes of ``padded`` (sh, sw, rows, cols) at offset (ph, pw);
    # the border was zeroed when ``padded`` was made and is never written
    H, W = plane.shape
    sh, sw = padded.shape[0], padded.shape[1]
    for h in range(H):
        r = ph + h
        rows = padded[r % sh, :, r // sh]
        src = plane[h]
        if sw == 1:  # (spelled out: a unit-stride copy vectorizes)
            dst = rows[0, pw:]
            for w in range(W):
                dst[w] = src[w]
            continue
        for q in range(sw):
            w0 = (q - pw) % sw  # the first image column of column phase q
            dst = rows[q, (pw + w0) // sw:]
            every = src[w0:]
            if sw == 2:  # (a constant stride: LLVM vectorizes the strided reads)
                for t in range((W - w0 + 1) // 2):
                    dst[t] = every[2 * t]
                continue
            for t in range((W - w0 + sw - 1) // sw):
                dst[t] = every[t * sw]


@jit
def _unfill_padded(dpadded, plane, ph, pw):
    # the inside of phase planes (as _fill_padded writes them) back into plane (H, W)
    H, W = plane.shape
    sh, sw = dpadded.shape[0], dpadded.shape[1]
    for h in range(H):
        r = ph + h
        rows = dpadded[r % sh, :, r // sh]
        dst = plane[h]
        if sw == 1:
            src = rows[0, pw:]
            for w in range(W):
                dst[w] = src[w]
            continue
        for q in range(sw):
            w0 = (q - pw) % sw
            src = rows[q, (pw + w0) // sw:]
            every = dst[w0:]
            if sw == 2:
                for t in range((W - w0 + 1) // 2):
                    every[2 * t] = src[t]
                continue
            for t in range((W - w0 + sw - 1) // sw):
                every[t * sw] = src[t]


@njit(cache=True, inline="always")
def _taps(kh, kw, dh, dw, sh, sw, cols):
    # per tap (i, j), row-major: its phase plane (a row of the (sh * sw, plane) view) and the
    # start of its run in that plane. Computed once: integer division inside the loops kept LLVM
    # from vectorizing them (4x slower)
    plane = numpy.empty(kh * kw, dtype=numpy.intp)
    start = numpy.empty(kh * kw, dtype=numpy.intp)
    for i in range(kh):
        for j in range(kw):
            plane[i * kw + j] = ((i * dh) % sh) * sw + (j * dw) % sw
            start[i * kw + j] = ((i * dh) // sh) * cols + (j * dw) // sw
    return plane, start


@jit
def forward(x, w, bias, y, c0, c1, sh, sw, ph, pw, dh, dw, padded):
    # x (n, C, H, W); w (C * mult, 1, kh, kw); y (n, C * mult, Oh, Ow); bias (C * mult,), zeros
    # for none; padded (sh, sw, rows, cols) phase planes
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = y.shape[2], y.shape[3]
    cols = padded.shape[3]
    planes = padded.reshape(sh * sw, -1)
    tap_plane, tap_start = _taps(kh, kw, dh, dw, sh, sw, cols)
    taps = w.reshape(w.shape[0], kh * kw)
    wide = numpy.empty(Oh * cols, dtype=y.dtype)
    for c in range(c0, c1):
        for b in range(n):
            _fill_padded(x[b, c], padded, ph, pw)
            for m in range(c * mult, (c + 1) * mult):
                start = bias[m]
                for t in range(wide.shape[0]):
                    wide[t] = start
                for k in range(kh * kw):
                    wv = taps[m, k]
                    # 1-D views indexed from 0: LLVM vectorizes these loops (not
                    # src[off + t], whose sign it cannot prove)
                    run = planes[tap_plane[k], tap_start[k]:]
                    for t in range(wide.shape[0]):
                        wide[t] += wv * run[t]
                for oh in range(Oh):
                    row = y[b, m, oh]
                    src = wide[oh * cols:]
                    for ow in range(Ow):
                        row[ow] = src[ow]


@jit
def backward(x, w, dy, dx, dW, c0, c1, sh, sw, ph, pw, dh, dw, need_dx, need_dw, padded, dpadded):
    # dx (n, C, H, W) written when need_dx; dW (C * mult, 1, kh, kw) rows c0*mult.. written
    # (not added to) when need_dw; padded/dpadded: phase planes as _fill_padded writes them,
    # padded's border zero
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = dy.shape[2], dy.shape[3]
    cols = padded.shape[3]
    planes, dplanes = padded.reshape(sh * sw, -1), dpadded.reshape(sh * sw, -1)
    tap_plane, tap_start = _taps(kh, kw, dh, dw, sh, sw, cols)
    taps = w.reshape(w.shape[0], kh * kw)
    L = Oh * cols
    block = min(L, LANE_BLOCK)
    g = numpy.zeros(L, dtype=x.dtype)  # dy in wide rows: the junk columns stay zero
    # the weight gradient's products, summed per position of a block (vectorizable: a dot
    # product's single running sum is not), over samples and blocks, and only then across
    lanes = numpy.zeros((mult, kh * kw, block), dtype=x.dtype)
    for c in range(c0, c1):
        if need_dw:
            lanes[:, :, :] = 0
        for b in range(n):
            if need_dw:
                _fill_padded(x[b, c], padded, ph, pw)
            if need_dx:
                dpadded[:, :, :, :] = 0
            for k in range(mult):
                m = c * mult + k
                for oh in range(Oh):
                    src = dy[b, m, oh]
                    dst = g[oh * cols:]
                    for ow in range(Ow):
                        dst[ow] = src[ow]
                for first in range(0, L, block):
                    size = min(block, L - first)
                    gb = g[first:]
                    for tap in range(kh * kw):
                        at = tap_start[tap] + first
                        if need_dw:
                            lane = lanes[k, tap]
                            run = planes[tap_plane[tap], at:]
                            for t in range(size):
                                lane[t] += gb[t] * run[t]
                        if need_dx:
                            wv = taps[m, tap]
                            drun = dplanes[tap_plane[tap], at:]
                            for t in range(size):
                                drun[t] += wv * gb[t]
            if need_dx:
                _unfill_padded(dpadded, dx[b, c], ph, pw)
        if need_dw:
            for k in range(mult):
                for tap in range(kh * kw):
                    total = 0.0
                    lane = lanes[k, tap]
                    for t in range(block):
                        total += lane[t]
                    dW[c * mult + k, 0, tap // kw, tap % kw] = total
