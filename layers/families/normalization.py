"""Caffe's normalization layers: BatchNorm, Scale, Bias, MVN.

BatchNorm keeps Caffe's three statistics blobs (mean sum, variance sum, scale
factor) and its update rule, so .caffemodel files move both ways. Scale and
Bias broadcast a blob over bottom[0] axes [axis, axis + num_axes), viewed as
(outer, dim, inner). On the CPU, BatchNorm's training passes and Scale run as compiled
per-channel kernels (layers/kernels/channel_ops.py); the array code here is their twin.
"""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.families.axes import canonical_axis
from brewnet.layers.kernels import channel_ops
from brewnet.layers.fillers import fill
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.registry import register


def _span_shape(layer, bottom, axis_param, num_axes):
    """Shape of bottom axes [axis, axis + num_axes) (num_axes -1: to the end)."""
    axis = canonical_axis(layer, bottom, axis_param)
    if num_axes < -1:
        raise layer.error("num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
    if num_axes >= 0 and axis + num_axes > bottom.num_axes:
        raise layer.error(f"axis {axis} + num_axes {num_axes} extends past bottom[0] shape {bottom.shape}")
    end = bottom.num_axes if num_axes == -1 else axis + num_axes
    return bottom.shape[axis:end]


def _outer_dim_inner(layer, bottom, operand, axis_param):
    """(outer, dim, inner) for broadcasting ``operand`` over ``bottom`` from ``axis_param``."""
    axis = 0 if operand.num_axes == 0 else canonical_axis(layer, bottom, axis_param)
    end = axis + operand.num_axes
    if end > bottom.num_axes or bottom.shape[axis:end] != operand.shape:
        raise layer.error(f"blob of shape {operand.shape} does not match bottom[0] shape "
                                 f"{bottom.shape} from axis {axis}")
    return bottom.count_range(0, axis), operand.count, bottom.count_range(end)


@register("BatchNorm")
class BatchNorm(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.batch_norm_param
        self.maf = float(p.moving_average_fraction)
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else not self.train
        self.eps = float(p.eps)
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        if not self.blobs:
            for shape in ((self.channels,), (self.channels,), (1,)):
                self.blobs.append(self.make_blob(shape))  # zeros, as Caffe
        # the statistics are not learnable: pin their learning rate to 0 as Caffe does
        for i in range(len(self.blobs)):
            if len(self.param.param) == i:
                self.param.param.add().lr_mult = 0.0
            elif self.param.param[i].lr_mult != 0:
                raise self.error("BatchNorm statistics cannot be learned: set lr_mult 0 on its params "
                                        "(or give no param blocks) and put a Scale layer after it")
        self.param_propagate_down = [False] * len(self.blobs)

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes > 1 and b.shape[1] != self.channels:
            raise self.error(f"bottom has {b.shape[1]} channels, the layer was set up for {self.channels}")
        if top[0] is not b:
            top[0].reshape(b.shape)
        self.n = b.shape[0]
        self.spatial = b.count // (self.n * self.channels) if b.count else 0

    def _nc_s(self, a):
        return a.reshape(self.n, self.channels, self.spatial)

    def forward(self, bottom, top):
        xp = self.xp
        x = self._nc_s(bottom[0].data)
        if self.use_global_stats:
            mean, var = self.stored_statistics()
            y = self._nc_s(top[0].data)
            # the CUDA kernels (BREWNET_CUDA_KERNELS) take precedence over the compiled CPU passes
            jit = None if cuda_ops.active(xp, x) else channel_ops.kernels(xp, x, y)
            if jit is not None:
                # an affine map per channel (Scale's kernel), in place or not; backward needs only std
                inv, shift = self.stored_affine(mean, var, x.dtype)
                channel_ops.over_channels(jit.scale_forward, self.channels, x.size, x, inv, shift, y, x, False,
                                          channel_ops.same_memory(x, y))
                return
            centered = x - mean[None, :, None]
        else:
            y = self._nc_s(top[0].data)
            jit = None if cuda_ops.active(xp, x) else channel_ops.kernels(xp, x, y)
            if jit is not None:
                x_norm = self.x_norm_buffer(x)
                # batch statistics and the normalized batch in one kernel, no temporaries
                mean = numpy.empty(self.channels, dtype=x.dtype)
                var = numpy.empty(self.channels, dtype=x.dtype)
                channel_ops.over_channels(jit.batch_norm_train_forward, self.channels, x.size, x, y, x_norm,
                                          mean, var, self.eps)
                self.update_statistics(mean, var)
                self.std = xp.sqrt(var + self.eps)
                self.x_norm = x_norm
                return
            mean = x.mean(axis=(0, 2))
            centered = x - mean[None, :, None]
            var = (centered * centered).mean(axis=(0, 2))
            self.update_statistics(mean, var)
        self.std = xp.sqrt(var + self.eps)
        # cached: a later in-place layer may overwrite the top
        if cuda_ops.active(xp, x, mean, self.std):  # BREWNET_CUDA_KERNELS
            self.x_norm = xp.empty_like(x)
            cuda_ops.channel_normalize(xp, x, mean, 1 / self.std, self.channels, self.spatial, self.x_norm)
        else:
            self.x_norm = centered / self.std[None, :, None]
        top[0].data[...] = self.x_norm.reshape(top[0].shape)

    def stored_statistics(self):
        """(mean, variance) from the stored sums and scale factor (a factor of 0 means "no
        statistics yet": zeros)."""
        xp = self.xp
        mean_b, var_b, factor_b = (blob.data for blob in self.blobs)
        zero = factor_b == 0
        factor = xp.where(zero, 0, 1 / xp.where(zero, 1, factor_b))
        return mean_b * factor, var_b * factor

    def stored_affine(self, mean, var, dtype):
        """(inv, shift) with x * inv + shift the normalized x; sets ``std`` for backward."""
        self.std = self.xp.sqrt(var + self.eps)
        inv = (1 / self.std).astype(dtype)
        return inv, (-mean * inv).astype(dtype)

    def x_norm_buffer(self, x):
        """The normalized batch kept for backward: one buffer reused while the shape stays."""
        buf = getattr(self, "_x_norm_kept", None)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self._x_norm_kept = self.xp.empty(x.shape, dtype=x.dtype)
        return buf

    def update_statistics(self, mean, var):
        """Caffe's running sums: decayed by moving_average_fraction, the variance unbiased."""
        mean_b, var_b, factor_b = (blob.data for blob in self.blobs)
        m = self.n * self.spatial
        correction = m / (m - 1) if m > 1 else 1.0
        factor_b *= self.maf
        factor_b += 1
        mean_b *= self.maf
        mean_b += mean
        var_b *= self.maf
        var_b += var * correction

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = self._nc_s(top[0].diff)
        std = self.std[None, :, None]
        dx_out = self._nc_s(bottom[0].diff)
        if self.use_global_stats:
            # straight into the bottom's diff (dy itself when in place)
            self.xp.divide(dy, std, out=dx_out)
            return
        if cuda_ops.active(self.xp, dy, self.x_norm, self.std, bottom[0].diff):  # BREWNET_CUDA_KERNELS
            y = self.x_norm
            return cuda_ops.batch_norm_backward(self.xp, dy, y, dy.mean(axis=(0, 2)), (dy * y).mean(axis=(0, 2)),
                                                1 / self.std, self.channels, self.spatial, bottom[0].diff)
        jit = channel_ops.kernels(self.xp, dy, self.x_norm, dx_out)
        if jit is not None:
            inv_std = (1 / self.std).astype(dy.dtype)
            channel_ops.over_channels(jit.batch_norm_train_backward, self.channels, dy.size, dy, self.x_norm,
                                      dx_out, inv_std, channel_ops.same_memory(dy, dx_out))
            return
        y = self.x_norm
        mean_dy = dy.mean(axis=(0, 2), keepdims=True)
        mean_dy_y = (dy * y).mean(axis=(0, 2), keepdims=True)
        dx_out[...] = (dy - mean_dy - y * mean_dy_y) / std


class _ChannelOperand(Layer):
    """Scale and Bias: an operand (second bottom, else the layer's first blob) broadcast over
    bottom[0] as (outer, dim, inner) from the layer's axis."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def _operand(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def _reshape_operand(self, bottom, top, axis_param):
        operand = self._operand(bottom)
        self.outer, self.dim, self.inner = _outer_dim_inner(self, bottom[0], operand, axis_param)
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)
        return operand

    def _odi(self, a):
        return a.reshape(self.outer, self.dim, self.inner)

    def _operand_backward(self, bottom, propagate_down, reduce):
        """The operand's gradient, reduce() (an (outer, dim, inner) sum to dim values), computed
        only when wanted: written to a second bottom, accumulated into the layer's own blob."""
        two = len(bottom) > 1
        if (two and propagate_down[1]) or (not two and self.param_needs_grad(0)):
            operand = self._operand(bottom)
            g = reduce().reshape(operand.shape)
            if two:
                operand.diff[...] = g
            else:
                operand.diff += g


@register("Scale")
class Scale(_ChannelOperand):
    def setup(self, bottom, top):
        p = self.param.scale_param
        if len(bottom) == 1 and not self.blobs:
            scale = self.make_blob(_span_shape(self, bottom[0], p.axis, p.num_axes))
            self.blobs.append(scale)
            if p.HasField("filler"):
                fill(scale, p.filler, self.rng)
            else:
                scale.data[...] = 1
        self.bias_index = None
        if p.bias_term:
            if len(self.blobs) + len(bottom) < 3:
                nax = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
                bias = self.make_blob(_span_shape(self, bottom[0], p.axis, nax))
                fill(bias, p.bias_filler, self.rng)
                self.blobs.append(bias)
            self.bias_index = len(self.blobs) - 1

    def reshape(self, bottom, top):
        scale = self._reshape_operand(bottom, top, self.param.scale_param.axis)
        if self.bias_index is not None and self.blobs[self.bias_index].count != self.dim:
            raise self.error(f"bias of shape {self.blobs[self.bias_index].shape} does not match "
                                    f"scale of shape {scale.shape}")

    def forward(self, bottom, top):
        x = bottom[0].data
        in_place = top[0] is bottom[0]
        x3, y3 = self._odi(x), self._odi(top[0].data)
        scale = self._operand(bottom).data.reshape(-1)
        jit = None if cuda_ops.active(self.xp, x) else channel_ops.kernels(self.xp, x3, y3, scale)
        if jit is not None:
            bias = (self.blobs[self.bias_index].data.reshape(-1) if self.bias_index is not None
                    else numpy.zeros(self.dim, dtype=x.dtype))
            saved = self._saved_input(x) if in_place else x3  # (x3: unused when not kept)
            channel_ops.over_channels(jit.scale_forward, self.dim, x.size, x3, scale, bias.astype(x.dtype, copy=False),
                                      y3, saved.reshape(x3.shape), in_place, channel_ops.same_memory(x3, y3))
            return
        if in_place:
            self.x_saved = x.copy()  # the scale gradient needs the input
        scale = self._operand(bottom).data
        bias = None if self.bias_index is None else self.blobs[self.bias_index].data
        if cuda_ops.active(self.xp, x, top[0].data, scale, *(() if bias is None else (bias,))):  # BREWNET_CUDA_KERNELS
            return cuda_ops.channel_scale(self.xp, x, scale, bias, self.dim, self.inner, top[0].data)
        y = self._odi(x) * self._operand(bottom).data.reshape(1, self.dim, 1)
        if self.bias_index is not None:
            y += self.blobs[self.bias_index].data.reshape(1, self.dim, 1)
        top[0].data[...] = y.reshape(top[0].shape)

    def _saved_input(self, x):
        """Where an in-place Scale keeps its input for the scale gradient (one buffer, reused)."""
        buf = getattr(self, "x_saved", None)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self.x_saved = self.xp.empty(x.shape, dtype=x.dtype)
        return buf

    def _backward_compiled(self, top, propagate_down, bottom):
        """Both parameter gradients and dx in one kernel; False where it does not apply."""
        dy = self._odi(top[0].diff)
        x = self._odi(self.x_saved if top[0] is bottom[0] else bottom[0].data)
        scale = self._operand(bottom).data.reshape(-1)
        dx = self._odi(bottom[0].diff)
        jit = None if cuda_ops.active(self.xp, dy) else channel_ops.kernels(self.xp, dy, x, scale, dx)
        if jit is None:
            return False
        d_scale = numpy.empty(self.dim, dtype=dy.dtype)
        d_bias = numpy.empty(self.dim, dtype=dy.dtype)
        channel_ops.over_channels(jit.scale_backward, self.dim, dy.size, dy, x, scale, dx, d_scale, d_bias,
                                  bool(propagate_down[0]), channel_ops.same_memory(dy, dx))
        self.add_param_diffs(bottom, propagate_down, d_scale, d_bias)
        return True

    def add_param_diffs(self, bottom, propagate_down, d_scale, d_bias):
        """Add computed gradients (per channel) to the scale and bias diffs that want them."""
        if self.bias_index is not None and self.param_needs_grad(self.bias_index):
            self.blobs[self.bias_index].diff += d_bias.reshape(self.blobs[self.bias_index].shape)
        self._operand_backward(bottom, propagate_down, lambda: d_scale)

    def backward(self, top, propagate_down, bottom):
        if self._backward_compiled(top, propagate_down, bottom):
            return
        dy = self._odi(top[0].diff)
        if self.bias_index is not None and self.param_needs_grad(self.bias_index):
            self.blobs[self.bias_index].diff += dy.sum(axis=(0, 2)).reshape(self.blobs[self.bias_index].shape)

        def scale_grad():
            x = self.x_saved if top[0] is bottom[0] else bottom[0].data
            return (dy * self._odi(x)).sum(axis=(0, 2))

        self._operand_backward(bottom, propagate_down, scale_grad)
        scale = self._operand(bottom).data
        if propagate_down[0] and cuda_ops.active(self.xp, dy, scale, bottom[0].diff):
            return cuda_ops.channel_scale(self.xp, dy, scale, None, self.dim, self.inner, bottom[0].diff)
        if propagate_down[0]:
            dx = dy * self._operand(bottom).data.reshape(1, self.dim, 1)
            bottom[0].diff[...] = dx.reshape(bottom[0].shape)


@register("Bias")
class Bias(_ChannelOperand):
    def setup(self, bottom, top):
        p = self.param.bias_param
        if len(bottom) == 1 and not self.blobs:
            bias = self.make_blob(_span_shape(self, bottom[0], p.axis, p.num_axes))
            fill(bias, p.filler, self.rng)
            self.blobs.append(bias)

    def reshape(self, bottom, top):
        self._reshape_operand(bottom, top, self.param.bias_param.axis)

    def forward(self, bottom, top):
        y = self._odi(bottom[0].data) + self._operand(bottom).data.reshape(1, self.dim, 1)
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        self._operand_backward(bottom, propagate_down, lambda: self._odi(dy).sum(axis=(0, 2)))
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = dy


@register("MVN", v1="MVN")
class MVN(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        p = self.param.mvn_param
        b = bottom[0]
        num = b.shape[0] if b.num_axes else 1
        if not p.across_channels and b.num_axes > 1:
            num *= b.shape[1]
        self.rows = num
        self.cols = b.count // num if num else 0
        if top[0] is not b:
            top[0].reshape(b.shape)

    def forward(self, bottom, top):
        xp = self.xp
        p = self.param.mvn_param
        x = bottom[0].data.reshape(self.rows, self.cols)
        y = x - x.mean(axis=1, keepdims=True)
        if p.normalize_variance:
            # Caffe adds eps to the standard deviation, not to the variance
            self.std = xp.sqrt((y * y).mean(axis=1, keepdims=True)) + float(p.eps)
            y /= self.std
            self.y = y
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff.reshape(self.rows, self.cols)
        dx = dy - dy.mean(axis=1, keepdims=True)
        if self.param.mvn_param.normalize_variance:
            # Caffe's formula (it treats the std as exact, ignoring eps in the chain rule)
            dx -= self.y * (dy * self.y).mean(axis=1, keepdims=True)
            dx /= self.std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)

