"""The per-parameter arithmetic of Caffe's solvers, on numpy or cupy arrays.

Every function works in place on the parameter's ``diff`` (the gradient on
entry, the step that ``Net.update`` subtracts on exit) and on the solver's
history arrays, in the array's own dtype: scalars are cast to it first so
float32 training stays float32. Order per parameter (Caffe's ApplyUpdate):
normalize (iter_size), regularize (weight decay), then the rule's update.
"""

import math

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
        diff += decay * data
    elif kind == "L1":
        diff += decay * xp.sign(data)
    else:
        raise ValueError(f"unknown regularization_type {kind!r} (one of L2, L1)")


# -- update rules: (diff, history list for this param, local_rate, solver param, iteration) ----------

def sgd(diff, hist, local_rate, param, iteration, xp):
    """v = momentum * v + lr * g; step = v."""
    (v,) = hist
    v *= _scalar(v, param.momentum)
    v += _scalar(v, local_rate) * diff
    diff[...] = v


def nesterov(diff, hist, local_rate, param, iteration, xp):
    """v' = momentum * v + lr * g; step = (1 + momentum) * v' - momentum * v."""
    (v,) = hist
    momentum = _scalar(v, param.momentum)
    previous = v.copy()
    v *= momentum
    v += _scalar(v, local_rate) * diff
    diff[...] = (_scalar(v, 1) + momentum) * v - momentum * previous


def adagrad(diff, hist, local_rate, param, iteration, xp):
    """h += g^2; step = lr * g / (sqrt(h) + delta)."""
    (h,) = hist
    h += diff * diff
    diff /= xp.sqrt(h) + _scalar(h, param.delta)
    diff *= _scalar(diff, local_rate)


def rmsprop(diff, hist, local_rate, param, iteration, xp):
    """h = decay * h + (1 - decay) * g^2; step = lr * g / (sqrt(h) + delta)."""
    (h,) = hist
    decay = param.rms_decay
    h *= _scalar(h, decay)
    h += _scalar(h, 1.0 - decay) * (diff * diff)
    diff /= xp.sqrt(h) + _scalar(h, param.delta)
    diff *= _scalar(diff, local_rate)


def adadelta(diff, hist, local_rate, param, iteration, xp):
    """Gradient and update running averages (hist[0], hist[1]):
    g2 = m g2 + (1-m) g^2; step = g * sqrt((u2 + delta) / (g2 + delta));
    u2 = m u2 + (1-m) step^2; step *= lr."""
    grad_sq, update_sq = hist
    m = _scalar(grad_sq, param.momentum)
    one_minus = _scalar(grad_sq, 1.0 - param.momentum)
    delta = _scalar(grad_sq, param.delta)
    grad_sq *= m
    grad_sq += one_minus * (diff * diff)
    diff *= xp.sqrt((update_sq + delta) / (grad_sq + delta))
    update_sq *= m
    update_sq += one_minus * (diff * diff)
    diff *= _scalar(diff, local_rate)


def adam(diff, hist, local_rate, param, iteration, xp):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    step = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), t = iteration + 1."""
    m, v = hist
    beta1, beta2 = param.momentum, param.momentum2
    t = iteration + 1
    correction = math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    m *= _scalar(m, beta1)
    m += _scalar(m, 1.0 - beta1) * diff
    v *= _scalar(v, beta2)
    v += _scalar(v, 1.0 - beta2) * (diff * diff)
    diff[...] = _scalar(diff, local_rate * correction) * m / (xp.sqrt(v) + _scalar(v, param.delta))
