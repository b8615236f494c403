"""Caffe's utility layers: inner product, embedding, softmax, blob plumbing
(concat/slice/split/flatten/reshape/tile/filter/reindex), eltwise, reduction,
argmax, and the bottomless sources (Input, Parameter, DummyData, Silence).

Shape rules, defaults and tie-breaking follow BVLC Caffe so that numbers match.
"""

import numpy

from netdef import DefinitionError

from . import parallel
from .base import Layer
from .blas import matmul_acc
from .fillers import fill
from .registry import register


def layer_error(layer, message):
    """A one-line user error naming the layer."""
    return DefinitionError(f"layer {layer.name!r} ({layer.type}): {message}")


def canonical_axis(layer, blob, axis, what="axis"):
    n = blob.num_axes
    if not -n <= axis < max(n, 1):
        raise layer_error(layer, f"{what} {axis} out of range for a {n}-axis blob of shape {blob.shape}")
    return axis + n if axis < 0 else axis


def axis_slice(axis, start, stop):
    """An index selecting [start, stop) along ``axis``."""
    return (slice(None),) * axis + (slice(start, stop),)


def share_view(top, bottom, shape):
    """Caffe's ShareData: ``top`` sees ``bottom``'s data under another shape (no copy)."""
    top.data = bottom.data.reshape(shape)


def _int_indices(layer, values, upper, what):
    """Float-coded indices -> int array, checked to lie in [0, upper) (Caffe CHECKs them)."""
    idx = values.astype(numpy.int64)  # C++ static_cast<int>: truncation toward zero
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise layer_error(layer, f"{what} out of range [0, {upper}): min {int(idx.min())}, max {int(idx.max())}")
    return idx


