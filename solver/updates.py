"""The per-parameter arithmetic of Caffe's solvers, on numpy or cupy arrays.

Every function works in place on the parameter's ``diff`` (the gradient on
entry, the step that ``Net.update`` subtracts on exit) and on the solver's
history arrays, in the array's own dtype: scalars are cast to it first so
float32 training stays float32. Order per parameter (Caffe's ApplyUpdate):
normalize (iter_size), regularize (weight decay), then the rule's update.
"""

import math

from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.layers.kernels.blas import axpy

REGULARIZATION_TYPES = ("L2", "L1")


def _scalar(array, value):
    return array.dtype.type(value)


def global_norm(diffs, xp):
    """L2 norm over all gradients together (Caffe's clip_gradients measure)."""
    total = 0.0
    for diff in diffs:
        flat = diff.ravel()
        total += float(xp.dot(flat, flat))
    return math.sqrt(total)


def clip_gradients(diffs, threshold, xp):
    """Scale every gradient by threshold/norm when the global norm exceeds
    ``threshold`` (< 0 disables). Returns (norm, scale) or None when unscaled."""
    if threshold < 0:
        return None
    norm = global_norm(diffs, xp)
    if norm > threshold:
        scale = threshold / norm
        for diff in diffs:
            diff *= _scalar(diff, scale)
        return norm, scale
    return None


def normalize(diff, iter_size):
    """Undo the summation of ``iter_size`` accumulated backward passes."""
    if iter_size != 1:
        diff *= _scalar(diff, 1.0 / iter_size)


def regularize(diff, data, local_decay, kind, xp):
    """Add the weight-decay gradient: decay * w (L2) or decay * sign(w) (L1)."""
    if not local_decay:
        return
    decay = _scalar(diff, local_decay)
    if kind == "L2":
        axpy(decay, data, diff)  # no weight-sized temporary (150 MB for CaffeNet's fc6)
    elif kind == "L1":
        diff += decay * xp.sign(data)
    else:
        raise ValueError(f"unknown regularization_type {kind!r} (one of L2, L1)")


# -- update rules: (diff, history list for this param, local_rate, solver param, iteration) ----------

def sgd(diff, hist, local_rate, param, iteration, xp):
    """v = momentum * v + lr * g; step = v."""
    (v,) = hist
    v *= _scalar(v, param.momentum)
    axpy(_scalar(v, local_rate), diff, v)
    diff[...] = v


# elements per block of the fused step: three float32 blocks stay in the core's cache
FUSED_BLOCK = 1 << 17
# parameters at least this large are stepped by all CPU threads at once
PARALLEL_MIN_ELEMENTS = 1 << 18


def sgd_l2_fused(diff, data, v, local_decay, local_rate, momentum, scratch=None, apply=False):
    """regularize (L2) + sgd (+ Net.update's data -= diff when ``apply``) in one sweep, block by
    block: the same float operations in the same order as regularize(), sgd() and Net.update,
    but each block of data/diff/history is loaded from memory once instead of once per
    operation (CaffeNet's 61M parameters make this memory-bound).
    numpy only; returns False (doing nothing) for other arrays."""
    import numpy

    if not all(type(a) is numpy.ndarray and a.flags.c_contiguous for a in (diff, data, v)):
        return False
    decay = _scalar(diff, local_decay)
    rate, mom = _scalar(v, local_rate), _scalar(v, momentum)
    d, w, h = diff.reshape(-1), data.reshape(-1), v.reshape(-1)
    if apply and cpu_kernels.enabled(numpy) and diff.dtype == data.dtype == v.dtype:
        step = cpu_kernels.kernels().sgd_l2_step
        parallel.over_ranges(lambda a, b: step(d[a:b], w[a:b], h[a:b], decay, rate, mom), d.size,
                             big=d.size >= PARALLEL_MIN_ELEMENTS)
        return True
    block = min(FUSED_BLOCK, d.size)
    usable = scratch is not None and scratch.dtype == diff.dtype and scratch.size >= block
    tmp = scratch[:block] if usable else numpy.empty(block, diff.dtype)
    for start in range(0, d.size, block):
        stop = min(start + block, d.size)
        db, hb, t = d[start:stop], h[start:stop], tmp[:stop - start]
        if local_decay:
            numpy.multiply(w[start:stop], decay, out=t)
            db += t
        hb *= mom
        numpy.multiply(db, rate, out=t)
        hb += t
        db[...] = hb
        if apply:
            w[start:stop] -= db
    return True


