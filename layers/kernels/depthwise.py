"""Depthwise convolution: one small filter bank per input channel (group == channels).

im2col with group == channels spends its time building a column matrix and running one tiny
GEMM per channel (a single row of weights). Here each of the kh*kw kernel offsets is one
strided slice of the padded input, multiplied by that offset's weights and added into the
output, over the whole batch at once. The channels are cut into ranges, one job each on brewnet's CPU threads; a range
owns its outputs, input gradient and weight gradient, so no partial sums are merged and a run
gives the same floats whatever the thread count. On the CPU the per-offset passes are numba
loops instead (layers/kernels/depthwise_jit.py: one visit per output and tap, no temporaries);
the array code runs on cupy, without numba and under BREWNET_JIT=0 (cpu_kernels.enabled).

Shapes: x (n, C, H, W); W (C * M, 1, kh, kw) with M outputs per channel (Caffe's order: output
channel o reads input channel o // M); y (n, C * M, OH, OW).
"""

import numpy

from brewnet.layers.kernels import cpu_kernels, parallel


def _jit():
    # imported with numba on the first compiled call (cpu_kernels.py tells why)
    from brewnet.layers.kernels import depthwise_jit

    return depthwise_jit


def is_depthwise(geometry):
    """True for a 2-D convolution whose every group is one input channel."""
    g = geometry
    return len(g.in_spatial) == 2 and g.group == g.channels and g.group > 1 and g.num_output % g.channels == 0


class DepthwisePlan:
    """The plan interface of layers/kernels/conv_plan.py (forward, backward, bias_gradient) for
    depthwise geometry; Convolution dispatches to it when ``is_depthwise``."""

    path = "depthwise"

    def __init__(self, xp, geometry):
        g = self.geometry = geometry
        self.xp = xp
        self.channels = g.channels
        self.multiplier = g.num_output // g.channels
        self.kernel, self.stride, self.pad, self.dilation = g.kernel, g.stride, g.pad, g.dilation
        self.in_hw, self.out_hw = tuple(g.in_spatial), tuple(g.out_spatial)

    # -- helpers ----------------------------------------------------------------------------
    def _window(self, padded, i, j):
        """The input samples that kernel offset (i, j) meets, (n, c, OH, OW): a strided view."""
        (dh, dw), (sh, sw), (oh, ow) = self.dilation, self.stride, self.out_hw
        return padded[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]

    def _pad(self, x, a, b):
        """Channels a..b of x with the zero border (a view of x itself when there is no pad)."""
        (ph, pw), (h, w) = self.pad, self.in_hw
        if ph == 0 and pw == 0:
            return x[:, a:b]
        padded = self.xp.zeros((x.shape[0], b - a, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        padded[:, :, ph:ph + h, pw:pw + w] = x[:, a:b]
        return padded

    def _weights(self, W):
        kh, kw = self.kernel
        return W.reshape(self.channels, self.multiplier, kh, kw)

    def _geometry_args(self):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dilation
        return self.multiplier, sh, sw, ph, pw, dh, dw

    def _over_channels(self, fn, x):
        # many channels and a big enough batch: a few jobs per thread
        big = x.size >= (1 << 16)
        parallel.over_ranges(fn, self.channels, self.xp, big=big, per_thread=2)

    # -- the plan's steps ------------------------------------------------------------------
    def forward(self, x, W, bias, y, slot=0):
        if cpu_kernels.enabled(self.xp):
            kernel, args = _jit().forward, self._geometry_args()
            x, w = numpy.ascontiguousarray(x), numpy.ascontiguousarray(W.reshape(W.shape[0], *self.kernel))
            b = numpy.zeros(0, dtype=x.dtype) if bias is None else numpy.ascontiguousarray(bias)
            self._over_channels(lambda a, c: kernel(x, w, b, y, *args, a, c), x)
            return
        n, m = x.shape[0], self.multiplier
        w = self._weights(W)
        out = y.reshape((n, self.channels, m) + self.out_hw)
        b5 = None if bias is None else bias.reshape(1, self.channels, m, 1, 1)

        def channels(a, c):
            padded = self._pad(x, a, c)
            acc = out[:, a:c]
            acc[...] = 0
            for i in range(self.kernel[0]):
                for j in range(self.kernel[1]):
                    acc += w[a:c, :, i, j][None, :, :, None, None] * self._window(padded, i, j)[:, :, None]
            if b5 is not None:
                acc += b5[:, a:c]

        self._over_channels(channels, x)

    def bias_gradient(self, dy):
        return dy.reshape(dy.shape[0], dy.shape[1], -1).sum(axis=(0, 2))

    def backward(self, x, W, dy, dx, need_dw, slot=0):
        """Writes dx (unless None); returns dW (C*M, 1, kh, kw) if need_dw, else None."""
        if cpu_kernels.enabled(self.xp):
            return self._backward_jit(x, W, dy, dx, need_dw)
        xp, n, m = self.xp, x.shape[0], self.multiplier
        (kh, kw), (ph, pw), (h, w_) = self.kernel, self.pad, self.in_hw
        w = self._weights(W)
        grad = dy.reshape((n, self.channels, m) + self.out_hw)
        dW = xp.zeros((self.channels, m, kh, kw), dtype=W.dtype) if need_dw else None

        def channels(a, c):
            g = grad[:, a:c]
            if need_dw:
                padded = self._pad(x, a, c)
                for i in range(kh):
                    for j in range(kw):
                        dW[a:c, :, i, j] = xp.einsum("ncmhw,nchw->cm", g, self._window(padded, i, j))
            if dx is not None:
                dpad = xp.zeros((n, c - a, h + 2 * ph, w_ + 2 * pw), dtype=dx.dtype)
                for i in range(kh):
                    for j in range(kw):
                        contrib = xp.einsum("ncmhw,cm->nchw", g, w[a:c, :, i, j])
                        self._window(dpad, i, j)[...] += contrib
                dx[:, a:c] = dpad[:, :, ph:ph + h, pw:pw + w_]

        self._over_channels(channels, x)
        return None if dW is None else dW.reshape(W.shape)

    def _backward_jit(self, x, W, dy, dx, need_dw):
        jit, args = _jit(), self._geometry_args()
        x, dy = numpy.ascontiguousarray(x), numpy.ascontiguousarray(dy)
        w = numpy.ascontiguousarray(W.reshape(W.shape[0], *self.kernel))
        dW = numpy.empty_like(w) if need_dw else None

        def channels(a, c):
            if need_dw:
                jit.backward_weight(x, dy, dW, *args, a, c)
            if dx is not None:
                jit.backward_data(dy, w, dx, *args, a, c)

        self._over_channels(channels, x)
        return None if dW is None else dW.reshape(W.shape)
