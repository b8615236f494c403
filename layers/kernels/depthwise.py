"""Depthwise 2-D convolution: every input channel convolved with its own filters (group == channels).

A grouped convolution with one input channel per group is, through im2col, G tiny GEMMs
(M/G rows, kh*kw deep) plus a column copy nine times the input's size: almost all memory
traffic. Here each output row is summed directly from a zero-bordered copy of its input
plane, kernel offset by kernel offset (a compiled loop, layers/kernels/depthwise_jit.py, with
the channels split across brewnet's threads), and the gradients in one more pass of the same
kind. The array-code twin (a pass per kernel offset over the whole batch) runs on cupy,
without numba and under ``BREWNET_JIT=0``; the tests compare the two.

Layout as in Caffe's Convolution with ``group == channels``: x (n, C, H, W), weights
(C * mult, 1, kh, kw) where ``mult`` = num_output / C is the channel multiplier (output
channel c * mult + k reads input channel c), bias (C * mult,). The output size is Caffe's
(layers/kernels/im2col.conv_out_size).

  depthwise_forward(x, w, bias, stride, pad, dilation, out=None) -> y
  depthwise_backward(x, w, dy, stride, pad, dilation, dx=None, need_dw=True) -> dW or None

Both take the array module from their arguments (numpy or cupy) and accept float32 or float64.
"""

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel
from brewnet.layers.kernels.im2col import conv_out_size
from brewnet.layers.kernels.scratch import Scratch

_state = {"jit": None, "scratch": {}}


def _jit_kernels(xp):
    """depthwise_jit when the compiled kernels may run on arrays of ``xp``, else None."""
    if not cpu_kernels.enabled(xp):
        return None
    if _state["jit"] is None:
        from brewnet.layers.kernels import depthwise_jit

        _state["jit"] = depthwise_jit
    return _state["jit"]


def _scratch(xp):
    return _state["scratch"].setdefault(xp.__name__, Scratch(xp))


def _padded_role(ph, pw, H, W):
    # a padded plane's border stays zero only if every user of the buffer writes the same inside:
    # the shape, the pad and the image size together fix it (another pad could fill the same
    # shape edge to edge; with phase planes, sizes H and H + 1 can share a shape)
    return f"depthwise_in_{ph}_{pw}_{H}_{W}"