def _blocks(xp, arrays, n_tmp):
    """Yield (views of ``arrays``..., ``n_tmp`` scratch arrays...) block by block.

    The rules below are elementwise, so running every step on one block before the next
    gives the same floats as whole-array passes, while the block stays in cache and no
    parameter-sized temporary is allocated. Host arrays go in FUSED_BLOCK pieces with small
    scratch; others (cupy, non-contiguous) in one piece with full-size scratch."""
    import numpy

    if all(type(a) is numpy.ndarray and a.flags.c_contiguous for a in arrays):
        flat = [a.reshape(-1) for a in arrays]
        size = flat[0].size
        block = max(1, min(FUSED_BLOCK, size))
        tmps = [numpy.empty(block, arrays[0].dtype) for _ in range(n_tmp)]
        for start in range(0, size, block):
            stop = min(start + block, size)
            yield [f[start:stop] for f in flat] + [t[:stop - start] for t in tmps]
    else:
        yield list(arrays) + [xp.empty_like(arrays[0]) for _ in range(n_tmp)]


def nesterov(diff, hist, local_rate, param, iteration, xp):
    """v' = momentum * v + lr * g; step = (1 + momentum) * v' - momentum * v."""
    (v,) = hist
    momentum = _scalar(v, param.momentum)
    rate = _scalar(v, local_rate)
    one_plus = _scalar(v, 1) + momentum
    for g, vb, previous, t in _blocks(xp, (diff, v), 2):
        previous[...] = vb
        vb *= momentum
        xp.multiply(g, rate, out=t)
        vb += t
        xp.multiply(vb, one_plus, out=t)
        previous *= momentum
        xp.subtract(t, previous, out=g)


def _scale_by_root(g, h, t, delta, rate, xp):
    """g = g / (sqrt(h) + delta) * rate, with ``t`` as scratch."""
    xp.sqrt(h, out=t)
    t += delta
    g /= t
    g *= rate


def adagrad(diff, hist, local_rate, param, iteration, xp):
    """h += g^2; step = lr * g / (sqrt(h) + delta)."""
    (h,) = hist
    delta, rate = _scalar(h, param.delta), _scalar(diff, local_rate)
    for g, hb, t in _blocks(xp, (diff, h), 1):
        xp.multiply(g, g, out=t)
        hb += t
        _scale_by_root(g, hb, t, delta, rate, xp)


def rmsprop(diff, hist, local_rate, param, iteration, xp):
    """h = decay * h + (1 - decay) * g^2; step = lr * g / (sqrt(h) + delta)."""
    (h,) = hist
    decay = _scalar(h, param.rms_decay)
    one_minus = _scalar(h, 1.0 - param.rms_decay)
    delta, rate = _scalar(h, param.delta), _scalar(diff, local_rate)
    for g, hb, t in _blocks(xp, (diff, h), 1):
        hb *= decay
        xp.multiply(g, g, out=t)
        t *= one_minus
        hb += t
        _scale_by_root(g, hb, t, delta, rate, xp)


def adadelta(diff, hist, local_rate, param, iteration, xp):
    """Gradient and update running averages (hist[0], hist[1]):
    g2 = m g2 + (1-m) g^2; step = g * sqrt((u2 + delta) / (g2 + delta));
    u2 = m u2 + (1-m) step^2; step *= lr."""
    grad_sq, update_sq = hist
    m = _scalar(grad_sq, param.momentum)
    one_minus = _scalar(grad_sq, 1.0 - param.momentum)
    delta = _scalar(grad_sq, param.delta)
    rate = _scalar(diff, local_rate)
    for g, g2, u2, t, t2 in _blocks(xp, (diff, grad_sq, update_sq), 2):
        g2 *= m
        xp.multiply(g, g, out=t)
        t *= one_minus
        g2 += t
        xp.add(u2, delta, out=t)
        xp.add(g2, delta, out=t2)
        t /= t2
        xp.sqrt(t, out=t)
        g *= t
        u2 *= m
        xp.multiply(g, g, out=t)
        t *= one_minus
        u2 += t
        g *= rate


def adam(diff, hist, local_rate, param, iteration, xp):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    step = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), t = iteration + 1."""
    m, v = hist
    beta1, beta2 = param.momentum, param.momentum2
    t = iteration + 1
    correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    b1, one_minus_b1 = _scalar(m, beta1), _scalar(m, 1.0 - beta1)
    b2, one_minus_b2 = _scalar(v, beta2), _scalar(v, 1.0 - beta2)
    step, eps = _scalar(diff, local_rate * correction), _scalar(v, param.delta)
    for g, mb, vb, t1, t2 in _blocks(xp, (diff, m, v), 2):
        mb *= b1
        xp.multiply(g, one_minus_b1, out=t1)
        mb += t1
        vb *= b2
        xp.multiply(g, g, out=t1)
        t1 *= one_minus_b2
        vb += t1
        xp.multiply(mb, step, out=t1)
        xp.sqrt(vb, out=t2)
        t2 += eps
        xp.divide(t1, t2, out=g)
