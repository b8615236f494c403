"""Convolution, Deconvolution and Im2col (Caffe's BaseConvolutionLayer family).

The layers hold Caffe's semantics: convolution_param, parameter and output shapes, fillers,
and the steps of forward and backward. How each step runs (a plain GEMM for 1x1 kernels,
Winograd or im2col; chunks of samples; threads) is the plan's choice, made once per shape
(layers/kernels/conv_plan.py). Weight shape (num_output, C/group, *kernel) for Convolution,
(C, num_output/group, *kernel) for Deconvolution, as in Caffe.
"""

import numpy

from brewnet.layers import fillers
from brewnet.layers.base import Layer
from brewnet.layers.kernels.conv_plan import ConvGeometry, ConvPlan, DeconvPlan
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.kernels.im2col import ConvEngine, conv_out_size, deconv_out_size
from brewnet.layers.registry import register


def _spatial_values(layer, cp, field, n_spatial, default):
    """One value per spatial axis from a repeated field or its _h/_w pair, Caffe's rules."""
    h, w = field + "_h", field + "_w"
    name = "kernel_size" if field == "kernel" else field
    if cp.HasField(h) or cp.HasField(w):
        if n_spatial != 2:
            raise layer.error(f"{h} & {w} can only be used for 2D convolution")
        if len(getattr(cp, name)):
            raise layer.error(f"give either {name} or {h}/{w}, not both")
        return (getattr(cp, h), getattr(cp, w))
    values = list(getattr(cp, name))
    if not values:
        if default is None:
            raise layer.error("convolution_param needs kernel_size (or kernel_h and kernel_w)")
        return (default,) * n_spatial
    if len(values) not in (1, n_spatial):
        raise layer.error(
            f"{name} must be given once or once per spatial axis "
            f"({len(values)} given, {n_spatial} spatial axes)")
    return tuple(values) * n_spatial if len(values) == 1 else tuple(values)


class _ConvParams(Layer):
    """Reads convolution_param's kernel/stride/pad/dilation and the channel axis."""

    def _read_geometry(self, bottom):
        cp = self.param.convolution_param
        self.channel_axis = bottom[0].canonical_axis(cp.axis)
        self.n_spatial = bottom[0].num_axes - self.channel_axis - 1
        if self.n_spatial < 1:
            raise self.error(f"input {bottom[0].shape} has no spatial axis after axis {cp.axis}")
        n = self.n_spatial
        self.kernel = _spatial_values(self, cp, "kernel", n, None)
        self.stride = _spatial_values(self, cp, "stride", n, 1)
        self.pad = _spatial_values(self, cp, "pad", n, 0)
        dil = list(cp.dilation)
        if len(dil) not in (0, 1, n):
            raise self.error("dilation must be given once or once per spatial axis")
        self.dilation = (tuple(dil) * n if len(dil) == 1 else tuple(dil)) if dil else (1,) * n
        for what, vals in (("kernel size", self.kernel), ("stride", self.stride), ("dilation", self.dilation)):
            if any(v <= 0 for v in vals):
                raise self.error(f"{what} must be positive, got {vals}")
        self.channels = bottom[0].shape[self.channel_axis]

    def _split(self, shape):
        """(num, C, spatial) of a blob shape around the channel axis (num = product before it)."""
        a = self.channel_axis
        return int(numpy.prod(shape[:a], dtype=numpy.int64)), shape[a], tuple(shape[a + 1:])


