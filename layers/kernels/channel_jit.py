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
def _batch_statistics(x, c):
    # channel c's mean and biased variance over (outer, inner), summed in float64
    outer, inner = x.shape[0], x.shape[2]
    count = outer * inner
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
    return mu, total / count


@jit
def batch_norm_train_forward(x, y, x_norm, mean, var, eps, c0, c1):
    # y = x_norm = (x - mean) / sqrt(var + eps) with the batch's mean and biased variance
    # (written to mean/var); y may be x itself (in place)
    outer, inner = x.shape[0], x.shape[2]
    for c in range(c0, c1):
        mu, sigma2 = _batch_statistics(x, c)
        mean[c] = mu
        var[c] = sigma2
        inv = 1.0 / numpy.sqrt(sigma2 + eps)
        for o in range(outer):
            row, out, keep = x[o, c], y[o, c], x_norm[o, c]
            for i in range(inner):
                keep[i] = (row[i] - mu) * inv
            # a second loop: y is often x (in place), and a loop reading x while writing y
            # runs scalar; this one reads only keep, which never overlaps y
            for i in range(inner):
                out[i] = keep[i]


@jit
def batch_norm_train_backward(dy, x_norm, dx, inv_std, in_place, c0, c1):
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
            if in_place:  # one array read and written: the loop vectorizes (two that overlap would not)
                for i in range(inner):
                    g[i] = (g[i] - m_dy - xn[i] * m_dyx) * inv
            else:
                for i in range(inner):
                    out[i] = (g[i] - m_dy - xn[i] * m_dyx) * inv


@jit
def scale_forward(x, scale, bias, y, saved, keep, in_place, c0, c1):
    # y = x * scale + bias per channel (bias: zeros when the layer has none); the input copied
    # to ``saved`` when ``keep`` (an in-place Scale overwrites what its gradient needs);
    # ``in_place``: y is x, written through one array so the loop vectorizes
    outer, inner = x.shape[0], x.shape[2]
    for c in range(c0, c1):
        s, b = scale[c], bias[c]
        for o in range(outer):
            row, out = x[o, c], y[o, c]
            if keep:
                copy = saved[o, c]
                for i in range(inner):
                    copy[i] = row[i]
            if in_place:
                for i in range(inner):
                    row[i] = row[i] * s + b
            else:
                for i in range(inner):
                    out[i] = row[i] * s + b


@jit
def scale_backward(dy, x, scale, dx, d_scale, d_bias, need_dx, in_place, c0, c1):
    # d_scale[c] = sum(dy * x), d_bias[c] = sum(dy) (written), dx = dy * scale (``in_place``:
    # dx is dy, written through one array so the loop vectorizes)
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
            if need_dx and in_place:
                for i in range(inner):
                    g[i] = g[i] * s
            elif need_dx:
                for i in range(inner):
                    out[i] = g[i] * s
        d_scale[c] = s_dyx
        d_bias[c] = s_dy


# The fused chains (layers/fusion.py): BatchNorm -> Scale -> activation, all in place on one
# blob, as one forward and one backward kernel. ``act`` picks the activation: 0 none, 1 ReLU
# (q[0]: negative slope), 2 Clip (q[0]..q[1]); q holds (p0, p1, 1, 0) in the data's dtype.
# The arithmetic is the unfused layers', step for step in the same dtype, so the results are
# theirs without the passes in between. Each activation has its own inner loop: a switch
# inside the loop would keep it from vectorizing.

@jit
def _scale_act(v, out, s, b, act, q):
    # out = act(v * s + b); v never overlaps out
    n = v.shape[0]
    if act == 1:
        slope = q[0]
        for i in range(n):
            z = v[i] * s + b
            out[i] = z if z > 0 else z * slope
    elif act == 2:
        lo, hi = q[0], q[1]
        for i in range(n):
            z = v[i] * s + b
            out[i] = lo if z < lo else (hi if z > hi else z)
    else:
        for i in range(n):
            out[i] = v[i] * s + b


