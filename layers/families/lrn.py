"""Local response normalization, both of Caffe's regions.

ACROSS_CHANNELS: scale = k + alpha/size * (sum of x^2 over `size` neighbouring channels),
                 y = x * scale^-beta.
WITHIN_CHANNEL:  Caffe builds it from Power/Pooling(AVE)/Power/Eltwise layers:
                 y = x * (1 + alpha * avg)^-beta, avg = (sum of x^2 over a size x size window,
                 zero outside the image) / size^2 (the AVE divisor is always size^2 here,
                 since its window is clipped to image+pad, which a centred window never passes).
"""

from brewnet.layers.base import Layer
from brewnet.layers.kernels import parallel
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.kernels.lrn import window_sum
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


@register("LRN", v1="LRN")
class LRN(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        lp = self.param.lrn_param
        self.size = lp.local_size
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.alpha, self.beta, self.k = lp.alpha, lp.beta, lp.k
        self.within = lp.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {bottom[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _const(self, value, like):
        return like.dtype.type(value)

    def _by_samples(self, fn, x):
        """fn(start, stop) over sample ranges spread across the CPU threads (samples are independent)."""
        parallel.over_ranges(fn, x.shape[0], self.xp, x.size >= 1 << 16)

    def forward(self, bottom, top):
        xp, x, y = self.xp, bottom[0].data, top[0].data
        c = lambda v: self._const(v, x)  # noqa: E731  (keep float32 math float32)
        if getattr(self, "scale", None) is None or self.scale.shape != x.shape or self.scale.dtype != x.dtype:
            self.scale, self.power = xp.empty_like(x), xp.empty_like(x)  # kept for backward
        if cuda_ops.active(xp, x, y):  # BREWNET_CUDA_KERNELS
            return cuda_ops.lrn_forward(xp, x, y, self.scale, self.power, self.size, self.alpha, self.beta, self.k,
                                        self.within)

        def job(a, b):
            xs = x[a:b]
            if self.within:
                s = window_sum(xp, xs * xs, self.size, (2, 3), out=self.scale[a:b])
                s *= c(self.alpha / (self.size * self.size))
                s += c(1)
            else:
                s = window_sum(xp, xs * xs, self.size, (1,), out=self.scale[a:b])
                s *= c(self.alpha / self.size)
                s += c(self.k)
            p = xp.power(s, c(-self.beta), out=self.power[a:b])
            xp.multiply(xs, p, out=y[a:b])

        self._by_samples(job, x)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        xp, x, dy, dx = self.xp, bottom[0].data, top[0].diff, bottom[0].diff
        c = lambda v: self._const(v, x)  # noqa: E731
        if cuda_ops.active(xp, x, dy, dx):
            return cuda_ops.lrn_backward(xp, x, dy, self.scale, self.power, dx, self.size, self.alpha, self.beta,
                                         self.within)

        # d/dx of x * s^-beta where s depends on x^2 over the window (symmetric, so its transpose
        # is the same window sum): dx = dy * s^-beta - 2 * beta * a' * x * window(dy * x * s^-beta / s)
        def job(a, b):
            xs, dys, power = x[a:b], dy[a:b], self.power[a:b]
            ratio = dys * xs * power / self.scale[a:b]
            if self.within:
                acc = window_sum(xp, ratio, self.size, (2, 3))
                coef = c(2 * self.alpha * self.beta / (self.size * self.size))
            else:
                acc = window_sum(xp, ratio, self.size, (1,))
                coef = c(2 * self.alpha * self.beta / self.size)
            acc *= xs
            acc *= coef
            xp.subtract(dys * power, acc, out=dx[a:b])

        self._by_samples(job, x)
