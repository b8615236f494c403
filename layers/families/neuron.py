"""Neuron layers: elementwise activations with Caffe's formulas.

Each layer maps bottom[0] to a top of the same shape and may run in place
(top is the bottom Blob). Backwards that need the input keep a copy of it
when computed in place, so the gradient is right even though the input was
overwritten (Caffe does this for PReLU only).
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.fillers import fill
from brewnet.layers.kernels import parallel
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


class _Neuron(Layer):
    exact_bottoms = 1
    exact_tops = 1
    # backward reads the input x (not only the output): keep a copy when in place
    needs_input = False
    # the layer's kernels in layers/kernels/cuda/neuron.cu (backward from the output y), if any
    cuda_activation = None

    def setup(self, bottom, top):
        self._saved_input = None
        self.configure()

    def configure(self):
        """Read this layer's parameters (called once by setup)."""

    def const(self, value):
        # dtype-matched scalar: arithmetic never promotes float32 data to float64
        return self.dtype.type(value)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.cuda_activation and cuda_ops.active(self.xp, x, top[0].data):  # BREWNET_CUDA_KERNELS
            return cuda_ops.activation(self.xp, self.cuda_activation, x, top[0].data)
        self.save_input(bottom, top)
        top[0].data[...] = self.compute(x)

    def save_input(self, bottom, top):
        """Keep a copy of the input when backward needs it and an in-place forward overwrites it."""
        if self.needs_input and top[0] is bottom[0]:
            x, saved = bottom[0].data, self._saved_input
            if saved is None or saved.shape != x.shape:
                self._saved_input = x.copy()
            else:
                saved[...] = x

    def input_data(self, bottom, top):
        """The forward input, also after an in-place forward overwrote it."""
        if self.needs_input and top[0] is bottom[0]:
            return self._saved_input
        return bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, dy, dx = top[0].data, top[0].diff, bottom[0].diff
        if self.cuda_activation and cuda_ops.active(self.xp, y, dy, dx):
            return cuda_ops.activation_backward(self.xp, self.cuda_activation, dy, y, dx)
        x = self.input_data(bottom, top)
        bottom[0].diff[...] = top[0].diff * self.derivative(x, top[0].data)

    def compute(self, x):
        raise NotImplementedError

    def derivative(self, x, y):
        """dy/dx elementwise, given the input x and the output y."""
        raise NotImplementedError


def _clip_into(xp, x, y, lo, hi):
    """y = min(max(x, lo), hi) with no temporaries, across the CPU threads (y may be x)."""
    x, y = x.reshape(-1), y.reshape(-1)
    parallel.elementwise(lambda a, b: xp.clip(x[a:b], lo, hi, out=y[a:b]), x.size, xp)


def _pass_inside(xp, dy, ref, dx, inside):
    """dx = dy where inside(ref) holds, else 0, chunk by chunk (one small mask per chunk)."""
    dy, ref, dx = dy.reshape(-1), ref.reshape(-1), dx.reshape(-1)
    parallel.elementwise(lambda a, b: xp.multiply(dy[a:b], inside(ref[a:b]), out=dx[a:b]), dx.size, xp)