@jit
def _gate(g_row, xn, g, s, b, act, q):
    # g = dy * act'(x_norm * scale + bias): the activation's backward from what the chain kept
    n = g_row.shape[0]
    if act == 1:
        one, slope = q[2], q[0]
        for i in range(n):
            g[i] = g_row[i] * (one if xn[i] * s + b > 0 else slope)
    elif act == 2:
        one, zero, lo, hi = q[2], q[3], q[0], q[1]
        for i in range(n):
            z = xn[i] * s + b
            g[i] = g_row[i] * (one if (z >= lo and z <= hi) else zero)
    else:
        for i in range(n):
            g[i] = g_row[i]


@jit
def bn_scale_act_train_forward(x, y, x_norm, mean, var, eps, scale, bias, act, q, c0, c1):
    # BatchNorm with batch statistics (x_norm kept, mean/var written), then y = act(x_norm * scale + bias)
    outer, inner = x.shape[0], x.shape[2]
    for c in range(c0, c1):
        mu, sigma2 = _batch_statistics(x, c)
        mean[c] = mu
        var[c] = sigma2
        inv = 1.0 / numpy.sqrt(sigma2 + eps)
        for o in range(outer):
            row, keep = x[o, c], x_norm[o, c]
            for i in range(inner):
                keep[i] = (row[i] - mu) * inv
            # y from keep alone: y is x (in place), and a loop reading x while writing y runs scalar
            _scale_act(keep, y[o, c], scale[c], bias[c], act, q)


@jit
def bn_scale_act_train_backward(dy, x_norm, dx, inv_std, scale, bias, act, q, d_scale, d_bias, c0, c1):
    # the activation's, Scale's and BatchNorm's backward in two passes per channel: d_scale and
    # d_bias written, dx = BatchNorm's backward of (dy * act'(z)) * scale; dx may be dy
    outer, inner = dy.shape[0], dy.shape[2]
    count = outer * inner
    g = numpy.empty(inner, dtype=dy.dtype)
    for c in range(c0, c1):
        s, b = scale[c], bias[c]
        s_g = 0.0
        s_gx = 0.0
        s_gs = 0.0
        s_gsx = 0.0
        for o in range(outer):
            xn = x_norm[o, c]
            _gate(dy[o, c], xn, g, s, b, act, q)
            for i in range(inner):
                s_g += g[i]
                s_gx += g[i] * xn[i]
                gs = g[i] * s
                s_gs += gs
                s_gsx += gs * xn[i]
        d_scale[c] = s_gx
        d_bias[c] = s_g
        m_dy = s_gs / count
        m_dyx = s_gsx / count
        inv = inv_std[c]
        for o in range(outer):
            xn, out = x_norm[o, c], dx[o, c]
            _gate(dy[o, c], xn, g, s, b, act, q)
            for i in range(inner):
                out[i] = (g[i] * s - m_dy - xn[i] * m_dyx) * inv


@jit
def bn_scale_act_stored_forward(x, y, kept, inv, shift, scale, bias, act, q, c0, c1):
    # BatchNorm with stored statistics (v = x * inv + shift, BatchNorm's affine kernel), kept
    # for backward, then y = act(v * scale + bias)
    outer, inner = x.shape[0], x.shape[2]
    for c in range(c0, c1):
        a, d = inv[c], shift[c]
        for o in range(outer):
            row, v = x[o, c], kept[o, c]
            for i in range(inner):
                v[i] = row[i] * a + d
            _scale_act(v, y[o, c], scale[c], bias[c], act, q)


@jit
def bn_scale_act_stored_backward(dy, kept, dx, std, scale, bias, act, q, d_scale, d_bias, c0, c1):
    # backward of the chain above: d_scale, d_bias written; dx = dy * act'(z) * scale / std
    # (BatchNorm with stored statistics is an affine map); dx may be dy
    outer, inner = dy.shape[0], dy.shape[2]
    g = numpy.empty(inner, dtype=dy.dtype)
    for c in range(c0, c1):
        s, b, sd = scale[c], bias[c], std[c]
        s_g = 0.0
        s_gx = 0.0
        for o in range(outer):
            v, out = kept[o, c], dx[o, c]
            _gate(dy[o, c], v, g, s, b, act, q)
            for i in range(inner):
                s_g += g[i]
                s_gx += g[i] * v[i]
            for i in range(inner):
                out[i] = g[i] * s / sd
        d_scale[c] = s_gx
        d_bias[c] = s_g
