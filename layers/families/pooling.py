"""Pooling (MAX / AVE / STOCHASTIC) and SPP, with Caffe's output sizes and divisors.

Every method loops over the kernel offsets (kh*kw strided slices, each over the
whole batch): no gathers, no per-pixel Python, ties broken like Caffe (the
first maximum in row-major window order wins).
"""


import numpy

from brewnet.layers.base import Layer
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.kernels.pooling import PoolCore, pooled_size
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2

P = caffe_pb2.PoolingParameter


def _pool_geometry(layer, pp, bottom_hw):
    """kernel, stride, pad (each (h, w)) from a PoolingParameter, with Caffe's checks."""
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise layer.error("with global_pooling the kernel size cannot be given")
        kernel = tuple(bottom_hw)
    else:
        if pp.HasField("kernel_size") == (pp.HasField("kernel_h") and pp.HasField("kernel_w")):
            raise layer.error("give kernel_size OR kernel_h and kernel_w")
        kernel = (pp.kernel_size,) * 2 if pp.HasField("kernel_size") else (pp.kernel_h, pp.kernel_w)
    if pp.HasField("pad") and (pp.HasField("pad_h") or pp.HasField("pad_w")) or \
            pp.HasField("pad_h") != pp.HasField("pad_w"):
        raise layer.error("give pad OR pad_h and pad_w")
    if pp.HasField("stride") and (pp.HasField("stride_h") or pp.HasField("stride_w")) or \
            pp.HasField("stride_h") != pp.HasField("stride_w"):
        raise layer.error("give stride OR stride_h and stride_w")
    pad = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad,) * 2
    stride = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride,) * 2
    if min(kernel) <= 0:
        raise layer.error(f"kernel size must be positive, got {kernel}")
    if min(stride) <= 0:
        raise layer.error(f"stride must be positive, got {stride}")
    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise layer.error("with global_pooling only pad 0 and stride 1 are allowed")
    if pad != (0, 0):
        if pp.pool not in (P.MAX, P.AVE):
            raise layer.error("padding is implemented only for MAX and AVE pooling")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise layer.error(f"pad {pad} must be smaller than the kernel {kernel}")
    return kernel, stride, pad


@register("Pooling", v1="POOLING")
class Pooling(Layer):
    exact_bottoms = 1
    min_tops = 1
    max_tops = 2  # MAX may output the argmax mask as a second top
    # STOCHASTIC draws from self.rng: its state is saved for exact resume (layers/base.py)
    rng_in_forward = property(lambda self: getattr(self, "method", None) == P.STOCHASTIC)

    def __init__(self, param, *args, **kwargs):
        super().__init__(param, *args, **kwargs)
        # Caffe's MaxTopBlobs: only MAX pooling has the second (mask) top
        if param.pooling_param.pool != P.MAX:
            self.max_tops = 1

    def setup(self, bottom, top):
        pp = self.param.pooling_param
        self.method = pp.pool
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got {bottom[0].shape}")
        self.global_pooling = pp.global_pooling
        self.ceil_mode = pp.round_mode == P.CEIL
        if pp.HasField("ceil_mode"):  # the forks' bool (BVLC PR 3057, OpenCV): false is floor rounding
            if pp.HasField("round_mode"):
                raise self.error("give round_mode (BVLC) or ceil_mode (the forks' field), not both")
            self.ceil_mode = pp.ceil_mode
        self.kernel, self.stride, self.pad = _pool_geometry(self, pp, bottom[0].shape[2:])
        self._core = self._cuda = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes, got {bottom[0].shape}")
        n, c, h, w = bottom[0].shape
        if self.global_pooling:
            self.kernel = (h, w)
        out = tuple(pooled_size(*a, self.ceil_mode) for a in zip((h, w), self.kernel, self.stride, self.pad))
        key = ((h, w), out, self.kernel)
        if self._core is None or self._core_key != key:
            self._core = PoolCore(self.xp, self.method, self.kernel, self.stride, self.pad, (h, w), out)
            self._core_key = key
        for t in top:
            t.reshape(n, c, *out)

    def forward(self, bottom, top):
        core, x, y = self._core, bottom[0].data, top[0].data
        if self.method != P.STOCHASTIC and cuda_ops.active(self.xp, x, y):  # BREWNET_CUDA_KERNELS
            self._cuda = cuda_ops.pool_forward(self.xp, self._cuda, self.method == P.MAX, x, y,
                                               top[1].data if len(top) > 1 else None, self.kernel, self.stride, self.pad)
            return
        self._cuda = None
        if self.method == P.MAX:
            core.forward_max(x, y)
            if len(top) > 1:
                top[1].data[...] = core.mask(y.dtype)
        elif self.method == P.AVE:
            core.forward_ave(x, y)
        elif self.method == P.STOCHASTIC:
            if self.train:
                core.forward_stochastic_train(x, y, self.rng)
            else:
                core.forward_stochastic_test(x, y)
        else:
            raise self.error(f"unknown pooling method {self.method}")

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        core, dy, dx = self._core, top[0].diff, bottom[0].diff
        if self._cuda is not None and cuda_ops.active(self.xp, dy, dx):  # the forward ran the kernels
            return cuda_ops.pool_backward(self._cuda, self.method == P.MAX, dy, dx)
        if self.method == P.AVE:
            core.backward_ave(dy, dx)
        elif self.method == P.STOCHASTIC and not self.train:
            raise self.error("STOCHASTIC pooling has no backward in TEST phase (as in Caffe)")
        else:
            core.backward_argmax(dy, dx)