def _padded_shape(x, ph, pw, sh, sw):
    """The compiled kernels' zero-bordered plane (depthwise_jit._fill_padded): the padded image
    (H + 2ph, W + 2pw) as sh * sw phase planes, each with a spare row below."""
    return (sh, sw, -(-(x.shape[2] + 2 * ph) // sh) + 1, -(-(x.shape[3] + 2 * pw) // sw))


def _padded_planes(xp, x, ph, pw, sh, sw, worker):
    """Thread ``worker``'s zero-bordered phase planes for x's channel planes (made zero once)."""
    role = _padded_role(ph, pw, x.shape[2], x.shape[3])
    return _scratch(xp).get(role, _padded_shape(x, ph, pw, sh, sw), x.dtype, worker, zero=True)


def _xp_of(array):
    return numpy if isinstance(array, numpy.ndarray) else __import__("cupy")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def output_shape(x_shape, w_shape, stride, pad, dilation):
    """(n, C * mult, Oh, Ow) of a depthwise convolution of x with weights w."""
    n, C, H, W = x_shape
    M, one, kh, kw = w_shape
    if one != 1 or M % C:
        raise ValueError(f"depthwise weights must be (C * mult, 1, kh, kw) for {C} channels, got {tuple(w_shape)}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    return (n, M, conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw))


def _channel_jobs(C, xp):
    # several jobs per thread: a thread slowed by other load takes fewer of them
    return parallel.split(C, parallel.jobs_for(xp, C >= 2))


def depthwise_forward(x, w, bias, stride, pad, dilation, out=None):
    """y = depthwise conv(x, w) + bias (bias may be None), written into ``out`` if given.

    x (n, C, H, W); w (C * mult, 1, kh, kw); stride, pad, dilation: an int or an (h, w) pair.
    Returns y (n, C * mult, Oh, Ow).
    """
    xp = _xp_of(x)
    shape = output_shape(x.shape, w.shape, stride, pad, dilation)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the convolution gives {shape}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    jit = _jit_kernels(xp)
    if jit is None:
        return _forward_array(xp, x, w, bias, (sh, sw), (ph, pw), (dh, dw), out)
    x, w = numpy.ascontiguousarray(x), numpy.ascontiguousarray(w, dtype=x.dtype)
    b = numpy.zeros(w.shape[0], x.dtype) if bias is None else numpy.ascontiguousarray(bias, dtype=x.dtype)
    y = out if out.flags.c_contiguous else numpy.empty(shape, dtype=x.dtype)
    jobs = _channel_jobs(x.shape[1], xp)

    def job(j, worker):
        padded = _padded_planes(xp, x, ph, pw, sh, sw, worker)
        jit.forward(x, w, b, y, *jobs[j], sh, sw, ph, pw, dh, dw, padded)

    parallel.run(job, len(jobs), xp)
    if y is not out:
        out[...] = y
    return out


def depthwise_backward(x, w, dy, stride, pad, dilation, dx=None, need_dw=True):
    """Gradients of depthwise_forward: writes dL/dx into ``dx`` (skipped when None) and returns
    dL/dw (C * mult, 1, kh, kw), a new array, when ``need_dw`` (else None). The bias gradient
    is dy summed over samples and positions, which the caller does (a GEMV in the plan)."""
    xp = _xp_of(x)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    shape = output_shape(x.shape, w.shape, stride, pad, dilation)
    if tuple(dy.shape) != shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, the convolution gives {shape}")
    if dx is None and not need_dw:
        return None
    jit = _jit_kernels(xp)
    if jit is None:
        return _backward_array(xp, x, w, dy, (sh, sw), (ph, pw), (dh, dw), dx, need_dw)
    x, w, dy = (numpy.ascontiguousarray(a, dtype=x.dtype) for a in (x, w, dy))
    dW = numpy.empty(w.shape, dtype=x.dtype) if need_dw else w  # (w: an unused placeholder)
    gx = dx if dx is None or dx.flags.c_contiguous else numpy.empty(x.shape, dtype=x.dtype)
    gx_arg = x if gx is None else gx  # a placeholder the kernel never writes when need_dx is False
    jobs = _channel_jobs(x.shape[1], xp)

    def job(j, worker):
        padded = _padded_planes(xp, x, ph, pw, sh, sw, worker)
        dpadded = _scratch(xp).get("depthwise_grad", padded.shape, x.dtype, worker)
        jit.backward(x, w, dy, gx_arg, dW, *jobs[j], sh, sw, ph, pw, dh, dw, gx is not None, need_dw, padded,
                     dpadded)

    parallel.run(job, len(jobs), xp)
    if gx is not None and gx is not dx:
        dx[...] = gx
    return dW if need_dw else None


# -- the array-code twin ------------------------------------------------------------------
def _offsets(w_shape, stride, dilation, out_hw):
    """Per kernel offset (i, j): the slices of the padded input its products read."""
    (sh, sw), (dh, dw), (Oh, Ow) = stride, dilation, out_hw
    for i in range(w_shape[2]):
        for j in range(w_shape[3]):
            yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + sh * (Oh - 1) + 1, sh),
                         slice(j * dw, j * dw + sw * (Ow - 1) + 1, sw))


def _padded(xp, x, pad):
    ph, pw = pad
    if not (ph or pw):
        return x
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _forward_array(xp, x, w, bias, stride, pad, dilation, out):
    n, C = x.shape[:2]
    mult = w.shape[0] // C
    src = _padded(xp, x, pad)
    y5 = out.reshape((n, C, mult) + out.shape[2:])
    w4 = w.reshape(C, mult, w.shape[2], w.shape[3])
    y5[...] = 0 if bias is None else bias.reshape(1, C, mult, 1, 1)
    for i, j, window in _offsets(w.shape, stride, dilation, out.shape[2:]):
        y5 += w4[None, :, :, i, j, None, None] * src[window][:, :, None]
    return out


def _backward_array(xp, x, w, dy, stride, pad, dilation, dx, need_dw):
    n, C, H, W = x.shape
    mult = w.shape[0] // C
    src = _padded(xp, x, pad) if need_dw else None
    dy5 = dy.reshape((n, C, mult) + dy.shape[2:])
    w4 = w.reshape(C, mult, w.shape[2], w.shape[3])
    dW = xp.empty(w.shape, dtype=x.dtype) if need_dw else None
    dW4 = dW.reshape(w4.shape) if need_dw else None
    acc = xp.zeros((n, C, H + 2 * pad[0], W + 2 * pad[1]), dtype=x.dtype) if dx is not None else None
    for i, j, window in _offsets(w.shape, stride, dilation, dy.shape[2:]):
        if need_dw:
            dW4[:, :, i, j] = (dy5 * src[window][:, :, None]).sum(axis=(0, 3, 4))
        if dx is not None:
            acc[window] += (dy5 * w4[None, :, :, i, j, None, None]).sum(axis=2)
    if dx is not None:
        dx[...] = acc[:, :, pad[0]:pad[0] + H, pad[1]:pad[1] + W]
    return dW
