"""numba kernels of the per-channel layers (BatchNorm, Scale); layers/kernels/channel_ops.py
imports this lazily and holds their array-code twins.

Arrays are (outer, channels, inner), C-contiguous. Each kernel handles channels [c0, c1), so
callers split the channels across brewnet's threads and every channel's statistics are
summed by one thread in one order. A channel's values (outer x inner, a few hundred KB for a
batch of 8) stay in cache between the passes over it. Sums run in float64. ``fastmath``
allows only reassociation, so the sums vectorize while NaN and inf keep their meaning.
As cpu_jit.py explains, every kernel is a module-level function with ``cache=True``.
"""

import numpy
from numba import njit

jit = njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})


@jit
def batch_norm_train_forward(x, y, x_norm, mean, var, eps, c0, c1):
    # y = x_norm = (x - mean) / sqrt(var + eps) with the batch's mean and biased variance
    # (written to mean/var); y may be x itself (in place)
    outer, inner = x.shape[0], x.shape[2]
    count = outer * inner
    for c in range(c0, c1):
        total = 0.0
        for o in range(outer):
            row = x[o, c]
            for i in range(inner):
                total += row[i]
        mu = total / count
        total = 0.0
        for o in range(outer):
            row = x[o, c]
            for i in range(inner):
                d = row[i] - mu
                total += d * d
        sigma2 = total / count
        mean[c] = mu
        var[c] = sigma2
        inv = 1.0 / numpy.sqrt(sigma2 + eps)
        for o in range(outer):
            row, out, keep = x[o, c], y[o, c], x_norm[o, c]
            for i in range(inner):
                v = (row[i] - mu) * inv
                keep[i] = v
                out[i] = v


@jit
def batch_norm_train_backward(dy, x_norm, dx, inv_std, c0, c1):
    # dx = (dy - mean(dy) - x_norm * mean(dy * x_norm)) * inv_std, per channel; dx may be dy
    outer, inner = dy.shape[0], dy.shape[2]
    count = outer * inner
    for c in range(c0, c1):
        s_dy = 0.0
        s_dyx = 0.0
        for o in range(outer):
            g, xn = dy[o, c], x_norm[o, c]
            for i in range(inner):
                s_dy += g[i]
                s_dyx += g[i] * xn[i]
        m_dy = s_dy / count
        m_dyx = s_dyx / count
        inv = inv_std[c]
        for o in range(outer):
            g, xn, out = dy[o, c], x_norm[o, c], dx[o, c]
            for i in range(inner):
                out[i] = (g[i] - m_dy - xn[i] * m_dyx) * inv


@jit
def scale_forward(x, scale, bias, y, saved, keep, c0, c1):
    # y = x * scale + bias per channel (bias: zeros when the layer has none); the input copied
    # to ``saved`` when ``keep`` (an in-place Scale overwrites what its gradient needs)
    outer, inner = x.shape[0], x.shape[2]
    for c in range(c0, c1):
        s, b = scale[c], bias[c]
        for o in range(outer):
            row, out = x[o, c], y[o, c]
            if keep:
                copy = saved[o, c]
                for i in range(inner):
                    copy[i] = row[i]
            for i in range(inner):
                out[i] = row[i] * s + b


@jit
def scale_backward(dy, x, scale, dx, d_scale, d_bias, need_dx, c0, c1):
    # d_scale[c] = sum(dy * x), d_bias[c] = sum(dy) (written), dx = dy * scale (dx may be dy)
    outer, inner = dy.shape[0], dy.shape[2]
    for c in range(c0, c1):
        s_dyx = 0.0
        s_dy = 0.0
        s = scale[c]
        for o in range(outer):
            g, row, out = dy[o, c], x[o, c], dx[o, c]
            for i in range(inner):
                s_dyx += g[i] * row[i]
                s_dy += g[i]
            if need_dx:
                for i in range(inner):
                    out[i] = g[i] * s
        d_scale[c] = s_dyx
        d_bias[c] = s_dy
