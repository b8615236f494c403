"""The numba kernels of depthwise convolution (layers/kernels/depthwise.py imports this lazily).

Each kernel handles the channels [c0, c1) of every sample, so callers split the channels across
brewnet's threads and no two threads ever write the same output (the weight gradient of a
channel included). A sample's channel plane is first copied into a zero-bordered buffer, so the
inner loops run along an output row with no bounds checks: with unit stride they read and
write contiguous runs, which LLVM vectorizes. As cpu_jit.py explains, every kernel is a
module-level function with ``cache=True`` so numba's disk cache keeps it between processes.
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy")


@jit
def _fill_padded(plane, padded, ph, pw):
    # the border was zeroed when ``padded`` was made and is never written
    H, W = plane.shape
    for h in range(H):
        dst = padded[ph + h]
        src = plane[h]
        for w in range(W):
            dst[pw + w] = src[w]


@jit
def forward(x, w, bias, y, c0, c1, sh, sw, ph, pw, dh, dw, padded):
    # x (n, C, H, W); w (C * mult, 1, kh, kw); y (n, C * mult, Oh, Ow); bias (C * mult,), zeros for none
    n = x.shape[0]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = y.shape[2], y.shape[3]
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
                            # 1-D views indexed from 0: LLVM vectorizes these loops (it does not
                            # with src[off + ow], whose sign it cannot prove)
                            if sw == 1:
                                run = src[j * dw:]
                                for ow in range(Ow):
                                    row[ow] += wv * run[ow]
                            else:
                                every = src[j * dw::sw]
                                for ow in range(Ow):
                                    row[ow] += wv * every[ow]


@jit
def backward(x, w, dy, dx, dW, c0, c1, sh, sw, ph, pw, dh, dw, need_dx, need_dw, padded, dpadded):
    # dx (n, C, H, W) written when need_dx; dW (C * mult, 1, kh, kw) rows c0*mult.. written
    # (not added to) when need_dw; padded/dpadded: (H + 2ph, W + 2pw) planes, padded's border zero
    n, H, W = x.shape[0], x.shape[2], x.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    mult = w.shape[0] // x.shape[1]
    Oh, Ow = dy.shape[2], dy.shape[3]
    # the weight gradient's products, summed per output column (vectorizable: a dot product's
    # single running sum is not) and only then across the row
    lanes = numpy.zeros((mult, kh * kw, Ow), dtype=x.dtype)
    for c in range(c0, c1):
        if need_dw:
            lanes[:, :, :] = 0
        for b in range(n):
            if need_dw:
                _fill_padded(x[b, c], padded, ph, pw)
            if need_dx:
                dpadded[:, :] = 0
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
                            # 1-D views indexed from 0, as in forward
                            if sw == 1:
                                run, drun = src[j * dw:], dst[j * dw:]
                                if need_dw:
                                    for ow in range(Ow):
                                        lane[ow] += g[ow] * run[ow]
                                if need_dx:
                                    for ow in range(Ow):
                                        drun[ow] += wv * g[ow]
                            else:
                                every, devery = src[j * dw::sw], dst[j * dw::sw]
                                if need_dw:
                                    for ow in range(Ow):
                                        lane[ow] += g[ow] * every[ow]
                                if need_dx:
                                    for ow in range(Ow):
                                        devery[ow] += wv * g[ow]
            if need_dx:
                plane = dx[b, c]
                for h in range(H):
                    src = dpadded[ph + h]
                    dst = plane[h]
                    for wi in range(W):
                        dst[wi] = src[pw + wi]
        if need_dw:
            for k in range(mult):
                for i in range(kh):
                    for j in range(kw):
                        total = 0.0
                        lane = lanes[k, i * kw + j]
                        for ow in range(Ow):
                            total += lane[ow]
                        dW[c * mult + k, 0, i, j] = total
