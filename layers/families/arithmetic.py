"""Softmax, Eltwise, Reduction and ArgMax, with Caffe's shape rules and tie-breaking."""

import numpy

from brewnet.layers.base import Layer
from brewnet.layers.families.axes import canonical_axis
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.layers.kernels import parallel
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


@register("Softmax", v1="SOFTMAX")
class Softmax(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self, bottom[0], self.param.softmax_param.axis)
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _outer_c_inner(self, blob):
        a = self.axis
        return blob.count_range(0, a), blob.shape[a], blob.count_range(a + 1)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        if cuda_ops.active(xp, x, top[0].data):  # BREWNET_CUDA_KERNELS
            return cuda_ops.softmax(xp, x, top[0].data, *self._outer_c_inner(bottom[0]))
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        e /= e.sum(axis=self.axis, keepdims=True)
        top[0].data[...] = e

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff
        if cuda_ops.active(self.xp, y, dy, bottom[0].diff):
            return cuda_ops.softmax_backward(self.xp, y, dy, bottom[0].diff, *self._outer_c_inner(bottom[0]))
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        bottom[0].diff[...] = (dy - dot) * y


@register("Eltwise", v1="ELTWISE")
class Eltwise(Layer):
    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.eltwise_param
        E = caffe_pb2.EltwiseParameter
        self.op = p.operation
        if self.op not in (E.PROD, E.SUM, E.MAX):
            raise self.error(f"unknown eltwise operation {self.op}")
        if len(p.coeff) not in (0, len(bottom)):
            raise self.error(f"eltwise_param.coeff needs one value per bottom ({len(bottom)}), got {len(p.coeff)}")
        if self.op == E.PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only allowed with operation SUM")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad
        self.is_prod, self.is_sum = self.op == E.PROD, self.op == E.SUM

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"bottom 0 has shape {bottom[0].shape} but bottom {i} has {b.shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = self.xp
        if self.is_prod:
            out = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                out *= b.data
        elif self._plain_sum():
            self._add_into_top(bottom, top)
            return
        elif self.is_sum:
            out = bottom[0].data * self.coeffs[0]
            for c, b in zip(self.coeffs[1:], bottom[1:]):
                out += b.data * c
        else:
            # Caffe: ties between bottoms 0 and 1 go to 1; later bottoms win only when strictly larger
            a, b = bottom[0].data, bottom[1].data
            first = a > b
            out = xp.where(first, a, b)
            mask = xp.where(first, 0, 1).astype(numpy.int32)
            for i, blob in enumerate(bottom[2:], 2):
                better = blob.data > out
                out = xp.where(better, blob.data, out)
                mask[better] = i
            self.mask = mask
        top[0].data[...] = out

    def _plain_sum(self):
        return self.is_sum and all(c == 1.0 for c in self.coeffs)

    def _add_into_top(self, bottom, top, epilogue=None):
        # a plain sum (ResNet's shortcuts): added straight into the top, no temporaries, over
        # element ranges on brewnet's threads, each range then given to ``epilogue`` in cache
        xp = self.xp
        flat = [b.data.reshape(-1) for b in bottom]
        out = top[0].data.reshape(-1)

        def add(a, z):
            xp.add(flat[0][a:z], flat[1][a:z], out=out[a:z])
            for f in flat[2:]:
                out[a:z] += f[a:z]
            if epilogue is not None:
                epilogue(out[a:z])

        parallel.elementwise(add, out.size, xp)

    def forward_with_epilogue(self, bottom, top, epilogue):
        """forward, with ``epilogue`` applied in place to each range of the top as it is summed
        (layers/fusion.py's Eltwise -> ReLU, ResNet's residual sums); returns False, having run
        nothing, for anything but a plain sum on the CPU."""
        if not self._plain_sum() or type(top[0].data) is not numpy.ndarray:
            return False
        self._add_into_top(bottom, top, epilogue)
        return True

    def backward(self, top, propagate_down, bottom):
        dy, y = top[0].diff, top[0].data
        if self._plain_sum():
            # each bottom's gradient is dy: one copy each (on brewnet's threads), none for an
            # in-place bottom (its diff is dy)
            for b, down in zip(bottom, propagate_down):
                if down and b is not top[0]:
                    parallel.copy(b.diff, dy, self.xp)
            return
        grads = []
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                grads.append(None)
            elif self.is_prod:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    g = others[0].copy()
                    for o in others[1:]:
                        g *= o
                else:
                    g = y / b.data
                grads.append(g * dy)
            elif self.is_sum:
                grads.append(dy * self.coeffs[i] if self.coeffs[i] != 1.0 else dy.copy())
            else:
                grads.append(dy * (self.mask == i))
        # write after all are computed: in-place tops share bottom 0's diff
        for b, g in zip(bottom, grads):
            if g is not None:
                b.diff[...] = g