@register("ReLU", v1="RELU")
class ReLU(_Neuron):
    def configure(self):
        self.slope = self.const(self.param.relu_param.negative_slope)

    def forward(self, bottom, top):
        if cuda_ops.active(self.xp, bottom[0].data, top[0].data):  # BREWNET_CUDA_KERNELS
            return cuda_ops.relu(self.xp, bottom[0].data, top[0].data, self.slope)
        if self.slope != 0:
            return super().forward(bottom, top)
        # the plain ReLU straight into the top, no temporaries, across the CPU threads
        x, y = bottom[0].data.reshape(-1), top[0].data.reshape(-1)
        parallel.elementwise(lambda a, b: self.xp.maximum(x[a:b], 0, out=y[a:b]), x.size, self.xp)

    def backward(self, top, propagate_down, bottom):
        x, dy, dx = self.input_data(bottom, top), top[0].diff, bottom[0].diff
        if propagate_down[0] and cuda_ops.active(self.xp, x, dy, dx):
            return cuda_ops.relu_backward(self.xp, dy, x, dx, self.slope)
        if self.slope != 0 or not propagate_down[0]:
            return super().backward(top, propagate_down, bottom)
        # in place, the input is the output: their signs agree
        x = self.input_data(bottom, top).reshape(-1)
        dy, dx = top[0].diff.reshape(-1), bottom[0].diff.reshape(-1)
        parallel.elementwise(lambda a, b: self.xp.multiply(dy[a:b], x[a:b] > 0, out=dx[a:b]), x.size, self.xp)

    def fused_activation(self):
        """(1, negative slope, 0) for layers/fusion.py; None where the output's sign
        would not tell the input's (a negative slope)."""
        return (1, self.slope, 0) if self.slope >= 0 else None

    def epilogue(self):
        """This ReLU as an in-place step on a block of numpy array (layers/fusion.py runs it on
        a convolution's output blocks), with forward's own arithmetic."""
        if self.slope == 0:
            return lambda block: numpy.maximum(block, 0, out=block)
        return lambda block: block.__setitem__(Ellipsis, self.compute(block))

    def compute(self, x):
        y = self.xp.maximum(x, 0)
        if self.slope != 0:
            y += self.slope * self.xp.minimum(x, 0)
        return y

    def derivative(self, x, y):
        # in place x is already y, whose sign is x's for a non-negative slope (Caffe relies on this too)
        positive = x > 0
        if self.slope == 0:
            return positive.astype(self.dtype)
        return self.xp.where(positive, self.const(1), self.slope)


@register("PReLU")
class PReLU(_Neuron):
    needs_input = True  # Caffe keeps bottom_memory_ for in-place use too

    def setup(self, bottom, top):
        super().setup(bottom, top)
        if bottom[0].num_axes < 2:
            raise self.error(
                f"bottom must have at least 2 axes, got {bottom[0].shape}"
            )
        p = self.param.prelu_param
        self.shared = p.channel_shared
        channels = bottom[0].shape[1]
        if not self.blobs:
            self.blobs.append(self.make_blob(() if self.shared else (channels,)))
            if p.HasField("filler"):
                filler = p.filler
            else:
                filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
            fill(self.blobs[0], filler, self.rng)
        want = 1 if self.shared else channels
        if self.blobs[0].count != want:
            raise self.error(
                f"slope blob has {self.blobs[0].count} values, "
                f"expected {want} ({'channel_shared' if self.shared else 'one per channel'})"
            )

    def _slope(self, ndim):
        # broadcastable slope: a scalar, or one value per channel on axis 1
        slope = self.blobs[0].data
        if self.shared:
            return slope.reshape(())
        return slope.reshape((-1,) + (1,) * (ndim - 2))

    def compute(self, x):
        return self.xp.maximum(x, 0) + self._slope(x.ndim) * self.xp.minimum(x, 0)

    def backward(self, top, propagate_down, bottom):
        x = self.input_data(bottom, top)
        dy = top[0].diff
        nonpositive = x <= 0
        if self.param_needs_grad(0):
            contrib = dy * x * nonpositive
            if self.shared:
                grad = contrib.sum()
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                grad = contrib.sum(axis=axes)
            self.blobs[0].diff[...] += grad.reshape(self.blobs[0].shape)
        if propagate_down[0]:
            factor = self.xp.where(nonpositive, self._slope(x.ndim), self.const(1))
            bottom[0].diff[...] = dy * factor


@register("ELU")
class ELU(_Neuron):
    def configure(self):
        self.alpha = self.const(self.param.elu_param.alpha)

    def compute(self, x):
        xp = self.xp
        return xp.maximum(x, 0) + self.alpha * xp.expm1(xp.minimum(x, 0))

    def derivative(self, x, y):
        # for x <= 0: alpha * exp(x) = y + alpha
        return self.xp.where(x > 0, self.const(1), y + self.alpha)


def _sigmoid(xp, x, half):
    # tanh form: no overflow for large |x|
    return half * xp.tanh(half * x) + half