def spp_level_geometry(level, h, w):
    """Kernel, stride, pad of pyramid level `level` (2**level bins per side), Caffe's formula."""
    bins = 2 ** level
    kh, kw = -(-h // bins), -(-w // bins)
    ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
    return (kh, kw), (kh, kw), (ph, pw)


@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: pool at 1, 2, 4, ... bins per side, flatten, concatenate."""

    exact_bottoms = 1
    exact_tops = 1
    rng_in_forward = Pooling.rng_in_forward

    def setup(self, bottom, top):
        sp = self.param.spp_param
        self.height = sp.pyramid_height
        self.method = {caffe_pb2.SPPParameter.MAX: P.MAX, caffe_pb2.SPPParameter.AVE: P.AVE,
                       caffe_pb2.SPPParameter.STOCHASTIC: P.STOCHASTIC}[sp.pool]
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes, got {bottom[0].shape}")
        if self.height < 1:
            raise self.error("pyramid_height must be at least 1")
        self._key = None

    def reshape(self, bottom, top):
        n, c, h, w = bottom[0].shape
        if min(h, w) <= 0:
            raise self.error(f"input dimensions cannot be zero ({bottom[0].shape})")
        if self._key != (h, w):
            self._cores = []
            for level in range(self.height):
                kernel, stride, pad = spp_level_geometry(level, h, w)
                if pad != (0, 0) and (pad[0] >= kernel[0] or pad[1] >= kernel[1]):
                    raise self.error(f"level {level} needs pad {pad} >= kernel {kernel} "
                                     f"for a {h}x{w} input (Caffe refuses this too)")
                out = tuple(pooled_size(*a, True) for a in zip((h, w), kernel, stride, pad))
                self._cores.append(PoolCore(self.xp, self.method, kernel, stride, pad, (h, w), out))
            self._key = (h, w)
        sizes = [c * core.out_hw[0] * core.out_hw[1] for core in self._cores]
        self._bounds = numpy.cumsum([0] + sizes)
        if self.height == 1:
            top[0].reshape(n, c, *self._cores[0].out_hw)  # Caffe does not flatten a 1-level pyramid
        else:
            top[0].reshape(n, int(self._bounds[-1]))

    def _level_view(self, array, i):
        core = self._cores[i]
        n, c = array.shape[0], self._c
        a, b = self._bounds[i], self._bounds[i + 1]
        return array.reshape(n, -1)[:, a:b].reshape((n, c) + core.out_hw)

    def forward(self, bottom, top):
        x = bottom[0].data
        self._c = x.shape[1]
        for i, core in enumerate(self._cores):
            out = self.xp.empty((x.shape[0], x.shape[1]) + core.out_hw, dtype=x.dtype)
            if self.method == P.MAX:
                core.forward_max(x, out)
            elif self.method == P.AVE:
                core.forward_ave(x, out)
            elif self.train:
                core.forward_stochastic_train(x, out, self.rng)
            else:
                core.forward_stochastic_test(x, out)
            self._level_view(top[0].data, i)[...] = out

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        part = self.xp.empty_like(dx)
        for i, core in enumerate(self._cores):
            dy = self.xp.ascontiguousarray(self._level_view(top[0].diff, i))
            if self.method == P.AVE:
                core.backward_ave(dy, part)
            else:
                core.backward_argmax(dy, part)
            if i == 0:
                dx[...] = part
            else:
                dx += part