@register("Reduction")
class Reduction(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        R = caffe_pb2.ReductionParameter
        self.op = self.param.reduction_param.operation
        if self.op not in (R.SUM, R.ASUM, R.SUMSQ, R.MEAN):
            raise self.error(f"unknown reduction operation {self.op}")
        self.ops = R

    def reshape(self, bottom, top):
        p = self.param.reduction_param
        axis = canonical_axis(self, bottom[0], p.axis)
        self.num = bottom[0].count_range(0, axis)
        self.dim = bottom[0].count_range(axis)
        top[0].reshape(bottom[0].shape[:axis])
        self.coeff = float(p.coeff) / self.dim if self.op == self.ops.MEAN else float(p.coeff)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == self.ops.ASUM:
            r = self.xp.abs(x).sum(axis=1)
        elif self.op == self.ops.SUMSQ:
            r = (x * x).sum(axis=1)
        else:
            r = x.sum(axis=1)
        if self.coeff != 1.0:
            r *= self.coeff
        top[0].data[...] = r.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = top[0].diff.reshape(self.num, 1) * self.coeff
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == self.ops.ASUM:
            d = self.xp.sign(x) * g
        elif self.op == self.ops.SUMSQ:
            d = x * (2 * g)
        else:
            d = self.xp.broadcast_to(g, x.shape)
        bottom[0].diff[...] = d.reshape(bottom[0].shape)


@register("ArgMax", v1="ARGMAX")
class ArgMax(Layer):
    exact_bottoms = 1
    exact_tops = 1
    has_backward = False  # piecewise constant: Caffe's backward is NOT_IMPLEMENTED

    def allow_force_backward(self, bottom_index):
        return False  # so force_backward does not run into the missing gradient

    def setup(self, bottom, top):
        p = self.param.argmax_param
        self.out_max_val = p.out_max_val
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error("argmax_param.top_k must be at least 1")
        if self.has_axis:
            self.axis = canonical_axis(self, bottom[0], p.axis)
            limit = bottom[0].shape[self.axis]
        else:
            limit = bottom[0].count_range(1)
        if self.top_k > limit:
            raise self.error(f"argmax_param.top_k {self.top_k} exceeds the {limit} values it ranks")

    def reshape(self, bottom, top):
        if self.has_axis:
            shape = list(bottom[0].shape)
            shape[self.axis] = self.top_k
        else:
            shape = [1] * max(bottom[0].num_axes, 3)
            shape[0] = bottom[0].shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        top[0].reshape(shape)

    def _top_k(self, x):
        """Largest top_k along the last axis, descending; equal values: larger index first
        (Caffe sorts (value, index) pairs with std::greater)."""
        xp, k = self.xp, self.top_k
        dim = x.shape[-1]
        flipped = x[..., ::-1]  # so the first hit among equals is the largest index
        if k == 1:
            order = xp.argmax(flipped, axis=-1)[..., None]
        else:
            order = xp.argsort(-flipped, axis=-1, kind="stable")[..., :k]
        idx = (dim - 1) - order
        return idx, xp.take_along_axis(x, idx, axis=-1)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        dtype = top[0].dtype
        if self.has_axis:
            idx, val = self._top_k(xp.moveaxis(x, self.axis, -1))
            out = val if self.out_max_val else idx.astype(dtype)
            top[0].data[...] = xp.moveaxis(out, -1, self.axis)
        else:
            n = x.shape[0]
            idx, val = self._top_k(x.reshape(n, -1))
            out = top[0].data.reshape(n, -1)
            out[:, :self.top_k] = idx.astype(dtype)
            if self.out_max_val:
                out[:, self.top_k:] = val