@register("Sigmoid", v1="SIGMOID")
class Sigmoid(_Neuron):
    cuda_activation = "sigmoid"

    def compute(self, x):
        return _sigmoid(self.xp, x, self.const(0.5))

    def derivative(self, x, y):
        return y * (1 - y)


@register("TanH", v1="TANH")
class TanH(_Neuron):
    cuda_activation = "tanh"

    def compute(self, x):
        return self.xp.tanh(x)

    def derivative(self, x, y):
        return 1 - y * y


@register("AbsVal", v1="ABSVAL")
class AbsVal(_Neuron):
    def setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation")
        super().setup(bottom, top)

    def compute(self, x):
        return self.xp.abs(x)

    def derivative(self, x, y):
        return self.xp.sign(x)


@register("Power", v1="POWER")
class Power(_Neuron):
    """y = (shift + scale * x) ** power."""

    needs_input = True

    def configure(self):
        p = self.param.power_param
        self.power = self.const(p.power)
        self.scale = self.const(p.scale)
        self.shift = self.const(p.shift)
        self.diff_scale = self.const(self.power * self.scale)

    def compute(self, x):
        if self.diff_scale == 0:
            value = 1 if self.power == 0 else self.shift ** self.power
            return self.xp.full(x.shape, value, dtype=self.dtype)
        y = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            y = y + self.shift
        if self.power != 1:
            y = y ** self.power
        return y

    def derivative(self, x, y):
        if self.diff_scale == 0 or self.power == 1:
            return self.xp.full(x.shape, self.diff_scale, dtype=self.dtype)
        base = self.scale * x + self.shift
        if self.power == 2:
            return self.diff_scale * base
        return self.diff_scale * base ** (self.power - 1)


def _log_of_base(layer, base, allow_one):
    # base -1 means e; otherwise a positive finite number (Log also needs log(base) != 0)
    if base == -1:
        return 1.0
    if not (base > 0 and numpy.isfinite(base)) or (base == 1 and not allow_one):
        need = "positive and finite" if allow_one else "positive, finite and not 1"
        raise layer.error(f"base must be {need} (or -1 for e), got {base}")
    return float(numpy.log(numpy.float32(base)))


@register("Exp", v1="EXP")
class Exp(_Neuron):
    """y = base ** (shift + scale * x)."""

    def configure(self):
        p = self.param.exp_param
        log_base = _log_of_base(self, p.base, allow_one=True)
        self.inner_scale = self.const(log_base * p.scale)
        if p.shift == 0:
            outer = 1.0
        else:
            outer = numpy.exp(p.shift) if p.base == -1 else numpy.float64(p.base) ** p.shift
        self.outer_scale = self.const(outer)

    def compute(self, x):
        y = self.xp.exp(self.inner_scale * x)
        if self.outer_scale != 1:
            y *= self.outer_scale
        return y

    def derivative(self, x, y):
        return self.inner_scale * y


@register("Log")
class Log(_Neuron):
    """y = log_base(shift + scale * x)."""

    needs_input = True

    def configure(self):
        p = self.param.log_param
        log_base = _log_of_base(self, p.base, allow_one=False)
        self.base_scale = self.const(1.0 / log_base)
        self.scale = self.const(p.scale)
        self.shift = self.const(p.shift)
        self.backward_scale = self.const(p.scale / log_base)

    def compute(self, x):
        inner = self.scale * x + self.shift
        return self.xp.log(inner) * self.base_scale

    def derivative(self, x, y):
        return self.backward_scale / (self.scale * x + self.shift)


@register("BNLL", v1="BNLL")
class BNLL(_Neuron):
    """y = log(1 + exp(x)), computed without overflow."""

    needs_input = True
    _CLAMP = 50.0  # Caffe caps x at 50 in the derivative

    def compute(self, x):
        xp = self.xp
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def derivative(self, x, y):
        e = self.xp.exp(self.xp.minimum(x, self.const(self._CLAMP)))
        return e / (e + 1)


@register("Threshold", v1="THRESHOLD")
class Threshold(_Neuron):
    has_backward = False  # a step function: Caffe's backward is NOT_IMPLEMENTED
    backward = Layer.backward  # not _Neuron's: the base refuses a gradient

    def configure(self):
        self.threshold = self.const(self.param.threshold_param.threshold)

    def compute(self, x):
        return (x > self.threshold).astype(self.dtype)


