"""The numba loops of layers/kernels/depthwise.py (imported on the first depthwise call on the
CPU, with cpu_kernels.enabled; module-level functions with cache=True, as cpu_jit.py explains).

Each kernel handles input channels c0..c1 of every sample: output channels c0*M..c1*M, the
data gradient of channels c0..c1 and the weight gradient of their filters, so jobs on
disjoint channel ranges never write the same memory. Every plane is first copied into a
zero-bordered buffer, so the loops along an output row need no bounds tests (and, at stride 1,
LLVM vectorizes them); every tap is applied to one row while it is in the L1 cache.

Shapes: x, dx (N, C, H, W); w, dw (C*M, kh, kw); bias (C*M,) or empty; y, dy (N, C*M, OH, OW).
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy")


@jit
def forward(x, w, bias, y, m, sh, sw, ph, pw, dh, dw_, c0, c1):
    n_samples, _, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    kh, kw = w.shape[1], w.shape[2]
    pad = numpy.zeros((height + 2 * ph, width + 2 * pw), dtype=x.dtype)
    for n in range(n_samples):
        for c in range(c0, c1):
            pad[ph:ph + height, pw:pw + width] = x[n, c]
            for j in range(m):
                o = c * m + j
                out = y[n, o]
                out[:, :] = bias[o] if bias.size else 0.0
                for oh in range(out_h):  # one output row stays in the L1 cache over all taps
                    for i in range(kh):
                        r = oh * sh + i * dh
                        if kw == 3 and sw == 1:  # the common case: a row of taps per pass over the row
                            w0, w1, w2 = w[o, i, 0], w[o, i, 1], w[o, i, 2]
                            for ow in range(out_w):
                                out[oh, ow] += w0 * pad[r, ow] + w1 * pad[r, ow + dw_] + w2 * pad[r, ow + 2 * dw_]
                            continue
                        for k in range(kw):
                            weight = w[o, i, k]
                            s = k * dw_
                            if sw == 1:  # contiguous reads: vectorized
                                for ow in range(out_w):
                                    out[oh, ow] += weight * pad[r, ow + s]
                            else:
                                for ow in range(out_w):
                                    out[oh, ow] += weight * pad[r, ow * sw + s]


@jit
def backward_data(dy, w, dx, m, sh, sw, ph, pw, dh, dw_, c0, c1):
    n_samples, _, height, width = dx.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    kh, kw = w.shape[1], w.shape[2]
    pad = numpy.empty((height + 2 * ph, width + 2 * pw), dtype=dx.dtype)
    for n in range(n_samples):
        for c in range(c0, c1):
            pad[:, :] = 0.0
            for j in range(m):
                o = c * m + j
                grad = dy[n, o]
                for oh in range(out_h):
                    for i in range(kh):
                        r = oh * sh + i * dh
                        for k in range(kw):
                            weight = w[o, i, k]
                            s = k * dw_
                            if sw == 1:
                                for ow in range(out_w):
                                    pad[r, ow + s] += weight * grad[oh, ow]
                            else:
                                for ow in range(out_w):
                                    pad[r, ow * sw + s] += weight * grad[oh, ow]
            dx[n, c] = pad[ph:ph + height, pw:pw + width]


# reassociation lets LLVM vectorize the sums (one fixed order per machine: runs repeat exactly)
@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def backward_weight(x, dy, dw, m, sh, sw, ph, pw, dh, dw_, c0, c1):
    n_samples, _, height, width = x.shape
    out_h, out_w = dy.shape[2], dy.shape[3]
    kh, kw = dw.shape[1], dw.shape[2]
    pad = numpy.zeros((height + 2 * ph, width + 2 * pw), dtype=x.dtype)
    sums = numpy.zeros((m, kh, kw))  # float64: long sums over the batch and the plane
    for c in range(c0, c1):
        sums[:, :, :] = 0.0
        for n in range(n_samples):
            pad[ph:ph + height, pw:pw + width] = x[n, c]
            for j in range(m):
                grad = dy[n, c * m + j]
                for i in range(kh):
                    for k in range(kw):
                        total = 0.0
                        for oh in range(out_h):
                            r = oh * sh + i * dh
                            s = k * dw_
                            if sw == 1:
                                for ow in range(out_w):
                                    total += grad[oh, ow] * pad[r, ow + s]
                            else:
                                for ow in range(out_w):
                                    total += grad[oh, ow] * pad[r, ow * sw + s]
                        sums[j, i, k] += total
        for j in range(m):
            for i in range(kh):
                for k in range(kw):
                    dw[c * m + j, i, k] = sums[j, i, k]