# ---------------------------------------------------------------------------
# learnable
# ---------------------------------------------------------------------------
@register("InnerProduct", v1="INNER_PRODUCT")
class InnerProductLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise layer_error(self, "inner_product_param.num_output must be positive")
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = canonical_axis(self, bottom[0], p.axis)
        self.k = bottom[0].count_range(self.axis)
        if not self.blobs:
            n, k = self.num_output, self.k
            weight = self.make_blob((k, n) if self.transpose else (n, k))
            self.blobs.append(weight)
            fill(weight, p.weight_filler, self.rng)
            if self.bias_term:
                bias = self.make_blob((n,))
                self.blobs.append(bias)
                fill(bias, p.bias_filler, self.rng)

    def reshape(self, bottom, top):
        axis = canonical_axis(self, bottom[0], self.param.inner_product_param.axis)
        k = bottom[0].count_range(axis)
        if k != self.k:
            raise layer_error(self, f"input size {k} (shape {bottom[0].shape} from axis {axis}) "
                                    f"does not match the weights' input size {self.k}")
        self.axis = axis
        self.m = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def _weight_nk(self):
        # weights viewed as (N, K) whatever the stored layout
        w = self.blobs[0].data
        return w.T if self.transpose else w

    # below this many multiply-adds a GEMM is cheaper than handing out jobs
    parallel_min_macs = 1 << 21

    def _split(self, fn, size):
        """fn(start, stop) over 0..size in blocks across the CPU threads (one when the layer is small)."""
        big = self.m * self.k * self.num_output >= self.parallel_min_macs
        parallel.over_ranges(fn, size, self.xp, big, per_thread=2)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.m, self.k)
        out = top[0].data.reshape(self.m, self.num_output)
        w = self._weight_nk()
        # output features split across threads: each reads its own rows of the weights once
        def block(a, b):
            if self.xp is numpy and b - a >= 64:
                # computed as (features, samples): OpenBLAS streams the weights 1.2-1.4x faster
                # into that shape than into (samples, features) when the batch is small
                out[:, a:b] = self.xp.matmul(w[a:b], x.T).T
            else:
                self.xp.matmul(x, w[a:b].T, out=out[:, a:b])
            if self.bias_term:
                out[:, a:b] += self.blobs[1].data[a:b]

        self._split(block, self.num_output)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.m, self.num_output)
        x = bottom[0].data.reshape(self.m, self.k)
        if self.param_needs_grad(0):
            # accumulate straight into the diff (a weight-sized temporary costs more than the GEMM),
            # or write it there where the diff was just cleared; threads take row blocks of the weight
            diff, zero = self.blobs[0].diff_to_overwrite()

            def weight_block(a, b):
                lhs, rhs = (x[:, a:b].T, dy) if self.transpose else (dy[:, a:b].T, x)
                if zero:
                    self.xp.matmul(lhs, rhs, out=diff[a:b])
                else:
                    matmul_acc(lhs, rhs, diff[a:b])

            self._split(weight_block, diff.shape[0])
        if self.bias_term and self.param_needs_grad(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            dx = bottom[0].diff.reshape(self.m, self.k)
            w = self._weight_nk()

            def input_block(a, b):
                if self.xp is numpy:
                    # as (inputs, samples), like forward: a thread's column block of the weight
                    # streams about 1.25x faster that way at CaffeNet's batch of 10
                    self.xp.matmul(w[:, a:b].T, dy.T, out=dx[:, a:b].T)
                else:
                    self.xp.matmul(dy, w[:, a:b], out=dx[:, a:b])

            self._split(input_block, self.k)


@register("Embed")
class EmbedLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return False  # the bottom holds indices

    def setup(self, bottom, top):
        p = self.param.embed_param
        self.num_output = int(p.num_output)
        self.input_dim = int(p.input_dim)
        if self.num_output <= 0:
            raise layer_error(self, "embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise layer_error(self, "embed_param.input_dim must be positive")
        self.bias_term = p.bias_term
        if not self.blobs:
            weight = self.make_blob((self.input_dim, self.num_output))
            self.blobs.append(weight)
            fill(weight, p.weight_filler, self.rng)
            if self.bias_term:
                bias = self.make_blob((self.num_output,))
                self.blobs.append(bias)
                fill(bias, p.bias_filler, self.rng)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward(self, bottom, top):
        self.index = _int_indices(self, bottom[0].data.reshape(-1), self.input_dim, "embed index")
        out = top[0].data.reshape(-1, self.num_output)
        out[...] = self.blobs[0].data[self.index]
        if self.bias_term:
            out += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(-1, self.num_output)
        if self.param_needs_grad(0):
            w = self.blobs[0]
            self.xp.add.at(w.diff, self.index, dy)
        if self.bias_term and self.param_needs_grad(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = 0  # indices have no gradient


@register("Parameter")
class ParameterLayer(Layer):
    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom, top):
        shape = tuple(self.param.parameter_param.shape.dim)
        if not self.blobs:
            self.blobs.append(self.make_blob(shape))  # zeros, as Caffe's fresh blob
        top[0].reshape(self.blobs[0].shape)

    def reshape(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom, top):
        top[0].reshape(self.blobs[0].shape)
        top[0].data[...] = self.blobs[0].data

    def backward(self, top, propagate_down, bottom):
        if self.param_needs_grad(0):
            self.blobs[0].diff += top[0].diff


# ---------------------------------------------------------------------------
# softmax / eltwise / reduction / argmax
# ---------------------------------------------------------------------------
@register("Softmax", v1="SOFTMAX")
class SoftmaxLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self, bottom[0], self.param.softmax_param.axis)
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = self.xp
        x = bottom[0].data
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        e /= e.sum(axis=self.axis, keepdims=True)
        top[0].data[...] = e

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff
        dot = (dy * y).sum(axis=self.axis, keepdims=True)
        bottom[0].diff[...] = (dy - dot) * y


@register("Eltwise", v1="ELTWISE")
class EltwiseLayer(Layer):
    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom, top):
        from netdef import caffe_pb2

        p = self.param.eltwise_param
        E = caffe_pb2.EltwiseParameter
        self.op = p.operation
        if self.op not in (E.PROD, E.SUM, E.MAX):
            raise layer_error(self, f"unknown eltwise operation {self.op}")
        if len(p.coeff) not in (0, len(bottom)):
            raise layer_error(self, f"eltwise_param.coeff needs one value per bottom ({len(bottom)}), got {len(p.coeff)}")
        if self.op == E.PROD and len(p.coeff):
            raise layer_error(self, "eltwise_param.coeff is only allowed with operation SUM")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad
        self.is_prod, self.is_sum = self.op == E.PROD, self.op == E.SUM

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise layer_error(self, f"bottom 0 has shape {bottom[0].shape} but bottom {i} has {b.shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        xp = self.xp
        if self.is_prod:
            out = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                out *= b.data
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

    def backward(self, top, propagate_down, bottom):
        dy, y = top[0].diff, top[0].data
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
class ReductionLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        from netdef import caffe_pb2

        R = caffe_pb2.ReductionParameter
        self.op = self.param.reduction_param.operation
        if self.op not in (R.SUM, R.ASUM, R.SUMSQ, R.MEAN):
            raise layer_error(self, f"unknown reduction operation {self.op}")
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
class ArgMaxLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return False  # piecewise constant: Caffe has no backward

    def setup(self, bottom, top):
        p = self.param.argmax_param
        self.out_max_val = p.out_max_val
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise layer_error(self, "argmax_param.top_k must be at least 1")
        if self.has_axis:
            self.axis = canonical_axis(self, bottom[0], p.axis)
            limit = bottom[0].shape[self.axis]
        else:
            limit = bottom[0].count_range(1)
        if self.top_k > limit:
            raise layer_error(self, f"argmax_param.top_k {self.top_k} exceeds the {limit} values it ranks")

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

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 0


# ---------------------------------------------------------------------------
# blob plumbing
# ---------------------------------------------------------------------------
@register("Concat", v1="CONCAT")
class ConcatLayer(Layer):
    min_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise layer_error(self, "give either concat_param.axis or the legacy concat_dim, not both")

    def reshape(self, bottom, top):
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            axis = int(p.concat_dim)
            if axis >= bottom[0].num_axes:
                raise layer_error(self, f"concat_dim {axis} out of range for shape {bottom[0].shape}")
        else:
            axis = canonical_axis(self, bottom[0], p.axis)
        self.axis = axis
        shape = list(bottom[0].shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != len(shape) or any(
                    b.shape[j] != shape[j] for j in range(len(shape)) if j != axis):
                raise layer_error(self, f"bottom {i} shape {b.shape} does not match bottom 0 shape "
                                        f"{bottom[0].shape} except along axis {axis}")
            shape[axis] += b.shape[axis]
        if len(bottom) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
        else:
            top[0].reshape(shape)

    def forward(self, bottom, top):
        if len(bottom) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        start = 0
        for b in bottom:
            stop = start + b.shape[self.axis]
            top[0].data[axis_slice(self.axis, start, stop)] = b.data
            start = stop

    def backward(self, top, propagate_down, bottom):
        start = 0
        for b, down in zip(bottom, propagate_down):
            stop = start + b.shape[self.axis]
            if down:
                b.diff[...] = top[0].diff[axis_slice(self.axis, start, stop)]
            start = stop


@register("Slice", v1="SLICE")
class SliceLayer(Layer):
    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom, top):
        p = self.param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise layer_error(self, "give either slice_param.axis or the legacy slice_dim, not both")

    def reshape(self, bottom, top):
        p = self.param.slice_param
        if p.HasField("slice_dim"):
            axis = int(p.slice_dim)
            if axis >= bottom[0].num_axes:
                raise layer_error(self, f"slice_dim {axis} out of range for shape {bottom[0].shape}")
        else:
            axis = canonical_axis(self, bottom[0], p.axis)
        self.axis = axis
        length = bottom[0].shape[axis]
        points = [int(s) for s in p.slice_point]
        if points:
            if len(points) != len(top) - 1:
                raise layer_error(self, f"{len(points)} slice_point(s) need {len(points) + 1} tops, got {len(top)}")
            if len(top) > length:
                raise layer_error(self, f"cannot cut axis {axis} of length {length} into {len(top)} slices")
            bounds = [0] + points + [length]
            if any(b <= a for a, b in zip(bounds[:-2], bounds[1:-1])):
                raise layer_error(self, f"slice_point values {points} must be increasing and positive")
            if bounds[-2] > length:
                raise layer_error(self, f"slice_point {bounds[-2]} beyond axis {axis} length {length}")
        else:
            if length % len(top):
                raise layer_error(self, f"{len(top)} tops do not evenly divide axis {axis} of length {length}")
            step = length // len(top)
            bounds = list(range(0, length + 1, step))
        self.bounds = bounds
        if len(top) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        for t, a, b in zip(top, bounds[:-1], bounds[1:]):
            shape = list(bottom[0].shape)
            shape[axis] = b - a
            t.reshape(shape)

    def forward(self, bottom, top):
        if len(top) == 1:
            share_view(top[0], bottom[0], bottom[0].shape)
            return
        for t, a, b in zip(top, self.bounds[:-1], self.bounds[1:]):
            t.data[...] = bottom[0].data[axis_slice(self.axis, a, b)]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        for t, a, b in zip(top, self.bounds[:-1], self.bounds[1:]):
            diff[axis_slice(self.axis, a, b)] = t.diff


@register("Split", v1="SPLIT")
class SplitLayer(Layer):
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is bottom[0]:
                raise layer_error(self, "Split cannot work in place")
            share_view(t, bottom[0], bottom[0].shape)

    def forward(self, bottom, top):
        for t in top:  # every top shares the bottom's data, as in Caffe
            share_view(t, bottom[0], bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        diff[...] = top[0].diff
        for t in top[1:]:
            diff += t.diff


@register("Flatten", v1="FLATTEN")
class FlattenLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise layer_error(self, "Flatten cannot work in place")
        p = self.param.flatten_param
        start = canonical_axis(self, bottom[0], p.axis)
        end = canonical_axis(self, bottom[0], p.end_axis, "end_axis")
        shape = bottom[0].shape
        self.top_shape = shape[:start] + (bottom[0].count_range(start, end + 1),) + shape[end + 1:]
        share_view(top[0], bottom[0], self.top_shape)

    def forward(self, bottom, top):
        share_view(top[0], bottom[0], self.top_shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Reshape")
class ReshapeLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise layer_error(self, "Reshape cannot work in place")
        dims = [int(d) for d in self.param.reshape_param.shape.dim]
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise layer_error(self, "reshape_param.shape may contain at most one -1")
        if any(d < -1 for d in dims):
            raise layer_error(self, f"reshape_param.shape has a negative dimension other than -1: {dims}")
        self.inferred_axis = inferred[0] if inferred else None
        self.dims = dims

    def reshape(self, bottom, top):
        p = self.param.reshape_param
        b = bottom[0]
        n = b.num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise layer_error(self, f"reshape_param.axis {p.axis} out of range for a {n}-axis bottom")
        if p.num_axes < -1:
            raise layer_error(self, "reshape_param.num_axes must be >= 0, or -1 for all")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise layer_error(self, f"axis + num_axes = {end} is beyond the bottom's {n} axes")
        shape = list(b.shape[:start]) + list(self.dims) + list(b.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise layer_error(self, f"shape dim {i} is 0 but the bottom has no axis {start + i} to copy")
            shape[start + i] = b.shape[start + i]
        if self.inferred_axis is not None:
            known = int(numpy.prod([d for j, d in enumerate(shape) if j != start + self.inferred_axis],
                                   dtype=numpy.int64))
            if known == 0 or b.count % known:
                raise layer_error(self, f"bottom count {b.count} is not divisible by the given dimensions' product {known}")
            shape[start + self.inferred_axis] = b.count // known
        shape = tuple(shape)
        count = int(numpy.prod(shape, dtype=numpy.int64))
        if count != b.count:
            raise layer_error(self, f"cannot reshape {b.shape} ({b.count} values) to {shape} ({count} values)")
        self.top_shape = shape
        share_view(top[0], b, shape)

    def forward(self, bottom, top):
        share_view(top[0], bottom[0], self.top_shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register("Tile")
class TileLayer(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom, top):
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise layer_error(self, "tile_param.tiles must be given")
        if p.tiles <= 0:
            raise layer_error(self, "tile_param.tiles must be positive")
        self.tiles = int(p.tiles)

    def reshape(self, bottom, top):
        axis = canonical_axis(self, bottom[0], self.param.tile_param.axis)
        self.outer = bottom[0].count_range(0, axis)
        self.inner = bottom[0].count_range(axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            d = top[0].diff.reshape(self.outer, self.tiles, self.inner).sum(axis=1)
            bottom[0].diff[...] = d.reshape(bottom[0].shape)


@register("Filter")
class FilterLayer(Layer):
    min_bottoms = 2
    min_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != len(self.param.bottom) - 1  # the selector is last

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise layer_error(self, f"needs one top per filtered bottom: {len(bottom) - 1} top(s), got {len(top)}")
        self.first_reshape = True

    def _select(self, bottom):
        sel = bottom[-1]
        if any(d != 1 for d in sel.shape[1:]):
            raise layer_error(self, f"selector shape {sel.shape} must be singleton after the first axis")
        for i, b in enumerate(bottom[:-1]):
            if b.shape[0] != sel.shape[0]:
                raise layer_error(self, f"bottom {i} has {b.shape[0]} items but the selector has {sel.shape[0]}")
        # the only host sync: the output size depends on the data
        self.indices = self.xp.nonzero(sel.data.reshape(-1) != 0)[0]

    def _shape_tops(self, bottom, top, rows):
        for t, b in zip(top, bottom):
            t.reshape((rows,) + b.shape[1:])

    def reshape(self, bottom, top):
        self._select(bottom)
        # Caffe's first reshape sizes the tops like the bottoms
        rows = bottom[0].shape[0] if self.first_reshape else int(self.indices.size)
        self.first_reshape = False
        self._shape_tops(bottom, top, rows)

    def forward(self, bottom, top):
        self._select(bottom)
        self._shape_tops(bottom, top, int(self.indices.size))
        for t, b in zip(top, bottom):
            t.data[...] = b.data[self.indices]

    def backward(self, top, propagate_down, bottom):
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                diff = b.diff
                diff[...] = 0
                diff[self.indices] = t.diff
        if propagate_down[-1]:
            bottom[-1].diff[...] = 0  # selectors have no gradient


@register("BatchReindex")
class BatchReindexLayer(Layer):
    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise layer_error(self, f"the index bottom must be 1-D, got shape {bottom[1].shape}")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def forward(self, bottom, top):
        self.index = _int_indices(self, bottom[1].data, bottom[0].shape[0], "reindex index")
        if top[0].count:
            top[0].data[...] = bottom[0].data[self.index]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            diff = bottom[0].diff
            diff[...] = 0
            self.xp.add.at(diff, self.index, top[0].diff)
        if propagate_down[1]:
            bottom[1].diff[...] = 0


# ---------------------------------------------------------------------------
# sources and sinks
# ---------------------------------------------------------------------------
@register("Silence", v1="SILENCE")
class SilenceLayer(Layer):
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register("Input")
class InputLayer(Layer):
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise layer_error(self, f"input_param.shape must be given once, once per top ({len(top)}), "
                                    f"or not at all; got {len(shapes)}")
        for i, t in enumerate(top):
            if shapes:
                t.reshape(tuple(shapes[0 if len(shapes) == 1 else i].dim))

    def reshape(self, bottom, top):
        pass  # the user (or the net) sizes and fills inputs

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register("DummyData", v1="DUMMY_DATA")
class DummyDataLayer(Layer):
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom, top):
        from netdef import caffe_pb2

        p = self.param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise layer_error(self, f"dummy_data_param needs 0, 1 or {n} data_filler(s), got {len(p.data_filler)}")
        legacy = [p.num, p.channels, p.height, p.width]
        if any(len(f) for f in legacy):
            if len(p.shape):
                raise layer_error(self, "dummy_data_param: give shape or num/channels/height/width, not both")
            for name, f in zip(("num", "channels", "height", "width"), legacy):
                if len(f) not in (1, n):
                    raise layer_error(self, f"dummy_data_param.{name} must be given once or once per top ({n})")
            shapes = [tuple(int(f[0 if len(f) == 1 else i]) for f in legacy) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise layer_error(self, f"dummy_data_param.shape must be given once or once per top ({n})")
            shapes = [tuple(p.shape[0 if len(p.shape) == 1 else i].dim) for i in range(n)]
        if len(p.data_filler) == 0:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        else:
            fillers = list(p.data_filler)
        self.fillers = fillers
        self.shapes = shapes
        # constant fillers fill once here; the others refill on every forward (Caffe's refill_)
        self.refill = [f.type != "constant" for f in fillers]
        for i, t in enumerate(top):
            t.reshape(shapes[i])
            f = self._filler(i)
            if not self.refill[f]:
                fill(t, self.fillers[f], self.rng)

    def _filler(self, top_index):
        return top_index if len(self.fillers) > 1 else 0

    def reshape(self, bottom, top):
        for t, shape in zip(top, self.shapes):
            t.reshape(shape)

    def forward(self, bottom, top):
        for i, t in enumerate(top):
            f = self._filler(i)
            if self.refill[f]:
                fill(t, self.fillers[f], self.rng)

    def backward(self, top, propagate_down, bottom):
        pass