@register("Clip")
class Clip(_Neuron):
    needs_input = True

    def configure(self):
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.lo = self.const(p.min)
        self.hi = self.const(p.max)

    def forward(self, bottom, top):
        self.save_input(bottom, top)
        _clip_into(self.xp, bottom[0].data, top[0].data, self.lo, self.hi)

    def fused_activation(self):
        """(2, min, max) for layers/fusion.py."""
        return (2, self.lo, self.hi)

    def keep_input(self, x):
        """Take ``x`` as the in-place forward's input (a fused chain computed it, not this layer)."""
        self._saved_input = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            lo, hi = self.lo, self.hi
            _pass_inside(self.xp, top[0].diff, self.input_data(bottom, top), bottom[0].diff,
                         lambda x: (x >= lo) & (x <= hi))

    def compute(self, x):
        return self.xp.maximum(self.lo, self.xp.minimum(x, self.hi))

    def derivative(self, x, y):
        return ((x >= self.lo) & (x <= self.hi)).astype(self.dtype)


@register("ReLU6")
class ReLU6(_Neuron):
    """y = min(max(x, 0), 6), a type of the mobile forks (no parameters)."""

    def forward(self, bottom, top):
        _clip_into(self.xp, bottom[0].data, top[0].data, self.const(0), self.const(6))

    def backward(self, top, propagate_down, bottom):
        # from the output, which also holds in place: inside (0, 6) exactly where x is
        if propagate_down[0]:
            _pass_inside(self.xp, top[0].diff, top[0].data, bottom[0].diff, lambda y: (y > 0) & (y < 6))

    def compute(self, x):
        return self.xp.clip(x, self.const(0), self.const(6))

    def derivative(self, x, y):
        return ((y > 0) & (y < 6)).astype(self.dtype)


@register("Swish")
class Swish(_Neuron):
    """y = x * sigmoid(beta * x)."""

    def configure(self):
        self.beta = self.const(self.param.swish_param.beta)
        self._sig = None

    def compute(self, x):
        # keep sigmoid(beta x) for backward (x itself may be overwritten in place)
        self._sig = _sigmoid(self.xp, self.beta * x, self.const(0.5))
        return x * self._sig

    def derivative(self, x, y):
        by = self.beta * y
        return by + self._sig * (1 - by)


@register("Dropout", v1="DROPOUT")
class Dropout(_Neuron):
    """TRAIN: keep each element with probability 1 - ratio, scale kept ones by 1/(1 - ratio).

    TEST: identity. The mask is drawn on the host from self.rng.
    """

    rng_in_forward = True  # the masks: saved with snapshots for exact resume

    def configure(self):
        ratio = self.param.dropout_param.dropout_ratio
        if not 0 <= ratio < 1:
            raise self.error(f"dropout_ratio must be in [0, 1), got {ratio}")
        self.ratio = numpy.float32(ratio)
        self.scale = self.const(1.0 / (1.0 - self.ratio))
        self._mask = self._uniform = None

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.train and cuda_ops.active(self.xp, x, y):  # BREWNET_CUDA_KERNELS: the same host draws
            self._uniform = self.xp.asarray(self.rng.random(x.shape, dtype=numpy.float32))
            return cuda_ops.dropout(self.xp, x, self._uniform, self.ratio, self.scale, y)
        self._uniform = None
        super().forward(bottom, top)

    def compute(self, x):
        if not self.train:
            return x
        keep = self.rng.random(x.shape, dtype=numpy.float32) >= self.ratio
        # the scaled mask: scale where kept, 0 where dropped
        self._mask = self.xp.asarray(keep.astype(self.dtype) * self.scale)
        return x * self._mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.train and self._uniform is not None:  # the forward ran the kernels
            return cuda_ops.dropout_backward(self.xp, top[0].diff, self._uniform, self.ratio, self.scale,
                                             bottom[0].diff)
        if self.train:
            bottom[0].diff[...] = top[0].diff * self._mask
        elif bottom[0] is not top[0]:
            bottom[0].diff[...] = top[0].diff