class _BaseConv(_ConvParams):
    """Caffe's BaseConvolutionLayer: forward and backward over the bottoms, one plan step each."""

    min_bottoms = 1
    min_tops = 1
    equal_bottom_top = True  # one top per bottom, all through the same weights
    reverse = False  # True for Deconvolution
    plan_type = None  # how the steps run: ConvPlan or DeconvPlan (layers/kernels/conv_plan.py)

    def setup(self, bottom, top):
        self._read_geometry(bottom)
        cp = self.param.convolution_param
        self.num_output = cp.num_output
        self.group = cp.group
        self.bias_term = cp.bias_term
        if self.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.channels % self.group or self.num_output % self.group:
            raise self.error(
                f"channels ({self.channels}) and num_output "
                f"({self.num_output}) must both be multiples of group ({self.group})")
        if self.reverse:
            wshape = (self.channels, self.num_output // self.group) + self.kernel
        else:
            wshape = (self.num_output, self.channels // self.group) + self.kernel
        if self.blobs:
            want = [wshape] + ([(self.num_output,)] if self.bias_term else [])
            got = [tuple(b.shape) for b in self.blobs]
            if got != want:
                raise self.error(f"parameter shapes {got} do not match expected {want}")
        else:
            self.blobs.append(self.make_blob(wshape))
            fillers.fill(self.blobs[0], cp.weight_filler, self.rng)
            if self.bias_term:
                self.blobs.append(self.make_blob((self.num_output,)))
                fillers.fill(self.blobs[1], cp.bias_filler, self.rng)
        self.plan = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.channel_axis + 1 + self.n_spatial:
            raise self.error(f"bottom number of axes may not change ({shape})")
        num, C, S = self._split(shape)
        if C != self.channels:
            raise self.error(f"input has {C} channels, the weights expect {self.channels}")
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.error(f"all bottoms must have shape {shape}, got {b.shape}")
        size = deconv_out_size if self.reverse else conv_out_size
        out = tuple(size(*a) for a in zip(S, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in out):
            raise self.error(f"output size {out} from input {shape} is not positive")
        self.num, self.in_spatial, self.out_spatial = num, S, out
        geometry = ConvGeometry(numpy.dtype(bottom[0].dtype), num, self.channels, S, self.num_output, out,
                                self.group, self.kernel, self.stride, self.pad, self.dilation)
        if self.plan is None or self.plan.geometry != geometry:
            # BREWNET_CUDA_KERNELS: the CUDA plan where it applies (layers/kernels/cuda/ops.py)
            self.plan = cuda_ops.conv_plan(self.xp, geometry, self.reverse) or self.plan_type(self.xp, geometry)
        top_shape = shape[:self.channel_axis] + (self.num_output,) + out
        for t in top:
            t.reshape(top_shape)

    # (num, C, *spatial) views of a bottom's and a top's arrays around the channel axis
    def _input(self, array):
        return array.reshape((self.num, self.channels) + self.in_spatial)

    def _output(self, array):
        return array.reshape((self.num, self.num_output) + self.out_spatial)

    def forward(self, bottom, top):
        weight = self.blobs[0].data
        bias = self.blobs[1].data if self.bias_term else None
        for i, (b, t) in enumerate(zip(bottom, top)):
            self.plan.forward(self._input(b.data), weight, bias, self._output(t.data), slot=i)

    def forward_with_epilogue(self, bottom, top, epilogue):
        """forward, with ``epilogue`` applied in place to each finished block of the (single)
        top while it is in cache (layers/fusion.py's Convolution -> ReLU); returns False, having
        run nothing, where the plan has no such step (the GPU's, Deconvolution's, depthwise)."""
        plan = self.plan
        if len(bottom) != 1 or type(plan) is not ConvPlan or plan.xp is not numpy or plan.path == "depthwise":
            return False
        bias = self.blobs[1].data if self.bias_term else None
        return plan.forward(self._input(bottom[0].data), self.blobs[0].data, bias, self._output(top[0].data),
                            slot=0, epilogue=epilogue)

    def backward(self, top, propagate_down, bottom):
        weight = self.blobs[0].data
        need_dw = self.param_needs_grad(0)
        for i, (t, b) in enumerate(zip(top, bottom)):
            top_diff = self._output(t.diff)
            if self.bias_term and self.param_needs_grad(1):
                self.blobs[1].diff += self.plan.bias_gradient(top_diff)
            if need_dw or propagate_down[i]:
                bottom_diff = self._input(b.diff) if propagate_down[i] else None
                dW = self.plan.backward(self._input(b.data), weight, top_diff, bottom_diff, need_dw, slot=i)
                if dW is not None:
                    self.blobs[0].add_to_diff(dW)  # every bottom adds its share


@register("Convolution", v1="CONVOLUTION")
class Convolution(_BaseConv):
    plan_type = ConvPlan


@register("Deconvolution", v1="DECONVOLUTION")
class Deconvolution(_BaseConv):
    reverse = True
    plan_type = DeconvPlan


@register("Im2col", v1="IM2COL")
class Im2col(_ConvParams):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        self._read_geometry(bottom)
        self._engine = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        num, C, S = self._split(shape)
        out = tuple(conv_out_size(*a) for a in zip(S, self.kernel, self.stride, self.pad, self.dilation))
        key = (C, S)
        if self._engine is None or self._engine_key != key:
            # layout B: Caffe's per-sample (c, k..., o...) order
            self._engine = ConvEngine(self.xp, bottom[0].dtype, C, S, 1, 1, self.kernel, self.stride, self.pad,
                                      self.dilation, out, layout="B")
            self._engine_key = key
        self.num, self.C, self.S, self.O = num, C, S, out
        kk = int(numpy.prod(self.kernel))
        top[0].reshape(shape[:self.channel_axis] + (C * kk,) + out)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape((self.num, self.C) + self.S)
        windows = self._engine.windows(x)  # (n, C, *k, *O)
        self.xp.copyto(top[0].data.reshape(windows.shape), windows)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dcol = top[0].diff.reshape((self.num, 1, self.C) + self.kernel + self.O)
        self._engine.col2im(dcol, bottom[0].diff.reshape((self.num, self.C) + self.S))
