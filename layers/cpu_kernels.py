"""Compiled CPU loops (numba) for the few places whose array code is bound by passes and gathers.

Max pooling in array code needs one pass per kernel offset for the maximum, several more for
the argmax, and a scattered add for the gradient; a loop visits each input once. A
convolution's data gradient sums its column matrix back onto the image in one loop instead of
a small GEMM and a strided add per kernel offset. The SGD step reads and writes each parameter
once instead of once per operation. Each kernel here has an array-code twin in its layer: the
twin runs on cupy, where numba is missing, and under ``BREWNET_JIT=0``. ``enabled(xp)`` is the
one place that chooses between them.

Pooling kernels work on (planes, H, W) arrays, planes = num x channels, C-contiguous; callers
split the planes (or elements) across brewnet's CPU threads (layers/parallel.py), and every
kernel releases the GIL. Compiled code is cached on disk (numba's cache) after the first run.
"""

import contextlib
import logging
import os

import numpy

logger = logging.getLogger("brewnet")

_state = {"on": os.environ.get("BREWNET_JIT", "1") != "0", "kernels": None, "failed": False}


def enabled(xp):
    """True when the compiled kernels should run for arrays of module ``xp``."""
    return xp is numpy and _state["on"] and kernels() is not None


@contextlib.contextmanager
def _switched(on):
    before = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = before


def disabled():
    """Run the array-code twins inside this block (tests compare both)."""
    return _switched(False)


def enabled_for_test():
    """Run the compiled kernels inside this block, whatever BREWNET_JIT says."""
    return _switched(True)


def kernels():
    """The compiled kernels, or None when numba cannot be imported (then array code runs)."""
    if _state["kernels"] is None and not _state["failed"]:
        try:
            _state["kernels"] = _build()
        except ImportError as exc:
            _state["failed"] = True
            logger.debug("numba unavailable (%s): pooling runs as array code", exc)
        except Exception as exc:  # e.g. numba finds no writable cache folder (set NUMBA_CACHE_DIR)
            _state["failed"] = True
            logger.warning("compiled CPU kernels unavailable, using array code: %s", exc)
    return _state["kernels"]


def _build():
    from types import SimpleNamespace

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
    # indexing cost several times the arithmetic): along each row, then down the rows for every
    # output column at once (unit stride, so LLVM vectorizes it). Average pooling sums down the
    # rows first, max pooling goes along the rows first (its row-major tie rule needs that).

    @jit
    def max_pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw):
        # idx: flat h * W + w of the first maximum in row-major window order (Caffe's mask):
        # the first maximum along each row of a window, then the first of those down the rows,
        # both with Caffe's strict '>'. A NaN wins only where it comes first (Caffe never
        # lets one win); checking every element for NaN would triple the cost.
        planes, H, W = x.shape
        oh, ow = y.shape[1], y.shape[2]
        row_best = numpy.empty((H, ow), dtype=x.dtype)
        row_at = numpy.empty((H, ow), dtype=numpy.int32)
        one = uintp(1)
        for p in range(planes):
            for h in range(H):
                xr = x[p, h]
                for j in range(ow):
                    # (not window(): its extra min costs 10% in this, the hottest loop) unsigned
                    # indices: numba then skips its negative-index wraparound check
                    w0 = uintp(max(j * sw - pw, 0))
                    w1 = uintp(min(j * sw - pw + kw, W))
                    if w1 <= w0:  # a ceil-mode window past the image (kernel < stride)
                        row_best[h, j] = -numpy.inf
                        row_at[h, j] = -1
                        continue
                    best = xr[w0]
                    at = w0
                    w = w0 + one
                    while w < w1:
                        v = xr[w]
                        take = v > best
                        best = v if take else best
                        at = w if take else at
                        w += one
                    row_best[h, j] = best
                    row_at[h, j] = h * W + at
            for i in range(oh):
                h0, h1, _ = window(i, sh, ph, kh, H)
                if h1 <= h0:  # empty window: -inf and Caffe's mask -1, which backward skips
                    for j in range(ow):
                        y[p, i, j] = -numpy.inf
                        idx[p, i, j] = -1
                    continue
                for j in range(ow):
                    y[p, i, j] = row_best[h0, j]
                    idx[p, i, j] = row_at[h0, j]
                for h in range(h0 + 1, h1):
                    for j in range(ow):
                        take = row_best[h, j] > y[p, i, j]  # selects, not branches: they vectorize
                        y[p, i, j] = row_best[h, j] if take else y[p, i, j]
                        idx[p, i, j] = row_at[h, j] if take else idx[p, i, j]

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

    @jit
    def ave_pool_forward(x, y, kh, kw, sh, sw, ph, pw):
        # divisor: the window clipped to image + padding, before clipping to the image (Caffe)
        planes, H, W = x.shape
        oh, ow = y.shape[1], y.shape[2]
        col_sum = numpy.empty(W, dtype=x.dtype)
        for p in range(planes):
            for i in range(oh):
                h0, h1, size_h = window(i, sh, ph, kh, H)
                col_sum[:] = 0
                for h in range(h0, h1):
                    for w in range(W):
                        col_sum[w] += x[p, h, w]
                for j in range(ow):
                    w0, w1, size_w = window(j, sw, pw, kw, W)
                    total = col_sum[0] * 0
                    for w in range(w0, w1):
                        total += col_sum[w]
                    y[p, i, j] = total / (size_h * size_w)

    @jit
    def ave_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw):
        # dx: (planes, H, W), overwritten
        planes, H, W = dx.shape
        oh, ow = dy.shape[1], dy.shape[2]
        col_grad = numpy.empty(W, dtype=dx.dtype)
        for p in range(planes):
            dx[p] = 0
            for i in range(oh):
                h0, h1, size_h = window(i, sh, ph, kh, H)
                col_grad[:] = 0
                for j in range(ow):
                    w0, w1, size_w = window(j, sw, pw, kw, W)
                    g = dy[p, i, j] / (size_h * size_w)
                    for w in range(w0, w1):
                        col_grad[w] += g
                for h in range(h0, h1):
                    for w in range(W):
                        dx[p, h, w] += col_grad[w]

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

    return SimpleNamespace(max_pool_forward=max_pool_forward, max_pool_backward=max_pool_backward,
                           ave_pool_forward=ave_pool_forward, ave_pool_backward=ave_pool_backward,
                           sgd_l2_step=sgd_l2_step, col2im_channels_last=col2im_channels_last)
